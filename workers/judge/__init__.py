"""The judge role: a Celery worker that scores rollout groups with math-verify.

`worker.py` is the role's entry point; `app.py` the Celery app and its task (`make_app`); `celery_app.py` what
`celery -A` loads for inspect and Flower; `verify.py` the pure scoring; `isolation.py` the pre-forked child each
answer runs in under a hard deadline; `config.py` the role's typed settings. The queue's contract (task name,
submit by name) is broker/judge_queue.py.
"""

"""The judge role: a Celery worker that scores rollout groups with math-verify.

`app.py` is the Celery app and its task (`make_app`; `celery_app.py` is what `celery -A` loads), `verify.py` the
pure scoring, `isolation.py` the pre-forked child each answer runs in under a hard deadline, `config.py` the role's
typed settings. The queue's contract (task name, submit by name) is broker/judge_queue.py.
"""

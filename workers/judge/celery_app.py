"""The module `celery -A workers.judge.celery_app worker` loads: the judge app, built from the environment.

Only Celery imports this, so the app is built where Celery loads it and nowhere else (`rlq worker judge` execs
exactly that command; tests and benchmarks build theirs with `workers.judge.app.make_app`).
"""

from workers.judge.app import app_from_env

app = app_from_env()

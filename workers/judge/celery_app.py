"""The app for Celery's own tools: `celery -A workers.judge.celery_app --broker URL inspect active`, `... flower`.

They need the task's name and the queue's contract (msgpack only), not a run's settings, so the app is built with
defaults here; Celery's `--broker` option (or CELERY_BROKER_URL) points it at the run's broker. Only Celery imports
this module. The judge workers themselves start with `rlq worker judge --config run.yaml` (workers/judge/worker.py),
which builds the app from the run config: a plain `celery -A workers.judge.celery_app worker` would serve the
"default" run with default settings.
"""

from workers.judge.app import DEFAULT_BROKER_URL, make_app

app = make_app(DEFAULT_BROKER_URL)

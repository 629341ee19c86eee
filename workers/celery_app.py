"""The one Celery app: queues, routing, delivery semantics. Tasks live in ``workers.tasks``;
``send_job`` here is the sender the domain's outbox dispatches through.

Queues: ``rollout`` (regenerate groups), ``grade``, ``train`` (one task at a time: run its worker
with ``--pool=solo -c 1``), ``eval``, ``promote``, and ``maintenance`` (beat ticks, the reaper).
Postgres is the job truth (``app.jobs``), so delivery only has to be at-least-once: results
are not stored in Celery, and ``acks_late`` is set per task, only where a re-delivery is harmless.

``celery -A workers.celery_app worker …`` finds ``app`` here; the broker comes from the settings
(Redis in production, kombu's SQLAlchemy transport on a SQLite file in the embedded default).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutting_down
from kombu import Queue, pools

from app.jobs.service import register_sender, request_stop
from app.models import JobKind
from app.observability import configure_logging, quiet_libraries
from app.settings import Settings, get_settings

QUEUES = ("rollout", "grade", "train", "eval", "promote", "maintenance")
TASK_QUEUES = {
    "tracelearn.rollout": "rollout",
    "tracelearn.grade": "grade",
    "tracelearn.train": "train",
    "tracelearn.evaluate": "eval",
    "tracelearn.promote": "promote",
    "tracelearn.policy_tick": "maintenance",
    "tracelearn.reap": "maintenance",
    "tracelearn.retention": "maintenance",
}


JOB_TASKS = {
    JobKind.rollout: "tracelearn.rollout",
    JobKind.grade: "tracelearn.grade",
    JobKind.train: "tracelearn.train",
    JobKind.eval: "tracelearn.evaluate",
    JobKind.promote: "tracelearn.promote",
}
"""The task that runs each job kind (its queue: ``TASK_QUEUES``)."""


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.resolved_broker_url
    transport_options: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://")):
        # Unacked messages of a dead consumer come back after this; our reaper is faster, so
        # keep it longer than the longest task to avoid needless duplicates.
        transport_options = {"visibility_timeout": 6 * 3600}
    elif broker.startswith("sqla+sqlite"):
        # kombu hands these to create_engine: wait on SQLite's lock instead of failing, since
        # the API, the workers and beat all write the same broker file.
        transport_options = {"connect_args": {"timeout": 30}}
    return {
        "broker_url": broker,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_always_eager": settings.task_always_eager,
        "task_eager_propagates": True,
        "task_queues": [Queue(q) for q in QUEUES],
        "task_default_queue": "maintenance",
        "task_routes": {name: {"queue": q} for name, q in TASK_QUEUES.items()},
        # Long tasks: a worker takes one message at a time, the rest stay available to others.
        "worker_prefetch_multiplier": 1,
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_scheduler": "workers.beat:DatabaseScheduler",
        "beat_max_loop_interval": 5,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    celery = Celery("tracelearn", include=["workers.tasks"])
    celery.conf.update(celery_config(settings or get_settings()))
    return celery


app = create_celery()
_configured_for: str | None = None
_lock = threading.Lock()


def get_celery() -> Celery:
    """``app``, reconfigured when the process-wide settings changed (tests, `tracelearn up`)."""
    global _configured_for
    settings = get_settings()
    fingerprint = f"{settings.resolved_broker_url}|{settings.task_always_eager}"
    with _lock:
        if fingerprint != _configured_for:
            if _configured_for is not None:
                # kombu keeps connection and producer pools in process-wide registries keyed by
                # broker URL; closing only ours would leave a closed pool there for the next time
                # the same URL comes back. ``pools.reset`` closes and forgets them all.
                pools.reset()
                app._pool = None
                app.amqp._producer_pool = None
            app.conf.update(celery_config(settings))
            _configured_for = fingerprint
    return app


def send_job(kind: JobKind, job_id: int, countdown: float | None = None) -> None:
    """The domain's job sender: "go look at job N" on the queue of its kind. Sent by name, so
    the API needs none of the task modules; in eager mode (embedded tests, the demo) the task runs
    here, after Celery imports the task modules it includes."""
    celery = get_celery()
    name = JOB_TASKS[kind]
    if celery.conf.task_always_eager:
        celery.loader.import_default_modules()
        celery.tasks[name].apply(args=[job_id])
    else:
        celery.send_task(name, args=[job_id], countdown=countdown)


# Every process that loads the Celery shell (workers, beat, the API, the CLI) dispatches through it.
register_sender(send_job)


@worker_shutting_down.connect
def _hand_back_running_jobs(**_: Any) -> None:
    # TERM/INT: jobs in hand hand themselves back at their next check instead of staying
    # `running` until their lease expires.
    request_stop()


@worker_init.connect
def _preload(**_: Any) -> None:
    quiet_libraries()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    # torch + transformers take seconds to import; pay that before the worker reports ready,
    # not inside the first task (where it would also eat into the job's lease).
    import workers.inference.local  # noqa: F401

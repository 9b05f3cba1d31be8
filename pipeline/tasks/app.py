"""The Celery application: broker, queues, delivery guarantees and the periodic tasks.

The control plane only *sends* tasks, by name (``schemas.records``), through the
senders on ``Runtime``; what runs them is registered in the worker process
(``workers.tasks``), so nothing here imports the data plane.

Delivery: tasks are acknowledged late (after they ran) and rejected back to the
queue if the worker process is lost; each worker prefetches one task, so a queue's
length is the work still waiting (what autoscaling reads). Tasks carry only
``schemas.records`` payloads. No result backend: state lives in SQL.

Timing: the broker's visibility timeout (Redis: redelivery of an unacknowledged
task) is ``broker.visibility_timeout``; a shard's lease (``worker.lease_seconds``,
renewed every ``worker.heartbeat_seconds``) is what actually guards ownership, and
the reaper re-queues a shard whose lease expired. A redelivered duplicate is
harmless: the claim is a guarded UPDATE.

The embedded default uses kombu's filesystem transport (``pipeline.tasks.fs_transport``:
messages renamed into place whole): queues are folders under ``<home>/broker``,
shared by every process on the machine, no server needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from schemas.records import REAP, SCHEDULES_TICK, STORAGE_SWEEP

if TYPE_CHECKING:
    from pipeline.runtime import Runtime

__all__ = ["make_celery"]


def _transport_options(runtime: Runtime) -> dict[str, Any]:
    settings = runtime.settings
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    return {
        "visibility_timeout": settings.broker.visibility_timeout,
        # Notice a dead connection (Redis restarted, network cut) and reconnect.
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
    }


def _beat_schedule(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """The periodic tasks: each expires after its own interval, so a scheduler
    that ran while no worker did leaves no backlog of duplicates behind."""
    settings = runtime.settings
    every = {
        "spotlane-reap": (REAP, settings.worker.reap_interval_seconds),
        "spotlane-schedules": (SCHEDULES_TICK, settings.scheduler.tick_seconds),
        "spotlane-storage-sweep": (STORAGE_SWEEP, settings.storage.sweep_interval_seconds),
    }
    return {
        key: {"task": task, "schedule": seconds, "options": {"queue": settings.control_queue, "expires": seconds}}
        for key, (task, seconds) in every.items()
    }


def make_celery(runtime: Runtime) -> Celery:
    """The app: configuration and the periodic tasks' schedule; no task bodies (see ``workers.tasks``)."""
    settings = runtime.settings
    app = Celery("spotlane", broker=settings.broker.url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.control_queue,
        broker_connection_retry_on_startup=True,
        # Keep reconnecting to a broker that went away; tasks wait in the broker.
        broker_connection_max_retries=None,
        broker_transport_options=_transport_options(runtime),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # The filesystem transport has no broadcast: remote control needs a server.
        worker_enable_remote_control=not settings.embedded_broker,
        beat_schedule=_beat_schedule(runtime),
        timezone="UTC",
    )
    if settings.embedded_broker:
        app.conf.broker_transport = "pipeline.tasks.fs_transport:Transport"
    return app

"""The Celery application: broker, queues, delivery guarantees and the task names.

Delivery: tasks are acknowledged late (after they ran) and rejected back to the
queue if the worker process is lost; each worker prefetches one task, so a queue's
length is the work still waiting (what autoscaling reads). Tasks carry only
``schemas.records`` payloads. No result backend: state lives in SQL.

Timing: the broker's visibility timeout (Redis: redelivery of an unacknowledged
task) is ``broker.visibility_timeout``; a shard's lease (``worker.lease_seconds``,
renewed every ``worker.heartbeat_seconds``) is what actually guards ownership, and
the reaper re-queues a shard whose lease expired. A redelivered duplicate is
harmless: the claim is a guarded UPDATE.

The embedded default uses kombu's filesystem transport: queues are folders under
``<home>/broker``, shared by every process on the machine, no server needed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.exceptions import Reject

from schemas.records import FINALIZE_JOB, ROUTE_JOB, RUN_SHARD, FinalizeJob, RouteJob, RunShard

from workers.drain import StopFlag

if TYPE_CHECKING:
    from pipeline.runtime import Runtime
    from workers.runner import ShardRunner

__all__ = ["TASKS", "make_celery"]

log = logging.getLogger(__name__)

#: Every task and the queue it runs on (``<pool>``: the GPU pool's name).
TASKS = {
    ROUTE_JOB: "control",
    FINALIZE_JOB: "control",
    "spotlane.reap": "control",
    "spotlane.schedules_tick": "control",
    "spotlane.storage_sweep": "control",
    RUN_SHARD: "gpu.<pool>",
}


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
        "spotlane-reap": ("spotlane.reap", settings.worker.reap_interval_seconds),
        "spotlane-schedules": ("spotlane.schedules_tick", settings.scheduler.tick_seconds),
        "spotlane-storage-sweep": ("spotlane.storage_sweep", settings.storage.sweep_interval_seconds),
    }
    return {
        key: {"task": task, "schedule": seconds, "options": {"queue": settings.control_queue, "expires": seconds}}
        for key, (task, seconds) in every.items()
    }


def make_celery(runtime: Runtime) -> Celery:
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
    app.spotlane_runtime = runtime
    _register(app, runtime)
    return app


#: This process's drain flag: set on warm shutdown, read by the shard runner.
STOP = StopFlag()


def _runner(app: Celery, runtime: Runtime) -> ShardRunner:
    runner: ShardRunner | None = getattr(app, "spotlane_runner", None)
    if runner is None:
        from workers.runner import ShardRunner

        runner = ShardRunner(runtime, stop=STOP, on_hung=_exit_after_hang)
        app.spotlane_runner = runner
    return runner


#: Seconds a worker whose engine hung waits (its shard already handed back) before it exits.
HANG_EXIT_GRACE = 5.0


def _exit_after_hang() -> None:
    """A hung engine (a stuck CUDA kernel, a lost continuous-batching result) does not
    come back: the shard was handed back; end the process so its supervisor starts a
    fresh one."""
    log.critical("the engine is hung; this worker exits in %.0f s", HANG_EXIT_GRACE)
    timer = threading.Timer(HANG_EXIT_GRACE, os._exit, args=(70,))
    timer.daemon = True
    timer.start()


def _register(app: Celery, runtime: Runtime) -> None:
    @app.task(name=ROUTE_JOB)
    def route_job(payload: dict[str, Any]) -> int:
        from pipeline.router import route_job as route

        return route(runtime, RouteJob.decode(payload).job_id)

    @app.task(name=RUN_SHARD)
    def run_shard(payload: dict[str, Any]) -> str | None:
        if STOP:
            # Draining: put the task back for another worker rather than start it.
            raise Reject("worker is shutting down", requeue=True)
        status = _runner(app, runtime).run(RunShard.decode(payload))
        return status.value if status is not None else None

    @app.task(name=FINALIZE_JOB)
    def finalize_job(payload: dict[str, Any]) -> str | None:
        from pipeline.finalizer import finalize_job as finalize

        status = finalize(runtime, FinalizeJob.decode(payload).job_id)
        return status.value if status is not None else None

    @app.task(name="spotlane.reap")
    def reap(*_: Any) -> None:
        from pipeline.reaper import reap as do_reap

        do_reap(runtime)

    @app.task(name="spotlane.schedules_tick")
    def schedules_tick(*_: Any) -> int:
        from pipeline.schedules import tick

        return len(tick(runtime))

    @app.task(name="spotlane.storage_sweep")
    def storage_sweep(*_: Any) -> int:
        from pipeline.lifecycle import sweep

        return len(sweep(runtime).actions)


#: Seconds a stopping worker may take before it exits regardless (set by ``run_worker``).
SHUTDOWN_GRACE: list[float] = []
_WATCHDOG: list[threading.Timer] = []


@signals.worker_shutting_down.connect
def _drain_on_shutdown(**_: object) -> None:
    """Warm shutdown (SIGTERM): the shard in hand stops at its next checkpoint.

    A watchdog then ends the process after the grace period, whatever Celery is
    waiting for; the lease and the reaper make that as safe as kill -9.
    """
    STOP.set()
    if SHUTDOWN_GRACE and not _WATCHDOG:
        watchdog = threading.Timer(SHUTDOWN_GRACE[0], os._exit, args=(1,))
        watchdog.daemon = True
        watchdog.start()
        _WATCHDOG.append(watchdog)

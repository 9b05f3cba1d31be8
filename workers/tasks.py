"""The task bodies a worker process runs, registered on the control plane's Celery app.

The control plane sends tasks by name (``schemas.records``) and never imports
this module; a worker process (``workers.process``) calls ``register`` once. Each
body decodes its record and calls one function: the router, the shard runner,
the finalizer, the reaper, the provider batches' poller, the scheduler's tick or
the storage sweep.

What the process shares between its tasks and its signal handlers lives in one
``WorkerState``: the drain flag, the shutdown grace and its watchdog, the shard
runner (one per process: it holds the loaded engines).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.exceptions import Reject

from schemas.records import (
    DELIVER_WEBHOOKS,
    FINALIZE_JOB,
    POLL_BATCHES,
    REAP,
    ROUTE_JOB,
    RUN_SHARD,
    SCHEDULES_TICK,
    STORAGE_SWEEP,
    DeliverWebhooks,
    FinalizeJob,
    RouteJob,
    RunShard,
)
from workers.drain import StopFlag

if TYPE_CHECKING:
    from pipeline.runtime import Runtime
    from workers.runner import ShardRunner

__all__ = ["HANG_EXIT_GRACE", "WorkerState", "register"]

log = logging.getLogger(__name__)

#: Seconds a worker whose engine hung waits (its shard already handed back) before it exits.
HANG_EXIT_GRACE = 5.0


@dataclass
class WorkerState:
    """One worker process's shared state."""

    #: Set on a warm shutdown (SIGTERM, Ctrl-C) or a spot notice; read by the shard runner.
    stop: StopFlag = field(default_factory=StopFlag)
    #: Seconds a stopping worker may take before it exits regardless (None: no limit).
    shutdown_grace: float | None = None
    watchdog: threading.Timer | None = None
    runner: ShardRunner | None = None

    def shard_runner(self, runtime: Runtime) -> ShardRunner:
        if self.runner is None:
            from workers.runner import ShardRunner

            self.runner = ShardRunner(runtime, stop=self.stop, on_hung=_exit_after_hang)
        return self.runner

    def drain(self) -> None:
        """Warm shutdown: the shard in hand stops at its next checkpoint.

        A watchdog then ends the process after the grace period, whatever Celery is
        waiting for; the lease and the reaper make that as safe as kill -9.
        """
        self.stop.set()
        if self.shutdown_grace is not None and self.watchdog is None:
            self.watchdog = threading.Timer(self.shutdown_grace, os._exit, args=(1,))
            self.watchdog.daemon = True
            self.watchdog.start()


def _exit_after_hang() -> None:
    """A hung engine (a stuck CUDA kernel, a lost continuous-batching result) does not
    come back: the shard was handed back; end the process so its supervisor starts a
    fresh one."""
    log.critical("the engine is hung; this worker exits in %.0f s", HANG_EXIT_GRACE)
    timer = threading.Timer(HANG_EXIT_GRACE, os._exit, args=(70,))
    timer.daemon = True
    timer.start()


def register(app: Celery, runtime: Runtime, state: WorkerState) -> None:
    """Register every task body on ``app`` and drain ``state`` on a warm shutdown."""

    @app.task(name=ROUTE_JOB)
    def route_job(payload: dict[str, Any]) -> int:
        from pipeline.routing.router import route_job as route

        return route(runtime, RouteJob.decode(payload).job_id)

    @app.task(name=RUN_SHARD)
    def run_shard(payload: dict[str, Any]) -> str | None:
        if state.stop:
            # Draining: put the task back for another worker rather than start it.
            raise Reject("worker is shutting down", requeue=True)
        status = state.shard_runner(runtime).run(RunShard.decode(payload))
        return status.value if status is not None else None

    @app.task(name=FINALIZE_JOB)
    def finalize_job(payload: dict[str, Any]) -> str | None:
        from pipeline.tasks.finalize import finalize_job as finalize

        status = finalize(runtime, FinalizeJob.decode(payload).job_id)
        return status.value if status is not None else None

    @app.task(name=REAP)
    def reap(*_: Any) -> None:
        from pipeline.tasks.reaper import reap as do_reap

        do_reap(runtime)

    @app.task(name=DELIVER_WEBHOOKS)
    def deliver_webhooks(payload: dict[str, Any]) -> int:
        from pipeline.jobs.webhooks import deliver_due

        DeliverWebhooks.decode(payload)
        return deliver_due(runtime)

    @app.task(name=POLL_BATCHES)
    def poll_batches(*_: Any) -> int:
        from workers.batch_lane import poll

        return poll(runtime)

    @app.task(name=SCHEDULES_TICK)
    def schedules_tick(*_: Any) -> int:
        from pipeline.tasks.scheduler import tick

        return len(tick(runtime))

    @app.task(name=STORAGE_SWEEP)
    def storage_sweep(*_: Any) -> int:
        from pipeline.storage.lifecycle import sweep

        return len(sweep(runtime).actions)

    def on_shutdown(**_: object) -> None:
        state.drain()

    signals.worker_shutting_down.connect(on_shutdown, weak=False)

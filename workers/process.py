"""Running a worker process: the Celery worker, its reaper and presence threads, beat.

A spotlane worker is a Celery worker with the solo pool (one model per process,
one shard at a time, prefetch 1) plus a reaper thread that re-queues work left by
dead processes. SIGTERM is a warm shutdown: the shard in hand is checkpointed and
handed back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from pipeline import metrics
from pipeline.runtime import Runtime
from pipeline.store import presence
from pipeline.store.identity import owner_id
from workers.spot_notice import SpotNoticeProbe
from workers.tasks import WorkerState, register

__all__ = ["Presence", "Reaper", "run_scheduler", "run_worker"]

log = logging.getLogger(__name__)


class Reaper(threading.Thread):
    """Runs ``pipeline.tasks.reaper.reap`` now and every ``interval`` seconds."""

    def __init__(self, runtime: Runtime, interval: float) -> None:
        super().__init__(daemon=True, name="spotlane-reaper")
        self.runtime, self.interval = runtime, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        from pipeline.tasks.reaper import reap

        while True:
            try:
                reap(self.runtime)
            except Exception:
                log.warning("reaper sweep failed; retrying in %.0fs", self.interval, exc_info=True)
            if self.stopped.wait(self.interval):
                return


class Presence(threading.Thread):
    """Keeps this worker's row in ``workers`` fresh while it runs (``pipeline.store.presence``)."""

    def __init__(self, runtime: Runtime, owner: str, queues: list[str]) -> None:
        super().__init__(daemon=True, name="spotlane-presence")
        self.runtime, self.owner, self.queues = runtime, owner, queues
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = self.runtime.settings.worker.reap_interval_seconds
        while True:
            try:
                presence.announce(self.runtime.engine, self.owner, self.queues)
            except Exception:  # a database blip: the next beat says it again
                log.warning("could not record this worker's presence", exc_info=True)
            if self.stopped.wait(interval):
                break
        try:
            presence.leave(self.runtime.engine, self.owner)
        except Exception:  # it ages out by itself
            pass


def run_worker(
    runtime: Runtime, queues: list[str] | None = None, *, loglevel: str = "INFO", reaper: bool = True
) -> int:
    """Consume ``queues`` (default: every queue) until shut down; return the exit code."""
    settings = runtime.settings
    state = WorkerState(shutdown_grace=settings.worker.shutdown_grace_seconds)
    register(runtime.celery, runtime, state)
    metrics.serve(settings.metrics.port, settings.metrics.address)
    consumed = queues or settings.queues
    here = Presence(runtime, owner_id(), consumed)
    here.start()
    sweeper = Reaper(runtime, settings.worker.reap_interval_seconds) if reaper else None
    if sweeper is not None:
        sweeper.start()
    probe = None
    if settings.worker.spot_notice_url:
        # After the drain, stop the worker too: the instance is going away.
        probe = SpotNoticeProbe(
            settings.worker.spot_notice_url,
            settings.worker.spot_notice_interval_seconds,
            state.stop,
            on_notice=lambda: os.kill(os.getpid(), signal.SIGTERM),
        )
        probe.start()
    worker = runtime.celery.Worker(
        queues=consumed,
        pool="solo",
        concurrency=1,
        hostname=f"spotlane-{os.getpid()}@{socket.gethostname()}",
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        loglevel=loglevel,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        here.stopped.set()
        if sweeper is not None:
            sweeper.stopped.set()
        if probe is not None:
            probe.finished.set()
        here.join(5)
    # A drain (Ctrl-C, SIGTERM, a spot notice) is a normal stop, whichever signal asked for it.
    return 0 if state.stop else int(worker.exitcode or 0)


def run_scheduler(runtime: Runtime, *, loglevel: str = "INFO") -> None:
    """Celery beat: sends the periodic tasks (reaper sweep, schedules tick, storage
    lifecycle sweep) to the control queue, and serves the job store's gauges on
    ``metrics.port`` (``pipeline.metrics.StoreCollector``).

    Run one per deployment; a second one only sends duplicate ticks, which the
    tasks make harmless. Its own state lives in ``<home>/beat-schedule``; the
    schedules' state lives in SQL.
    """
    runtime.settings.home.mkdir(parents=True, exist_ok=True)
    # One per deployment: the job store's gauges (jobs, backends, queues) are served here.
    metrics.watch_store(runtime)
    metrics.serve(runtime.settings.metrics.port, runtime.settings.metrics.address)
    beat = runtime.celery.Beat(
        schedule=str(runtime.settings.home / "beat-schedule"),
        loglevel=loglevel,
        max_interval=min(5.0, runtime.settings.worker.reap_interval_seconds, runtime.settings.scheduler.tick_seconds),
    )
    beat.run()

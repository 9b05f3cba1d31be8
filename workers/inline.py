"""Working one job in this process: what ``spotlane run`` and ``workers.run`` do.

No broker and no other job: the job's own messages (route, run a shard,
finalize) are delivered to this process's inbox instead of a queue, and handled
here in order, by the same router, shard runner and finalizer the distributed
workers use; while it waits, the job's provider batches are polled here too. Shards of other jobs are never touched. A stop request (SIGINT,
SIGTERM, SIGHUP of ``spotlane run``) drains like a worker's: the chunk in hand is
committed and the shard handed back; the caller then cancels the job so that
``spotlane resume`` (or ``spotlane run --job``) continues it later.

Whatever this process leaves behind is what any worker can pick up: SQL is the
record, and a running shard of a process that died is recovered by a reaper.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy import select

from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store import identity, transitions
from pipeline.store.db import db_now, session_scope
from pipeline.tasks.finalize import finalize_job
from schemas.records import FINALIZE_JOB, ROUTE_JOB, RUN_SHARD, FinalizeJob, RouteJob, RunShard, TaskRecord
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Job, Shard
from workers.batch_lane import poll
from workers.drain import StopFlag
from workers.runner import ShardRunner

__all__ = ["InlineRun"]

log = logging.getLogger(__name__)


@dataclass
class InlineRun:
    """Routes, runs and finalizes ``job_id`` in this process until it is final or ``stop`` is set."""

    runtime: Runtime
    job_id: str
    stop: StopFlag = field(default_factory=StopFlag)
    #: Seconds between looks at the job when nothing is to do (waiting for a paused job, say).
    idle_seconds: float = 0.2

    def __post_init__(self) -> None:
        # A runtime of its own, whose messages land in this process's inbox.
        self._inbox: deque[tuple[str, TaskRecord]] = deque()
        self._runtime = Runtime(self.runtime.settings, outbox=self._deliver)
        self._runner = ShardRunner(self._runtime, stop=self.stop)

    def _deliver(self, name: str, record: TaskRecord, queue: str) -> None:
        if getattr(record, "job_id", None) == self.job_id:
            self._inbox.append((name, record))

    def run(self) -> None:
        """Work the job until it is final, paused with nothing in flight, or ``stop`` is set."""
        self._inbox.append((ROUTE_JOB, RouteJob(job_id=self.job_id)))
        while not self.stop:
            if not self._inbox:
                if self._settled():
                    return
                self._recover()
                poll(self._runtime, self.job_id)  # the job's provider batches that are due
                if not self._inbox:
                    time.sleep(self.idle_seconds)
                continue
            name, record = self._inbox.popleft()
            if name == ROUTE_JOB:
                route_job(self._runtime, self.job_id)
            elif name == RUN_SHARD and isinstance(record, RunShard):
                self._runner.run(record)
            elif name == FINALIZE_JOB:
                finalize_job(self._runtime, self.job_id)

    def _settled(self) -> bool:
        """Final, or paused with nothing queued or running (only a bigger budget helps)."""
        with session_scope(self._runtime.engine) as session:
            job = session.get(Job, self.job_id)
            if job is None or job.status.is_final:
                return True
            busy = session.execute(
                select(Shard.id)
                .where(
                    Shard.job_id == self.job_id,
                    Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING, ShardStatus.PREEMPTED)),
                )
                .limit(1)
            ).first()
            return job.status is JobStatus.PAUSED and busy is None

    def _recover(self) -> None:
        """What a reaper would do for this job: shards whose holder is gone are taken back,
        queued and pending shards are sent again, a job whose shards are all final is
        finalized (this process lost nothing, but a run before it may have)."""
        with session_scope(self._runtime.engine) as session:
            now = db_now(session)
            shards = session.execute(
                select(Shard.id, Shard.status, Shard.lease_owner, Shard.lease_expires_at).where(
                    Shard.job_id == self.job_id
                )
            ).all()
        for shard_id, status, owner, expires in shards:
            if status is ShardStatus.RUNNING and owner != self._runner.worker_id:
                gone = owner is not None and identity.dead_here(owner)
                if gone or (expires is not None and expires < now):
                    with session_scope(self._runtime.engine) as session:
                        transitions.expire_lease(session, shard_id, owner_dead=gone)
        statuses = {status for _, status, _, _ in shards}
        with session_scope(self._runtime.engine) as session:
            queued = [
                transitions.run_record(session, sid)
                for (sid,) in session.execute(
                    select(Shard.id).where(Shard.job_id == self.job_id, Shard.status == ShardStatus.QUEUED)
                )
            ]
        self._inbox.extend((RUN_SHARD, record) for record in queued)
        if ShardStatus.PENDING in statuses:
            self._inbox.append((ROUTE_JOB, RouteJob(job_id=self.job_id)))
        elif statuses <= {ShardStatus.DONE, ShardStatus.FAILED}:
            self._inbox.append((FINALIZE_JOB, FinalizeJob(job_id=self.job_id)))

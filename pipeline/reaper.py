"""The reaper: puts back work that a dead process or a lost message left behind.

It is safe to run anywhere and any number of times at once (every change is a
guarded UPDATE; only the process whose UPDATE matched enqueues):

- a running shard whose lease expired (its worker was killed or lost), or whose
  holder is a process of this host that no longer exists, is queued again and
  resumes from its last committed checkpoint;
- a queued shard that has waited ``requeue_after_seconds`` is sent again when the
  broker holds fewer messages for its queue than SQL has queued shards (a message
  was lost: a worker killed between fetching and claiming, a broker restart); a
  duplicate is harmless, the claim is guarded, and a long healthy queue is left be;
- a pending job older than a minute is routed again (the submit's routing task
  was lost);
- a job whose shards are all final but that is not final is finalized, and a
  finalizer that died mid-write is retried.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, select

from pipeline import transitions
from pipeline.db import session_scope
from pipeline.router import RUN_SHARD
from pipeline.runtime import Runtime
from schemas.base import utcnow
from schemas.records import FinalizeJob, RouteJob, RunShard
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Job, Shard

__all__ = ["ReapReport", "reap"]

log = logging.getLogger(__name__)

PENDING_GRACE = timedelta(seconds=60)


@dataclass
class ReapReport:
    expired: int = 0
    resent: int = 0
    rerouted: int = 0
    finalized: int = 0

    def __bool__(self) -> bool:
        return bool(self.expired or self.resent or self.rerouted or self.finalized)


def _depth(runtime: Runtime, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker (0 if it cannot tell)."""
    try:
        with runtime.celery.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception:  # an undeclared queue, or a broker that does not count
        return 0


def _owner_dead_here(owner: str) -> bool:
    """Whether a lease holder ``host:pid:tag`` is a process of this host that is gone.

    Lets a restarted worker take over a killed one's shard at once instead of
    waiting out the lease. Holders on other hosts wait for the lease to expire.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap(runtime: Runtime) -> ReapReport:
    settings = runtime.settings
    report = ReapReport()
    now = utcnow()
    to_send: list[RunShard] = []
    with session_scope(runtime.engine) as session:
        running = session.execute(
            select(Shard.id, Shard.lease_owner, Shard.lease_expires_at).where(
                Shard.status == ShardStatus.RUNNING
            )
        ).all()
    for shard_id, owner, expires in running:
        dead_here = owner is not None and _owner_dead_here(owner)
        if not dead_here and (expires is None or expires >= now):
            continue
        with session_scope(runtime.engine) as session:
            if transitions.expire_lease(session, shard_id, now, owner_dead=dead_here):
                shard = session.get(Shard, shard_id)
                assert shard is not None and shard.backend is not None
                to_send.append(RunShard(job_id=shard.job_id, shard_id=shard_id, backend=shard.backend))
                report.expired += 1
    stale = now - timedelta(seconds=settings.worker.requeue_after_seconds)
    with session_scope(runtime.engine) as session:
        waiting = session.execute(
            select(Shard.id, Shard.job_id, Shard.backend, Shard.queued_at, Shard.queue)
            .where(Shard.status == ShardStatus.QUEUED, Shard.queued_at < stale)
            .order_by(Shard.queued_at)
        ).all()
        queued_per_queue = dict(session.execute(
            select(Shard.queue, func.count()).where(Shard.status == ShardStatus.QUEUED).group_by(Shard.queue)
        ).all())
    # Only as many as the broker is missing: a long, healthy queue is not resent.
    missing = {q: max(0, n - _depth(runtime, q)) for q, n in queued_per_queue.items() if q}
    for shard_id, job_id, backend, queued_at, queue in waiting:
        if queued_at is None or backend is None or queue is None or not missing.get(queue):
            continue
        missing[queue] -= 1
        with session_scope(runtime.engine) as session:
            touched = transitions.requeue_stale(session, shard_id, queued_at, now)
        if touched:
            to_send.append(RunShard(job_id=job_id, shard_id=shard_id, backend=backend))
            report.resent += 1
    for record in to_send:
        runtime.send(RUN_SHARD, record, settings.backend(record.backend).queue)

    with session_scope(runtime.engine) as session:
        pending = session.execute(
            select(Job.id).where(Job.status == JobStatus.PENDING, Job.created_at < now - PENDING_GRACE)
        ).scalars().all()
        unfinished = session.execute(
            select(Job.id).where(
                (Job.status == JobStatus.RUNNING)
                | and_(Job.status == JobStatus.FINALIZING,
                       Job.updated_at < now - timedelta(seconds=settings.worker.finalize_grace_seconds))
            )
        ).scalars().all()
    for job_id in pending:
        runtime.send("spotlane.route_job", RouteJob(job_id=job_id), settings.control_queue)
        report.rerouted += 1
    for job_id in unfinished:
        with session_scope(runtime.engine) as session:
            if not transitions.job_shards_final(session, job_id):
                continue
            transitions.set_job_status(
                session, job_id, JobStatus.RUNNING, expected=(JobStatus.FINALIZING,)
            )
        runtime.send("spotlane.finalize_job", FinalizeJob(job_id=job_id), settings.control_queue)
        report.finalized += 1
    if report:
        log.info("reaper: %s", report)
    return report

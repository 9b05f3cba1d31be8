"""The reaper: drives every non-final job forward, whatever process died or message was lost.

It is safe to run anywhere and any number of times at once: every change is a
guarded UPDATE, only the process whose UPDATE matched enqueues, and duplicate
messages are harmless (claims, routers, finalizers and merges are guarded or hold
leases). "Waited too long" below is ``worker.requeue_after_seconds`` by the
database's clock.

Shards:

- a running shard whose lease expired (its worker was killed, froze or lost the
  database), or whose holder is a process of this host, kernel and PID namespace
  that no longer exists, is queued again and resumes from its last checkpoint;
- a queued shard that waited too long is sent again when the broker holds fewer
  messages for its queue than SQL has queued shards (a message was lost: a worker
  killed between fetching and claiming, a broker restart);
- a preempted shard that waited too long (its hand-back died half-way) is queued
  again on its backend.

Jobs:

- a pending job, or a running or paused job with a pending shard, that waited too
  long and that no router holds is routed again (a lost ``route_job``);
- a job whose shards are all final, or that is ``finalizing`` with no finalizer
  holding its lease (the finalizer died), is finalized;
- a finished ``retry-errors`` job whose merge into its parent never completed is
  sent to the finalizer again, which completes the merge;
- a ``spotlane serve`` batch still open at the end of its completion window is
  cancelled as expired (its finished rows are kept, like OpenAI's).

Provider batches (a batch lane's shards at the provider) that are due a look, or
whose job was cancelled, are handed to the control queue's ``poll_batches``.

Events due to ``[[webhooks]]`` (a job ended or paused; a failed delivery whose
backoff has passed) are handed to the control queue's ``deliver_webhooks``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Exists, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from pipeline import metrics
from pipeline.jobs.webhooks import EXPIRED, due_events
from pipeline.runtime import Runtime
from pipeline.store import identity, transitions
from pipeline.store.db import db_now, session_scope
from schemas.errors import ConfigError
from schemas.records import RunShard
from schemas.status import JobStatus, ProviderBatchStatus, ShardStatus
from schemas.tables import Job, Lease, ProviderBatch, Shard

__all__ = ["ReapReport", "reap"]

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    expired: int = 0
    resent: int = 0
    rerouted: int = 0
    finalized: int = 0
    #: Preempted shards whose hand-back had not completed, queued again.
    handed_back: int = 0
    #: Retry jobs whose merge into their parent was sent again.
    merges: int = 0
    #: Serve batches cancelled at the end of their completion window.
    batches_expired: int = 0
    #: Provider batches due a look (one ``poll_batches`` is sent for them all).
    provider_batches_due: int = 0

    def __bool__(self) -> bool:
        return any(vars(self).values())


def _depth(runtime: Runtime, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker (0 if it cannot tell)."""
    try:
        with runtime.celery.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception:  # an undeclared queue, or a broker that does not count
        return 0


def _lease_live(session: Session, name: ColumnElement[Any]) -> Exists:
    return exists().where(Lease.name == name, Lease.expires_at >= db_now(session))


def reap(runtime: Runtime) -> ReapReport:
    report = ReapReport()
    to_send = _expire_leases(runtime, report) + _resend_lost(runtime, report) + _finish_hand_backs(runtime, report)
    for record in to_send:
        runtime.send_run(record)
    _drive_jobs(runtime, report)
    _expire_batches(runtime, report)
    _poll_due(runtime, report)
    if runtime.settings.webhooks:
        with session_scope(runtime.engine) as session:
            if due_events(session, runtime.settings.webhooks):
                runtime.send_webhooks()
    if report:
        log.info("reaper: %s", report)
    return report


def _expire_batches(runtime: Runtime, report: ReapReport) -> None:
    with session_scope(runtime.engine) as session:
        due = (
            session.execute(
                select(Job.id).where(
                    Job.completion_window.is_not(None),
                    Job.deadline < db_now(session),
                    Job.status.in_((JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED)),
                )
            )
            .scalars()
            .all()
        )
        for job_id in due:
            if transitions.cancel_job(session, job_id, EXPIRED):
                report.batches_expired += 1
    if due:
        runtime.send_webhooks()


def _poll_due(runtime: Runtime, report: ReapReport) -> None:
    with session_scope(runtime.engine) as session:
        due = session.execute(
            select(func.count())
            .select_from(ProviderBatch)
            .join(Job, Job.id == ProviderBatch.job_id)
            .where(
                ProviderBatch.status.in_((ProviderBatchStatus.SUBMITTED, ProviderBatchStatus.CANCELLING)),
                or_(
                    ProviderBatch.next_poll_at <= db_now(session),
                    and_(ProviderBatch.status == ProviderBatchStatus.SUBMITTED, Job.status == JobStatus.CANCELLED),
                ),
            )
        ).scalar_one()
    if due:
        report.provider_batches_due = int(due)
        runtime.send_poll_batches()


def _expire_leases(runtime: Runtime, report: ReapReport) -> list[RunShard]:
    sent: list[RunShard] = []
    with session_scope(runtime.engine) as session:
        now = db_now(session)
        running = session.execute(
            select(Shard.id, Shard.lease_owner, Shard.lease_expires_at).where(Shard.status == ShardStatus.RUNNING)
        ).all()
    for shard_id, owner, expires in running:
        dead_here = owner is not None and identity.dead_here(owner)
        if not dead_here and (expires is None or expires >= now):
            continue
        with session_scope(runtime.engine) as session:
            if transitions.expire_lease(session, shard_id, owner_dead=dead_here):
                sent.append(transitions.run_record(session, shard_id))
                report.expired += 1
                metrics.LEASE_EXPIRIES.inc()
    return sent


def _resend_lost(runtime: Runtime, report: ReapReport) -> list[RunShard]:
    """Queued shards that waited too long, only as many per queue as the broker is missing
    (a long, healthy queue is not resent): two counts per queue, then only those rows."""
    sent: list[RunShard] = []
    with session_scope(runtime.engine) as session:
        stale = db_now(session) - timedelta(seconds=runtime.settings.worker.requeue_after_seconds)
        waiting = dict(
            session.execute(
                select(Shard.queue, func.count())
                .where(Shard.status == ShardStatus.QUEUED, Shard.queued_at < stale)
                .group_by(Shard.queue)
            ).all()
        )
        queued = (
            dict(
                session.execute(
                    select(Shard.queue, func.count())
                    .where(Shard.status == ShardStatus.QUEUED, Shard.queue.in_([q for q in waiting if q]))
                    .group_by(Shard.queue)
                ).all()
            )
            if any(waiting)
            else {}
        )
    missing = {q: min(waiting[q], max(0, n - _depth(runtime, q))) for q, n in queued.items() if q}
    for queue, count in missing.items():
        if not count:
            continue
        with session_scope(runtime.engine) as session:
            oldest = session.execute(
                select(Shard.id, Shard.queued_at)
                .where(Shard.status == ShardStatus.QUEUED, Shard.queue == queue, Shard.queued_at < stale)
                .order_by(Shard.queued_at)
                .limit(count)
            ).all()
        for shard_id, queued_at in oldest:
            if queued_at is None:
                continue
            with session_scope(runtime.engine) as session:
                if transitions.requeue_stale(session, shard_id, queued_at):
                    sent.append(transitions.run_record(session, shard_id))
                    report.resent += 1
    return sent


def _finish_hand_backs(runtime: Runtime, report: ReapReport) -> list[RunShard]:
    """Preempted shards left half-way through a hand-back (the worker died between
    ending the attempt and queueing the shard): queued again on their backend."""
    sent: list[RunShard] = []
    with session_scope(runtime.engine) as session:
        stale = db_now(session) - timedelta(seconds=runtime.settings.worker.requeue_after_seconds)
        stuck = session.execute(
            select(Shard.id, Shard.job_id, Shard.backend).where(
                Shard.status == ShardStatus.PREEMPTED, Shard.updated_at < stale
            )
        ).all()
    for shard_id, _job_id, backend in stuck:
        with session_scope(runtime.engine) as session:
            try:
                queue = runtime.settings.backend(backend or "").queue
            except ConfigError:  # the backend is gone from the config: let the router choose
                if transitions.back_to_router(session, shard_id):
                    report.handed_back += 1
                continue
            if transitions.queue_shard(
                session, shard_id, expected=(ShardStatus.PREEMPTED,), backend=backend or "", queue=queue
            ):
                sent.append(transitions.run_record(session, shard_id))
                report.handed_back += 1
    return sent


def _drive_jobs(runtime: Runtime, report: ReapReport) -> None:
    with session_scope(runtime.engine) as session:
        stale = db_now(session) - timedelta(seconds=runtime.settings.worker.requeue_after_seconds)
        pending_shard = exists().where(
            Shard.job_id == Job.id, Shard.status == ShardStatus.PENDING, Shard.updated_at < stale
        )
        open_shard = exists().where(Shard.job_id == Job.id, Shard.status.notin_((ShardStatus.DONE, ShardStatus.FAILED)))
        route = (
            session.execute(
                select(Job.id).where(
                    or_(
                        and_(Job.status == JobStatus.PENDING, Job.created_at < stale),
                        and_(Job.status.in_((JobStatus.RUNNING, JobStatus.PAUSED)), pending_shard),
                    ),
                    ~_lease_live(session, "route:" + Job.id),
                )
            )
            .scalars()
            .all()
        )
        finalize = (
            session.execute(
                select(Job.id).where(
                    or_(
                        and_(
                            Job.status.in_((JobStatus.RUNNING, JobStatus.PENDING)), ~open_shard, Job.updated_at < stale
                        ),
                        Job.status == JobStatus.FINALIZING,
                    ),
                    ~_lease_live(session, "finalize:" + Job.id),
                )
            )
            .scalars()
            .all()
        )
        merges = (
            session.execute(
                select(Job.id).where(
                    Job.retry_of.is_not(None),
                    Job.merged_at.is_(None),
                    Job.finished_at < stale,
                    Job.status.in_((JobStatus.SUCCEEDED, JobStatus.SUCCEEDED_WITH_ERRORS)),
                    ~_lease_live(session, "merge:" + Job.retry_of),
                )
            )
            .scalars()
            .all()
        )
    for job_id in route:
        runtime.send_route(job_id)
        report.rerouted += 1
    for job_id in finalize:
        runtime.send_finalize(job_id)
        report.finalized += 1
    for job_id in merges:
        runtime.send_finalize(job_id)
        report.merges += 1

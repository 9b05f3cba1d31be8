"""Every job and shard state change, each one a guarded UPDATE.

``UPDATE ... WHERE status = <expected> [AND lease_owner = <me>]`` lets the
database decide who owns a shard: of two workers handed the same task, exactly one
sees ``rowcount == 1``. Callers pass a session; the caller's transaction commits.
Nothing here talks to the broker: callers enqueue after their commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from pipeline import ledger
from schemas.base import utcnow
from schemas.errors import LeaseLost, NotFound
from schemas.status import AttemptOutcome, JobStatus, LedgerKind, ShardStatus
from schemas.tables import Checkpoint, CostLedgerEntry, Job, Shard, ShardAttempt

__all__ = [
    "Claim",
    "back_to_router",
    "block_shard",
    "CheckpointStats",
    "claim_shard",
    "commit_checkpoint",
    "end_shard",
    "fail_unrouted",
    "expire_lease",
    "heartbeat",
    "job_shards_final",
    "queue_shard",
    "requeue_stale",
    "reroute_shard",
    "set_job_status",
    "unqueue_cancelled",
]


def set_job_status(
    session: Session,
    job_id: str,
    new: JobStatus,
    *,
    expected: tuple[JobStatus, ...],
    **values: object,
) -> bool:
    """Move job ``job_id`` to ``new`` if it is in one of ``expected``."""
    now = utcnow()
    extra: dict[str, object] = dict(values)
    if new.is_final:
        extra.setdefault("finished_at", now)
    if new is JobStatus.RUNNING:
        extra.setdefault("started_at", func.coalesce(Job.started_at, now))
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(expected))
        .values(status=new, updated_at=now, **extra)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def queue_shard(
    session: Session,
    shard_id: int,
    *,
    expected: tuple[ShardStatus, ...],
    backend: str,
    queue: str,
    **route: object,
) -> bool:
    """Mark a shard queued on ``backend``'s ``queue``; the caller then enqueues it.

    ``route`` carries the router's choice (model, estimates, note) onto the row.
    """
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status.in_(expected))
        .values(
            status=ShardStatus.QUEUED,
            backend=backend,
            queue=queue,
            queued_at=now,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            **route,
        )
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def block_shard(session: Session, shard_id: int) -> bool:
    """pending -> blocked: no backend fits the job's remaining budget."""
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.BLOCKED, updated_at=utcnow())
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Claim:
    """A worker's ownership of a shard for one attempt."""

    shard_id: int
    job_id: str
    shard_index: int
    row_start: int
    row_end: int
    rows_done: int
    attempt: int
    worker_id: str
    backend: str
    queued_at: datetime | None = None


def claim_shard(
    session: Session, shard_id: int, worker_id: str, lease_seconds: float, backend: str
) -> Claim | None:
    """queued -> running, owned by ``worker_id``; ``None`` if anyone else got there first."""
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.QUEUED)
        .values(
            status=ShardStatus.RUNNING,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Shard.attempts + 1,
            started_at=func.coalesce(Shard.started_at, now),
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    shard = session.execute(select(Shard).where(Shard.id == shard_id)).scalar_one()
    session.add(
        ShardAttempt(
            shard_id=shard_id,
            attempt=shard.attempts,
            worker_id=worker_id,
            backend=backend,
            resumed_from=shard.rows_done,
            started_at=now,
        )
    )
    set_job_status(session, shard.job_id, JobStatus.RUNNING, expected=(JobStatus.PENDING,))
    return Claim(
        shard_id=shard.id,
        job_id=shard.job_id,
        shard_index=shard.shard_index,
        row_start=shard.row_start,
        row_end=shard.row_end,
        rows_done=shard.rows_done,
        attempt=shard.attempts,
        worker_id=worker_id,
        backend=backend,
        queued_at=shard.queued_at,
    )


def _owned(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (
        Shard.id == claim.shard_id,
        Shard.status == ShardStatus.RUNNING,
        Shard.lease_owner == claim.worker_id,
    )


def heartbeat(session: Session, claim: Claim, lease_seconds: float) -> bool:
    """Extend the lease; ``False`` if the shard is no longer ours."""
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(*_owned(claim))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CheckpointStats:
    first_row: int
    row_count: int
    rows_failed: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    url: str


def commit_checkpoint(
    session: Session, claim: Claim, stats: CheckpointStats, lease_seconds: float
) -> None:
    """Record a written part as committed; raise ``LeaseLost`` if we no longer own the shard.

    The guard also requires the part to start exactly at the shard's resume point,
    so a part can never be committed twice or out of order.
    """
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(*_owned(claim), Shard.row_start + Shard.rows_done == stats.first_row)
        .values(
            rows_done=Shard.rows_done + stats.row_count,
            rows_failed=Shard.rows_failed + stats.rows_failed,
            input_tokens=Shard.input_tokens + stats.input_tokens,
            output_tokens=Shard.output_tokens + stats.output_tokens,
            cost_usd=Shard.cost_usd + stats.cost_usd,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"shard {claim.shard_id}: lease lost before committing row {stats.first_row}")
    session.add(
        Checkpoint(
            shard_id=claim.shard_id,
            first_row=stats.first_row,
            row_count=stats.row_count,
            rows_failed=stats.rows_failed,
            input_tokens=stats.input_tokens,
            output_tokens=stats.output_tokens,
            cost_usd=stats.cost_usd,
            url=stats.url,
            attempt=claim.attempt,
            created_at=now,
        )
    )
    session.execute(
        update(ShardAttempt)
        .where(ShardAttempt.shard_id == claim.shard_id, ShardAttempt.attempt == claim.attempt)
        .values(rows_processed=ShardAttempt.rows_processed + stats.row_count)
    )
    ledger.charge(session, claim, stats, now)


def _end_attempt(
    session: Session, shard_id: int, attempt: int, outcome: AttemptOutcome, error: str | None
) -> None:
    session.execute(
        update(ShardAttempt)
        .where(ShardAttempt.shard_id == shard_id, ShardAttempt.attempt == attempt)
        .values(outcome=outcome, ended_at=utcnow(), error=error)
    )


def end_shard(
    session: Session,
    claim: Claim,
    new: ShardStatus,
    *,
    outcome: AttemptOutcome,
    error: str | None = None,
) -> bool:
    """running -> ``new`` (done, failed or preempted) for the lease holder.

    On ``done`` or ``failed`` what is left of the shard's reservation is released
    (its actual cost was charged checkpoint by checkpoint).
    """
    now = utcnow()
    values: dict[str, object] = {
        "status": new,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
        "error": error,
    }
    if new.is_final:
        values["finished_at"] = now
    result = session.execute(update(Shard).where(*_owned(claim)).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _end_attempt(session, claim.shard_id, claim.attempt, outcome, error)
    if new.is_final or new is ShardStatus.PENDING:
        ledger.release(session, claim, now)
    return True


def unqueue_cancelled(session: Session, job_id: str) -> int:
    """queued/blocked -> pending for a cancelled job, giving back their reservations."""
    now = utcnow()
    rows = session.execute(
        select(Shard.id, Shard.backend).where(
            Shard.job_id == job_id, Shard.status.in_((ShardStatus.QUEUED, ShardStatus.BLOCKED))
        )
    ).all()
    for shard_id, backend in rows:
        reserved = ledger.reserved_usd(session, shard_id)
        if reserved > 0:
            session.add(CostLedgerEntry(job_id=job_id, shard_id=shard_id, backend=backend or "-",
                                        kind=LedgerKind.RELEASE, amount_usd=-reserved, created_at=now))
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_((ShardStatus.QUEUED, ShardStatus.BLOCKED)))
        .values(status=ShardStatus.PENDING, backend=None, queue=None, updated_at=now)
    )
    return len(rows)


def reroute_shard(session: Session, claim: Claim, error: str) -> bool:
    """running -> pending, never again on this backend: the backend failed the shard.

    The attempt ends ``failed``, the reservation is released, and committed
    checkpoints stay: the next backend resumes after them.
    """
    now = utcnow()
    shard = session.execute(select(Shard).where(*_owned(claim))).scalar_one_or_none()
    if shard is None:
        return False
    excluded = sorted({*(shard.excluded_backends or []), claim.backend})
    result = session.execute(
        update(Shard)
        .where(*_owned(claim))
        .values(
            status=ShardStatus.PENDING, lease_owner=None, lease_expires_at=None, backend=None, queue=None,
            excluded_backends=excluded, error=error, updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _end_attempt(session, claim.shard_id, claim.attempt, AttemptOutcome.FAILED, error)
    ledger.release(session, claim, now)
    return True


def expire_lease(session: Session, shard_id: int, now: datetime, *, owner_dead: bool = False) -> bool:
    """running with an expired lease -> queued; the attempt is recorded as lost.

    ``owner_dead``: the caller knows the holder's process is gone, so the lease
    need not have run out.
    """
    guards = [Shard.id == shard_id, Shard.status == ShardStatus.RUNNING]
    if not owner_dead:
        guards.append(Shard.lease_expires_at < now)
    shard = session.execute(select(Shard).where(*guards)).scalar_one_or_none()
    if shard is None:
        return False
    result = session.execute(
        update(Shard)
        .where(*guards, Shard.lease_owner == shard.lease_owner)
        .values(
            status=ShardStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            queued_at=now,
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _end_attempt(
        session, shard_id, shard.attempts, AttemptOutcome.LOST,
        "worker process gone" if owner_dead else "lease expired",
    )
    return True


def back_to_router(session: Session, shard_id: int) -> bool:
    """preempted -> pending: the router chooses its backend again."""
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PREEMPTED)
        .values(status=ShardStatus.PENDING, backend=None, queue=None, updated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def fail_unrouted(session: Session, shard_id: int, reason: str) -> bool:
    """pending -> failed: no backend is left that can run the shard."""
    now = utcnow()
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.FAILED, error=reason, finished_at=now, updated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def requeue_stale(session: Session, shard_id: int, queued_at: datetime, now: datetime) -> bool:
    """Restart a queued shard's wait clock, so exactly one reaper sends it again."""
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.QUEUED, Shard.queued_at == queued_at)
        .values(queued_at=now, updated_at=now)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def job_shards_final(session: Session, job_id: str) -> bool:
    """Whether every shard of the job is done or failed."""
    open_count = session.execute(
        select(func.count())
        .select_from(Shard)
        .where(Shard.job_id == job_id, Shard.status.notin_((ShardStatus.DONE, ShardStatus.FAILED)))
    ).scalar_one()
    if session.get(Job, job_id) is None:
        raise NotFound(f"no job {job_id}")
    return bool(open_count == 0)

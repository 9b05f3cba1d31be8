"""Every job and shard state change: each a guarded UPDATE, each checked against the table of moves.

``UPDATE ... WHERE status = <expected> [AND lease_owner = <me>]`` lets the
database decide who owns a shard: of two workers handed the same task, exactly one
sees ``rowcount == 1``. Every move is checked against ``schemas.status``'s
``JOB_MOVES`` / ``SHARD_MOVES`` before it is tried (``IllegalMove`` otherwise).

Rules every function here keeps:

- Callers pass a session; the caller's transaction commits. Nothing here talks to
  the broker: callers enqueue after their commit (and the reaper resends whatever
  a lost message left behind).
- Time is the database's clock (``db_now``), never the caller's.
- Locks are taken job row first, then shard rows, whoever the caller is (router,
  claim, commit, cancel), so two transactions never wait on each other in a cycle.
- Ledger writes go through ``pipeline.store.ledger`` in the same transaction as the move
  they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from pipeline.store import ledger
from pipeline.store.db import db_now
from schemas.errors import IllegalMove, LeaseLost, NotFound
from schemas.records import RunShard
from schemas.status import JOB_MOVES, SHARD_MOVES, AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Checkpoint, Job, Shard, ShardAttempt

__all__ = [
    "CheckpointStats",
    "ChunkVerdict",
    "Claim",
    "back_to_router",
    "block_pending",
    "block_shard",
    "cancel_job",
    "charge_lost_work",
    "change_budget",
    "claim_shard",
    "commit_checkpoint",
    "end_shard",
    "expire_lease",
    "fail_unrouted",
    "finish_job",
    "heartbeat",
    "job_shards_final",
    "lock_job",
    "queue_shard",
    "requeue_stale",
    "reroute_shard",
    "reserve_chunk",
    "resume_job",
    "run_record",
    "set_job_status",
    "start_finalizing",
    "unqueue_cancelled",
]


def _check_job(expected: tuple[JobStatus, ...], new: JobStatus) -> None:
    for old in expected:
        if new not in JOB_MOVES[old]:
            raise IllegalMove(f"job {old.value} -> {new.value} is not an allowed move")


def _check_shard(expected: tuple[ShardStatus, ...], new: ShardStatus) -> None:
    for old in expected:
        if new not in SHARD_MOVES[old]:
            raise IllegalMove(f"shard {old.value} -> {new.value} is not an allowed move")


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


# -- jobs ------------------------------------------------------------------------------


def set_job_status(
    session: Session,
    job_id: str,
    new: JobStatus,
    *,
    expected: tuple[JobStatus, ...],
    guard: tuple[ColumnElement[bool], ...] = (),
    **values: object,
) -> bool:
    """Move job ``job_id`` to ``new`` if it is in one of ``expected`` (and ``guard`` holds)."""
    _check_job(expected, new)
    now = db_now(session)
    extra: dict[str, object] = dict(values)
    if new.is_final:
        extra.setdefault("finished_at", now)
    if new is JobStatus.RUNNING:
        extra.setdefault("started_at", func.coalesce(Job.started_at, now))
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(expected), *guard)
        .values(status=new, updated_at=now, **extra)
    )
    return _rowcount(result) == 1


def lock_job(session: Session, job_id: str) -> Job | None:
    """Lock the job row for the rest of the transaction (an UPDATE: it also serialises
    SQLite writers from the first statement) and return it, fresh."""
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=db_now(session)))
    return session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def start_finalizing(session: Session, job_id: str) -> bool:
    """running or pending -> finalizing; True also if it already is finalizing (the
    caller holds the finalizer's lease, so an earlier finalizer is gone). Every
    shard has ended: what the job still holds (lost attempts' reservations) is
    given back."""
    if set_job_status(session, job_id, JobStatus.FINALIZING, expected=(JobStatus.RUNNING, JobStatus.PENDING)):
        ledger.release_all(session, job_id, db_now(session))
        return True
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    return status is JobStatus.FINALIZING


def finish_job(session: Session, job_id: str, new: JobStatus, guard: tuple[ColumnElement[bool], ...],
               **values: object) -> bool:
    """finalizing -> ``new`` (a final state), only while ``guard`` holds (the finalizer's lease)."""
    return set_job_status(session, job_id, new, expected=(JobStatus.FINALIZING,), guard=guard, **values)


def cancel_job(session: Session, job_id: str, error: str) -> bool:
    """pending, running or paused -> cancelled; shards not started go back to pending."""
    if not set_job_status(session, job_id, JobStatus.CANCELLED,
                          expected=(JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED), error=error):
        return False
    unqueue_cancelled(session, job_id)
    running = {(shard_id, attempt) for shard_id, attempt in session.execute(
        select(Shard.id, Shard.attempts).where(Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)
    )}
    ledger.release_all(session, job_id, db_now(session), keep=running)  # running shards end on their own
    return True


def resume_job(session: Session, job_id: str, status: JobStatus) -> bool:
    """cancelled, failed or paused -> running, unless the lifecycle purged its checkpoints;
    its failed, blocked and preempted shards go back to the router."""
    if not set_job_status(
        session, job_id, JobStatus.RUNNING, expected=(status,), guard=(Job.checkpoints_purged_at.is_(None),),
        error=None, finished_at=None, result_url=None, result_tier=None,
    ):
        return False
    now = db_now(session)
    waiting = (ShardStatus.FAILED, ShardStatus.BLOCKED, ShardStatus.PREEMPTED)
    _check_shard(waiting, ShardStatus.PENDING)
    rows = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_(waiting))
        .values(status=ShardStatus.PENDING, backend=None, queue=None, excluded_backends=[], error=None,
                finished_at=None, updated_at=now)
        .returning(Shard.id, Shard.backend)
    ).all()
    for shard_id, _ in rows:
        ledger.release(session, job_id, shard_id, None, now)  # the pool of a preempted shard
    return True


def change_budget(session: Session, job_id: str, budget_usd: float) -> bool:
    """Set the budget; a paused job runs again and its blocked shards go back to the router.
    True if the job was paused."""
    now = db_now(session)
    session.execute(update(Job).where(Job.id == job_id).values(budget_usd=budget_usd, updated_at=now))
    resumed = set_job_status(session, job_id, JobStatus.RUNNING, expected=(JobStatus.PAUSED,), error=None)
    _check_shard((ShardStatus.BLOCKED,), ShardStatus.PENDING)
    session.execute(
        update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.BLOCKED)
        .values(status=ShardStatus.PENDING, updated_at=now)
    )
    return resumed


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


# -- routing ---------------------------------------------------------------------------


def queue_shard(
    session: Session,
    shard_id: int,
    *,
    expected: tuple[ShardStatus, ...],
    backend: str,
    queue: str,
    **route: object,
) -> bool:
    """Mark a shard queued on ``backend``'s ``queue``; the caller then enqueues ``run_record``.

    ``route`` carries the router's choice (model, estimates, note) onto the row.
    """
    _check_shard(expected, ShardStatus.QUEUED)
    now = db_now(session)
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
    return _rowcount(result) == 1


def run_record(session: Session, shard_id: int) -> RunShard:
    """The ``run_shard`` message for a queued shard: its backend and attempt count now."""
    job_id, backend, attempts = session.execute(
        select(Shard.job_id, Shard.backend, Shard.attempts).where(Shard.id == shard_id)
    ).one()
    return RunShard(job_id=job_id, shard_id=shard_id, backend=backend or "", attempt=attempts)


def block_shard(session: Session, shard_id: int) -> bool:
    """pending -> blocked: the job's budget cannot cover it."""
    _check_shard((ShardStatus.PENDING,), ShardStatus.BLOCKED)
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.BLOCKED, updated_at=db_now(session))
    )
    return _rowcount(result) == 1


def block_pending(session: Session, job_id: str) -> int:
    """Every pending shard of the job -> blocked (the job is paused)."""
    _check_shard((ShardStatus.PENDING,), ShardStatus.BLOCKED)
    result = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.BLOCKED, updated_at=db_now(session))
    )
    return _rowcount(result)


def fail_unrouted(session: Session, shard_id: int, reason: str) -> bool:
    """pending -> failed: no backend is left that can run the shard."""
    _check_shard((ShardStatus.PENDING,), ShardStatus.FAILED)
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.FAILED, error=reason, finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


def unqueue_cancelled(session: Session, job_id: str) -> int:
    """queued/blocked -> pending for a cancelled job, giving back their reservations.

    One UPDATE ... RETURNING: a shard claimed at the same moment is either moved
    here (and its claim fails) or claimed (and keeps its reservation), never both.
    """
    now = db_now(session)
    waiting = (ShardStatus.QUEUED, ShardStatus.BLOCKED)
    _check_shard(waiting, ShardStatus.PENDING)
    rows = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_(waiting))
        .values(status=ShardStatus.PENDING, backend=None, queue=None, updated_at=now)
        .returning(Shard.id, Shard.backend)
    ).all()
    for shard_id, backend in rows:
        ledger.release(session, job_id, shard_id, backend, now)
    return len(rows)


# -- running ---------------------------------------------------------------------------


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
    session: Session, shard_id: int, worker_id: str, lease_seconds: float, backend: str,
    attempt: int | None = None,
) -> Claim | None:
    """queued -> running, owned by ``worker_id``; ``None`` if anyone else got there first,
    or if the shard is no longer queued on ``backend`` for ``attempt`` (a stale message)."""
    _check_shard((ShardStatus.QUEUED,), ShardStatus.RUNNING)
    job_id = session.execute(select(Shard.job_id).where(Shard.id == shard_id)).scalar_one_or_none()
    if job_id is None:
        return None
    lock_job(session, job_id)
    now = db_now(session)
    guards = [Shard.id == shard_id, Shard.status == ShardStatus.QUEUED, Shard.backend == backend]
    if attempt is not None:
        guards.append(Shard.attempts == attempt)
    result = session.execute(
        update(Shard)
        .where(*guards)
        .values(
            status=ShardStatus.RUNNING,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Shard.attempts + 1,
            started_at=func.coalesce(Shard.started_at, now),
            updated_at=now,
        )
    )
    if _rowcount(result) != 1:
        return None
    shard = session.execute(
        select(Shard).where(Shard.id == shard_id).execution_options(populate_existing=True)
    ).scalar_one()
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
    ledger.transfer(session, shard.job_id, shard_id, backend, now, None, shard.attempts)  # the router's advance
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
    """The fence: the shard is running under this very claim (owner and attempt)."""
    return (
        Shard.id == claim.shard_id,
        Shard.status == ShardStatus.RUNNING,
        Shard.lease_owner == claim.worker_id,
        Shard.attempts == claim.attempt,
    )


def heartbeat(session: Session, claim: Claim, lease_seconds: float) -> bool:
    """Extend the lease; ``False`` if the shard is no longer ours."""
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(*_owned(claim))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return _rowcount(result) == 1


class ChunkVerdict(str, Enum):
    """What ``reserve_chunk`` decided about the next chunk."""

    GO = "go"
    #: The job was cancelled: stop at the next checkpoint.
    CANCELLED = "cancelled"
    #: The budget cannot cover the chunk's worst case: park the shard.
    NO_BUDGET = "no_budget"
    #: Someone else owns the shard now.
    LOST = "lost"


def reserve_chunk(session: Session, claim: Claim, need_usd: float) -> tuple[ChunkVerdict, float]:
    """Before a chunk is sent: the job is not cancelled, the shard is still ours, and its
    reservation covers ``need_usd`` (the worst case of everything in flight, this
    chunk included), topped up under the job lock if the budget allows.

    Returns the verdict and the shard's headroom (``ledger.headroom``): on
    ``NO_BUDGET``, the most that could have been in flight.
    """
    job = lock_job(session, claim.job_id)
    if job is None or job.status is JobStatus.CANCELLED:
        return ChunkVerdict.CANCELLED, 0.0
    if session.execute(select(Shard.id).where(*_owned(claim))).scalar_one_or_none() is None:
        return ChunkVerdict.LOST, 0.0
    ok, room = ledger.reserve_chunk(session, claim.job_id, claim.shard_id, claim.attempt, claim.backend, need_usd,
                                    job.budget_usd, db_now(session))
    return (ChunkVerdict.GO if ok else ChunkVerdict.NO_BUDGET), room


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
    lock_job(session, claim.job_id)
    now = db_now(session)
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
    if _rowcount(result) != 1:
        raise LeaseLost(f"shard {claim.shard_index} of job {claim.job_id}: lease lost before committing "
                        f"row {stats.first_row}")
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
    ledger.charge(session, ledger.Charge(claim.job_id, claim.shard_id, claim.backend, stats.cost_usd,
                                         stats.input_tokens, stats.output_tokens, claim.attempt), now)


def charge_lost_work(session: Session, claim: Claim, stats: CheckpointStats) -> None:
    """Work done under a lease that was lost (a frozen worker, a partition) commits
    nothing, but it was paid for: it is charged all the same, against the shard's
    reservation, so the ledger shows real spend."""
    lock_job(session, claim.job_id)
    ledger.charge(session, ledger.Charge(claim.job_id, claim.shard_id, claim.backend, stats.cost_usd,
                                         stats.input_tokens, stats.output_tokens, claim.attempt), db_now(session))


def _end_attempt(
    session: Session, shard_id: int, attempt: int, outcome: AttemptOutcome, error: str | None
) -> None:
    session.execute(
        update(ShardAttempt)
        .where(ShardAttempt.shard_id == shard_id, ShardAttempt.attempt == attempt)
        .values(outcome=outcome, ended_at=db_now(session), error=error)
    )


def end_shard(
    session: Session,
    claim: Claim,
    new: ShardStatus,
    *,
    outcome: AttemptOutcome,
    error: str | None = None,
) -> bool:
    """running -> ``new`` (done, failed, preempted, or pending: back to the router) for
    the lease holder.

    What is left of the attempt's reservation is released (its actual cost was
    charged checkpoint by checkpoint), or, on ``preempted`` (the shard is queued
    again on the same backend), given back to the shard's pool for the next attempt.
    """
    _check_shard((ShardStatus.RUNNING,), new)
    now = db_now(session)
    values: dict[str, object] = {
        "status": new,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
        "error": error,
    }
    if new.is_final:
        values["finished_at"] = now
    if new is ShardStatus.PENDING:
        values |= {"backend": None, "queue": None}
    result = session.execute(update(Shard).where(*_owned(claim)).values(**values))
    if _rowcount(result) != 1:
        return False
    _end_attempt(session, claim.shard_id, claim.attempt, outcome, error)
    if new is ShardStatus.PREEMPTED:
        ledger.transfer(session, claim.job_id, claim.shard_id, claim.backend, now, claim.attempt, None)
    else:
        ledger.release(session, claim.job_id, claim.shard_id, claim.backend, now, claim.attempt)
    return True


def reroute_shard(session: Session, claim: Claim, error: str) -> bool:
    """running -> pending, never again on this backend: the backend failed the shard.

    The attempt ends ``failed``, the reservation is released, and committed
    checkpoints stay: the next backend resumes after them.
    """
    _check_shard((ShardStatus.RUNNING,), ShardStatus.PENDING)
    now = db_now(session)
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
    if _rowcount(result) != 1:
        return False
    _end_attempt(session, claim.shard_id, claim.attempt, AttemptOutcome.FAILED, error)
    ledger.release(session, claim.job_id, claim.shard_id, claim.backend, now, claim.attempt)
    return True


def expire_lease(session: Session, shard_id: int, *, owner_dead: bool = False) -> bool:
    """running with an expired lease -> queued; the attempt is recorded as lost.

    ``owner_dead``: the caller knows the holder's process is gone, so the lease
    need not have run out. The shard keeps its backend; the lost attempt keeps its
    reservation until the job ends (it may still be billed for the chunk it had in
    flight), and the next owner reserves its own.
    """
    _check_shard((ShardStatus.RUNNING,), ShardStatus.QUEUED)
    now = db_now(session)
    guards = [Shard.id == shard_id, Shard.status == ShardStatus.RUNNING]
    if not owner_dead:
        guards.append(Shard.lease_expires_at < now)
    shard = session.execute(select(Shard).where(*guards)).scalar_one_or_none()
    if shard is None:
        return False
    result = session.execute(
        update(Shard)
        .where(*guards, Shard.lease_owner == shard.lease_owner, Shard.attempts == shard.attempts)
        .values(
            status=ShardStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            queued_at=now,
            updated_at=now,
        )
    )
    if _rowcount(result) != 1:
        return False
    _end_attempt(
        session, shard_id, shard.attempts, AttemptOutcome.LOST,
        "worker process gone" if owner_dead else "lease expired",
    )
    return True


def back_to_router(session: Session, shard_id: int) -> bool:
    """preempted -> pending: the router chooses its backend again (its reservation is released)."""
    _check_shard((ShardStatus.PREEMPTED,), ShardStatus.PENDING)
    now = db_now(session)
    row = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PREEMPTED)
        .values(status=ShardStatus.PENDING, backend=None, queue=None, updated_at=now)
        .returning(Shard.job_id)
    ).one_or_none()
    if row is None:
        return False
    ledger.release(session, row.job_id, shard_id, None, now)
    return True


def requeue_stale(session: Session, shard_id: int, queued_at: datetime) -> bool:
    """Restart a queued shard's wait clock, so exactly one reaper sends it again."""
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.QUEUED, Shard.queued_at == queued_at)
        .values(queued_at=now, updated_at=now)
    )
    return _rowcount(result) == 1

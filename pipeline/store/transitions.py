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

The moves of a worker on the shard it holds (claim, heartbeat, reserve, commit,
end) live in ``pipeline.store.claims``, which builds on these.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, Table, func, select, update
from sqlalchemy.orm import Session

from pipeline.store import ledger
from pipeline.store.db import bound, db_now
from pipeline.store.guards import check_job_move, check_shard_move, matched
from schemas.base import utcnow
from schemas.errors import NotFound
from schemas.records import RunShard
from schemas.status import AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Job, Shard, ShardAttempt

__all__ = [
    "back_to_router",
    "block_pending",
    "block_shard",
    "cancel_job",
    "end_attempt",
    "change_budget",
    "expire_lease",
    "fail_unrouted",
    "finish_job",
    "job_shards_final",
    "lock_job",
    "lock_job_clock",
    "queue_shard",
    "requeue_stale",
    "resume_job",
    "run_record",
    "set_job_status",
    "shards_waiting_for_router",
    "start_finalizing",
    "unqueue_cancelled",
]


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
    check_job_move(expected, new)
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
    return matched(result) == 1


def lock_job(session: Session, job_id: str) -> Job | None:
    """Lock the job row for the rest of the transaction (an UPDATE: it also serialises
    SQLite writers from the first statement) and return it, fresh, in the same
    statement (RETURNING): its ``updated_at`` is the database's clock at the lock.
    Every commit of the job waits for this lock: one round trip, not three."""
    clock = func.clock_timestamp() if session.get_bind().dialect.name == "postgresql" else utcnow()
    return session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(updated_at=clock)
        .returning(Job)
        .execution_options(populate_existing=True, synchronize_session=False)
    ).scalar_one_or_none()


def lock_job_clock(session: Session, job_id: str) -> datetime | None:
    """``lock_job`` for a caller that needs only the clock at the lock (a checkpoint
    commit, many a second): the same UPDATE on PostgreSQL, built once and run as a
    plain statement, returning ``updated_at`` and no ORM object."""
    if session.get_bind().dialect.name != "postgresql":
        job = lock_job(session, job_id)
        return job.updated_at if job is not None else None
    stamp: datetime | None = session.connection().execute(_LOCK_CLOCK, {"p_job_id": job_id}).scalar_one_or_none()
    return stamp


_JOBS = cast(Table, Job.__table__)
_LOCK_CLOCK = (
    update(_JOBS)
    .where(Job.id == bound(_JOBS, "job_id", "id"))
    .values(updated_at=func.clock_timestamp())
    .returning(Job.updated_at)
)


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


def finish_job(
    session: Session, job_id: str, new: JobStatus, guard: tuple[ColumnElement[bool], ...], **values: object
) -> bool:
    """finalizing -> ``new`` (a final state), only while ``guard`` holds (the finalizer's lease)."""
    return set_job_status(session, job_id, new, expected=(JobStatus.FINALIZING,), guard=guard, **values)


def cancel_job(session: Session, job_id: str, error: str) -> bool:
    """pending, running or paused -> cancelled; shards not started go back to pending."""
    if not set_job_status(
        session,
        job_id,
        JobStatus.CANCELLED,
        expected=(JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED),
        error=error,
    ):
        return False
    unqueue_cancelled(session, job_id)
    running = {
        (shard_id, attempt)
        for shard_id, attempt in session.execute(
            select(Shard.id, Shard.attempts).where(Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)
        )
    }
    ledger.release_all(session, job_id, db_now(session), keep=running)  # running shards end on their own
    return True


def resume_job(session: Session, job_id: str, status: JobStatus) -> bool:
    """cancelled, failed or paused -> running, unless the lifecycle purged its checkpoints;
    its failed, blocked and preempted shards go back to the router."""
    if not set_job_status(
        session,
        job_id,
        JobStatus.RUNNING,
        expected=(status,),
        guard=(Job.checkpoints_purged_at.is_(None),),
        error=None,
        finished_at=None,
        result_url=None,
        result_tier=None,
    ):
        return False
    now = db_now(session)
    waiting = (ShardStatus.FAILED, ShardStatus.BLOCKED, ShardStatus.PREEMPTED)
    check_shard_move(waiting, ShardStatus.PENDING)
    rows = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_(waiting))
        .values(
            status=ShardStatus.PENDING,
            backend=None,
            queue=None,
            excluded_backends=[],
            error=None,
            finished_at=None,
            updated_at=now,
        )
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
    check_shard_move((ShardStatus.BLOCKED,), ShardStatus.PENDING)
    session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status == ShardStatus.BLOCKED)
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


def shards_waiting_for_router(session: Session, job_id: str) -> bool:
    """Whether any shard of the job is pending (parked, or handed back to the router)."""
    return (
        session.execute(
            select(func.count()).select_from(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
        ).scalar_one()
        > 0
    )


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
    check_shard_move(expected, ShardStatus.QUEUED)
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
    return matched(result) == 1


def run_record(session: Session, shard_id: int) -> RunShard:
    """The ``run_shard`` message for a queued shard: its backend and attempt count now."""
    job_id, backend, attempts = session.execute(
        select(Shard.job_id, Shard.backend, Shard.attempts).where(Shard.id == shard_id)
    ).one()
    return RunShard(job_id=job_id, shard_id=shard_id, backend=backend or "", attempt=attempts)


def block_shard(session: Session, shard_id: int) -> bool:
    """pending -> blocked: the job's budget cannot cover it."""
    check_shard_move((ShardStatus.PENDING,), ShardStatus.BLOCKED)
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.BLOCKED, updated_at=db_now(session))
    )
    return matched(result) == 1


def block_pending(session: Session, job_id: str) -> int:
    """Every pending shard of the job -> blocked (the job is paused)."""
    check_shard_move((ShardStatus.PENDING,), ShardStatus.BLOCKED)
    result = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.BLOCKED, updated_at=db_now(session))
    )
    return matched(result)


def fail_unrouted(session: Session, shard_id: int, reason: str) -> bool:
    """pending -> failed: no backend is left that can run the shard."""
    check_shard_move((ShardStatus.PENDING,), ShardStatus.FAILED)
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
        .values(status=ShardStatus.FAILED, error=reason, finished_at=now, updated_at=now)
    )
    return matched(result) == 1


def unqueue_cancelled(session: Session, job_id: str) -> int:
    """queued/blocked -> pending for a cancelled job, giving back their reservations.

    One UPDATE ... RETURNING: a shard claimed at the same moment is either moved
    here (and its claim fails) or claimed (and keeps its reservation), never both.
    """
    now = db_now(session)
    waiting = (ShardStatus.QUEUED, ShardStatus.BLOCKED)
    check_shard_move(waiting, ShardStatus.PENDING)
    rows = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_(waiting))
        .values(status=ShardStatus.PENDING, backend=None, queue=None, updated_at=now)
        .returning(Shard.id, Shard.backend)
    ).all()
    for shard_id, backend in rows:
        ledger.release(session, job_id, shard_id, backend, now)
    return len(rows)


def end_attempt(session: Session, shard_id: int, attempt: int, outcome: AttemptOutcome, error: str | None) -> None:
    session.execute(
        update(ShardAttempt)
        .where(ShardAttempt.shard_id == shard_id, ShardAttempt.attempt == attempt)
        .values(outcome=outcome, ended_at=db_now(session), error=error)
    )


def expire_lease(session: Session, shard_id: int, *, owner_dead: bool = False) -> bool:
    """running with an expired lease -> queued; the attempt is recorded as lost.

    ``owner_dead``: the caller knows the holder's process is gone, so the lease
    need not have run out. The shard keeps its backend; the lost attempt keeps its
    reservation until the job ends (it may still be billed for the chunk it had in
    flight), and the next owner reserves its own.
    """
    check_shard_move((ShardStatus.RUNNING,), ShardStatus.QUEUED)
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
    if matched(result) != 1:
        return False
    end_attempt(
        session,
        shard_id,
        shard.attempts,
        AttemptOutcome.LOST,
        "worker process gone" if owner_dead else "lease expired",
    )
    return True


def back_to_router(session: Session, shard_id: int) -> bool:
    """preempted -> pending: the router chooses its backend again (its reservation is released)."""
    check_shard_move((ShardStatus.PREEMPTED,), ShardStatus.PENDING)
    job_id = session.execute(select(Shard.job_id).where(Shard.id == shard_id)).scalar_one_or_none()
    if job_id is None:
        return False
    now = lock_job_clock(session, job_id) or db_now(session)  # the job row before the shard's
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
    return matched(result) == 1

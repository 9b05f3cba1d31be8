"""A worker's moves on the shard it holds: claim, heartbeat, reserve, commit, end, reroute.

Each is fenced by the claim (owner and attempt): a worker that lost its lease
(frozen past it, its shard taken over) changes nothing. The same rules as
``pipeline.store.transitions`` hold: the caller's transaction commits, time is the
database's, the job row is locked before shard rows.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, cast

from sqlalchemy import BindParameter, ColumnElement, Select, Table, exists, func, insert, select, update
from sqlalchemy.orm import Session

from pipeline.store import ledger, transitions
from pipeline.store.db import bound, db_now
from pipeline.store.guards import check_shard_move, matched
from schemas.errors import LeaseLost
from schemas.records import RunShard
from schemas.status import AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Checkpoint, Shard, ShardAttempt

__all__ = [
    "CheckpointStats",
    "ChunkVerdict",
    "Claim",
    "already_committed",
    "charge_lost_work",
    "claim_shard",
    "commit_checkpoint",
    "end_shard",
    "hand_back",
    "heartbeat",
    "owned",
    "reroute_shard",
    "reserve_chunk",
]

log = logging.getLogger(__name__)


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

    @classmethod
    def of(cls, shard: Shard, worker_id: str, backend: str) -> Claim:
        """The claim ``worker_id`` holds on ``shard`` (its row as it is now)."""
        return cls(
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


def claim_shard(
    session: Session,
    shard_id: int,
    worker_id: str,
    lease_seconds: float,
    backend: str,
    attempt: int | None = None,
) -> Claim | None:
    """queued -> running, owned by ``worker_id``; ``None`` if anyone else got there first,
    or if the shard is no longer queued on ``backend`` for ``attempt`` (a stale message)."""
    check_shard_move((ShardStatus.QUEUED,), ShardStatus.RUNNING)
    job_id = session.execute(select(Shard.job_id).where(Shard.id == shard_id)).scalar_one_or_none()
    if job_id is None:
        return None
    transitions.lock_job(session, job_id)
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
    if matched(result) != 1:
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
    transitions.set_job_status(session, shard.job_id, JobStatus.RUNNING, expected=(JobStatus.PENDING,))
    ledger.transfer(session, shard.job_id, shard_id, backend, now, None, shard.attempts)  # the router's advance
    return Claim.of(shard, worker_id, backend)


def owned(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    """The fence: the shard is running under this very claim (owner and attempt)."""
    return _fence(claim.shard_id, claim.worker_id, claim.attempt)


def _fence(shard_id: object, worker_id: object, attempt: object) -> tuple[ColumnElement[bool], ...]:
    """``owned``'s guards, of values or of bound parameters (a statement built once)."""
    return (
        Shard.id == shard_id,
        Shard.status == ShardStatus.RUNNING,
        Shard.lease_owner == worker_id,
        Shard.attempts == attempt,
    )


def heartbeat(session: Session, claim: Claim, lease_seconds: float) -> bool:
    """Extend the lease; ``False`` if the shard is no longer ours."""
    now = db_now(session)
    result = session.execute(
        update(Shard)
        .where(*owned(claim))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return matched(result) == 1


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
    job = transitions.lock_job(session, claim.job_id)
    if job is None or job.status is JobStatus.CANCELLED:
        return ChunkVerdict.CANCELLED, 0.0
    if session.execute(select(Shard.id).where(*owned(claim))).scalar_one_or_none() is None:
        return ChunkVerdict.LOST, 0.0
    ok, room = ledger.reserve_chunk(
        session,
        claim.job_id,
        claim.shard_id,
        claim.attempt,
        claim.backend,
        need_usd,
        ledger.budget_for(session, job),
        db_now(session),
    )
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
    #: Rows answered without being sent (cache, repeats) and what they would have cost.
    rows_cached: int = 0
    saved_usd: float = 0.0


_CHECKPOINTS = cast(Table, Checkpoint.__table__)
_SHARDS = cast(Table, Shard.__table__)


def commit_checkpoint(session: Session, claim: Claim, stats: CheckpointStats, lease_seconds: float) -> None:
    """Record a written part as committed; raise ``LeaseLost`` if we no longer own the shard.

    The guard also requires the part to start exactly at the shard's resume point,
    so a part can never be committed twice or out of order. Every checkpoint of a
    job waits for the job's lock, so what runs under it is kept short: on
    PostgreSQL the lock is one statement and everything else another (``_COMMIT``).
    """
    if session.get_bind().dialect.name == "postgresql":
        _commit_in_one_statement(session, claim, stats, lease_seconds)
    else:
        _commit_statement_by_statement(session, claim, stats, lease_seconds)


def _commit_in_one_statement(session: Session, claim: Claim, stats: CheckpointStats, lease_seconds: float) -> None:
    """PostgreSQL: the job lock, then ``_COMMIT``; the same writes as
    ``_commit_statement_by_statement`` (a test holds the two to it)."""
    now = transitions.lock_job_clock(session, claim.job_id) or db_now(session)
    if session.connection().execute(_COMMIT, _commit_parameters(claim, stats, now, lease_seconds)).scalar_one() != 1:
        raise _lease_lost(claim, stats)


def _commit_parameters(claim: Claim, stats: CheckpointStats, now: datetime, lease_seconds: float) -> dict[str, object]:
    """``_COMMIT``'s bound parameters."""
    values = {
        "job_id": claim.job_id,
        "shard_id": claim.shard_id,
        "worker_id": claim.worker_id,
        "attempt": claim.attempt,
        "backend": claim.backend,
        "now": now,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        **asdict(stats),
    }
    return {f"p_{name}": value for name, value in values.items()}


def _commit_statement_by_statement(
    session: Session, claim: Claim, stats: CheckpointStats, lease_seconds: float
) -> None:
    """Any database: the job lock, the fenced shard update, then each write on its own."""
    now = transitions.lock_job_clock(session, claim.job_id) or db_now(session)
    result = session.execute(
        update(Shard)
        .execution_options(synchronize_session=False)
        .where(*owned(claim), Shard.row_start + Shard.rows_done == stats.first_row)
        .values(
            rows_done=Shard.rows_done + stats.row_count,
            rows_failed=Shard.rows_failed + stats.rows_failed,
            input_tokens=Shard.input_tokens + stats.input_tokens,
            output_tokens=Shard.output_tokens + stats.output_tokens,
            cost_usd=Shard.cost_usd + stats.cost_usd,
            rows_cached=Shard.rows_cached + stats.rows_cached,
            saved_usd=Shard.saved_usd + stats.saved_usd,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
    )
    if matched(result) != 1:
        raise _lease_lost(claim, stats)
    # Plain statements, not the ORM's unit of work: this runs under the job's lock.
    session.execute(
        insert(_CHECKPOINTS).values(
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
        .execution_options(synchronize_session=False)
    )
    ledger.charge(session, _charge_of(claim, stats), now)


def _lease_lost(claim: Claim, stats: CheckpointStats) -> LeaseLost:
    return LeaseLost(
        f"shard {claim.shard_index} of job {claim.job_id}: lease lost before committing row {stats.first_row}"
    )


def _one_statement_commit() -> Select[int]:
    """``commit_checkpoint``'s writes after the job lock as one PostgreSQL statement,
    built once: the fenced shard UPDATE (``advanced``), and, only if it matched, the
    checkpoint row, the attempt's count and the ledger's charge and release
    (data-modifying CTEs gated on ``advanced``). It returns how many shards advanced.

    Bound parameters (``db.bound``: ``p_`` before each name): the claim's ``job_id``,
    ``shard_id``, ``worker_id``, ``attempt``, ``backend``; ``CheckpointStats``' fields;
    ``now`` and ``lease_expires_at``.
    """
    shards, attempts = _SHARDS.c, cast(Table, ShardAttempt.__table__).c

    def param(name: str, column: str | None = None, table: Table = _CHECKPOINTS) -> BindParameter[Any]:
        return bound(table, name, column)

    counts = ("rows_failed", "input_tokens", "output_tokens", "cost_usd", "rows_cached", "saved_usd")
    advanced = (
        update(Shard)
        .where(
            *_fence(param("shard_id"), param("worker_id", "lease_owner", _SHARDS), param("attempt")),
            Shard.row_start + Shard.rows_done == param("first_row"),
        )
        .values(
            rows_done=Shard.rows_done + param("row_count"),
            **{name: shards[name] + param(name, table=_SHARDS) for name in counts},
            lease_expires_at=param("lease_expires_at", table=_SHARDS),
            updated_at=param("now", "created_at"),
        )
        .returning(Shard.id)
        .cte("advanced")
    )
    recorded = [name for name in _CHECKPOINTS.c.keys() if name != "id"]
    checkpointed = (
        insert(_CHECKPOINTS)
        .from_select(
            recorded, select(*(param("now" if n == "created_at" else n, n) for n in recorded)).select_from(advanced)
        )
        .cte("checkpointed")
    )
    counted = (
        update(ShardAttempt)
        .where(
            ShardAttempt.shard_id == param("shard_id"),
            ShardAttempt.attempt == param("attempt"),
            exists(advanced.select()),  # by key, not joined: the plan reads one row
        )
        .values(rows_processed=attempts.rows_processed + param("row_count"))
        .cte("counted")
    )
    return select(func.count()).select_from(advanced).add_cte(checkpointed, counted, *ledger.charge_after(advanced))


_COMMIT = _one_statement_commit()


def already_committed(session: Session, claim: Claim, stats: CheckpointStats) -> bool:
    """Whether this very part (its first row and file, by this attempt) is committed:
    a retried commit asks first, since its earlier try may have been committed by the
    server and only the reply lost; committing it again would fail its guard."""
    return (
        session.execute(
            select(Checkpoint.id).where(
                Checkpoint.shard_id == claim.shard_id,
                Checkpoint.first_row == stats.first_row,
                Checkpoint.attempt == claim.attempt,
                Checkpoint.url == stats.url,
            )
        ).first()
        is not None
    )


def charge_lost_work(session: Session, claim: Claim, stats: CheckpointStats) -> None:
    """Work done under a lease that was lost (a frozen worker, a partition) commits
    nothing, but it was paid for: it is charged all the same, against the shard's
    reservation, so the ledger shows real spend."""
    transitions.lock_job(session, claim.job_id)
    ledger.charge(session, _charge_of(claim, stats), db_now(session))


def _charge_of(claim: Claim, stats: CheckpointStats) -> ledger.Charge:
    """What a chunk of ``claim``'s attempt cost, for the ledger."""
    return ledger.Charge(
        claim.job_id,
        claim.shard_id,
        claim.backend,
        stats.cost_usd,
        stats.input_tokens,
        stats.output_tokens,
        claim.attempt,
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
    check_shard_move((ShardStatus.RUNNING,), new)
    # The job row before the shard's (its ledger rows update the job's running total).
    now = transitions.lock_job_clock(session, claim.job_id) or db_now(session)
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
    result = session.execute(update(Shard).where(*owned(claim)).values(**values))
    if matched(result) != 1:
        return False
    transitions.end_attempt(session, claim.shard_id, claim.attempt, outcome, error)
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
    check_shard_move((ShardStatus.RUNNING,), ShardStatus.PENDING)
    now = transitions.lock_job_clock(session, claim.job_id) or db_now(session)  # the job row first
    shard = session.execute(select(Shard).where(*owned(claim))).scalar_one_or_none()
    if shard is None:
        return False
    excluded = sorted({*(shard.excluded_backends or []), claim.backend})
    result = session.execute(
        update(Shard)
        .where(*owned(claim))
        .values(
            status=ShardStatus.PENDING,
            lease_owner=None,
            lease_expires_at=None,
            backend=None,
            queue=None,
            excluded_backends=excluded,
            error=error,
            updated_at=now,
        )
    )
    if matched(result) != 1:
        return False
    transitions.end_attempt(session, claim.shard_id, claim.attempt, AttemptOutcome.FAILED, error)
    ledger.release(session, claim.job_id, claim.shard_id, claim.backend, now, claim.attempt)
    return True


def hand_back(
    session: Session, claim: Claim, *, outcome: AttemptOutcome, error: str | None, max_preemptions: int, queue: str
) -> tuple[bool, RunShard | None]:
    """running -> preempted -> queued again on the same backend, in one transaction; a
    shard preempted (or lost) ``max_preemptions`` times goes back to the router instead.

    Returns (whether the claim still held, the record to send; None: the router's turn).
    """
    if not end_shard(session, claim, ShardStatus.PREEMPTED, outcome=outcome, error=error):
        return False, None
    preempted = session.execute(
        select(func.count())
        .select_from(ShardAttempt)
        .where(
            ShardAttempt.shard_id == claim.shard_id,
            ShardAttempt.outcome.in_((AttemptOutcome.PREEMPTED, AttemptOutcome.LOST)),
        )
    ).scalar_one()
    if preempted >= max_preemptions:
        transitions.back_to_router(session, claim.shard_id)
        log.info("shard %s preempted %d times: back to the router", claim.shard_index, preempted)
        return True, None
    transitions.queue_shard(
        session, claim.shard_id, expected=(ShardStatus.PREEMPTED,), backend=claim.backend, queue=queue
    )
    return True, transitions.run_record(session, claim.shard_id)

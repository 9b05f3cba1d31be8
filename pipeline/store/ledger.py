"""The cost ledger's moves: reserve (router, top-ups), charge per checkpoint, release.

Reserved + spent for a job is ``sum(amount_usd)`` over its rows, which the database
keeps on the job row as it changes (``Job.committed_usd``: migration 0012's triggers). Reservations are
worst cases (``pipeline.routing.pricing``: every row's ``max_tokens``, and an input bound
that holds for any tokenizer), and each belongs to a shard and one of its
attempts:

- the router holds a shard's first chunk's worth, under the job lock, only if
  the budget has room for at least its costliest row; it belongs to the shard's
  *pool* (``attempt`` NULL), which the next claim takes over;
- before each chunk is sent, the worker makes its attempt's reservation cover the
  worst case of everything it has in flight, topping it up under the job lock if
  the budget allows (``reserve_chunk``); if not, it sends as many rows as still
  fit, then stops;
- each committed checkpoint charges its actual cost and releases as much of its
  attempt's reservation; what is left is released when the attempt ends, or
  given back to the pool when the shard is handed back to the same backend.

An attempt whose lease was lost (a frozen worker, a partition) may still be billed
for the chunk it had in flight: its reservation stays held until the job ends, so
the next owner cannot spend it twice. So ``spent + reserved <= budget`` holds after
every transaction. Callers pass a session; their transaction commits.

A job created through ``spotlane serve`` belongs to a key, whose budget caps all of
its jobs together: ``budget_for`` is the job's budget as reservations see it, its
own capped by what the key has left, computed under a lock of the key's row (taken
after the job lock, always in that order) from the ledger of every job of the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import cast

from sqlalchemy import CTE, ColumnElement, Table, func, insert, literal, select, true
from sqlalchemy.orm import Session

from pipeline.store.db import bound
from schemas.status import LedgerKind
from schemas.tables import ApiKey, CostLedgerEntry, Job

__all__ = [
    "Charge",
    "budget_for",
    "charge",
    "charge_after",
    "committed_usd",
    "fits",
    "headroom",
    "release",
    "release_all",
    "reserve",
    "reserve_chunk",
    "reserved_usd",
    "spent_usd",
    "transfer",
]

#: Float slack in budget comparisons (a millionth of a cent).
EPSILON = 1e-8


@dataclass(frozen=True)
class Charge:
    """Work to charge: who did it, what it cost."""

    job_id: str
    shard_id: int
    backend: str
    cost_usd: float
    input_tokens: int = 0
    output_tokens: int = 0
    #: The attempt that did the work (its reservation pays for it).
    attempt: int | None = None


def committed_usd(session: Session, job_id: str) -> float:
    """Spent plus still-reserved USD of a job: the sum of its ledger, as the job row
    holds it (``Job.committed_usd``, kept by the database on every ledger write)."""
    committed = session.execute(select(Job.committed_usd).where(Job.id == job_id)).scalar_one_or_none()
    return float(committed or 0.0)


def spent_usd(session: Session, job_id: str) -> float:
    return float(
        session.execute(
            select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
                CostLedgerEntry.job_id == job_id, CostLedgerEntry.kind == LedgerKind.CHARGE
            )
        ).scalar_one()
    )


_LEDGER = cast(Table, CostLedgerEntry.__table__)


def _write(session: Session, **entry: object) -> None:
    """Add a ledger entry: a plain INSERT, not the ORM's unit of work (every checkpoint
    commit writes one or two under the job lock; a flush costs more than the INSERT)."""
    session.execute(insert(_LEDGER).values(**entry))


def _holder(attempt: int | None) -> ColumnElement[bool]:
    return CostLedgerEntry.attempt.is_(None) if attempt is None else CostLedgerEntry.attempt == attempt


def reserved_usd(session: Session, shard_id: int, attempt: int | None = None) -> float:
    """What the shard's ``attempt`` holds (``None``: the shard's pool, not yet claimed)."""
    return float(
        session.execute(
            select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
                CostLedgerEntry.shard_id == shard_id,
                CostLedgerEntry.kind.in_((LedgerKind.RESERVE, LedgerKind.RELEASE)),
                _holder(attempt),
            )
        ).scalar_one()
    )


def budget_for(session: Session, job: Job, committed: float | None = None) -> float | None:
    """The most ``job`` may have spent and reserved: its budget, capped by its key's.

    The caller holds the job lock; this locks the key's row, so two jobs of one key
    reserve in turn. ``committed``: the job's committed USD, if already read.
    """
    if job.api_key_id is None:
        return job.budget_usd
    key_budget = session.execute(
        select(ApiKey.budget_usd).where(ApiKey.id == job.api_key_id).with_for_update()
    ).scalar_one_or_none()
    if key_budget is None:
        return job.budget_usd
    key_committed = float(
        session.execute(
            select(func.coalesce(func.sum(Job.committed_usd), 0.0)).where(Job.api_key_id == job.api_key_id)
        ).scalar_one()
    )
    own = committed_usd(session, job.id) if committed is None else committed
    cap = own + key_budget - key_committed
    return cap if job.budget_usd is None else min(job.budget_usd, cap)


def fits(committed: float, amount: float, budget_usd: float | None) -> bool:
    return budget_usd is None or committed + amount <= budget_usd + EPSILON


def reserve(
    session: Session,
    job_id: str,
    shard_id: int,
    backend: str,
    amount_usd: float,
    now: datetime,
    input_tokens: int = 0,
    output_tokens: int = 0,
    attempt: int | None = None,
) -> None:
    """Hold ``amount_usd`` (never negative) for a shard's ``attempt`` (or its pool); the
    caller holds the job lock and checked the budget."""
    _write(
        session,
        job_id=job_id,
        shard_id=shard_id,
        backend=backend,
        kind=LedgerKind.RESERVE,
        amount_usd=max(0.0, amount_usd),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        attempt=attempt,
        created_at=now,
    )


def _give_back(
    session: Session, job_id: str, shard_id: int, backend: str | None, amount: float, now: datetime, attempt: int | None
) -> None:
    _write(
        session,
        job_id=job_id,
        shard_id=shard_id,
        backend=backend or "-",
        kind=LedgerKind.RELEASE,
        amount_usd=-amount,
        attempt=attempt,
        created_at=now,
    )


def headroom(session: Session, job_id: str, shard_id: int, attempt: int, budget_usd: float | None) -> float:
    """The most the attempt may hold in all: what it holds now plus what the budget has left."""
    if budget_usd is None:
        return float("inf")
    return reserved_usd(session, shard_id, attempt) + budget_usd - committed_usd(session, job_id)


def reserve_chunk(
    session: Session,
    job_id: str,
    shard_id: int,
    attempt: int,
    backend: str,
    need_usd: float,
    budget_usd: float | None,
    now: datetime,
) -> tuple[bool, float]:
    """Make the attempt's reservation cover ``need_usd`` (the worst case of its work in flight).

    The caller holds the job lock. Tops the reservation up if the budget allows and
    returns (True, headroom); returns (False, headroom) with nothing written if it
    does not, the headroom being the most ``need_usd`` could have been (negative if
    the budget was lowered below what the job has spent and holds).
    """
    room = headroom(session, job_id, shard_id, attempt, budget_usd)
    if need_usd > room + EPSILON:
        return False, room
    top_up = max(0.0, need_usd - reserved_usd(session, shard_id, attempt))
    if top_up > EPSILON:
        reserve(session, job_id, shard_id, backend, top_up, now, attempt=attempt)
    return True, room


def charge(session: Session, work: Charge, now: datetime) -> None:
    """Charge work's actual cost, and give back as much of its attempt's reservation."""
    _write(
        session,
        job_id=work.job_id,
        shard_id=work.shard_id,
        backend=work.backend,
        kind=LedgerKind.CHARGE,
        amount_usd=work.cost_usd,
        input_tokens=work.input_tokens,
        output_tokens=work.output_tokens,
        attempt=work.attempt,
        created_at=now,
    )
    give_back = min(reserved_usd(session, work.shard_id, work.attempt), work.cost_usd)
    if give_back > 0:
        _give_back(session, work.job_id, work.shard_id, work.backend, give_back, now, work.attempt)


def charge_after(gate: CTE) -> tuple[CTE, CTE]:
    """``charge`` as two data-modifying CTEs of one PostgreSQL statement, writing only
    if ``gate`` has a row: the charge, and the release of as much of the attempt's
    reservation (read in the statement's snapshot: the caller takes the job lock in
    an earlier statement, so every reservation committed before it is seen).

    Bound parameters (``db.bound``), named as ``Charge``'s fields: ``p_job_id``,
    ``p_shard_id``, ``p_backend``, ``p_cost_usd``, ``p_input_tokens``,
    ``p_output_tokens``, ``p_attempt``; and ``p_now``.
    """
    col = _LEDGER.c
    param = partial(bound, _LEDGER)

    held = (
        select(func.coalesce(func.sum(col.amount_usd), 0.0).label("usd"))
        .where(
            col.shard_id == param("shard_id"),
            col.kind.in_((LedgerKind.RESERVE, LedgerKind.RELEASE)),
            col.attempt == param("attempt"),
        )
        .cte("held")
    )
    whose = ["job_id", "shard_id", "backend", "attempt", "created_at", "kind", "amount_usd"]
    who = [param("job_id"), param("shard_id"), param("backend"), param("attempt"), param("now", "created_at")]
    charged = (
        insert(_LEDGER)
        .from_select(
            [*whose, "input_tokens", "output_tokens"],
            select(
                *who,
                literal(LedgerKind.CHARGE, col.kind.type),
                param("cost_usd", "amount_usd"),
                param("input_tokens"),
                param("output_tokens"),
            ).select_from(gate),
            include_defaults=False,  # a CTE's INSERT gets no Python-side defaults: every column is given
        )
        .cte("charged")
    )
    give_back = func.least(held.c.usd, param("cost_usd", "amount_usd"))
    released = (
        insert(_LEDGER)
        .from_select(
            [*whose, "input_tokens", "output_tokens"],
            select(*who, literal(LedgerKind.RELEASE, col.kind.type), -give_back, literal(0), literal(0))
            .select_from(gate)
            .join(held, true())
            .where(give_back > 0),
            include_defaults=False,
        )
        .cte("released")
    )
    return charged, released


def release(
    session: Session, job_id: str, shard_id: int, backend: str | None, now: datetime, attempt: int | None = None
) -> None:
    """Give back whatever the attempt (or the pool) still holds (a negative remainder too)."""
    reserved = reserved_usd(session, shard_id, attempt)
    if abs(reserved) > EPSILON:
        _give_back(session, job_id, shard_id, backend, reserved, now, attempt)


def transfer(
    session: Session,
    job_id: str,
    shard_id: int,
    backend: str | None,
    now: datetime,
    source: int | None,
    target: int | None,
) -> None:
    """Move what ``source`` holds to ``target`` (pool -> a new claim; a handed-back attempt -> pool)."""
    amount = reserved_usd(session, shard_id, source)
    if abs(amount) > EPSILON:
        _give_back(session, job_id, shard_id, backend, amount, now, source)
        reserve(session, job_id, shard_id, backend or "-", amount, now, attempt=target)


def release_all(session: Session, job_id: str, now: datetime, *, keep: set[tuple[int, int]] | None = None) -> None:
    """Give back every reservation of the job (the job ends), except those of ``keep``
    ((shard id, attempt) of attempts still running)."""
    held = session.execute(
        select(CostLedgerEntry.shard_id, CostLedgerEntry.attempt, func.sum(CostLedgerEntry.amount_usd))
        .where(CostLedgerEntry.job_id == job_id, CostLedgerEntry.kind.in_((LedgerKind.RESERVE, LedgerKind.RELEASE)))
        .group_by(CostLedgerEntry.shard_id, CostLedgerEntry.attempt)
    ).all()
    for shard_id, attempt, amount in held:
        if shard_id is not None and abs(float(amount)) > EPSILON and (shard_id, attempt) not in (keep or set()):
            _give_back(session, job_id, shard_id, None, float(amount), now, attempt)

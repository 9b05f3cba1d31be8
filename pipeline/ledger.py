"""The cost ledger's moves: reserve (router, top-ups), charge per checkpoint, release.

Reserved + spent for a job is ``sum(amount_usd)`` over its rows. Reservations are
worst cases (``pipeline.pricing``: every row's ``max_tokens``, and an input bound
that holds for any tokenizer). The router holds a shard's first chunk's worth
under the job lock, only if the budget has room for at least its costliest row.
Before each chunk is sent, a worker makes the shard's reservation cover the worst
case of everything it has in flight, topping it up under the job lock if the
budget allows (``reserve_chunk``); if not, it sends as many rows as still fit, and
then stops.
Each committed checkpoint charges its actual cost and releases as much of the
reservation; what is left is released when the shard ends or goes back to the
router. So ``spent + reserved <= budget`` holds after every transaction. Callers
pass a session; their transaction commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.status import LedgerKind
from schemas.tables import CostLedgerEntry

__all__ = [
    "Charge", "charge", "committed_usd", "fits", "headroom", "release", "reserve", "reserve_chunk", "reserved_usd",
    "spent_usd",
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


def committed_usd(session: Session, job_id: str) -> float:
    """Spent plus still-reserved USD of a job."""
    return float(session.execute(
        select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(CostLedgerEntry.job_id == job_id)
    ).scalar_one())


def spent_usd(session: Session, job_id: str) -> float:
    return float(session.execute(
        select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
            CostLedgerEntry.job_id == job_id, CostLedgerEntry.kind == LedgerKind.CHARGE
        )
    ).scalar_one())


def reserved_usd(session: Session, shard_id: int) -> float:
    return float(session.execute(
        select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
            CostLedgerEntry.shard_id == shard_id,
            CostLedgerEntry.kind.in_((LedgerKind.RESERVE, LedgerKind.RELEASE)),
        )
    ).scalar_one())


def fits(committed: float, amount: float, budget_usd: float | None) -> bool:
    return budget_usd is None or committed + amount <= budget_usd + EPSILON


def reserve(session: Session, job_id: str, shard_id: int, backend: str, amount_usd: float, now: datetime,
            input_tokens: int = 0, output_tokens: int = 0) -> None:
    """Hold ``amount_usd`` (never negative) for a shard; the caller holds the job lock and checked the budget."""
    session.add(CostLedgerEntry(
        job_id=job_id, shard_id=shard_id, backend=backend, kind=LedgerKind.RESERVE, amount_usd=max(0.0, amount_usd),
        input_tokens=input_tokens, output_tokens=output_tokens, created_at=now,
    ))


def headroom(session: Session, job_id: str, shard_id: int, budget_usd: float | None) -> float:
    """The most the shard may hold in all: what it holds now plus what the budget has left."""
    if budget_usd is None:
        return float("inf")
    return reserved_usd(session, shard_id) + budget_usd - committed_usd(session, job_id)


def reserve_chunk(session: Session, job_id: str, shard_id: int, backend: str, need_usd: float,
                  budget_usd: float | None, now: datetime) -> tuple[bool, float]:
    """Make the shard's reservation cover ``need_usd`` (the worst case of its work in flight).

    The caller holds the job lock. Tops the reservation up if the budget allows and
    returns (True, headroom); returns (False, headroom) with nothing written if it
    does not, the headroom being the most ``need_usd`` could have been (negative if
    the budget was lowered below what the job has spent and holds).
    """
    room = headroom(session, job_id, shard_id, budget_usd)
    if need_usd > room + EPSILON:
        return False, room
    top_up = max(0.0, need_usd - reserved_usd(session, shard_id))
    if top_up > EPSILON:
        reserve(session, job_id, shard_id, backend, top_up, now)
    return True, room


def charge(session: Session, work: Charge, now: datetime) -> None:
    """Charge work's actual cost, and give back as much of the shard's reservation."""
    session.add(CostLedgerEntry(
        job_id=work.job_id, shard_id=work.shard_id, backend=work.backend, kind=LedgerKind.CHARGE,
        amount_usd=work.cost_usd, input_tokens=work.input_tokens, output_tokens=work.output_tokens, created_at=now,
    ))
    give_back = min(reserved_usd(session, work.shard_id), work.cost_usd)
    if give_back > 0:
        session.add(CostLedgerEntry(
            job_id=work.job_id, shard_id=work.shard_id, backend=work.backend,
            kind=LedgerKind.RELEASE, amount_usd=-give_back, created_at=now,
        ))


def release(session: Session, job_id: str, shard_id: int, backend: str | None, now: datetime) -> None:
    """Give back whatever is still reserved for the shard (a negative remainder too)."""
    reserved = reserved_usd(session, shard_id)
    if abs(reserved) > EPSILON:
        session.add(CostLedgerEntry(
            job_id=job_id, shard_id=shard_id, backend=backend or "-",
            kind=LedgerKind.RELEASE, amount_usd=-reserved, created_at=now,
        ))

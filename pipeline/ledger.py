"""The cost ledger's moves: reserve (router), charge per checkpoint, release.

Reserved + spent for a job is ``sum(amount_usd)`` over its rows: a reservation is
held when a shard is routed, each committed checkpoint charges its actual cost and
releases as much of the reservation, and whatever is left is released when the
shard ends or goes back to the router. Callers pass a session; their transaction
commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.status import LedgerKind
from schemas.tables import CostLedgerEntry

if TYPE_CHECKING:
    from pipeline.transitions import CheckpointStats, Claim

__all__ = ["charge", "release", "reserved_usd"]


def charge(session: Session, claim: Claim, stats: CheckpointStats, now: datetime) -> None:
    """Charge a checkpoint's actual cost, and give back as much of the reservation.

    Reserved + spent therefore tracks max(estimate, actual) while the shard runs.
    """
    session.add(CostLedgerEntry(
        job_id=claim.job_id, shard_id=claim.shard_id, backend=claim.backend, kind=LedgerKind.CHARGE,
        amount_usd=stats.cost_usd, input_tokens=stats.input_tokens, output_tokens=stats.output_tokens,
        created_at=now,
    ))
    reserved = reserved_usd(session, claim.shard_id)
    give_back = min(reserved, stats.cost_usd)
    if give_back > 0:
        session.add(CostLedgerEntry(
            job_id=claim.job_id, shard_id=claim.shard_id, backend=claim.backend,
            kind=LedgerKind.RELEASE, amount_usd=-give_back, created_at=now,
        ))



def reserved_usd(session: Session, shard_id: int) -> float:
    return float(session.execute(
        select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
            CostLedgerEntry.shard_id == shard_id,
            CostLedgerEntry.kind.in_((LedgerKind.RESERVE, LedgerKind.RELEASE)),
        )
    ).scalar_one())



def release(session: Session, claim: Claim, now: datetime) -> None:
    """Give back whatever is still reserved for the shard."""
    reserved = reserved_usd(session, claim.shard_id)
    if reserved > 0:
        session.add(CostLedgerEntry(
            job_id=claim.job_id, shard_id=claim.shard_id, backend=claim.backend,
            kind=LedgerKind.RELEASE, amount_usd=-float(reserved), created_at=now,
        ))

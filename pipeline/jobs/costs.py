"""Spend reports from the cost ledger: charged USD and tokens, grouped."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import func, select

from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.errors import InputError
from schemas.status import LedgerKind
from schemas.tables import CostLedgerEntry, Job, Shard

__all__ = ["CostLine", "costs"]


class CostLine(TypedDict, total=False):
    """One group of ``costs``: the group's key under the name it was grouped by, and its sums."""

    backend: str
    day: str
    job: str
    tag: str
    cost_usd: float
    input_tokens: int
    output_tokens: int
    #: Grouped by backend, the ``cache`` line: rows answered without being sent (the
    #: answer cache, repeats of earlier rows) and what sending them would have cost.
    rows: int
    saved_usd: float


def costs(runtime: Runtime, *, job_id: str | None = None, by: str = "backend") -> list[CostLine]:
    """Charged USD and tokens grouped ``by`` backend, day, job or tag (``key=value``); by
    backend, a last ``cache`` line says what the answer cache saved."""
    if by not in ("backend", "day", "job", "tag"):
        raise InputError(f"--by must be backend, day, job or tag, not {by!r}")
    query = (
        select(CostLedgerEntry, Job.tags)
        .join(Job, Job.id == CostLedgerEntry.job_id)
        .where(CostLedgerEntry.kind == LedgerKind.CHARGE)
    )
    if job_id:
        query = query.where(CostLedgerEntry.job_id == job_id)
    groups: dict[str, CostLine] = {}
    with session_scope(runtime.engine) as session:
        for entry, tags in session.execute(query):
            if by == "backend":
                keys = [entry.backend]
            elif by == "day":
                keys = [entry.created_at.date().isoformat()]
            elif by == "job":
                keys = [entry.job_id]
            else:
                keys = [f"{k}={v}" for k, v in sorted((tags or {}).items())] or ["(untagged)"]
            for key in keys:
                line = groups.setdefault(key, CostLine(cost_usd=0.0, input_tokens=0, output_tokens=0))
                line[by] = key  # type: ignore[literal-required]  # by is one of the four group keys
                line["cost_usd"] += entry.amount_usd
                line["input_tokens"] += entry.input_tokens
                line["output_tokens"] += entry.output_tokens
        if by == "backend":
            cached = select(
                func.coalesce(func.sum(Shard.rows_cached), 0), func.coalesce(func.sum(Shard.saved_usd), 0.0)
            )
            if job_id:
                cached = cached.where(Shard.job_id == job_id)
            rows, saved = session.execute(cached).one()
    found = sorted(groups.values(), key=lambda line: -line["cost_usd"])
    if by == "backend" and rows:
        found.append(
            CostLine(
                backend="cache", cost_usd=0.0, input_tokens=0, output_tokens=0, rows=int(rows), saved_usd=float(saved)
            )
        )
    return found

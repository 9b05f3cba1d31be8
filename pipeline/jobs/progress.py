"""A running job's live numbers: rows per second lately, ETA, cost so far and projected, stalls.

Everything is read from what the job has committed (``checkpoints``, on the database's
clock) and charged (``cost_ledger``), not from the router's priors:

- **rate**: rows committed in the last ``RATE_WINDOW`` (five minutes, or since the job
  started if that is sooner), per second; per backend the same.
- **ETA**: the rows left at that rate (None until a row is committed). Rows at a
  provider's batch lane are due by their batch's give-up time at the latest.
- **cost**: charged so far; projected = spent + the rows left at the cost per row
  observed so far, with a low and a high end from the 10th and 90th percentiles of
  the committed parts' cost per row. Before any part, the router's estimate for the
  shards left (low = high = it).
- **stalled**: a running job with no part committed for longer than three of its
  slowest running shard's expected chunks (a minute at least), with the reason when
  one is known: paused for budget, no live worker on a queue its shards wait in (a
  distributed deployment's ``workers`` table), a backend cooling down. A shard at a provider batch is waiting, not stalled, until
  its give-up time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from pipeline.store import batches, presence
from schemas.settings import Settings
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import BackendStats, Checkpoint, CostLedgerEntry, Job, ProviderBatch, Shard

__all__ = ["RATE_WINDOW", "BackendLive", "Live", "live"]

#: How far back the rate looks.
RATE_WINDOW = timedelta(minutes=5)
#: No part for this many expected chunks (a minute at least) is a stall.
STALL_CHUNKS = 3.0
STALL_FLOOR = timedelta(minutes=1)
#: The latest parts whose cost per row gives the projection's low and high ends.
SPREAD_PARTS = 500


@dataclass(frozen=True)
class BackendLive:
    backend: str
    rows_done: int
    rows_per_second: float
    spent_usd: float


@dataclass(frozen=True)
class Live:
    """What ``status``, ``run``'s bar, the API and the serve front show while a job runs."""

    rows_per_second: float
    eta: str | None
    spent_usd: float
    projected_usd: float
    projected_low_usd: float
    projected_high_usd: float
    #: "observed" (the parts committed so far) or "estimate" (the router's, before any).
    basis: str
    stalled: bool = False
    stalled_reason: str | None = None
    last_commit_at: str | None = None
    by_backend: list[BackendLive] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _percentile(pairs: list[tuple[float, int]], q: float) -> float:
    """The ``q`` quantile of values weighted by their rows (pairs of value, rows)."""
    total = sum(n for _, n in pairs)
    if not total:
        return 0.0
    seen = 0
    for value, n in sorted(pairs):
        seen += n
        if seen >= q * total:
            return value
    return sorted(pairs)[-1][0]


def live(session: Session, settings: Settings, job: Job, rows_done: int, now: datetime) -> Live:
    """The job's live numbers now (see the module doc)."""
    since = max(now - RATE_WINDOW, job.started_at or job.created_at)
    span = max((now - since).total_seconds(), 1.0)
    recent_rows = func.sum(case((Checkpoint.created_at >= since, Checkpoint.row_count), else_=0))
    per_backend = session.execute(
        select(
            Shard.backend,
            func.sum(Checkpoint.row_count),
            func.sum(Checkpoint.cost_usd),
            recent_rows,
            func.max(Checkpoint.created_at),
        )
        .join(Shard, Shard.id == Checkpoint.shard_id)
        .where(Shard.job_id == job.id)
        .group_by(Shard.backend)
    ).all()
    done = {backend or "-": int(rows or 0) for backend, rows, *_ in per_backend}
    recent = {backend or "-": int(rows or 0) for backend, _, _, rows, _ in per_backend}
    committed_rows = sum(done.values())
    committed_cost = float(sum(cost or 0.0 for _, _, cost, _, _ in per_backend))
    last = max((at for *_, at in per_backend if at is not None), default=None)
    # The spread of cost per row, from the latest parts (bounded: a job may have many).
    per_row = [
        (float(cost) / rows, int(rows))
        for rows, cost in session.execute(
            select(Checkpoint.row_count, Checkpoint.cost_usd)
            .join(Shard, Shard.id == Checkpoint.shard_id)
            .where(Shard.job_id == job.id, Checkpoint.row_count > 0)
            .order_by(Checkpoint.id.desc())
            .limit(SPREAD_PARTS)
        )
    ]
    spent_by = dict(
        session.execute(
            select(CostLedgerEntry.backend, func.sum(CostLedgerEntry.amount_usd))
            .where(CostLedgerEntry.job_id == job.id, CostLedgerEntry.kind == LedgerKind.CHARGE)
            .group_by(CostLedgerEntry.backend)
        ).all()
    )
    spent = float(sum(spent_by.values()))
    rate = sum(recent.values()) / span
    left = max(0, job.rows_total - rows_done)
    final = job.status.is_final
    eta: datetime | None = None
    if left and rate > 0 and not final:
        eta = now + timedelta(seconds=left / rate)
    at_provider = session.execute(
        select(func.max(ProviderBatch.give_up_at)).where(
            ProviderBatch.job_id == job.id, ProviderBatch.status.in_(batches.OPEN)
        )
    ).scalar_one()
    if at_provider is not None and at_provider > now and not final:  # a late poller's past give-up says nothing
        eta = at_provider if eta is None else max(eta, at_provider)
    if committed_rows:
        mean = committed_cost / committed_rows
        basis = "observed"
        projected = spent + left * mean
        low = spent + left * _percentile(per_row, 0.1)
        high = spent + left * _percentile(per_row, 0.9)
    else:
        estimated = session.execute(
            select(func.coalesce(func.sum(Shard.est_cost_usd), 0.0)).where(
                Shard.job_id == job.id, Shard.status != ShardStatus.DONE
            )
        ).scalar_one()
        basis = "estimate"
        projected = low = high = spent + float(estimated)
    if final:
        projected = low = high = spent
    stalled, reason = (False, None) if final else _stall(session, settings, job, last, now)
    return Live(
        rows_per_second=rate,
        eta=_iso(eta),
        spent_usd=spent,
        projected_usd=projected,
        projected_low_usd=min(low, projected),
        projected_high_usd=max(high, projected),
        basis=basis,
        stalled=stalled,
        stalled_reason=reason,
        last_commit_at=_iso(last),
        by_backend=[
            BackendLive(name, done.get(name, 0), recent.get(name, 0) / span, float(spent_by.get(name, 0.0)))
            for name in sorted(set(done) | {b for b in spent_by if b})
        ],
    )


def _stall(
    session: Session, settings: Settings, job: Job, last: datetime | None, now: datetime
) -> tuple[bool, str | None]:
    """Whether the job is stalled now, and why when that is known."""
    if job.status is JobStatus.PAUSED:
        return True, job.error or "paused for budget"
    shards = session.execute(
        select(Shard.status, Shard.backend, Shard.queue, Shard.est_seconds, Shard.row_start, Shard.row_end).where(
            Shard.job_id == job.id, Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING))
        )
    ).all()
    if not shards:
        return False, None
    chunk = max(
        (secs / max(end - start, 1) * settings.worker.checkpoint_rows for _, _, _, secs, start, end in shards),
        default=0.0,
    )
    quiet = max(STALL_FLOOR, timedelta(seconds=STALL_CHUNKS * chunk))
    at_provider = {
        backend
        for (backend,) in session.execute(
            select(Shard.backend)
            .join(ProviderBatch, ProviderBatch.shard_id == Shard.id)
            .where(
                Shard.job_id == job.id,
                ProviderBatch.status.in_(batches.OPEN),
                ProviderBatch.give_up_at > now,
            )
        )
    }
    waiting = [s for s in shards if s.backend not in at_provider]
    if not waiting or now - (last or job.started_at or job.created_at) <= quiet:
        return False, None
    # Workers announce themselves (``workers`` table); ``spotlane run`` works its own job
    # without announcing, so on the embedded broker an empty table says nothing.
    for queue in sorted({q for _, _, q, *_ in waiting if q}) if not settings.embedded_broker else []:
        if not presence.consumers_in(session, queue, settings.worker.reap_interval_seconds):
            return True, f"no live worker consumes queue {queue!r}"
    for backend in sorted({b for _, b, *_ in waiting if b}):
        cooled_until = session.execute(
            select(func.max(BackendStats.cooldown_until)).where(BackendStats.backend == backend)
        ).scalar_one()
        if cooled_until is not None and cooled_until > now:
            return True, f"backend {backend} is cooling down after repeated failures"
    return True, f"no part committed for {int((now - (last or job.started_at or job.created_at)).total_seconds())} s"

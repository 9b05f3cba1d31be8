"""Routing: every shard goes to the cheapest backend that keeps its job in budget and on time.

For each pending shard of a job:

1. Rules first (``routing.rules``: model pins, a tag's allowed backends), then the
   backends that serve one of the job's models and every model its rows name, that
   have not failed this shard before, that accept its longest prompt, and that are
   not cooled down (unless nothing else is left).
2. Price the shard on each (``pipeline.pricing``), with what was learnt replacing
   the priors.
3. Under a lock on the job row (an UPDATE, so routers on any number of machines
   serialise per job): reserved + spent from ``cost_ledger``, and each backend's
   backlog (estimated seconds of queued and running shards, all jobs). ``choose``
   picks the cheapest quote that fits the budget and finishes before the deadline;
   if none is on time, the in-budget quote that finishes first; if nothing fits
   the budget, the shard is ``blocked`` and the job ``paused``.
4. Reserve the estimate, mark the shard queued on the backend's queue, commit, and
   only then send the run task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline import learning, transitions
from pipeline.assignment import cheapest_on_time
from pipeline.db import session_scope
from pipeline.estimate import ShardProfile, profile_rows
from pipeline.pricing import Quote, quote
from pipeline.runtime import Runtime
from schemas.backends import ApiProvider, GpuPool
from schemas.base import utcnow
from schemas.records import FinalizeJob, RunShard
from schemas.settings import Settings
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import CostLedgerEntry, Job, Shard

__all__ = ["RUN_SHARD", "Choice", "candidates", "choose", "committed_usd", "plan_on_time", "quotes_for", "route_job"]

log = logging.getLogger(__name__)

RUN_SHARD = "spotlane.run_shard"


@dataclass(frozen=True)
class Choice:
    quote: Quote | None
    note: str | None = None


def choose(
    quotes: Sequence[Quote],
    *,
    committed_usd: float,
    budget_usd: float | None,
    backlog_seconds: dict[str, float],
    now: datetime,
    deadline: datetime | None,
) -> Choice:
    """The cheapest quote within budget that finishes by the deadline (see module doc)."""
    affordable = [q for q in quotes if budget_usd is None or committed_usd + q.cost_usd <= budget_usd + 1e-9]
    if not affordable:
        return Choice(None, "no backend fits the remaining budget")

    def finish(q: Quote) -> datetime:
        return now + timedelta(seconds=(backlog_seconds.get(q.backend, 0.0) + q.seconds) / q.capacity)

    if deadline is None:
        return Choice(min(affordable, key=lambda q: (q.cost_usd, q.seconds)))
    on_time = [q for q in affordable if finish(q) <= deadline]
    if on_time:
        return Choice(min(on_time, key=lambda q: (q.cost_usd, q.seconds)))
    best = min(affordable, key=finish)
    return Choice(best, f"deadline cannot be met within budget; fastest affordable backend, done about {finish(best):%Y-%m-%d %H:%M} UTC")


def plan_on_time(
    quotes: Sequence[Sequence[Quote]], backlog_seconds: dict[str, float], now: datetime, deadline: datetime
) -> list[Quote] | None:
    """The cheapest assignment of all ``quotes`` rows that finishes by ``deadline`` (exact)."""
    horizon = (deadline - now).total_seconds()
    capacity = {q.backend: q.capacity for row in quotes for q in row}
    room = {b: horizon - backlog_seconds.get(b, 0.0) / c for b, c in capacity.items()}
    return cheapest_on_time(quotes, room)


def candidates(settings: Settings, job: Job, profile: ShardProfile, excluded: Iterable[str], now: datetime,
               cooling: set[str]) -> list[tuple[GpuPool | ApiProvider, str]]:
    """(backend, model) pairs allowed for this shard, rules and exclusions applied."""
    models = job.models or [job.model]
    allowed: set[str] | None = None
    for rule in settings.routing.rules:
        if any(rule.matches(m, job.tags or {}) for m in models):
            allowed = set(rule.backends) if allowed is None else allowed & set(rule.backends)
    pairs: list[tuple[GpuPool | ApiProvider, str]] = []
    for backend in settings.backends:
        if backend.name in excluded or (allowed is not None and backend.name not in allowed):
            continue
        if job.task == "embed" and not isinstance(backend, GpuPool):
            continue  # providers are chat endpoints here
        if not all(backend.serves(m) for m in profile.row_models):
            continue
        for model in models:
            if backend.serves(model):
                pairs.append((backend, model))
    warm = [(b, m) for b, m in pairs if b.name not in cooling]
    return warm or pairs


def quotes_for(session: Session, settings: Settings, job: Job, profile: ShardProfile,
               excluded: Iterable[str], now: datetime) -> list[Quote]:
    stats = {}
    cooling: set[str] = set()
    for backend in settings.backends:
        for model in job.models or [job.model]:
            seen = learning.observed(session, backend.name, model)
            stats[(backend.name, model)] = seen
            if seen is not None and seen.cooling(now):
                cooling.add(backend.name)
    found: list[Quote] = []
    for backend, model in candidates(settings, job, profile, excluded, now, cooling):
        priced = quote(backend, model, profile, stats.get((backend.name, model)), settings.routing)
        if priced is not None:
            found.append(priced)
    return found


def _committed(session: Session, job_id: str) -> float:
    return float(
        session.execute(
            select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(CostLedgerEntry.job_id == job_id)
        ).scalar_one()
    )


def committed_usd(runtime: Runtime, job_id: str) -> float:
    """Spent plus still-reserved USD of a job, from the ledger."""
    with session_scope(runtime.engine) as session:
        return _committed(session, job_id)


def _backlog(session: Session) -> dict[str, float]:
    rows = session.execute(
        select(Shard.backend, func.coalesce(func.sum(Shard.est_seconds), 0.0))
        .where(Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING)))
        .group_by(Shard.backend)
    ).all()
    return {backend: float(seconds) for backend, seconds in rows if backend}


def route_job(runtime: Runtime, job_id: str) -> int:
    """Route every pending shard of ``job_id``; return how many were queued."""
    settings = runtime.settings
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_final or job.status is JobStatus.PAUSED:
            return 0
        shards = session.execute(
            select(Shard.id, Shard.row_start, Shard.row_end, Shard.excluded_backends)
            .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
            .order_by(Shard.shard_index)
        ).all()
    profiles = {sid: profile_rows(job.input_url, s, e, job.input_kind, job.max_tokens, job.model)
                for sid, s, e, _ in shards}
    planned = _plan(runtime, job_id, shards, profiles) if job.deadline is not None else {}
    queued = 0
    for shard_id, start, end, excluded in shards:
        profile = profiles[shard_id]
        with session_scope(runtime.engine) as session:
            now = utcnow()
            # Lock the job row first: routers of the same job take turns from here to commit.
            session.execute(update(Job).where(Job.id == job_id).values(updated_at=now))
            job = session.get(Job, job_id)
            if job is None or job.status.is_final or job.status is JobStatus.PAUSED:
                return queued
            quotes = quotes_for(session, settings, job, profile, excluded or [], now)
            if not quotes:
                _fail_unroutable(session, job, shard_id, excluded or [])
                continue
            committed = _committed(session, job_id)
            preferred = [q for q in quotes if (q.backend, q.model) == planned.get(shard_id)]
            if preferred and (job.budget_usd is None or committed + preferred[0].cost_usd <= job.budget_usd + 1e-9):
                choice = Choice(preferred[0])
            else:
                choice = choose(
                    quotes,
                    committed_usd=committed,
                    budget_usd=job.budget_usd,
                    backlog_seconds=_backlog(session),
                    now=now,
                    deadline=job.deadline,
                )
            if choice.quote is None:
                transitions.block_shard(session, shard_id)
                transitions.set_job_status(
                    session, job_id, JobStatus.PAUSED, expected=(JobStatus.PENDING, JobStatus.RUNNING),
                    error=f"paused: budget ${job.budget_usd:.4f} cannot cover shard {shard_id} "
                          f"(cheapest ${min(q.cost_usd for q in quotes):.4f}); raise it with `spotlane budget`",
                )
                return queued
            best = choice.quote
            if not transitions.queue_shard(
                session, shard_id, expected=(ShardStatus.PENDING,), backend=best.backend, queue=best.queue,
                model=best.model, est_input_tokens=best.input_tokens, est_output_tokens=best.output_tokens,
                est_cost_usd=best.cost_usd, est_seconds=best.seconds, route_note=choice.note,
            ):
                continue
            session.add(CostLedgerEntry(
                job_id=job_id, shard_id=shard_id, backend=best.backend, kind=LedgerKind.RESERVE,
                amount_usd=best.cost_usd, input_tokens=best.input_tokens, output_tokens=best.output_tokens,
            ))
            transitions.set_job_status(session, job_id, JobStatus.RUNNING, expected=(JobStatus.PENDING,))
        # Sent after the commit: a worker never sees a task its shard row does not back.
        runtime.send(RUN_SHARD, RunShard(job_id=job_id, shard_id=shard_id, backend=best.backend), best.queue)
        queued += 1
    with session_scope(runtime.engine) as session:
        finished = transitions.job_shards_final(session, job_id)
    if finished:  # every shard failed routing: finalize now, nothing else will
        runtime.send("spotlane.finalize_job", FinalizeJob(job_id=job_id), settings.control_queue)
    return queued


def _plan(runtime: Runtime, job_id: str, shards: Sequence[Any], profiles: dict[int, ShardProfile]) -> dict[int, tuple[str, str]]:
    """Shard id -> (backend, model) of the cheapest on-time assignment of all pending shards."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.deadline is None:
            return {}
        now = utcnow()
        rows = [quotes_for(session, runtime.settings, job, profiles[sid], excluded or [], now)
                for sid, _, _, excluded in shards]
        assignment = plan_on_time(rows, _backlog(session), now, job.deadline)
    if assignment is None:
        return {}
    return {sid: (q.backend, q.model) for (sid, *_), q in zip(shards, assignment, strict=True)}


def _fail_unroutable(session: Session, job: Job, shard_id: int, excluded: list[str]) -> None:
    last = session.execute(select(Shard.error).where(Shard.id == shard_id)).scalar_one()
    if excluded:
        reason = f"no backend left for model {job.model!r}; failed on {', '.join(excluded)}: {last}"
    else:
        reason = f"no backend serves model {job.model!r} (see gpu_pools, api_providers and routing.rules)"
    transitions.fail_unrouted(session, shard_id, reason)
    log.warning("job %s shard %s: %s", job.id, shard_id, reason)

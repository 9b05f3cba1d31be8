"""Routing: every shard goes to the cheapest backend that keeps its job in budget and on time.

One router per job at a time (a lease in SQL, renewed at every shard): a
duplicated ``route_job`` message returns at once. For each pending shard of a job,
read and profiled only when its turn comes, so the first shard is queued within
seconds whatever the input's size:

1. Rules first (``routing.rules``: model pins, a tag's allowed backends), then the
   backends that serve one of the job's models and every model its rows name, that
   have not failed this shard before, that accept its longest prompt, and that are
   not cooled down (unless nothing else is left).
2. Price the shard on each (``pipeline.routing.pricing``), with what was learnt replacing
   the priors.
3. Under a lock on the job row (an UPDATE, so routers on any number of machines
   serialise per job): reserved + spent from ``cost_ledger``, and each backend's
   backlog (estimated seconds of queued and running shards, all jobs). ``choose``
   picks the cheapest quote that fits the budget (what is left covers the worst
   case of the shard's costliest row) and that finishes before the deadline; if none is on time, the in-budget quote that finishes
   first. If none fits, the shard waits while other shards of the job
   run (their reservations come back as they finish; the worker that ends one
   routes the job again), or, with nothing in flight, every pending shard is
   ``blocked`` and the job ``paused``.
4. Reserve the worst case of its first chunk, mark the shard queued on the
   backend's queue, commit, and only then send the run task.

With a deadline, the job's pending shards are first assigned together (an exact
MILP, ``pipeline.routing.solver``) from the footer's size estimate.

A provider's batch lane (``<provider>.batch``) is priced at its discount and finishes
a shard its turnaround after it is sent (the learnt high percentile, the window
until observed), whatever else it holds: it is on time when that turnaround is, and
full when its enqueued prompt tokens would pass ``max_enqueued_tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.routing import observations as learning
from pipeline.routing.estimate import FOOTER_CHARS_PER_TOKEN, ShardProfile, profile_columns, profile_rows
from pipeline.routing.pricing import Quote, quote
from pipeline.routing.sharing import answered_rows, sharing_of
from pipeline.routing.solver import cheapest_on_time
from pipeline.runtime import Runtime
from pipeline.storage.inputs import RowReader, open_parquet
from pipeline.store import batches, leases, ledger, transitions
from pipeline.store.db import db_now, session_scope
from pipeline.store.identity import owner_id
from schemas.backends import Backend, GpuPool, ProviderBatchLane
from schemas.settings import Settings
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Job, ProviderBatch, Shard

__all__ = [
    "Choice",
    "candidates",
    "choose",
    "plan_on_time",
    "quotes_for",
    "route_job",
    "route_lease",
]

log = logging.getLogger(__name__)


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
    """The cheapest quote within budget that finishes by the deadline (see module doc).

    A quote fits the budget when what is left of it covers the shard's costliest
    row (``row_reserve_usd``): the worker reserves chunk by chunk from there.
    """
    affordable = [q for q in quotes if ledger.fits(committed_usd, q.row_reserve_usd, budget_usd)]
    if not affordable:
        return Choice(None, "no backend fits the remaining budget")

    def finish(q: Quote) -> datetime:
        if q.turnaround is not None:  # a provider batch lane: every batch side by side
            return now + timedelta(seconds=q.turnaround)
        return now + timedelta(seconds=(backlog_seconds.get(q.backend, 0.0) + q.seconds) / q.capacity)

    if deadline is None:
        return Choice(min(affordable, key=lambda q: (q.cost_usd, q.seconds)))
    on_time = [q for q in affordable if finish(q) <= deadline]
    if on_time:
        return Choice(min(on_time, key=lambda q: (q.cost_usd, q.seconds)))
    best = min(affordable, key=finish)
    within = " within the budget" if budget_usd is not None else ""
    return Choice(
        best,
        f"the deadline cannot be met{within}; fastest backend{within}, done about {finish(best):%Y-%m-%d %H:%M} UTC",
    )


def plan_on_time(
    quotes: Sequence[Sequence[Quote]],
    backlog_seconds: dict[str, float],
    now: datetime,
    deadline: datetime,
    room_tokens: dict[str, float] | None = None,
) -> list[Quote] | None:
    """The cheapest assignment of all ``quotes`` rows that finishes by ``deadline`` (exact).

    A batch lane's quote takes part only if its turnaround ends before the deadline;
    ``room_tokens``: what each batch lane with a limit may still enqueue."""
    horizon = (deadline - now).total_seconds()
    usable = [[q for q in row if q.turnaround is None or q.turnaround <= horizon] for row in quotes]
    capacity = {q.backend: q.capacity for row in usable for q in row if q.turnaround is None}
    room = {b: horizon - backlog_seconds.get(b, 0.0) / c for b, c in capacity.items()}
    return cheapest_on_time(usable, room, room_tokens=room_tokens)


def candidates(
    settings: Settings, job: Job, profile: ShardProfile, excluded: Iterable[str], cooling: set[str]
) -> list[tuple[Backend, str]]:
    """(backend, model) pairs allowed for this shard, rules and exclusions applied."""
    models = job.models or [job.model]
    allowed: set[str] | None = None
    for rule in settings.routing.rules:
        if any(rule.matches(m, job.tags or {}) for m in models):
            allowed = set(rule.backends) if allowed is None else allowed & set(rule.backends)
    pairs: list[tuple[Backend, str]] = []
    for backend in settings.backends:
        if backend.name in excluded or (allowed is not None and backend.name not in allowed):
            continue
        if job.task == "embed" and not isinstance(backend, GpuPool):
            continue  # providers are chat endpoints here
        if not all(backend.serves_row(m, models) for m in profile.row_models):
            continue
        for model in models:
            if backend.serves(model):
                pairs.append((backend, model))
    warm = [(b, m) for b, m in pairs if b.name not in cooling]
    return warm or pairs


#: Fingerprints of a job's earlier rows a router keeps to price repeats as answered (a
#: 10M-row job's would take a gigabyte): past this many, later repeats are priced as new
#: rows, a higher estimate, never a lower one (the worker reserves what it really sends).
ASKED_MOST = 1_000_000


def quotes_for(
    session: Session,
    settings: Settings,
    job: Job,
    profile: ShardProfile,
    excluded: Iterable[str],
    now: datetime,
    asked: set[str] | None = None,
) -> list[Quote]:
    """Every backend's price for ``profile``. ``asked``: fingerprints of the job's rows
    priced before (earlier shards), whose repeats the cache will answer."""
    stats = {}
    cooling: set[str] = set()
    for backend in settings.backends:
        for model in job.models or [job.model]:
            seen = learning.observed(session, backend.name, model)
            stats[(backend.name, model)] = seen
            if seen is not None and seen.cooling(now):
                cooling.add(backend.name)
    found: list[Quote] = []
    priced_keys: set[str] = set()
    for backend, model in candidates(settings, job, profile, excluded, cooling):
        retries = job.schema_retries if profile.structured_rows else 0
        profile.answered_rows, keys = answered_rows(
            session, settings, job, profile, backend, model, now, set() if asked is None else asked
        )
        priced_keys |= keys
        turnaround = None
        if isinstance(backend, ProviderBatchLane):
            if _enqueue_room(session, backend) < profile.input_bound(exact_tokenizer=False):
                continue  # the provider holds as many tokens of ours as it takes
            turnaround = learning.turnaround(session, backend.name, backend.lane.turnaround_percentile)
        priced = quote(backend, model, profile, stats.get((backend.name, model)), settings.routing, retries, turnaround)
        if priced is not None:
            found.append(priced)
    if asked is not None and len(asked) < ASKED_MOST:
        asked |= priced_keys
    return found


def _enqueue_room(session: Session, lane: ProviderBatchLane) -> float:
    """Prompt tokens ``lane`` may still enqueue at the provider (infinite without a limit)."""
    if lane.lane.max_enqueued_tokens is None:
        return float("inf")
    enqueued = session.execute(
        select(func.coalesce(func.sum(ProviderBatch.input_tokens), 0)).where(
            ProviderBatch.backend == lane.name, ProviderBatch.status.in_(batches.OPEN)
        )
    ).scalar_one()
    return float(lane.lane.max_enqueued_tokens - int(enqueued))


def _backlog(session: Session) -> dict[str, float]:
    rows = session.execute(
        select(Shard.backend, func.coalesce(func.sum(Shard.est_seconds), 0.0))
        .where(Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING)))
        .group_by(Shard.backend)
    ).all()
    return {backend: float(seconds) for backend, seconds in rows if backend}


#: How long a router holds a job before it must renew (it renews at every shard).
ROUTE_LEASE_SECONDS = 120.0


def route_lease(job_id: str) -> str:
    return f"route:{job_id}"


def route_job(runtime: Runtime, job_id: str) -> int:
    """Route the pending shards of ``job_id`` (one router per job at a time); return how many were queued."""
    owner = owner_id()
    lease = route_lease(job_id)
    if not leases.take(runtime.engine, lease, owner, ROUTE_LEASE_SECONDS):
        log.info("job %s is being routed by another router", job_id)
        return 0
    try:
        return _route(runtime, job_id, lambda: leases.renew(runtime.engine, lease, owner, ROUTE_LEASE_SECONDS))
    finally:
        leases.release(runtime.engine, lease, owner)


_IN_FLIGHT = (ShardStatus.QUEUED, ShardStatus.RUNNING, ShardStatus.PREEMPTED)


def _route(runtime: Runtime, job_id: str, renew: Callable[[], bool]) -> int:
    settings = runtime.settings
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_final or job.status is JobStatus.FINALIZING:
            return 0
        if job.status is JobStatus.PAUSED:
            transitions.block_pending(session, job_id)  # nothing of a paused job waits unseen
            return 0
        shards = session.execute(
            select(Shard.id, Shard.shard_index, Shard.row_start, Shard.row_end, Shard.excluded_backends)
            .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
            .order_by(Shard.shard_index)
        ).all()
    planned = _plan(runtime, job_id, shards) if job.deadline is not None and shards else {}
    # One pass over the input for all the shards (in row order): each row group is read
    # once, not once for every shard it holds.
    reader = (
        RowReader(
            job.input_url,
            profile_columns(open_parquet(job.input_url).schema_arrow.names, job.input_kind, sharing_of(job)),
        )
        if shards
        else None
    )
    queued = 0
    asked: set[str] = set()  # the fingerprints of the shards routed so far
    paused = False
    for shard_id, index, start, end, excluded in shards:
        if not renew():
            log.warning("router lost its lease on job %s; another router goes on", job_id)
            return queued
        # Profiled one shard at a time: the first shard is queued after reading its
        # own rows, not the whole input.
        profile = profile_rows(
            job.input_url,
            start,
            end,
            job.input_kind,
            job.max_tokens,
            job.model,
            job.response_schema is not None,
            sharing_of(job),
            reader,
        )
        # Priced before the job lock (the answer cache and what was learnt are read here):
        # every checkpoint commit of the job waits for that lock.
        with session_scope(runtime.engine) as session:
            quotes = quotes_for(session, settings, job, profile, excluded or [], db_now(session), asked)
        with session_scope(runtime.engine) as session:
            job = transitions.lock_job(session, job_id)  # routers, claims and commits of this job take turns
            if job is None or job.status.is_final or job.status is JobStatus.FINALIZING:
                return queued
            if job.status is JobStatus.PAUSED:
                transitions.block_pending(session, job_id)
                return queued
            now = db_now(session)
            if not quotes:
                _fail_unroutable(session, job, shard_id, index, excluded or [])
                continue
            committed = ledger.committed_usd(session, job_id)
            budget = ledger.budget_for(session, job, committed)  # capped by its serve key's budget
            preferred = [q for q in quotes if (q.backend, q.model) == planned.get(shard_id)]
            if preferred and ledger.fits(committed, preferred[0].row_reserve_usd, budget):
                choice = Choice(preferred[0])
            else:
                choice = choose(
                    quotes,
                    committed_usd=committed,
                    budget_usd=budget,
                    backlog_seconds=_backlog(session),
                    now=now,
                    deadline=job.deadline,
                )
            if choice.quote is None:
                paused = _wait_or_pause(session, job, shard_id, index, quotes)
                break  # committed on the way out
            best = choice.quote
            if not transitions.queue_shard(
                session,
                shard_id,
                expected=(ShardStatus.PENDING,),
                backend=best.backend,
                queue=best.queue,
                model=best.model,
                est_input_tokens=best.input_tokens,
                est_output_tokens=best.output_tokens,
                est_cost_usd=best.cost_usd,
                est_seconds=best.seconds,
                route_note=choice.note,
            ):
                continue
            room = float("inf") if budget is None else budget - committed
            ledger.reserve(
                session,
                job_id,
                shard_id,
                best.backend,
                _advance(best, profile.rows, settings, room),
                now,
                best.input_tokens,
                best.output_tokens,
            )
            transitions.set_job_status(session, job_id, JobStatus.RUNNING, expected=(JobStatus.PENDING,))
            record = transitions.run_record(session, shard_id)
        # Sent after the commit: a worker never sees a task its shard row does not back.
        runtime.send_run(record)
        queued += 1
    if paused:
        runtime.send_webhooks()  # job.paused
        return queued
    with session_scope(runtime.engine) as session:
        finished = transitions.job_shards_final(session, job_id)
    if finished:  # every shard failed routing: finalize now, nothing else will
        runtime.send_finalize(job_id)
    return queued


def _advance(q: Quote, rows: int, settings: Settings, room: float) -> float:
    """What routing holds for the shard: the worst case of its first chunk (at least its
    costliest row), within what the budget has left. The worker tops it up chunk by chunk."""
    first_chunk = q.reserve_usd * min(1.0, settings.worker.checkpoint_rows / max(rows, 1))
    return min(q.reserve_usd, max(first_chunk, q.row_reserve_usd), room)


def _wait_or_pause(session: Session, job: Job, shard_id: int, index: int, quotes: Sequence[Quote]) -> bool:
    """No backend's worst case fits what is left of the budget now.

    If other shards of the job are in flight, their reservations come back as they
    finish (their actual cost is usually well under the worst case): the shard
    waits, pending, and is routed again when one of them ends. Otherwise the budget
    cannot cover it: every pending shard is blocked and the job paused (True).
    """
    cheapest = min(q.row_reserve_usd for q in quotes)
    in_flight = session.execute(
        select(func.count()).select_from(Shard).where(Shard.job_id == job.id, Shard.status.in_(_IN_FLIGHT))
    ).scalar_one()
    if in_flight:
        session.execute(
            update(Shard)
            .where(Shard.id == shard_id, Shard.status == ShardStatus.PENDING)
            .values(
                route_note=f"waiting for budget: its costliest row's worst case (${cheapest:.4f}) does not fit "
                "until running shards finish",
                updated_at=db_now(session),
            )
        )
        return False
    transitions.block_pending(session, job.id)
    return transitions.set_job_status(
        session,
        job.id,
        JobStatus.PAUSED,
        expected=(JobStatus.PENDING, JobStatus.RUNNING),
        error=f"paused: what is left of the budget (${job.budget_usd or 0:.4f}{_key_note(job)}) cannot cover shard "
        f"{index}'s costliest row (worst case ${cheapest:.4f} on the cheapest backend); raise it with "
        "`spotlane budget`",
    )


def _key_note(job: Job) -> str:
    return f", or of its serve key {job.api_key_id}'s" if job.api_key_id is not None else ""


def _rough_profile(job: Job, rows: int) -> ShardProfile:
    """A shard's profile from the file's footer alone, for the deadline plan (no rows read)."""
    chars = int(job.est_prompt_tokens * FOOTER_CHARS_PER_TOKEN * rows)
    return ShardProfile(
        rows=rows,
        prompt_chars=chars,
        max_tokens=job.max_tokens * rows,
        prompt_bytes=chars,
        messages=rows,
        longest_prompt_chars=chars // max(rows, 1),
    )


def _plan(runtime: Runtime, job_id: str, shards: Sequence[Any]) -> dict[int, tuple[str, str]]:
    """Shard id -> (backend, model) of the cheapest on-time assignment of all pending shards.

    Priced from the input's footer (no rows read): each shard's exact profile is
    read when it is routed, and a shard whose plan no longer fits the budget is
    routed shard by shard.
    """
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.deadline is None:
            return {}
        now = db_now(session)
        # Shards of one size and exclusions price the same from the footer: each kind is
        # quoted once (20,000 shards are a handful of kinds, not 20,000 rounds of queries).
        priced: dict[tuple[int, tuple[str, ...]], list[Quote]] = {}
        rows = []
        for _, _, start, end, excluded in shards:
            kind = (end - start, tuple(sorted(excluded or [])))
            if kind not in priced:
                priced[kind] = quotes_for(
                    session, runtime.settings, job, _rough_profile(job, end - start), excluded or [], now
                )
            rows.append(priced[kind])
        limited = {lane.name: _enqueue_room(session, lane) for lane in runtime.settings.batch_lanes}
        room_tokens = {name: room for name, room in limited.items() if room != float("inf")}
        assignment = plan_on_time(rows, _backlog(session), now, job.deadline, room_tokens)
    if assignment is None:
        return {}
    return {sid: (q.backend, q.model) for (sid, *_), q in zip(shards, assignment, strict=True)}


def _fail_unroutable(session: Session, job: Job, shard_id: int, index: int, excluded: list[str]) -> None:
    last = session.execute(select(Shard.error).where(Shard.id == shard_id)).scalar_one()
    if excluded:
        reason = f"no backend left for model {job.model!r}; failed on {', '.join(excluded)}: {last}"
    else:
        reason = f"no backend serves model {job.model!r} (see gpu_pools, api_providers and routing.rules)"
    transitions.fail_unrouted(session, shard_id, reason)
    log.warning("job %s shard %s: %s", job.id, index, reason)

"""Plans and money: a dry run of routing, budget changes, and spend reports.

``plan`` prices every shard of an input file as the router would, assigning them
in order with the same ``choose`` and a running backlog, and writes nothing.
``set_budget`` raises (or lowers) a job's budget and, if the job was paused for
money, unblocks its shards and routes them. ``costs`` sums the ledger's charges.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import transitions
from pipeline.db import session_scope
from pipeline.estimate import profile_rows
from pipeline.inputs import expand_input, inspect_input, stitch_inputs
from pipeline.model_ref import resolve_model
from pipeline.producer import plan_shards
from pipeline.router import choose, quotes_for
from pipeline.runtime import Runtime
from schemas.base import utcnow
from schemas.errors import InputError, NotFound
from schemas.status import JobStatus, LedgerKind
from schemas.tables import CostLedgerEntry, Job

__all__ = ["Plan", "costs", "plan", "set_budget"]


@dataclass
class Plan:
    rows: int
    shards: int
    cost_usd: float = 0.0
    #: What the budget would hold at most: every row's max_tokens, a byte-bound prompt.
    worst_case_usd: float = 0.0
    finish: datetime | None = None
    blocked: int = 0
    by_backend: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(
    runtime: Runtime,
    input_url: str,
    models: list[str],
    *,
    budget_usd: float | None = None,
    deadline: datetime | None = None,
    max_tokens: int | None = None,
    rows_per_shard: int | None = None,
    tags: dict[str, Any] | None = None,
) -> Plan:
    """What routing would do with ``input_url`` now, without writing anything.

    Models resolve as ``submit`` resolves them (a mistyped folder is refused); several
    files (a glob, a folder) are priced as the one input ``submit`` would stitch.
    """
    settings = runtime.settings
    api_models = {m for p in settings.api_providers for m in p.models}
    models = [m if m in api_models else resolve_model(m) for m in models]
    files = expand_input(input_url)
    with tempfile.TemporaryDirectory(dir=settings.home) as scratch:
        url = files[0] if len(files) == 1 else stitch_inputs(files, str(Path(scratch) / "input.parquet"))
        return _plan(runtime, url, models, budget_usd=budget_usd, deadline=deadline, max_tokens=max_tokens,
                     rows_per_shard=rows_per_shard, tags=tags)


def _plan(
    runtime: Runtime,
    url: str,
    models: list[str],
    *,
    budget_usd: float | None,
    deadline: datetime | None,
    max_tokens: int | None,
    rows_per_shard: int | None,
    tags: dict[str, Any] | None,
) -> Plan:
    settings = runtime.settings
    info = inspect_input(url)
    per_shard = rows_per_shard or settings.jobs.rows_per_shard
    job = Job(id="plan", model=models[0], models=models, input_url=info.url, input_kind=info.kind,
              max_tokens=max_tokens or settings.jobs.max_tokens, temperature=0.0, tags=tags or {},
              rows_total=info.rows, rows_per_shard=per_shard, shard_count=0, carried_columns=[])
    ranges = plan_shards(info.rows, per_shard)
    result = Plan(rows=info.rows, shards=len(ranges))
    now = utcnow()
    backlog: dict[str, float] = defaultdict(float)
    with session_scope(runtime.engine) as session:
        for start, end in ranges:
            profile = profile_rows(info.url, start, end, info.kind, job.max_tokens, job.model)
            quotes = quotes_for(session, settings, job, profile, [], now)
            if not quotes:
                raise InputError(f"no backend serves model {models[0]!r} (see gpu_pools and api_providers)")
            choice = choose(quotes, committed_usd=result.cost_usd, budget_usd=budget_usd,
                            backlog_seconds=backlog, now=now, deadline=deadline)
            if choice.quote is None:
                result.blocked += 1
                continue
            q = choice.quote
            backlog[q.backend] += q.seconds
            result.cost_usd += q.cost_usd
            result.worst_case_usd += q.reserve_usd
            line = result.by_backend.setdefault(q.backend, {"shards": 0, "rows": 0, "cost_usd": 0.0,
                                                           "kind": q.kind, "capacity": q.capacity})
            line["shards"] += 1
            line["rows"] += end - start
            line["cost_usd"] += q.cost_usd
            if choice.note:
                note = choice.note.split(";")[0] if budget_usd is not None else "the deadline cannot be met"
                if note not in result.notes:
                    result.notes.append(note)
    for name, line in result.by_backend.items():
        line["finish"] = now + timedelta(seconds=backlog[name] / line["capacity"])
    if result.by_backend:
        result.finish = max(line["finish"] for line in result.by_backend.values())
    return result


def set_budget(runtime: Runtime, job_id: str, budget_usd: float) -> str:
    """Set a job's budget; a job paused for money resumes. Returns its status."""
    if budget_usd < 0 or budget_usd != budget_usd:
        raise InputError("the budget must be a number of USD, not negative")
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        resumed = transitions.change_budget(session, job_id, budget_usd)
        status = JobStatus.RUNNING.value if resumed else job.status.value
    runtime.send_route(job_id)
    return status


def costs(runtime: Runtime, *, job_id: str | None = None, by: str = "backend") -> list[dict[str, Any]]:
    """Charged USD and tokens grouped ``by`` backend, day, job or tag (``key=value``)."""
    if by not in ("backend", "day", "job", "tag"):
        raise InputError(f"--by must be backend, day, job or tag, not {by!r}")
    query = select(CostLedgerEntry, Job.tags).join(Job, Job.id == CostLedgerEntry.job_id).where(
        CostLedgerEntry.kind == LedgerKind.CHARGE
    )
    if job_id:
        query = query.where(CostLedgerEntry.job_id == job_id)
    groups: dict[str, dict[str, Any]] = {}
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
                line = groups.setdefault(key, {by: key, "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0})
                line["cost_usd"] += entry.amount_usd
                line["input_tokens"] += entry.input_tokens
                line["output_tokens"] += entry.output_tokens
    return sorted(groups.values(), key=lambda line: -line["cost_usd"])

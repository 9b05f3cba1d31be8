"""A dry run of routing: what a job would cost, where it would run, when it would end.

``plan`` prices every shard of an input file as the router would, assigning them
in order with the same ``choose`` and a running backlog, and writes nothing.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

from pipeline.jobs.models import resolve_model
from pipeline.jobs.submit import plan_shards, shard_rows
from pipeline.routing.estimate import profile_rows
from pipeline.routing.router import choose, quotes_for
from pipeline.routing.sharing import sharing_of
from pipeline.runtime import Runtime
from pipeline.storage.input_files import expand_input, stitch_inputs
from pipeline.storage.inputs import inspect_input
from pipeline.storage.openai_batch import convert_jsonl, is_openai_jsonl
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.errors import InputError
from schemas.jobspec import JobSpec
from schemas.tables import Job

__all__ = ["Plan", "PlanLine", "plan"]


class PlanLine(TypedDict, total=False):
    """What ``plan`` sends to one backend."""

    kind: str
    shards: int
    rows: int
    cost_usd: float
    #: Workers that run at once (the pool's ``max_workers``; a provider's concurrency).
    capacity: int
    finish: datetime


@dataclass
class Plan:
    rows: int
    shards: int
    cost_usd: float = 0.0
    #: What the budget would hold at most: every row's max_tokens, a byte-bound prompt.
    worst_case_usd: float = 0.0
    finish: datetime | None = None
    blocked: int = 0
    #: Rows that will not be sent: held by the answer cache, or repeating an earlier row.
    rows_answered: int = 0
    by_backend: dict[str, PlanLine] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan(runtime: Runtime, input_url: str, spec: JobSpec) -> Plan:
    """What routing would do with ``input_url`` now, without writing anything.

    Models resolve as ``submit`` resolves them (a mistyped folder is refused); several
    files (a glob, a folder) are priced as the one input ``submit`` would stitch.
    """
    settings = runtime.settings
    api_models = {m for p in settings.api_providers for m in p.models}
    files = expand_input(input_url)
    names = spec.models
    with tempfile.TemporaryDirectory(dir=settings.home) as scratch:
        if len(files) == 1 and is_openai_jsonl(files[0]):  # priced as the Parquet file submit makes of it
            url = str(Path(scratch) / "input.parquet")
            names = names or convert_jsonl(files[0], url).models
        else:
            url = files[0] if len(files) == 1 else stitch_inputs(files, str(Path(scratch) / "input.parquet"))
        if not names:
            raise InputError("--model names no model (only an OpenAI batch JSONL input names its own)")
        models = [m if m in api_models else resolve_model(m) for m in names]
        return _plan(
            runtime,
            url,
            models,
            budget_usd=spec.budget_usd,
            deadline=spec.deadline,
            max_tokens=spec.max_tokens,
            rows_per_shard=spec.rows_per_shard,
            tags=spec.tags,
            response_schema=spec.response_schema,
            schema_retries=spec.schema_retries,
            use_cache=(settings.cache.enabled and spec.use_cache) or spec.incremental,
            refresh_cache=spec.refresh_cache,
            task=spec.task,
            temperature=spec.temperature,
        )


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
    response_schema: dict[str, Any] | None = None,
    schema_retries: int = 0,
    use_cache: bool = True,
    refresh_cache: bool = False,
    task: str = "generate",
    temperature: float | None = None,
) -> Plan:
    settings = runtime.settings
    info = inspect_input(url)
    per_shard = shard_rows(info.rows, rows_per_shard, settings.jobs)
    now = utcnow()
    job = Job(
        id="plan",
        model=models[0],
        models=models,
        input_url=info.url,
        input_kind=info.kind,
        max_tokens=max_tokens or settings.jobs.max_tokens,
        temperature=settings.jobs.temperature if temperature is None else temperature,
        tags=tags or {},
        response_schema=response_schema,
        schema_retries=schema_retries,
        use_cache=use_cache,
        refresh_cache=refresh_cache,
        task=task,
        created_at=now,
        rows_total=info.rows,
        rows_per_shard=per_shard,
        shard_count=0,
        carried_columns=[],
    )
    ranges = plan_shards(info.rows, per_shard)
    result = Plan(rows=info.rows, shards=len(ranges))
    backlog: dict[str, float] = defaultdict(float)
    asked: set[str] = set()  # the fingerprints of the shards priced so far
    with session_scope(runtime.engine) as session:
        for start, end in ranges:
            profile = profile_rows(
                info.url,
                start,
                end,
                info.kind,
                job.max_tokens,
                job.model,
                job.response_schema is not None,
                sharing_of(job),
            )
            quotes = quotes_for(session, settings, job, profile, [], now, asked)
            if not quotes:
                raise InputError(f"no backend serves model {models[0]!r} (see gpu_pools and api_providers)")
            choice = choose(
                quotes,
                committed_usd=result.cost_usd,
                budget_usd=budget_usd,
                backlog_seconds=backlog,
                now=now,
                deadline=deadline,
            )
            if choice.quote is None:
                result.blocked += 1
                continue
            q = choice.quote
            result.rows_answered += q.answered_rows
            backlog[q.backend] += q.seconds
            result.cost_usd += q.cost_usd
            result.worst_case_usd += q.reserve_usd
            line = result.by_backend.setdefault(
                q.backend, PlanLine(shards=0, rows=0, cost_usd=0.0, kind=q.kind, capacity=q.capacity)
            )
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

"""Feeding a shard's rows to the engine, chunk by chunk, inside the budget.

Before a chunk is sent, its worst case (every row's ``max_tokens``, a byte-bound
prompt) is reserved against the job's budget under the job lock; a chunk that does
not fit is cut to the rows that do, and the shard stops there (parked) if none do.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.routing import observations as learning
from pipeline.routing.estimate import profile_requests
from pipeline.routing.pricing import reasked_worst_case_usd, worst_case_usd
from pipeline.runtime import Runtime
from pipeline.storage.inputs import iter_rows, open_parquet
from pipeline.store import claims
from pipeline.store.db import session_scope
from schemas.backends import ApiProvider, GpuPool
from schemas.tables import Job
from workers.drain import StopFlag
from workers.engines.base import Request
from workers.engines.chunks import Chunk, prepare, rechunk
from workers.heartbeat import Heartbeat

__all__ = ["Feed", "feed_chunks"]


def _rows_within(costs: Sequence[float], room: float) -> int:
    """How many of the first ``costs`` fit in ``room`` together."""
    total = 0.0
    for i, cost in enumerate(costs):
        total += cost
        if total > room + 1e-9:
            return i
    return len(costs)


@dataclass
class Feed:
    """What the chunk feeder saw: why it stopped, and the worst case still in flight."""

    stopped: str | None = None
    fed_to: int = 0
    exhausted: bool = False


def feed_chunks(
    runtime: Runtime,
    stop: StopFlag,
    claim: claims.Claim,
    job: Job,
    backend: GpuPool | ApiProvider,
    beat: Heartbeat,
    pending: deque[tuple[Chunk, float]],
    feed: Feed,
    stats: learning.Observed | None,
) -> Iterator[list[Request]]:
    """Requests chunk by chunk, each chunk's worst case reserved first (under the job
    lock); stops feeding on a drain request, a lost lease, a cancelled job, or a
    budget that cannot cover the next chunk (``feed`` says which)."""
    names = open_parquet(job.input_url).schema_arrow.names
    requested = [c for c in ("max_tokens", "temperature", "model", "response_format") if c in names]
    columns = list(dict.fromkeys(["id", job.input_kind, *requested, *job.carried_columns]))
    checkpoint_rows = runtime.settings.worker.checkpoint_rows
    first_row = feed.fed_to = claim.row_start + claim.rows_done
    models = list(job.models or [job.model])
    schema = json.dumps(job.response_schema) if job.response_schema is not None else None
    batches = iter_rows(job.input_url, first_row, claim.row_end, columns, batch_size=checkpoint_rows)
    for rows in rechunk(batches, checkpoint_rows):
        while rows.num_rows:
            if stop:
                feed.stopped = "stop requested"
                return
            if beat.lost.is_set():
                feed.stopped = "lease lost"
                return
            part = rows
            while True:
                chunk = prepare(
                    part,
                    first_row,
                    kind=job.input_kind,
                    default_max_tokens=job.max_tokens,
                    default_temperature=job.temperature,
                    serves=lambda m: backend.serves_row(m, models),
                    response_schema=schema,
                    schema_retries=job.schema_retries,
                )
                row_worst = [0.0 if r is None else _row_worst(backend, r, stats) for r in chunk.requests]
                in_flight = sum(w for _, w in pending)
                with session_scope(runtime.engine) as session:
                    verdict, room = claims.reserve_chunk(session, claim, in_flight + sum(row_worst))
                fit = _rows_within(row_worst, room - in_flight)
                if verdict is not claims.ChunkVerdict.NO_BUDGET or not 0 < fit < part.num_rows:
                    break
                part = part.slice(0, fit)  # send the rows the budget still covers; the rest stop the shard
            if verdict is not claims.ChunkVerdict.GO:
                feed.stopped = verdict.value
                return
            pending.append((chunk, sum(row_worst)))
            first_row += part.num_rows
            feed.fed_to = first_row
            rows = rows.slice(part.num_rows)
            yield chunk.runnable
    feed.exhausted = True


def _row_worst(backend: GpuPool | ApiProvider, request: Request, stats: learning.Observed | None) -> float:
    """The most one row can cost: an API row with a schema, with every re-ask it may take."""
    profile = profile_requests([request])
    if isinstance(backend, ApiProvider) and request.schema_retries:
        bound = profile.input_bound(exact_tokenizer=False)
        return reasked_worst_case_usd(backend, bound, request.max_tokens, request.schema_retries)
    return worst_case_usd(backend, profile, stats)

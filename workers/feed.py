"""Feeding a shard's rows to the engine, chunk by chunk, inside the budget.

Rows asked before are answered from the answer cache (``pipeline.store.answers``),
and a row asking what an earlier row of its chunk asks gets that row's answer: only
the rest are sent, and only they are reserved for. Before a chunk is sent, its worst
case (every sent row's ``max_tokens``, a byte-bound prompt) is reserved against the
job's budget under the job lock; a chunk that does not fit is cut to the rows that
do, and the shard stops there (parked) if none do.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline.jobs.models import lane_identity
from pipeline.routing import observations as learning
from pipeline.routing.estimate import profile_requests
from pipeline.routing.pricing import reasked_worst_case_usd, worst_case_usd
from pipeline.runtime import Runtime
from pipeline.storage.inputs import RowReader, iter_rows, open_parquet
from pipeline.store import answers, claims
from pipeline.store.db import session_scope
from schemas.backends import ApiProvider, Backend
from schemas.base import utcnow
from schemas.fingerprint import fingerprint
from schemas.inference import Completion
from schemas.settings import WorkerSettings
from schemas.tables import Job
from workers.drain import StopFlag
from workers.engines.base import Request
from workers.engines.chunks import Chunk, prepare, rechunk
from workers.heartbeat import Heartbeat

__all__ = ["Feed", "answer_known", "feed_chunks", "input_columns", "prepare_rows", "row_worst", "rows_within"]


def rows_within(costs: Sequence[float], room: float) -> int:
    """How many of the first ``costs`` fit in ``room`` together."""
    total = 0.0
    for i, cost in enumerate(costs):
        total += cost
        if total > room + 1e-9:
            return i
    return len(costs)


@dataclass
class Feed:
    """What the chunk feeder saw (why it stopped, where it got to), and how big its next
    chunk is: ``checkpoint_rows`` at first, then sized by ``learn`` so that a chunk is
    about ``checkpoint_seconds`` of work (a part every 256 rows of a lane that answers
    2,000 rows a second would be a commit every eighth of a second)."""

    stopped: str | None = None
    fed_to: int = 0
    exhausted: bool = False
    chunk_rows: int = 0
    #: The worker's reader of this input, kept from shard to shard: shards taken in input
    #: order continue it instead of decoding their row group from its start again.
    reader: RowReader | None = None

    def learn(self, rows: int, seconds: float, settings: WorkerSettings) -> None:
        """The engine ran ``rows`` rows of a chunk in ``seconds`` (since the previous one):
        size the next (at most four times this one, never under ``checkpoint_rows``). Rows
        the answer cache served cost nothing and are not counted: a chunk of them teaches
        nothing."""
        if rows <= 0:
            return
        fitting = rows * settings.checkpoint_seconds / max(seconds, 1e-3)
        grown = min(fitting, 4 * max(self.chunk_rows, rows), settings.checkpoint_max_rows)
        self.chunk_rows = max(settings.checkpoint_rows, int(grown))


def feed_chunks(
    runtime: Runtime,
    stop: StopFlag,
    claim: claims.Claim,
    job: Job,
    backend: Backend,
    beat: Heartbeat,
    pending: deque[tuple[Chunk, float]],
    feed: Feed,
    stats: learning.Observed | None,
    model: str = "",
) -> Iterator[list[Request]]:
    """Requests chunk by chunk, each chunk's worst case reserved first (under the job
    lock); stops feeding on a drain request, a lost lease, a cancelled job, or a
    budget that cannot cover the next chunk (``feed`` says which)."""
    reader = feed.reader if feed.reader is not None and feed.reader.url == job.input_url else None
    columns = reader.columns if reader is not None else input_columns(job)  # the runner made it for this job
    checkpoint_rows = runtime.settings.worker.checkpoint_rows
    feed.chunk_rows = feed.chunk_rows or checkpoint_rows
    first_row = feed.fed_to = claim.row_start + claim.rows_done
    if reader is not None:
        batches = reader.take(first_row, claim.row_end)
    else:
        batches = iter_rows(job.input_url, first_row, claim.row_end, columns, batch_size=checkpoint_rows)
    asked: set[str] = set()  # fingerprints of the rows this shard has sent
    for rows in rechunk(batches, lambda: feed.chunk_rows):
        while rows.num_rows:
            if stop:
                feed.stopped = "stop requested"
                return
            if beat.lost.is_set():
                feed.stopped = "lease lost"
                return
            part = rows
            while True:
                chunk = prepare_rows(job, part, first_row, backend)
                trial = set(asked)  # this chunk's rows count as asked only once it is sent
                answer_known(runtime, job, chunk, backend, model or job.model, trial)
                worst = [
                    row_worst(backend, r, stats) if r is not None and chunk.sent(i) else 0.0
                    for i, r in enumerate(chunk.requests)
                ]
                in_flight = sum(w for _, w in pending)
                with session_scope(runtime.engine) as session:
                    verdict, room = claims.reserve_chunk(session, claim, in_flight + sum(worst))
                fit = rows_within(worst, room - in_flight)
                if verdict is not claims.ChunkVerdict.NO_BUDGET or not 0 < fit < part.num_rows:
                    break
                part = part.slice(0, fit)  # send the rows the budget still covers; the rest stop the shard
            if verdict is not claims.ChunkVerdict.GO:
                feed.stopped = verdict.value
                return
            asked = trial
            pending.append((chunk, sum(worst)))
            first_row += part.num_rows
            feed.fed_to = first_row
            rows = rows.slice(part.num_rows)
            yield chunk.runnable
    feed.exhausted = True


def input_columns(job: Job) -> list[str]:
    """The input columns a shard's rows are read with: the id, the prompt, the per-row
    settings the file has, and the columns carried to the results."""
    names = open_parquet(job.input_url).schema_arrow.names
    requested = [c for c in ("max_tokens", "temperature", "model", "response_format") if c in names]
    return list(dict.fromkeys(["id", job.input_kind, *requested, *job.carried_columns]))


def prepare_rows(job: Job, table: pa.Table, first_row: int, backend: Backend) -> Chunk:
    """``prepare`` with the job's defaults, for ``backend``."""
    models = list(job.models or [job.model])
    return prepare(
        table,
        first_row,
        kind=job.input_kind,
        default_max_tokens=job.max_tokens,
        default_temperature=job.temperature,
        serves=lambda m: backend.serves_row(m, models),
        response_schema=json.dumps(job.response_schema) if job.response_schema is not None else None,
        schema_retries=job.schema_retries,
    )


def answer_known(runtime: Runtime, job: Job, chunk: Chunk, backend: Backend, model: str, asked: set[str]) -> int:
    """Fill ``chunk``'s fingerprints, the rows the answer cache answers, and the rows that
    repeat a row of the shard sent before (``asked``, which gets this chunk's); how many
    rows will not be sent. A ``--no-cache`` job shares nothing: every row is sent."""
    names = {model, *(r.model for r in chunk.requests if r and r.model)}
    identity = {name: lane_identity(backend, name) for name in names}
    chunk.fingerprints = [
        fingerprint(r, identity[r.model or model], job.task) if r is not None else None for r in chunk.requests
    ]
    if job.use_cache:
        since = answers.usable_since(utcnow(), runtime.settings.cache.ttl_days, job.created_at, job.refresh_cache)
        with session_scope(runtime.engine) as session:
            cached = answers.lookup(session, (f for f in chunk.fingerprints if f), since)
        for i, found in enumerate(chunk.fingerprints):
            if found is not None and found in cached:
                hit = cached[found]
                chunk.served[i] = Completion(
                    output=hit.output,
                    finish_reason=hit.finish_reason,
                    input_tokens=hit.input_tokens,
                    output_tokens=hit.output_tokens,
                    latency_ms=0.0,
                    cost_usd=0.0,
                    embedding=hit.embedding,
                    source="cache",
                    cached_from=hit.job_id,
                    saved_usd=hit.cost_usd,
                )
        for i, found in enumerate(chunk.fingerprints):
            if found is None or i in chunk.served:
                continue
            if found in asked:  # by an earlier row of this shard: its answer comes back first
                chunk.same_as[i] = found
            else:
                asked.add(found)
    return len(chunk.served) + len(chunk.same_as)


def row_worst(backend: Backend, request: Request, stats: learning.Observed | None = None) -> float:
    """The most one row can cost: an API row with a schema, with every re-ask it may take
    (none on a batch lane: an answer that fails there goes back to the router)."""
    profile = profile_requests([request])
    if isinstance(backend, ApiProvider) and request.schema_retries:
        bound = profile.input_bound(exact_tokenizer=False)
        return reasked_worst_case_usd(backend, bound, request.max_tokens, request.schema_retries)
    return worst_case_usd(backend, profile, stats)

"""What becomes of a generated chunk: its part written and its checkpoint committed
(fenced by the claim, storage and database faults retried for a while), the work
of a lost lease charged, and what was observed reported to the router."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pyarrow as pa

from pipeline.routing import observations as learning
from pipeline.runtime import Runtime
from pipeline.storage.objects import write_parquet
from pipeline.store import answers, claims
from pipeline.store.db import db_now, is_transient, session_scope
from schemas.errors import LeaseLost, TransientError
from schemas.tables import Job
from workers.engines.base import Completion
from workers.engines.chunks import Chunk
from workers.heartbeat import Heartbeat

__all__ = ["charge_lost", "learn", "persist", "stats_of"]

log = logging.getLogger(__name__)


def stats_of(
    runtime: Runtime,
    claim: claims.Claim,
    chunk: Chunk,
    completions: Sequence[Completion],
    table: pa.Table,
    cost: float,
    attempt: int | None = None,
) -> claims.CheckpointStats:
    """What a part of ``chunk``'s rows holds, for its commit; written by ``attempt`` (the
    claim's unless given), under a new name. Tokens billed are the rows sent: a cached or
    repeated row keeps its answer's counts in the results, but nothing was sent for it."""
    billed = [c for i, c in enumerate(completions) if i not in chunk.served and i not in chunk.same_as]
    unsent = [completions[i] for i in (*chunk.served, *chunk.same_as)]
    written_by = claim.attempt if attempt is None else attempt
    return claims.CheckpointStats(
        first_row=chunk.first_row,
        row_count=table.num_rows,
        rows_failed=sum(1 for c in completions if c.error is not None),
        input_tokens=sum(c.input_tokens for c in billed),
        output_tokens=sum(c.output_tokens for c in billed),
        cost_usd=cost,
        url=runtime.storage.part_url(claim.job_id, claim.shard_index, chunk.first_row, written_by),
        rows_cached=len(unsent),
        saved_usd=sum(c.saved_usd for c in unsent),
    )


def persist(
    runtime: Runtime, claim: claims.Claim, table: object, stats: claims.CheckpointStats, beat: Heartbeat
) -> None:
    """Write the part and commit its checkpoint, retrying transient faults for a while."""
    settings = runtime.settings.worker
    deadline = time.monotonic() + settings.transient_retry_seconds
    delay = 0.5
    written = sent = False
    while True:
        try:
            if not written:
                write_parquet(table, stats.url, runtime.storage.storage_class("hot"))
                written = True
            with session_scope(runtime.engine) as session:
                # A commit that failed may have committed all the same (the connection
                # dropped after the server's COMMIT): this part is not sent twice.
                if sent and claims.already_committed(session, claim, stats):
                    return
                sent = True
                claims.commit_checkpoint(session, claim, stats, settings.lease_seconds)
            return
        except LeaseLost:
            charge_lost(runtime, claim, stats)
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            if beat.lost.is_set():
                raise LeaseLost(
                    f"shard {claim.shard_index} of job {claim.job_id}: lease lost while retrying a checkpoint"
                ) from exc
            if time.monotonic() + delay > deadline:
                raise TransientError(
                    f"checkpoint at row {stats.first_row} still failing after "
                    f"{settings.transient_retry_seconds:.0f} s: {exc.__class__.__name__}: "
                    f"{str(exc)[:200]}"
                ) from exc
            log.warning(
                "checkpoint at row %d of shard %s failed (%s); retrying in %.1f s",
                stats.first_row,
                claim.shard_index,
                exc.__class__.__name__,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def charge_lost(runtime: Runtime, claim: claims.Claim, stats: claims.CheckpointStats) -> None:
    """Charge a chunk whose commit lost the lease: it was generated (and paid for) all the same."""
    try:
        with session_scope(runtime.engine) as session:
            claims.charge_lost_work(session, claim, stats)
    except Exception:  # the ledger is not worth failing over; the work is lost either way
        log.warning("could not charge the lost chunk of shard %s", claim.shard_index, exc_info=True)


def learn(
    runtime: Runtime,
    backend: str,
    model: str,
    chunk: Chunk,
    completions: Sequence[Completion],
    stats: claims.CheckpointStats,
    seconds: float,
    is_api: bool,
) -> None:
    """Report a committed chunk to the router's observations (advisory: never fails)."""
    # ``completions`` are the chunk's rows (``merge``d): rows that could not run, and
    # answers quarantined for failing their schema, carry an error.
    paired = [  # the rows sent: not those answered by the cache or by an earlier row
        (r, c)
        for i, (r, c) in enumerate(zip(chunk.requests, completions, strict=True))
        if r is not None and chunk.sent(i)
    ]
    answered = [(r, c) for r, c in paired if c.error is None]
    ok = [c for _, c in answered]
    first = [(r, c) for r, c in answered if not c.reasks]  # sizes learnt from first asks only
    structured = [
        c for r, c in paired if r.response_schema is not None and (c.error is None or c.error.startswith("schema:"))
    ]
    try:
        with session_scope(runtime.engine) as session:
            learning.record_checkpoint(
                session,
                backend,
                model,
                runtime.settings.routing,
                rows=len(paired),  # the rows sent: a cached or repeated row says nothing of the lane
                rows_failed=sum(1 for _, c in paired if c.error is not None),
                prompt_chars=sum(r.prompt_chars for r, _ in first),
                input_tokens=sum(c.input_tokens for _, c in first),
                output_tokens=sum(c.output_tokens for _, c in first),
                max_tokens=sum(r.max_tokens for r, _ in first),
                seconds=0.0 if is_api else seconds,
                requests_latency=(sum(c.latency_ms for c in ok) / len(ok) / 1000.0) if (is_api and ok) else None,
                structured_rows=len(structured),
                reasks=sum(c.reasks for c in structured),
            )
    except Exception:  # learning is advisory; never fail a shard over it
        log.warning("could not record backend statistics", exc_info=True)


def remember(
    runtime: Runtime,
    job: Job,
    chunk: Chunk,
    completions: Sequence[Completion],
    model: str,
    usd_per_second: float = 0.0,
) -> None:
    """Record a committed chunk's generated answers in the answer cache (advisory: never
    fails). Errors and answers cut by ``max_tokens`` are not kept."""
    if not job.use_cache or not chunk.fingerprints:
        return
    kept = [
        answers.Answer(
            found,
            c.output,
            c.finish_reason,
            c.input_tokens,
            c.output_tokens,
            c.cost_usd if c.cost_usd is not None else c.compute_seconds * usd_per_second,
            model,
            job.id,
            c.embedding,
        )
        for i, (found, c) in enumerate(zip(chunk.fingerprints, completions, strict=True))
        if found is not None and chunk.sent(i) and c.error is None and c.finish_reason in ("stop", "embedding")
    ]
    if not kept:
        return
    try:
        with session_scope(runtime.engine) as session:
            answers.remember(session, kept, db_now(session), replace=job.refresh_cache)
    except Exception:  # the cache is not worth failing a shard over
        log.warning("could not record %d answers in the answer cache", len(kept), exc_info=True)

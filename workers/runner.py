"""Running one shard: claim, resume from the checkpoint, generate, commit, finish.

    claim (guarded UPDATE queued -> running, lease)        ── someone else has it? stop
    for each chunk of ``checkpoint_rows`` rows after the last commit:
        generate -> write part-<first_row>.parquet (hot tier) -> commit checkpoint row
    finish (running -> done, ledger charged) -> last shard? enqueue finalize

A part is written before its checkpoint row commits, and the commit is guarded by
the lease, so a worker that lost its shard can write a stray part but never make it
part of the results. A heartbeat thread keeps the lease alive; a stop request
(SIGTERM, warm shutdown) is honoured between chunks: the finished chunk is
committed and the shard handed back to the queue.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline import metrics, transitions
from pipeline.db import session_scope
from pipeline.inputs import iter_rows
from pipeline.runtime import Runtime
from pipeline.storage import write_parquet
from schemas.arrow import OUTPUT_FIELDS, output_schema
from schemas.base import utcnow
from schemas.errors import LeaseLost, SpotlaneError
from schemas.records import FinalizeJob, RunShard
from schemas.status import AttemptOutcome, ShardStatus
from schemas.tables import Job
from workers.drain import StopFlag
from workers.engine import Completion, Engine, Request

__all__ = ["ShardRunner", "worker_id"]

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Heartbeat(threading.Thread):
    def __init__(self, runtime: Runtime, claim: transitions.Claim) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.shard_id}")
        self.runtime, self.claim = runtime, claim
        self.stopped = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        settings = self.runtime.settings.worker
        while not self.stopped.wait(settings.heartbeat_seconds):
            try:
                with session_scope(self.runtime.engine) as session:
                    if not transitions.heartbeat(session, self.claim, settings.lease_seconds):
                        self.lost.set()
                        return
            except Exception:  # a database blip: try again next beat
                log.warning("heartbeat for shard %s failed", self.claim.shard_id, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def _rechunk(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while len(batch):
            take = min(size - count, len(batch))
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def _requests(table: pa.Table, job: Job) -> tuple[list[Request | None], list[str | None]]:
    """Requests for each row, or ``None`` with a reason for rows that cannot run."""
    absent = [None] * table.num_rows
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    requests: list[Request | None] = []
    problems: list[str | None] = []
    for i in range(table.num_rows):
        max_tokens = columns.get("max_tokens", absent)[i]
        temperature = columns.get("temperature", absent)[i]
        model = columns.get("model", absent)[i]
        body = columns[job.input_kind][i]
        problem = None
        if body is None:
            problem = f"{job.input_kind} is null"
        elif max_tokens is not None and max_tokens < 1:
            problem = f"max_tokens {max_tokens} is below 1"
        elif temperature is not None and not 0 <= temperature <= 5:
            problem = f"temperature {temperature} is outside [0, 5]"
        elif model is not None and model not in (job.model, os.path.basename(job.model)):
            problem = f"row asks for model {model!r}; this job runs {job.model!r}"
        if problem:
            requests.append(None)
            problems.append(problem)
            continue
        requests.append(
            Request(
                prompt=body if job.input_kind == "prompt" else None,
                messages=body if job.input_kind == "messages" else None,
                max_tokens=int(max_tokens) if max_tokens is not None else job.max_tokens,
                temperature=float(temperature) if temperature is not None else job.temperature,
            )
        )
        problems.append(None)
    return requests, problems


def _observe(backend: str, stats: transitions.CheckpointStats, seconds: float) -> None:
    metrics.ROWS.labels(backend, "ok").inc(stats.row_count - stats.rows_failed)
    metrics.ROWS.labels(backend, "error").inc(stats.rows_failed)
    metrics.TOKENS.labels(backend, "input").inc(stats.input_tokens)
    metrics.TOKENS.labels(backend, "output").inc(stats.output_tokens)
    metrics.COST_USD.labels(backend).inc(stats.cost_usd)
    metrics.CHECKPOINT_SECONDS.labels(backend).observe(seconds)


class ShardRunner:
    """Runs shards for one worker process with one engine per model."""

    def __init__(self, runtime: Runtime, stop: StopFlag | None = None, wid: str | None = None) -> None:
        self.runtime = runtime
        self.stop = stop if stop is not None else StopFlag()
        self.worker_id = wid or worker_id()

    def engine_for(self, model: str) -> Engine:
        from workers.hf_engine import load_engine

        w = self.runtime.settings.worker
        return load_engine(
            model, device=w.device, dtype=w.dtype, token_budget=w.token_budget, max_batch_rows=w.max_batch_rows
        )

    def run(self, task: RunShard) -> ShardStatus | None:
        """Run ``task``'s shard if this worker wins the claim; return its new status."""
        settings = self.runtime.settings
        pool = settings.pool(task.backend)
        with session_scope(self.runtime.engine) as session:
            claim = transitions.claim_shard(
                session, task.shard_id, self.worker_id, settings.worker.lease_seconds, task.backend
            )
            job = session.get(Job, task.job_id)
        if claim is None or job is None:
            log.info("shard %s is not claimable (already taken or finished)", task.shard_id)
            return None
        log.info(
            "shard %s (job %s, rows %d-%d) attempt %d, resuming at row %d",
            claim.shard_index, claim.job_id, claim.row_start, claim.row_end, claim.attempt,
            claim.row_start + claim.rows_done,
        )
        if claim.queued_at is not None:
            metrics.QUEUE_WAIT_SECONDS.labels(claim.backend).observe((utcnow() - claim.queued_at).total_seconds())
        beat = _Heartbeat(self.runtime, claim)
        beat.start()
        try:
            status = self._run_claimed(claim, job, pool.price_per_hour, beat)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return None
        except SpotlaneError as exc:
            status = self._end(claim, ShardStatus.FAILED, AttemptOutcome.FAILED, str(exc))
        except Exception as exc:
            log.exception("shard %s failed", claim.shard_id)
            status = self._end(
                claim, ShardStatus.FAILED, AttemptOutcome.FAILED, f"{exc.__class__.__name__}: {exc}"
            )
        finally:
            beat.stop()
        if status is not None:
            metrics.SHARDS.labels(claim.backend, status.value).inc()
        if status is not None and status.is_final:
            self._maybe_finalize(claim.job_id)
        return status

    def _end(self, claim: transitions.Claim, new: ShardStatus, outcome: AttemptOutcome, error: str | None = None) -> ShardStatus | None:
        with session_scope(self.runtime.engine) as session:
            if not transitions.end_shard(session, claim, new, outcome=outcome, error=error):
                return None
        return new

    def _run_claimed(self, claim: transitions.Claim, job: Job, price_per_hour: float, beat: _Heartbeat) -> ShardStatus | None:
        settings = self.runtime.settings
        engine = self.engine_for(job.model)
        columns = ["id", job.input_kind, *self._request_columns(job), *job.carried_columns]
        columns = list(dict.fromkeys(columns))
        start = claim.row_start + claim.rows_done
        first_row = start
        for chunk in _rechunk(
            iter_rows(job.input_url, start, claim.row_end, columns), settings.worker.checkpoint_rows
        ):
            if self.stop:
                log.info("stop requested: handing shard %s of job %s back at row %d", claim.shard_index, claim.job_id, first_row)
                return self._hand_back(claim)
            if beat.lost.is_set():
                raise LeaseLost(f"shard {claim.shard_id}: lease lost")
            started = time.perf_counter()
            out, stats = self._process(chunk, job, engine, claim, first_row, price_per_hour)
            write_parquet(out, stats.url)
            with session_scope(self.runtime.engine) as session:
                transitions.commit_checkpoint(session, claim, stats, settings.worker.lease_seconds)
            _observe(claim.backend, stats, time.perf_counter() - started)
            first_row += chunk.num_rows
        return self._end(claim, ShardStatus.DONE, AttemptOutcome.DONE)

    def _hand_back(self, claim: transitions.Claim) -> ShardStatus | None:
        """running -> preempted -> queued, and enqueue it again for the next worker."""
        from pipeline.router import RUN_SHARD

        if self._end(claim, ShardStatus.PREEMPTED, AttemptOutcome.PREEMPTED) is None:
            return None
        pool = self.runtime.settings.pool(claim.backend)
        with session_scope(self.runtime.engine) as session:
            ok = transitions.queue_shard(
                session, claim.shard_id, expected=(ShardStatus.PREEMPTED,), backend=claim.backend, queue=pool.queue
            )
        if ok:
            self.runtime.send(RUN_SHARD, RunShard(job_id=claim.job_id, shard_id=claim.shard_id, backend=claim.backend), pool.queue)
            return ShardStatus.QUEUED
        return ShardStatus.PREEMPTED

    @staticmethod
    def _request_columns(job: Job) -> list[str]:
        from pipeline.inputs import open_parquet

        names = open_parquet(job.input_url).schema_arrow.names
        return [c for c in ("max_tokens", "temperature", "model") if c in names]

    def _process(
        self, chunk: pa.Table, job: Job, engine: Engine, claim: transitions.Claim, first_row: int, price_per_hour: float
    ) -> tuple[pa.Table, transitions.CheckpointStats]:
        requests, problems = _requests(chunk, job)
        runnable = [r for r in requests if r is not None]
        generated = iter(engine.generate(runnable) if runnable else [])
        completions: list[Completion] = [
            next(generated) if r is not None else Completion.failed(p or "invalid row")
            for r, p in zip(requests, problems, strict=True)
        ]
        cost_per_second = price_per_hour / 3600.0
        model_name = engine.model
        rows: dict[str, list[Any]] = {
            "id": chunk.column("id").to_pylist(),
            "output": [c.output for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
            "input_tokens": [c.input_tokens for c in completions],
            "output_tokens": [c.output_tokens for c in completions],
            "backend": [claim.backend] * chunk.num_rows,
            "model": [model_name] * chunk.num_rows,
            "cost_usd": [c.compute_seconds * cost_per_second for c in completions],
            "latency_ms": [c.latency_ms for c in completions],
            "attempt": [claim.attempt] * chunk.num_rows,
            "error": [c.error for c in completions],
        }
        carried = chunk.select(job.carried_columns) if job.carried_columns else None
        schema = output_schema(carried.schema if carried is not None else None)
        arrays = [pa.array(rows[f.name], type=f.type) for f in OUTPUT_FIELDS]
        if carried is not None:
            arrays.extend(c.combine_chunks() for c in carried.columns)
        table = pa.Table.from_arrays(arrays, schema=schema)
        stats = transitions.CheckpointStats(
            first_row=first_row,
            row_count=chunk.num_rows,
            rows_failed=sum(1 for c in completions if c.error is not None),
            input_tokens=sum(c.input_tokens for c in completions),
            output_tokens=sum(c.output_tokens for c in completions),
            cost_usd=float(sum(rows["cost_usd"])),
            url=self.runtime.storage.part_url(claim.job_id, claim.shard_index, first_row),
        )
        return table, stats

    def _maybe_finalize(self, job_id: str) -> None:
        with session_scope(self.runtime.engine) as session:
            done = transitions.job_shards_final(session, job_id)
        if done:
            self.runtime.send("spotlane.finalize_job", FinalizeJob(job_id=job_id), self.runtime.settings.control_queue)


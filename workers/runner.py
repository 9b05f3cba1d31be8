"""Running one shard: claim, resume from the checkpoint, generate, commit, finish.

    claim (guarded UPDATE queued -> running, lease)        ── someone else has it? stop
    for each chunk of ``checkpoint_rows`` rows after the last commit:
        generate -> write part-<first_row>.parquet (hot tier) -> commit checkpoint row
    finish (running -> done) -> last shard? enqueue finalize

A part is written before its checkpoint row commits, and the commit is guarded by
the lease, so a worker that lost its shard can write a stray part but never make it
part of the results. A heartbeat thread keeps the lease alive. A stop request
(SIGTERM, warm shutdown) is honoured between chunks: chunks already generating
finish and commit, then the shard goes back to the queue. If the backend itself
fails (the model will not load, the provider is down), the shard goes back to the
router, which will not pick that backend for it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy import func, select
from collections import deque
from collections.abc import Iterator, Sequence

from pipeline import learning, metrics, transitions
from pipeline.db import session_scope
from pipeline.inputs import iter_rows, open_parquet
from pipeline.runtime import Runtime
from pipeline.storage import write_parquet
from schemas.backends import ApiProvider, GpuPool
from schemas.base import utcnow
from schemas.errors import LeaseLost, ModelError, ProviderError, SpotlaneError
from schemas.records import FinalizeJob, RouteJob, RunShard
from schemas.status import AttemptOutcome, JobStatus, ShardStatus
from schemas.tables import Job, Shard, ShardAttempt
from workers.chunks import Chunk, build_output, merge, prepare, rechunk
from workers.drain import StopFlag
from workers.engine import Completion, Request, stream
from workers.engines import engine_for

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


def _observe(backend: str, stats: transitions.CheckpointStats, seconds: float) -> None:
    metrics.ROWS.labels(backend, "ok").inc(stats.row_count - stats.rows_failed)
    metrics.ROWS.labels(backend, "error").inc(stats.rows_failed)
    metrics.TOKENS.labels(backend, "input").inc(stats.input_tokens)
    metrics.TOKENS.labels(backend, "output").inc(stats.output_tokens)
    metrics.COST_USD.labels(backend).inc(stats.cost_usd)
    metrics.CHECKPOINT_SECONDS.labels(backend).observe(seconds)


class ShardRunner:
    """Runs shards for one worker process."""

    def __init__(self, runtime: Runtime, stop: StopFlag | None = None, wid: str | None = None) -> None:
        self.runtime = runtime
        self.stop = stop if stop is not None else StopFlag()
        self.worker_id = wid or worker_id()

    def run(self, task: RunShard) -> ShardStatus | None:
        """Run ``task``'s shard if this worker wins the claim; return its new status."""
        settings = self.runtime.settings
        backend = settings.backend(task.backend)
        with session_scope(self.runtime.engine) as session:
            claim = transitions.claim_shard(
                session, task.shard_id, self.worker_id, settings.worker.lease_seconds, task.backend
            )
            job = session.get(Job, task.job_id)
            shard = session.get(Shard, task.shard_id)
            model = (shard.model if shard is not None else None) or (job.model if job else "")
        if claim is None or job is None:
            log.info("shard %s is not claimable (already taken or finished)", task.shard_id)
            return None
        log.info(
            "shard %s of job %s (rows %d-%d) attempt %d on %s, resuming at row %d",
            claim.shard_index, claim.job_id, claim.row_start, claim.row_end, claim.attempt, claim.backend,
            claim.row_start + claim.rows_done,
        )
        if claim.queued_at is not None:
            metrics.QUEUE_WAIT_SECONDS.labels(claim.backend).observe((utcnow() - claim.queued_at).total_seconds())
        beat = _Heartbeat(self.runtime, claim)
        beat.start()
        try:
            status = self._run_claimed(claim, job, backend, model, beat)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return None
        except (ModelError, ProviderError) as exc:
            log.warning("backend %s failed shard %s: %s", claim.backend, claim.shard_index, exc)
            status = self._reroute(claim, model, str(exc))
        except SpotlaneError as exc:
            status = self._end(claim, model, ShardStatus.FAILED, AttemptOutcome.FAILED, str(exc))
        except Exception as exc:
            log.exception("shard %s failed", claim.shard_id)
            status = self._end(claim, model, ShardStatus.FAILED, AttemptOutcome.FAILED,
                               f"{exc.__class__.__name__}: {exc}")
        finally:
            beat.stop()
        if status is not None:
            metrics.SHARDS.labels(claim.backend, status.value).inc()
        if status is not None and status.is_final:
            self._maybe_finalize(claim.job_id)
        return status

    def _end(self, claim: transitions.Claim, model: str, new: ShardStatus, outcome: AttemptOutcome,
             error: str | None = None) -> ShardStatus | None:
        with session_scope(self.runtime.engine) as session:
            if not transitions.end_shard(session, claim, new, outcome=outcome, error=error):
                return None
            learning.record_shard_end(session, claim.backend, model, outcome.value, self.runtime.settings.routing)
        return new

    def _reroute(self, claim: transitions.Claim, model: str, error: str) -> ShardStatus | None:
        """The backend failed the shard: back to the router, never to this backend again."""
        with session_scope(self.runtime.engine) as session:
            if not transitions.reroute_shard(session, claim, error):
                return None
            learning.record_shard_end(session, claim.backend, model, "failed", self.runtime.settings.routing)
        self.runtime.send("spotlane.route_job", RouteJob(job_id=claim.job_id), self.runtime.settings.control_queue)
        return ShardStatus.PENDING

    def _chunks(self, claim: transitions.Claim, job: Job, backend: GpuPool | ApiProvider,
                beat: _Heartbeat, pending: deque[Chunk]) -> Iterator[list[Request]]:
        """Requests chunk by chunk; stops feeding on a drain request or a lost lease."""
        names = open_parquet(job.input_url).schema_arrow.names
        requested = [c for c in ("max_tokens", "temperature", "model") if c in names]
        columns = list(dict.fromkeys(["id", job.input_kind, *requested, *job.carried_columns]))
        first_row = claim.row_start + claim.rows_done
        for table in rechunk(iter_rows(job.input_url, first_row, claim.row_end, columns),
                             self.runtime.settings.worker.checkpoint_rows):
            if self.stop or beat.lost.is_set() or self._cancelled(claim.job_id):
                return
            chunk = prepare(table, first_row, kind=job.input_kind, default_max_tokens=job.max_tokens,
                            default_temperature=job.temperature, serves=backend.serves)
            pending.append(chunk)
            first_row += table.num_rows
            yield chunk.runnable

    def _run_claimed(self, claim: transitions.Claim, job: Job, backend: GpuPool | ApiProvider, model: str,
                     beat: _Heartbeat) -> ShardStatus | None:
        settings = self.runtime.settings
        engine = engine_for(backend, model, settings.worker, job.task)
        usd_per_second = backend.price_per_hour / 3600.0 if isinstance(backend, GpuPool) else 0.0
        pending: deque[Chunk] = deque()
        done_to = claim.row_start + claim.rows_done
        started = time.perf_counter()
        for generated in stream(engine, self._chunks(claim, job, backend, beat, pending)):
            chunk = pending.popleft()
            log.info("generated rows %d-%d of shard %s (job %s)", chunk.first_row, chunk.first_row + chunk.table.num_rows,
                     claim.shard_index, claim.job_id)
            completions = merge(chunk, generated)
            table, cost = build_output(chunk, completions, backend=claim.backend, model=model, attempt=claim.attempt,
                                       usd_per_second=usd_per_second, carried=job.carried_columns,
                                       embed=job.task == "embed")
            stats = transitions.CheckpointStats(
                first_row=chunk.first_row,
                row_count=table.num_rows,
                rows_failed=sum(1 for c in completions if c.error is not None),
                input_tokens=sum(c.input_tokens for c in completions),
                output_tokens=sum(c.output_tokens for c in completions),
                cost_usd=cost,
                url=self.runtime.storage.part_url(claim.job_id, claim.shard_index, chunk.first_row),
            )
            write_parquet(table, stats.url, self.runtime.storage.storage_class("hot"))
            with session_scope(self.runtime.engine) as session:
                transitions.commit_checkpoint(session, claim, stats, settings.worker.lease_seconds)
            seconds, started = time.perf_counter() - started, time.perf_counter()
            _observe(claim.backend, stats, seconds)
            self._learn(claim.backend, model, chunk, completions, stats, seconds, isinstance(backend, ApiProvider))
            done_to = chunk.first_row + table.num_rows
        if beat.lost.is_set():
            raise LeaseLost(f"shard {claim.shard_id}: lease lost")
        if done_to < claim.row_end and self._cancelled(claim.job_id):
            log.info("job %s cancelled: shard %s stops at row %d", claim.job_id, claim.shard_index, done_to)
            with session_scope(self.runtime.engine) as session:
                transitions.end_shard(session, claim, ShardStatus.PENDING, outcome=AttemptOutcome.PREEMPTED,
                                      error="job cancelled")
            return ShardStatus.PENDING
        if done_to < claim.row_end:
            log.info("stop requested: handing shard %s of job %s back at row %d", claim.shard_index, claim.job_id, done_to)
            return self._hand_back(claim, model)
        return self._end(claim, model, ShardStatus.DONE, AttemptOutcome.DONE)

    def _learn(self, backend: str, model: str, chunk: Chunk, completions: Sequence[Completion],
               stats: transitions.CheckpointStats, seconds: float, is_api: bool) -> None:
        ok = [c for c in completions if c.error is None]
        try:
            with session_scope(self.runtime.engine) as session:
                learning.record_checkpoint(
                    session, backend, model, self.runtime.settings.routing,
                    rows=stats.row_count, rows_failed=stats.rows_failed, prompt_chars=chunk.prompt_chars,
                    input_tokens=sum(c.input_tokens for c in ok), output_tokens=sum(c.output_tokens for c in ok),
                    max_tokens=chunk.max_tokens, seconds=0.0 if is_api else seconds,
                    requests_latency=(sum(c.latency_ms for c in ok) / len(ok) / 1000.0) if (is_api and ok) else None,
                )
        except Exception:  # learning is advisory; never fail a shard over it
            log.warning("could not record backend statistics", exc_info=True)

    def _hand_back(self, claim: transitions.Claim, model: str) -> ShardStatus | None:
        """running -> preempted -> queued, and enqueue it again for the next worker."""
        from pipeline.router import RUN_SHARD

        if self._end(claim, model, ShardStatus.PREEMPTED, AttemptOutcome.PREEMPTED) is None:
            return None
        settings = self.runtime.settings
        with session_scope(self.runtime.engine) as session:
            preempted = session.execute(
                select(func.count()).select_from(ShardAttempt).where(
                    ShardAttempt.shard_id == claim.shard_id,
                    ShardAttempt.outcome.in_((AttemptOutcome.PREEMPTED, AttemptOutcome.LOST)),
                )
            ).scalar_one()
            rerouted = preempted >= settings.routing.max_preemptions and transitions.back_to_router(session, claim.shard_id)
        if rerouted:
            log.info("shard %s preempted %d times: back to the router", claim.shard_index, preempted)
            self.runtime.send("spotlane.route_job", RouteJob(job_id=claim.job_id), settings.control_queue)
            return ShardStatus.PENDING
        queue = settings.backend(claim.backend).queue
        with session_scope(self.runtime.engine) as session:
            ok = transitions.queue_shard(
                session, claim.shard_id, expected=(ShardStatus.PREEMPTED,), backend=claim.backend, queue=queue
            )
        if ok:
            self.runtime.send(RUN_SHARD, RunShard(job_id=claim.job_id, shard_id=claim.shard_id, backend=claim.backend), queue)
            return ShardStatus.QUEUED
        return ShardStatus.PREEMPTED

    def _cancelled(self, job_id: str) -> bool:
        with session_scope(self.runtime.engine) as session:
            return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one() is JobStatus.CANCELLED

    def _maybe_finalize(self, job_id: str) -> None:
        with session_scope(self.runtime.engine) as session:
            done = transitions.job_shards_final(session, job_id)
        if done:
            self.runtime.send("spotlane.finalize_job", FinalizeJob(job_id=job_id), self.runtime.settings.control_queue)

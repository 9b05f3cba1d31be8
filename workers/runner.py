"""Running one shard: claim, resume from the checkpoint, generate, commit, finish.

    claim (guarded UPDATE queued -> running on this backend and attempt, lease)   someone else has it? stop
    check the input is the file validated at submit (size, ETag or mtime)
    for each chunk after the last commit (``checkpoint_rows`` rows, growing to ~``checkpoint_seconds`` of work):
        budget: the shard's reservation covers the chunk's worst case (under the job lock)
        generate -> write part-<first_row>-a<attempt>-<token>.parquet (hot tier) -> commit (fenced)
    finish (running -> done) -> last shard? enqueue finalize; pending shards left? route

Fencing: a part's name is new for every write, and the commit is guarded by the
shard's owner and attempt, so a worker that lost its lease (frozen past it, cut
off from the database) writes only parts nobody will read, never over a part
another attempt committed; the finalizer checks every part it reads anyway.

A heartbeat thread keeps the lease alive while chunks make progress. A chunk that
makes none for far longer than its estimate is a hung engine: the heartbeat stops
renewing and hands the shard back itself (and ``on_hung`` may end the process).

A stop request (SIGTERM, warm shutdown, a spot notice) is honoured between chunks:
chunks already generating finish and commit, then the shard goes back to the
queue. A storage or database fault while committing is retried for
``worker.transient_retry_seconds``, then the shard is handed back, not failed. If
the backend itself fails (the model will not load, the provider is down or refuses
the key), the shard goes back to the router, which will not pick that backend for
it again. If the budget cannot cover the next chunk, the shard is parked: back to
the router, which blocks it and pauses the job if nothing else of the job runs.

A shard on a provider's batch lane is claimed the same way and handed to the
provider (``workers.batch_lane``): submitted, it stays running under the provider's
lease, and the worker is free.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from pipeline import metrics
from pipeline.routing import observations as learning
from pipeline.runtime import Runtime
from pipeline.storage.inputs import RowReader, check_identity
from pipeline.store import claims, transitions
from pipeline.store.db import is_transient, session_scope
from pipeline.store.identity import owner_id
from schemas.backends import ApiProvider, Backend, GpuPool, ProviderBatchLane
from schemas.base import utcnow
from schemas.errors import (
    ConfigError,
    InputChanged,
    LeaseLost,
    ModelError,
    ProviderError,
    SpotlaneError,
    TransientError,
)
from schemas.records import RunShard
from schemas.status import AttemptOutcome, ShardStatus
from schemas.tables import Job, Shard
from workers import checkpoint
from workers.drain import StopFlag
from workers.engines.base import Completion, stream
from workers.engines.chunks import Chunk, build_output, merge
from workers.engines.factory import engine_for
from workers.feed import Feed, feed_chunks, input_columns
from workers.heartbeat import Heartbeat

__all__ = ["ShardRunner"]

log = logging.getLogger(__name__)


class ShardRunner:
    """Runs shards for one worker process.

    ``on_hung``: called (from the heartbeat thread) after a hung engine's shard was
    handed back; a worker process ends itself there, since a hung GPU context does
    not come back.
    """

    def __init__(
        self,
        runtime: Runtime,
        stop: StopFlag | None = None,
        wid: str | None = None,
        on_hung: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.stop = stop if stop is not None else StopFlag()
        self.worker_id = wid or owner_id()
        self.on_hung = on_hung
        #: The chunk size learnt on each (backend, model), carried from shard to shard.
        self._chunk_rows: dict[tuple[str, str], int] = {}
        #: The last input read, kept open for the next shard of the same job.
        self._reader: RowReader | None = None
        self._reader_job = ""

    def run(self, task: RunShard) -> ShardStatus | None:
        """Run ``task``'s shard if this worker wins the claim; return its new status."""
        settings = self.runtime.settings
        try:
            backend = settings.backend(task.backend)
        except ConfigError:
            log.warning("a task for backend %r, which this worker's config does not have: skipped", task.backend)
            return None
        if isinstance(backend, GpuPool) and backend.engine == "server":
            from workers.engines.server import wait_healthy

            if not wait_healthy(backend.server_url, backend.server_start_seconds):
                # Not claimed: the shard stays queued and the reaper sends it again.
                log.warning(
                    "pool %s: its server at %s is not healthy; shard %s left queued",
                    backend.name,
                    backend.server_url,
                    task.shard_id,
                )
                return None
        with session_scope(self.runtime.engine) as session:
            claim = claims.claim_shard(
                session, task.shard_id, self.worker_id, settings.worker.lease_seconds, task.backend, task.attempt
            )
            job = session.get(Job, task.job_id)
            shard = session.get(Shard, task.shard_id)
            model = (shard.model if shard is not None else None) or (job.model if job else "")
            est_seconds, rows = (shard.est_seconds, shard.rows_total) if shard is not None else (0.0, 1)
        if claim is None or job is None:
            log.info(
                "shard %s is not claimable (already taken, finished, or sent for another backend or attempt)",
                task.shard_id,
            )
            return None
        log.info(
            "shard %s of job %s (rows %d-%d) attempt %d on %s, resuming at row %d",
            claim.shard_index,
            claim.job_id,
            claim.row_start,
            claim.row_end,
            claim.attempt,
            claim.backend,
            claim.row_start + claim.rows_done,
        )
        if claim.queued_at is not None:
            metrics.QUEUE_WAIT_SECONDS.labels(claim.backend).observe((utcnow() - claim.queued_at).total_seconds())
        beat = Heartbeat(self.runtime, claim, lambda: self._hung(claim, model))
        beat.start()
        per_row = est_seconds / max(rows, 1)

        def hang_after(chunk_rows: int) -> float:
            """How long a chunk of ``chunk_rows`` rows may go without a commit."""
            return max(settings.worker.hang_min_seconds, settings.worker.hang_factor * per_row * chunk_rows * 2)

        try:
            status = self._run_claimed(claim, job, backend, model, beat, hang_after)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return None
        except TransientError as exc:
            log.warning("shard %s of job %s: %s; handing it back", claim.shard_index, claim.job_id, exc)
            status = self._hand_back(claim, model, f"transient fault: {exc}", learn=False)
        except InputChanged as exc:
            status = self._end(claim, model, ShardStatus.FAILED, AttemptOutcome.FAILED, str(exc), learn=False)
        except (ModelError, ProviderError) as exc:
            log.warning("backend %s failed shard %s: %s", claim.backend, claim.shard_index, exc)
            status = self._reroute(claim, model, str(exc))
        except SpotlaneError as exc:
            status = self._end(claim, model, ShardStatus.FAILED, AttemptOutcome.FAILED, str(exc))
        except Exception as exc:
            if is_transient(exc):
                log.warning("shard %s of job %s: %s; handing it back", claim.shard_index, claim.job_id, exc)
                status = self._hand_back(claim, model, f"transient fault: {exc.__class__.__name__}", learn=False)
            else:
                log.exception("shard %s failed", claim.shard_id)
                status = self._end(
                    claim, model, ShardStatus.FAILED, AttemptOutcome.FAILED, f"{exc.__class__.__name__}: {exc}"
                )
        finally:
            beat.stop()
        if status is not None:
            metrics.SHARDS.labels(claim.backend, status.value).inc()
        if status is not None and (status.is_final or status is ShardStatus.PENDING):
            self._after_end(claim.job_id)
        return status

    # -- the shard's chunks ----------------------------------------------------------

    def _stats(self, backend: str, model: str) -> learning.Observed | None:
        with session_scope(self.runtime.engine) as session:
            return learning.observed(session, backend, model)

    def _run_claimed(
        self,
        claim: claims.Claim,
        job: Job,
        backend: Backend,
        model: str,
        beat: Heartbeat,
        hang_after: Callable[[int], float],
    ) -> ShardStatus | None:
        settings = self.runtime.settings
        check_identity(job.input_url, job.input_identity)
        if isinstance(backend, ProviderBatchLane):  # submitted, then the provider's: no slot waits
            from workers.batch_lane import submit

            return submit(self.runtime, claim, job, backend, model, beat)
        engine = engine_for(backend, model, settings.worker, job.task)
        feed = Feed(
            chunk_rows=self._chunk_rows.get((claim.backend, model), 0) or settings.worker.checkpoint_rows,
            reader=self._reader_of(job),
        )
        beat.progress(hang_after(feed.chunk_rows))  # the model is loaded: from now on, chunks must progress
        usd_per_second = backend.price_per_hour / 3600.0 if isinstance(backend, GpuPool) else 0.0
        pending: deque[tuple[Chunk, float]] = deque()
        answered: dict[str, Completion] = {}  # fingerprint -> answer, for the shard's repeats
        done_to = claim.row_start + claim.rows_done
        started = time.perf_counter()
        for generated in stream(
            engine,
            feed_chunks(
                self.runtime,
                self.stop,
                claim,
                job,
                backend,
                beat,
                pending,
                feed,
                self._stats(claim.backend, job.model),
                model,
            ),
            stopped=lambda: bool(self.stop),
        ):
            chunk, _ = pending.popleft()
            log.info(
                "generated rows %d-%d of shard %s (job %s)",
                chunk.first_row,
                chunk.first_row + chunk.table.num_rows,
                claim.shard_index,
                claim.job_id,
            )
            completions = merge(chunk, generated, answered, usd_per_second)
            table, cost = build_output(
                chunk,
                completions,
                backend=claim.backend,
                model=model,
                attempt=claim.attempt,
                usd_per_second=usd_per_second,
                carried=job.carried_columns,
                embed=job.task == "embed",
            )
            stats = checkpoint.stats_of(self.runtime, claim, chunk, completions, table, cost)
            checkpoint.persist(self.runtime, claim, table, stats, beat)
            if stats.rows_cached:
                metrics.CACHE_ROWS.labels(claim.backend).inc(stats.rows_cached)
            seconds, started = time.perf_counter() - started, time.perf_counter()
            read_ahead = feed.chunk_rows  # the size the chunk in flight was read at
            feed.learn(len(chunk.runnable), seconds, settings.worker)  # rows the engine ran, not the cache
            self._chunk_rows[(claim.backend, model)] = feed.chunk_rows
            beat.progress(hang_after(max(read_ahead, feed.chunk_rows)))
            metrics.observe_checkpoint(
                claim.backend,
                stats.row_count,
                stats.rows_failed,
                stats.input_tokens,
                stats.output_tokens,
                stats.cost_usd,
                seconds,
            )
            checkpoint.learn(
                self.runtime, claim.backend, model, chunk, completions, stats, seconds, isinstance(backend, ApiProvider)
            )
            checkpoint.remember(self.runtime, job, chunk, completions, model, usd_per_second)
            done_to = chunk.first_row + table.num_rows
        if beat.lost.is_set():
            raise LeaseLost(f"shard {claim.shard_index} of job {claim.job_id}: lease lost")
        if done_to >= claim.row_end:
            return self._end(claim, model, ShardStatus.DONE, AttemptOutcome.DONE)
        if feed.exhausted:
            raise InputChanged(
                f"the input {job.input_url} ends at row {feed.fed_to}, but shard {claim.shard_index} "
                f"covers rows up to {claim.row_end}: it changed since the job was submitted"
            )
        if feed.stopped == claims.ChunkVerdict.CANCELLED.value:
            log.info("job %s cancelled: shard %s stops at row %d", claim.job_id, claim.shard_index, done_to)
            return self._end(claim, model, ShardStatus.PENDING, AttemptOutcome.PREEMPTED, "job cancelled", learn=False)
        if feed.stopped == claims.ChunkVerdict.NO_BUDGET.value:
            log.warning(
                "job %s: the budget cannot cover the next chunk of shard %s; parked at row %d",
                claim.job_id,
                claim.shard_index,
                done_to,
            )
            return self._end(
                claim,
                model,
                ShardStatus.PENDING,
                AttemptOutcome.PARKED,
                "parked: the budget cannot cover its next chunk",
                learn=False,
            )
        if feed.stopped == claims.ChunkVerdict.LOST.value:
            raise LeaseLost(f"shard {claim.shard_index} of job {claim.job_id}: lease lost")
        log.info("stop requested: handing shard %s of job %s back at row %d", claim.shard_index, claim.job_id, done_to)
        return self._hand_back(claim, model, None)

    # -- ending a shard ----------------------------------------------------------------

    def _end(
        self,
        claim: claims.Claim,
        model: str,
        new: ShardStatus,
        outcome: AttemptOutcome,
        error: str | None = None,
        *,
        learn: bool = True,
    ) -> ShardStatus | None:
        try:
            with session_scope(self.runtime.engine) as session:
                if not claims.end_shard(session, claim, new, outcome=outcome, error=error):
                    return None
                if learn:
                    learning.record_shard_end(
                        session, claim.backend, model, outcome.value, self.runtime.settings.routing
                    )
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning(
                "could not end shard %s (%s); its lease runs out and the reaper queues it again",
                claim.shard_index,
                exc.__class__.__name__,
            )
            return None
        return new

    def _reroute(self, claim: claims.Claim, model: str, error: str) -> ShardStatus | None:
        """The backend failed the shard: back to the router, never to this backend again."""
        with session_scope(self.runtime.engine) as session:
            if not claims.reroute_shard(session, claim, error):
                return None
            learning.record_shard_end(session, claim.backend, model, "failed", self.runtime.settings.routing)
        return ShardStatus.PENDING

    def _hand_back(
        self,
        claim: claims.Claim,
        model: str,
        error: str | None,
        *,
        learn: bool = True,
        outcome: AttemptOutcome = AttemptOutcome.PREEMPTED,
    ) -> ShardStatus | None:
        """running -> preempted -> queued on the same backend (one transaction), and send it
        again; a shard preempted ``routing.max_preemptions`` times goes back to the router."""
        settings = self.runtime.settings
        try:
            with session_scope(self.runtime.engine) as session:
                ended, record = claims.hand_back(
                    session,
                    claim,
                    outcome=outcome,
                    error=error,
                    max_preemptions=settings.routing.max_preemptions,
                    queue=settings.backend(claim.backend).queue,
                )
                if not ended:
                    return None
                if learn:
                    learning.record_shard_end(session, claim.backend, model, outcome.value, settings.routing)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning(
                "could not hand shard %s back (%s); its lease runs out and the reaper queues it again",
                claim.shard_index,
                exc.__class__.__name__,
            )
            return None
        if record is None:
            self.runtime.send_route(claim.job_id)
            return ShardStatus.PENDING
        self.runtime.send_run(record)
        return ShardStatus.QUEUED

    def _reader_of(self, job: Job) -> RowReader:
        """A reader of the job's input: the one kept from the last shard if it was this job's
        (its columns are the job's: no second look at the file's footer)."""
        if self._reader is None or self._reader_job != job.id or self._reader.url != job.input_url:
            self._reader, self._reader_job = RowReader(job.input_url, input_columns(job)), job.id
        return self._reader

    def _hung(self, claim: claims.Claim, model: str) -> None:
        """From the heartbeat thread: the engine is hung. Hand the shard back (the
        stuck chunk, if it ever returns, fails its fenced commit) and let the process go."""
        self._chunk_rows.pop((claim.backend, model), None)  # the next attempt starts from small parts again
        try:
            self._hand_back(
                claim, model, "engine hung: no progress past its deadline", learn=True, outcome=AttemptOutcome.LOST
            )
        except Exception:
            log.exception("could not hand back the hung shard %s; its lease runs out", claim.shard_index)
        if self.on_hung is not None:
            self.on_hung()

    def _after_end(self, job_id: str) -> None:
        """Last shard? Finalize. Shards waiting for the router (budget headroom came back,
        a parked shard)? Route (the router blocks them if the job is paused)."""
        with session_scope(self.runtime.engine) as session:
            done = transitions.job_shards_final(session, job_id)
            waiting = not done and transitions.shards_waiting_for_router(session, job_id)
        if done:
            self.runtime.send_finalize(job_id)
        elif waiting:
            self.runtime.send_route(job_id)

"""Routing: give each pending shard to the cheapest backend that serves its model.

For every shard the router prices the work on each GPU pool that serves the job's
model (tokens estimated from the input file's footer, throughput from the pool's
prior), reserves that estimate in the cost ledger and marks the shard queued on the
pool's queue, in one transaction per shard; the caller sends the run tasks after
the commit. If the job has a budget and the reservation would take spent +
reserved past it, the shard is ``blocked`` and the job ``paused``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline import transitions
from pipeline.db import session_scope
from pipeline.runtime import Runtime
from schemas.records import RunShard
from schemas.settings import GpuPool
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import CostLedgerEntry, Job, Shard

__all__ = ["Quote", "committed_usd", "quote", "route_job"]

RUN_SHARD = "spotlane.run_shard"


@dataclass(frozen=True)
class Quote:
    backend: str
    queue: str
    cost_usd: float
    seconds: float


def quote(job: Job, rows: int, pool: GpuPool) -> Quote:
    """Estimated cost and time of ``rows`` rows of ``job`` on one worker of ``pool``."""
    tokens = rows * (job.est_prompt_tokens * 0.1 + job.max_tokens)
    seconds = tokens / pool.tokens_per_second
    # A preempted run redoes on average half a checkpoint interval; price it in.
    seconds *= 1.0 + pool.preemption_rate * 0.5
    return Quote(pool.name, pool.queue, seconds / 3600.0 * pool.price_per_hour, seconds)


def committed_usd(runtime: Runtime, job_id: str) -> float:
    """Spent plus still-reserved USD of a job, from the ledger."""
    with session_scope(runtime.engine) as session:
        return _committed(session, job_id)


def route_job(runtime: Runtime, job_id: str) -> int:
    """Route every pending shard of ``job_id``; return how many were queued."""
    pools = runtime.settings.gpu_pools
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None or job.status.is_final or job.status is JobStatus.PAUSED:
            return 0
        candidates = [p for p in pools if p.serves(job.model)]
        if not candidates:
            transitions.set_job_status(
                session,
                job_id,
                JobStatus.FAILED,
                expected=(JobStatus.PENDING, JobStatus.RUNNING),
                error=f"no backend serves model {job.model!r} (see gpu_pools in the config)",
            )
            return 0
        shards = session.execute(
            select(Shard.id, Shard.row_start, Shard.row_end)
            .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
            .order_by(Shard.shard_index)
        ).all()
        budget = job.budget_usd
    queued = 0
    for shard_id, start, end in shards:
        with session_scope(runtime.engine) as session:
            job = session.get(Job, job_id)
            if job is None or job.status.is_final or job.status is JobStatus.PAUSED:
                break
            best = min((quote(job, end - start, p) for p in candidates), key=lambda q: q.cost_usd)
            if budget is not None and _committed(session, job_id) + best.cost_usd > budget + 1e-9:
                transitions.block_shard(session, shard_id)
                transitions.set_job_status(
                    session,
                    job_id,
                    JobStatus.PAUSED,
                    expected=(JobStatus.PENDING, JobStatus.RUNNING),
                    error=f"budget ${budget:.4f} cannot cover the next shard",
                )
                break
            if not transitions.queue_shard(
                session, shard_id, expected=(ShardStatus.PENDING,), backend=best.backend, queue=best.queue
            ):
                continue
            session.add(
                CostLedgerEntry(
                    job_id=job_id,
                    shard_id=shard_id,
                    backend=best.backend,
                    kind=LedgerKind.RESERVE,
                    amount_usd=best.cost_usd,
                )
            )
            transitions.set_job_status(session, job_id, JobStatus.RUNNING, expected=(JobStatus.PENDING,))
        # Sent after the commit: a worker never sees a task its shard row does not back.
        runtime.send(RUN_SHARD, RunShard(job_id=job_id, shard_id=shard_id, backend=best.backend), best.queue)
        queued += 1
    return queued


def _committed(session: Session, job_id: str) -> float:
    return float(
        session.execute(
            select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
                CostLedgerEntry.job_id == job_id
            )
        ).scalar_one()
    )

"""What the job store says right now, as gauges for Prometheus (``pipeline.metrics``).

Read in one transaction per scrape. Jobs not yet finished only, so the number of
series stays bounded by the jobs running; backends, queues and lanes by the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.store import batches, presence
from schemas.backends import GpuPool
from schemas.settings import Settings
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import BackendStats, Checkpoint, CostLedgerEntry, Job, ProviderBatch, Shard

__all__ = ["Gauge", "read_gauges"]


@dataclass
class Gauge:
    name: str
    help: str
    labels: list[str]
    samples: list[tuple[list[str], float]] = field(default_factory=list)


def read_gauges(session: Session, settings: Settings, now: datetime) -> list[Gauge]:
    open_jobs = (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.FINALIZING)
    rows = Gauge(
        "spotlane_job_rows", "Rows of a job not finished yet, by state (total, done, failed).", ["job", "state"]
    )
    budget = Gauge("spotlane_job_budget_usd", "A job's budget, USD (jobs with one).", ["job"])
    spent = Gauge("spotlane_job_spent_usd", "What a job was charged so far, USD.", ["job"])
    committed = Gauge("spotlane_job_committed_usd", "What a job was charged and still holds reserved, USD.", ["job"])
    quiet = Gauge(
        "spotlane_job_seconds_since_progress",
        "Seconds since a running job last committed a part (or started).",
        ["job"],
    )
    paused = Gauge("spotlane_job_paused", "1 while a job is paused (budget, or by hand).", ["job"])
    jobs = session.execute(
        select(Job.id, Job.status, Job.rows_total, Job.budget_usd, Job.started_at, Job.created_at).where(
            Job.status.in_(open_jobs)
        )
    ).all()
    ids = [j.id for j in jobs]
    done = dict(
        session.execute(
            select(Shard.job_id, func.sum(Shard.rows_done)).where(Shard.job_id.in_(ids)).group_by(Shard.job_id)
        ).all()
    )
    failed = dict(
        session.execute(
            select(Shard.job_id, func.sum(Shard.rows_failed)).where(Shard.job_id.in_(ids)).group_by(Shard.job_id)
        ).all()
    )
    ledger = {
        (job_id, kind): float(amount)
        for job_id, kind, amount in session.execute(
            select(CostLedgerEntry.job_id, CostLedgerEntry.kind, func.sum(CostLedgerEntry.amount_usd))
            .where(CostLedgerEntry.job_id.in_(ids))
            .group_by(CostLedgerEntry.job_id, CostLedgerEntry.kind)
        ).all()
    }
    last = dict(
        session.execute(
            select(Shard.job_id, func.max(Checkpoint.created_at))
            .join(Checkpoint, Checkpoint.shard_id == Shard.id)
            .where(Shard.job_id.in_(ids))
            .group_by(Shard.job_id)
        ).all()
    )
    for job in jobs:
        rows.samples += [
            ([job.id, "total"], float(job.rows_total)),
            ([job.id, "done"], float(done.get(job.id) or 0)),
            ([job.id, "failed"], float(failed.get(job.id) or 0)),
        ]
        if job.budget_usd is not None:
            budget.samples.append(([job.id], float(job.budget_usd)))
        charged = ledger.get((job.id, LedgerKind.CHARGE), 0.0)
        spent.samples.append(([job.id], charged))
        committed.samples.append(([job.id], sum(v for (j, _), v in ledger.items() if j == job.id)))
        paused.samples.append(([job.id], 1.0 if job.status is JobStatus.PAUSED else 0.0))
        if job.status is JobStatus.RUNNING:
            since = last.get(job.id) or job.started_at or job.created_at
            quiet.samples.append(([job.id], max(0.0, (now - since).total_seconds())))

    cooling = Gauge(
        "spotlane_backend_cooling", "1 while a backend is cooled down after repeated failures.", ["backend"]
    )
    observed = Gauge(
        "spotlane_backend_preemption_rate", "A GPU pool's observed share of shard runs preempted or lost.", ["backend"]
    )
    prior = Gauge("spotlane_backend_preemption_prior", "A GPU pool's configured preemption rate.", ["backend"])
    stats = session.execute(
        select(BackendStats.backend, BackendStats.cooldown_until, BackendStats.preemption_rate)
    ).all()
    for backend in settings.backends:
        mine = [s for s in stats if s.backend == backend.name]
        hot = any(s.cooldown_until is not None and s.cooldown_until > now for s in mine)
        cooling.samples.append(([backend.name], 1.0 if hot else 0.0))
        if isinstance(backend, GpuPool):
            rates = [s.preemption_rate for s in mine if s.preemption_rate is not None]
            prior.samples.append(([backend.name], backend.preemption_rate))
            if rates:
                observed.samples.append(([backend.name], max(rates)))

    waiting = Gauge(
        "spotlane_queue_waiting_shards", "Shards queued in SQL for a queue, waiting for a worker.", ["queue"]
    )
    consumers = Gauge("spotlane_queue_consumers", "Live workers consuming a queue (the workers table).", ["queue"])
    queued = dict(
        session.execute(
            select(Shard.queue, func.count()).where(Shard.status == ShardStatus.QUEUED).group_by(Shard.queue)
        ).all()
    )
    for queue in settings.queues:
        waiting.samples.append(([queue], float(queued.get(queue, 0))))
        consumers.samples.append(
            ([queue], float(presence.consumers_in(session, queue, settings.worker.reap_interval_seconds)))
        )

    lanes = Gauge("spotlane_provider_batches_open", "Provider batches open at a batch lane.", ["backend"])
    open_batches = dict(
        session.execute(
            select(ProviderBatch.backend, func.count())
            .where(ProviderBatch.status.in_(batches.OPEN))
            .group_by(ProviderBatch.backend)
        ).all()
    )
    for lane in settings.batch_lanes:
        lanes.samples.append(([lane.name], float(open_batches.get(lane.name, 0))))
    return [rows, budget, spent, committed, quiet, paused, cooling, observed, prior, waiting, consumers, lanes]

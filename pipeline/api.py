"""The Python API: what the CLI wraps, for notebooks and orchestrators.

    from pipeline import Runtime, submit, job_status
    rt = Runtime.open()
    job_id = submit(rt, "prompts.parquet", model="./tiny-model")
    print(job_status(rt, job_id).status)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.parquet as pq
from sqlalchemy import select, text

from pipeline import producer
from pipeline.db import session_scope
from pipeline.runtime import Runtime
from pipeline.inputs import canonical_url
from pipeline.storage import filesystem, open_new, read_manifest
from schemas.errors import NotFound, StoreError
from schemas.status import JobStatus
from schemas.tables import JOB_PROGRESS_VIEW, Job, Shard

__all__ = ["JobReport", "ResultsInfo", "export_results", "job_status", "list_jobs", "results", "submit"]


def submit(
    runtime: Runtime,
    input_url: str,
    model: str | list[str],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    rows_per_shard: int | None = None,
    budget_usd: float | None = None,
    deadline: datetime | None = None,
    tags: dict[str, Any] | None = None,
    task: str = "generate",
) -> str:
    """Validate ``input_url``, create the job and enqueue it; return the job id."""
    return producer.submit(
        runtime,
        producer.JobRequest(
            input_url=input_url,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            rows_per_shard=rows_per_shard,
            budget_usd=budget_usd,
            deadline=deadline,
            tags=tags or {},
            task=task,
        ),
    )


@dataclass
class JobReport:
    """A job's row, its ``job_progress`` line and its shards."""

    job_id: str
    status: str
    model: str
    input_url: str
    rows_total: int
    rows_done: int
    rows_failed: int
    shards_total: int
    shards_done: int
    shards_running: int
    shards_waiting: int
    shards_failed: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    percent_done: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    result_url: str | None
    error: str | None
    shards: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        return JobStatus(self.status).is_final

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def job_status(runtime: Runtime, job_id: str, *, with_shards: bool = True) -> JobReport:
    """The job's current state, read from SQL (the ``job_progress`` view)."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        progress = session.execute(
            text(f"SELECT * FROM {JOB_PROGRESS_VIEW} WHERE job_id = :id"), {"id": job_id}
        ).mappings().one()
        shards: list[dict[str, Any]] = []
        if with_shards:
            for shard in session.execute(
                select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)
            ).scalars():
                shards.append(
                    {
                        "shard": shard.shard_index,
                        "status": shard.status.value,
                        "rows": shard.rows_total,
                        "rows_done": shard.rows_done,
                        "rows_failed": shard.rows_failed,
                        "backend": shard.backend,
                        "attempts": shard.attempts,
                        "error": shard.error,
                    }
                )
        return JobReport(
            job_id=job.id,
            status=job.status.value,
            model=job.model,
            input_url=job.input_url,
            rows_total=job.rows_total,
            rows_done=int(progress["rows_done"]),
            rows_failed=int(progress["rows_failed"]),
            shards_total=int(progress["shards_total"]),
            shards_done=int(progress["shards_done"]),
            shards_running=int(progress["shards_running"]),
            shards_waiting=int(progress["shards_waiting"]),
            shards_failed=int(progress["shards_failed"]),
            input_tokens=int(progress["input_tokens"]),
            output_tokens=int(progress["output_tokens"]),
            cost_usd=float(progress["cost_usd"]),
            percent_done=float(progress["percent_done"]),
            created_at=_iso(job.created_at) or "",
            started_at=_iso(job.started_at),
            finished_at=_iso(job.finished_at),
            result_url=job.result_url,
            error=job.error,
            shards=shards,
        )


def list_jobs(runtime: Runtime, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
    """The newest jobs first, one dict per job."""
    with session_scope(runtime.engine) as session:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            query = query.where(Job.status == JobStatus(status))
        jobs = session.execute(query).scalars().all()
        return [
            {
                "job_id": job.id,
                "status": job.status.value,
                "model": job.model,
                "rows": job.rows_total,
                "rows_failed": job.rows_failed,
                "created_at": _iso(job.created_at),
                "finished_at": _iso(job.finished_at),
                "result_url": job.result_url,
            }
            for job in jobs
        ]


@dataclass(frozen=True)
class ResultsInfo:
    job_id: str
    status: str
    url: str
    manifest: dict[str, Any]
    #: "warm" or "cold": the tier the results are in now.
    tier: str = "warm"

    @property
    def files(self) -> list[str]:
        return [f"{self.url}/{entry['name']}" for entry in self.manifest["files"]]


def results(runtime: Runtime, job_id: str) -> ResultsInfo:
    """Where a finished job's results are, with their manifest."""
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (see `spotlane jobs`)")
        if job.results_deleted_at is not None:
            raise StoreError(
                f"job {job_id}'s results were deleted on {job.results_deleted_at:%Y-%m-%d} "
                "(past storage.retention_days)"
            )
        if job.result_url is None:
            raise StoreError(f"job {job_id} has no results yet (status: {job.status.value})")
        url, status, tier = job.result_url, job.status.value, job.result_tier or "warm"
    return ResultsInfo(job_id, status, url, read_manifest(url), tier)


def export_results(runtime: Runtime, job_id: str, to: str) -> int:
    """Write a job's results as one Parquet file at ``to``; return the row count.

    ``to`` may not lie inside spotlane's own storage tiers (it could replace a
    part or a result file), and it appears whole or not at all.
    """
    info = results(runtime, job_id)
    target = canonical_url(to)
    for tier in ("hot", "warm", "cold"):
        root = canonical_url(runtime.storage.tier(tier))
        if _within(target, root):
            raise StoreError(f"--to {to} is inside spotlane's storage ({tier} tier): export somewhere else")
    fs_first, path_first = filesystem(info.files[0])
    with fs_first.open(path_first, "rb") as fh:
        schema = pq.read_schema(fh)
    rows = 0
    with open_new(target) as sink, pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for url in info.files:
            fs, path = filesystem(url)
            with fs.open(path, "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                    writer.write_batch(batch)
                    rows += len(batch)
    return rows


def _within(target: str, root: str) -> bool:
    def plain(url: str) -> str:
        return url.removeprefix("file://").rstrip("/")

    target, root = plain(target), plain(root)
    return target == root or target.startswith(root + "/")

"""Finishing a job: committed parts -> compacted results + manifest in the warm tier.

Only parts with a committed ``checkpoints`` row are read, in input order, so a part
written by a worker that lost its lease (or crashed before committing) never
reaches the results. Parts are streamed into a few large files of at most
``RESULT_FILE_ROWS`` rows each; memory is bounded by one part. The manifest records
row counts, sizes, SHA-256 checksums and the schema. The job's final status:
``succeeded``, ``succeeded_with_errors`` (some rows have an ``error``) or ``failed``
(a shard failed; the rows that were done are still in the results).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select

from pipeline import transitions
from pipeline.db import session_scope
from pipeline.runtime import Runtime
from pipeline.storage import MANIFEST, filesystem, sha256_of, write_json, write_options
from schemas.base import utcnow
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Checkpoint, Job, Shard

__all__ = ["MANIFEST", "RESULT_FILE_ROWS", "finalize_job"]

log = logging.getLogger(__name__)

#: Rows per result file: large enough for fast scans, small enough to split work.
RESULT_FILE_ROWS = 1_000_000


class _ResultWriter:
    """Streams tables into ``part-<n>.parquet`` files of bounded row count."""

    def __init__(self, folder: str, schema: pa.Schema, storage_class: str = "") -> None:
        self.folder = folder.rstrip("/")
        self.storage_class = storage_class
        self.schema = schema
        self.files: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._handle: Any = None
        self._rows = 0

    def _open(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        fs, path = filesystem(f"{self.folder}/{name}")
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._handle = fs.open(path, "wb", **write_options(self.storage_class))
        self._writer = pq.ParquetWriter(self._handle, self.schema, compression="zstd")
        self.files.append({"name": name, "rows": 0})
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._rows >= RESULT_FILE_ROWS:
                self.close_current()
                self._open()
            take = min(table.num_rows, RESULT_FILE_ROWS - self._rows)
            assert self._writer is not None
            self._writer.write_table(table.slice(0, take), row_group_size=128 * 1024)
            self._rows += take
            self.files[-1]["rows"] += take
            table = table.slice(take)

    def close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
            self._writer = self._handle = None

    def close(self) -> list[dict[str, Any]]:
        if self._writer is None and not self.files:
            self._open()  # an empty job still gets one (empty) file with the schema
        self.close_current()
        for entry in self.files:
            url = f"{self.folder}/{entry['name']}"
            fs, path = filesystem(url)
            entry["bytes"] = fs.size(path)
            entry["sha256"] = sha256_of(url)
        return self.files


def _schema_from_parts(urls: list[str]) -> pa.Schema | None:
    for url in urls:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as fh:
            return pq.read_schema(fh)
    return None


def finalize_job(runtime: Runtime, job_id: str) -> JobStatus | None:
    """Write the results of a job whose shards are all final; return its new status.

    ``None`` when there is nothing to do (shards still open, or another finalizer
    already owns the job).
    """
    with session_scope(runtime.engine) as session:
        if not transitions.job_shards_final(session, job_id):
            return None
        if not transitions.set_job_status(
            session, job_id, JobStatus.FINALIZING, expected=(JobStatus.RUNNING, JobStatus.PENDING)
        ):
            return None
    with session_scope(runtime.engine) as session:
        parts = session.execute(
            select(Checkpoint.url, Checkpoint.row_count, Checkpoint.rows_failed)
            .join(Shard, Shard.id == Checkpoint.shard_id)
            .where(Shard.job_id == job_id)
            .order_by(Shard.shard_index, Checkpoint.first_row)
        ).all()
        failed_shards = session.execute(
            select(Shard.shard_index, Shard.error)
            .where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
            .order_by(Shard.shard_index)
        ).all()
        job = session.get(Job, job_id)
        assert job is not None
        model, input_url, rows_total = job.model, job.input_url, job.rows_total
    try:
        folder = runtime.storage.results_url(job_id, "warm")
        schema = _schema_from_parts([p.url for p in parts])
        if schema is None:
            from schemas.arrow import output_schema

            schema = output_schema()
        warm_class = runtime.storage.storage_class("warm")
        writer = _ResultWriter(folder, schema, warm_class)
        for part in parts:
            fs, path = filesystem(part.url)
            with fs.open(path, "rb") as fh:
                writer.write(pq.read_table(fh).cast(schema))
        files = writer.close()
        rows = sum(p.row_count for p in parts)
        rows_failed = sum(p.rows_failed for p in parts)
        manifest = {
            "job_id": job_id,
            "model": model,
            "input_url": input_url,
            "created_at": utcnow().isoformat(),
            "rows": rows,
            "rows_ok": rows - rows_failed,
            "rows_failed": rows_failed,
            "rows_missing": rows_total - rows,
            "files": files,
            "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
            "arrow_schema": schema.to_string(show_schema_metadata=False),
        }
        write_json(manifest, f"{folder}/{MANIFEST}", warm_class)
    except Exception as exc:
        log.exception("finalizing job %s failed", job_id)
        with session_scope(runtime.engine) as session:
            transitions.set_job_status(
                session,
                job_id,
                JobStatus.FAILED,
                expected=(JobStatus.FINALIZING,),
                error=f"writing results failed: {exc.__class__.__name__}: {exc}",
            )
        return JobStatus.FAILED
    if failed_shards:
        status = JobStatus.FAILED
        error: str | None = (
            f"{len(failed_shards)} shard(s) failed; first, shard {failed_shards[0].shard_index}: "
            f"{failed_shards[0].error}"
        )
    else:
        status = JobStatus.SUCCEEDED_WITH_ERRORS if rows_failed else JobStatus.SUCCEEDED
        error = None
    with session_scope(runtime.engine) as session:
        transitions.set_job_status(
            session,
            job_id,
            status,
            expected=(JobStatus.FINALIZING,),
            result_url=folder,
            result_tier="warm",
            rows_ok=rows - rows_failed,
            rows_failed=rows_failed,
            error=error,
        )
    log.info("job %s finished: %s, %d rows (%d failed) -> %s", job_id, status.value, rows, rows_failed, folder)
    if status is not JobStatus.FAILED:
        from pipeline.retry import merge_retry

        merged = merge_retry(runtime, job_id)  # a retry-errors job: the parent's next version
        if merged:
            log.info("retry job %s merged into %s", job_id, merged)
    return status


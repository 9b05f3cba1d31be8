"""Re-running only the rows that came back with an error, as a new result version.

``retry_errors`` gathers the failed rows' ids from the job's results, copies those
input rows into a small Parquet file in the hot tier, and submits a child job
tagged ``retry_of``. When the child finishes, ``merge_retry`` writes the parent's
next result version (``results-v<N>``) with those rows replaced, and points the
parent's SQL row at it; the previous version stays where it was.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import update

from pipeline import producer
from pipeline.api import results
from pipeline.db import session_scope
from pipeline.finalizer import _ResultWriter
from pipeline.inputs import iter_rows, open_parquet
from pipeline.runtime import Runtime
from pipeline.storage import MANIFEST, filesystem, read_manifest, remove_tree, write_json, write_parquet
from schemas.base import utcnow
from schemas.errors import StoreError
from schemas.tables import Job

__all__ = ["merge_retry", "retry_errors"]


def _read(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def retry_errors(runtime: Runtime, job_id: str) -> tuple[str, int]:
    """Submit a job for the parent's error rows; return (child job id, rows)."""
    info = results(runtime, job_id)
    failed: list[str] = []
    for url in info.files:
        table = _read(url, ["id", "error"])
        failed.extend(table.filter(pc.is_valid(table.column("error"))).column("id").to_pylist())
    if not failed:
        raise StoreError(f"job {job_id} has no rows with an error; nothing to retry")
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        version = int((job.tags or {}).get("result_version", 1)) + 1
        input_url, models, max_tokens = job.input_url, list(job.models or [job.model]), job.max_tokens
        temperature, task, tags = job.temperature, job.task, dict(job.tags or {})
    wanted = pa.array(failed)
    source = open_parquet(input_url)
    pieces = [b.filter(pc.is_in(b.column("id"), value_set=wanted))
              for b in iter_rows(input_url, 0, source.metadata.num_rows, source.schema_arrow.names)]
    subset = pa.Table.from_batches([p for p in pieces if len(p)])
    retry_input = f"{runtime.storage.job_url(job_id, 'hot')}/retries/v{version}/input.parquet"
    write_parquet(subset, retry_input, runtime.storage.storage_class("hot"))
    child = producer.submit(runtime, producer.JobRequest(
        input_url=retry_input, model=models, max_tokens=max_tokens or None, temperature=temperature, task=task,
        tags={**{k: v for k, v in tags.items() if k != "result_version"}, "retry_of": job_id, "result_version": version},
    ))
    return child, subset.num_rows


def merge_retry(runtime: Runtime, child_id: str) -> str | None:
    """After a retry job finished: the parent's next result version; returns its URL."""
    with session_scope(runtime.engine) as session:
        child = session.get(Job, child_id)
        if child is None or not child.result_url or "retry_of" not in (child.tags or {}):
            return None
        parent_id, version = child.tags["retry_of"], int(child.tags["result_version"])
        parent = session.get(Job, parent_id)
        if parent is None or parent.result_url is None:
            return None
        old_url, new_url = parent.result_url, f"{runtime.storage.job_url(parent_id, 'warm')}/results-v{version}"
    redone = pa.concat_tables([_read(f"{child.result_url}/{f['name']}") for f in read_manifest(child.result_url)["files"]])
    replacement = {row_id: i for i, row_id in enumerate(redone.column("id").to_pylist())}
    old_manifest = read_manifest(old_url)
    writer: _ResultWriter | None = None
    rows = rows_failed = 0
    for entry in old_manifest["files"]:
        table = _read(f"{old_url}/{entry['name']}")
        if writer is None:
            writer = _ResultWriter(new_url, table.schema, runtime.storage.storage_class("warm"))
        ids = table.column("id").to_pylist()
        take = [replacement.get(i) for i in ids]
        if any(t is not None for t in take):
            swapped = redone.select(table.column_names).cast(table.schema)
            rows_out = [swapped.slice(t, 1) if t is not None else table.slice(k, 1) for k, t in enumerate(take)]
            table = pa.concat_tables(rows_out)
        rows += table.num_rows
        rows_failed += int(pc.sum(pc.is_valid(table.column("error"))).as_py() or 0)
        writer.write(table)
    assert writer is not None
    files = writer.close()
    write_json({**old_manifest, "files": files, "rows": rows, "rows_ok": rows - rows_failed, "rows_failed": rows_failed,
                "version": version, "retry_job_id": child_id, "previous_version_url": old_url,
                "created_at": utcnow().isoformat()}, f"{new_url}/{MANIFEST}", runtime.storage.storage_class("warm"))
    with session_scope(runtime.engine) as session:
        parent = session.get(Job, parent_id)
        assert parent is not None
        # Guarded: retention may have deleted the parent's results meanwhile. The
        # new version is in warm even if older ones were archived.
        switched = session.execute(
            update(Job).where(Job.id == parent_id, Job.results_deleted_at.is_(None))
            .values(result_url=new_url, result_tier="warm", rows_ok=rows - rows_failed, rows_failed=rows_failed,
                    tags={**(parent.tags or {}), "result_version": version}, updated_at=utcnow())
        ).rowcount  # type: ignore[attr-defined]
    if not switched:
        remove_tree(new_url)
        return None
    return new_url

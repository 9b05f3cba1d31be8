"""Re-running only the rows that came back with an error, as a new result version.

``retry_errors`` gathers the failed rows' ids from the job's results, copies those
input rows into a small Parquet file in the hot tier, and submits a child job
with ``retry_of`` set. When the child's own results are switched, ``merge_retry``
writes the parent's next result version (``results-v<N>-<token>``) with those
rows replaced, and points the parent's SQL row at it; the previous version stays
where it was. A merge that fails is done again (the reaper sends it).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import update

from pipeline.jobs import submit as producer
from pipeline.jobs.queries import results
from pipeline.runtime import Runtime
from pipeline.storage.inputs import iter_rows, open_parquet
from pipeline.storage.objects import MANIFEST, filesystem, read_manifest, remove_tree, write_json, write_parquet
from pipeline.storage.results import ResultWriter
from pipeline.store import leases
from pipeline.store.db import db_now, session_scope
from pipeline.store.guards import matched
from pipeline.store.identity import owner_id
from schemas.base import utcnow
from schemas.errors import StoreError
from schemas.inference import is_permanent
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
    permanent: list[str] = []
    for url in info.files:
        table = _read(url, ["id", "error"])
        errors = table.filter(pc.is_valid(table.column("error")))
        for row_id, error in zip(errors.column("id").to_pylist(), errors.column("error").to_pylist(), strict=True):
            (permanent if is_permanent(error) else failed).append(row_id)
    if not failed:
        if permanent:
            raise StoreError(
                f"job {job_id}'s {len(permanent)} error row(s) failed for reasons a retry cannot change "
                "(the row's prompt, limits or model; see `spotlane results JOB --errors errors.csv`)"
            )
        raise StoreError(f"job {job_id} has no rows with an error; nothing to retry")
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        version = int((job.tags or {}).get("result_version", 1)) + 1
        input_url, models, max_tokens = job.input_url, list(job.models or [job.model]), job.max_tokens
        temperature, task, tags = job.temperature, job.task, dict(job.tags or {})
        response_schema, schema_retries = job.response_schema, job.schema_retries
        use_cache = job.use_cache
    wanted = pa.array(failed)
    source = open_parquet(input_url)
    pieces = [
        b.filter(pc.is_in(b.column("id"), value_set=wanted))
        for b in iter_rows(input_url, 0, source.metadata.num_rows, source.schema_arrow.names)
    ]
    subset = pa.Table.from_batches([p for p in pieces if len(p)])
    retry_input = f"{runtime.storage.job_url(job_id, 'hot')}/retries/v{version}/input.parquet"
    write_parquet(subset, retry_input, runtime.storage.storage_class("hot"))
    child = producer.submit(
        runtime,
        producer.JobRequest(
            input_url=retry_input,
            model=models,
            max_tokens=max_tokens or None,
            temperature=temperature,
            task=task,
            tags={
                **{k: v for k, v in tags.items() if k != "result_version"},
                "retry_of": job_id,
                "result_version": version,
            },
            retry_of=job_id,
            response_schema=response_schema,
            schema_retries=schema_retries,
            use_cache=use_cache,  # a --no-cache job's retry neither reads nor fills it
            incremental=use_cache and not runtime.settings.cache.enabled,  # and keeps what the parent had
        ),
    )
    return child, subset.num_rows


def merge_retry(runtime: Runtime, child_id: str) -> str | None:
    """After a retry job's own results were switched: the parent's next result version.

    One merge into a parent at a time (the lease ``merge:<parent>``). The new
    version is written into a fresh folder (manifest last) and switched with one
    UPDATE guarded on the parent still pointing at the version it was merged from,
    which also marks the child merged; so a merge raced by the lifecycle's move,
    or by a second merge, switches nothing and is done again from the new place
    (the reaper sends it). Memory: one parent result file plus the retried rows.
    Returns the new version's URL, or None when there is nothing (more) to do.
    """
    with session_scope(runtime.engine) as session:
        child = session.get(Job, child_id)
        if child is None or not child.result_url or child.retry_of is None or child.merged_at is not None:
            return None
        parent_id, version, child_url = (
            child.retry_of,
            int((child.tags or {}).get("result_version", 2)),
            child.result_url,
        )
    owner, lease = owner_id(), f"merge:{parent_id}"
    if not leases.take(runtime.engine, lease, owner, MERGE_LEASE_SECONDS):
        return None
    try:
        return _merge(runtime, child_id, parent_id, version, child_url, owner, lease)
    finally:
        leases.release(runtime.engine, lease, owner)


#: A merge renews its lease between files; one file takes far less than this.
MERGE_LEASE_SECONDS = 600.0


def _merge(
    runtime: Runtime, child_id: str, parent_id: str, version: int, child_url: str, owner: str, lease: str
) -> str | None:
    with session_scope(runtime.engine) as session:
        parent = session.get(Job, parent_id)
        if parent is None or parent.result_url is None or parent.results_deleted_at is not None:
            session.execute(update(Job).where(Job.id == child_id).values(merged_at=db_now(session)))
            return None  # nothing left to merge into
        old_url, tags = parent.result_url, dict(parent.tags or {})
    redone = pa.concat_tables([_read(f"{child_url}/{f['name']}") for f in read_manifest(child_url)["files"]])
    old_manifest = read_manifest(old_url)
    new_url = runtime.storage.new_results_url(parent_id, version)
    writer: ResultWriter | None = None
    rows = rows_failed = 0
    try:
        for entry in old_manifest["files"]:
            if not leases.renew(runtime.engine, lease, owner, MERGE_LEASE_SECONDS):
                raise StoreError(f"the merge into job {parent_id} lost its lease")
            table = _replace_rows(_read(f"{old_url}/{entry['name']}"), redone)
            if writer is None:
                writer = ResultWriter(new_url, table.schema, runtime.storage.storage_class("warm"))
            rows += table.num_rows
            rows_failed += int(pc.sum(pc.is_valid(table.column("error"))).as_py() or 0)
            writer.write(table)
        assert writer is not None
        files = writer.close()
        write_json(
            {
                **old_manifest,
                "files": files,
                "rows": rows,
                "rows_ok": rows - rows_failed,
                "rows_failed": rows_failed,
                "version": version,
                "retry_job_id": child_id,
                "previous_version_url": old_url,
                "created_at": utcnow().isoformat(),
            },
            f"{new_url}/{MANIFEST}",
            runtime.storage.storage_class("warm"),
        )
        with session_scope(runtime.engine) as session:
            switched = matched(
                session.execute(
                    update(Job)
                    .where(
                        Job.id == parent_id,
                        Job.result_url == old_url,
                        Job.results_deleted_at.is_(None),
                        leases.held_by(session, lease, owner),
                    )
                    .values(
                        result_url=new_url,
                        result_tier="warm",
                        rows_ok=rows - rows_failed,
                        rows_failed=rows_failed,
                        tags={**tags, "result_version": version},
                        updated_at=db_now(session),
                    )
                )
            )
            if switched:
                session.execute(update(Job).where(Job.id == child_id).values(merged_at=db_now(session)))
    except BaseException:
        if writer is not None:
            writer.abort()
        remove_tree(new_url)
        raise
    if not switched:
        remove_tree(new_url)
        raise StoreError(f"job {parent_id}'s results moved while merging retry job {child_id}; merged again later")
    return new_url


def _replace_rows(table: pa.Table, redone: pa.Table) -> pa.Table:
    """``table`` with every row whose id ``redone`` has replaced by ``redone``'s row (vectorised)."""
    position = pc.index_in(table.column("id"), value_set=redone.column("id"))
    if position.null_count == len(position):
        return table
    swapped = redone.select(table.column_names).cast(table.schema)
    own = pa.array(range(table.num_rows), pa.int64())
    take = pc.if_else(pc.is_valid(position), pc.add(position.cast(pa.int64()), table.num_rows), own)
    return pa.concat_tables([table, swapped]).take(take)

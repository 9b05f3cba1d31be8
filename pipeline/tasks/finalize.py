"""Finishing a job: committed parts -> verified, compacted results + manifest in the warm tier.

One finalizer per job at a time: it holds the lease ``finalize:<job>`` (renewed as
it writes) before it moves the job to ``finalizing``; another starts only once
that lease has run out (the reaper sees to it). It writes into a folder no one
has seen (``results-<token>``: temporary names, the manifest last) and switches
the job to it with one UPDATE guarded by its own lease, so a reader sees the old
results or the new ones, never half of them; a finalizer that lost its lease
switches nothing and removes its folder.

Only parts with a committed ``checkpoints`` row are read, in input order, and each
is checked before it is copied: its row count against the checkpoint's, its ids
against the input's ids for that range, its error rows against the checkpoint's,
and the parts of a shard against each other (contiguous from the shard's first
row; all of them for a done shard). The manifest counts the rows actually
written. Any mismatch fails the job loudly; it is never ``succeeded``.

Parts are read ``storage.read_concurrency`` at a time (in order, each handed over as
the ones before it are written) and streamed into files of at most
``RESULT_FILE_ROWS`` rows, in row groups of ``ROW_GROUP_ROWS`` rows; memory is bounded
by one row group and the parts being read. Final status:
``succeeded``, ``succeeded_with_errors`` (some rows have an ``error``) or
``failed`` (a shard failed: the rows that were done are still in the results).

A ``retry-errors`` job's rows are merged into its parent's next result version
only after its own results were switched (``pipeline.jobs.retry.merge_retry``); a
merge that did not complete is finished by a later ``finalize_job`` for the same
job, which the reaper sends.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select

from pipeline.runtime import Runtime
from pipeline.storage.inputs import open_parquet
from pipeline.storage.objects import MANIFEST, filesystem, remove_tree, write_json
from pipeline.storage.results import InputIds, ResultWriter, check_coverage, check_part, with_parsed
from pipeline.store import leases, transitions
from pipeline.store.db import session_scope
from pipeline.store.identity import owner_id
from schemas.arrow import output_schema
from schemas.base import utcnow
from schemas.errors import InputError, StoreError
from schemas.status import JobStatus, ShardStatus
from schemas.structured import arrow_type
from schemas.tables import Checkpoint, Job, Shard

__all__ = ["finalize_job", "finalize_lease"]

log = logging.getLogger(__name__)


def finalize_lease(job_id: str) -> str:
    return f"finalize:{job_id}"


def finalize_job(runtime: Runtime, job_id: str) -> JobStatus | None:
    """Write the results of a job whose shards are all final; return its new status.

    ``None`` when there is nothing to do: shards still open, another finalizer
    holds the job, or the job is already final (a finished retry job's pending
    merge is then completed).
    """
    owner = owner_id()
    lease = finalize_lease(job_id)
    seconds = runtime.settings.worker.finalize_grace_seconds
    if not leases.take(runtime.engine, lease, owner, seconds):
        return None
    try:
        with session_scope(runtime.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                return None
            if job.status.is_final:  # a duplicate message, or a retry job whose merge is still to do
                pending_merge = job.retry_of is not None and job.merged_at is None and job.result_url is not None
            elif not transitions.job_shards_final(session, job_id) or not transitions.start_finalizing(session, job_id):
                return None
        if job.status.is_final:
            if pending_merge:
                _merge(runtime, job_id)
            return None
        status = _finalize(runtime, job_id, owner, lease)
    finally:
        leases.release(runtime.engine, lease, owner)
    if status is not None:
        runtime.send_webhooks()
    if status is not None and status is not JobStatus.FAILED:
        _merge(runtime, job_id)
    return status


def _merge(runtime: Runtime, job_id: str) -> None:
    from pipeline.jobs.retry import merge_retry

    try:
        merged = merge_retry(runtime, job_id)  # a retry-errors job: the parent's next version
    except Exception:  # recorded by merged_at staying NULL: the reaper sends it again
        log.exception("merging retry job %s into its parent failed; it will be tried again", job_id)
        return
    if merged:
        log.info("retry job %s merged into %s", job_id, merged)


def _finalize(runtime: Runtime, job_id: str, owner: str, lease: str) -> JobStatus | None:
    seconds = runtime.settings.worker.finalize_grace_seconds
    last_renewal = time.monotonic()

    def renew() -> None:
        nonlocal last_renewal
        if time.monotonic() - last_renewal < seconds / 4:
            return
        if not leases.renew(runtime.engine, lease, owner, seconds):
            raise _LostLease(f"the finalizer of job {job_id} lost its lease (stalled past {seconds:.0f} s)")
        last_renewal = time.monotonic()

    with session_scope(runtime.engine) as session:
        parts = session.execute(
            select(
                Checkpoint.shard_id,
                Checkpoint.url,
                Checkpoint.first_row,
                Checkpoint.row_count,
                Checkpoint.rows_failed,
                Checkpoint.attempt,
                Shard.shard_index,
            )
            .join(Shard, Shard.id == Checkpoint.shard_id)
            .where(Shard.job_id == job_id)
            .order_by(Shard.row_start, Checkpoint.first_row)  # input order (a cut shard's tail has a later index)
        ).all()
        shards = {
            s.id: s
            for s in session.execute(
                select(
                    Shard.id,
                    Shard.shard_index,
                    Shard.row_start,
                    Shard.row_end,
                    Shard.status,
                    Shard.error,
                    Shard.rows_cached,
                    Shard.saved_usd,
                )
                .where(Shard.job_id == job_id)
                .order_by(Shard.row_start)
            ).all()
        }
        job = session.get(Job, job_id)
        assert job is not None
        model, input_url, rows_total, input_identity = job.model, job.input_url, job.rows_total, job.input_identity
        response_schema = job.response_schema
    # Rows with a response_format of their own: `parsed` holds each row's value as JSON text.
    try:
        per_row = "response_format" in open_parquet(input_url).schema_arrow.names
    except (InputError, OSError):  # the input is gone or changed: the parts are what counts here
        per_row = False
    rows_cached = sum(s.rows_cached for s in shards.values())
    saved_usd = float(sum(s.saved_usd for s in shards.values()))
    folder = runtime.storage.new_results_url(job_id)
    try:
        rows, rows_failed, files, schema = _write_results(
            runtime, folder, parts, shards, input_url, rows_total, renew, response_schema, per_row
        )
        renew()
        manifest = {
            "job_id": job_id,
            "model": model,
            "input_url": input_url,
            "input_identity": input_identity,
            "created_at": utcnow().isoformat(),
            "rows": rows,
            "rows_ok": rows - rows_failed,
            "rows_failed": rows_failed,
            "rows_missing": rows_total - rows,
            "rows_cached": rows_cached,
            "saved_usd": saved_usd,
            "files": files,
            "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
            "arrow_schema": schema.to_string(show_schema_metadata=False),
        }
        write_json(manifest, f"{folder}/{MANIFEST}", runtime.storage.storage_class("warm"))
    except _LostLease as exc:
        log.warning("%s; its folder %s is removed", exc, folder)
        _remove(folder)
        return None
    except Exception as exc:
        log.exception("finalizing job %s failed", job_id)
        _remove(folder)
        with session_scope(runtime.engine) as session:
            transitions.finish_job(
                session,
                job_id,
                JobStatus.FAILED,
                (leases.held_by(session, lease, owner),),
                error=f"writing results failed: {exc.__class__.__name__}: {exc}",
            )
        return JobStatus.FAILED
    failed_shards = [s for s in shards.values() if s.status is ShardStatus.FAILED]
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
        switched = transitions.finish_job(
            session,
            job_id,
            status,
            (leases.held_by(session, lease, owner),),
            result_url=folder,
            result_tier="warm",
            rows_ok=rows - rows_failed,
            rows_failed=rows_failed,
            rows_cached=rows_cached,
            saved_usd=saved_usd,
            error=error,
        )
    if not switched:
        log.warning("finalizer of job %s lost its lease before switching; %s is removed", job_id, folder)
        _remove(folder)
        return None
    log.info("job %s finished: %s, %d rows (%d failed) -> %s", job_id, status.value, rows, rows_failed, folder)
    return status


class _LostLease(Exception):
    pass


def _remove(folder: str) -> None:
    try:
        remove_tree(folder)
    except Exception:  # the lifecycle's retention removes what is left
        log.warning("could not remove %s", folder, exc_info=True)


def _write_results(
    runtime: Runtime,
    folder: str,
    parts: Sequence[Any],
    shards: dict[int, Any],
    input_url: str,
    rows_total: int,
    renew: Callable[[], None],
    response_schema: dict[str, Any] | None = None,
    per_row: bool = False,
) -> tuple[int, int, list[dict[str, Any]], pa.Schema]:
    """Verify and copy every part into ``folder``, with the typed ``parsed`` column when the
    job has a schema; (rows, error rows, files, schema) as written."""
    check_coverage(parts, shards)
    ids = InputIds(input_url, rows_total)
    schema: pa.Schema | None = None
    writer: ResultWriter | None = None
    rows = rows_failed = 0
    try:
        for part, table in _read_parts(parts, runtime.settings.storage.read_concurrency):
            renew()
            check_part(part, table, ids)
            if response_schema is not None or per_row:
                table = with_parsed(table, response_schema, as_text=per_row)
            if writer is None:
                schema = _with_output_fields(table.schema)
                writer = ResultWriter(folder, schema, runtime.storage.storage_class("warm"))
            table = _fit(table, schema)
            rows += table.num_rows
            rows_failed += part.rows_failed
            writer.write(table)
        if writer is None:
            schema = output_schema()
            if response_schema is not None or per_row:
                kind = pa.string() if per_row or response_schema is None else arrow_type(response_schema)
                schema = schema.append(pa.field("parsed", kind))
            writer = ResultWriter(folder, schema, runtime.storage.storage_class("warm"))
        files = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    assert schema is not None
    written = sum(int(f["rows"]) for f in files)
    if written != rows:
        raise StoreError(f"wrote {written} rows but read {rows} from the parts")
    return rows, rows_failed, files, schema


def _read_part(url: str) -> pa.Table:
    """A part fetched whole in one GET, then decoded: reading it through ``fs.open``
    costs a HEAD for its size and then a GET for the footer and one for the columns."""
    fs, path = filesystem(url)
    return pq.read_table(pa.BufferReader(fs.cat_file(path)))


def _read_parts(parts: Sequence[Any], at_once: int) -> Iterator[tuple[Any, pa.Table]]:
    """Each part with its table, in order, ``at_once`` of them being read ahead."""
    with ThreadPoolExecutor(at_once, thread_name_prefix="spotlane-read") as pool:
        ahead: deque[tuple[Any, Future[pa.Table]]] = deque()
        source = iter(parts)
        try:
            for part in source:
                ahead.append((part, pool.submit(_read_part, part.url)))
                if len(ahead) >= at_once:
                    first, table = ahead.popleft()
                    yield first, table.result()
            while ahead:
                first, table = ahead.popleft()
                yield first, table.result()
        finally:
            for _, future in ahead:
                future.cancel()


def _with_output_fields(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every output field (a part written before a field was added lacks it)."""
    for position, wanted in enumerate(output_schema()):
        if wanted.name not in schema.names:
            schema = schema.insert(position, wanted)
    return schema


def _fit(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: a column it lacks (a part from an older worker) is all null."""
    if table.schema.equals(schema):
        return table
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)

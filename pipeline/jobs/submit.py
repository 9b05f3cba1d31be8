"""Submitting a job: validate the input, plan shards, record the job, enqueue routing.

The job row and all its shard rows are written in one transaction, and only then
is the routing task sent; a bad input raises ``InputError`` before anything is
written or enqueued. If the broker is unreachable after the commit, the submit
still succeeds (a retried submit would make a second job): the job waits as
``pending`` and the reaper routes it later. The input's size and ETag (or mtime)
are recorded, so a worker can tell when the file changed after submit.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.jobs.models import resolve_model
from pipeline.routing.estimate import FOOTER_CHARS_PER_TOKEN
from pipeline.runtime import Runtime
from pipeline.storage.input_files import expand_input, source_of_row, stitch_inputs
from pipeline.storage.inputs import (
    InputInfo,
    canonical_url,
    input_identity,
    inspect_input,
    iter_rows,
    open_parquet,
    refuse_credentials,
)
from pipeline.storage.objects import copy_file, filesystem, list_files, remove_tree
from pipeline.storage.openai_batch import BatchFile, convert_jsonl, is_openai_jsonl, line_of_row
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.errors import InputError
from schemas.jobspec import JobSpec
from schemas.settings import JobDefaults, Settings
from schemas.status import JobStatus, ShardStatus
from schemas.tables import Job, Shard

__all__ = ["JobRequest", "new_job_id", "plan_shards", "submit"]


class JobRequest(JobSpec):
    """A ``JobSpec`` and the input it runs on: ``JobRequest("prompts.parquet", "./model", max_tokens=64)``."""

    input_url: str
    #: Chosen by the caller to make a retried submit idempotent (scheduled runs);
    #: a job with this id already existing is then not an error.
    job_id: str | None = None
    #: A ``retry-errors`` job: the job whose error rows this one re-runs.
    retry_of: str | None = None
    #: A ``spotlane serve`` batch: its key, input file, completion window and metadata,
    #: and the endpoint the batch names (the file's lines must be for it).
    api_key_id: str | None = None
    input_file_id: str | None = None
    completion_window: str | None = None
    batch_metadata: dict[str, Any] | None = None
    openai_endpoint: str | None = None

    def __init__(self, input_url: str, model: str | list[str], **options: Any) -> None:
        super().__init__(input_url=input_url, model=model, **options)


def new_job_id() -> str:
    """Sortable by creation time, unique without coordination: ``20261125-173059-3fa9c1``."""
    return f"{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def shard_rows(rows: int, asked: int | None, defaults: JobDefaults) -> int:
    """Rows a shard: as asked; else ``jobs.rows_per_shard``, grown so that the job has at
    most ``jobs.max_shards`` shards."""
    if asked:
        return asked
    return max(defaults.rows_per_shard, -(-rows // defaults.max_shards))


def plan_shards(rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` covering ``rows`` rows."""
    return [(s, min(s + rows_per_shard, rows)) for s in range(0, rows, rows_per_shard)]


def _estimate_prompt_tokens(info: InputInfo) -> float:
    """Prompt tokens per row from the column's uncompressed size in the footer."""
    meta = open_parquet(info.url).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    total = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for i, name in enumerate(names):
            if name.split(".")[0] == info.kind:
                total += group.column(i).total_uncompressed_size
    return total / max(info.rows, 1) / FOOTER_CHARS_PER_TOKEN


def _exists(runtime: Runtime, job_id: str) -> bool:
    with session_scope(runtime.engine) as session:
        return session.get(Job, job_id) is not None


def _stitched_folder(runtime: Runtime, job_id: str) -> str:
    return f"{runtime.storage.job_url(job_id, 'hot')}/input/"


def _local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _convert(runtime: Runtime, url: str, job_id: str) -> tuple[InputInfo, BatchFile]:
    """An OpenAI batch JSONL file, converted into a Parquet file in the job's hot folder
    and validated there; errors name the file's line (the lines are its rows)."""
    target = f"{_stitched_folder(runtime, job_id)}input-{secrets.token_hex(4)}.parquet"
    try:
        batch = convert_jsonl(url, target, runtime.storage.storage_class("hot"))
        try:
            return inspect_input(target), batch
        except InputError as exc:
            if exc.row is None:
                raise InputError(str(exc).split(": ", 1)[-1], file=url) from None
            line = line_of_row(target, exc.row)
            raise InputError(f"line {line}: {str(exc).split(': ', 1)[-1]}", file=url) from None
    except BaseException:
        _discard(runtime, job_id, target)
        raise


def _inspect(runtime: Runtime, url: str, job_id: str) -> InputInfo:
    """Validate the input and pin it: a local file is copied (streamed) into the job's hot
    folder, several files (a glob or a folder) are stitched into one there, so the job
    never depends on a file its submitter may change, move or keep on another machine;
    an object-store file is read in place, pinned by its size and ETag. Errors name the
    source file and row, and nothing of a refused input is kept."""
    files = expand_input(url)
    if len(files) == 1 and not _local(files[0]):
        return inspect_input(files[0])
    # A name of its own per attempt: two submitters of one scheduled run never write
    # (or clean up) the same file; the job row records the one that won.
    target = f"{_stitched_folder(runtime, job_id)}input-{secrets.token_hex(4)}.parquet"
    try:
        if len(files) == 1:
            info = inspect_input(files[0])  # refuse a bad file before copying it
            before = input_identity(files[0])
            copy_file(files[0], target, runtime.storage.storage_class("hot"))
            if input_identity(files[0]) != before:
                raise InputError("the file changed while it was being submitted; submit it again", file=files[0])
            return replace(info, url=target)
        stitch_inputs(files, target, runtime.storage.storage_class("hot"))
        return inspect_input(target)
    except InputError as exc:
        if len(files) == 1:
            _discard(runtime, job_id, target)
            raise
        try:  # name the source file and its row while the stitched copy still exists
            where = source_of_row(target, exc.row) if exc.row is not None else None
            message = str(exc).split(": ", 1)[-1]
            first = re.search(r"first at row (\d+)", message)
            if first and (origin := source_of_row(target, int(first.group(1)))):
                message = message.replace(first.group(0), f"first in {origin[0]} at row {origin[1]}")
        finally:
            _discard(runtime, job_id, target)
        if where is None:
            raise
        raise InputError(message, file=where[0], column=exc.column, row=where[1]) from None
    except BaseException:
        _discard(runtime, job_id, target)
        raise


def _discard(runtime: Runtime, job_id: str, target: str) -> None:
    """Remove a copy of a refused (or lost) input, and the job's hot folder if that leaves it empty."""
    fs, path = filesystem(target)
    if fs.exists(path):
        fs.rm(path)
    if not _exists(runtime, job_id) and not list(list_files(runtime.storage.job_url(job_id, "hot"))):
        remove_tree(runtime.storage.job_url(job_id, "hot"))


def _check_row_models(settings: Settings, info: InputInfo, models: list[str]) -> None:
    """A row's own ``model`` must be one of the job's, or one a backend names outright.

    Never an arbitrary folder or hub id a ``*`` pool would load because a data row
    says so: each would be loaded (and kept) by every worker that meets it.
    """
    named = {m for b in settings.backends for m in b.models if m != "*"}
    for name in info.row_models:
        if name not in models and name not in named:
            where = _first_row_with(info.url, name)
            raise InputError(
                f"model {name!r} is neither one of the job's models ({', '.join(models)}) nor one a backend "
                "lists in gpu_pools or api_providers",
                file=info.url,
                column="model",
                row=where,
            )


def _first_row_with(url: str, model: str) -> int | None:
    import pyarrow.compute as pc

    offset = 0
    for batch in iter_rows(url, 0, open_parquet(url).metadata.num_rows, ["model"]):
        hits = pc.equal(batch.column("model"), model)
        if pc.any(hits).as_py():
            return offset + int(pc.index(hits, True).as_py())
        offset += batch.num_rows
    return None


#: What every new shard row holds besides its job, index, rows and time.
_NEW_SHARD: dict[str, Any] = {
    "status": ShardStatus.PENDING,
    "rows_done": 0,
    "rows_failed": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "cost_usd": 0.0,
    "attempts": 0,
    "est_input_tokens": 0,
    "est_output_tokens": 0,
    "est_cost_usd": 0.0,
    "est_seconds": 0.0,
    "rows_cached": 0,
    "saved_usd": 0.0,
    "excluded_backends": [],
}
_SHARD_COLUMNS = ("job_id", "shard_index", "row_start", "row_end", *_NEW_SHARD, "updated_at")


def _insert_shards(session: Session, job_id: str, ranges: list[tuple[int, int]], now: datetime) -> None:
    """A new job's shard rows, in the submit's transaction: COPY on PostgreSQL (a 10M-row
    job's 20,000 rows in a fraction of a second, where an executemany took 1-2 s before
    the first shard could be routed), a bulk INSERT elsewhere."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        fixed = tuple(_NEW_SHARD.values())
        rows = [
            dict(zip(_SHARD_COLUMNS, (job_id, i, *span, *fixed, now), strict=True)) for i, span in enumerate(ranges)
        ]
        session.execute(insert(Shard), rows)
        return
    # COPY takes text: the state by its stored value, the JSON list as JSON.
    as_text = tuple(
        v.value if isinstance(v, ShardStatus) else json.dumps(v) if isinstance(v, list) else v
        for v in _NEW_SHARD.values()
    )
    driver = connection.connection.driver_connection
    assert driver is not None
    statement = f"COPY {Shard.__tablename__} ({', '.join(_SHARD_COLUMNS)}) FROM STDIN"
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for i, (start, end) in enumerate(ranges):
            copy.write_row((job_id, i, start, end, *as_text, now))


def submit(runtime: Runtime, request: JobRequest, *, announce: bool = True) -> str:
    """Create the job and its shards, enqueue routing, and return the job id.

    An OpenAI batch JSONL input (told by its content) is converted at submit; its
    endpoint sets the task, and its lines' models are the job's when the request
    names none (``model=[]``). ``announce=False``: no routing message is sent (the
    caller routes the job itself, as ``spotlane run`` does; were it to die first, the
    job is pending in SQL, and the reaper or ``spotlane run --job`` routes it).
    """
    settings = runtime.settings
    refuse_credentials(request.input_url)
    api_models = {m for p in settings.api_providers for m in p.models}

    def resolve(names: list[str]) -> list[str]:
        # A model only an API provider serves is a name, not a folder or a hub id to check.
        return [m if m in api_models else resolve_model(m) for m in names]

    job_id = request.job_id or new_job_id()
    if request.job_id and _exists(runtime, job_id):
        return job_id
    files = expand_input(request.input_url)
    batch: BatchFile | None = None
    task = request.task
    if len(files) == 1 and is_openai_jsonl(files[0]):
        info, batch = _convert(runtime, files[0], job_id)
        try:
            if request.openai_endpoint is not None and batch.endpoint != request.openai_endpoint:
                raise InputError(
                    f"its lines are for {batch.endpoint}, the batch names {request.openai_endpoint}", file=files[0]
                )
            task = batch.task
            if task == "embed" and request.response_schema is not None:
                raise InputError("an embedding job takes no schema (--schema or --choices)", file=files[0])
            models = resolve(request.models or batch.models)
        except BaseException:
            _discard(runtime, job_id, info.url)
            raise
    else:
        if not request.models:
            raise InputError("--model names no model (only an OpenAI batch JSONL input names its own)")
        models = resolve(request.models)
        info = _inspect(runtime, request.input_url, job_id)
    model = models[0]
    try:
        _check_row_models(settings, info, models)
    except InputError:
        if batch is not None:
            _discard(runtime, job_id, info.url)
        raise
    identity = input_identity(info.url)
    rows_per_shard = shard_rows(info.rows, request.rows_per_shard, settings.jobs)
    ranges = plan_shards(info.rows, rows_per_shard)
    now = utcnow()
    try:
        with session_scope(runtime.engine) as session:
            session.add(
                Job(
                    id=job_id,
                    status=JobStatus.PENDING,
                    task=task,
                    model=model,
                    models=models,
                    input_url=info.url,
                    source_url=canonical_url(request.input_url),
                    input_identity=identity,
                    retry_of=request.retry_of,
                    input_kind=info.kind,
                    carried_columns=list(info.carried_columns),
                    max_tokens=0 if task == "embed" else request.max_tokens or settings.jobs.max_tokens,
                    temperature=(settings.jobs.temperature if request.temperature is None else request.temperature),
                    rows_total=info.rows,
                    rows_per_shard=rows_per_shard,
                    shard_count=len(ranges),
                    est_prompt_tokens=_estimate_prompt_tokens(info),
                    budget_usd=request.budget_usd,
                    deadline=request.deadline,
                    tags=dict(request.tags),
                    response_schema=request.response_schema,
                    schema_retries=request.schema_retries,
                    api_key_id=request.api_key_id,
                    openai_endpoint=batch.endpoint if batch is not None else None,
                    input_file_id=request.input_file_id,
                    completion_window=request.completion_window,
                    batch_metadata=request.batch_metadata,
                    use_cache=(settings.cache.enabled and request.use_cache) or request.incremental,
                    refresh_cache=request.refresh_cache,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            _insert_shards(session, job_id, ranges, now)
    except IntegrityError:
        if not request.job_id:
            raise
        if info.url.startswith(_stitched_folder(runtime, job_id)):  # our copy lost the race: remove it
            fs, path = filesystem(info.url)
            fs.rm(path)
        return job_id  # the same scheduled run, submitted twice at once: one job
    # A broker that fails now is not the submit's failure: the job is recorded, and
    # the reaper routes a pending job whose message was lost.
    if announce:
        runtime.send_route(job_id)
    return job_id

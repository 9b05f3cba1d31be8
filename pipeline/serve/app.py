"""The HTTP front: OpenAI's Files and Batches endpoints, for tenant keys.

    spotlane serve            # uvicorn on serve.host:serve.port (loopback unless set)

Stateless: uploads stream to the warm tier (spooled by the multipart parser to a
temporary file, never whole in memory; refused past ``serve.max_file_bytes``), and
everything else is the job store, so any number of replicas run behind a load
balancer. Every request needs ``Authorization: Bearer <key>`` (``spotlane keys
create``); a key sees only its own files and batches (another's are 404, as if they
did not exist), an admin key sees all. ``/`` is a read-only jobs page for a
browser (``pipeline.serve.pages``). Errors have OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) and never carry a traceback.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from pipeline.jobs import control
from pipeline.jobs.submit import JobRequest, submit
from pipeline.runtime import Runtime
from pipeline.serve.batches import (
    batch_id,
    batch_object,
    ensure_output_files,
    file_object,
    job_id_of,
    parse_window,
)
from pipeline.serve.keys import KeyInfo, authenticate
from pipeline.serve.pages import add_pages
from pipeline.storage.objects import filesystem, write_options
from pipeline.storage.openai_batch import ENDPOINTS
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.errors import InputError, NotFound, SpotlaneError, StoreError
from schemas.tables import Job, StoredFile

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: metadata key a batch's budget (USD) is given under.
BUDGET_KEY = "spotlane_budget_usd"
_CHUNK = 1 << 20


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(status, message)
        self.code, self.param = code, param


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "insufficient_quota"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None)


def _tenant(request: Request) -> KeyInfo:
    """The key a request carries (``Authorization: Bearer``); 401 if none is live."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    key = authenticate(request.app.state.runtime, secret.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise ApiError(401, "Incorrect or missing API key (create one with `spotlane keys create`).", "invalid_api_key")
    return key


Tenant = Annotated[KeyInfo, Depends(_tenant)]


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The app; ``runtime`` defaults to the configuration's (``Runtime.open()``)."""
    rt = runtime or Runtime.open()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        rt.engine.dispose()

    app = FastAPI(title="spotlane", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.runtime = rt

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "code", None), getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request", where or None)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("serve: unhandled error")
        return _error(500, "the server failed to handle this request; it was logged", "server_error")

    def own_file(key: KeyInfo, file_id: str) -> StoredFile:
        with session_scope(rt.engine) as session:
            row = session.get(StoredFile, file_id)
            if row is None or row.deleted_at is not None or (row.api_key_id != key.id and not key.admin):
                raise ApiError(404, f"No such File object: {file_id}", "file_not_found", "file_id")
            session.expunge(row)
            return row

    def own_job(session: Session, key: KeyInfo, batch: str) -> Job:
        job_id = job_id_of(batch)
        job = session.get(Job, job_id) if job_id else None
        if job is None or job.openai_endpoint is None or (job.api_key_id != key.id and not key.admin):
            raise ApiError(404, f"No batch found with id '{batch}'.", "batch_not_found", "batch_id")
        return job

    def page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
        data = rows[:limit]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }

    @app.get("/health")
    def health() -> dict[str, str]:
        with session_scope(rt.engine) as session:
            session.execute(select(1))
        return {"status": "ok"}

    @app.post("/v1/files")
    async def upload(key: Tenant, request: Request, file: UploadFile, purpose: Annotated[str, Form()]) -> Any:
        if purpose != "batch":
            raise ApiError(400, f"purpose {purpose!r}: this server takes batch input files only", "invalid_purpose")
        limit = rt.settings.serve.max_file_bytes
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + 65536:
            raise ApiError(413, f"the file is larger than this server takes ({limit} bytes, serve.max_file_bytes)")
        file_id = "file-" + secrets.token_hex(12)
        url = f"{rt.storage.tier('warm').rstrip('/')}/files/{file_id}.jsonl"
        fs, path = filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        size = 0
        try:
            with fs.open(path, "wb", **write_options(rt.storage.storage_class("warm"))) as sink:
                while chunk := await file.read(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the file is larger than this server takes ({limit} bytes)")
                    sink.write(chunk)
        except BaseException:
            if fs.exists(path):
                fs.rm(path)
            raise
        row = StoredFile(
            id=file_id,
            api_key_id=key.id,
            filename=file.filename or "input.jsonl",
            purpose=purpose,
            bytes=size,
            url=url,
            created_at=utcnow(),
        )
        with session_scope(rt.engine) as session:
            session.add(row)
            session.flush()
            return file_object(row)

    @app.get("/v1/files")
    def list_files(
        key: Tenant,
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        after: str | None = None,
        purpose: str | None = None,
        order: str = "desc",
    ) -> Any:
        with session_scope(rt.engine) as session:
            query = select(StoredFile).where(StoredFile.deleted_at.is_(None))
            if not key.admin:
                query = query.where(StoredFile.api_key_id == key.id)
            if purpose:
                query = query.where(StoredFile.purpose == purpose)
            newest = order != "asc"
            ordering = (
                (StoredFile.created_at.desc(), StoredFile.id.desc())
                if newest
                else (StoredFile.created_at, StoredFile.id)
            )
            anchor = session.get(StoredFile, after) if after else None
            if anchor is not None:  # (created_at, id) past the anchor, in the listing's order
                at, name = anchor.created_at, anchor.id
                query = query.where(
                    (StoredFile.created_at < at) | ((StoredFile.created_at == at) & (StoredFile.id < name))
                    if newest
                    else (StoredFile.created_at > at) | ((StoredFile.created_at == at) & (StoredFile.id > name))
                )
            rows = session.scalars(query.order_by(*ordering).limit(limit + 1)).all()
            return page([file_object(r) for r in rows], limit)

    @app.get("/v1/files/{file_id}")
    def get_file(key: Tenant, file_id: str) -> Any:
        return file_object(own_file(key, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(key: Tenant, file_id: str) -> StreamingResponse:
        row = own_file(key, file_id)
        fs, path = filesystem(row.url)

        def stream() -> Iterator[bytes]:
            with fs.open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    yield chunk

        return StreamingResponse(stream(), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(key: Tenant, file_id: str) -> Any:
        row = own_file(key, file_id)
        with session_scope(rt.engine) as session:
            in_use = session.scalars(
                select(Job.id).where(Job.input_file_id == file_id, Job.finished_at.is_(None))
            ).first()
            if in_use is not None:
                raise ApiError(409, f"file {file_id} is the input of {batch_id(in_use)}, still running", "file_in_use")
            stored = session.get(StoredFile, file_id)
            if stored is not None:
                stored.deleted_at = utcnow()
        fs, path = filesystem(row.url)
        if row.job_id is None and fs.exists(path):  # an input; a batch's output stays with its job
            fs.rm(path)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    def create_batch(key: Tenant, body: BatchCreate) -> Any:
        source = own_file(key, body.input_file_id)
        if body.endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint {body.endpoint!r}: use one of {', '.join(ENDPOINTS)}", "invalid_endpoint")
        try:
            window = parse_window(body.completion_window)
        except InputError as exc:
            raise ApiError(400, str(exc), "invalid_completion_window", "completion_window") from None
        metadata = dict(body.metadata or {})
        budget: float | None = None
        if BUDGET_KEY in metadata:
            try:
                budget = float(metadata[BUDGET_KEY])
            except ValueError:
                raise ApiError(400, f"metadata.{BUDGET_KEY} must be a number of USD", "invalid_metadata") from None
        try:
            job_id = submit(
                rt,
                JobRequest(
                    source.url,
                    [],
                    budget_usd=budget,
                    deadline=utcnow() + window,
                    tags={**key.tags, **metadata},
                    api_key_id=key.id,
                    input_file_id=source.id,
                    completion_window=body.completion_window,
                    batch_metadata=body.metadata,
                    openai_endpoint=body.endpoint,
                ),
            )
        except InputError as exc:
            raise ApiError(400, str(exc).replace(f"file {source.url}", f"file {source.id}"), "invalid_file") from None
        with session_scope(rt.engine) as session:
            return batch_object(session, own_job(session, key, batch_id(job_id)))

    @app.get("/v1/batches/{batch}")
    def get_batch(key: Tenant, batch: str) -> Any:
        with session_scope(rt.engine) as session:
            job_id = own_job(session, key, batch).id
        ensure_output_files(rt, job_id)
        with session_scope(rt.engine) as session:
            return batch_object(session, own_job(session, key, batch), rt.settings)

    @app.get("/v1/batches")
    def list_batches(key: Tenant, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None) -> Any:
        with session_scope(rt.engine) as session:
            query = select(Job).where(Job.openai_endpoint.is_not(None), Job.input_file_id.is_not(None))
            if not key.admin:
                query = query.where(Job.api_key_id == key.id)
            anchor_id = job_id_of(after) if after else None
            anchor = session.get(Job, anchor_id) if anchor_id else None
            if anchor is not None:
                query = query.where(
                    (Job.created_at < anchor.created_at)
                    | ((Job.created_at == anchor.created_at) & (Job.id < anchor.id))
                )
            jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
            return page([batch_object(session, j) for j in jobs], limit)

    @app.post("/v1/batches/{batch}/cancel")
    def cancel_batch(key: Tenant, batch: str) -> Any:
        with session_scope(rt.engine) as session:
            job = own_job(session, key, batch)
            job_id, final = job.id, job.status.is_final
        if not final:
            try:
                control.cancel(rt, job_id, reason="cancelled through the Batches API")
            except StoreError as exc:  # finalizing, or ended meanwhile: OpenAI answers with the batch as it is
                if isinstance(exc, NotFound):
                    raise
        ensure_output_files(rt, job_id)
        with session_scope(rt.engine) as session:
            return batch_object(session, own_job(session, key, batch))

    @app.exception_handler(SpotlaneError)
    async def _spotlane(_: Request, exc: SpotlaneError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 400
        return _error(status, str(exc))

    add_pages(app, rt)  # the read-only jobs page: /, /jobs/<id>
    return app

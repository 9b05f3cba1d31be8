"""A read-only jobs page on ``spotlane serve``: what a job is doing, in a browser.

    /                 the jobs a key sees (its own; an admin key: all), newest first, with
                      progress bars, status, cost so far and ETA
    /jobs/<id>        one job: its live numbers, shards (backend, attempts, state), cost by
                      backend, its first error rows, and its results to download
    /jobs/<id>/results.parquet   its rows: the results, or those committed so far

Server-rendered (Jinja2, autoescaped), no JavaScript and no front-end build: a page
whose jobs still run refreshes itself (``<meta http-equiv="refresh">``). The same keys
as the API: signing in with one (``/login``) sets it in an HttpOnly, SameSite=Strict
cookie, so no other site can send it and no script can read it; ``Authorization:
Bearer`` works too. Another key's job is 404, as in the API. The Content-Security-
Policy allows this site's own stylesheet and nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import BackgroundTasks, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from pipeline.jobs.costs import costs
from pipeline.jobs.export import error_rows, export_results
from pipeline.jobs.queries import JobReport, job_status, list_jobs
from pipeline.runtime import Runtime
from pipeline.serve.keys import KeyInfo, authenticate
from pipeline.store.db import session_scope
from schemas.errors import StoreError
from schemas.tables import Job

__all__ = ["COOKIE", "add_pages"]

#: The cookie a signed-in browser carries its key in.
COOKIE = "spotlane_key"
#: Seconds between refreshes of a page whose jobs still run.
REFRESH_SECONDS = 5
#: Jobs on the list page; error rows on a job's page.
LIST_JOBS = 50
ERROR_ROWS = 10
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_HERE = Path(__file__).parent
_templates = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"]))


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _when(value: str | None) -> str:
    return "-" if not value else f"{value[:10]} {value[11:16]} UTC"


_templates.filters["money"] = _money
_templates.filters["when"] = _when


def _key(runtime: Runtime, request: Request) -> KeyInfo | None:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return authenticate(runtime, secret.strip())
    cookie = request.cookies.get(COOKIE)
    return authenticate(runtime, cookie) if cookie else None


def _html(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**context), status_code=status, headers=_HEADERS)


def _own(runtime: Runtime, key: KeyInfo, job_id: str) -> bool:
    with session_scope(runtime.engine) as session:
        owner = session.execute(select(Job.api_key_id).where(Job.id == job_id)).one_or_none()
    return owner is not None and (key.admin or owner[0] == key.id)


def add_pages(app: FastAPI, runtime: Runtime) -> None:
    """The page routes (see the module doc) on ``app``."""

    @app.get("/", response_class=HTMLResponse)
    def jobs_page(request: Request) -> Response:
        key = _key(runtime, request)
        if key is None:
            return _html("login.html", title="Sign in")
        listed = list_jobs(runtime, limit=LIST_JOBS, api_key_id=None if key.admin else key.id)
        reports = [job_status(runtime, j["job_id"], with_shards=False) for j in listed]
        running = any(not r.is_final for r in reports)
        return _html("jobs.html", title="Jobs", key=key, jobs=reports, refresh=REFRESH_SECONDS if running else None)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str) -> Response:
        key = _key(runtime, request)
        if key is None:
            return RedirectResponse("/", status_code=303)
        if not _own(runtime, key, job_id):
            return _html("missing.html", status=404, title="No such job", key=key, job_id=job_id)
        report: JobReport = job_status(runtime, job_id)
        spend = costs(runtime, job_id=job_id, by="backend")
        return _html(
            "job.html",
            title=f"Job {job_id}",
            key=key,
            job=report,
            spend=spend,
            errors=error_rows(runtime, job_id, ERROR_ROWS),
            refresh=None if report.is_final else REFRESH_SECONDS,
        )

    @app.get("/jobs/{job_id}/results.parquet")
    def download(request: Request, job_id: str, background: BackgroundTasks) -> Response:
        key = _key(runtime, request)
        if key is None or not _own(runtime, key, job_id):
            return _html("missing.html", status=404, title="No such job", key=key, job_id=job_id)
        folder = tempfile.mkdtemp(prefix="spotlane-download-")
        target = os.path.join(folder, f"{job_id}.parquet")
        try:
            exported = export_results(runtime, job_id, target, partial=True)
        except (StoreError, OSError):  # results deleted, parts purged, a part gone meanwhile
            exported = None
        if exported is None or not exported.rows:
            _remove(folder)
            return _html("missing.html", status=404, title="No rows to download yet", key=key, job_id=job_id)
        background.add_task(_remove, folder)
        return FileResponse(
            target,
            media_type="application/vnd.apache.parquet",
            filename=f"{job_id}.parquet",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    @app.post("/login")
    def login(request: Request, key: Annotated[str, Form()] = "") -> Response:
        if not _same_site(request):
            return _html("login.html", status=403, title="Sign in", problem="Sign in from this page.")
        found = authenticate(runtime, key.strip())
        if found is None:
            return _html("login.html", status=401, title="Sign in", problem="That key is not a live spotlane key.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            key.strip(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=12 * 3600,
        )
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        if not _same_site(request):
            return _html("login.html", status=403, title="Sign in", problem="Sign out from this page.")
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/static/spotlane.css")
    def stylesheet() -> Response:
        return Response((_HERE / "static" / "spotlane.css").read_text(), media_type="text/css", headers=_HEADERS)


def _same_site(request: Request) -> bool:
    """A form post from this site (or from no browser at all): never one another site made
    a browser send (``Sec-Fetch-Site``, else ``Origin``), so no site can sign a browser in
    with its own key, or out."""
    fetched = request.headers.get("sec-fetch-site")
    if fetched is not None:
        return fetched in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.rstrip("/") == f"{request.url.scheme}://{request.url.netloc}"


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)

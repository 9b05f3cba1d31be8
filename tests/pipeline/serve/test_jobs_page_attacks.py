"""Attacks on the jobs page of ``spotlane serve`` and the live numbers behind it.

Plain HTTP against a real uvicorn server (``serving``): markup in every field the
page shows, another key's job by every URL, revoked keys with their cookie still
set, the cookie's flags, cross-site sign-in and sign-out, the API and the cookie,
the Content-Security-Policy on every HTML answer, jobs with nothing committed or
their parts gone; and the live numbers at their edges (no rows, every row, a clock
that disagrees, a provider batch past its give-up time), a partial export racing
the finalizer, a running batch's metadata.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, update

from pipeline.jobs.export import error_rows, export_results, missing_rows
from pipeline.jobs.progress import live
from pipeline.jobs.queries import job_status
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.serve.batches import batch_object
from pipeline.serve.keys import create_key, revoke_key
from pipeline.store.db import db_now, session_scope
from pipeline.store.transitions import run_record
from pipeline.tasks.finalize import finalize_job
from schemas.base import utcnow
from schemas.status import JobStatus, ProviderBatchStatus, ShardStatus
from schemas.tables import Checkpoint, Job, ProviderBatch, Shard
from tests.support import race, write_prompts
from tests.support.jobs import model_folder, shards, stub_runtime
from tests.support.serve import chat_lines, serving
from workers.engines.stub import FAIL_MARKER
from workers.runner import ShardRunner

PAYLOAD = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>"
CSP = "default-src 'none'"


# -- plumbing ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""

    def cookies(self) -> list[str]:
        return self.headers.get_all("set-cookie") or []


def call(
    root: str,
    path: str,
    *,
    method: str = "GET",
    cookie: str | None = None,
    bearer: str | None = None,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request, exactly as given (the path is not re-encoded, redirects are not followed)."""
    where = urlsplit(root)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    sent = dict(headers or {})
    if cookie is not None:
        sent["Cookie"] = f"spotlane_key={cookie}"
    if bearer is not None:
        sent["Authorization"] = f"Bearer {bearer}"
    body = None
    if form is not None:
        body = urlencode(form).encode()
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        return Answer(answer.status, answer.headers, answer.read())
    finally:
        conn.close()


def _job(runtime: Runtime, tmp_path: Path, key_id: str | None, name: str, rows: int, **extra: Any) -> str:
    path = write_prompts(tmp_path / f"{name}.parquet", rows, **extra)
    return submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=10, api_key_id=key_id))


def _run_first_shard(runtime: Runtime, job_id: str) -> None:
    route_job(runtime, job_id)
    first = next(s for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED)
    with session_scope(runtime.engine) as session:
        record = run_record(session, first.id)
    ShardRunner(runtime).run(record)


def _run_all(runtime: Runtime, job_id: str) -> None:
    runner = ShardRunner(runtime)
    for _ in range(20):
        route_job(runtime, job_id)
        queued = [s for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED]
        if not queued:
            return
        for shard in queued:
            with session_scope(runtime.engine) as session:
                record = run_record(session, shard.id)
            runner.run(record)


def _set_job(runtime: Runtime, job_id: str, **values: Any) -> None:
    with session_scope(runtime.engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _part_urls(runtime: Runtime, job_id: str) -> list[str]:
    with session_scope(runtime.engine) as session:
        return list(
            session.execute(
                select(Checkpoint.url).join(Shard, Shard.id == Checkpoint.shard_id).where(Shard.job_id == job_id)
            ).scalars()
        )


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


@dataclass
class World:
    runtime: Runtime
    root: str
    a_secret: str
    b_secret: str
    admin_secret: str
    a_job: str
    b_job: str
    cli_job: str


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    runtime, _ = stub_runtime(f"sqlite:///{tmp_path / 'attacks.db'}", worker={"checkpoint_rows": 5})
    a, a_secret = create_key(runtime, "team-a")
    b, b_secret = create_key(runtime, "team-b")
    _, admin_secret = create_key(runtime, "ops", admin=True)
    a_job = _job(runtime, tmp_path, a.id, "a", 40)
    b_job = _job(runtime, tmp_path, b.id, "b", 20)
    cli_job = _job(runtime, tmp_path, None, "cli", 10)
    _run_first_shard(runtime, a_job)
    _run_first_shard(runtime, b_job)
    with serving(runtime) as api:
        yield World(runtime, api.removesuffix("/v1"), a_secret, b_secret, admin_secret, a_job, b_job, cli_job)


# -- markup in what the page shows ----------------------------------------------------


def test_markup_in_every_shown_field_is_escaped(tmp_path: Path) -> None:
    runtime, _ = stub_runtime(f"sqlite:///{tmp_path / 'xss.db'}", worker={"checkpoint_rows": 5})
    key, secret = create_key(runtime, "x.y@z-1")
    ids = [f"{PAYLOAD}-{i}" for i in range(20)]
    prompts = [f"{FAIL_MARKER} {PAYLOAD}" if i % 2 else f"question {i}" for i in range(20)]
    path = tmp_path / "evil.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    job_id = submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=10, api_key_id=key.id))
    _run_first_shard(runtime, job_id)
    # An error text with markup in a committed part, as a backend could answer it.
    for url in _part_urls(runtime, job_id):
        table = pq.read_table(_local(url))
        errors = [None if e is None else f"{PAYLOAD} {e}" for e in table.column("error").to_pylist()]
        table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        pq.write_table(table, _local(url))
    assert error_rows(runtime, job_id, 10), "the stub's failing rows are error rows"
    _set_job(runtime, job_id, model=PAYLOAD, error=PAYLOAD, status=JobStatus.PAUSED)  # paused: the reason shows
    with session_scope(runtime.engine) as session:
        session.execute(update(Shard).where(Shard.job_id == job_id).values(backend=PAYLOAD))

    with serving(runtime) as api:
        root = api.removesuffix("/v1")
        pages = [call(root, "/", cookie=secret), call(root, f"/jobs/{job_id}", cookie=secret)]
    for page in pages:
        assert page.status == 200, page.text
        assert "<script" not in page.text.lower()
        assert "<img" not in page.text.lower()
    listed, one = pages
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listed.text  # the stalled reason, in a title attribute
    for shown in ("&lt;img src=x onerror=alert(2)&gt;-1", "&lt;script&gt;alert(1)&lt;/script&gt;"):
        assert shown in one.text  # an input id of an error row, the model, the error, the backend
    assert one.text.count("&lt;script&gt;") >= 4


def test_odd_job_ids_in_urls_are_escaped_and_never_reach_a_file(world: World) -> None:
    odd = [
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        f"..%2F{world.a_job}",
        f"{world.a_job}%00",
        f"{world.a_job}%20",
        # Another case (an id whose hex tail happens to be all digits has none: 6% of them).
        *([world.a_job.upper()] if world.a_job.upper() != world.a_job else []),
        f"{world.b_job}'%20OR%20'1'%3D'1",
        "%25",
    ]
    for job in odd:
        for suffix in ("", "/results.parquet"):
            answer = call(world.root, f"/jobs/{job}{suffix}", cookie=world.a_secret)
            assert answer.status == 404, (job, suffix, answer.status)
            assert "<script" not in answer.text.lower() and "<img" not in answer.text.lower()
            assert "root:" not in answer.text
            if "text/html" in answer.header("content-type"):
                assert CSP in answer.header("content-security-policy"), (job, suffix)


# -- one key, another key's jobs -------------------------------------------------------


@pytest.mark.parametrize("how", ["cookie", "bearer"])
def test_another_keys_job_is_404_on_its_page_and_its_download(world: World, how: str) -> None:
    auth = {how: world.a_secret}
    for job in (world.b_job, world.cli_job):
        for path in (f"/jobs/{job}", f"/jobs/{job}/results.parquet"):
            answer = call(world.root, path, **auth)
            assert answer.status == 404, (path, answer.status)
            assert "parquet" not in answer.header("content-type")
            assert b"PAR1" not in answer.body
    listed = call(world.root, "/", **auth)
    assert world.a_job in listed.text and world.b_job not in listed.text and world.cli_job not in listed.text
    mine = call(world.root, f"/jobs/{world.a_job}/results.parquet", **auth)
    assert mine.status == 200 and pq.read_table(io.BytesIO(mine.body)).num_rows == 10


def test_a_missing_job_and_another_keys_job_answer_alike(world: World) -> None:
    theirs = call(world.root, f"/jobs/{world.b_job}", cookie=world.a_secret)
    nobody = call(world.root, "/jobs/job_doesnotexist", cookie=world.a_secret)
    assert theirs.status == nobody.status == 404
    assert theirs.text.replace(world.b_job, "X") == nobody.text.replace("job_doesnotexist", "X")


def test_an_admin_key_sees_and_downloads_every_job(world: World) -> None:
    listed = call(world.root, "/", cookie=world.admin_secret)
    assert all(j in listed.text for j in (world.a_job, world.b_job, world.cli_job))
    for job in (world.a_job, world.b_job, world.cli_job):
        assert call(world.root, f"/jobs/{job}", cookie=world.admin_secret).status == 200
    download = call(world.root, f"/jobs/{world.b_job}/results.parquet", cookie=world.admin_secret)
    assert download.status == 200 and pq.read_table(io.BytesIO(download.body)).num_rows == 10


def test_a_revoked_key_with_its_cookie_still_set_sees_nothing(world: World) -> None:
    revoke_key(world.runtime, "team-a")
    front = call(world.root, "/", cookie=world.a_secret)
    assert front.status == 200 and "Sign in" in front.text and world.a_job not in front.text
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    assert page.status == 303 and page.header("location") == "/"
    download = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    assert download.status == 404 and b"PAR1" not in download.body
    assert call(world.root, "/", bearer=world.a_secret).text.count(world.a_job) == 0
    again = call(world.root, "/login", method="POST", form={"key": world.a_secret})
    assert again.status == 401 and not again.cookies()


def test_a_bad_bearer_header_does_not_fall_back_to_a_good_cookie_of_another_key(world: World) -> None:
    answer = call(world.root, f"/jobs/{world.b_job}", bearer="sk-spl-nonsense", cookie=world.b_secret)
    assert answer.status == 303  # the header is what is checked: no key, signed out


# -- the cookie and its flags -----------------------------------------------------------


def test_sign_in_sets_an_httponly_strict_cookie_and_sign_out_clears_it(world: World) -> None:
    answer = call(world.root, "/login", method="POST", form={"key": f"  {world.a_secret}\n"})
    assert answer.status == 303 and answer.header("location") == "/"
    assert world.a_secret not in answer.header("location")
    (cookie,) = answer.cookies()
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert flags[0] == f"spotlane_key={world.a_secret}".lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "max-age=43200" in flags
    out = call(world.root, "/logout", method="POST", cookie=world.a_secret)
    assert out.status == 303
    (cleared,) = out.cookies()
    assert cleared.startswith('spotlane_key=""') and "max-age=0" in cleared.lower()


def test_the_cookie_is_secure_when_the_page_is_served_over_https(world: World) -> None:
    """Behind a TLS proxy (uvicorn trusts X-Forwarded-Proto from 127.0.0.1) the key's
    cookie should never be sent over plain HTTP."""
    answer = call(
        world.root, "/login", method="POST", form={"key": world.a_secret}, headers={"X-Forwarded-Proto": "https"}
    )
    assert answer.status == 303
    (cookie,) = answer.cookies()
    assert "secure" in [part.strip().lower() for part in cookie.split(";")], cookie


def test_sign_in_from_another_site_is_refused(world: World) -> None:
    """Login CSRF: a page on another site posting its own key to /login signs the
    victim's browser in as the attacker (SameSite does not stop a cookie being *set*
    by a top-level cross-site POST)."""
    answer = call(
        world.root,
        "/login",
        method="POST",
        form={"key": world.b_secret},
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert answer.status in (400, 403), answer.status
    assert not answer.cookies()


def test_sign_out_from_another_site_is_refused(world: World) -> None:
    answer = call(
        world.root,
        "/logout",
        method="POST",
        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert answer.status in (400, 403), answer.status
    assert not answer.cookies()


def test_the_login_form_takes_no_key_from_the_query_string(world: World) -> None:
    answer = call(world.root, f"/login?key={world.a_secret}", method="POST")
    assert answer.status == 401 and not answer.cookies()
    assert call(world.root, f"/login?key={world.a_secret}").status in (404, 405)


def test_the_api_never_takes_the_cookie(world: World) -> None:
    for path in ("/v1/batches", "/v1/files", f"/v1/batches/batch_{world.a_job}", "/v1/files/file-x"):
        answer = call(world.root, path, cookie=world.admin_secret)
        assert answer.status == 401, (path, answer.status)
    answer = call(world.root, "/v1/batches/batch_x/cancel", method="POST", cookie=world.admin_secret)
    assert answer.status == 401


# -- the Content-Security-Policy ------------------------------------------------------


def test_every_html_answer_carries_the_policy(world: World) -> None:
    answers = {
        "signed out /": call(world.root, "/"),
        "signed in /": call(world.root, "/", cookie=world.a_secret),
        "job": call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret),
        "job 404": call(world.root, "/jobs/nope", cookie=world.a_secret),
        "download 404 signed out": call(world.root, f"/jobs/{world.a_job}/results.parquet"),
        "download 404": call(world.root, "/jobs/nope/results.parquet", cookie=world.a_secret),
        "login 401": call(world.root, "/login", method="POST", form={"key": "nope"}),
        "login 401 empty": call(world.root, "/login", method="POST"),
        "stylesheet": call(world.root, "/static/spotlane.css"),
        "unknown": call(world.root, "/nowhere", cookie=world.a_secret),
        "login GET": call(world.root, "/login"),
    }
    for name, answer in answers.items():
        if "text/html" in answer.header("content-type"):
            policy = answer.header("content-security-policy")
            assert CSP in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy, name
            assert answer.header("x-content-type-options") == "nosniff", name
            assert "no-store" in answer.header("cache-control"), name
    assert answers["login 401"].status == 401 and answers["login 401 empty"].status == 401
    assert answers["job 404"].status == 404 and answers["download 404 signed out"].status == 404
    assert answers["stylesheet"].header("content-type").startswith("text/css")


def test_the_download_is_not_cached_or_sniffed(world: World) -> None:
    """The rows of a tenant's job are as private as its page: no shared cache may keep them."""
    answer = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    assert answer.status == 200
    assert "attachment" in answer.header("content-disposition")
    assert "no-store" in answer.header("cache-control"), dict(answer.headers)
    assert answer.header("x-content-type-options") == "nosniff"


# -- jobs with nothing committed, or their parts gone -----------------------------------


def test_a_job_with_nothing_committed_renders_and_downloads_no_broken_file(world: World, tmp_path: Path) -> None:
    key = call(world.root, "/", cookie=world.a_secret)
    assert key.status == 200
    with session_scope(world.runtime.engine) as session:
        a_key = session.execute(select(Job.api_key_id).where(Job.id == world.a_job)).scalar_one()
    fresh = _job(world.runtime, tmp_path, a_key, "fresh", 30)
    page = call(world.root, f"/jobs/{fresh}", cookie=world.a_secret)
    assert page.status == 200 and "0/30 done" in page.text and "None so far." in page.text
    report = job_status(world.runtime, fresh)
    assert report.live is not None and report.live.eta is None and report.live.rows_per_second == 0.0
    assert report.live.basis == "estimate" and report.live.projected_usd >= 0.0
    assert missing_rows(world.runtime, fresh) == [(0, 30)]
    assert error_rows(world.runtime, fresh, 10) == []
    answer = call(world.root, f"/jobs/{fresh}/results.parquet", cookie=world.a_secret)
    if answer.status == 200:  # a download must be a readable Parquet file (of no rows), or none at all
        assert answer.body[:4] == b"PAR1", f"{len(answer.body)} bytes that are not Parquet"
        assert pq.read_table(io.BytesIO(answer.body)).num_rows == 0
    else:
        assert answer.status == 404


def test_a_partial_export_of_nothing_committed_is_a_readable_file(world: World, tmp_path: Path) -> None:
    fresh = _job(world.runtime, tmp_path, None, "fresh", 30)
    target = tmp_path / "out" / "partial.parquet"
    done = export_results(world.runtime, fresh, str(target), partial=True)
    assert done.rows == 0 and done.missing == [(0, 30)]
    if target.exists():
        assert pq.read_table(target).num_rows == 0


def test_a_finished_job_whose_results_and_parts_were_deleted(world: World) -> None:
    _run_all(world.runtime, world.a_job)
    finalize_job(world.runtime, world.a_job)
    _set_job(world.runtime, world.a_job, result_url=None, checkpoints_purged_at=utcnow(), results_deleted_at=utcnow())
    before = set(Path(tempfile.gettempdir()).glob("spotlane-download-*"))
    download = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    leaked = set(Path(tempfile.gettempdir()).glob("spotlane-download-*")) - before
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    assert (page.status, download.status, leaked) == (200, 404, set()), (page.text[:200], download.text[:200])
    assert "None so far." in page.text and CSP in download.header("content-security-policy")


def test_a_cancelled_job_whose_parts_were_purged(world: World) -> None:
    _set_job(
        world.runtime, world.a_job, status=JobStatus.CANCELLED, finished_at=utcnow(), checkpoints_purged_at=utcnow()
    )
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    assert page.status == 200
    download = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    assert download.status == 404


def test_a_part_vanishing_under_the_page_does_not_crash_it_or_leak_a_download_folder(world: World) -> None:
    """A purge (or an operator) removing a part file between the listing of parts and
    their reading: the page should still render, the download fail cleanly."""
    before = set(Path(tempfile.gettempdir()).glob("spotlane-download-*"))
    for url in _part_urls(world.runtime, world.a_job):
        os.unlink(_local(url))
    download = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    leaked = set(Path(tempfile.gettempdir()).glob("spotlane-download-*")) - before
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    assert (download.status, page.status, leaked) == (404, 200, set()), download.text


# -- live numbers at their edges ---------------------------------------------------------


def _live_now(runtime: Runtime, job_id: str, shift: timedelta = timedelta(0)) -> Any:
    report = job_status(runtime, job_id)
    with session_scope(runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return live(session, runtime.settings, job, report.rows_done, db_now(session) + shift), db_now(session) + shift


def test_live_numbers_of_a_job_with_no_rows_total(world: World) -> None:
    _set_job(world.runtime, world.a_job, rows_total=0)
    numbers, _ = _live_now(world.runtime, world.a_job)
    assert numbers.eta is None and numbers.projected_usd == pytest.approx(numbers.spent_usd, abs=1e-12)
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    listed = call(world.root, "/", cookie=world.a_secret)
    assert page.status == 200 and listed.status == 200
    assert "fill-100" in page.text


def test_live_numbers_when_every_row_is_done_but_the_job_is_not_final(world: World) -> None:
    _run_all(world.runtime, world.a_job)  # every shard done, not finalized: still running
    numbers, _ = _live_now(world.runtime, world.a_job)
    assert numbers.eta is None
    assert numbers.projected_usd == pytest.approx(numbers.spent_usd)
    assert numbers.projected_low_usd <= numbers.projected_usd <= numbers.projected_high_usd
    assert not numbers.stalled


def test_live_numbers_with_more_rows_done_than_the_total(world: World) -> None:
    _set_job(world.runtime, world.a_job, rows_total=5)  # 10 committed
    numbers, _ = _live_now(world.runtime, world.a_job)
    assert numbers.eta is None and numbers.projected_usd >= numbers.spent_usd
    page = call(world.root, f"/jobs/{world.a_job}", cookie=world.a_secret)
    assert page.status == 200
    assert "fill-200" not in page.text  # the bar's class stays within the stylesheet's steps


@pytest.mark.parametrize("skew", [timedelta(hours=-3), timedelta(hours=3)])
def test_live_numbers_with_a_clock_that_disagrees(world: World, skew: timedelta) -> None:
    """Parts stamped by the database's clock, ``now`` from another's: the rate stays finite
    and positive, the ETA in the future, the stall's seconds not negative."""
    with session_scope(world.runtime.engine) as session:
        ids = [s.id for s in session.execute(select(Shard).where(Shard.job_id == world.a_job)).scalars()]
        session.execute(update(Checkpoint).where(Checkpoint.shard_id.in_(ids)).values(created_at=utcnow() + skew))
        session.execute(update(Job).where(Job.id == world.a_job).values(started_at=utcnow() + skew))
    numbers, now = _live_now(world.runtime, world.a_job)
    assert numbers.rows_per_second >= 0.0 and numbers.rows_per_second < 1e9
    if numbers.eta is not None:
        assert datetime.fromisoformat(numbers.eta) >= now
    if numbers.stalled and numbers.stalled_reason and "for " in numbers.stalled_reason:
        assert "-" not in numbers.stalled_reason.split("for ", 1)[1]


def test_the_eta_is_never_in_the_past_for_a_provider_batch_past_its_give_up_time(world: World) -> None:
    job = world.a_job
    waiting = next(s for s in shards(world.runtime, job) if s.status is not ShardStatus.DONE)
    past = utcnow() - timedelta(hours=2)
    with session_scope(world.runtime.engine) as session:
        session.add(
            ProviderBatch(
                job_id=job,
                shard_id=waiting.id,
                attempt=1,
                backend="prov.batch",
                model="m",
                marker="attack-marker",
                status=ProviderBatchStatus.SUBMITTED,
                first_row=waiting.row_start,
                row_end=waiting.row_end,
                give_up_at=past,
                next_poll_at=past,
            )
        )
        # No part lately: only the provider's give-up time gives an ETA.
        ids = [s.id for s in session.execute(select(Shard).where(Shard.job_id == job)).scalars()]
        session.execute(
            update(Checkpoint).where(Checkpoint.shard_id.in_(ids)).values(created_at=utcnow() - timedelta(hours=3))
        )
    numbers, now = _live_now(world.runtime, job)
    assert numbers.eta is None or datetime.fromisoformat(numbers.eta) >= now, (numbers.eta, now)


# -- a partial export racing the finalizer ------------------------------------------------


def test_a_partial_export_racing_the_finalizer_gets_every_committed_row_once(world: World, tmp_path: Path) -> None:
    _run_all(world.runtime, world.a_job)
    target = tmp_path / "race.parquet"
    exported, _ = race(
        lambda: export_results(world.runtime, world.a_job, str(target), partial=True),
        lambda: finalize_job(world.runtime, world.a_job),
    )
    ids = pq.read_table(target).column("id").to_pylist()
    assert ids == [f"row-{i:05d}" for i in range(40)] and exported.rows == 40
    answer = call(world.root, f"/jobs/{world.a_job}/results.parquet", cookie=world.a_secret)
    assert answer.status == 200
    assert pq.read_table(io.BytesIO(answer.body)).column("id").to_pylist() == ids


# -- a running batch's metadata ------------------------------------------------------------


def _raw_api(root: str, path: str, secret: str, body: Any = None, files: Path | None = None) -> tuple[int, Any]:
    if files is not None:
        boundary = "attackboundary"
        data = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                f"Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + files.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    else:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
    where = urlsplit(root)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        conn.request(
            "POST" if data is not None else "GET",
            path,
            body=data,
            headers={**headers, "Authorization": f"Bearer {secret}"},
        )
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        conn.close()


def test_a_running_batch_carries_its_live_numbers_as_strings_and_keeps_its_own_metadata(
    world: World, tmp_path: Path
) -> None:
    lines = chat_lines(tmp_path / "in.jsonl", 30, str(model_folder(tmp_path)))
    status, uploaded = _raw_api(world.root, "/v1/files", world.a_secret, files=lines)
    assert status == 200, uploaded
    metadata = {"team": "<b>a</b>", "spotlane_budget_usd": "5"}
    status, batch = _raw_api(
        world.root,
        "/v1/batches",
        world.a_secret,
        {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "metadata": metadata},
    )
    assert status == 200, batch
    status, got = _raw_api(world.root, f"/v1/batches/{batch['id']}", world.a_secret)
    assert status == 200
    shown = got["metadata"]
    assert shown["team"] == "<b>a</b>" and shown["spotlane_budget_usd"] == "5"
    assert all(isinstance(v, str) for v in shown.values())
    assert float(shown["spotlane_rows_per_second"]) == 0.0 and shown["spotlane_eta"] == ""
    assert float(shown["spotlane_projected_usd"]) >= float(shown["spotlane_spent_usd"]) >= 0.0
    assert all(len(v) <= 512 for v in shown.values())
    # Another key cannot read it, live numbers or not.
    assert _raw_api(world.root, f"/v1/batches/{batch['id']}", world.b_secret)[0] == 404
    # A batch that ended shows what it was given, without live numbers.
    job_id = batch["id"].removeprefix("batch_")
    _set_job(world.runtime, job_id, status=JobStatus.FAILED, finished_at=utcnow(), error="x")
    with session_scope(world.runtime.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert batch_object(session, job, world.runtime.settings)["metadata"] == metadata

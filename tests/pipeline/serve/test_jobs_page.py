"""The jobs page of ``spotlane serve``, in a real headless browser (Debian's chromium,
driven by Playwright): sign in with a key, see its jobs' progress, open one, download
its rows so far; another key's job stays invisible. A screenshot of the main page is
kept and its progress bar measured as the browser laid it out."""

from __future__ import annotations

import io
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.serve.keys import create_key
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from tests.support import write_prompts
from tests.support.jobs import model_folder, shards, stub_runtime
from tests.support.serve import serving
from workers.runner import ShardRunner

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: As this machine's notes say: no sandbox as root, and no background traffic (the network is closed).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (apt-get install chromium): .ci/run installs it")
        pytest.skip("no chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield launched
        finally:
            launched.close()


def _shows(page: object, title: str) -> None:
    """The page has navigated to the one titled ``title`` and loaded: a click's navigation
    has only begun when ``click`` returns, the new document's title not yet parsed."""
    from playwright.sync_api import expect

    expect(page).to_have_title(title)  # type: ignore[arg-type]  # retried until it holds (5 s)
    page.wait_for_load_state()  # type: ignore[attr-defined]


def _job_of(runtime: Runtime, tmp_path: Path, key_id: str, name: str, rows: int) -> str:
    path = write_prompts(tmp_path / f"{name}.parquet", rows)
    return submit(runtime, JobRequest(str(path), model_folder(tmp_path), rows_per_shard=10, api_key_id=key_id))


def test_a_key_sees_its_jobs_progress_opens_one_and_downloads_its_rows_so_far(tmp_path: Path, browser: object) -> None:
    runtime, _ = stub_runtime(f"sqlite:///{tmp_path / 'page.db'}", worker={"checkpoint_rows": 5})
    mine, secret = create_key(runtime, "team-a")
    theirs, _ = create_key(runtime, "team-b")
    job_id = _job_of(runtime, tmp_path, mine.id, "a", 40)
    hidden = _job_of(runtime, tmp_path, theirs.id, "b", 10)
    route_job(runtime, job_id)
    first = shards(runtime, job_id)[0]
    with session_scope(runtime.engine) as session:
        record = run_record(session, first.id)
    ShardRunner(runtime).run(record)  # 10 of 40 rows: a quarter done, the job still running

    with serving(runtime) as api:
        root = api.removesuffix("/v1")
        page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
        page.goto(root + "/")
        _shows(page, "Sign in · spotlane")
        page.fill("#key", "sk-spl-not-a-key")
        page.click("button[type=submit]")
        assert "not a live spotlane key" in page.inner_text("[role=alert]")

        page.fill("#key", secret)
        page.click("button[type=submit]")
        _shows(page, "Jobs · spotlane")
        rows = page.query_selector_all("tr.job")
        assert [r.get_attribute("data-job") for r in rows] == [job_id]  # team-b's job is not listed
        row = rows[0]
        assert row.query_selector(".status").inner_text() == "running"
        assert "10/40" in row.inner_text()
        bar = row.query_selector(".bar").bounding_box()
        fill = row.query_selector(".bar .fill").bounding_box()
        assert bar and fill and fill["width"] / bar["width"] == pytest.approx(0.25, abs=0.01)
        assert page.query_selector("meta[http-equiv=refresh]") is not None  # it refreshes while jobs run
        shot = page.screenshot(path=str(tmp_path / "jobs.png"), full_page=True)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 5_000
        cookie = next(c for c in page.context.cookies() if c["name"] == "spotlane_key")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        page.click(f"a[href='/jobs/{job_id}']")
        _shows(page, f"Job {job_id} · spotlane")
        states = [r.inner_text().split("\t") for r in page.query_selector_all("table.shards tbody tr")]
        assert len(states) == 4 and [s[1] for s in states].count("done") == 1
        assert "stub" in page.inner_text("body") or "local" in page.inner_text("body")
        download = page.request.get(root + f"/jobs/{job_id}/results.parquet")
        assert download.ok
        table = pq.read_table(io.BytesIO(download.body()))
        assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(10)]

        response = page.goto(root + f"/jobs/{hidden}")
        assert response is not None and response.status == 404  # another key's job does not exist
        assert "default-src 'none'" in (response.headers.get("content-security-policy") or "")

        page.click("header button[type=submit]")  # sign out
        _shows(page, "Sign in · spotlane")

        request = urllib.request.Request(api + "/batches", headers={"Cookie": f"spotlane_key={secret}"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API wants its header, never the cookie
            urllib.request.urlopen(request)
        assert refused.value.code == 401

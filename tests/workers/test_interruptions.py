"""Spot notices, repeated preemptions, cancel and resume: nothing lost, nothing done twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from tests.support import spotlane, stop_process, write_prompts
from workers.drain import StopFlag
from workers.spot_notice import SpotNoticeProbe, notice_in


class _Metadata:
    """A local stand-in for the instance-metadata service: 404 until told otherwise.

    With ``tokens_required`` it behaves as IMDSv2 with ``HttpTokens = required``: a
    GET without a session token from ``PUT /latest/api/token`` is answered 401.
    """

    TOKEN = "AQAEAFake-session-token=="

    def __init__(self) -> None:
        self.action: str | None = None
        self.tokens_required = False
        self.token_requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    outer.token_requests += 1
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(outer.TOKEN.encode())
                    return
                self.send_response(400)
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                if outer.tokens_required and self.headers.get("X-aws-ec2-metadata-token") != outer.TOKEN:
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                    self.end_headers()
                    return
                if outer.action is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"action": outer.action, "time": "2026-11-25T20:00:00Z"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/spot/instance-action"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def metadata() -> Iterator[_Metadata]:
    service = _Metadata()
    yield service
    service.server.shutdown()


def test_the_aws_notice_format_is_read() -> None:
    assert notice_in(404, b"") is None
    assert notice_in(200, b'{"action": "terminate", "time": "2026-11-25T20:00:00Z"}') == "terminate"
    assert notice_in(200, b"not json") is None


def test_the_probe_sets_the_drain_flag_when_the_notice_appears(metadata: _Metadata) -> None:
    stop = StopFlag()
    probe = SpotNoticeProbe(metadata.url, 0.05, stop)
    probe.start()
    time.sleep(0.3)
    assert not stop

    metadata.action = "terminate"
    probe.join(5)

    assert stop and probe.action == "terminate"


def test_the_probe_speaks_imdsv2_where_tokens_are_required(metadata: _Metadata) -> None:
    """Review M12: with HttpTokens=required every plain GET got 401, read as 'no notice'."""
    metadata.tokens_required = True
    stop = StopFlag()
    probe = SpotNoticeProbe(metadata.url, 0.05, stop)
    probe.start()
    time.sleep(0.3)
    assert not stop

    metadata.action = "terminate"
    probe.join(5)

    assert stop and probe.action == "terminate" and metadata.token_requests >= 1


def test_the_probe_takes_only_http_urls_and_follows_no_redirect(metadata: _Metadata) -> None:
    with pytest.raises(ValueError, match="must be an http:// URL"):
        SpotNoticeProbe("file:///etc/passwd", 1, StopFlag())
    probe = SpotNoticeProbe(metadata.url.replace("/latest/meta-data/spot/instance-action", "/redirect"), 1, StopFlag())

    assert probe._poll() is None


def _db(home: Path):  # type: ignore[no-untyped-def]
    return create_engine(f"sqlite:///{home / 'spotlane.db'}")


def _scalar(home: Path, sql: str) -> object:
    with _db(home).connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env={**os.environ, **env},
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )  # noqa: SIM115


# Parts of 10 rows throughout (not grown with the speed): the tests count them.
SLOW = {
    "SPOTLANE_WORKER__CHECKPOINT_ROWS": "10",
    "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": "10",
    "SPOTLANE_WORKER__MAX_BATCH_ROWS": "2",
}


def _finish_with_another_worker(env: dict[str, str], tmp_path: Path, home: Path, job_id: str) -> None:
    second = _worker(env, tmp_path / "w2.log")
    try:
        _wait(lambda: _scalar(home, f"select status from jobs where id = '{job_id}'") == "succeeded", 120, "success")
    finally:
        stop_process(second)


@pytest.mark.slow
def test_a_spot_notice_drains_the_worker_and_the_next_one_finishes(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path, metadata: _Metadata
) -> None:
    env = {
        **SLOW,
        "SPOTLANE_WORKER__SPOT_NOTICE_URL": metadata.url,
        "SPOTLANE_WORKER__SPOT_NOTICE_INTERVAL_SECONDS": "0.2",
    }
    job_id = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 120)),
        "--model",
        str(tiny_model),
        "--rows-per-shard",
        "120",
        "--max-tokens",
        "24",
        env=env,
    ).stdout.strip()
    first = _worker(env, tmp_path / "w1.log")
    _wait(lambda: int(_scalar(spotlane_home, "select count(*) from checkpoints")) >= 2, 120, "checkpoints")  # type: ignore[call-overload]

    metadata.action = "terminate"
    assert first.wait(60) == 0  # drained and exited by itself

    assert _scalar(spotlane_home, "select outcome from shard_attempts") == "preempted"
    assert _scalar(spotlane_home, "select status from shards") == "queued"
    metadata.action = None
    _finish_with_another_worker(env, tmp_path, spotlane_home, job_id)
    assert _scalar(spotlane_home, "select sum(row_count) from checkpoints") == 120
    assert _scalar(spotlane_home, "select count(*) from checkpoints") == 12


@pytest.mark.slow
def test_a_shard_preempted_max_times_goes_back_to_the_router(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    env = {**SLOW, "SPOTLANE_ROUTING__MAX_PREEMPTIONS": "1"}
    job_id = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 120)),
        "--model",
        str(tiny_model),
        "--rows-per-shard",
        "120",
        "--max-tokens",
        "24",
        env=env,
    ).stdout.strip()
    first = _worker(env, tmp_path / "w1.log")
    _wait(lambda: int(_scalar(spotlane_home, "select count(*) from checkpoints")) >= 1, 120, "a checkpoint")  # type: ignore[call-overload]
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0

    # Not straight back to its queue: to the router (which the draining worker may already have run).
    assert "preempted 1 times: back to the router" in (tmp_path / "w1.log").read_text()
    assert _scalar(spotlane_home, "select status from shards") in ("pending", "queued")
    _finish_with_another_worker(env, tmp_path, spotlane_home, job_id)
    assert _scalar(spotlane_home, "select sum(row_count) from checkpoints") == 120


@pytest.mark.slow
def test_cancel_keeps_finished_rows_and_resume_redoes_only_the_rest(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    job_id = spotlane(
        "submit",
        str(write_prompts(tmp_path / "in.parquet", 160)),
        "--model",
        str(tiny_model),
        "--rows-per-shard",
        "40",
        "--max-tokens",
        "24",
        env=SLOW,
    ).stdout.strip()
    worker = _worker(SLOW, tmp_path / "w.log")
    try:
        _wait(lambda: int(_scalar(spotlane_home, "select count(*) from checkpoints")) >= 2, 120, "checkpoints")  # type: ignore[call-overload]
        cancelled = spotlane("cancel", job_id)
        assert cancelled.returncode == 0 and "rows are finished and kept" in cancelled.stdout
        _wait(
            lambda: _scalar(spotlane_home, "select count(*) from shards where status = 'running'") == 0,
            60,
            "the running shard to stop",
        )
        kept = _scalar(spotlane_home, "select sum(rows_done) from shards")
        assert _scalar(spotlane_home, f"select status from jobs where id = '{job_id}'") == "cancelled"
        assert 0 < int(kept) < 160  # type: ignore[call-overload]

        resumed = spotlane("resume", job_id)
        assert resumed.returncode == 0, resumed.stderr
        _wait(
            lambda: _scalar(spotlane_home, f"select status from jobs where id = '{job_id}'") == "succeeded",
            180,
            "success",
        )
    finally:
        worker.terminate()
        worker.wait(30)
    exported = spotlane("results", job_id, "--to", str(tmp_path / "out.parquet"))
    assert exported.returncode == 0
    ids = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    assert ids == [f"row-{i:05d}" for i in range(160)]
    assert _scalar(spotlane_home, "select count(*) from checkpoints") == 16

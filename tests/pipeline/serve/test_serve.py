"""``spotlane serve`` as OpenAI's own client uses it: files, batches, keys, budgets, errors.

A real uvicorn server in a thread, the official ``openai`` SDK as the client, the
job store on SQLite and PostgreSQL; jobs are worked by the real runner on the stub
engine (``run_queued``) or, for the API lane, against a local OpenAI-compatible
provider.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from pipeline.jobs.export import export_results
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.serve.keys import create_key, list_keys, revoke_key
from pipeline.store.db import session_scope
from pipeline.store.transitions import run_record
from schemas.status import LedgerKind, ShardStatus
from tests.support import openai_server
from tests.support.jobs import (
    drive_to_the_end,
    job_row,
    ledger_sum,
    model_folder,
    provider_runtime,
    run_queued,
    shards,
    stub_runtime,
)
from tests.support.serve import chat_lines, serving
from workers.runner import ShardRunner


@pytest.fixture
def served(store_url: str) -> Iterator[tuple[Runtime, str]]:
    runtime, _ = stub_runtime(store_url, worker={"checkpoint_rows": 5}, jobs={"rows_per_shard": 10})
    with serving(runtime) as url:
        yield runtime, url


def client(url: str, runtime: Runtime, name: str, **key: Any) -> openai.OpenAI:
    _, secret = create_key(runtime, name, **key)
    return openai.OpenAI(base_url=url, api_key=secret, max_retries=0)


def raw(url: str, *, key: str | None = None, body: bytes | None = None) -> tuple[int, dict[str, Any], str]:
    """A request without the SDK: (status, JSON body, text)."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read().decode()
            return answer.status, json.loads(text), text
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        return exc.code, json.loads(text), text


def started_batch(sdk: openai.OpenAI, runtime: Runtime, path: Path, window: str) -> Any:
    """A batch of ``path`` created through the SDK, its first shard (10 rows) run, the rest not."""
    with path.open("rb") as fh:
        uploaded = sdk.files.create(file=fh, purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=window)
    job_id = batch.id.removeprefix("batch_")
    route_job(runtime, job_id)
    first = next(s for s in shards(runtime, job_id) if s.status is ShardStatus.QUEUED)
    with session_scope(runtime.engine) as session:
        record = run_record(session, first.id)
    ShardRunner(runtime).run(record)
    return batch


def lines(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.decode().splitlines()]


def test_upload_create_poll_download_every_custom_id_once(served: tuple[Runtime, str], tmp_path: Path) -> None:
    runtime, url = served
    sdk = client(url, runtime, "team-a", tags={"team": "a"})
    path = chat_lines(tmp_path / "batch.jsonl", 23, model_folder(tmp_path), max_tokens=8)

    uploaded = sdk.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size and uploaded.filename == "batch.jsonl"
    assert sdk.files.content(uploaded.id).content == path.read_bytes()
    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "nightly"},
    )
    assert batch.status == "validating" and batch.request_counts is not None and batch.request_counts.total == 23
    assert batch.metadata == {"purpose": "nightly"} and batch.expires_at is not None
    job_id = batch.id.removeprefix("batch_")
    assert job_row(runtime, job_id).tags == {"team": "a", "purpose": "nightly"}  # the key's tags, then metadata

    run_queued(runtime, job_id)
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (23, 0)
    assert done.output_file_id and done.error_file_id is None
    out = lines(sdk.files.content(done.output_file_id).content)
    assert [line["custom_id"] for line in out] == [f"req-{i:05d}" for i in range(23)]  # each once, in order
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert body.choices[0].message.content and body.usage is not None and body.usage.completion_tokens > 0
    assert sdk.batches.retrieve(batch.id).output_file_id == done.output_file_id  # written once, recorded once

    listed = sdk.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    files = sdk.files.list()
    assert {f.id for f in files.data} == {uploaded.id, done.output_file_id}
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)


def test_keys_see_only_their_own_files_and_batches(served: tuple[Runtime, str], tmp_path: Path) -> None:
    runtime, url = served
    alice, bob = client(url, runtime, "alice"), client(url, runtime, "bob")
    uploaded = alice.files.create(
        file=chat_lines(tmp_path / "a.jsonl", 3, model_folder(tmp_path)).open("rb"), purpose="batch"
    )
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")

    for call in (
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.files.delete(uploaded.id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):  # 404, as if it did not exist: not 403
            call()
    assert bob.files.list().data == [] and bob.batches.list().data == []
    assert [b.id for b in alice.batches.list().data] == [batch.id]

    revoke_key(runtime, "alice")
    with pytest.raises(openai.AuthenticationError):
        alice.batches.list()
    assert [k.name for k in list_keys(runtime) if k.revoked_at is None] == ["bob"]


def test_cancel_keeps_the_finished_rows_and_lists_the_rest_as_errors(
    served: tuple[Runtime, str], tmp_path: Path
) -> None:
    runtime, url = served
    sdk = client(url, runtime, "c")
    batch = started_batch(sdk, runtime, chat_lines(tmp_path / "c.jsonl", 30, model_folder(tmp_path)), "24h")
    job_id = batch.id.removeprefix("batch_")  # one shard's rows answered, then the batch is cancelled
    done_rows = sum(s.rows_done for s in shards(runtime, job_id))
    assert 0 < done_rows < 30

    cancelled = sdk.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.output_file_id and cancelled.error_file_id
    out = lines(sdk.files.content(cancelled.output_file_id).content)
    errors = lines(sdk.files.content(cancelled.error_file_id).content)
    assert len(out) == done_rows and all(line["response"]["status_code"] == 200 for line in out)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    ids = [line["custom_id"] for line in out + errors]
    assert sorted(ids) == [f"req-{i:05d}" for i in range(30)]  # every custom_id exactly once over the two files


def test_bad_requests_get_openai_shaped_errors_naming_the_line(served: tuple[Runtime, str], tmp_path: Path) -> None:
    runtime, url = served
    sdk = client(url, runtime, "d")
    path = chat_lines(tmp_path / "d.jsonl", 4, model_folder(tmp_path))
    text = path.read_text().splitlines()
    text[2] = text[2].replace('"custom_id"', '"custom_idx"')
    path.write_text("\n".join(text) + "\n")
    uploaded = sdk.files.create(file=path.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "line 3" in refused.value.message and "custom_id" in refused.value.message
    assert refused.value.body is not None and set(refused.value.body) >= {"message", "type", "code"}  # type: ignore[arg-type]
    assert str(tmp_path) not in refused.value.message  # the server's paths are not the client's business
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="soon")
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")  # type: ignore[arg-type]

    status, body, _ = raw(f"{url}/batches", key="sk-spl-not-a-key")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert raw(f"{url}/batches")[0] == 401
    status, body, text = raw(f"{url}/batches", key=sdk.api_key, body=b"{")
    assert status == 400 and "Traceback" not in text and set(body["error"]) == {"message", "type", "param", "code"}


def test_a_keys_budget_caps_all_its_batches_together(store_url: str, tmp_path: Path) -> None:
    """Two batches of one key on a paid provider: together they never hold or spend past the key's budget."""
    with openai_server.FakeOpenAI() as provider:
        runtime = provider_runtime(store_url, provider.url, usd_per_1m=200.0, worker={"checkpoint_rows": 5})
        with serving(runtime) as url:
            sdk = client(url, runtime, "capped", budget_usd=0.05)
            jobs = []
            for name in ("one", "two"):
                uploaded = sdk.files.create(
                    file=chat_lines(tmp_path / f"{name}.jsonl", 40, "m", max_tokens=16).open("rb"), purpose="batch"
                )
                made = sdk.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                jobs.append(made.id.removeprefix("batch_"))
            highest = 0.0
            for job_id in jobs:
                drive_to_the_end(runtime, job_id, budget=float("inf"))
                highest = max(highest, sum(ledger_sum(runtime, j) for j in jobs))
            spent = sum(ledger_sum(runtime, j, LedgerKind.CHARGE) for j in jobs)
            assert spent <= 0.05 + 1e-9 and highest <= 0.05 + 1e-9
            assert spent > 0.02  # the budget was used, not refused outright
            statuses = [sdk.batches.retrieve(f"batch_{j}").status for j in jobs]
            assert "in_progress" in statuses  # the second is paused for money (a job.paused event)
            assert [k.committed_usd for k in list_keys(runtime)] == [
                pytest.approx(sum(ledger_sum(runtime, j) for j in jobs))
            ]


def test_cli_runs_a_batch_file_and_exports_openai_lines(runtime: Runtime, tmp_path: Path) -> None:
    runtime.settings.worker.engine = "stub"
    path = chat_lines(tmp_path / "e.jsonl", 12, model_folder(tmp_path), max_tokens=4)
    from pipeline.jobs.submit import JobRequest, submit

    job_id = submit(runtime, JobRequest(str(path), []))  # the lines name the model
    assert job_row(runtime, job_id).openai_endpoint == "/v1/chat/completions"
    run_queued(runtime, job_id)
    exported = export_results(
        runtime, job_id, str(tmp_path / "out.jsonl"), errors_to=str(tmp_path / "err.jsonl"), fmt="openai"
    )
    assert exported.rows == 12 and exported.errors == 0
    out = lines((tmp_path / "out.jsonl").read_bytes())
    assert [line["custom_id"] for line in out] == [f"req-{i:05d}" for i in range(12)]
    assert (tmp_path / "err.jsonl").read_bytes() == b""


def test_a_batch_past_its_window_expires_keeping_its_rows(served: tuple[Runtime, str], tmp_path: Path) -> None:
    from datetime import timedelta

    from pipeline.tasks.reaper import reap
    from schemas.base import utcnow
    from schemas.tables import Job

    runtime, url = served
    sdk = client(url, runtime, "e")
    batch = started_batch(sdk, runtime, chat_lines(tmp_path / "x.jsonl", 20, model_folder(tmp_path)), "1h")
    job_id = batch.id.removeprefix("batch_")
    uploaded = sdk.files.retrieve(batch.input_file_id)
    with session_scope(runtime.engine) as session:  # the hour has passed
        job = session.get(Job, job_id)
        assert job is not None
        job.deadline = utcnow() - timedelta(seconds=1)

    assert reap(runtime).batches_expired == 1
    expired = sdk.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at is not None
    assert expired.output_file_id and expired.error_file_id
    out = lines(sdk.files.content(expired.output_file_id).content)
    errors = lines(sdk.files.content(expired.error_file_id).content)
    assert len(out) == 10 and {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == 10

    page = sdk.files.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    rest = sdk.files.list(limit=10, after=page.data[0].id)
    assert {f.id for f in page.data + rest.data} == {uploaded.id, expired.output_file_id, expired.error_file_id}


def test_a_running_batch_carries_its_live_numbers_in_its_metadata(served: tuple[Runtime, str], tmp_path: Path) -> None:
    runtime, url = served
    sdk = client(url, runtime, "team-live")
    batch = started_batch(sdk, runtime, chat_lines(tmp_path / "live.jsonl", 30, model_folder(tmp_path)), "24h")

    running = sdk.batches.retrieve(batch.id)
    assert running.status == "in_progress" and running.request_counts is not None
    assert running.request_counts.completed == 10
    meta = running.metadata or {}
    assert float(meta["spotlane_rows_per_second"]) > 0 and meta["spotlane_eta"]
    assert float(meta["spotlane_spent_usd"]) >= 0 and float(meta["spotlane_projected_usd"]) >= 0
    assert all(isinstance(v, str) for v in meta.values())  # OpenAI's metadata holds strings

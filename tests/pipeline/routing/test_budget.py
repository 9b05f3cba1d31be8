"""The budget is a hard cap on provider-billed spend, whatever the estimate said.

Review findings H3 (CJK prompts billed 4x the estimate: $10.80 spent on $5), H4 (a
negative max_tokens made a negative reservation: $38 on $10), L6 (absurd usage
charged as reported) and L10 (cancel racing a claim), attacked against a local
OpenAI-compatible server that bills what real providers bill.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from pipeline.jobs.control import cancel, set_budget
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.runtime import Runtime
from pipeline.store import claims, transitions
from pipeline.store.db import session_scope
from schemas.backends import PROMPT_ROLE, input_token_bound
from schemas.errors import InputError
from schemas.status import JobStatus, LedgerKind, ShardStatus
from schemas.tables import CostLedgerEntry
from tests.support import openai_server, race, spotlane, write_prompts
from tests.support.jobs import (
    drive_to_the_end,
    job_row,
    ledger_sum,
    model_folder,
    provider_runtime,
    shards,
    stub_runtime,
)
from workers.runner import ShardRunner

CJK = "請幫我總結這張關於帳單錯誤的支援工單並提出解決方案" * 4  # 100 characters, 300 UTF-8 bytes


def _bills_every_character(body: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer that makes one token of every CJK character, and answers with all of max_tokens."""
    prompt = body["messages"][-1]["content"]
    limit = int(body.get("max_tokens") or 16)
    return {
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "x" * limit}}],
        "usage": {
            "prompt_tokens": len(prompt) + 7,
            "completion_tokens": limit,
            "total_tokens": len(prompt) + 7 + limit,
        },
    }


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[openai_server.FakeOpenAI]:
    monkeypatch.setattr(openai_server, "_answer", _bills_every_character)
    with openai_server.FakeOpenAI() as server:
        yield server


def _runtime(store_url: str, url: str, **worker: Any) -> Runtime:
    return provider_runtime(store_url, url, usd_per_1m=1000.0, worker=worker)


def test_prompts_that_cost_four_times_the_estimate_never_spend_past_the_budget(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    """H3: the router reserved characters / 4; the provider billed a token per character."""
    runtime = _runtime(store_url, provider.url)
    path = tmp_path / "cjk.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(100)], "prompt": [CJK] * 100}), path)
    budget = 5.0
    # The same prompt on every row: the answer cache would ask it once (use_cache=False: every row pays).
    job_id = submit(
        runtime,
        JobRequest(str(path), "m", max_tokens=8, rows_per_shard=20, budget_usd=budget, use_cache=False),
    )

    highest = drive_to_the_end(runtime, job_id, budget)

    spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
    assert highest <= budget + 1e-9 and spent <= budget + 1e-9
    assert spent == pytest.approx(provider.ok * (len(CJK) + 7 + 8) / 1e6 * 1000.0)  # charged what was billed
    assert spent > budget * 0.9  # the budget is used, up to the last row whose worst case fits
    job = job_row(runtime, job_id)
    assert job.status is JobStatus.PAUSED and "budget" in (job.error or "")
    assert {s.status for s in shards(runtime, job_id)} >= {ShardStatus.DONE, ShardStatus.BLOCKED}

    # Raising the budget runs the rest, still never past it.
    assert set_budget(runtime, job_id, 20.0) == "running"
    assert drive_to_the_end(runtime, job_id, 20.0) <= 20.0 + 1e-9
    assert {s.status for s in shards(runtime, job_id)} == {ShardStatus.DONE}


def test_a_provider_that_bills_beyond_any_bound_is_charged_the_bound_and_stopped(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    """L6 inside a job: usage of 10**12 tokens was charged as $1,000,000,000."""
    runtime = _runtime(store_url, provider.url)
    provider.usage = (10**12, 10**12)
    job_id = submit(
        runtime,
        JobRequest(
            str(write_prompts(tmp_path / "in.parquet", 40)), "m", max_tokens=8, rows_per_shard=20, budget_usd=2.0
        ),
    )

    drive_to_the_end(runtime, job_id, 2.0)

    assert 0 < ledger_sum(runtime, job_id, LedgerKind.CHARGE) <= 2.0


def test_the_reservation_counts_every_token_the_clamp_lets_a_provider_bill(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    """Found attacking the batch lane: the clamp counted a plain prompt's role ("user") in
    its bound, the reservation did not, so a provider billing every request's whole bound
    spent 4 tokens a row past what was held. A budget of exactly the old reservation."""
    runtime = _runtime(store_url, provider.url)
    provider.usage = (10**9, 10**9)
    path = write_prompts(tmp_path / "in.parquet", 20)
    prompts = [str(p) for p in pq.read_table(path).column("prompt").to_pylist()]
    budget = sum(input_token_bound(len(p.encode()), 1, 1) + 8 for p in prompts) * 1000.0 / 1e6
    job_id = submit(runtime, JobRequest(str(path), "m", max_tokens=8, rows_per_shard=20, budget_usd=budget))

    assert drive_to_the_end(runtime, job_id, budget) <= budget + 1e-9
    billed = sum(input_token_bound(len(p.encode()) + len(PROMPT_ROLE), 1, 1) + 8 for p in prompts[:19]) / 1e3
    assert ledger_sum(runtime, job_id, LedgerKind.CHARGE) == pytest.approx(billed)  # 19 rows fit, at their bound


def test_the_budget_lowered_while_a_shard_runs_parks_it_at_its_next_chunk(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    runtime = _runtime(store_url, provider.url)
    job_id = submit(
        runtime,
        JobRequest(
            str(write_prompts(tmp_path / "in.parquet", 40)), "m", max_tokens=8, rows_per_shard=40, budget_usd=100.0
        ),
    )
    route_job(runtime, job_id)
    (shard,) = shards(runtime, job_id)
    provider.latency = 0.2
    runner = ShardRunner(runtime)
    with session_scope(runtime.engine) as session:
        record = transitions.run_record(session, shard.id)
    thread = threading.Thread(target=runner.run, args=(record,))
    thread.start()
    while shards(runtime, job_id)[0].rows_done < 10:
        pass
    set_budget(runtime, job_id, 0.05)  # less than what is already spent and held
    thread.join()
    route_job(runtime, job_id)  # what the parked shard's worker asked for

    (shard,) = shards(runtime, job_id)
    assert shard.status is ShardStatus.BLOCKED and 10 <= shard.rows_done < 40
    assert job_row(runtime, job_id).status is JobStatus.PAUSED
    assert ledger_sum(runtime, job_id) == pytest.approx(ledger_sum(runtime, job_id, LedgerKind.CHARGE))  # nothing held


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("max_tokens", [5, -10_000_000, 5], "row 1: max_tokens -10000000 is below 1"),
        ("max_tokens", [5, 5, 0], "row 2: max_tokens 0 is below 1"),
        ("temperature", [0.0, float("nan"), 0.5], "row 1: temperature nan is not a number in \\[0, 5\\]"),
        ("temperature", [-0.5, 0.0, 0.5], "row 0: temperature -0.5 is not a number in \\[0, 5\\]"),
    ],
)
def test_per_row_limits_a_request_cannot_have_are_refused_at_submit(
    runtime: Runtime, tmp_path: Path, column: str, values: list[Any], message: str
) -> None:
    """H4: a negative per-row max_tokens made the estimate, and the reservation, negative."""
    path = write_prompts(tmp_path / "in.parquet", 3, **{column: values})

    with pytest.raises(InputError, match=message):
        submit(runtime, JobRequest(str(path), model_folder(tmp_path)))

    with runtime.engine.connect() as conn:
        assert conn.exec_driver_sql("select count(*) from jobs").scalar_one() == 0


def test_the_cli_refuses_a_negative_max_tokens_row_with_exit_2(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "in.parquet", 3, max_tokens=[5, -1, 5])

    result = spotlane("submit", str(path), "--model", model_folder(tmp_path))

    assert result.returncode == 2 and "column 'max_tokens', row 1: max_tokens -1 is below 1" in result.stderr


@pytest.mark.postgres
def test_cancel_racing_claims_never_releases_a_running_shards_reservation(postgres_url: str, tmp_path: Path) -> None:
    """L10: cancel selected queued shards, released their reservations, then updated;
    a shard claimed in between kept running with nothing reserved."""
    runtime, _ = stub_runtime(postgres_url, gpu_pools=[{"name": "local", "price_per_hour": 36.0}])
    for attempt in range(5):
        job_id = submit(
            runtime,
            JobRequest(
                str(write_prompts(tmp_path / f"in{attempt}.parquet", 40)),
                model_folder(tmp_path),
                rows_per_shard=5,
                budget_usd=100.0,
            ),
        )
        route_job(runtime, job_id)

        def claim(shard_id: int) -> None:
            with session_scope(runtime.engine) as session:
                claims.claim_shard(session, shard_id, f"w:{shard_id}:t", 60, "local")

        race(*(partial(claim, s.id) for s in shards(runtime, job_id)), partial(cancel, runtime, job_id))
        with session_scope(runtime.engine) as session:
            for shard in shards(runtime, job_id):
                held = session.execute(
                    select(func.coalesce(func.sum(CostLedgerEntry.amount_usd), 0.0)).where(
                        CostLedgerEntry.shard_id == shard.id
                    )
                ).scalar_one()
                if shard.status is ShardStatus.RUNNING:
                    assert held > 0, "a running shard has its reservation"
                else:
                    assert shard.status is ShardStatus.PENDING and abs(held) < 1e-9

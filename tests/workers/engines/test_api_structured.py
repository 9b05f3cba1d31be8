"""Structured outputs on an API lane: the schema sent, every answer validated, re-asked with
the reason, every attempt paid for and reserved ahead, the budget never passed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing import observations as learning
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.backends import ApiProvider
from schemas.inference import Request
from schemas.status import LedgerKind
from schemas.structured import choices_schema
from tests.support import openai_server
from tests.support.jobs import drive_to_the_end, job_row, ledger_sum, provider_runtime, shards
from workers.engines.chunks import Chunk, merge
from workers.engines.openai_http import APIEngine

LABELS = choices_schema(["spam", "ham"])
SEEN: list[dict[str, Any]] = []


def _labels_a_third_wrong_at_first(body: dict[str, Any]) -> dict[str, Any]:
    """Valid labels, except: a first answer to every third prompt is not JSON; a prompt saying
    'never' is answered wrongly every time. Usage: a token per byte, the whole max_tokens out."""
    SEEN.append(body)
    prompt = body["messages"][0]["content"]
    first = len(body["messages"]) == 1
    wrong = "never" in prompt or (first and int(prompt.split()[-1]) % 3 == 0)
    content = "spam, I think" if wrong else json.dumps("ham")
    text = sum(len(m["content"].encode()) for m in body["messages"])
    limit = int(body["max_tokens"])
    return {
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": text, "completion_tokens": limit, "total_tokens": text + limit},
    }


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[openai_server.FakeOpenAI]:
    SEEN.clear()
    monkeypatch.setattr(openai_server, "_answer", _labels_a_third_wrong_at_first)
    with openai_server.FakeOpenAI() as server:
        yield server


def test_invalid_answers_are_asked_again_with_the_reason_and_every_attempt_is_counted(
    provider: openai_server.FakeOpenAI,
) -> None:
    api = ApiProvider(
        name="prov", base_url=provider.url, models={"m": "m"}, input_usd_per_1m=1.0, output_usd_per_1m=2.0
    )
    engine = APIEngine(api, "m")
    schema = json.dumps(LABELS)
    requests = [
        Request(prompt=f"label ticket {i}", max_tokens=4, response_schema=schema, schema_retries=2) for i in range(9)
    ]
    requests.append(Request(prompt="never right 1", max_tokens=4, response_schema=schema, schema_retries=2))
    try:
        done = engine.generate(requests)
    finally:
        engine.close()

    assert [c.output for c in done[:9]] == ['"ham"'] * 9
    assert [c.tries for c in done[:9]] == [2, 1, 1, 2, 1, 1, 2, 1, 1]  # the first answers to 0, 3, 6 were not JSON
    assert done[9].tries == 3 and done[9].output == "spam, I think"  # retries spent: the last answer is kept
    assert provider.ok == 9 + 3 + 3
    reask = next(b for b in SEEN if len(b["messages"]) == 3)
    assert (
        reask["response_format"]["json_schema"]["schema"] == LABELS
        and reask["response_format"]["json_schema"]["strict"]
    )
    assert reask["messages"][1] == {"role": "assistant", "content": "spam, I think"}
    assert "does not follow the JSON Schema: not JSON" in reask["messages"][2]["content"]
    bodies = {b["messages"][0]["content"]: [] for b in SEEN}
    for body in SEEN:
        bodies[body["messages"][0]["content"]].append(body)
    billed = sum(
        sum(len(m["content"].encode()) for m in b["messages"]) * 1.0 / 1e6 + 4 * 2.0 / 1e6
        for b in bodies["never right 1"]
    )
    assert done[9].cost_usd == pytest.approx(billed)  # all three attempts
    table = pa.table({"id": [str(i) for i in range(10)], "prompt": [r.prompt for r in requests]})
    checked = merge(Chunk(0, table, list(requests), [None] * 10), done)
    assert checked[9].finish_reason == "error" and checked[9].error == "schema: not JSON: Expecting value (character 0)"
    assert checked[9].output == "spam, I think" and checked[9].cost_usd == done[9].cost_usd
    assert all(c.error is None for c in checked[:9])


def _runtime(store_url: str, url: str) -> Runtime:
    return provider_runtime(store_url, url, usd_per_1m=100.0)


def test_a_schema_job_on_an_api_lane_reserves_every_reask_and_never_passes_its_budget(
    store_url: str, tmp_path: Path, provider: openai_server.FakeOpenAI
) -> None:
    runtime = _runtime(store_url, provider.url)
    path = tmp_path / "in.parquet"
    prompts = [f"never right {i}" if i % 4 == 0 else f"label ticket {i}" for i in range(60)]
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(60)], "prompt": prompts}), path)
    budget = 1.0
    job_id = submit(
        runtime,
        JobRequest(str(path), "m", max_tokens=4, rows_per_shard=20, budget_usd=budget, response_schema=LABELS),
    )

    highest = drive_to_the_end(runtime, job_id, budget)

    spent = ledger_sum(runtime, job_id, LedgerKind.CHARGE)
    assert highest <= budget + 1e-9 and spent <= budget + 1e-9
    billed = sum((sum(len(m["content"].encode()) for m in b["messages"]) + 4) * 100.0 / 1e6 for b in SEEN)
    assert spent == pytest.approx(billed)  # every attempt charged, re-asks included
    done = sum(s.rows_done for s in shards(runtime, job_id))
    assert done >= 40  # most rows answered before the money ran short (each reservation holds 3 attempts)
    assert job_row(runtime, job_id).budget_usd == budget

    # What the router learnt: a re-ask rate (a moving average over chunks that the budget
    # made small at the end, so only its bounds are sure), and sizes from first asks only
    # (this provider bills a token a byte: one ASCII character per token exactly; a
    # re-ask's prompt, counted in, would make it less).
    with session_scope(runtime.engine) as session:
        seen = learning.observed(session, "prov", "m")
    assert seen is not None and seen.reask_rate is not None
    assert 0.0 < seen.reask_rate <= 2.0
    assert seen.chars_per_token == pytest.approx(1.0) and seen.output_fill == pytest.approx(1.0)


def test_the_routers_estimate_counts_the_expected_reasks_and_its_worst_cases_every_one() -> None:
    from pipeline.routing.estimate import profile_requests
    from pipeline.routing.observations import Observed
    from pipeline.routing.pricing import api_cost, quote, reasked_worst_case_usd
    from schemas.backends import REASK_NOTE_BYTES, RoutingSettings

    api = ApiProvider(
        name="p", base_url="http://127.0.0.1:1", models={"m": "m"}, input_usd_per_1m=1.0, output_usd_per_1m=2.0
    )
    schema = json.dumps(LABELS)
    rows = [Request(prompt=f"label ticket {i}" * (i + 1), max_tokens=8, response_schema=schema) for i in range(5)]
    profile = profile_requests(rows)
    assert profile.structured_rows == 5
    routing = RoutingSettings(reask_rate=0.5)

    def learnt(rate: float | None) -> Observed:
        return Observed(None, None, 0.0, None, None, None, None, 1, reask_rate=rate)

    once = quote(api, "m", profile, None, routing)
    prior = quote(api, "m", profile, None, routing, schema_retries=2)
    none_seen = quote(api, "m", profile, learnt(0.0), routing, schema_retries=2)
    every_one = quote(api, "m", profile, learnt(7.0), routing, schema_retries=2)
    assert once is not None and prior is not None and none_seen is not None and every_one is not None

    # The estimate: half a re-ask a row (the prior), each the row's prompt, answer and
    # note, answered again; what was observed replaces the prior, capped at the retries.
    tokens_in = profile.input_tokens(routing.chars_per_token)
    tokens_out = profile.max_tokens
    reask_in = (tokens_in + tokens_out) / 5 + REASK_NOTE_BYTES / routing.chars_per_token
    expected = api_cost(api, tokens_in + int(2.5 * reask_in), tokens_out + int(2.5 * tokens_out / 5))
    assert prior.cost_usd == pytest.approx(expected)
    assert prior.seconds == pytest.approx(once.seconds * 7.5 / 5)
    assert none_seen.cost_usd == once.cost_usd
    assert every_one.cost_usd > prior.cost_usd
    assert every_one.output_tokens == tokens_out + int(10 * tokens_out / 5)  # two re-asks a row, not seven
    # Rows without a schema are never re-asked.
    free = profile_requests([Request(prompt=r.prompt, max_tokens=8) for r in rows])
    assert quote(api, "m", free, learnt(1.0), routing, schema_retries=2).cost_usd == once.cost_usd  # type: ignore[union-attr]

    # The worst cases hold every attempt, with prompts that grow by each re-ask.
    worst_row = profile.worst_row()
    assert prior.row_reserve_usd == pytest.approx(
        reasked_worst_case_usd(api, worst_row.input_bound(exact_tokenizer=False), worst_row.max_tokens, 2)
    )
    assert prior.reserve_usd > 3 * once.reserve_usd  # three answers, and prompts that grow

"""Rows that open the same way (a system prompt, a few-shot block) are batched together:
the transformers engine runs their shared prefix once per micro-batch, and the server
engine sends them back to back so that the server's prefix cache holds the prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from schemas.backends import GpuPool
from schemas.inference import Request
from tests.support.openai_server import FakeOpenAI
from workers.engines.batching import PREFIX_CHARS, BatchItem, grouped_order, plan_batches, prefix_groups
from workers.engines.hf import HFEngine
from workers.engines.server import ServerEngine

SYSTEMS = [f"You are reviewer {k}. Read the text and answer in one short sentence. " * 6 for k in range(3)]


def _chat(system: str, question: str, **extra: object) -> Request:
    return Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], **extra)  # type: ignore[arg-type]


def _workload(rows: int, seed: int = 7, **extra: object) -> list[Request]:
    """``rows`` questions under three system prompts, interleaved at random."""
    rng = random.Random(seed)
    return [_chat(rng.choice(SYSTEMS), f"question {i}: what is {i} and {i * 7}?", **extra) for i in range(rows)]


def test_prefix_groups_put_rows_of_one_opening_together_and_leave_loners_out() -> None:
    long_block = "Examples: a -> b. " * 20  # a few-shot block longer than PREFIX_CHARS
    assert len(long_block) > PREFIX_CHARS
    rows = [
        _chat(SYSTEMS[0], "q0"),
        Request(prompt=long_block + "first"),
        _chat(SYSTEMS[1], "q2"),
        _chat(SYSTEMS[0], "q3"),
        Request(prompt="short prompt"),  # too short to have a shared opening
        Request(prompt=long_block + "second"),
        _chat(SYSTEMS[2], "q6"),  # the only row under its system prompt
        Request(messages=[{"role": "user", "content": "no system message"}]),
    ]
    keys = prefix_groups(rows)
    assert keys[0] == keys[3] and keys[1] == keys[5] and None not in (keys[0], keys[1])
    assert keys[0] != keys[1]
    assert keys[2] is None and keys[4] is None and keys[6] is None and keys[7] is None
    assert grouped_order(rows) == [0, 3, 1, 5, 2, 4, 6, 7]  # groups by first sight, loners last, in order


def test_a_micro_batch_never_mixes_prefix_groups() -> None:
    rng = random.Random(3)
    items = [BatchItem(i, rng.randint(5, 50), 8, 0.0, None, rng.choice(["a", "b", None])) for i in range(300)]
    batches = plan_batches(items, token_budget=4096, max_rows=64)
    assert sorted(it.index for b in batches for it in b) == list(range(300))  # each row once
    assert all(len({it.prefix for it in b}) == 1 for b in batches)
    assert len(batches) <= 3 * 5  # groups are packed, not split row by row


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> tuple[HFEngine, HFEngine]:
    return HFEngine(str(tiny_model), device="cpu", prefix_reuse=False), HFEngine(str(tiny_model), device="cpu")


def test_the_shared_prefix_is_run_once_a_batch_and_answers_do_not_change(engines: tuple[HFEngine, HFEngine]) -> None:
    whole, shared = engines
    rows = _workload(48, max_tokens=6)
    before = whole.generate(rows)
    after = shared.generate(rows)
    assert [(c.output, c.finish_reason, c.input_tokens, c.output_tokens) for c in after] == [
        (c.output, c.finish_reason, c.input_tokens, c.output_tokens) for c in before
    ]
    assert all(c.error is None for c in after)
    assert whole.prefill_reused == 0 and whole.prefill_tokens == sum(c.input_tokens for c in before)
    assert shared.prefill_tokens + shared.prefill_reused == whole.prefill_tokens
    assert shared.prefill_reused > 0.6 * whole.prefill_tokens  # the system prompts are most of each prompt


def test_rows_sharing_nothing_take_the_plain_path(engines: tuple[HFEngine, HFEngine]) -> None:
    _, shared = engines
    reused = shared.prefill_reused
    done = shared.generate([Request(prompt=f"row {i} has its own words", max_tokens=4) for i in range(10)])
    assert all(c.error is None for c in done)
    assert shared.prefill_reused == reused


def test_sampled_and_schema_bound_rows_share_their_prefix_too(engines: tuple[HFEngine, HFEngine]) -> None:
    whole, shared = engines
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    rows = _workload(12, seed=11, max_tokens=24, response_schema=schema)
    reused = shared.prefill_reused
    before, after = whole.generate(rows), shared.generate(rows)
    assert [c.output for c in after] == [c.output for c in before]  # greedy: the same tokens
    assert shared.prefill_reused > reused
    for c in after:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.output or "")["n"], int)
    sampled = shared.generate(_workload(12, seed=5, max_tokens=6, temperature=0.8))
    assert all(c.error is None and c.output_tokens > 0 for c in sampled)


def _misses(rows: list[Request], *, grouped: bool, window: int) -> int:
    """System-prompt words the server computed (not found in its one-prompt cache)."""
    with FakeOpenAI(latency=0.005, prefix_cache=1) as server:
        pool = GpuPool(name="srv", engine="server", server_url=server.url, server_max_concurrency=window)
        engine = ServerEngine(pool, "m")
        engine.group_prefixes = grouped
        try:
            done = engine.generate(rows)
        finally:
            engine.close()
        assert [c.output for c in done] == [f"echo: question {i}: what is" for i in range(len(rows))]  # input order
        system_words = sum(len(r.messages[0]["content"].split()) for r in rows)  # type: ignore[index]
        return system_words - server.cached_tokens


def test_the_server_engine_sends_a_group_back_to_back_so_the_prefix_cache_hits() -> None:
    rows = _workload(90, max_tokens=4)
    per_prompt = len(SYSTEMS[0].split())
    # One request at a time, the server sees the order sent: each group's prompt is
    # computed once; interleaved, at almost every row.
    assert _misses(rows, grouped=True, window=1) == len(SYSTEMS) * per_prompt
    assert _misses(rows, grouped=False, window=1) >= 30 * per_prompt
    # Many in flight, requests of two groups can arrive mixed where one group ends and
    # the next begins (how mixed depends on the machine's load); still far fewer misses.
    assert 2 * _misses(rows, grouped=True, window=256) < _misses(rows, grouped=False, window=256)

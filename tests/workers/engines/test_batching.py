from __future__ import annotations

import random

from workers.engines.batching import BatchItem, plan_batches


def _items(n: int, seed: int = 0) -> list[BatchItem]:
    rng = random.Random(seed)
    return [BatchItem(i, rng.randint(1, 300), rng.choice([8, 32, 128]), rng.choice([0.0, 0.0, 0.7])) for i in range(n)]


def test_every_item_lands_in_exactly_one_batch() -> None:
    items = _items(500)

    batches = plan_batches(items, token_budget=4096, max_rows=16)

    assert sorted(it.index for b in batches for it in b) == list(range(500))


def test_batches_respect_the_padded_token_budget_and_row_cap() -> None:
    batches = plan_batches(_items(500, seed=1), token_budget=4096, max_rows=16)

    for batch in batches:
        padded = len(batch) * (max(i.prompt_tokens for i in batch) + max(i.max_new_tokens for i in batch))
        assert len(batch) <= 16
        assert padded <= 4096 or len(batch) == 1


def test_rows_with_different_temperatures_never_share_a_batch() -> None:
    for batch in plan_batches(_items(300, seed=2), token_budget=100_000, max_rows=64):
        assert len({i.temperature for i in batch}) == 1


def test_similar_lengths_are_grouped_to_limit_padding() -> None:
    items = [BatchItem(i, 10 if i % 2 else 200, 16) for i in range(64)]

    batches = plan_batches(items, token_budget=100_000, max_rows=32)

    assert [sorted({i.prompt_tokens for i in b}) for b in batches] == [[200], [10]]


def test_an_item_larger_than_the_budget_still_runs_alone() -> None:
    batches = plan_batches([BatchItem(0, 5000, 100), BatchItem(1, 10, 10)], token_budget=1000, max_rows=8)

    assert [[i.index for i in b] for b in batches] == [[0], [1]]

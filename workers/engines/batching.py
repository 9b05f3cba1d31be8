"""Planning micro-batches from what a shard already tells us: lengths and limits.

A shard's requests are known up front, so rows are sorted by sampling settings and
prompt length and packed greedily under a padded-token budget: ``rows x (longest
prompt + largest max_new_tokens)`` never exceeds ``token_budget``. Grouping similar
lengths keeps padding (wasted compute) low; the caller restores input order.
Pure Python: no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BatchItem", "plan_batches"]


@dataclass(frozen=True)
class BatchItem:
    #: Position in the caller's list, to restore order afterwards.
    index: int
    prompt_tokens: int
    max_new_tokens: int
    temperature: float = 0.0
    #: The JSON Schema (JSON text) this row's answer follows; None: free text.
    schema: str | None = None


def plan_batches(items: Sequence[BatchItem], token_budget: int, max_rows: int) -> list[list[BatchItem]]:
    """Group ``items`` into micro-batches; every item lands in exactly one batch.

    An item too large for the budget on its own still gets a batch of one.
    """
    ordered = sorted(items, key=lambda it: (it.temperature, -it.max_new_tokens, -it.prompt_tokens, it.index))
    batches: list[list[BatchItem]] = []
    current: list[BatchItem] = []
    longest = widest = 0
    for item in ordered:
        new_longest = max(longest, item.prompt_tokens)
        new_widest = max(widest, item.max_new_tokens)
        fits = (
            current
            and current[0].temperature == item.temperature
            and len(current) < max_rows
            and (len(current) + 1) * (new_longest + new_widest) <= token_budget
        )
        if current and not fits:
            batches.append(current)
            current, new_longest, new_widest = [], item.prompt_tokens, item.max_new_tokens
        current.append(item)
        longest, widest = new_longest, new_widest
    if current:
        batches.append(current)
    return batches

"""Planning micro-batches from what a shard already tells us: lengths and limits.

A shard's requests are known up front, so rows are sorted by sampling settings, shared
prefix and prompt length and packed greedily under a padded-token budget: ``rows x
(longest prompt + largest max_new_tokens)`` never exceeds ``token_budget``. Grouping
similar lengths keeps padding (wasted compute) low; grouping rows that open the same
way (one system prompt, one few-shot block: ``prefix_groups``) lets an engine compute
that prefix once for the batch (the transformers engine) or find it in its prefix
cache (a serving engine). The caller restores input order. Pure Python: no torch here.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.inference import Request

__all__ = ["PREFIX_CHARS", "BatchItem", "grouped_order", "plan_batches", "prefix_groups"]

#: Rows whose first this many characters agree (the system message, for chat rows)
#: are one prefix group. Long enough that a shared opening is a real prompt, short
#: enough that a long system prompt with different questions still groups.
PREFIX_CHARS = 256


def _opening(request: Request) -> str | None:
    """What a row opens with: its system message, or the start of its prompt."""
    if request.messages:
        first = request.messages[0]
        if first.get("role") == "system":
            return "system\0" + (first.get("content") or "")
        return None
    prompt = request.prompt or ""
    return "prompt\0" + prompt[:PREFIX_CHARS] if len(prompt) > PREFIX_CHARS else None


def prefix_groups(requests: Sequence[Request]) -> list[str | None]:
    """Each row's prefix group: a hash its rows share, or None for a row that shares its
    opening with no other row of ``requests`` (grouping it gains nothing)."""
    keys = [
        hashlib.blake2b(o.encode(), digest_size=8).hexdigest() if (o := _opening(r)) is not None else None
        for r in requests
    ]
    counts = Counter(k for k in keys if k is not None)
    return [k if k is not None and counts[k] > 1 else None for k in keys]


def grouped_order(requests: Sequence[Request]) -> list[int]:
    """Positions of ``requests`` with each prefix group's rows together (groups in order of
    first appearance, rows in input order within a group; ungrouped rows last)."""
    keys = prefix_groups(requests)
    first: dict[str | None, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i if k is not None else len(keys))
    return sorted(range(len(keys)), key=lambda i: (first[keys[i]], i))


@dataclass(frozen=True)
class BatchItem:
    #: Position in the caller's list, to restore order afterwards.
    index: int
    prompt_tokens: int
    max_new_tokens: int
    temperature: float = 0.0
    #: The JSON Schema (JSON text) this row's answer follows; None: free text.
    schema: str | None = None
    #: Its prefix group (``prefix_groups``); None: it shares no opening.
    prefix: str | None = None


def plan_batches(items: Sequence[BatchItem], token_budget: int, max_rows: int) -> list[list[BatchItem]]:
    """Group ``items`` into micro-batches; every item lands in exactly one batch.

    An item too large for the budget on its own still gets a batch of one. A batch holds
    one prefix group (or only rows of none), as it holds one temperature.
    """
    ordered = sorted(
        items, key=lambda it: (it.temperature, it.prefix or "", -it.max_new_tokens, -it.prompt_tokens, it.index)
    )
    batches: list[list[BatchItem]] = []
    current: list[BatchItem] = []
    longest = widest = 0
    for item in ordered:
        new_longest = max(longest, item.prompt_tokens)
        new_widest = max(widest, item.max_new_tokens)
        fits = (
            current
            and current[0].temperature == item.temperature
            and current[0].prefix == item.prefix
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

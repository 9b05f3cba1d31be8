"""The cheapest on-time assignment of a job's shards to backends, solved exactly.

Without a deadline the cheapest backend per shard is already optimal. With one,
every backend can only do so much work before it (its capacity times the time
left, less the work already queued on it), and the cheapest way to fit every
shard is a small mixed-integer programme: minimise the total cost, each shard on
exactly one backend, each backend's seconds within its room. A provider batch lane
has no room in seconds (the provider runs every batch side by side: a shard fits
it when its turnaround does, which the caller checks) but may have one in enqueued
tokens (``room_tokens``). scipy's HiGHS solves
it in milliseconds for thousands of shards; past ``time_limit`` (or if nothing
fits) the caller falls back to routing shard by shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.routing.pricing import Quote

__all__ = ["cheapest_on_time"]


def cheapest_on_time(
    quotes: Sequence[Sequence[Quote]],
    room_seconds: dict[str, float],
    time_limit: float = 5.0,
    room_tokens: dict[str, float] | None = None,
) -> list[Quote] | None:
    """One quote per shard minimising total cost within each backend's room (seconds, and
    for a batch lane with a limit, enqueued prompt tokens); None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    columns = [(i, q) for i, row in enumerate(quotes) for q in row]
    if not columns or any(not row for row in quotes):
        return None
    tokens = room_tokens or {}
    limits = [(b, "seconds") for b in sorted(room_seconds)] + [(b, "tokens") for b in sorted(tokens)]
    row_of = {limit: n for n, limit in enumerate(limits)}
    cost = np.array([q.cost_usd for _, q in columns])
    assign = lil_matrix((len(quotes), len(columns)))
    load = lil_matrix((len(limits), len(columns)))
    for k, (i, q) in enumerate(columns):
        assign[i, k] = 1
        if q.turnaround is None:
            load[row_of[(q.backend, "seconds")], k] = q.seconds / q.capacity
        if (q.backend, "tokens") in row_of:
            load[row_of[(q.backend, "tokens")], k] = q.input_tokens
    room = np.array([max(room_seconds[b] if kind == "seconds" else tokens[b], 0.0) for b, kind in limits] or [0.0])
    constraints = [LinearConstraint(assign.tocsr(), 1, 1)]
    if limits:
        constraints.append(LinearConstraint(load.tocsr(), 0, room))
    result = milp(
        cost,
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        constraints=constraints,
        options={"time_limit": time_limit},
    )
    if result.x is None or result.status not in (0, 1):
        return None
    chosen: list[Quote | None] = [None] * len(quotes)
    for k, (i, q) in enumerate(columns):
        if result.x[k] > 0.5:
            chosen[i] = q
    return None if any(c is None for c in chosen) else [c for c in chosen if c is not None]

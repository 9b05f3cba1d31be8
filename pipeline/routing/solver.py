"""The cheapest on-time assignment of a job's shards to backends, solved exactly.

Without a deadline the cheapest backend per shard is already optimal. With one,
every backend can only do so much work before it (its capacity times the time
left, less the work already queued on it), and the cheapest way to fit every
shard is a small mixed-integer programme: minimise the total cost, each shard on
exactly one backend, each backend's seconds within its room. scipy's HiGHS solves
it in milliseconds for thousands of shards; past ``time_limit`` (or if nothing
fits) the caller falls back to routing shard by shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.routing.pricing import Quote

__all__ = ["cheapest_on_time"]


def cheapest_on_time(
    quotes: Sequence[Sequence[Quote]], room_seconds: dict[str, float], time_limit: float = 5.0
) -> list[Quote] | None:
    """One quote per shard minimising total cost within each backend's room; None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    columns = [(i, q) for i, row in enumerate(quotes) for q in row]
    if not columns or any(not row for row in quotes):
        return None
    backends = sorted(room_seconds)
    cost = np.array([q.cost_usd for _, q in columns])
    assign = lil_matrix((len(quotes), len(columns)))
    load = lil_matrix((len(backends), len(columns)))
    for k, (i, q) in enumerate(columns):
        assign[i, k] = 1
        load[backends.index(q.backend), k] = q.seconds / q.capacity
    room = np.array([max(room_seconds[b], 0.0) for b in backends])
    result = milp(
        cost,
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(assign.tocsr(), 1, 1), LinearConstraint(load.tocsr(), 0, room)],
        options={"time_limit": time_limit},
    )
    if result.x is None or result.status not in (0, 1):
        return None
    chosen: list[Quote | None] = [None] * len(quotes)
    for k, (i, q) in enumerate(columns):
        if result.x[k] > 0.5:
            chosen[i] = q
    return None if any(c is None for c in chosen) else [c for c in chosen if c is not None]

"""Routing cost: spotlane's router vs the optimal assignment and vs one cheap API.

Synthetic job mixes (seeded): shards of varied sizes and output limits, two spot
GPU pools and three API providers with different prices, speeds and limits, under
generous, medium and tight deadlines. For each mix:

- spotlane: the router's own pricing (``pipeline.routing.pricing.quote``) and choice:
  with a deadline, ``pipeline.routing.router.plan_on_time`` (the job's shards as one
  small MILP, as ``route_job`` does), else ``choose`` shard by shard;
- optimal: the same quotes solved as an independent MILP written out here
  (scipy's HiGHS): minimise total cost, every shard on one backend, each
  backend's work within its capacity x the time to the deadline;
- greedy: ``choose`` shard by shard in input order (what routing does without
  the plan, and the fallback when the plan is infeasible);
- single API: everything on the cheapest provider that meets the deadline.

Then nightly mixes (bigger shards, deadlines of 8 to 12 hours) with each provider's
batch lane (half price, a 24 h window): the cost with the lanes (their turnaround
learnt at a p90 of one hour, OpenRouter's measured figure), with the lanes before
anything was learnt (the window as turnaround: they cannot be on time), without
them, and the optimum with them (an independent MILP again).

    python benchmarks/routing_cost.py [--mixes 12] [--shards 60] [--nightly 8]
"""

from __future__ import annotations

import argparse
import random
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.routing.estimate import ShardProfile  # noqa: E402
from pipeline.routing.pricing import Quote, quote  # noqa: E402
from pipeline.routing.router import choose, plan_on_time  # noqa: E402
from schemas.backends import ApiProvider, Backend, BatchLane, GpuPool, ProviderBatchLane, RoutingSettings  # noqa: E402
from schemas.base import utcnow  # noqa: E402

BACKENDS: list[Backend] = [
    GpuPool(name="a10g-spot", price_per_hour=0.45, tokens_per_second=900, max_workers=4, preemption_rate=0.10),
    GpuPool(name="h100-spot", price_per_hour=2.50, tokens_per_second=6000, max_workers=2, preemption_rate=0.05),
    ApiProvider(
        name="cheap-api",
        base_url="http://x/v1",
        models={"m": "m"},
        input_usd_per_1m=0.15,
        output_usd_per_1m=0.60,
        rpm=500,
        max_concurrency=32,
        latency_seconds=4.0,
    ),
    ApiProvider(
        name="mid-api",
        base_url="http://x/v1",
        models={"m": "m"},
        input_usd_per_1m=0.50,
        output_usd_per_1m=1.50,
        rpm=3000,
        max_concurrency=128,
        latency_seconds=2.0,
    ),
    ApiProvider(
        name="fast-api",
        base_url="http://x/v1",
        models={"m": "m"},
        input_usd_per_1m=2.50,
        output_usd_per_1m=10.0,
        rpm=10000,
        max_concurrency=512,
        latency_seconds=1.0,
    ),
]


#: Each provider's batch lane: half price within 24 h.
LANES: list[Backend] = [
    ProviderBatchLane(b.model_copy(update={"batch": BatchLane(discount=0.5, window_hours=24)}), "control")
    for b in BACKENDS
    if isinstance(b, ApiProvider)
]
#: The lanes' turnaround once learnt (p90 of observed batches): an hour.
LEARNT_P90 = 3600.0


def make_mix(rng: random.Random, shards: int) -> list[ShardProfile]:
    profiles = []
    for _ in range(shards):
        rows = rng.choice([100, 250, 500, 1000, 2000])
        max_tokens = rng.choice([64, 256, 512])
        profiles.append(
            ShardProfile(
                rows=rows,
                prompt_chars=rows * rng.randint(200, 3000),
                max_tokens=rows * max_tokens,
                longest_prompt_chars=3000,
            )
        )
    return profiles


def spotlane_plan(quotes: list[list[Quote]], horizon: float, *, greedy: bool = False) -> tuple[float, bool]:
    now = utcnow()
    deadline = now + timedelta(seconds=horizon)
    backlog: dict[str, float] = {}
    total, late = 0.0, False
    planned = [] if greedy else plan_on_time(quotes, {}, now, deadline) or []
    for index, row in enumerate(quotes):
        if planned:
            total += planned[index].cost_usd
            continue
        choice = choose(row, committed_usd=total, budget_usd=None, backlog_seconds=backlog, now=now, deadline=deadline)
        assert choice.quote is not None
        q = choice.quote
        backlog[q.backend] = backlog.get(q.backend, 0.0) + q.seconds
        total += q.cost_usd
        late = late or choice.note is not None
    return total, late


def optimal(quotes: list[list[Quote]], horizon: float, backends: list[Backend] = BACKENDS) -> float | None:
    """A batch lane's shard fits when its turnaround does (the provider runs batches side by side)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = [b.name for b in backends]
    n, m = len(quotes), len(names)
    cost = np.zeros(n * m)
    seconds = np.zeros(n * m)
    usable = np.zeros(n * m)
    for i, row in enumerate(quotes):
        for q in row:
            j = names.index(q.backend)
            cost[i * m + j], seconds[i * m + j] = q.cost_usd, q.seconds
            usable[i * m + j] = 1.0 if q.turnaround is None or q.turnaround <= horizon else 0.0
    assign = np.zeros((n, n * m))
    for i in range(n):
        assign[i, i * m : (i + 1) * m] = 1
    capacity = np.zeros((m, n * m))
    limits = np.zeros(m)
    for j, backend in enumerate(backends):
        if isinstance(backend, ProviderBatchLane):
            continue  # no shared capacity: the turnaround bound above
        capacity[j, j::m] = seconds[j::m]
        limits[j] = horizon * (backend.max_workers if isinstance(backend, GpuPool) else 1)
    result = milp(
        cost,
        integrality=np.ones(n * m),
        bounds=Bounds(0, usable),
        constraints=[LinearConstraint(assign, 1, 1), LinearConstraint(capacity, 0, limits)],
    )
    return float(result.fun) if result.success else None


def single_api(quotes: list[list[Quote]], horizon: float) -> tuple[float, bool]:
    options = []
    for backend in BACKENDS:
        if isinstance(backend, ApiProvider):
            mine = [q for row in quotes for q in row if q.backend == backend.name]
            total_seconds = sum(q.seconds for q in mine)
            options.append((total_seconds > horizon, sum(q.cost_usd for q in mine)))
    late, cost = min(options)
    return cost, late


def make_nightly(rng: random.Random, shards: int) -> list[ShardProfile]:
    """A nightly job's shards: thousands of rows each (1.8M rows in all by default), more than
    the spot pools can answer by morning."""
    profiles = []
    for _ in range(shards):
        rows = rng.choice([5000, 10000, 20000])
        max_tokens = rng.choice([256, 512])
        profiles.append(
            ShardProfile(
                rows=rows,
                prompt_chars=rows * rng.randint(800, 4000),
                max_tokens=rows * max_tokens,
                longest_prompt_chars=4000,
            )
        )
    return profiles


def nightly(mixes: int, shards: int) -> None:
    routing = RoutingSettings()
    rng = random.Random(11)
    print(
        f"\nnightly: {shards} shards, deadlines of 8-12 h, each provider's batch lane at half price "
        f"(p90 turnaround {LEARNT_P90 / 3600:.0f} h once learnt, the 24 h window before)"
    )
    print(
        f"{'mix':>3} {'hours':>5} {'without $':>10} {'prior $':>9} {'lanes $':>9} {'optimal $':>10} "
        f"{'lanes/without':>13} {'lanes/optimal':>13} {'rows at lanes':>13}"
    )
    saved, gaps = [], []
    for mix in range(mixes):
        profiles = make_nightly(rng, shards)
        hours = rng.choice([8, 9, 10, 11, 12])
        horizon = hours * 3600.0
        base = [[q for b in BACKENDS if (q := quote(b, "m", p, None, routing)) is not None] for p in profiles]
        learnt = [
            row + [q for b in LANES if (q := quote(b, "m", p, None, routing, turnaround=LEARNT_P90)) is not None]
            for row, p in zip(base, profiles)
        ]
        prior = [
            row + [q for b in LANES if (q := quote(b, "m", p, None, routing)) is not None]
            for row, p in zip(base, profiles)
        ]
        without, _ = spotlane_plan(base, horizon)
        before, _ = spotlane_plan(prior, horizon)
        ours, late = spotlane_plan(learnt, horizon)
        best = optimal(learnt, horizon, [*BACKENDS, *LANES])
        plan = plan_on_time(learnt, {}, utcnow(), utcnow() + timedelta(seconds=horizon)) or []
        at_lanes = sum(p.rows for p, q in zip(profiles, plan) if q.kind == "batch")
        share = at_lanes / sum(p.rows for p in profiles)
        saved.append(ours / without)
        if best:
            gaps.append(ours / best)
        print(
            f"{mix:>3} {hours:>5} {without:>10.2f} {before:>9.2f} {ours:>9.2f} {best or float('nan'):>10.2f} "
            f"{ours / without:>13.3f} {ours / best if best else float('nan'):>13.3f} {share:>12.0%}"
            f"{' late' if late else ''}"
        )
    print(f"\nwith the lanes / without: mean {np.mean(saved):.3f}, best {min(saved):.3f}, worst {max(saved):.3f}")
    print(f"with the lanes / optimal: mean {np.mean(gaps):.4f}, worst {max(gaps):.4f} over {len(gaps)} nights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", type=int, default=12)
    parser.add_argument("--shards", type=int, default=60)
    parser.add_argument("--nightly", type=int, default=8, help="nightly mixes with batch lanes (0: none)")
    args = parser.parse_args()
    routing = RoutingSettings()
    rng = random.Random(7)
    print(
        f"{'mix':>3} {'deadline':>9} {'optimal $':>10} {'spotlane $':>10} {'ratio':>6} {'greedy $':>9} {'ratio':>6} {'1-API $':>9} {'ratio':>6} late"
    )
    ratios, api_ratios, greedy_ratios = [], [], []
    for mix in range(args.mixes):
        profiles = make_mix(rng, args.shards)
        quotes = [[q for b in BACKENDS if (q := quote(b, "m", p, None, routing)) is not None] for p in profiles]
        gpu_seconds = sum(min(q.seconds for q in row if q.kind == "gpu") for row in quotes)
        for label, factor in (("generous", 1.0), ("medium", 0.6), ("tight", 0.4)):
            horizon = gpu_seconds / 6 * factor  # 6 GPU workers in all
            best = optimal(quotes, horizon)
            ours, late = spotlane_plan(quotes, horizon)
            greedy, greedy_late = spotlane_plan(quotes, horizon, greedy=True)
            greedy_ratios.append(greedy / best)
            api, api_late = single_api(quotes, horizon)
            if best is None:
                print(f"{mix:>3} {label:>9} {'infeasible':>10} {ours:>10.2f}")
                continue
            ratios.append(ours / best)
            if not api_late:
                api_ratios.append(api / best)
            print(
                f"{mix:>3} {label:>9} {best:>10.2f} {ours:>10.2f} {ours / best:>6.3f} {greedy:>9.2f} {greedy / best:>6.3f} {api:>9.2f} {api / best:>6.2f} {'spotlane' if late else ''}{' greedy' if greedy_late else ''}{' 1-API' if api_late else ''}"
            )
    print(f"\nspotlane / optimal : mean {np.mean(ratios):.3f}, worst {max(ratios):.3f} over {len(ratios)} cases")
    print(
        f"greedy / optimal   : mean {np.mean(greedy_ratios):.3f}, worst {max(greedy_ratios):.3f} (shard by shard, no plan)"
    )
    print(
        f"single API / optimal: mean {np.mean(api_ratios):.2f}, best {min(api_ratios):.2f} "
        f"over the {len(api_ratios)} cases where one API alone meets the deadline"
    )
    if args.nightly:
        nightly(args.nightly, args.shards * 3)


if __name__ == "__main__":
    main()

"""Prefix-aware batching: prefill tokens saved on a workload with three system prompts.

The workload: ``--rows`` short questions, each under one of three long system prompts
(a reviewer's instructions, ~``--system-words`` words), interleaved at random as a real
file mixes its tasks. Side by side, one run:

1. The transformers engine on a local model (``--hidden``, ``--layers``): baseline with
   prefix reuse off (every row's prompt run whole, micro-batches planned by length
   only) against ours (rows grouped by opening; each micro-batch runs the shared prefix
   once and copies its KV cache to every row). Printed: prefill tokens computed and
   reused, the wall time, and whether the answers are the same tokens (greedy).
2. The server engine against a local server with a prefix cache that keeps one system
   prompt (a GPU whose cache holds fewer prefixes than a file interleaves): rows in
   input order against rows grouped by opening. Printed: prompt tokens the server had
   to prefill and those it found cached (what vLLM reports as ``cached_tokens``).

    python benchmarks/prefix.py [--rows 384] [--hidden 256 --layers 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.backends import GpuPool  # noqa: E402
from schemas.inference import Request  # noqa: E402
from tests.support.openai_server import FakeOpenAI  # noqa: E402
from workers.demo_model import build_tiny_model  # noqa: E402
from workers.engines.hf import HFEngine  # noqa: E402
from workers.engines.server import ServerEngine  # noqa: E402


def workload(rows: int, system_words: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    topics = ["billing", "shipping", "refunds"]
    systems = [
        " ".join(
            f"Instruction {k}: when a customer writes about {topic}, read carefully and reply politely."
            for k in range(system_words // 12)
        )
        for topic in topics
    ]
    return [
        Request(
            messages=[
                {"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": f"Ticket {i}: my order {i * 37 % 1000} has a problem, what now?"},
            ],
            max_tokens=16,
        )
        for i in range(rows)
    ]


def in_process(args: argparse.Namespace, rows: list[Request]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "m", hidden_size=args.hidden, layers=args.layers, max_positions=1024)
        figures = {}
        answers = {}
        for arm, reuse in (("baseline", False), ("ours", True)):
            engine = HFEngine(str(model), device=args.device, prefix_reuse=reuse)
            engine.generate(rows[:8])  # warm up
            engine.prefill_tokens = engine.prefill_reused = 0
            started = time.perf_counter()
            done = engine.generate(rows)
            wall = time.perf_counter() - started
            answers[arm] = [(c.output, c.output_tokens) for c in done]
            figures[arm] = (engine.prefill_tokens, engine.prefill_reused, wall, sum(c.output_tokens for c in done))
    total = figures["baseline"][0]
    print(
        f"1. transformers engine, {len(rows)} rows, 3 system prompts, model hidden {args.hidden} x {args.layers} layers on {args.device}:"
    )
    for arm, (computed, reused, wall, out) in figures.items():
        print(
            f"  {arm:8s}: prefill {computed:8,d} tokens computed, {reused:8,d} reused "
            f"({reused / max(total, 1):5.1%} of {total:,}); wall {wall:6.2f} s; {out / wall:8,.0f} output tok/s"
        )
    b, o = figures["baseline"], figures["ours"]
    print(
        f"  saved: {o[1]:,} prefill tokens ({o[1] / max(total, 1):.1%}); wall ratio {b[2] / o[2]:.2f}x; "
        f"answers identical: {answers['baseline'] == answers['ours']}"
    )


def server(rows: list[Request]) -> None:
    print(f"2. server engine, {len(rows)} rows, a server whose prefix cache keeps one system prompt:")
    found = {}
    for arm, grouped in (("baseline", False), ("ours", True)):
        with FakeOpenAI(latency=0.005, prefix_cache=1) as fake:
            engine = ServerEngine(GpuPool(name="srv", engine="server", server_url=fake.url), "m")
            engine.group_prefixes = grouped
            try:
                engine.generate(rows)
            finally:
                engine.close()
            found[arm] = (fake.prefill_tokens, fake.cached_tokens)
            label = "grouped by opening" if grouped else "input order"
            print(
                f"  {arm:8s} ({label:18s}): prefilled {fake.prefill_tokens:8,d} prompt tokens, {fake.cached_tokens:8,d} cached"
            )
    b, o = found["baseline"], found["ours"]
    print(f"  saved: {b[0] - o[0]:,} prefill tokens ({(b[0] - o[0]) / max(b[0], 1):.1%} of the baseline's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--system-words", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = workload(args.rows, args.system_words)
    in_process(args, rows)
    server(rows)


if __name__ == "__main__":
    main()

"""Generation engines side by side: useful tokens/s on one seeded random-weight model.

One process, one run, greedy decoding, EOS disabled (the model's end-of-sequence id
is set to one it can never emit), two workloads:

- fixed: every row generates ``--fixed-tokens`` tokens;
- skewed: per-row output lengths from 8 to 192 tokens, mixed prompt lengths.

Arms: (a) naive per-prompt ``generate``; (b) transformers ``pipeline`` with
``batch_size=16``; (c) transformers continuous batching (``ContinuousBatchingManager``,
per-request ``max_new_tokens``); (d) spotlane's engine (``workers.engines.hf``);
(e) spotlane end to end (``spotlane submit`` + ``spotlane worker`` on the same rows
as Parquet, timed from the shard's claim to its commit, model already loaded). Useful tokens are the tokens each row
asked for; padding and overshoot do not count.

    python benchmarks/engine.py [--rows 96] [--hidden 256] [--layers 4] [--arms abcde]
On a GPU machine: --hidden 2048 --layers 16 --heads 16 (about 1B parameters) --rows 512.

On CUDA it also prints the memory-bandwidth bound: a decode step reads every weight
once, so a batch of B rows makes at most ``B x bandwidth / weight bytes`` tokens a
second (the KV cache's reads ignored, so the true bound is lower); the spotlane
engine's arm is set against it at its batch size (``worker.max_batch_rows``, 64).
``--bandwidth-gbs`` gives the GPU's bandwidth where its name is not in ``BANDWIDTH_GBS``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, hidden: int, layers: int, heads: int) -> Path:
    from workers.demo_model import build_tiny_model

    path = build_tiny_model(folder, hidden_size=hidden, layers=layers, heads=heads, vocab_size=2048, max_positions=1024)
    never = 10**6  # an id the model cannot emit: EOS disabled for every arm alike
    for name in ("config.json", "generation_config.json"):
        data = json.loads((path / name).read_text())
        data["eos_token_id"] = never
        (path / name).write_text(json.dumps(data))
    return path


def workload(kind: str, rows: int, fixed_tokens: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    words = "the invoice is overdue and payment is required customer reports a billing error please".split()
    out = []
    for _ in range(rows):
        length = rng.randint(8, 128) if kind == "skewed" else 32
        prompt = " ".join(rng.choice(words) for _ in range(length))
        out.append((prompt, rng.randint(8, 192) if kind == "skewed" else fixed_tokens))
    return out


def arm_naive(model: Any, tok: Any, rows: list[tuple[str, int]]) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        for prompt, n in rows:
            ids = tok(prompt, return_tensors="pt")
            model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - started


def arm_pipeline(model: Any, tok: Any, rows: list[tuple[str, int]]) -> float:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tok, batch_size=16)
    tok.padding_side = "left"
    started = time.perf_counter()
    # A pipeline call takes one generation config: group by length so each row gets its own limit.
    by_length: dict[int, list[str]] = {}
    for prompt, n in rows:
        by_length.setdefault(n, []).append(prompt)
    for n, prompts in by_length.items():
        pipe(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_full_text=False)
    return time.perf_counter() - started


def arm_continuous(model: Any, tok: Any, rows: list[tuple[str, int]]) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max(n for _, n in rows), do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    started = time.perf_counter()
    for i, (prompt, n) in enumerate(rows):
        manager.add_request(tok(prompt)["input_ids"], request_id=f"r{i}", max_new_tokens=n)
    finished = 0
    while finished < len(rows):
        if manager.get_result(timeout=60) is not None:
            finished += 1
    elapsed = time.perf_counter() - started
    manager.stop(block=True)
    return elapsed


def arm_spotlane(path: Path, rows: list[tuple[str, int]]) -> float:
    from workers.engines.base import Request
    from workers.engines.hf import HFEngine

    engine = HFEngine(str(path), device="auto", dtype="auto")
    requests = [Request(prompt=p, max_tokens=n) for p, n in rows]
    engine.generate(requests[:2])  # warm-up, as the other arms' first call pays it too
    started = time.perf_counter()
    engine.generate(requests)
    return time.perf_counter() - started


def arm_end_to_end(path: Path, rows: list[tuple[str, int]], work: Path) -> float:
    """``spotlane submit`` + ``spotlane worker`` (filesystem broker, SQLite, Parquet parts).

    A two-row job runs first in the same worker, so the model load and the first
    call's warm-up are paid there, as arm (d)'s warm-up call pays them; the measured
    job's time is its shard attempt, claim to commit.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = {
        **os.environ,
        "SPOTLANE_HOME": str(home),
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": str(len(rows)),
        "PYTHONPATH": str(ROOT),
    }
    cli = [sys.executable, "-m", "pipeline.cli"]
    jobs = []
    for name, part in (("warm", rows[:2]), ("rows", rows)):
        data = work / f"{name}.parquet"
        pq.write_table(
            pa.table(
                {
                    "id": [f"r{i}" for i in range(len(part))],
                    "prompt": [p for p, _ in part],
                    "max_tokens": pa.array([n for _, n in part], pa.int32()),
                }
            ),
            data,
        )
        submitted = subprocess.run(
            [*cli, "submit", str(data), "--model", str(path), "--rows-per-shard", str(len(part))],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        jobs.append(submitted.stdout.strip())
    worker = subprocess.Popen(
        [*cli, "worker", "--loglevel", "WARNING"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    store = sa.create_engine(f"sqlite:///{home / 'spotlane.db'}")
    try:
        while True:
            with store.connect() as conn:
                status = conn.execute(sa.text("select status from jobs where id = :j"), {"j": jobs[1]}).scalar_one()
            if status in ("succeeded", "failed"):
                break
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(60)
    with store.connect() as conn:
        started, done = conn.execute(
            sa.text(
                "select a.started_at, a.ended_at from shard_attempts a join shards s on s.id = a.shard_id "
                "where s.job_id = :j"
            ),
            {"j": jobs[1]},
        ).one()
    from datetime import datetime

    return (datetime.fromisoformat(str(done)) - datetime.fromisoformat(str(started))).total_seconds()


#: Peak memory bandwidth (GB/s) of GPUs by a part of their name, from the vendors' sheets.
BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
    "L4": 300.0,
    "T4": 320.0,
}


def bandwidth_bound(device_name: str, weight_bytes: int, given_gbs: float | None) -> float | None:
    """Decode tokens/s of one row in a batch at the memory-bandwidth limit (None: unknown GPU)."""
    gbs = given_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in device_name), None)
    return None if gbs is None else gbs * 1e9 / weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--fixed-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--arms", default="abcde")
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="spotlane-engine-"))
    path = build_model(work / "model", args.hidden, args.layers, args.heads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {device}, {dtype}, torch threads {torch.get_num_threads()}")
    per_row = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        per_row = bandwidth_bound(name, weight_bytes, args.bandwidth_gbs)
        if per_row is not None:
            print(
                f"GPU {name}: {weight_bytes / 1e9:.2f} GB of weights; memory-bandwidth bound {per_row:,.0f} "
                f"tokens/s a row, {64 * per_row:,.0f} at a batch of 64"
            )
    names = {
        "a": "naive generate",
        "b": "pipeline(batch=16)",
        "c": "transformers continuous",
        "d": "spotlane engine",
        "e": "spotlane run (e2e)",
    }
    for kind in ("fixed", "skewed"):
        rows = workload(kind, args.rows, args.fixed_tokens)
        useful = sum(n for _, n in rows)
        results: dict[str, float] = {}
        for arm in args.arms:
            seconds = {
                "a": lambda: arm_naive(model, tok, rows),
                "b": lambda: arm_pipeline(model, tok, rows),
                "c": lambda: arm_continuous(model, tok, rows),
                "d": lambda: arm_spotlane(path, rows),
                "e": lambda: arm_end_to_end(path, rows, work / f"e2e-{kind}"),
            }[arm]()
            results[arm] = useful / seconds
        print(f"\n== {kind}: {len(rows)} rows, {useful} useful tokens ==")
        for arm, tps in results.items():
            print(f"({arm}) {names[arm]:24s}: {tps:9.1f} useful tokens/s")
        baselines = [results[a] for a in "abc" if a in results]
        if baselines and "d" in results:
            print(f"(d) / best of (a)-(c): {results['d'] / max(baselines):.2f}x")
        if "d" in results and "e" in results:
            print(f"(e) / (d): {results['e'] / results['d']:.2f}")
        if per_row is not None and "d" in results:
            bound = min(64, len(rows)) * per_row
            print(f"(d) / memory-bandwidth bound at a batch of {min(64, len(rows))}: {results['d'] / bound:.1%}")


if __name__ == "__main__":
    main()

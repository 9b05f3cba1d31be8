"""`spotlane run` of a 10-row API job, end to end as a user times it: a source tree before and this one.

A local OpenAI-compatible server (20 ms a request) stands in for the provider. Each
arm is the CLI in a fresh process with a fresh home, timed from exec to exit
(what a user waits), several times; the job's own wall, as its summary line
prints it, is reported too.

    python benchmarks/cli_run.py --baseline /path/to/an/older/checkout [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import write_prompts  # noqa: E402
from tests.support.openai_server import FakeOpenAI  # noqa: E402


def _time(tree: Path, config: Path, data: Path, home: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "SPOTLANE_HOME": str(home), "BENCH_KEY": "sk-bench"}
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "--config",
            str(config),
            "run",
            str(data),
            "--model",
            "chat-small",
            "--max-tokens",
            "8",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stderr[-2000:]}")
    match = re.search(r"wall ([0-9.]+)s", done.stdout)
    return total, float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="an older source tree to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(latency=0.02) as server:
        folder = Path(tmp)
        data = write_prompts(folder / "in.parquet", 10)
        config = folder / "spotlane.toml"
        config.write_text(
            "gpu_pools = []\n"
            f'[[api_providers]]\nname = "bench"\nbase_url = "{server.url}"\napi_key_env = "BENCH_KEY"\n'
            'input_usd_per_1m = 0.5\noutput_usd_per_1m = 1.5\n[api_providers.models]\n"chat-small" = "remote"\n'
        )
        figures: dict[str, list[tuple[float, float]]] = {"baseline": [], "spotlane": []}
        for n in range(args.repeat):
            for arm, tree in (("baseline", args.baseline.resolve()), ("spotlane", ROOT)):
                figures[arm].append(_time(tree, config, data, folder / f"home-{arm}-{n}"))
    print(f"`spotlane run` of a 10-row API job (local server, 20 ms a request), median of {args.repeat}:")
    medians = {}
    for arm, runs in figures.items():
        total = statistics.median(t for t, _ in runs)
        job = statistics.median(j for _, j in runs)
        medians[arm] = total
        print(f"  {arm:9s}: {total:6.2f} s until the command returns (the job's own wall: {job:5.2f} s)")
    print(f"  ratio: the baseline takes {medians['baseline'] / medians['spotlane']:.1f}x as long")


if __name__ == "__main__":
    main()

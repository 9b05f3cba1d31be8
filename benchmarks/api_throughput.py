"""API worker throughput: spotlane's API engine vs the script data teams use today.

The baseline re-implements the approach of openai-cookbook's
``api_request_parallel_processor.py``: one asyncio loop, aiohttp with its default
connection pool, request and token capacity counters refilled per minute, a fixed
15 s pause after a rate-limit error, and up to 5 attempts per request. Both run
against the same local OpenAI-compatible server (``tests/support/openai_server.py``), one
after the other, in three regimes:

1. 50 ms latency, generous limits;
2. 1 s latency (long generations): concurrency is what matters;
3. a server-side rpm limit answered with 429 when exceeded: pacing.

    python benchmarks/api_throughput.py [--requests 2000] [--rpm-limit 1200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.backends import ApiProvider  # noqa: E402
from tests.support.openai_server import FakeOpenAI  # noqa: E402
from workers.engines.base import Request  # noqa: E402
from workers.engines.openai_http import APIEngine  # noqa: E402


@dataclass
class Outcome:
    seconds: float
    ok: int
    failed: int
    server_429: int

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


def _body(i: int, max_tokens: int) -> dict[str, object]:
    return {
        "model": "remote",
        "messages": [{"role": "user", "content": f"summarize ticket {i} about a refund"}],
        "max_tokens": max_tokens,
    }


async def cookbook_baseline(url: str, n: int, max_rpm: float, max_tpm: float, max_tokens: int = 16) -> tuple[int, int]:
    """The cookbook's loop, condensed: capacity counters, 15 s pause after a 429, 5 attempts."""
    seconds_to_pause_after_rate_limit_error = 15
    seconds_to_sleep_each_loop = 0.001
    max_attempts = 5
    available_request_capacity, available_token_capacity = max_rpm, max_tpm
    last_update = time.time()
    last_rate_limit_error = 0.0
    queue: list[tuple[int, int]] = []  # (request index, attempts left)
    next_index = 0
    in_progress = 0
    ok = failed = 0
    done = asyncio.Event()

    async with aiohttp.ClientSession() as session:

        async def call(index: int, attempts_left: int) -> None:
            nonlocal in_progress, ok, failed, last_rate_limit_error
            try:
                async with session.post(f"{url}/chat/completions", json=_body(index, max_tokens)) as response:
                    data = await response.json(content_type=None)
                    if "error" in data:
                        if "rate limit" in str(data["error"]).lower():
                            last_rate_limit_error = time.time()
                        raise RuntimeError(data["error"])
                ok += 1
            except Exception:
                if attempts_left > 1:
                    queue.append((index, attempts_left - 1))
                else:
                    failed += 1
            finally:
                in_progress -= 1
                if next_index >= n and not queue and in_progress == 0:
                    done.set()

        while not done.is_set():
            request = None
            if queue:
                request = queue.pop(0)
            elif next_index < n:
                request = (next_index, max_attempts)
                next_index += 1
            now = time.time()
            available_request_capacity = min(available_request_capacity + max_rpm * (now - last_update) / 60, max_rpm)
            available_token_capacity = min(available_token_capacity + max_tpm * (now - last_update) / 60, max_tpm)
            last_update = now
            if request is not None:
                tokens = 10 + max_tokens
                if available_request_capacity >= 1 and available_token_capacity >= tokens:
                    available_request_capacity -= 1
                    available_token_capacity -= tokens
                    in_progress += 1
                    asyncio.create_task(call(*request))
                else:
                    queue.insert(0, request)
            await asyncio.sleep(seconds_to_sleep_each_loop)
            pause = seconds_to_pause_after_rate_limit_error - (time.time() - last_rate_limit_error)
            if pause > 0:
                await asyncio.sleep(pause)
    return ok, failed


def run_baseline(server: FakeOpenAI, n: int, rpm: float, tpm: float) -> Outcome:
    before = server.rejected_429
    started = time.perf_counter()
    ok, failed = asyncio.run(cookbook_baseline(server.url, n, rpm, tpm))
    return Outcome(time.perf_counter() - started, ok, failed, server.rejected_429 - before)


def run_spotlane(server: FakeOpenAI, n: int, *, rpm: int | None, concurrency: int) -> Outcome:
    provider = ApiProvider(
        name="bench", base_url=server.url, models={"m": "remote"}, rpm=rpm, max_concurrency=concurrency, max_retries=5
    )
    engine = APIEngine(provider, "m")
    requests = [Request(prompt=f"summarize ticket {i} about a refund", max_tokens=16) for i in range(n)]
    chunks = [requests[i : i + 256] for i in range(0, n, 256)]
    before = server.rejected_429
    started = time.perf_counter()
    results = [c for chunk in engine.stream(chunks, lookahead=2) for c in chunk]
    seconds = time.perf_counter() - started
    engine.close()
    ok = sum(1 for c in results if c.error is None)
    return Outcome(seconds, ok, len(results) - ok, server.rejected_429 - before)


def report(title: str, base: Outcome, ours: Outcome, limit_rps: float | None = None) -> None:
    print(f"\n== {title} ==")
    for name, o in (("cookbook baseline", base), ("spotlane", ours)):
        share = f", {o.rps / limit_rps:5.1%} of the limit" if limit_rps else ""
        print(
            f"{name:18s}: {o.rps:8.1f} req/s ({o.ok} ok, {o.failed} failed, {o.server_429} x 429 from the server, "
            f"{o.seconds:.1f} s{share})"
        )
    print(f"ratio spotlane/baseline: {ours.rps / base.rps:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--slow-requests", type=int, default=1500)
    parser.add_argument("--rpm-limit", type=int, default=1200)
    parser.add_argument("--limited-requests", type=int, default=600)
    args = parser.parse_args()

    with FakeOpenAI(latency=0.05) as server:
        base = run_baseline(server, args.requests, rpm=1e7, tpm=1e9)
        ours = run_spotlane(server, args.requests, rpm=None, concurrency=128)
        report(f"1. 50 ms latency, generous limits, {args.requests} requests", base, ours)

    with FakeOpenAI(latency=1.0) as server:
        base = run_baseline(server, args.slow_requests, rpm=1e7, tpm=1e9)
        ours = run_spotlane(server, args.slow_requests, rpm=None, concurrency=512)
        report(f"2. 1 s latency, generous limits, {args.slow_requests} requests", base, ours)

    limit = args.rpm_limit
    with FakeOpenAI(latency=0.05, rpm=limit) as server:
        base = run_baseline(server, args.limited_requests, rpm=limit, tpm=1e9)
        ours = run_spotlane(server, args.limited_requests, rpm=limit, concurrency=128)
        report(
            f"3. server limit {limit} rpm ({limit / 60:.0f}/s) enforced with 429, {args.limited_requests} requests",
            base,
            ours,
            limit_rps=limit / 60,
        )


if __name__ == "__main__":
    main()

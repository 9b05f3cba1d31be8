"""The server engine (a GPU pool's own vLLM/SGLang sidecar) vs the API engine, same server.

A local OpenAI-compatible server with an inference server's manners: every request
takes 50 ms plus 1 ms for each request in flight (its batch fills up), so more in
flight means more answered per second, up to a plateau. Side by side, one run:

- baseline: the API engine as a provider is configured by default (16 in flight);
- ours: the server engine, whose in-flight window is learnt (AIMD, up to 256).

Printed: requests per second of each, the ratio, the window the server engine
settled on and the most requests the server saw in flight. (On a real GPU the
plateau is the engine's continuous batching; here it is the model above.)

    python benchmarks/server_engine.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.backends import ApiProvider, GpuPool  # noqa: E402
from tests.support.openai_server import FakeOpenAI  # noqa: E402
from workers.engines.base import Request  # noqa: E402
from workers.engines.openai_http import APIEngine  # noqa: E402
from workers.engines.server import ServerEngine  # noqa: E402


def _requests(n: int) -> list[Request]:
    return [Request(prompt=f"question {i} about a billing error", max_tokens=8) for i in range(n)]


def _run(engine: APIEngine, n: int, chunk: int = 500) -> tuple[float, int]:
    started = time.perf_counter()
    ok = 0
    for done in engine.stream([_requests(chunk) for _ in range(n // chunk)]):
        ok += sum(c.error is None for c in done)
    return time.perf_counter() - started, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    n = args.requests
    with FakeOpenAI(latency=0.05, latency_per_in_flight=0.001) as server:
        api = APIEngine(ApiProvider(name="api", base_url=server.url, models={"m": "m"}), "m")
        try:
            base_s, base_ok = _run(api, n)
        finally:
            api.close()
        base_peak, server.max_in_flight = server.max_in_flight, 0
        ours_engine = ServerEngine(GpuPool(name="srv", engine="server", server_url=server.url), "m")
        try:
            ours_s, ours_ok = _run(ours_engine, n)
        finally:
            ours_engine.close()
        print(f"{n} requests, 50 ms + 1 ms per request in flight")
        print(
            f"  baseline, API engine (16 in flight): {base_ok / base_s:8.1f} req/s  ({base_s:.1f} s, peak {base_peak})"
        )
        print(
            f"  ours, server engine (window learnt): {ours_ok / ours_s:8.1f} req/s  ({ours_s:.1f} s, "
            f"peak {server.max_in_flight}, window {ours_engine.window:.0f})"
        )
        print(f"  ours / baseline: {(ours_ok / ours_s) / (base_ok / base_s):.2f}x")


if __name__ == "__main__":
    main()

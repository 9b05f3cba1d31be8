"""A local OpenAI-compatible server for tests and benchmarks, on 127.0.0.1 only.

It answers ``POST /v1/chat/completions`` after an injectable latency and can be
told to misbehave: a script of status codes for the first requests (429s, 500s),
malformed bodies, a requests-per-minute limit it enforces with 429 + Retry-After,
or being down altogether. It counts what it saw (requests, peak concurrency,
429s sent, authorization headers) so tests can assert on the client's manners.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeOpenAI"]


@dataclass
class FakeOpenAI:
    latency: float = 0.0
    #: Requests per minute the server accepts (per-second bucket); None: no limit.
    rpm: int | None = None
    #: Status codes answered to the first requests, in order (e.g. [429, 500]).
    script: list[int] = field(default_factory=list)
    #: The Retry-After header sent with scripted statuses (a number, or any text).
    retry_after: float | str | None = None
    #: What every answer reports as usage, (prompt_tokens, completion_tokens),
    #: whatever it really was: a provider (or a proxy) that lies.
    usage: tuple[int, int] | None = None
    malformed_first: int = 0
    down: bool = False
    required_key: str | None = None
    # what was seen
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rejected_429: int = 0
    ok: int = 0
    auth_headers: set[str] = field(default_factory=set)
    accepted_at: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._bucket: float | None = None  # starts full at the first request
        self._stamp = time.monotonic()
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _over_limit(self) -> bool:
        if self.rpm is None:
            return False
        rate = self.rpm / 60.0
        now = time.monotonic()
        if self._bucket is None:
            self._bucket, self._stamp = rate, now
        self._bucket = min(rate, self._bucket + (now - self._stamp) * rate)
        self._stamp = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return False
        return True

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        number = self.requests
        self.auth_headers.add(request.headers.get("Authorization", ""))
        if self.required_key is not None and request.headers.get("Authorization") != f"Bearer {self.required_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        if self.down:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if number <= len(self.script) and self.script[number - 1] != 200:
            status = self.script[number - 1]
            headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
            return web.json_response({"error": {"message": f"scripted {status}"}}, status=status, headers=headers)
        if self._over_limit():
            self.rejected_429 += 1
            return web.json_response({"error": {"message": "rate limit"}}, status=429, headers={"Retry-After": "1"})
        body = await request.json()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if number <= self.malformed_first:
            return web.Response(text='{"choices": [', content_type="application/json")
        self.ok += 1
        self.accepted_at.append(time.monotonic())
        answer = _answer(body)
        if self.usage is not None:
            answer["usage"] = {
                "prompt_tokens": self.usage[0],
                "completion_tokens": self.usage[1],
                "total_tokens": sum(self.usage),
            }
        return web.json_response(answer)


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    last = body["messages"][-1]["content"]
    words = last.split()
    completion = min(int(body.get("max_tokens") or 16), 5)
    return {
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"echo: {' '.join(words[:completion])}"},
            }
        ],
        "usage": {
            "prompt_tokens": len(words) + 3,
            "completion_tokens": completion,
            "total_tokens": len(words) + 3 + completion,
        },
    }


def main() -> None:  # pragma: no cover - manual use
    server = FakeOpenAI()
    print(server.start(), flush=True)
    try:
        threading.Event().wait()
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()

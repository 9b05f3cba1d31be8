"""A local OpenAI-compatible server for tests and benchmarks, on 127.0.0.1 only.

It answers ``POST /v1/chat/completions`` after an injectable latency and can be
told to misbehave: a script of status codes for the first requests (429s, 500s),
malformed bodies, a requests-per-minute limit it enforces with 429 + Retry-After,
or being down altogether. It counts what it saw (requests, peak concurrency,
429s sent, authorization headers) so tests can assert on the client's manners.

It also serves OpenAI's Files + Batches API (``/v1/files``, ``/v1/batches``): each
batch created ends ``batch_delay`` seconds later as ``batch_script`` says, in order
(``complete``; ``fail``; ``expire``: only every other request answered, the rest
``batch_expired``; ``hold``: in progress until cancelled, then ``cancelled`` with
every other request answered), and ``create_delay`` holds the answer to a create
after the batch exists (a client killed in between never learns its id).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict, deque
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
    #: Requests answered before the server goes away (503 from then on); None: never.
    down_after: int | None = None
    required_key: str | None = None
    # what was seen
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rejected_429: int = 0
    ok: int = 0
    auth_headers: set[str] = field(default_factory=set)
    accepted_at: deque[float] = field(default_factory=deque)
    #: An inference server's manners: each request in flight adds this much latency (its
    #: batch grows), and ``/health`` answers 503 until ``healthy_at`` (time.monotonic()).
    latency_per_in_flight: float = 0.0
    healthy_at: float | None = None
    #: A prefix cache (vLLM's automatic prefix caching, in small): the system prompts of
    #: the last ``prefix_cache`` distinct openings are kept, a request whose system prompt
    #: is kept has those tokens (one a word) reported as ``cached_tokens``; 0: no cache.
    prefix_cache: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    _prefixes: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # the batch API
    batch_script: list[str] = field(default_factory=list)
    batch_delay: float = 0.0
    create_delay: float = 0.0
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancels: int = 0

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
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self._get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel_batch)
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
        if self.down or (self.down_after is not None and number > self.down_after):
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if number <= len(self.script) and self.script[number - 1] != 200:
            status = self.script[number - 1]
            headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
            return web.json_response({"error": {"message": f"scripted {status}"}}, status=status, headers=headers)
        if self._over_limit():
            self.rejected_429 += 1
            return web.json_response({"error": {"message": "rate limit"}}, status=429, headers={"Retry-After": "1"})
        body = await request.json()
        cached = self._prefill(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency or self.latency_per_in_flight:
                await asyncio.sleep(self.latency + self.latency_per_in_flight * self.in_flight)
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
        if self.prefix_cache:
            answer["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
        return web.json_response(answer)

    def _prefill(self, body: dict[str, Any]) -> int:
        """Count the request's prompt tokens as computed or found in the prefix cache."""
        messages = body.get("messages") or []
        words = sum(len(str(m.get("content") or "").split()) for m in messages)
        system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
        cached = 0
        if self.prefix_cache and system is not None:
            if system in self._prefixes:
                self._prefixes.move_to_end(system)
                cached = len(system.split())
            else:
                self._prefixes[system] = None
                while len(self._prefixes) > self.prefix_cache:
                    self._prefixes.popitem(last=False)
        self.prefill_tokens += words - cached
        self.cached_tokens += cached
        return cached

    async def _health(self, _: web.Request) -> web.Response:
        up = not self.down and (self.healthy_at is None or time.monotonic() >= self.healthy_at)
        return web.Response(status=200 if up else 503, text="ok" if up else "loading")

    # -- Files + Batches --------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return self.required_key is None or request.headers.get("Authorization") == f"Bearer {self.required_key}"

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        form = await request.post()
        upload = form["file"]
        content = upload.file.read()  # type: ignore[union-attr]
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = content
        name = getattr(upload, "filename", "input.jsonl")
        return web.json_response({"id": file_id, "object": "file", "bytes": len(content), "filename": name})

    async def _content(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=found, content_type="application/jsonl")

    async def _create_batch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        body = await request.json()
        if body.get("input_file_id") not in self.files:
            return web.json_response({"error": {"message": "no such input file"}}, status=400)
        number = len(self.batches) + 1
        batch = {
            "id": f"batch_{number}",
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window"),
            "status": "in_progress",
            "created_at": int(time.time()),
            "metadata": body.get("metadata") or {},
            "output_file_id": None,
            "error_file_id": None,
            "outcome": self.batch_script[number - 1] if number <= len(self.batch_script) else "complete",
            "due": time.monotonic() + self.batch_delay,
        }
        self.batches[batch["id"]] = batch
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        return web.json_response(self._public(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        newest = sorted(self.batches.values(), key=lambda b: int(b["id"].split("_")[1]), reverse=True)
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = [self._public(self._advance(b)) for b in newest[:limit]]
        return web.json_response({"object": "list", "data": page, "has_more": len(newest) > limit})

    async def _get_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        return web.json_response(self._public(self._advance(batch)))

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        self.cancels += 1
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            self._end(batch, "cancelled", answer_every=2)
        return web.json_response(self._public(batch))

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in ("outcome", "due")}

    def _advance(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] != "in_progress" or time.monotonic() < batch["due"] or batch["outcome"] == "hold":
            return batch
        if batch["outcome"] == "fail":
            batch["status"] = "failed"
            batch["failed_at"] = int(time.time())
        elif batch["outcome"] == "expire":
            self._end(batch, "expired", answer_every=2)
        else:
            self._end(batch, "completed", answer_every=1)
        return batch

    def _end(self, batch: dict[str, Any], status: str, answer_every: int) -> None:
        output: list[bytes] = []
        errors: list[bytes] = []
        lines = self.files[batch["input_file_id"]].splitlines()
        for n, raw in enumerate(lines):
            line = json.loads(raw)
            if n % answer_every == 0:
                answer = _answer(line["body"])
                if self.usage is not None:
                    answer["usage"] = {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1]}
                response = {"status_code": 200, "request_id": f"req_{n}", "body": answer}
                output.append(
                    json.dumps({"custom_id": line["custom_id"], "response": response, "error": None}).encode()
                )
            else:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                error = {"code": code, "message": f"this request was not run: {code}"}
                errors.append(json.dumps({"custom_id": line["custom_id"], "response": None, "error": error}).encode())
        for kind, content in (("output_file_id", output), ("error_file_id", errors)):
            if content:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = b"\n".join(content) + b"\n"
                batch[kind] = file_id
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        batch["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}


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

"""An engine over any OpenAI-compatible chat-completions endpoint (asyncio + aiohttp).

Per provider: at most ``max_concurrency`` requests in flight, token buckets pacing
requests (``rpm``) and tokens (``tpm``) per minute, and retries with exponential
backoff and full jitter on 429, 5xx, timeouts, connection errors and malformed
bodies, honouring ``Retry-After``. A 429 also empties the request bucket, so the
whole engine backs off, not just the one request. Cost comes from the response's
``usage`` at the provider's prices. A row that still fails becomes an error row;
if every row of a chunk fails that way the provider is down and ``ProviderError``
hands the shard back to the router.

The transport is aiohttp rather than httpx: measured here against the same local
server, httpx's connection pool topped out near 100 requests/s at 64-256
concurrent requests (CPU-bound), aiohttp served 1,000-2,900 (measured once, by hand,
when the transport was chosen; ``benchmarks/api_throughput.py`` measures this engine).

The event loop runs in a thread of its own, so chunks overlap: while the runner
writes and commits one checkpoint, the next chunk's requests are already in
flight (``stream``). The API key is read from the environment per engine and only
ever placed in the ``Authorization`` header: it is scrubbed from every error text.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC
from typing import Any

import aiohttp

from schemas.backends import (
    PROMPT_ROLE,
    REASK_ANSWER_BYTES_PER_TOKEN,
    REASK_NOTE_BYTES,
    ApiProvider,
    input_token_bound,
)
from schemas.errors import ProviderError
from schemas.structured import validate_answer
from workers.engines.base import Completion, Request

__all__ = ["APIEngine", "TokenBucket", "chat_body", "request_messages", "retry_after", "usage_bound"]

log = logging.getLogger(__name__)

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


class TokenBucket:
    """``rate`` tokens per second, bursting to ``capacity``; ``acquire`` waits its turn."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, max(capacity, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:  # first come, first served
            while True:
                self._refill()
                if self.tokens >= amount:
                    self.tokens -= amount
                    return
                await asyncio.sleep((amount - self.tokens) / self.rate)

    def drain(self) -> None:
        """Take everything: the server said we are over the limit."""
        self._refill()
        self.tokens = 0.0


#: The longest a ``Retry-After`` is honoured, in seconds: a server asking for more
#: is treated as down for now (the shard goes elsewhere), not waited on for years.
RETRY_AFTER_CAP = 120.0


def retry_after(value: str | None, cap: float = RETRY_AFTER_CAP) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), within
    ``[0, cap]``; None when absent or unreadable (then the backoff alone applies)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if parsed is None:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), cap)


class APIEngine:
    """Chat completions for one provider; one instance per worker process and provider."""

    def __init__(self, provider: ApiProvider, model: str, *, safety: float = 0.97) -> None:
        self.provider = provider
        self.model = model
        self._key = provider.api_key()
        if provider.api_key_env and not self._key:
            raise ProviderError(f"provider {provider.name!r}: environment variable {provider.api_key_env} is not set")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"api-{provider.name}")
        self._thread.start()
        self._safety = safety
        self._ready: Future[None] = asyncio.run_coroutine_threadsafe(self._setup(), self._loop)
        self._ready.result()
        self._retry_cap = min(RETRY_AFTER_CAP, provider.timeout_seconds)

    async def _setup(self) -> None:
        p = self.provider
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._url = f"{p.base_url}/chat/completions"
        self._client = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=p.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=p.timeout_seconds, connect=min(10.0, p.timeout_seconds)),
        )
        self._slots = asyncio.Semaphore(p.max_concurrency)
        # Half a second of burst: a server counting per second or per minute never sees more than its limit.
        self._rpm = TokenBucket(p.rpm / 60.0 * self._safety, p.rpm / 120.0) if p.rpm else None
        self._tpm = TokenBucket(p.tpm / 60.0 * self._safety, p.tpm / 120.0) if p.tpm else None

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- public -------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return self._submit(requests).result()

    def stream(self, chunks: Iterable[Sequence[Request]], lookahead: int = 1) -> Iterator[list[Completion]]:
        """Completions per chunk in order, with ``lookahead`` later chunks already running.

        If the caller stops early (the shard failed, its lease was lost), chunks
        still in flight are cancelled: requests not yet sent are never sent.
        """
        pending: deque[Future[list[Completion]]] = deque()
        source = iter(chunks)
        try:
            for chunk in source:
                pending.append(self._submit(chunk))
                if len(pending) > lookahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    # -- internals ----------------------------------------------------------------

    def _submit(self, requests: Sequence[Request]) -> Future[list[Completion]]:
        return asyncio.run_coroutine_threadsafe(self._chunk(list(requests)), self._loop)

    async def _chunk(self, requests: list[Request]) -> list[Completion]:
        results = list(await asyncio.gather(*(self._one(r) for r in requests)))
        down = [c for c in results if c.error and c.error.startswith("provider unavailable")]
        if results and len(down) == len(results):
            raise ProviderError(f"provider {self.provider.name!r} failed every request: {down[0].error}")
        return results

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _messages(self, request: Request) -> list[dict[str, str]]:
        return request_messages(request)

    def _body(self, request: Request, messages: list[dict[str, str]]) -> dict[str, Any]:
        return chat_body(self.provider, request.model or self.model, request, messages)

    async def _one(self, request: Request) -> Completion:
        model = request.model or self.model
        if not self.provider.serves(model):
            return Completion.failed(f"provider {self.provider.name!r} does not serve model {model!r}")
        if request.response_schema is None:
            return await self._ask(request, self._messages(request))
        return await self._ask_structured(request)

    async def _ask_structured(self, request: Request) -> Completion:
        """Ask, validate the answer against the row's schema, and re-ask with the reason up to
        ``schema_retries`` times. Every attempt's tokens and cost are summed (each was billed);
        the last answer is returned, valid or not (the worker quarantines an invalid one)."""
        schema = request.response_schema or "{}"
        messages = self._messages(request)
        started = time.perf_counter()
        tokens_in = tokens_out = tries = 0
        cost = 0.0
        for attempt in range(request.schema_retries + 1):
            answer = await self._ask(request, messages)
            tokens_in, tokens_out = tokens_in + answer.input_tokens, tokens_out + answer.output_tokens
            cost, tries = cost + (answer.cost_usd or 0.0), tries + answer.tries
            problem = answer.error or validate_answer(schema, answer.output)[1]
            if answer.error is not None or problem is None or attempt == request.schema_retries:
                return replace(
                    answer,
                    input_tokens=tokens_in,
                    output_tokens=tokens_out,
                    cost_usd=cost,
                    tries=tries,
                    reasks=attempt,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            note = f"That answer does not follow the JSON Schema: {problem}. Answer again, with JSON that does."
            messages = [
                *messages,
                {
                    "role": "assistant",
                    "content": _cut(answer.output or "", REASK_ANSWER_BYTES_PER_TOKEN * request.max_tokens),
                },
                {"role": "user", "content": _cut(note, REASK_NOTE_BYTES)},
            ]
        raise AssertionError("unreachable")  # the loop returns on its last attempt

    async def _ask(self, request: Request, messages: list[dict[str, str]]) -> Completion:
        """One request (with the transport's own retries for 429s, 5xx and timeouts)."""
        body = self._body(request, messages)
        text_len = sum(len(m.get("content") or "") for m in body["messages"])
        est_tokens = text_len / 4 + request.max_tokens
        last_error = "no attempt made"
        started = time.perf_counter()
        for attempt in range(self.provider.max_retries + 1):
            if self._rpm:
                await self._rpm.acquire(1)
            if self._tpm:
                await self._tpm.acquire(est_tokens)
            wait: float | None = None
            async with self._slots:
                sent = time.perf_counter()
                try:
                    async with self._client.post(self._url, json=body) as response:
                        status, payload = response.status, await response.read()
                        if status in RETRYABLE:
                            wait = retry_after(response.headers.get("retry-after"), self._retry_cap)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last_error = f"provider unavailable: {exc.__class__.__name__}"
                    self._answered(None, time.perf_counter() - sent)
                else:
                    self._answered(status, time.perf_counter() - sent)
                    if status == 200:
                        parsed = self._parse(request, messages, payload, started, attempt + 1)
                        if parsed is not None:
                            return parsed
                        last_error = "malformed response body from provider"
                    elif status in RETRYABLE:
                        if status == 429 and self._rpm:
                            self._rpm.drain()
                        last_error = (
                            "rate limited (HTTP 429)" if status == 429 else f"provider unavailable: HTTP {status}"
                        )
                    elif status in (401, 403):
                        # The key is wrong, expired or not allowed: no row will fare better.
                        raise ProviderError(
                            f"provider {self.provider.name!r} refused the key: HTTP {status}"
                            + (f" (check {self.provider.api_key_env})" if self.provider.api_key_env else "")
                        )
                    else:
                        text = payload[:300].decode("utf-8", "replace")
                        return Completion.failed(
                            self._scrub(f"provider refused the request: HTTP {status}: {text}"), tries=attempt + 1
                        )
            if attempt < self.provider.max_retries:
                backoff = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
                await asyncio.sleep(min(max(wait or 0.0, backoff), self._retry_cap))
        return Completion.failed(
            self._scrub(f"{last_error} after {self.provider.max_retries + 1} attempts"),
            tries=self.provider.max_retries + 1,
        )

    def _answered(self, status: int | None, seconds: float) -> None:
        """One request came back (``status`` None: no answer at all), after ``seconds``; a
        subclass adapting its window to the server listens here."""

    def _parse(
        self, request: Request, messages: list[dict[str, str]], payload: bytes, started: float, tries: int
    ) -> Completion | None:
        try:
            data = json.loads(payload)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            usage = data["usage"]
            tokens_in, tokens_out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
            if not isinstance(text, str):
                return None
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        p = self.provider
        tokens_in, tokens_out = self._clamp_usage(request, messages, tokens_in, tokens_out)
        return Completion(
            output=text,
            finish_reason=choice.get("finish_reason") or "stop",
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            cost_usd=tokens_in / 1e6 * p.input_usd_per_1m + tokens_out / 1e6 * p.output_usd_per_1m,
            tries=tries,
        )

    def _clamp_usage(
        self, request: Request, messages: list[dict[str, str]], tokens_in: int, tokens_out: int
    ) -> tuple[int, int]:
        """Usage within what the request can be billed: at least 0, at most its prompt's
        bound (``input_token_bound``) and its ``max_tokens``. A provider (or a proxy)
        reporting more is logged, and charged the bound the budget reserved."""
        most_in = usage_bound(messages)
        clamped = (min(max(0, tokens_in), most_in), min(max(0, tokens_out), request.max_tokens))
        if clamped != (tokens_in, tokens_out):
            log.warning(
                "provider %r reported usage %d in / %d out for a request bounded by %d / %d tokens; charged %d / %d",
                self.provider.name,
                tokens_in,
                tokens_out,
                most_in,
                request.max_tokens,
                *clamped,
            )
        return clamped


def request_messages(request: Request) -> list[dict[str, str]]:
    """The chat messages a request sends: its own, or its prompt as one ``PROMPT_ROLE`` message."""
    return list(request.messages or [{"role": PROMPT_ROLE, "content": request.prompt or ""}])


def chat_body(provider: ApiProvider, model: str, request: Request, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat-completions body of ``request`` for ``provider`` (our ``model`` mapped to its own)."""
    body: dict[str, Any] = {
        "model": provider.provider_model(model),
        "messages": messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if request.response_schema is not None:
        schema = json.loads(request.response_schema)
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
    return body


def usage_bound(messages: Sequence[dict[str, str]]) -> int:
    """The most prompt tokens a provider can bill for ``messages`` (``input_token_bound``)."""
    text = sum(
        len((m.get("content") or "").encode("utf-8", "surrogatepass")) + len(m.get("role") or "") for m in messages
    )
    return input_token_bound(text, len(messages), 1)


def _cut(text: str, most_bytes: int) -> str:
    """``text`` cut to at most ``most_bytes`` UTF-8 bytes, on a character boundary."""
    return text.encode("utf-8", "surrogatepass")[:most_bytes].decode("utf-8", "ignore")

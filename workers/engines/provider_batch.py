"""A client of a provider's Files + Batches API (OpenAI's format; aiohttp).

What the batch lane needs and nothing more: upload a JSONL file, create a batch
that carries our marker in its ``metadata``, find a batch again by that marker
(listing, newest first, back to when it could have been created), read one,
cancel one, download a file's content. Every call is retried on 429, 5xx, time-outs
and dropped connections with backoff and jitter (``Retry-After`` honoured,
capped), ``max_retries`` times; then ``TransientError`` (the caller tries again
later). A 401/403 or another 4xx is ``ProviderError`` (the lane cannot take the
work). The key lives in the ``Authorization`` header and is scrubbed from every error.

Each call runs on an event loop of its own: the lane's work is a handful of calls
per provider batch, from a control task, not a stream of requests.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from typing import Any

import aiohttp

from schemas.backends import ApiProvider
from schemas.errors import ProviderError, TransientError
from workers.engines.openai_http import BACKOFF_BASE, BACKOFF_CAP, RETRYABLE, retry_after

__all__ = ["BATCH_ENDPOINT", "MARKER_KEY", "BatchClient", "ResultLine", "parse_results"]

#: The endpoint every request line of a batch names.
BATCH_ENDPOINT = "/v1/chat/completions"
#: The metadata key of a provider batch holding our marker.
MARKER_KEY = "spotlane_marker"
#: Batches listed per page when finding one by its marker, and the most pages read.
_PAGE = 100
_MOST_PAGES = 50


class BatchClient:
    """Files + Batches of one provider."""

    def __init__(self, provider: ApiProvider) -> None:
        self.provider = provider
        self._key = provider.api_key()
        if provider.api_key_env and not self._key:
            raise ProviderError(f"provider {provider.name!r}: environment variable {provider.api_key_env} is not set")

    # -- the calls -------------------------------------------------------------------

    def upload(self, name: str, content: bytes) -> str:
        """Upload a batch input file; its id."""
        found = self._call("POST", "/files", upload=(name, content))
        return str(found["id"])

    def create(self, file_id: str, window_hours: float, metadata: Mapping[str, str]) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": BATCH_ENDPOINT,
            "completion_window": f"{round(window_hours)}h",
            "metadata": dict(metadata),
        }
        return self._json("POST", "/batches", body=body)

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}")

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/batches/{batch_id}/cancel")

    def content(self, file_id: str) -> bytes:
        found = self._call("GET", f"/files/{file_id}/content", raw=True)
        return bytes(found)

    def find(self, marker: str, since: float) -> dict[str, Any] | None:
        """The batch whose metadata holds ``marker``, created after ``since`` (Unix seconds,
        with a minute of clock slack), or None: listed newest first, page by page."""
        after: str | None = None
        for _ in range(_MOST_PAGES):
            query = f"?limit={_PAGE}" + (f"&after={after}" if after else "")
            page = self._json("GET", f"/batches{query}")
            data = page.get("data") or []
            for batch in data:
                if (batch.get("metadata") or {}).get(MARKER_KEY) == marker:
                    return dict(batch)
            older = [b for b in data if isinstance(b.get("created_at"), int | float) and b["created_at"] < since - 60]
            if not data or older or not page.get("has_more"):
                return None
            after = str(data[-1]["id"])
        return None

    # -- transport -------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        found = self._call(method, path, body=body)
        if not isinstance(found, dict):
            raise TransientError(f"provider {self.provider.name!r} batch API: {method} {path}: not a JSON object")
        return found

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        upload: tuple[str, bytes] | None = None,
        raw: bool = False,
    ) -> Any:
        return asyncio.run(self._send(method, path, body, upload, raw))

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, upload: tuple[str, bytes] | None, raw: bool
    ) -> Any:
        p = self.provider
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        timeout = aiohttp.ClientTimeout(total=max(p.timeout_seconds, 300.0 if upload else 0.0))
        last = "no attempt made"
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as client:
            for attempt in range(p.max_retries + 1):
                wait: float | None = None
                data: aiohttp.FormData | None = None
                if upload is not None:
                    data = aiohttp.FormData()
                    data.add_field("purpose", "batch")
                    data.add_field("file", upload[1], filename=upload[0], content_type="application/jsonl")
                try:
                    async with client.request(method, p.base_url + path, json=body, data=data) as response:
                        status, payload = response.status, await response.read()
                        wait = retry_after(response.headers.get("retry-after"), p.timeout_seconds)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last = f"{exc.__class__.__name__}"
                else:
                    if 200 <= status < 300:
                        if raw:
                            return payload
                        try:
                            return json.loads(payload)
                        except ValueError:
                            last = "a malformed response body"
                    elif status in (401, 403):
                        raise ProviderError(
                            f"provider {p.name!r} refused the key for its batch API: HTTP {status}"
                            + (f" (check {p.api_key_env})" if p.api_key_env else "")
                        )
                    elif status not in RETRYABLE:
                        text = payload[:300].decode("utf-8", "replace")
                        raise ProviderError(
                            self._scrub(f"provider {p.name!r} batch API: {method} {path}: HTTP {status}: {text}")
                        )
                    else:
                        last = f"HTTP {status}"
                if attempt < p.max_retries:
                    backoff = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
                    await asyncio.sleep(min(max(wait or 0.0, backoff), p.timeout_seconds))
        raise TransientError(
            self._scrub(f"provider {p.name!r} batch API: {method} {path}: {last} after {p.max_retries + 1} attempts")
        )


class ResultLine:
    """One line of a provider batch's output or error file."""

    __slots__ = ("body", "custom_id", "error", "status_code")

    def __init__(self, custom_id: str, status_code: int, body: dict[str, Any] | None, error: str | None) -> None:
        self.custom_id, self.status_code, self.body, self.error = custom_id, status_code, body, error

    @property
    def answered(self) -> bool:
        return self.status_code == 200 and self.body is not None and self.error is None

    @property
    def final(self) -> bool:
        """An error the row itself caused (a 4xx other than a limit): another lane would
        refuse it too. Expired, cancelled, rate-limited and 5xx rows are worth asking again."""
        if self.answered:
            return True
        if self.error in ("batch_expired", "batch_cancelled"):
            return False
        return 400 <= self.status_code < 500 and self.status_code not in RETRYABLE


def parse_results(content: bytes) -> dict[str, ResultLine]:
    """custom_id -> its line, from an output or error file (unreadable lines are skipped:
    their rows count as unfinished, and are asked again elsewhere)."""
    found: dict[str, ResultLine] = {}
    for raw in content.splitlines():
        try:
            line = json.loads(raw)
            custom_id = str(line["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
        response = line.get("response") or {}
        error = line.get("error")
        code = response.get("status_code") if isinstance(response, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        message: str | None = None
        if isinstance(error, dict):
            message = str(error.get("code") or error.get("message") or "error")
        elif error is not None:
            message = str(error)
        if not isinstance(body, dict):
            body = None
        if isinstance(code, int) and code != 200 and message is None:
            detail = (body or {}).get("error")
            message = str(detail.get("message") if isinstance(detail, dict) else detail or f"HTTP {code}")
        found[custom_id] = ResultLine(custom_id, code if isinstance(code, int) else 0, body, message)
    return found

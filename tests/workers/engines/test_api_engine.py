"""The API engine against a local OpenAI-compatible server."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from schemas.backends import ApiProvider, input_token_bound
from schemas.errors import ProviderError
from tests.support.openai_server import FakeOpenAI
from workers.engines.base import Request
from workers.engines.openai_http import RETRY_AFTER_CAP, APIEngine, retry_after

SECRET = "sk-test-DO-NOT-LEAK-1234567890"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _engine(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> APIEngine:
    monkeypatch.setenv("TEST_PROVIDER_KEY", SECRET)
    provider = ApiProvider(
        name="local",
        base_url=server.url,
        api_key_env="TEST_PROVIDER_KEY",
        models={"tiny": "tiny-remote"},
        input_usd_per_1m=1.0,
        output_usd_per_1m=2.0,
        **overrides,  # type: ignore[arg-type]
    )
    return APIEngine(provider, "tiny")


def _requests(n: int, max_tokens: int = 8) -> list[Request]:
    return [Request(prompt=f"question number {i} about billing", max_tokens=max_tokens) for i in range(n)]


def test_answers_come_back_in_order_with_usage_priced(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(server, monkeypatch)

    completions = engine.generate(_requests(20))

    assert [c.output for c in completions] == [f"echo: question number {i} about billing" for i in range(20)]
    assert all(c.error is None and c.finish_reason == "stop" for c in completions)
    assert completions[0].input_tokens == 8 and completions[0].output_tokens == 5
    assert completions[0].cost_usd == pytest.approx(8 / 1e6 * 1.0 + 5 / 1e6 * 2.0)
    assert server.auth_headers == {f"Bearer {SECRET}"}


def test_429_and_5xx_are_retried_honouring_retry_after(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    server.script, server.retry_after = [429, 500, 503], 0.3
    engine = _engine(server, monkeypatch, max_concurrency=1)

    started = time.monotonic()
    completion = engine.generate(_requests(1))[0]

    assert completion.error is None and completion.tries == 4
    assert time.monotonic() - started >= 0.9  # three Retry-After waits of 0.3 s


def test_a_malformed_body_is_retried_then_becomes_an_error_row(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.malformed_first = 100
    engine = _engine(server, monkeypatch, max_retries=2, max_concurrency=1)

    completions = engine.generate(_requests(2))

    assert all(c.output is None and "malformed response" in (c.error or "") for c in completions)
    assert completions[0].tries == 3


def test_a_refused_key_fails_the_chunk_for_the_router_and_the_key_never_shows(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review L4: a 401 was turned into an error row per row (0 rows ok, job 'succeeded')."""
    server.required_key = "sk-some-other-key"
    engine = _engine(server, monkeypatch)

    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderError, match="refused the key: HTTP 401") as caught:
        engine.generate(_requests(1))

    assert server.requests == 1  # not retried
    assert SECRET not in str(caught.value) and SECRET not in caplog.text


def test_a_client_error_is_not_retried_and_becomes_an_error_row(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.script = [400]
    engine = _engine(server, monkeypatch, max_concurrency=1)

    completions = engine.generate(_requests(2))

    assert completions[0].tries == 1 and "HTTP 400" in (completions[0].error or "")
    assert completions[1].error is None and server.requests == 2


@pytest.mark.parametrize("header", ["soon", "Wed, 99 Foo 2026 99:99:99 GMT", "nan", "-5"])
def test_a_malformed_retry_after_is_ignored_not_fatal(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    """Review M11: 'soon' raised ValueError out of the retry loop and failed the shard."""
    server.script, server.retry_after = [503], header
    engine = _engine(server, monkeypatch, max_concurrency=1)

    completion = engine.generate(_requests(1))[0]

    assert completion.error is None and completion.tries == 2


def test_a_huge_retry_after_is_capped() -> None:
    """Review M11: '1e9' slept for about 31 years while the heartbeat kept the lease."""
    assert retry_after("1e9") == RETRY_AFTER_CAP
    assert retry_after("1e9", cap=7.0) == 7.0
    assert retry_after("0.3") == pytest.approx(0.3)
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_usage_a_provider_reports_beyond_what_a_request_can_be_billed_is_clamped(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review L6: negative usage gave a negative charge, 10**12 tokens a $40M one."""
    engine = _engine(server, monkeypatch, max_concurrency=1)

    server.usage = (-5_000_000, 10)
    negative = engine.generate(_requests(1, max_tokens=8))[0]
    server.usage = (10**12, 10**12)
    with caplog.at_level(logging.WARNING):
        absurd = engine.generate(_requests(1, max_tokens=8))[0]

    assert negative.input_tokens == 0 and negative.output_tokens == 8 and (negative.cost_usd or 0) >= 0
    prompt_bytes = len(b"question number 0 about billing") + len("user")
    assert absurd.output_tokens == 8 and absurd.input_tokens == input_token_bound(prompt_bytes, 1, 1)
    assert absurd.cost_usd == pytest.approx(absurd.input_tokens / 1e6 * 1.0 + 8 / 1e6 * 2.0)
    assert "reported usage" in caplog.text


def test_a_provider_that_is_down_fails_the_chunk_for_the_router(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.down = True
    engine = _engine(server, monkeypatch, max_retries=1)

    with pytest.raises(ProviderError, match="failed every request") as caught:
        engine.generate(_requests(3))

    assert SECRET not in str(caught.value)


def test_concurrency_never_exceeds_the_limit(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    server.latency = 0.05
    engine = _engine(server, monkeypatch, max_concurrency=7)

    engine.generate(_requests(60))

    assert server.max_in_flight == 7


def test_rpm_pacing_stays_under_the_servers_limit(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    server.rpm = 1200  # 20 per second
    engine = _engine(server, monkeypatch, rpm=1200, max_concurrency=64)

    started = time.monotonic()
    completions = engine.generate(_requests(60))
    elapsed = time.monotonic() - started

    assert all(c.error is None for c in completions)
    assert server.rejected_429 == 0
    assert 60 / elapsed <= 20 * 1.05 + 20 / elapsed  # one second of burst allowed


def test_chunks_overlap_in_stream(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    server.latency = 0.2
    engine = _engine(server, monkeypatch, max_concurrency=50)

    started = time.monotonic()
    results = list(engine.stream([_requests(10), _requests(10), _requests(10)], lookahead=2))

    assert [len(r) for r in results] == [10, 10, 10]
    assert time.monotonic() - started < 0.5  # three chunks, one latency


def test_a_missing_key_variable_is_named(server: FakeOpenAI) -> None:
    provider = ApiProvider(name="local", base_url=server.url, api_key_env="NO_SUCH_KEY_VAR", models={"tiny": "t"})

    with pytest.raises(ProviderError, match="NO_SUCH_KEY_VAR"):
        APIEngine(provider, "tiny")

"""Webhooks: job events signed the Standard Webhooks way, delivered at least once, every attempt in SQL.

A receiver on loopback checks each signature with the official ``openai`` SDK
(``client.webhooks.unwrap`` / ``verify_signature``), the way a team's endpoint would.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from pipeline.jobs.submit import JobRequest, submit
from pipeline.jobs.webhooks import deliver_due, due_events
from pipeline.runtime import Runtime
from pipeline.store.db import session_scope
from schemas.records import DELIVER_WEBHOOKS
from schemas.tables import WebhookDelivery
from tests.support import write_prompts
from tests.support.jobs import model_folder, run_queued, stub_runtime
from tests.support.serve import chat_lines


class Receiver:
    """Records what it is sent; answers ``fail_first`` requests with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.seen) <= receiver.fail_first else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(fail_first=1)
    yield found
    found.server.shutdown()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("SPOTLANE_TEST_WEBHOOK_SECRET", value)
    return value


def hooked_runtime(store_url: str, url: str, **hook: Any) -> tuple[Runtime, Any]:
    webhook = {"name": "team", "url": url, "secret_env": "SPOTLANE_TEST_WEBHOOK_SECRET", "backoff_seconds": 1.0, **hook}
    return stub_runtime(store_url, webhooks=[webhook], jobs={"rows_per_shard": 10})


def deliveries(runtime: Runtime) -> list[WebhookDelivery]:
    with session_scope(runtime.engine) as session:
        rows = list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all())
        for row in rows:
            session.expunge(row)
        return rows


def test_a_finished_job_is_posted_signed_and_retried_until_delivered(
    store_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    runtime, sent = hooked_runtime(store_url, receiver.url)
    job_id = submit(runtime, JobRequest(str(chat_lines(tmp_path / "b.jsonl", 12, model_folder(tmp_path))), []))
    run_queued(runtime, job_id)
    assert sent.of(DELIVER_WEBHOOKS)  # the finalizer asked the control queue at once

    assert deliver_due(runtime) == 0  # the receiver answered 500
    assert deliver_due(runtime) == 0  # its backoff has not passed: no second attempt yet
    time.sleep(1.1)  # past the backoff
    assert deliver_due(runtime) == 1
    assert deliver_due(runtime) == 0  # delivered: never again
    rows = deliveries(runtime)
    assert [(r.attempt, r.status_code, r.delivered) for r in rows] == [(1, 500, False), (2, 200, True)]
    assert {r.event for r in rows} == {"batch.completed"} and {r.job_id for r in rows} == {job_id}

    sdk = openai.OpenAI(api_key="unused", webhook_secret=secret, base_url="http://127.0.0.1:9")
    ids = set()
    for headers, body in receiver.seen:
        event = sdk.webhooks.unwrap(body, headers)  # raises unless the signature holds
        assert event.type == "batch.completed" and event.data.id == f"batch_{job_id}"
        ids.add(headers["webhook-id"])
    assert len(ids) == 1  # one event id over both attempts: receivers dedupe on it
    with pytest.raises(openai.InvalidWebhookSignatureError):
        tampered = receiver.seen[-1][1].replace(b"completed", b"failed")
        sdk.webhooks.verify_signature(tampered, receiver.seen[-1][0])


def test_a_job_paused_for_money_is_an_event_and_a_dead_receiver_is_tried_max_attempts(
    store_url: str, tmp_path: Path, secret: str
) -> None:
    dead = "http://127.0.0.1:9/never"  # nothing listens on the discard port here
    runtime, _ = stub_runtime(
        store_url,
        webhooks=[
            {
                "name": "team",
                "url": dead,
                "secret_env": "SPOTLANE_TEST_WEBHOOK_SECRET",
                "backoff_seconds": 0.1,
                "max_attempts": 2,
                "events": ["job.paused"],
            }
        ],
        gpu_pools=[{"name": "local", "price_per_hour": 36000.0, "tokens_per_second": 10}],
    )
    job_id = submit(
        runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 10)), model_folder(tmp_path), budget_usd=0.0001)
    )
    run_queued(runtime, job_id, finalize=False)
    with session_scope(runtime.engine) as session:
        due = due_events(session, runtime.settings.webhooks)
    assert [(event.type, event.job_id, attempt) for _, event, attempt in due] == [("job.paused", job_id, 1)]
    deliver_due(runtime)
    time.sleep(0.15)
    deliver_due(runtime)
    time.sleep(0.3)
    deliver_due(runtime)  # past max_attempts: given up
    rows = deliveries(runtime)
    assert [(r.attempt, r.delivered) for r in rows] == [(1, False), (2, False)]
    assert all(r.error and "Connect" in r.error and secret not in r.error for r in rows)
    assert json.dumps([r.error for r in rows]).count("whsec_") == 0

"""``spotlane serve`` in the distributed mode: PostgreSQL, Redis, S3, a real worker process.

Two serve replicas (in-process uvicorn servers over the same store, storage and
broker: nothing is shared between them but those) and one ``spotlane worker``
process. The official ``openai`` SDK uploads to one replica, creates the batch on
the other, polls either, and downloads every custom_id exactly once; a webhook
receiver on loopback hears ``batch.completed``, signed.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import openai
import pytest

from pipeline.runtime import Runtime
from pipeline.serve.keys import create_key
from tests.pipeline.serve.test_webhooks import Receiver
from tests.support import PrivateRedis, spotlane, stop_process
from tests.support.jobs import model_folder, worker_process
from tests.support.serve import chat_lines, serving

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_two_replicas_a_worker_and_the_sdk_on_postgres_redis_and_s3(
    postgres_url: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = PrivateRedis(tmp_path)
    broker.start()
    receiver = Receiver()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    env = {
        "SPOTLANE_DATABASE__URL": postgres_url,
        "SPOTLANE_BROKER__URL": broker.url,
        "SPOTLANE_STORAGE__HOT": f"{s3_bucket}/hot",
        "SPOTLANE_STORAGE__WARM": f"{s3_bucket}/warm",
        "SPOTLANE_STORAGE__COLD": f"{s3_bucket}/cold",
        "SPOTLANE_WORKER__ENGINE": "stub",
        "SPOTLANE_WORKER__CHECKPOINT_ROWS": "10",
        "SPOTLANE_WORKER__REAP_INTERVAL_SECONDS": "1",
        "SPOTLANE_JOBS__ROWS_PER_SHARD": "25",
        "SPOTLANE_WEBHOOKS": json.dumps(
            [{"name": "team", "url": receiver.url, "secret_env": "TEST_HOOK_SECRET", "backoff_seconds": 0.5}]
        ),
        "TEST_HOOK_SECRET": secret,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert spotlane("db", "upgrade", env=env).returncode == 0
    first, second = Runtime.open(), Runtime.open()
    worker = worker_process(env, tmp_path / "worker.log")
    try:
        with serving(first) as one, serving(second) as two:
            _, key = create_key(first, "team")
            upload = openai.OpenAI(base_url=one, api_key=key, max_retries=0)
            other = openai.OpenAI(base_url=two, api_key=key, max_retries=0)
            path = chat_lines(tmp_path / "batch.jsonl", 100, model_folder(tmp_path), max_tokens=4)
            with path.open("rb") as fh:
                uploaded = upload.files.create(file=fh, purpose="batch")
            batch = other.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="2h"
            )
            deadline = time.monotonic() + 120
            while (found := (upload, other)[int(time.monotonic()) % 2].batches.retrieve(batch.id)).status not in (
                "completed",
                "failed",
            ):
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
            assert found.status == "completed", found.errors
            assert found.request_counts is not None and found.request_counts.completed == 100
            assert found.output_file_id is not None
            out = [json.loads(x) for x in other.files.content(found.output_file_id).content.decode().splitlines()]
            assert [x["custom_id"] for x in out] == [f"req-{i:05d}" for i in range(100)]
            assert found.expires_at is not None and found.created_at is not None
            assert found.expires_at - found.created_at == 2 * 3600

            hooks = openai.OpenAI(api_key="unused", webhook_secret=secret, base_url=one)
            deadline = time.monotonic() + 30
            while not receiver.seen:
                assert time.monotonic() < deadline, "no webhook arrived"
                time.sleep(0.2)
            event = hooks.webhooks.unwrap(receiver.seen[0][1], receiver.seen[0][0])
            assert event.type == "batch.completed" and event.data.id == batch.id
    finally:
        stop_process(worker, grace=15)
        broker.kill()
        receiver.server.shutdown()
        first.engine.dispose()
        second.engine.dispose()

"""Jobs on an API provider through the real CLI and worker, against a local OpenAI-compatible server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, inspect, text

from tests.support import spotlane, write_prompts
from tests.support.openai_server import FakeOpenAI

pytestmark = pytest.mark.slow

SECRET = "sk-live-NEVER-IN-LOGS-0123456789"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency=0.02, required_key=SECRET) as fake:
        yield fake


def _config(tmp_path: Path, server: FakeOpenAI, model: str, gpu_price: float | None) -> Path:
    pools = "gpu_pools = []\n" if gpu_price is None else ""
    config = tmp_path / "spotlane.toml"
    config.write_text(
        pools
        + "[worker]\ncheckpoint_rows = 10\ncheckpoint_max_rows = 10\n"
        + ("" if gpu_price is None else f'[[gpu_pools]]\nname = "local"\nprice_per_hour = {gpu_price}\n')
        + f'[[api_providers]]\nname = "openai-local"\nbase_url = "{server.url}"\napi_key_env = "TEST_OPENAI_KEY"\n'
        + "input_usd_per_1m = 0.5\noutput_usd_per_1m = 1.5\nmax_retries = 2\nmax_concurrency = 8\n"
        + f'[api_providers.models]\n"{model}" = "remote-model"\n'
    )
    return config


def _all_sql_text(home: Path) -> str:
    engine = create_engine(f"sqlite:///{home / 'spotlane.db'}")
    dump = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            dump.extend(str(row) for row in conn.execute(text(f"select * from {table}")))
    return "\n".join(dump)


def test_a_job_on_an_api_provider_is_priced_from_usage_and_the_key_stays_secret(
    tmp_path: Path, spotlane_home: Path, server: FakeOpenAI
) -> None:
    config = _config(tmp_path, server, "chat-small", gpu_price=None)
    path = write_prompts(tmp_path / "in.parquet", 30, team=["x"] * 30)
    env = {"TEST_OPENAI_KEY": SECRET}

    result = spotlane(
        "--config",
        str(config),
        "run",
        str(path),
        "--model",
        "chat-small",
        "--max-tokens",
        "8",
        "--rows-per-shard",
        "10",
        "--output",
        str(tmp_path / "out.parquet"),
        env=env,
    )

    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("backend").unique().to_pylist() == ["openai-local"]
    assert table.column("output").to_pylist()[0] == "echo: Summarize the support ticket number"
    assert table.column("cost_usd").to_pylist()[0] == pytest.approx(13 / 1e6 * 0.5 + 5 / 1e6 * 1.5)
    assert table.column("team").to_pylist() == ["x"] * 30
    spend = json.loads(spotlane("--config", str(config), "costs", "--json", env=env).stdout)
    assert spend[0]["backend"] == "openai-local" and spend[0]["output_tokens"] == 150
    logs = "".join(p.read_text() for p in (spotlane_home / "logs").glob("*.log"))
    for place in (result.stdout, result.stderr, logs, _all_sql_text(spotlane_home)):
        assert SECRET not in place


def test_spotlane_run_waits_for_the_providers_batch_lane_and_pays_half(
    tmp_path: Path, spotlane_home: Path, server: FakeOpenAI
) -> None:
    server.batch_delay = 0.5
    config = _config(tmp_path, server, "chat-small", gpu_price=None)
    config.write_text(config.read_text() + "[api_providers.batch]\npoll_seconds = 0.2\n")
    path = write_prompts(tmp_path / "in.parquet", 30)
    env = {"TEST_OPENAI_KEY": SECRET}

    result = spotlane(
        "--config",
        str(config),
        "run",
        str(path),
        "--model",
        "chat-small",
        "--max-tokens",
        "8",
        "--rows-per-shard",
        "10",
        "--output",
        str(tmp_path / "out.parquet"),
        env=env,
    )

    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(30)]
    assert set(table.column("backend").to_pylist()) == {"openai-local.batch"}
    assert table.column("cost_usd").to_pylist()[0] == pytest.approx((13 / 1e6 * 0.5 + 5 / 1e6 * 1.5) * 0.5)
    assert len(server.batches) == 3 and server.requests == 0
    spend = json.loads(spotlane("--config", str(config), "costs", "--json", env=env).stdout)
    assert [line["backend"] for line in spend] == ["openai-local.batch"]
    logs = "".join(p.read_text() for p in (spotlane_home / "logs").glob("*.log"))
    for place in (result.stdout, result.stderr, logs, _all_sql_text(spotlane_home)):
        assert SECRET not in place


def test_a_provider_that_is_down_hands_its_shards_to_the_gpu_pool(
    tmp_path: Path, spotlane_home: Path, server: FakeOpenAI, tiny_model: Path
) -> None:
    server.down = True
    config = _config(tmp_path, server, str(tiny_model), gpu_price=50.0)
    path = write_prompts(tmp_path / "in.parquet", 20)

    result = spotlane(
        "--config",
        str(config),
        "run",
        str(path),
        "--model",
        str(tiny_model),
        "--max-tokens",
        "4",
        "--rows-per-shard",
        "10",
        "--output",
        str(tmp_path / "out.parquet"),
        env={"TEST_OPENAI_KEY": SECRET},
    )

    assert result.returncode == 0, result.stderr
    assert set(pq.read_table(tmp_path / "out.parquet").column("backend").to_pylist()) == {"local"}
    with create_engine(f"sqlite:///{spotlane_home / 'spotlane.db'}").connect() as conn:
        attempts = conn.execute(text("select backend, outcome from shard_attempts order by shard_id, attempt")).all()
        excluded = conn.execute(text("select excluded_backends from shards")).scalars().all()
    assert [tuple(a) for a in attempts] == [("openai-local", "failed"), ("local", "done")] * 2
    assert all("openai-local" in e for e in excluded)


def test_retry_errors_reruns_only_failed_rows_into_a_new_result_version(
    tmp_path: Path, spotlane_home: Path, server: FakeOpenAI
) -> None:
    import os
    import subprocess
    import sys
    import time

    server.script = [400, 400, 400]  # the first three requests are refused once
    config = _config(tmp_path, server, "chat-small", gpu_price=None)
    text_ = config.read_text().replace("max_concurrency = 8", "max_concurrency = 1")
    config.write_text(text_)
    env = {"TEST_OPENAI_KEY": SECRET}
    path = write_prompts(tmp_path / "in.parquet", 12)
    first = spotlane("--config", str(config), "run", str(path), "--model", "chat-small", "--max-tokens", "4", env=env)
    assert "succeeded_with_errors: 9 rows ok, 3 failed" in first.stdout, first.stdout + first.stderr
    job_id = first.stdout.split()[1]

    retried = spotlane("--config", str(config), "retry-errors", job_id, env=env)
    assert retried.returncode == 0 and "retrying 3 row(s)" in retried.stdout, retried.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "worker"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while "results-v2" not in spotlane("--config", str(config), "results", job_id, env=env).stdout:
            assert time.monotonic() < deadline, "no new result version"
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(30)

    out = tmp_path / "v2.parquet"
    assert spotlane("--config", str(config), "results", job_id, "--to", str(out), env=env).returncode == 0
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [f"row-{i:05d}" for i in range(12)]
    assert table.column("error").null_count == 12
    manifest = json.loads(spotlane("--config", str(config), "results", job_id, "--json", env=env).stdout)
    assert manifest["version"] == 2 and manifest["rows_failed"] == 0

"""Nothing exposed: secrets masked wherever they can be printed, user strings never
read as markup, files written where asked and only whole, listeners on loopback.

Review findings L1, L3, L12 and L13.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.secrets import mask_url
from schemas.settings import load_settings
from tests.support import spotlane, write_prompts


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://spotlane@db/spotlane?password=DbPa55w0rd", "DbPa55w0rd"),
        ("postgresql://u:p/ss@db/x", "p/ss"),
        ("postgresql+psycopg://u:p#?x@h:5432/d", "p#?x"),
        ("redis://:redisPa55@redis:6379/0", "redisPa55"),
        ("postgresql://u@h/d?sslpassword=k3yPa55&application_name=spotlane", "k3yPa55"),
    ],
)
def test_every_form_of_password_in_a_url_is_masked(url: str, secret: str) -> None:
    """Review L1: query-string passwords and passwords with '/', '#' or '?' were printed."""
    masked = mask_url(url)

    assert secret not in masked and "***" in masked


def test_config_show_masks_every_url_it_prints(tmp_path: Path) -> None:
    config = tmp_path / "spotlane.toml"
    config.write_text(
        '[database]\nurl = "postgresql://spotlane@db/spotlane?password=DbPa55w0rd"\n'
        '[broker]\nurl = "redis://:redisPa55@redis:6379/0"\n'
    )

    shown = spotlane("--config", str(config), "config", "show")

    assert shown.returncode == 0 and "DbPa55w0rd" not in shown.stdout and "redisPa55" not in shown.stdout


def test_a_provider_url_carrying_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match="carries credentials") as refused:
        load_settings(api_providers=[{"name": "p", "base_url": "https://svc:S3cr3tProxyPass@llm-proxy/v1"}])
    assert "S3cr3tProxyPass" not in str(refused.value)


def test_markup_in_a_name_or_an_error_is_printed_as_text(tmp_path: Path, spotlane_home: Path) -> None:
    """Review L3: an input URL or an error holding '[/b]' crashed `spotlane status` and the error printer."""
    from sqlalchemy import create_engine, text

    from tests.support.jobs import model_folder

    folder = tmp_path / "in[x"
    folder.mkdir()
    submitted = spotlane("submit", str(write_prompts(folder / "in.parquet", 3)), "--model", model_folder(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    store = create_engine(f"sqlite:///{spotlane_home / 'spotlane.db'}")
    with store.begin() as conn:
        conn.execute(text("update jobs set error = 'model [/b] failed [red]' where id = :j"), {"j": job_id})
    store.dispose()

    status = spotlane("status", job_id)
    refused = spotlane("submit", str(folder / "in.parquet"), "--model", str(tmp_path / "models" / "m[/red]"))

    assert status.returncode == 0, status.stderr
    assert "model [/b] failed [red]" in status.stdout and "in[x" in status.stdout
    assert refused.returncode == 2 and "m[/red]" in refused.stderr and "MarkupError" not in refused.stderr


def test_an_export_never_lands_in_the_jobs_own_storage_and_appears_whole(tmp_path: Path, spotlane_home: Path) -> None:
    """Review L12: --to opened the target before reading and could overwrite the job's own part."""
    from pipeline import api
    from pipeline.jobs.submit import JobRequest, submit
    from tests.support.jobs import model_folder, run_queued, stub_runtime

    runtime, _ = stub_runtime(f"sqlite:///{spotlane_home / 'spotlane.db'}")
    job_id = submit(runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 5)), model_folder(tmp_path)))
    run_queued(runtime, job_id)
    part = api.results(runtime, job_id).files[0]

    with pytest.raises(Exception, match="inside spotlane's storage"):
        api.export_results(runtime, job_id, part)
    out = tmp_path / "out.parquet"
    assert api.export_results(runtime, job_id, str(out)).rows == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_the_metrics_endpoint_listens_on_loopback_unless_told_otherwise() -> None:
    """Review L13: prometheus_client's default is every interface."""
    from pipeline import metrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port, load_settings().metrics.address)

    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in addresses:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=1):
            pass

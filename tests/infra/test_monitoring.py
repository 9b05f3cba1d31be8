"""The operators' side: alert rules and the Grafana dashboard read metrics that exist,
and the job store's gauges say what the alerts need on a real store."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import update

from pipeline import metrics
from pipeline.jobs.submit import JobRequest, submit
from pipeline.routing.router import route_job
from pipeline.store.db import session_scope
from schemas.base import utcnow
from schemas.status import LedgerKind
from schemas.tables import CostLedgerEntry, Job
from tests.support import write_prompts
from tests.support.jobs import model_folder, stub_runtime

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "spotlane.json"


def _known(store_url: str) -> set[str]:
    """Every series name spotlane exposes: the workers' counters and histograms, the store's gauges."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("spotlane_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    runtime, _ = stub_runtime(store_url)
    names |= {f.name for f in metrics.StoreCollector(runtime).collect()}
    return names


def _used(expr: str) -> set[str]:
    return set(re.findall(r"\bspotlane_[a-z_]+\b", expr))


def test_every_alert_rule_is_well_formed_and_reads_metrics_that_exist(store_url: str) -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    known = _known(store_url)
    names = {rule["alert"] for rule in rules}
    assert {
        "SpotlaneJobNoProgress",
        "SpotlaneJobNearBudget",
        "SpotlaneBackendCoolingDown",
        "SpotlanePreemptionAbovePrior",
        "SpotlaneQueueWithoutConsumer",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert _used(rule["expr"]) and _used(rule["expr"]) <= known, (rule["alert"], _used(rule["expr"]) - known)
    if shutil.which("promtool"):  # Debian's prometheus package; the same checks as above otherwise
        checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_reads_metrics_that_exist_and_compose_provisions_it(store_url: str) -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    known = _known(store_url)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert _used(expr) and _used(expr) <= known, (expr, _used(expr) - known)
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("rows per second", "queue", "cost per hour", "budget", "preemption", "lease", "cache"):
        assert topic in titles, topic
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "./infra/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/spotlane.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prometheus = compose["services"]["prometheus"]
    assert "./infra/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]
    scrape = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "scheduler" in scrape["scrape_configs"][0]["dns_sd_configs"][0]["names"]


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_the_store_gauges_show_a_job_near_its_budget_a_quiet_job_and_a_queue_nobody_consumes(
    store_url: str, tmp_path: Path
) -> None:
    runtime, _ = stub_runtime(store_url)
    job_id = submit(
        runtime, JobRequest(str(write_prompts(tmp_path / "in.parquet", 10)), model_folder(tmp_path), budget_usd=1.0)
    )
    route_job(runtime, job_id)
    with session_scope(runtime.engine) as session:
        session.add(
            CostLedgerEntry(
                job_id=job_id, backend="local", kind=LedgerKind.CHARGE, amount_usd=0.85, created_at=utcnow()
            )
        )
        earlier = utcnow() - timedelta(minutes=20)
        session.execute(update(Job).where(Job.id == job_id).values(started_at=earlier))
    registry = CollectorRegistry()
    registry.register(metrics.StoreCollector(runtime))

    committed = _sample(registry, "spotlane_job_committed_usd", job=job_id)
    budget = _sample(registry, "spotlane_job_budget_usd", job=job_id)
    assert committed is not None and budget == 1.0 and committed / budget > 0.8  # SpotlaneJobNearBudget
    quiet = _sample(registry, "spotlane_job_seconds_since_progress", job=job_id)
    assert quiet is not None and quiet > 900  # SpotlaneJobNoProgress
    assert _sample(registry, "spotlane_queue_waiting_shards", queue="gpu.local") == 1.0
    assert _sample(registry, "spotlane_queue_consumers", queue="gpu.local") == 0.0  # SpotlaneQueueWithoutConsumer
    assert _sample(registry, "spotlane_backend_cooling", backend="local") == 0.0
    assert _sample(registry, "spotlane_job_rows", job=job_id, state="total") == 10.0


def test_kubernetes_gets_the_same_alert_rules_and_scrapes_the_scheduler() -> None:
    rules = yaml.safe_load(RULES.read_text())
    documents = list(yaml.safe_load_all((ROOT / "infra/k8s/monitoring.yaml").read_text()))
    (rule,) = [d for d in documents if d and d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == rules["groups"]
    scheduler = yaml.safe_load((ROOT / "infra/k8s/scheduler.yaml").read_text())
    template = scheduler["spec"]["template"]
    assert template["metadata"]["labels"]["spotlane.io/metrics"] == "true"
    assert template["spec"]["containers"][0]["ports"][0]["name"] == "metrics"

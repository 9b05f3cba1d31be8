"""docker-compose.yml and infra/k8s agree with the code: queues, settings, images, GPU placement."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return load_settings()  # an unknown or invalid SPOTLANE_* key raises here


def _queues(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a in ("--queues", "-Q")]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _spotlane_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if "infra/docker/Dockerfile" in str(s.get("build", ""))}


def test_compose_services_consume_only_queues_the_settings_define(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = _spotlane_services(compose)
    assert {"migrate", "control", "gpu-worker", "scheduler", "serve"} <= set(services)

    for name, service in services.items():
        settings = _settings_from(service["environment"], monkeypatch)
        assert set(_queues(service["command"])) <= set(settings.queues), name
    assert _queues(services["gpu-worker"]["command"]) == ["gpu.spot"]
    assert _queues(services["control"]["command"]) == [settings.control_queue]


def test_compose_has_every_real_service_with_health_checks_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]

    for name in ("redis", "postgres", "minio"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["control"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["control"]["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "flower" in services and "prometheus" in services
    images = {s["image"] for s in _spotlane_services(compose).values()}
    assert len(images) == 1


def test_compose_serves_the_api_on_loopback_with_a_health_check_after_the_migration(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = compose["services"]["serve"]
    settings = _settings_from(serve["environment"], monkeypatch)

    assert serve["command"] == ["serve"]
    assert serve["image"] == compose["services"]["control"]["image"]
    assert settings.serve.host == "0.0.0.0"  # inside the container; the host sees loopback only
    assert serve["ports"] == [f"127.0.0.1:{settings.serve.port}:{settings.serve.port}"]
    check = " ".join(serve["healthcheck"]["test"])
    assert serve["healthcheck"]["test"][0] == "CMD" and "urllib" in check  # the image has no curl
    assert f"http://127.0.0.1:{settings.serve.port}/health" in check
    assert serve["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert serve["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"


def test_compose_keeps_credentials_out_of_settings_keys(compose: dict[str, Any]) -> None:
    env = _spotlane_services(compose)["control"]["environment"]

    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert all("secret" not in v.lower() for k, v in env.items() if k.startswith("SPOTLANE_STORAGE"))


def _compose_client() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1), whichever works here."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


_PASSWORDS = {
    "POSTGRES_PASSWORD": "pg-pass",
    "MINIO_ROOT_PASSWORD": "minio-pass",
    "FLOWER_PASSWORD": "flower-pass",
    "GRAFANA_PASSWORD": "grafana-pass",
}


@pytest.mark.skipif(_compose_client() is None, reason="no compose client (docker compose or docker-compose)")
def test_compose_config_validates_and_refuses_to_start_without_its_passwords() -> None:
    """Review H6: missing passwords fell back to spotlane / spotlane-secret."""
    command = [*(_compose_client() or []), "config", "-q"]
    clean = {k: v for k, v in os.environ.items() if k not in _PASSWORDS}

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**clean, **_PASSWORDS})
    for missing in _PASSWORDS:
        refused = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**clean, **{k: v for k, v in _PASSWORDS.items() if k != missing}},
        )
        assert refused.returncode != 0 and f"set {missing}" in refused.stderr, missing

    assert result.returncode == 0, result.stderr


def test_compose_opens_nothing_to_the_world_and_pins_every_image(compose: dict[str, Any]) -> None:
    """Review H6: MinIO, Flower and Prometheus were published on every interface, with
    default credentials, unauthenticated Flower and :latest images."""
    text = (ROOT / "docker-compose.yml").read_text()
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert {"minio", "serve", "flower", "prometheus", "grafana"} <= published
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        image = str(service.get("image", ""))
        if "SPOTLANE_IMAGE" not in image:
            tag = image.partition(":")[2]
            assert tag and tag != "latest" and any(c.isdigit() for c in tag), (name, image)
    assert "--basic-auth=" in " ".join(compose["services"]["flower"]["command"])
    for secret in ("spotlane-secret", "POSTGRES_PASSWORD:-", "MINIO_ROOT_PASSWORD:-"):
        assert secret not in text
    assert text.count("${POSTGRES_PASSWORD:?") == 2 and text.count("${MINIO_ROOT_PASSWORD:?") == 3


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else {}
    return list(spec.get("containers", []))


def test_kustomization_lists_every_manifest(k8s: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())

    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert [i["name"] for i in kustomization["images"]] == ["spotlane"]


def test_k8s_workers_queues_and_keda_triggers_agree_with_the_settings(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spotlane-config")
    settings = _settings_from(config["data"], monkeypatch)
    # The broker URL carries the password: the secret the kustomization tells you to create.
    broker_url = re.search(r'SPOTLANE_BROKER__URL="([^"]+)"', (K8S / "kustomization.yaml").read_text()).group(1)  # type: ignore[union-attr]
    deployments = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Deployment"}
    queue_of: dict[str, list[str]] = {}
    for name, doc in deployments.items():
        for container in _containers(doc):
            if container["image"] == "spotlane":
                assert {"configMapRef": {"name": "spotlane-config"}} in container["envFrom"], name
                queue_of[name] = _queues(container["args"])
                assert set(queue_of[name]) <= set(settings.queues), name

    scaled = [d for d in k8s if d["kind"] == "ScaledObject"]
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {n for n, q in queue_of.items() if q}
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]["name"]
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "redis"
        assert [trigger["metadata"]["listName"]] == queue_of[target]
        assert broker_url.endswith("/" + trigger["metadata"]["databaseIndex"])
    gpu_scaler = next(s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == "spotlane-gpu-spot")
    assert gpu_scaler["spec"]["maxReplicaCount"] == settings.pool("spot").max_workers


def test_gpu_workers_land_on_the_spot_pool_with_time_to_drain(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "spotlane-gpu-spot")
    pod = gpu["spec"]["template"]["spec"]
    config = next(d for d in k8s if d["kind"] == "ConfigMap")
    settings = _settings_from(config["data"], monkeypatch)

    assert pod["nodeSelector"] == {"spotlane.io/node-pool": "gpu-spot"}
    assert {t["key"] for t in pod["tolerations"]} == {"spotlane.io/spot", "nvidia.com/gpu"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 2 * settings.worker.heartbeat_seconds + 60
    annotations = gpu["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics.port)


def test_secrets_are_referenced_never_inlined(k8s: list[dict[str, Any]]) -> None:
    config = next(d for d in k8s if d["kind"] == "ConfigMap")

    assert "SPOTLANE_DATABASE__URL" not in config["data"]
    assert not any(k.startswith("AWS_SECRET") or k.startswith("AWS_ACCESS") for k in config["data"])
    assert not [d for d in k8s if d["kind"] == "Secret"]


def test_the_image_copies_every_package_the_project_installs() -> None:
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()

    for package in ("pipeline", "workers", "schemas", "migrations"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_the_cluster_config_schedules_a_nightly_run_and_ages_results(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spotlane-config")
    settings = _settings_from(config["data"], monkeypatch)
    [nightly] = settings.schedules
    assert (nightly.name, nightly.cron, nightly.timezone, nightly.deadline) == (
        "support-nightly",
        "0 2 * * *",
        "Europe/Berlin",
        "07:00",
    )
    assert nightly.input_url(nightly.next_fire(datetime(2026, 11, 25, 12, tzinfo=UTC))).endswith(
        "/2026-11-26/*.parquet"
    )
    assert (
        settings.storage.storage_class("cold") == "GLACIER_IR"
        and settings.storage.retention_days > settings.storage.cold_after_days
    )
    scheduler = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "spotlane-scheduler")
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"


def _pod_specs(k8s: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in k8s if d["kind"] in ("Deployment", "Job")}


def test_every_k8s_workload_runs_unprivileged_on_a_read_only_root(k8s: list[dict[str, Any]]) -> None:
    """Review M15: no securityContext anywhere."""
    for name, spec in _pod_specs(k8s).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if name != "redis":
                assert {"/tmp", "/var/lib/spotlane"} <= mounted, name  # where a read-only image still writes


def test_the_k8s_broker_has_a_password_a_volume_and_a_network_policy(k8s: list[dict[str, Any]]) -> None:
    """Review M15: Redis had no auth, no volume (a restart dropped every message) and no NetworkPolicy."""
    redis = _pod_specs(k8s)["redis"]
    (container,) = redis["containers"]
    assert "--requirepass" in container["args"] and "--appendonly" in container["args"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "spotlane-redis"
    assert redis["volumes"][0]["persistentVolumeClaim"]["claimName"] == "redis-data"
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "redis-data" for d in k8s)
    policies = {d["metadata"]["name"]: d["spec"] for d in k8s if d["kind"] == "NetworkPolicy"}
    allowed = policies["redis"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"spotlane.io/broker-client": "true"}}} in allowed
    for name, _spec in _pod_specs(k8s).items():
        if name.startswith("spotlane-") and name != "spotlane-migrate":
            labels = next(
                d for d in k8s if d.get("metadata", {}).get("name") == name and d["kind"] in ("Deployment", "Job")
            )["spec"]["template"]["metadata"]["labels"]
            assert labels.get("spotlane.io/broker-client") == "true", name
    assert policies["spotlane-metrics"]["ingress"][0]["ports"] == [{"port": 9808}]
    config = next(d for d in k8s if d["kind"] == "ConfigMap")["data"]
    assert "SPOTLANE_BROKER__URL" not in config  # it carries the password: a Secret
    triggers = [t for d in k8s if d["kind"] == "ScaledObject" for t in d["spec"]["triggers"]]
    assert all(t["authenticationRef"] == {"name": "spotlane-redis"} for t in triggers)


def test_the_api_runs_two_replicas_behind_a_cluster_ip_service_ready_on_health(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "spotlane-serve")
    [container] = _containers(serve)
    config = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spotlane-config")
    settings = _settings_from({**config["data"], **{e["name"]: e["value"] for e in container["env"]}}, monkeypatch)
    [service] = [d for d in k8s if d["kind"] == "Service" and d["metadata"]["name"] == "spotlane-serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert serve["spec"]["replicas"] == 2
    assert container["args"] == ["serve"] and container["image"] == "spotlane"
    assert {"configMapRef": {"name": "spotlane-config"}} in container["envFrom"]
    assert settings.serve.host == "0.0.0.0" and ports["http"] == settings.serve.port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert service["spec"]["type"] == "ClusterIP"  # never LoadBalancer or NodePort
    assert service["spec"]["selector"] == serve["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": settings.serve.port, "targetPort": "http"}]


def test_the_api_port_is_let_through_the_policy_that_closes_broker_clients(k8s: list[dict[str, Any]]) -> None:
    """Every broker client is selected by the spotlane-metrics policy, which admits only
    Prometheus: without a policy of its own the API would take no connection at all."""
    serve = next(d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "spotlane-serve")
    labels = serve["spec"]["template"]["metadata"]["labels"]
    policies = [d["spec"] for d in k8s if d["kind"] == "NetworkPolicy"]

    admitting = [
        p
        for p in policies
        if all(labels.get(k) == v for k, v in p["podSelector"]["matchLabels"].items())
        and any({"port": 8000} in rule.get("ports", []) for rule in p.get("ingress", []))
    ]
    assert admitting


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if (
        shutil.which("kubectl")
        and subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True).returncode == 0
    ):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize() is None, reason="no kustomize (kustomize or kubectl kustomize)")
def test_kustomize_builds_every_workload_in_the_namespace_on_the_pinned_image() -> None:
    result = subprocess.run([*(_kustomize() or []), str(K8S)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]

    named = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "spotlane-serve"), ("Service", "spotlane-serve")} <= named
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "spotlane", doc["metadata"]["name"]
        for container in _containers(doc):
            assert container["image"] != "spotlane", doc["metadata"]["name"]  # the images: entry replaced it


def test_the_vllm_sidecar_shapes_drive_the_pools_own_server(compose: dict[str, Any]) -> None:
    """Compose's `vllm` profile and the k8s `vllm` overlay: vLLM beside the worker on one
    localhost, its /health gating the worker, the pool set to engine = "server" there."""
    import json

    from schemas.backends import GpuPool

    worker = compose["services"]["gpu-worker-vllm"]
    assert worker["network_mode"] == "service:vllm" and worker["profiles"] == ["vllm"]
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy"
    (pool,) = [GpuPool(**p) for p in json.loads(worker["environment"]["SPOTLANE_GPU_POOLS"])]
    assert pool.engine == "server" and pool.server_url == "http://127.0.0.1:8000/v1"
    assert "/health" in " ".join(compose["services"]["vllm"]["healthcheck"]["test"])

    overlay = yaml.safe_load((ROOT / "infra/k8s/vllm/kustomization.yaml").read_text())
    assert overlay["resources"] == ["../"]
    patch = yaml.safe_load((ROOT / "infra/k8s/vllm" / overlay["patches"][0]["path"]).read_text())
    containers = {c["name"]: c for c in patch["spec"]["template"]["spec"]["containers"]}
    assert containers["vllm"]["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert containers["vllm"]["image"].split(":")[1] not in ("", "latest")
    env = {e["name"]: e["value"] for e in containers["worker"]["env"]}
    (pool,) = [GpuPool(**p) for p in json.loads(env["SPOTLANE_GPU_POOLS"])]
    assert pool.engine == "server" and pool.server_url.startswith("http://127.0.0.1:8000")

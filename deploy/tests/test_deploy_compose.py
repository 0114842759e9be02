"""docker-compose.yml with deploy/otel-collector.yaml, deploy/prometheus.yml, deploy/s3net.toml
and deploy/compose.gpu.yml: schema-valid, and wired together on the agreed names and ports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

import pytest

from deploy_common import (
    BRIDGE_DICOM_PORT,
    BRIDGE_METRICS_PORT,
    DEPLOY,
    GRAFANA_PORT,
    GRPC_PORT,
    JAEGER_UI_PORT,
    METRICS_PORT,
    OTLP_GRPC_PORT,
    PROMETHEUS_PORT,
    ROOT,
    documented_config_keys,
    env_to_key,
    flatten,
    host_port,
    load_yaml,
)
from test_deploy_dockerfile import healthcheck_argv

COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "compose.gpu.yml"


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def collector():
    return load_yaml(DEPLOY / "otel-collector.yaml")


@pytest.fixture(scope="module")
def prometheus():
    return load_yaml(DEPLOY / "prometheus.yml")


def s3net_toml() -> dict:
    return tomllib.loads((DEPLOY / "s3net.toml").read_text())


def published(service: dict) -> dict[int, str]:
    """container port -> host IP, from short-syntax "IP:HOST:CONTAINER" entries."""
    out = {}
    for p in service.get("ports", []):
        parts = str(p).split(":")
        assert len(parts) == 3, f"{p}: publish with an explicit host IP"
        out[int(parts[2].split("/")[0])] = parts[0]
    return out


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for u in ("ms", "s", "m", "h"):
        if duration.endswith(u) and duration[: -len(u)].replace(".", "").isdigit():
            return float(duration[: -len(u)]) * units[u]
    raise ValueError(duration)


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec_schema(path):
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (PyPI)."""
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) or Debian's `docker-compose`; neither needs an engine
    for `config`."""
    if shutil.which("docker"):
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose plugin nor docker-compose")
def test_compose_cli_accepts_and_merges_the_files():
    cli = compose_cli()
    base = [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    r = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*base, "-f", str(GPU_OVERRIDE), "config"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    import yaml

    merged = yaml.safe_load(r.stdout)["services"]["s3net"]
    devices = merged["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert merged["environment"]["S3NET__SERVER__ADDR"] == f"0.0.0.0:{GRPC_PORT}"


def test_all_services_present(compose):
    assert set(compose["services"]) == {"s3net", "otel-collector", "jaeger", "prometheus", "grafana", "pacs-bridge"}
    # Every service but the bridge starts with a plain `docker compose up`.
    assert {n for n, s in compose["services"].items() if s.get("profiles")} == {"pacs-bridge"}


def test_the_pacs_bridge_service_is_wired_to_s3net_and_its_image(compose):
    bridge = compose["services"]["pacs-bridge"]
    assert bridge["profiles"] == ["pacs"]
    assert bridge["build"] == {"context": "./clients/python", "dockerfile": "Dockerfile"}
    assert (ROOT / "clients" / "python" / "Dockerfile").is_file()
    assert host_port(bridge["environment"]["S3NET_ADDR"]) == ("s3net", GRPC_PORT)
    assert bridge["depends_on"] == {"s3net": {"condition": "service_healthy"}}
    assert bridge["command"][0] == "--destination" and "S3NET_BRIDGE_DESTINATION" in bridge["command"][1]
    assert published(bridge) == {BRIDGE_DICOM_PORT: "127.0.0.1", BRIDGE_METRICS_PORT: "127.0.0.1"}
    # The spool is a named volume at the image's spool folder.
    volume, _, target = bridge["volumes"][0].partition(":")
    assert volume in compose["volumes"] and target == "/var/lib/s3net-bridge"
    # Long enough for a fit in progress to finish.
    assert seconds(bridge["stop_grace_period"]) >= 300


def test_s3net_env_uses_real_config_keys_and_agreed_ports(compose):
    env = compose["services"]["s3net"]["environment"]
    keys = documented_config_keys()
    for name in env:
        assert name.startswith("S3NET__")
        assert env_to_key(name) in keys, f"{name} is not a key of config.example.toml"
    assert host_port(env["S3NET__SERVER__ADDR"]) == ("0.0.0.0", GRPC_PORT)
    assert host_port(env["S3NET__METRICS__LISTEN"]) == ("0.0.0.0", METRICS_PORT)
    assert published(compose["services"]["s3net"]) == {GRPC_PORT: "127.0.0.1", METRICS_PORT: "127.0.0.1"}


def test_s3net_toml_uses_real_config_keys():
    keys = documented_config_keys()
    for key in flatten(s3net_toml()):
        assert key in keys, f"deploy/s3net.toml: {key} is not a key of config.example.toml"
    t = s3net_toml()
    assert host_port(t["server"]["addr"])[1] == GRPC_PORT
    assert host_port(t["metrics"]["listen"])[1] == METRICS_PORT


def test_s3net_mounts_its_config_and_passes_it(compose):
    svc = compose["services"]["s3net"]
    mounts = {}
    for v in svc["volumes"]:
        src, dst, *_ = v.split(":")
        assert (ROOT / src).exists(), f"{src} does not exist"
        mounts[dst] = src
    config = svc["command"][svc["command"].index("--config") + 1]
    assert mounts[config] == "./deploy/s3net.toml"
    assert svc["command"][0] == "serve"


def test_s3net_healthcheck_is_the_images(compose):
    hc = compose["services"]["s3net"]["healthcheck"]
    assert hc["test"][0] == "CMD" and hc["test"][1:] == healthcheck_argv()


def test_stop_grace_period_exceeds_the_servers_drain(compose):
    grace = s3net_toml()["server"]["shutdown_grace_s"]
    assert seconds(compose["services"]["s3net"]["stop_grace_period"]) > grace


def test_otlp_endpoint_is_the_collectors_grpc_receiver(compose, collector):
    env = compose["services"]["s3net"]["environment"]
    host, port = host_port(env["S3NET__TELEMETRY__OTLP_ENDPOINT"])
    assert host == "otel-collector" and host in compose["services"]
    assert port == OTLP_GRPC_PORT
    receiver = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host_port(receiver) == ("0.0.0.0", OTLP_GRPC_PORT), "must listen beyond localhost"
    assert str(OTLP_GRPC_PORT) in [str(p) for p in compose["services"]["otel-collector"]["expose"]]


def test_collector_pipeline_is_complete_and_exports_to_jaeger(compose, collector):
    traces = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in traces[kind]:
            assert name in collector[kind], f"pipeline uses undefined {kind[:-1]} {name}"
    assert "otlp" in traces["receivers"]
    jaeger_exporters = [
        e for e in traces["exporters"]
        if e.split("/")[0] == "otlp" and host_port(collector["exporters"][e]["endpoint"])[0] == "jaeger"
    ]
    assert jaeger_exporters, "the traces pipeline must export to jaeger over OTLP"
    exp = collector["exporters"][jaeger_exporters[0]]
    assert host_port(exp["endpoint"])[1] == OTLP_GRPC_PORT
    assert exp["tls"]["insecure"] is True
    jaeger = compose["services"]["jaeger"]
    assert str(OTLP_GRPC_PORT) in [str(p) for p in jaeger["expose"]]
    assert jaeger["environment"]["JAEGER_LISTEN_HOST"] == "0.0.0.0", "reachable from the collector"
    mounted = compose["services"]["otel-collector"]["volumes"][0].split(":")
    assert mounted[0] == "./deploy/otel-collector.yaml"
    assert compose["services"]["otel-collector"]["command"] == [f"--config={mounted[1]}"]


def test_jaeger_prometheus_and_grafana_uis_published_on_loopback(compose):
    assert published(compose["services"]["jaeger"]) == {JAEGER_UI_PORT: "127.0.0.1"}
    assert published(compose["services"]["prometheus"]) == {PROMETHEUS_PORT: "127.0.0.1"}
    assert published(compose["services"]["grafana"]) == {GRAFANA_PORT: "127.0.0.1"}


def test_prometheus_scrapes_the_services_metrics_port(compose, prometheus):
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    job = jobs["s3net"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"s3net:{METRICS_PORT}"]
    assert "s3net" in compose["services"]
    svc = compose["services"]["prometheus"]
    mounted = svc["volumes"][0].split(":")
    assert mounted[0] == "./deploy/prometheus.yml"
    assert f"--config.file={mounted[1]}" in svc["command"]


def test_gpu_override_reserves_one_nvidia_gpu_for_s3net():
    gpu = load_yaml(GPU_OVERRIDE)
    assert set(gpu["services"]) == {"s3net"}
    (dev,) = gpu["services"]["s3net"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    assert compose["services"]["s3net"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}

"""The real server started the way each deployment starts it: the same config file, the same
S3NET__ variables, the image's health check command; only the listen addresses move to free
loopback ports (and the OTLP endpoint to a loopback port nobody listens on).

The server rejects unknown keys, so a wrong key in any deployment file fails here too. Needs
target/release/s3net (`make build`; `make test` builds it first)."""

from __future__ import annotations

import urllib.request

import pytest

from deploy_common import BINARY, DEPLOY, ROOT, Server, binary_available, load_yaml
from test_deploy_dockerfile import env_of, healthcheck_argv, stages
from test_deploy_k8s import configmap_toml, container, one

pytestmark = pytest.mark.skipif(not binary_available(), reason="target/release/s3net not built")


def health_argv(server: Server) -> list[str]:
    """The Dockerfile's HEALTHCHECK, pointed at the test server (the kubelet's native gRPC
    probe asks the same grpc.health.v1 question for service "")."""
    argv = healthcheck_argv()
    argv[argv.index("--addr") + 1] = server.url
    return [str(BINARY), *argv[1:]]


# What Prometheus 3 sends; it fails a scrape whose Content-Type it cannot parse.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,"
    "text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
)


def metrics_text(server: Server) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        ctype = r.headers["Content-Type"]
        assert ctype.startswith(("application/openmetrics-text", "text/plain")), ctype
        return r.read().decode()


def check(server: Server):
    try:
        r = server.wait_healthy(health_argv(server))
        assert "SERVING" in r.stdout
        text = metrics_text(server)
        # The HPA's metric (deploy/k8s/hpa.yaml) and what Prometheus scrapes.
        assert "s3net_queue_depth" in text, text[:2000]
    finally:
        code = server.stop()
    assert code == 0, f"exit {code} on SIGTERM:\n{server.output()}"


def test_compose_service_configuration_serves(tmp_path):
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]["s3net"]
    env = {k: v for k, v in env_of(stages()["runtime"]).items() if k.startswith("S3NET__")}
    env.update({k: str(v) for k, v in compose["environment"].items()})
    args = list(compose["command"])
    # The file compose mounts at that path.
    args[args.index("--config") + 1] = str(DEPLOY / "s3net.toml")
    check(Server(args, env))


def test_kubernetes_configuration_serves(tmp_path):
    config = tmp_path / "s3net.toml"
    config.write_text(one("ConfigMap", "s3net-config")["data"]["s3net.toml"])
    assert configmap_toml()  # parses
    c = container()
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    # The ConfigMap is written for one GPU (cpu_workers = 0); this machine may have none.
    env["S3NET__WORKERS__CPU_WORKERS"] = "1"
    env["CUDA_CACHE_PATH"] = str(tmp_path / "cuda-cache")
    # status.podIP in the pod.
    env["S3NET__CLUSTER__ADVERTISE_ADDR"] = "127.0.0.1"
    args = list(c["args"])
    args[args.index("--config") + 1] = str(config)
    check(Server(args, env))

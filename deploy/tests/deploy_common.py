"""Shared helpers of the deployment tests: where things are, and how to read them.

The tests check that the deployment files (Dockerfile, docker-compose.yml, deploy/*, deploy/k8s/*)
agree with each other and with the server itself: its documented configuration keys
(crates/server/config.example.toml, the file a cargo test keeps in sync with config.rs) and,
where the binary has been built, the running server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BINARY = ROOT / "target" / "release" / "s3net"
CONFIG_EXAMPLE = ROOT / "crates" / "server" / "config.example.toml"
SERVER_SRC = ROOT / "crates" / "server" / "src"

# Ports agreed for the service and its neighbours.
GRPC_PORT = 50051
METRICS_PORT = 9464
OTLP_GRPC_PORT = 4317
JAEGER_UI_PORT = 16686
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
# The PACS bridge image: DICOM, and its own metrics beside the server's.
BRIDGE_DICOM_PORT = 11112
BRIDGE_METRICS_PORT = 9465


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def flatten(table: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a parsed TOML document: {"server": {"addr": ...}} -> {"server.addr"}."""
    keys: set[str] = set()
    for k, v in table.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict):
            keys.add(dotted)
            keys |= flatten(v, dotted + ".")
        else:
            keys.add(dotted)
    return keys


_SECTION = re.compile(r"^#?\s*\[([A-Za-z0-9_.]+)\]\s*$")
_KEY = re.compile(r"^#?\s*([A-Za-z0-9_]+)\s*=")


def documented_config_keys(path: Path | None = None) -> set[str]:
    """Every key config.example.toml documents: the ones set, plus the commented-out ones
    (`# auth_token = "..."`, `# [server.tls]` then `# cert = ...`), which have no default."""
    text = (path or CONFIG_EXAMPLE).read_text(encoding="utf-8")
    keys = flatten(tomllib.loads(text))
    section = None
    for line in text.splitlines():
        line = line.strip()
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            keys.add(section)
            continue
        m = _KEY.match(line)
        if m and section is not None:
            keys.add(f"{section}.{m.group(1)}")
    return keys


def env_to_key(name: str) -> str:
    """S3NET__SERVER__TLS__CERT -> server.tls.cert (the `config` crate's mapping in
    crates/server/src/config.rs: prefix S3NET, separator "__", keys lower-cased)."""
    assert name.startswith("S3NET__"), name
    return ".".join(part.lower() for part in name[len("S3NET__"):].split("__"))


def host_port(addr: str) -> tuple[str, int]:
    """"0.0.0.0:50051", "jaeger:4317" or "http://otel-collector:4317" -> (host, port)."""
    if "://" in addr:
        u = urlsplit(addr)
        assert u.port is not None, f"{addr}: no port"
        return u.hostname or "", u.port
    host, _, port = addr.rpartition(":")
    return host, int(port)


def metric_in_sources(name: str) -> bool:
    """Whether the server's Rust sources register a metric of that full name: as the literal
    `"s3net_queue_depth"`, or as `"queue_depth"` in a file whose registry adds the prefix
    (`Registry::with_prefix("s3net")`). test_deploy_server.py also reads the running server's
    /metrics, which is the final word."""
    prefix, _, short = name.partition("_")
    for p in SERVER_SRC.rglob("*.rs"):
        text = p.read_text(encoding="utf-8")
        if f'"{name}"' in text:
            return True
        if f'"{short}"' in text and f'with_prefix("{prefix}")' in text:
            return True
    return False


# --- the real server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_available() -> bool:
    return BINARY.is_file() and os.access(BINARY, os.X_OK)


class Server:
    """`s3net serve` started as a deployment would start it (same config file, same S3NET__
    variables), except that every listen address is moved to a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("S3NET__")}
        full_env.update(env)
        full_env["S3NET__SERVER__ADDR"] = f"127.0.0.1:{self.grpc_port}"
        full_env["S3NET__METRICS__LISTEN"] = f"127.0.0.1:{self.metrics_port}"
        if "S3NET__TELEMETRY__OTLP_ENDPOINT" in full_env:
            # A loopback port nobody listens on: spans are dropped, nothing leaves the machine.
            full_env["S3NET__TELEMETRY__OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        # Single worker, few threads: this runs beside cargo on a small machine.
        full_env.setdefault("S3NET__WORKERS__TORCH_THREADS", "1")
        self.env = full_env
        # A file, not a pipe: a pipe nobody reads could fill up and stall the server.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(BINARY), *args], env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def wait_healthy(self, health_argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Runs the health command (argv[0] = the binary) until it exits 0."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.output()}"
                )
            last = subprocess.run(health_argv, capture_output=True, text=True, timeout=30)
            if last.returncode == 0:
                return last
            time.sleep(0.25)
        raise AssertionError(f"not healthy after {timeout}s: {last}")

    def stop(self, timeout: float = 45.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def rootfs_smoke() -> pytest.MarkDecorator:
    """The mark of the opt-in tests that rebuild an image's stages in a Debian root without
    Docker (`S3NET_ROOTFS_SMOKE=1`): root, debootstrap and the built server are needed."""
    return pytest.mark.skipif(
        os.environ.get("S3NET_ROOTFS_SMOKE") != "1"
        or os.geteuid() != 0
        or shutil.which("debootstrap") is None
        or not binary_available(),
        reason="opt-in (S3NET_ROOTFS_SMOKE=1), needs root, debootstrap and target/release/s3net",
    )

"""Helpers of the client tests: a real `s3net serve` on an ephemeral loopback port, started
from the release binary.

The server binds 127.0.0.1:0 and logs the address it got ("s3net serving", field `addr`), so
parallel runs and other servers on the machine never collide. Tests keep fits tiny (size 64,
1-3 iterations) so the suite runs in a minute or two on two cores.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
# Test this checkout's client even if the shared venv's editable install points elsewhere.
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))

DATA = REPO / "tests" / "data"
BIN = Path(os.environ.get("S3NET_BIN", REPO / "target" / "release" / "s3net"))
# Tiny fits: what the tests check does not depend on the quality of the segmentation.
FAST = dict(size=64, iterations=2, seed=7)
# A fit that runs until cancelled (no early stop), for cancel and queue tests.
SLOW = dict(size=64, iterations=1000, min_labels=0, seed=7)

_ADDR = re.compile(r"(\d+\.\d+\.\d+\.\d+:\d+)")


class Server:
    """One `s3net serve` process; ``addr`` is its HOST:PORT."""

    def __init__(self, args: List[str], env: Dict[str, str]) -> None:
        self.args, self.env = args, env
        self.log: collections.deque = collections.deque(maxlen=400)
        self.addr: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.warm = threading.Event()

    def start(self, timeout: float = 60.0) -> "Server":
        if not BIN.exists():
            pytest.fail(
                f"{BIN} is missing: build it with `cargo build --release --locked -p s3net-cli`"
            )
        base = {k: v for k, v in os.environ.items() if not k.startswith("S3NET__")}
        base.setdefault("RUST_LOG", "info")
        env = {**base, **self.env}
        addr = [] if "--addr" in self.args else ["--addr", "127.0.0.1:0"]
        cmd = [str(BIN), "serve", *addr, "--log-json", *self.args]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.addr is None:
            self.stop()
            raise RuntimeError("s3net serve did not start:\n" + "\n".join(self.log))
        # Ready as a client that heeds health sees it: after the workers' warm-up (unless it is
        # switched off), so no test's first jobs wait behind it.
        if env.get("S3NET__WORKERS__WARM_UP", "true") != "false" and not self.warm.wait(timeout):
            self.stop()
            raise RuntimeError("s3net serve did not warm up:\n" + "\n".join(self.log))
        return self

    def _read(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if self.addr is None and "s3net serving" in line:
                try:
                    self.addr = json.loads(line)["fields"]["addr"]
                except (ValueError, KeyError, TypeError):
                    m = _ADDR.search(line)
                    self.addr = m.group(1) if m else None
                ready.set()
            if "every worker warmed up" in line:
                self.warm.set()
        ready.set()  # the process ended (before serving, or at shutdown)
        self.warm.set()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(*args: str, env: Optional[Dict[str, str]] = None) -> Server:
    """Starts a server with extra `serve` flags and S3NET__… settings.

    Progress events are sent for every step (deterministic counts in the tests), and the
    Prometheus endpoint is switched off so that several test servers can run at once; a
    server that predates the metrics section rejects that key, so it is then left out.
    """
    settings = {"S3NET__SERVER__PROGRESS_INTERVAL_MS": "0", **(env or {})}
    if "--torch-threads" not in args:
        # One libtorch thread: the fits are tiny, and with every core's thread busy, one
        # other busy process on the machine (the test runner, a build) slows a fit tenfold.
        args = (*args, "--torch-threads", "1")
    try:
        return Server(list(args), {**settings, "S3NET__METRICS__LISTEN": ""}).start()
    except RuntimeError as e:
        if "unknown field `metrics`" not in str(e):
            raise
        return Server(list(args), settings).start()


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05):
    """Polls until predicate() is truthy; returns its value or fails the test."""
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(every)


def make_pki(folder: Path) -> Dict[str, Path]:
    """Certificates for the TLS tests, made with `cryptography`: a CA; a server certificate for
    127.0.0.1/localhost and a client certificate, signed by it; and two DICOM nodes'
    certificates ("orthanc", "bridge"), each both server and client (DICOM's secure
    transport: a node accepts associations and opens its own), for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def write_cert(cert, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("s3net test CA"))
        .issuer_name(name("s3net test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usages, sans=None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_key, server_cert = leaf("localhost", [ExtendedKeyUsageOID.SERVER_AUTH], loopback)
    client_key, client_cert = leaf("s3net test client", [ExtendedKeyUsageOID.CLIENT_AUTH])
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    nodes = {}
    for node in ("orthanc", "bridge"):
        node_key, node_cert = leaf(f"{node} DICOM node", both, loopback)
        nodes[f"{node}_cert"] = write_cert(node_cert, folder / f"{node}.pem")
        nodes[f"{node}_key"] = write_key(node_key, folder / f"{node}.key")
    return {
        **nodes,
        "ca": write_cert(ca, folder / "ca.pem"),
        "server_cert": write_cert(server_cert, folder / "server.pem"),
        "server_key": write_key(server_key, folder / "server.key"),
        "client_cert": write_cert(client_cert, folder / "client.pem"),
        "client_key": write_key(client_key, folder / "client.key"),
    }

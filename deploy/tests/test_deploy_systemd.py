"""The PACS bridge's systemd unit (deploy/systemd): systemd's own checker accepts it, its sandbox
scores "OK" in `systemd-analyze security`, and its command line, expanded as systemd expands it
with the example environment file, starts a bridge that serves, keeps its spool in the state
directory, and stops cleanly on the unit's stop signal within the unit's stop timeout.

No systemd runs here as PID 1, so the unit itself is not started; `systemd-analyze` reads it
offline. Skipped where systemd-analyze is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from deploy_common import DEPLOY, ROOT, free_port

UNIT = DEPLOY / "systemd" / "s3net-pacs-bridge.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "bridge.env.example"
ANALYZE = shutil.which("systemd-analyze")
BRIDGE = Path(sys.executable).parent / "s3net-pacs-bridge"

needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def service(unit: str) -> Dict[str, List[str]]:
    """The [Service] section's keys and their values (a key may repeat)."""
    keys: Dict[str, List[str]] = {}
    section = None
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


def env_file(text: str) -> Dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )


def local_copy(tmp_path: Path) -> Path:
    """The unit with its executable and environment file at this machine's paths."""
    text = UNIT.read_text()
    executable = BRIDGE if BRIDGE.exists() else Path(sys.executable)
    text = text.replace("/opt/s3net-bridge/bin/s3net-pacs-bridge", str(executable))
    text = text.replace("EnvironmentFile=/etc/s3net/bridge.env", f"EnvironmentFile={ENV_EXAMPLE}")
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@needs_systemd
def test_systemd_accepts_the_unit_and_scores_its_sandbox_ok(tmp_path) -> None:
    copy = local_copy(tmp_path)
    verify = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are warnings on stderr (the exit status stays 0).
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(copy)], capture_output=True, text=True, timeout=60
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level.group(1)) <= 2.0 and level.group(2) == "OK", level.group(0)


def test_the_units_command_line_runs_a_bridge_that_stops_cleanly(tmp_path) -> None:
    """ExecStart as systemd expands it (${STATE_DIRECTORY} one word, $S3NET_BRIDGE_ARGS split on
    white space), with the example environment file but for loopback ports."""
    pytest.importorskip("pynetdicom")
    keys = service(UNIT.read_text())
    env = env_file(ENV_EXAMPLE.read_text())
    port, metrics = free_port(), free_port()
    args = env["S3NET_BRIDGE_ARGS"].replace("--port 11112", f"--port {port}")
    args = args.replace("--metrics-listen 127.0.0.1:9465", f"--metrics-listen 127.0.0.1:{metrics}")
    assert args != env["S3NET_BRIDGE_ARGS"], "the example should name the port and the metrics address"
    state = tmp_path / "state"
    state.mkdir()
    (exec_start,) = keys["ExecStart"]
    words = shlex.split(exec_start.replace("${STATE_DIRECTORY}", str(state)))
    assert words[0] == "/opt/s3net-bridge/bin/s3net-pacs-bridge"
    argv = [a for w in words[1:] for a in (args.split() if w == "$S3NET_BRIDGE_ARGS" else [w])]
    # This checkout's bridge, whatever the venv's console script points at.
    command = [sys.executable, "-m", "s3net_client.bridge", *argv, "--host", "127.0.0.1"]
    child_env = {
        **os.environ,
        "S3NET_ADDR": env["S3NET_ADDR"],
        "PYTHONPATH": str(ROOT / "clients" / "python" / "src"),
    }
    log = tmp_path / "bridge.log"
    with open(log, "w") as out:
        bridge = subprocess.Popen(command, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                    assert "s3net_bridge_waiting 0" in r.read().decode()
                break
            except OSError:
                assert bridge.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert (state / "spool").is_dir(), "the spool lives in the state directory"
    finally:
        assert keys["KillSignal"] == ["SIGTERM"]
        bridge.send_signal(signal.SIGTERM)
        stop_timeout = float(keys["TimeoutStopSec"][0])
        rc = bridge.wait(timeout=stop_timeout)
    assert rc == 0, log.read_text()
    assert f"listening on 127.0.0.1:{port} as S3NET" in log.read_text()

"""clients/python/Dockerfile, the PACS bridge's image.

No Docker engine runs here (README, "### Deployment"), so:
* the file itself is checked: one stage on the server's runtime base, a numeric non-root user
  owning only the spool, the ports, the health check, a build context of the package alone;
* the image's command line (ENTRYPOINT, then a `--destination`) is run here with its ENV, on
  this checkout's bridge, against a real `s3net serve` and a real DICOM destination: one
  C-STORE in, its Segmentation out, the HEALTHCHECK command answering on the port the
  environment names (and failing on another), SIGTERM exiting 0;
* opt-in (`S3NET_ROOTFS_SMOKE=1`, root, debootstrap and Debian's and PyPI's servers; a few
  minutes): the image rebuilt without Docker: a `debootstrap --variant=minbase bookworm` root
  (debian:bookworm-slim's content), each RUN of the Dockerfile run in it by chroot as written,
  COPY done by hand with the context's .dockerignore, and the same C-STORE round trip with
  the bridge running in that root as the image's USER. `S3NET_BRIDGE_ROOTFS_DIR` keeps the
  built root between runs (delete it to build again, e.g. after changing the client).
"""

from __future__ import annotations

import json
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
from typing import Callable, List

import pytest

from deploy_common import (
    BINARY,
    BRIDGE_DICOM_PORT,
    BRIDGE_METRICS_PORT,
    ROOT,
    Server,
    binary_available,
    free_port,
    host_port,
    rootfs_smoke,
)
from test_deploy_dockerfile import base_image, env_of, ignored, of, stages

CONTEXT = ROOT / "clients" / "python"
DOCKERFILE = CONTEXT / "Dockerfile"
SPOOL_VOLUME = "/var/lib/s3net-bridge"


def stage() -> list[dict]:
    (only,) = stages(DOCKERFILE).values()
    return only


def entrypoint() -> List[str]:
    (value,) = of(stage(), "ENTRYPOINT")
    return json.loads(value)


def healthcheck() -> List[str]:
    (value,) = of(stage(), "HEALTHCHECK")
    return json.loads(value.partition("CMD")[2])


def option(argv: List[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_one_stage_on_the_servers_runtime_base():
    assert list(stages(DOCKERFILE)) == ["bridge"]
    assert base_image(stage(), DOCKERFILE) == "debian:bookworm-slim"
    assert base_image(stage(), DOCKERFILE) == base_image(stages()["runtime"])


def test_runs_as_a_numeric_non_root_user_that_owns_only_the_spool():
    (user,) = of(stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    runs = " ".join(of(stage(), "RUN"))
    assert f"install -d -o {uid} -g {gid} -m 0700 {SPOOL_VOLUME}" in runs
    assert of(stage(), "VOLUME") == [SPOOL_VOLUME]
    assert option(entrypoint(), "--spool").startswith(SPOOL_VOLUME + "/")


def test_exposes_the_dicom_and_metrics_ports_and_checks_health_on_metrics():
    ports = {int(p) for v in of(stage(), "EXPOSE") for p in v.split()}
    assert ports == {BRIDGE_DICOM_PORT, BRIDGE_METRICS_PORT}
    assert entrypoint()[0] == "s3net-pacs-bridge"
    # The metrics address is the environment's, which the health check reads too: moving it
    # with `docker run -e` moves both (a --metrics-listen in ENTRYPOINT would leave it behind).
    assert "--metrics-listen" not in entrypoint()
    assert host_port(env_of(stage())["S3NET_BRIDGE_METRICS_LISTEN"]) == ("0.0.0.0", BRIDGE_METRICS_PORT)
    assert "S3NET_BRIDGE_METRICS_LISTEN" in " ".join(healthcheck())
    (value,) = of(stage(), "HEALTHCHECK")
    assert "--start-period=" in value
    assert of(stage(), "STOPSIGNAL") == ["SIGTERM"]


def test_the_build_context_is_the_package_alone():
    for value in of(stage(), "COPY"):
        for src in [p for p in value.split() if not p.startswith("--")][:-1]:
            assert (CONTEXT / src).exists(), f"COPY {src}: not in {CONTEXT}"
    for path in ("pyproject.toml", "README.md", "src/s3net_client/bridge.py", "src/s3net_client/_pb/s3net_pb2.py"):
        assert (CONTEXT / path).exists() and not ignored(path, CONTEXT), path
    for path in ("tests", "src/s3net_client.egg-info", "src/s3net_client/__pycache__"):
        assert ignored(path, CONTEXT), f"{path} should stay out of the image"
    # pip installs the package with its DICOM extra; the stubs are committed, no generator runs.
    runs = " ".join(of(stage(), "RUN"))
    assert "[dicom]" in runs and "grpc_tools" not in runs


class Destination:
    """A DICOM storage node that keeps the Segmentations it is sent."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import SegmentationStorage

        self.received: list = []
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SegmentationStorage)

        def store(event) -> int:
            self.received.append(event.dataset)
            return 0x0000

        self.port = free_port()
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])

    def stop(self) -> None:
        self._server.shutdown()


def c_store(port: int, path: Path) -> int:
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ds.SOPClassUID)
    association = ae.associate("127.0.0.1", port, ae_title="S3NET")
    assert association.is_established
    try:
        return association.send_c_store(ds).Status
    finally:
        association.release()


def wait_for(what: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.2)


def round_trip(start: Callable[[List[str], dict], subprocess.Popen], health: Callable[[List[str], dict], int],
               spool: Path, log: Path) -> None:
    """Runs the image's command line through `start(argv, env)` against a real server and
    destination: health (`health(argv, env)`) answers, and fails once the environment names
    another port; one C-STORE's Segmentation arrives, SIGTERM exits 0."""
    server = Server(["serve"], {})
    destination = Destination()
    bridge = None
    try:
        server.wait_healthy([str(BINARY), "client", "health", "--addr", server.url])
        port, metrics = free_port(), free_port()
        argv = entrypoint() + ["--destination", f"DEST@127.0.0.1:{destination.port}", "--host", "127.0.0.1",
                 "--port", str(port), "--iterations", "2", "--size", "64", "--features", "16", "--offset-lr", "300"]
        env = env_of(stage())
        env["S3NET_ADDR"] = f"127.0.0.1:{server.grpc_port}"
        # As `docker run -e` would move it (and loopback: this is the host's network).
        env["S3NET_BRIDGE_METRICS_LISTEN"] = f"127.0.0.1:{metrics}"
        bridge = start(argv, env)

        def up() -> bool:
            assert bridge.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5):
                    return True
            except OSError:
                return False

        wait_for(up, 60, log.read_text)
        assert health(healthcheck(), env) == 0, "the image's HEALTHCHECK command fails on a running bridge"
        elsewhere = {**env, "S3NET_BRIDGE_METRICS_LISTEN": f"0.0.0.0:{free_port()}"}
        assert health(healthcheck(), elsewhere) != 0, "the health check does not read the bridge's metrics address"
        assert c_store(port, ROOT / "tests" / "data" / "dicom" / "CT_small.dcm") == 0x0000
        wait_for(lambda: len(destination.received) == 1, 120, lambda: log.read_text() + server.output())
        assert destination.received[0].Modality == "SEG"
        # The bridge's fit options reached the server's job.
        from s3net_client import Client

        with Client(f"127.0.0.1:{server.grpc_port}") as client:
            (listed,) = client.list_jobs()
            applied = client.get(listed.job_id).result.options.all
        assert (applied["iterations"], applied["size"], applied["features"], applied["offset_lr"]) == (2, 64, 16, 300.0)
        wait_for(lambda: spool.is_dir() and not any(spool.iterdir()), 30, lambda: str(list(spool.iterdir())))
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            rc = bridge.wait(timeout=60)
            assert rc == 0, log.read_text()
        destination.stop()
        server.stop()
    assert "received 1, stored 1, failed 0" in log.read_text(), log.read_text()


needs_a_server = pytest.mark.skipif(not binary_available(), reason="target/release/s3net not built")


@needs_a_server
def test_the_images_command_line_bridges_a_pacs_to_a_real_server(tmp_path):
    pytest.importorskip("pynetdicom")
    spool = tmp_path / "spool"
    log = tmp_path / "bridge.log"

    def start(argv: List[str], env: dict) -> subprocess.Popen:
        assert argv[0] == "s3net-pacs-bridge"
        argv = [str(spool) if a == option(argv, "--spool") else a for a in argv]
        # This checkout's bridge with the image's environment (PATH and PYTHON* aside).
        child = {**os.environ, **{k: v for k, v in env.items() if k != "PATH"},
                 "PYTHONPATH": str(CONTEXT / "src")}
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, "-m", "s3net_client.bridge", *argv[1:]], env=child,
                                    stdout=out, stderr=subprocess.STDOUT)

    def health(argv: List[str], env: dict) -> int:
        assert argv[0] == "python3"
        child = {**os.environ, **{k: v for k, v in env.items() if k != "PATH"}}
        return subprocess.run([sys.executable, *argv[1:]], env=child, timeout=30,
                              stderr=subprocess.DEVNULL).returncode

    round_trip(start, health, spool, log)


# -- opt-in: the image rebuilt in a Debian root ----------------------------------------------

def sh(script: str) -> None:
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, f"{script[:300]}...\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def copy_context(dest: Path) -> None:
    """COPY . dest: the context's files, less what its .dockerignore leaves out."""
    for path in CONTEXT.rglob("*"):
        rel = path.relative_to(CONTEXT).as_posix()
        if path.is_file() and not ignored(rel, CONTEXT):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


@rootfs_smoke()
def test_the_image_built_in_a_slim_debian_root_bridges_a_pacs(tmp_path_factory, tmp_path):
    pytest.importorskip("pynetdicom")
    base = os.environ.get("S3NET_BRIDGE_ROOTFS_DIR")
    root = Path(base) if base else tmp_path_factory.mktemp("bridge-rootfs") / "bookworm"
    if not (root / "opt" / "s3net-bridge" / "bin" / "s3net-pacs-bridge").exists():
        # From scratch: the RUNs are not meant to run twice over a build that stopped halfway.
        shutil.rmtree(root, ignore_errors=True)
        sh(f"debootstrap --variant=minbase bookworm {root}")
        shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
        for item in stage()[1:]:
            if item["instruction"] == "COPY":
                src, dest = item["value"].split()
                assert src == "."
                shutil.rmtree(root / dest.lstrip("/"), ignore_errors=True)
                copy_context(root / dest.lstrip("/"))
            elif item["instruction"] == "RUN":
                # As written, in the root, with a clean environment (the ENV lines come after
                # the RUNs). Emulation artefact: where this machine reaches PyPI through a
                # TLS-inspecting proxy (PIP_CERT set), pip in the root is given the same CA
                # bundle, as a docker build behind that proxy would need too.
                env_run = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
                if os.environ.get("PIP_CERT"):
                    shutil.copy2(os.environ["PIP_CERT"], root / "etc" / "host-ca.crt")
                    env_run.append("PIP_CERT=/etc/host-ca.crt")
                sh(f"chroot {root} /usr/bin/env -i {' '.join(env_run)} /bin/sh -c {shlex.quote(item['value'])}")
    (user,) = of(stage(), "USER")
    spool_inside = option(entrypoint(), "--spool")
    spool = root / spool_inside.lstrip("/")
    log = tmp_path / "bridge.log"

    def inside(argv: List[str], env: dict) -> List[str]:
        return ["chroot", f"--userspec={user}", str(root), "env", "-i",
                *[f"{k}={v}" for k, v in env.items()], *argv]

    def start(argv: List[str], run_env: dict) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(inside(argv, run_env), stdout=out, stderr=subprocess.STDOUT)

    def health(argv: List[str], run_env: dict) -> int:
        return subprocess.run(inside(argv, run_env), timeout=30, stderr=subprocess.DEVNULL).returncode

    assert re.fullmatch(r"\d+:\d+", user)
    round_trip(start, health, spool, log)

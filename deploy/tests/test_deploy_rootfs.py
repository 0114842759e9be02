"""Opt-in: the Dockerfile's runtime stage rebuilt without a Docker engine, and the service run in it.

    S3NET_ROOTFS_SMOKE=1 python -m pytest -q deploy/tests/test_deploy_rootfs.py

Needs root, debootstrap (Debian package) and Debian's package mirror; takes about two minutes
(reuses the root filesystem in $S3NET_ROOTFS_DIR when set). Skipped by `make test` without
S3NET_ROOTFS_SMOKE=1.

What it does, step by step as the Dockerfile says:
1. a minimal Debian bookworm root filesystem (`debootstrap --variant=minbase`, the content of
   debian:bookworm-slim), with the runtime stage's RUN (ca-certificates, the s3net user) run in
   it by chroot;
2. the build stage's staging RUN (torch/lib and nvidia/*/lib copied with their absolute paths,
   the RUNPATH check), executed as written, on this machine's torch venv and binary (hard links
   instead of copies);
3. the staged folders and the binary placed as the runtime stage's COPY --from=build do (at this
   machine's torch path instead of /opt/s3net: the same-path rule is what is being tested);
4. `s3net serve` run in the chroot as the image's USER with the image's ENV (listen addresses
   moved to loopback ports, since a chroot shares this machine's network), the image's
   HEALTHCHECK command answered SERVING, /metrics served, one real image segmented through the
   gRPC client, and SIGTERM exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from deploy_common import BINARY, ROOT, free_port, rootfs_smoke
from test_deploy_dockerfile import env_of, healthcheck_argv, of, stages

pytestmark = rootfs_smoke()


def sh(script: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{script[:200]}...\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    base = os.environ.get("S3NET_ROOTFS_DIR")
    root = Path(base) if base else tmp_path_factory.mktemp("rootfs") / "bookworm"
    if not (root / "etc" / "debian_version").exists():
        # Debian's default mirror; the image's base is debian:bookworm-slim.
        sh(f"debootstrap --variant=minbase bookworm {root}")
    if subprocess.run(["chroot", str(root), "id", "-u", "s3net"], capture_output=True).returncode != 0:
        (run,) = [v for v in of(stages()["runtime"], "RUN") if "useradd" in v]
        sh(f"chroot {root} /bin/sh -c {sh_quote(run)}")
    return root


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture(scope="module")
def staged(tmp_path_factory, rootfs) -> Path:
    out = tmp_path_factory.mktemp("out")
    (out / "bin").mkdir()
    shutil.copy2(BINARY, out / "bin" / "s3net")  # the build stage's `install -D ... /out/bin/s3net`
    (run,) = [v for v in of(stages()["build"], "RUN") if "cp -a --parents" in v]
    # As written, with /out moved and hard links instead of copies (3.6 GB).
    run = re.sub(r"/out\b", str(out), run).replace("cp -a --parents", "cp -al --parents")
    cache = os.environ.get("S3NET_CACHE", str(Path.home() / ".cache" / "s3net"))
    r = sh(run, env={**os.environ, "S3NET_CACHE": cache})
    assert "s3net RUNPATH:" in r.stdout
    # COPY --from=build: the staged tree at the same absolute paths, the binary in /usr/local/bin.
    for top in out.iterdir():
        if top.name != "bin":
            sh(f"cp -al {top} {rootfs}/")
    # Emulation artefact: this machine's torch cache may sit under /root (mode 0700) where the
    # image has /opt/s3net; let the image's user through the folders above torch/lib.
    site = next(out.glob("**/torch/lib")).parent.parent.relative_to(out)
    d = rootfs / site
    while d != rootfs:
        d.chmod(d.stat().st_mode | 0o555)
        d = d.parent
    shutil.copy2(out / "bin" / "s3net", rootfs / "usr" / "local" / "bin" / "s3net")
    return out


def chroot_argv(rootfs: Path, env: dict[str, str], argv: list[str]) -> list[str]:
    (user,) = of(stages()["runtime"], "USER")
    return ["chroot", f"--userspec={user}", str(rootfs), "env", "-i",
            *[f"{k}={v}" for k, v in env.items()], *argv]


def test_runtime_stage_serves_in_a_slim_debian_root(rootfs, staged, tmp_path):
    env = env_of(stages()["runtime"])
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    grpc, metrics = free_port(), free_port()
    env["S3NET__SERVER__ADDR"] = f"127.0.0.1:{grpc}"
    env["S3NET__METRICS__LISTEN"] = f"127.0.0.1:{metrics}"
    env["S3NET__WORKERS__TORCH_THREADS"] = "1"

    # The libraries resolve from the rpath alone, inside the slim root.
    ldd = subprocess.run(chroot_argv(rootfs, env, ["ldd", "/usr/local/bin/s3net"]),
                         capture_output=True, text=True)
    assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout + ldd.stderr

    log = open(tmp_path / "server.log", "wb")
    (cmd,) = of(stages()["runtime"], "CMD")
    server = subprocess.Popen(chroot_argv(rootfs, env, ["s3net", *json.loads(cmd)]),
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        argv = healthcheck_argv()
        argv[argv.index("--addr") + 1] = f"http://127.0.0.1:{grpc}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            r = subprocess.run(chroot_argv(rootfs, env, argv), capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        assert "SERVING" in r.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as m:
            assert "s3net_queue_depth" in m.read().decode()

        # One real fit through the service, inside the root (libtorch's CPU kernels, libgomp).
        work = rootfs / "tmp" / "s3net-smoke"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copy2(ROOT / "tests" / "data" / "ph2" / "IMD002.png", work / "IMD002.png")
        os.chown(work, 10001, 10001)
        r = subprocess.run(
            chroot_argv(rootfs, env, ["s3net", "client", "segment", "--addr", f"http://127.0.0.1:{grpc}",
                                      "/tmp/s3net-smoke/IMD002.png", "--out", "/tmp/s3net-smoke/out",
                                      "--iterations", "2", "--size", "64"]),
            capture_output=True, text=True, timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert (work / "out" / "IMD002.mask.png").is_file()
    finally:
        server.terminate()
        code = server.wait(timeout=60)
    assert code == 0, (tmp_path / "server.log").read_text()

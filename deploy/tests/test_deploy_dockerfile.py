"""The Dockerfile: stages, base images, user, health check, ports, configuration, build context.

No Docker engine runs here, so the image itself is not built by these tests (README,
"### Deployment" says what was and was not run); they check what can be checked from the file:
that it builds what `make build` builds, that its runtime stage is configured with keys the
server knows, and that the commands it runs exist in the binary.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from deploy_common import (
    BINARY,
    GRPC_PORT,
    METRICS_PORT,
    ROOT,
    binary_available,
    documented_config_keys,
    env_to_key,
    host_port,
)

DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE):
    return [i for i in DockerfileParser(str(path)).structure if i["instruction"] != "COMMENT"]


def global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """ARG defaults declared before the first FROM (they may name base images)."""
    out = {}
    for i in instructions(path):
        if i["instruction"] == "FROM":
            break
        if i["instruction"] == "ARG" and "=" in i["value"]:
            k, _, v = i["value"].partition("=")
            out[k.strip()] = v.strip()
    return out


def stages(path: Path = DOCKERFILE) -> dict[str, list[dict]]:
    """Stage name -> its instructions (FROM included), of the server's Dockerfile or another."""
    out: dict[str, list[dict]] = {}
    current = None
    for i in instructions(path):
        if i["instruction"] == "FROM":
            parts = i["value"].split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"unnamed stage: FROM {i['value']}"
            current = parts[2]
            out[current] = []
        if current is not None:
            out[current].append(i)
    return out


def base_image(stage: list[dict], path: Path = DOCKERFILE) -> str:
    image = stage[0]["value"].split()[0]
    for k, v in global_args(path).items():
        image = image.replace("${%s}" % k, v).replace("$" + k, v)
    return image


def of(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def env_of(stage: list[dict]) -> dict[str, str]:
    env = {}
    for value in of(stage, "ENV"):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def healthcheck_argv() -> list[str]:
    (value,) = of(stages()["runtime"], "HEALTHCHECK")
    _, _, cmd = value.partition("CMD")
    return json.loads(cmd)


def test_two_stages_on_the_agreed_base_images():
    s = stages()
    assert list(s) == ["build", "runtime"], "build stage first, runtime stage last (the image)"
    assert base_image(s["build"]) == "rust:1.95-bookworm"
    assert base_image(s["runtime"]) in ("debian:bookworm-slim", "python:3.11-slim")


def test_build_stage_builds_like_make_build():
    runs = " ".join(of(stages()["build"], "RUN"))
    assert "scripts/setup-torch.sh" in runs, "torch must come from the project's own set-up script"
    assert "cargo build --release --locked -p s3net-cli" in runs
    # The torch venv's path is baked into the binary's rpath; the runtime keeps the same path.
    assert env_of(stages()["build"]).get("S3NET_CACHE") == "/opt/s3net"
    assert "readelf" in runs and "RUNPATH" in runs, "the build checks the rpath it staged"


def test_runtime_stage_copies_binary_and_libraries_from_build_at_the_same_paths():
    copies = of(stages()["runtime"], "COPY")
    assert "--from=build /out/bin/s3net /usr/local/bin/s3net" in copies
    # /out mirrors absolute paths (cp --parents): /out/opt/... lands at /opt/...
    assert "--from=build /out/opt/ /opt/" in copies
    assert "LD_LIBRARY_PATH" not in env_of(stages()["runtime"])
    # And the build stage stages torch/lib and the nvidia wheels' lib folders under /out.
    runs = " ".join(of(stages()["build"], "RUN"))
    assert 'cp -a --parents "$rel/torch/lib" /out/' in runs
    assert "nvidia" in runs


def test_runtime_runs_as_a_numeric_non_root_user():
    users = of(stages()["runtime"], "USER")
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, non-zero (Kubernetes runAsNonRoot checks it)"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)


def test_exposes_grpc_and_metrics_ports():
    ports = {int(p.split("/")[0]) for v in of(stages()["runtime"], "EXPOSE") for p in v.split()}
    assert ports == {GRPC_PORT, METRICS_PORT}


def test_healthcheck_uses_the_grpc_health_client_on_the_grpc_port():
    argv = healthcheck_argv()
    assert argv[:3] == ["s3net", "client", "health"]
    addr = argv[argv.index("--addr") + 1]
    assert host_port(addr) == ("127.0.0.1", GRPC_PORT)
    (value,) = of(stages()["runtime"], "HEALTHCHECK")
    assert "--start-period=" in value, "the first start (libtorch, CUDA) needs a start period"


def test_runtime_env_uses_real_config_keys_and_the_agreed_ports():
    env = {k: v for k, v in env_of(stages()["runtime"]).items() if k.startswith("S3NET__")}
    keys = documented_config_keys()
    for name in env:
        assert env_to_key(name) in keys, f"{name} is not a key of config.example.toml"
    assert host_port(env["S3NET__SERVER__ADDR"]) == ("0.0.0.0", GRPC_PORT)
    assert host_port(env["S3NET__METRICS__LISTEN"]) == ("0.0.0.0", METRICS_PORT)
    assert env["S3NET__LOG__FORMAT"] == "json"


def test_entrypoint_is_the_binary_serving():
    (entry,) = of(stages()["runtime"], "ENTRYPOINT")
    (cmd,) = of(stages()["runtime"], "CMD")
    assert json.loads(entry) == ["s3net"]
    assert json.loads(cmd)[0] == "serve"


def dockerignore_patterns(context: Path = ROOT) -> list[str]:
    lines = (context / ".dockerignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def ignored(path: str, context: Path = ROOT) -> bool:
    """Whether `path` (relative to the build context) is left out of it by its .dockerignore."""
    for pat in dockerignore_patterns(context):
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            return True
        if pat.startswith("**/") and any(
            fnmatch.fnmatch(part, pat[3:]) for part in path.split("/")
        ):
            return True
    return False


def test_copied_paths_exist_and_are_in_the_build_context():
    for stage in stages().values():
        for value in of(stage, "COPY"):
            parts = [p for p in value.split() if not p.startswith("--")]
            if any(p.startswith("--from=") for p in value.split()):
                continue
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                if src != ".":
                    assert not ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_host_artifacts_out():
    # .libtorch is a link into this machine's cache: copied, it would replace the link the
    # build stage makes. target/ is gigabytes of this machine's build.
    for path in (".libtorch", "target", "target/release/s3net", ".git"):
        assert ignored(path), f"{path} must be in .dockerignore"
    for path in ("Cargo.toml", "Cargo.lock", "crates/server/src/lib.rs", "proto/s3net/v1/s3net.proto",
                 "scripts/setup-torch.sh", "scripts/rpath.rs", ".cargo/config.toml"):
        assert (ROOT / path).exists(), path
        assert not ignored(path), f"{path} is needed by the build"


@pytest.mark.skipif(not binary_available(), reason="target/release/s3net not built")
def test_healthcheck_command_line_is_accepted_by_the_binary():
    argv = healthcheck_argv()
    r = subprocess.run([str(BINARY), *argv[1:], "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--addr" in r.stdout


@pytest.mark.skipif(
    not binary_available() or shutil.which("readelf") is None,
    reason="needs target/release/s3net and readelf",
)
def test_binary_rpath_is_the_canonical_torch_lib_folder():
    """What the Dockerfile relies on (scripts/rpath.rs): the RUNPATH holds the resolved
    `.libtorch/lib` (plus, with CUDA kernels, the wheel's nvidia/cu13/lib), absolute paths, so
    the runtime stage must keep them; and everything in it lies under site-packages, the part
    the Dockerfile stages."""
    out = subprocess.run(["readelf", "-d", str(BINARY)], capture_output=True, text=True).stdout
    runpath = [l for l in out.splitlines() if "(RUNPATH)" in l or "(RPATH)" in l]
    assert runpath, out
    entries = runpath[0].split("[", 1)[1].rstrip("]").split(":")
    torch_lib = (ROOT / ".libtorch" / "lib").resolve()
    assert entries[0] == str(torch_lib)
    site = torch_lib.parent.parent
    for e in entries[1:]:
        assert e.startswith(str(site / "nvidia") + "/") and e.endswith("/lib"), e

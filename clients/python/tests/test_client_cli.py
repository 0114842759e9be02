"""The `s3net-client` command, checked against the Rust `s3net client` on the same server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pyclient_support import BIN, DATA, REPO

CT = DATA / "dicom" / "CT_small.dcm"
FIT = ["--size", "64", "--iterations", "2", "--seed", "7"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
    env.pop("S3NET_TOKEN", None)
    p = subprocess.run(
        [sys.executable, "-m", "s3net_client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_segment_writes_what_s3net_client_writes(server, tmp_path: Path) -> None:
    py_out, rust_out = tmp_path / "py", tmp_path / "rust"
    p = run("segment", str(CT), "--out", str(py_out), "--addr", server.addr, *FIT)
    assert "CT_small.dcm: " in p.stdout and "iterations" in p.stdout
    assert "queued" in p.stderr and "started" in p.stderr  # milestones when not a terminal
    subprocess.run(
        [
            str(BIN),
            "client",
            "segment",
            "--addr",
            f"http://{server.addr}",
            str(CT),
            "--out",
            str(rust_out),
            *FIT,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    names = sorted(f.name for f in py_out.iterdir())
    assert names == ["CT_small.json", "CT_small.labels.png", "CT_small.mask.png"]
    assert names == sorted(f.name for f in rust_out.iterdir())
    py_json = json.loads((py_out / "CT_small.json").read_text())
    rust_json = json.loads((rust_out / "CT_small.json").read_text())
    assert py_json.keys() == rust_json.keys()
    assert py_json["clusters"][0].keys() == rust_json["clusters"][0].keys()
    assert py_json["options"] == rust_json["options"]
    assert rust_json["refits"] == py_json["refits"]  # same seed: the same fits
    assert rust_json["timings"]["total_seconds"] > 0
    # The local `s3net segment` writes the same report from the same result message.
    local_out = tmp_path / "local"
    subprocess.run(
        [str(BIN), "segment", str(CT), "--out", str(local_out), "--device", "cpu", *FIT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    local_json = json.loads((local_out / "CT_small.json").read_text())
    assert local_json.keys() == rust_json.keys()
    assert local_json["clusters"][0].keys() == rust_json["clusters"][0].keys()
    assert local_json["options"] == rust_json["options"]
    for kind in ("labels", "mask"):
        a = np.asarray(Image.open(py_out / f"CT_small.{kind}.png"))
        b = np.asarray(Image.open(rust_out / f"CT_small.{kind}.png"))
        np.testing.assert_array_equal(a, b)  # same seed, same fit


def test_both_clis_pass_the_precision_and_offset_rate(server, tmp_path: Path) -> None:
    bf16 = [*FIT, "--precision", "bfloat16", "--offset-lr", "300"]
    run("segment", str(CT), "--out", str(tmp_path / "py"), "--addr", server.addr, *bf16)
    subprocess.run(
        [str(BIN), "client", "segment", "--addr", f"http://{server.addr}", str(CT)]
        + ["--out", str(tmp_path / "rust"), *bf16],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for side in ("py", "rust"):
        options = json.loads((tmp_path / side / "CT_small.json").read_text())["options"]
        assert '"precision": "bfloat16"' in json.dumps(options), (side, options)
        assert '"offset_lr": 300.0' in json.dumps(options), (side, options)
    p = run("segment", str(CT), "--out", str(tmp_path), "--precision", "fp8", check=False)
    assert p.returncode == 2 and "invalid choice: 'fp8'" in p.stderr


def test_job_commands(server, tmp_path: Path) -> None:
    addr = ["--addr", server.addr]
    job_id = run("submit", str(CT), *addr, *FIT).stdout.strip()
    assert len(job_id) >= 8
    watched = run("watch", job_id, *addr).stdout
    assert f"job {job_id} completed" in watched
    got = run("get", job_id, "--out", str(tmp_path), *addr).stdout
    assert got.startswith(f"{job_id} COMPLETED 128x128")
    assert (tmp_path / f"{job_id}.mask.png").exists()
    assert run("cancel", job_id, *addr).stdout.strip() == "COMPLETED"
    assert job_id in run("list", "--state", "completed", *addr).stdout


def test_failures_exit_1_with_the_code(server, tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    p = run("segment", str(empty), "--out", str(tmp_path), "--addr", server.addr, check=False)
    assert p.returncode == 1 and p.stderr.strip().startswith("INVALID_ARGUMENT: ")
    p = run("get", "0000000000000000", "--addr", server.addr, check=False)
    assert p.returncode == 1 and "NOT_FOUND" in p.stderr
    p = run(
        "segment",
        str(tmp_path / "missing.png"),
        "--out",
        str(tmp_path),
        "--addr",
        server.addr,
        check=False,
    )
    assert p.returncode == 1 and "missing.png" in p.stderr


def test_inputs_with_one_stem_are_refused_by_all_three_clis(server, tmp_path: Path) -> None:
    """`a/CT_small.dcm` and `b/CT_small.dcm` would both be written as `out/CT_small.*`, the
    second over the first: each command refuses them, naming both, before any fit."""
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / CT.name
    twin.write_bytes(CT.read_bytes())
    out = tmp_path / "out"
    p = run("segment", str(CT), str(twin), "--out", str(out), "--addr", server.addr, check=False)
    assert p.returncode == 1 and "would both be written as" in p.stderr and str(twin) in p.stderr, p.stderr
    for cmd in (["client", "segment", "--addr", f"http://{server.addr}"], ["segment"]):
        r = subprocess.run(
            [str(BIN), *cmd, str(CT), str(twin), "--out", str(out), *FIT], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1 and "would both be written as" in r.stderr and str(twin) in r.stderr, (cmd, r.stderr)
    assert not out.exists(), "nothing written"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "s3net-client"
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "segment" in p.stdout


def test_a_job_that_started_over_says_so() -> None:
    """Progress carries the attempt (a job whose batch failed starts over); servers before the
    field send 0, read as the first attempt."""
    sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
    from s3net_client._convert import event_from_pb
    from s3net_client._pb import s3net_pb2 as pb
    from s3net_client.cli import _describe

    def progress(attempt: int):
        p = pb.Progress(iteration=3, max_iterations=50, labels=7, attempt=attempt)
        p.losses.total = 1.25
        return event_from_pb(pb.JobEvent(job_id="j", progress=p))

    again, first, old = progress(2), progress(1), progress(0)
    assert (again.attempt, first.attempt, old.attempt) == (2, 1, 1)
    assert _describe(again) == "step 3/50 labels 7 loss 1.250 (attempt 2)"
    assert _describe(first) == "step 3/50 labels 7 loss 1.250"


def test_all_frames_segments_every_page_and_says_how_many(server, tmp_path: Path) -> None:
    """`--all-frames`: frame 0's result says how many the file has (`frames`, also in the
    report), then every other is fitted, each written as STEM.frameN.*; a one-frame file keeps
    its plain names; it cannot be combined with --frame."""
    tif = DATA / "raster" / "two-pages.tif"
    p = run("segment", str(tif), str(CT), "--out", str(tmp_path), "--addr", server.addr, "--all-frames", *FIT)
    assert f"{tif} frame 1 of 2:" in p.stdout, p.stdout
    for frame, size in ((0, (96, 72)), (1, (64, 64))):
        with Image.open(tmp_path / f"two-pages.frame{frame}.mask.png") as m:
            assert m.size == size
        assert json.loads((tmp_path / f"two-pages.frame{frame}.json").read_text())["frames"] == 2
    assert json.loads((tmp_path / "CT_small.json").read_text())["frames"] == 1
    assert not (tmp_path / "two-pages.mask.png").exists()
    p = run("segment", str(tif), "--out", str(tmp_path), "--addr", server.addr, "--all-frames", "--frame", "1", check=False)
    assert p.returncode == 2 and "--all-frames cannot be used with --frame" in p.stderr
    # The Rust client does the same, and writes the same files.
    rust = tmp_path / "rust"
    r = subprocess.run(
        [str(BIN), "client", "segment", "--addr", f"http://{server.addr}", str(tif), "--out", str(rust), "--all-frames", *FIT],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"{tif} frame 1 of 2:" in r.stdout, r.stdout
    for frame in (0, 1):
        a = np.asarray(Image.open(tmp_path / f"two-pages.frame{frame}.labels.png"))
        b = np.asarray(Image.open(rust / f"two-pages.frame{frame}.labels.png"))
        np.testing.assert_array_equal(a, b)  # same seed, same fit
    r = subprocess.run(
        [str(BIN), "client", "segment", str(tif), "--out", str(rust), "--all-frames", "--frame", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "cannot be used with" in r.stderr, r.stderr

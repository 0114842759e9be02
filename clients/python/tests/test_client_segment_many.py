"""segment_many: many images with several fits in flight, against a real two-worker server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyclient_support import DATA, FAST, REPO, start_server, wait_until
from s3net_client import AsyncClient, Client, InvalidArgument, JobState

CT = DATA / "dicom" / "CT_small.dcm"
PH2 = DATA / "ph2" / "IMD002.png"
LUNG = DATA / "lung" / "ID_0000_Z_0142.png"


@pytest.fixture(scope="module")
def two_workers():
    s = start_server("--cpu-workers", "2")
    yield s
    s.stop()


def overlapping(jobs) -> int:
    """The most jobs that ran at one time, from their start and finish times."""
    edges = sorted([(j.started_at, 1) for j in jobs] + [(j.finished_at, -1) for j in jobs])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_results_come_in_order_past_a_bad_image_and_match_segment(two_workers) -> None:
    images = [PH2, CT, b"not an image", LUNG, DATA / "dicom" / "CT_small_j2k.dcm"]
    with Client(two_workers.addr, timeout=120) as client:
        outcomes = list(client.segment_many(images, concurrency=3, **FAST))
        assert [image for image, _ in outcomes] == images
        bad = outcomes[2][1]
        assert isinstance(bad, InvalidArgument) and "unrecognised image format" in bad.details
        for image, result in outcomes[:2] + outcomes[3:]:
            assert not isinstance(result, Exception), (image, result)
            alone = client.segment(image, **FAST)
            np.testing.assert_array_equal(result.mask, alone.mask)
            np.testing.assert_array_equal(result.labels, alone.labels)
        # A missing file is the caller's error, yielded like the server's.
        ((_, missing),) = list(client.segment_many([DATA / "no-such.png"], **FAST))
        assert isinstance(missing, FileNotFoundError)
        with pytest.raises(ValueError, match="concurrency"):
            next(client.segment_many([PH2], concurrency=0))


def test_fits_run_side_by_side(two_workers) -> None:
    work = dict(size=64, iterations=60, min_labels=0, seed=7)
    with Client(two_workers.addr, timeout=120) as client:
        started = time.time()
        results = [r for _, r in client.segment_many([PH2] * 4, concurrency=2, **work)]
        assert all(r.iterations == 60 for r in results), results
        jobs = [client.get(j.job_id) for j in client.list_jobs() if j.submitted_at >= started]
    assert len(jobs) == 4
    assert overlapping(jobs) == 2, [(j.started_at, j.finished_at) for j in jobs]


def test_leaving_early_cancels_the_fits_in_flight(two_workers) -> None:
    slow = dict(size=64, iterations=1000, min_labels=0, seed=7)
    with Client(two_workers.addr, timeout=120) as client:
        started = time.time()
        first = client.segment_many([b"not an image"] + [PH2] * 5, concurrency=3, **slow)
        image, outcome = next(first)
        assert isinstance(outcome, InvalidArgument)
        first.close()  # as a `break` out of the loop does

        def ours():
            return [j for j in client.list_jobs() if j.submitted_at >= started]

        # The fits in flight are cancelled (at their next step); the three not yet sent never
        # were. In flight: the two PH2 calls beside the refused one, of which the second may
        # have been cancelled while its 0.7 MB request was still on its way, before the server
        # made it a job (seen in a CI run): one or two jobs, all cancelled, and no more later.
        def settled():
            return all(j.state == JobState.CANCELLED for j in ours()) and ours()

        wait_until(settled, timeout=30)
        time.sleep(1.0)  # a request still on its way when the call was cancelled
        jobs = wait_until(settled, timeout=30)
    assert 1 <= len(jobs) <= 2, jobs


def test_the_async_client_does_the_same(two_workers) -> None:
    async def main():
        async with AsyncClient(two_workers.addr, timeout=120) as client:
            return [o async for o in client.segment_many([CT, b"junk", PH2], concurrency=2, **FAST)]

    outcomes = asyncio.run(main())
    assert [image for image, _ in outcomes] == [CT, b"junk", PH2]
    assert isinstance(outcomes[1][1], InvalidArgument)
    assert outcomes[0][1].mask.shape == (128, 128) and outcomes[2][1].labels_used >= 2


def test_the_cli_segments_several_files(two_workers, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
    env.pop("S3NET_TOKEN", None)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    p = subprocess.run(
        [sys.executable, "-m", "s3net_client.cli", "segment", str(PH2), str(junk), str(CT)]
        + ["--out", str(tmp_path / "out"), "--addr", two_workers.addr, "--concurrency", "2"]
        + ["--size", "64", "--iterations", "2", "--seed", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    assert p.stdout.index("IMD002.png: ") < p.stdout.index("CT_small.dcm: ")
    assert "error: " in p.stderr and "junk.png" in p.stderr and "1 of 3 image(s) failed" in p.stderr
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        "CT_small.json",
        "CT_small.labels.png",
        "CT_small.mask.png",
        "IMD002.json",
        "IMD002.labels.png",
        "IMD002.mask.png",
    ]

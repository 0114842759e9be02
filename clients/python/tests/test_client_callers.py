"""Named callers (``[server.callers]``) through the Python client and a real server: each
token names a caller, a caller sees its own jobs only (an operator all), and a caller over its
``max_active_jobs`` is refused with a hint, which ``segment`` follows until it has room."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from pyclient_support import BIN, DATA, FAST, REPO, SLOW, start_server, wait_until
from s3net_client import Client, JobState, PermissionDenied, ResourceExhausted, Unauthenticated

CT = DATA / "dicom" / "CT_small.dcm"
TOKENS = {"clinic": "clinic-secret", "research": "research-secret", "on_call": "ops-secret"}


@pytest.fixture(scope="module")
def server():
    env = {f"S3NET__SERVER__CALLERS__{name.upper()}__TOKEN": token for name, token in TOKENS.items()}
    env["S3NET__SERVER__CALLERS__RESEARCH__MAX_ACTIVE_JOBS"] = "1"
    env["S3NET__SERVER__CALLERS__ON_CALL__OPERATOR"] = "true"
    s = start_server("--cpu-workers", "1", env=env)
    yield s
    s.stop()


def _client(server, name: str, **kw) -> Client:
    return Client(server.addr, token=TOKENS[name], timeout=120, **kw)


def test_each_caller_sees_its_own_jobs(server) -> None:
    with _client(server, "clinic") as clinic, _client(server, "research") as research, _client(
        server, "on_call"
    ) as ops, Client(server.addr, token="nobody", retries=0) as stranger:
        with pytest.raises(Unauthenticated):
            stranger.list_jobs()
        mine = clinic.submit(CT, **FAST)
        clinic.wait(mine.job_id)
        job = clinic.get(mine.job_id)
        assert job.caller == "clinic" and job.state == JobState.COMPLETED
        for call in (research.get, research.cancel, research.wait):
            with pytest.raises(PermissionDenied) as e:
                call(mine.job_id)
            assert "another caller" in e.value.details
        assert mine.job_id not in {j.job_id for j in research.list_jobs()}
        assert {j.caller for j in ops.list_jobs()} >= {"clinic"}
        assert ops.get(mine.job_id).caller == "clinic"
        # Both command lines say whose each job is.
        env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
        for cmd in (
            [sys.executable, "-m", "s3net_client.cli", "list", "--addr", server.addr],
            [str(BIN), "client", "list", "--addr", f"http://{server.addr}"],
        ):
            p = subprocess.run([*cmd, "--token", TOKENS["on_call"]], env=env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stderr
            line = next(l for l in p.stdout.splitlines() if l.startswith(mine.job_id))
            assert line.endswith(" by clinic"), line


def test_a_caller_over_its_quota_is_paced_by_the_hint(server) -> None:
    with _client(server, "research", retries=0) as once, _client(server, "research", retries=8) as patient, _client(
        server, "on_call"
    ) as ops, _client(server, "clinic") as clinic:
        busy = once.submit(CT, **SLOW)
        wait_until(lambda: once.get(busy.job_id).state == JobState.RUNNING)
        with pytest.raises(ResourceExhausted) as e:
            once.submit(CT, **FAST)
        assert "caller 'research' has 1 jobs queued or running" in e.value.details
        assert e.value.retry_after is not None and e.value.retry_after >= 1
        # The clinic is not held back by research's quota (its job waits for the worker only).
        theirs = clinic.submit(CT, **FAST)
        # The operator ends research's long job a moment later; meanwhile research's next
        # segment call is refused, waits the hint, and gets in.
        stop = threading.Timer(0.5, lambda: ops.cancel(busy.job_id))
        stop.start()
        t0 = time.monotonic()
        result = patient.segment(CT, **FAST)
        assert result.labels.shape == (128, 128)
        assert time.monotonic() - t0 >= 0.5
        stop.join()
        assert once.get(busy.job_id).state == JobState.CANCELLED
        assert clinic.wait(theirs.job_id).labels.shape == (128, 128)

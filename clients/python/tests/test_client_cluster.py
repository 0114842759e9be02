"""Several replicas behind one name, one round_robin client: the job calls of a pipeline that
talks to a scaled-out service (README, "Several replicas")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Tuple

import pytest

from pyclient_support import BIN, DATA, FAST, REPO, SLOW, Server, start_server
from s3net_client import Client, JobState, NotFound, events

CT = DATA / "dicom" / "CT_small.dcm"


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _replicas(cluster: bool) -> Tuple[List[Server], str]:
    ports = _free_ports(2)
    env = {}
    if cluster:
        env = {
            "S3NET__CLUSTER__PEERS": ",".join(f"127.0.0.1:{p}" for p in ports),
            "S3NET__CLUSTER__ADVERTISE_ADDR": "127.0.0.1",
        }
    servers: List[Server] = []
    try:
        for p in ports:
            servers.append(start_server("--addr", f"127.0.0.1:{p}", env=env))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    # One name for both, as a headless Service's DNS name would be.
    return servers, "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


def _connected(c: Client) -> Client:
    """round_robin picks among the connections that are up: let both come up first."""
    for _ in range(10):
        c.list_jobs()
        time.sleep(0.05)
    return c


@pytest.fixture
def cluster():
    servers, target = _replicas(cluster=True)
    yield servers, target
    for s in servers:
        s.stop()


def test_round_robin_job_calls_reach_the_replica_that_holds_the_job(cluster) -> None:
    servers, target = cluster
    with _connected(Client(target, load_balancing="round_robin", timeout=120)) as c:
        subs = [c.submit(CT, **FAST) for _ in range(4)]
        # The calls went to both replicas, and each id names its own.
        owners = {s.job_id.rsplit("@", 1)[1] for s in subs}
        assert owners == {s.addr for s in servers}, owners
        # Each of the calls below reaches the other replica about half the time.
        for s in subs:
            seen = list(c.watch(s.job_id))
            assert isinstance(seen[-1], events.Completed), seen[-1]
            for _ in range(2):
                job = c.get(s.job_id)
                assert job.state == JobState.COMPLETED and job.result is not None
        slow = [c.submit(CT, **SLOW) for _ in range(2)]
        for s in slow:
            for _ in range(2):
                assert c.cancel(s.job_id) in (
                    JobState.QUEUED,
                    JobState.RUNNING,
                    JobState.CANCELLED,
                )
            # A running job stops at its next step.
            last = list(c.watch(s.job_id))[-1]
            assert isinstance(last, events.Cancelled) and "CancelJob" in last.reason, last
            assert c.get(s.job_id).state == JobState.CANCELLED
        # An idempotency key finds its job through either replica.
        for i in range(4):
            first = c.submit(CT, idempotency_key=f"study-{i}", **FAST)
            again = [c.submit(CT, idempotency_key=f"study-{i}", **FAST) for _ in range(2)]
            assert not first.existing and all(a.existing for a in again)
            assert {a.job_id for a in again} == {first.job_id}
        # Any replica lists every replica's jobs.
        for _ in range(2):
            listed = c.list_jobs(limit=1000)
            assert listed.unreachable_replicas == ()
            assert {s.job_id for s in subs + slow} <= {j.job_id for j in listed}
        # A replica that is not listed is never called: the id is unknown.
        with pytest.raises(NotFound, match="not one of this service's replicas"):
            c.get("0123456789abcdef@127.0.0.1:9")


def test_without_a_cluster_the_other_replica_does_not_know_the_job() -> None:
    """What [cluster] is for: the same client and calls, replicas on their own."""
    servers, target = _replicas(cluster=False)
    try:
        with _connected(Client(target, load_balancing="round_robin", timeout=120)) as c:
            ids = [c.submit(CT, **FAST).job_id for _ in range(2)]
            missing = 0
            for job_id in ids:
                for _ in range(4):
                    try:
                        c.get(job_id)
                    except NotFound:
                        missing += 1
            assert missing >= 2, missing
    finally:
        for s in servers:
            s.stop()


def test_both_command_lines_say_which_replicas_did_not_answer() -> None:
    me, down = _free_ports(2)
    env = {
        "S3NET__CLUSTER__PEERS": f"127.0.0.1:{me},127.0.0.1:{down}",
        "S3NET__CLUSTER__ADVERTISE_ADDR": "127.0.0.1",
    }
    server = start_server("--addr", f"127.0.0.1:{me}", env=env)
    try:
        with Client(server.addr) as c:
            job_id = c.submit(CT, **FAST).job_id
        cli_env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
        for cmd in (
            [sys.executable, "-m", "s3net_client.cli", "list", "--addr", server.addr],
            [str(BIN), "client", "list", "--addr", f"http://{server.addr}"],
        ):
            p = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stderr
            assert job_id in p.stdout, p.stdout
            assert f"no answer from replica(s) 127.0.0.1:{down}" in p.stderr, p.stderr
    finally:
        server.stop()


def test_load_balancing_is_checked() -> None:
    with pytest.raises(ValueError, match="load_balancing must be"):
        Client("localhost:1", load_balancing="random")

"""Retries: a full queue (RESOURCE_EXHAUSTED) is retried no sooner than the server's
retry-after hint; an unreachable server (UNAVAILABLE) with exponential backoff."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from pyclient_support import DATA, FAST, SLOW, start_server, wait_until
from s3net_client import Client, JobState, ResourceExhausted, Unavailable

CT = DATA / "dicom" / "CT_small.dcm"


@pytest.fixture(scope="module")
def tiny_queue():
    """One worker and room for one waiting job: the third job finds the queue full."""
    s = start_server("--cpu-workers", "1", "--queue-capacity", "1")
    yield s
    s.stop()


def test_queue_full_is_retried_after_the_hint(tiny_queue) -> None:
    with Client(tiny_queue.addr, timeout=120, retries=0) as client:
        running = client.submit(CT, **SLOW)
        wait_until(lambda: client.get(running.job_id).state == JobState.RUNNING)
        waiting = client.submit(CT, **SLOW)
        assert waiting.state == JobState.QUEUED

        # Without retries the refusal surfaces, with the server's hint.
        with pytest.raises(ResourceExhausted) as e:
            client.segment(CT, **FAST)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in e.value.details
        hint = e.value.retry_after
        assert hint is not None and hint >= 1
        with pytest.raises(ResourceExhausted):
            client.submit(CT, **FAST)

        # Free the queue a little after the refusal; the retrying call must then get in,
        # and not before the hint has passed.
        def free() -> None:
            time.sleep(0.3)
            client.cancel(waiting.job_id)
            client.cancel(running.job_id)

        with Client(tiny_queue.addr, timeout=120, retries=5, backoff=0.05) as patient:
            freer = threading.Thread(target=free)
            t0 = time.monotonic()
            freer.start()
            r = patient.segment(CT, **FAST)
            elapsed = time.monotonic() - t0
            freer.join()
        assert r.labels.shape == (128, 128)
        assert elapsed >= 0.9 * hint, f"retried after {elapsed:.2f} s, before the {hint} s hint"


def test_retries_stop_at_the_deadline(tiny_queue) -> None:
    with Client(tiny_queue.addr, retries=0) as client:
        running = client.submit(CT, **SLOW)
        waiting = client.submit(CT, **SLOW)
        try:
            with Client(tiny_queue.addr, retries=10) as patient:
                t0 = time.monotonic()
                # The hint (>= 1 s, growing with the queue) does not fit in a 0.5 s deadline:
                # the client gives up at once instead of sleeping past it.
                with pytest.raises(ResourceExhausted):
                    patient.segment(CT, timeout=0.5, **FAST)
                assert time.monotonic() - t0 < 0.5
        finally:
            client.cancel(waiting.job_id)
            client.cancel(running.job_id)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_with_backoff() -> None:
    port = _closed_port()
    with Client(f"127.0.0.1:{port}", retries=3, backoff=0.2, max_backoff=0.4) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            client.list_jobs(timeout=30)
        elapsed = time.monotonic() - t0
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    # Three waits of 0.2, 0.4 and 0.4 s, each scaled by a jitter in [0.5, 1].
    assert 0.5 <= elapsed < 10
    with Client(f"127.0.0.1:{port}", retries=0) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.segment(CT, **FAST)
        assert time.monotonic() - t0 < 5


def test_a_frozen_server_fails_the_call_instead_of_hanging() -> None:
    """A server that stops answering mid-call (here SIGSTOP: its connection stays open, as when
    a machine freezes or drops off the network) fails a segment() with Unavailable once a
    keepalive ping goes unanswered; without pings it would wait for ever (no timeout set)."""
    server = start_server("--cpu-workers", "1")
    try:
        with Client(server.addr, keepalive=0.5, keepalive_timeout=1.0) as client:
            started = threading.Event()

            def progress(event) -> None:
                started.set()

            outcome: list = []

            def call() -> None:
                try:
                    client.segment(CT, progress=progress, **SLOW)
                    outcome.append("finished")
                except Exception as e:  # the outcome under test
                    outcome.append(e)

            t = threading.Thread(target=call, daemon=True)
            t.start()
            assert started.wait(60), "the job never started"
            frozen_at = time.monotonic()
            server.proc.send_signal(signal.SIGSTOP)
            try:
                t.join(30)
                waited = time.monotonic() - frozen_at
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert not t.is_alive(), "segment() still waits on a frozen server"
            assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
            assert waited < 10, f"took {waited:.1f} s"
    finally:
        server.stop()


def test_keepalive_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        Client("localhost:1", keepalive=0)
    with Client("localhost:1", keepalive=None):
        pass


def test_requests_in_transit_over_the_byte_budget_are_retried() -> None:
    """The bytes of requests being received are budgeted (server.max_upload_bytes_in_flight):
    while an upload holds most of it, a large image sent with Segment is refused with a
    retry hint as soon as its message begins, and a retrying client gets in once the upload
    is gone."""
    from s3net_client._pb import s3net_pb2 as pb
    from s3net_client._pb.s3net_pb2_grpc import SegmenterStub

    mib = 1 << 20
    server = start_server(
        "--cpu-workers",
        "1",
        env={
            "S3NET__SERVER__MAX_MESSAGE_BYTES": str(16 * mib),
            "S3NET__SERVER__MAX_UPLOAD_BYTES": str(16 * mib),
            "S3NET__SERVER__MAX_UPLOAD_BYTES_IN_FLIGHT": str(40 * mib),
        },
    )
    # About 9.7 MB of noise: a 16-bit PNG that does not compress.
    image = np.random.default_rng(0).integers(0, 65535, (2200, 2200), dtype=np.uint16)
    release = threading.Event()

    def holding_upload():
        # Announces 16 MiB and waits.
        yield pb.UploadChunk(header=pb.UploadHeader(total_bytes=16 * mib))
        release.wait(60)

    try:
        channel = grpc.insecure_channel(server.addr)
        # Two of them: 8 MiB of the 40 are left.
        held = [SegmenterStub(channel).SegmentUpload(holding_upload()) for _ in range(2)]
        time.sleep(0.5)
        with Client(server.addr, timeout=120, retries=0) as client:
            with pytest.raises(ResourceExhausted) as e:
                client.segment(image, **FAST)
        assert e.value.details.startswith(
            "uploads in progress hold 32.0 MiB of the 40.0 MiB the server allows "
            "(server.max_upload_bytes_in_flight), and this one needs 9.2 MiB more"
        ), e.value.details
        assert e.value.retry_after == 1

        threading.Timer(0.3, release.set).start()
        with Client(server.addr, timeout=120, retries=5, backoff=0.05) as patient:
            t0 = time.monotonic()
            r = patient.segment(image, **FAST)
            elapsed = time.monotonic() - t0
        assert r.labels.shape == (2200, 2200)
        assert elapsed >= 0.9, f"got in after {elapsed:.2f} s: before the uploads ended?"
        # The holding uploads ended without their images: refused as empty, not hung.
        for call in held:
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        channel.close()
    finally:
        release.set()
        server.stop()


def test_a_server_that_takes_smaller_messages_gets_the_image_in_chunks() -> None:
    """A server configured to take smaller messages than the client's upload threshold
    refuses the one-message image as INVALID_ARGUMENT with its limit (``max_message_bytes``);
    the client sends it again in chunks that fit, sync and asyncio alike. With
    ``upload=False`` the refusal is the caller's to see."""
    import asyncio

    from s3net_client import AsyncClient, InvalidArgument

    server = start_server(
        "--cpu-workers", "1", env={"S3NET__SERVER__MAX_MESSAGE_BYTES": str(4 << 20)}
    )
    # About 6.5 MB of noise as a 16-bit PNG: more than 4 MiB, under the 32 MiB threshold.
    image = np.random.default_rng(1).integers(0, 65535, (1800, 1800), dtype=np.uint16)
    try:
        with Client(server.addr, timeout=120) as client:
            assert client.segment(image, **FAST).labels.shape == (1800, 1800)
            with pytest.raises(InvalidArgument) as e:
                client.segment(image, upload=False, **FAST)
        assert e.value.max_message_bytes == 4 << 20
        assert "(server.max_message_bytes: 4.0 MiB)" in e.value.details, e.value.details

        async def main() -> None:
            async with AsyncClient(server.addr, timeout=120) as client:
                r = await client.segment(image, **FAST)
                assert r.labels.shape == (1800, 1800)

        asyncio.run(main())
    finally:
        server.stop()


def test_a_connection_over_the_servers_limit_is_retried() -> None:
    """A connection beyond server.max_connections is closed on arrival: the client's call is
    UNAVAILABLE at once (not left waiting until its deadline), and a retrying client gets in
    once a connection is free."""
    server = start_server("--cpu-workers", "1", env={"S3NET__SERVER__MAX_CONNECTIONS": "1"})
    try:
        # The one connection allowed. (Not a second Client: gRPC's C core shares one
        # connection among the channels of a process that have the same target.)
        host, port = server.addr.rsplit(":", 1)
        holder = socket.create_connection((host, int(port)))
        time.sleep(0.2)
        with Client(server.addr, timeout=30, retries=0) as client:
            t0 = time.monotonic()
            with pytest.raises(Unavailable):
                client.segment(CT, **FAST)
            assert time.monotonic() - t0 < 5
        threading.Timer(0.5, holder.close).start()
        with Client(server.addr, timeout=120, retries=8, backoff=0.2, max_backoff=0.5) as patient:
            t0 = time.monotonic()
            assert patient.segment(CT, **FAST).labels.size > 0
            assert time.monotonic() - t0 >= 0.4, "got in before the connection was free"
        assert any("connection refused: server.max_connections are open" in l for l in server.log)
    finally:
        server.stop()


def test_connections_past_their_age_move_without_losing_calls() -> None:
    """With server.max_connection_age_s, the server asks each connection to end after that
    long (so that clients re-resolve and spread over new replicas): a call open across that
    moment runs to its end, and the client's later calls go through on a new connection."""
    server = start_server("--cpu-workers", "1", env={"S3NET__SERVER__MAX_CONNECTION_AGE_S": "1"})
    try:
        with Client(server.addr, timeout=120, retries=0) as client:
            # About 3 s of fitting on one open call, across the 1 s age.
            t0 = time.monotonic()
            r = client.segment(CT, size=64, iterations=60, min_labels=0, seed=7)
            assert r.iterations == 60
            assert time.monotonic() - t0 > 1.5, "the call did not outlive the age"
            # Calls every 0.4 s for 3 s: each connection ages out under them.
            for _ in range(8):
                assert client.segment(CT, **FAST).labels.size > 0
                time.sleep(0.4)
    finally:
        server.stop()


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_a_job_its_server_shut_down_on_is_sent_again(client_kind: str) -> None:
    """A rolling update or `docker compose restart` mid-job: the server drains, its grace runs
    out, and it cancels the job as `retryable`. segment() sends the same request again once a
    server answers on the address (here the replacement, on the same port) and returns its
    result; a submitted job's wait() given what submit() returned submits it again the same
    way, while wait() given only its id cannot (it has no image) and raises Cancelled with
    ``retryable`` set, for its caller to submit again."""
    from s3net_client import Cancelled

    grace = {"S3NET__SERVER__SHUTDOWN_GRACE_S": "1"}
    first = start_server("--cpu-workers", "1", env=grace)
    addr = first.addr
    second = None
    try:
        with Client(addr, timeout=120, retries=30, backoff=0.2, max_backoff=0.5) as client:
            events: list = []
            outcome: list = []
            # Long enough to outlive the 1 s grace, short enough to finish on the second server.
            work = dict(size=64, iterations=300, min_labels=0, seed=7)

            def call() -> None:
                try:
                    if client_kind == "sync":
                        outcome.append(client.segment(CT, progress=events.append, **work))
                    else:
                        outcome.append(asyncio.run(segment_async(addr, events.append, work)))
                except Exception as e:  # the outcome under test
                    outcome.append(e)

            t = threading.Thread(target=call, daemon=True)
            t.start()
            wait_until(lambda: any(type(e).__name__ == "Progress" for e in events), timeout=60)
            queued = client.submit(CT, **work)  # waits behind it on the one worker
            waited: list = []
            watching: list = []

            def wait() -> None:
                try:
                    waited.append(client.wait(queued.job_id, progress=watching.append, timeout=60))
                except Exception as e:  # the outcome under test
                    waited.append(e)

            w = threading.Thread(target=wait, daemon=True)
            w.start()
            wait_until(lambda: watching, timeout=10)  # its stream is open: the replay came
            # The same job followed from its handle, which holds the submission.
            resent: list = []
            following: list = []

            def wait_handle() -> None:
                try:
                    if client_kind == "sync":
                        resent.append(client.wait(queued, progress=following.append, timeout=120))
                    else:
                        resent.append(asyncio.run(wait_async(addr, queued, following.append)))
                except Exception as e:  # the outcome under test
                    resent.append(e)

            h = threading.Thread(target=wait_handle, daemon=True)
            h.start()
            wait_until(lambda: following, timeout=10)
            first.proc.send_signal(signal.SIGTERM)
            assert first.proc.wait(30) == 0
            w.join(30)
            assert len(waited) == 1 and isinstance(waited[0], Cancelled), waited
            assert waited[0].retryable and "shutting down" in waited[0].details
            second = start_server("--cpu-workers", "1", "--addr", addr, env=grace)
            t.join(120)
            assert not t.is_alive() and len(outcome) == 1, outcome
            result = outcome[0]
            assert not isinstance(result, Exception), result
            assert result.iterations == 300 and result.mask.shape == (128, 128)
            kinds = [type(e).__name__ for e in events]
            lost = kinds.index("Cancelled")
            assert events[lost].retryable and "shutting down" in events[lost].reason
            # Then the new job, from its start, on the second server.
            assert kinds[lost + 1] == "Queued" and kinds[-1] == "Completed", kinds
            assert events[lost + 1].job_id != events[lost].job_id
            # The handle's wait: its job cancelled, then sent again and followed to its result.
            h.join(120)
            assert not h.is_alive() and len(resent) == 1, resent
            again = resent[0]
            assert not isinstance(again, Exception), again
            assert again.iterations == 300 and again.job_id != queued.job_id
            kinds = [type(e).__name__ for e in following]
            gone = kinds.index("Cancelled")
            assert following[gone].retryable and following[gone].job_id == queued.job_id
            # Then the new job's events, from where it stands when watched (a worker may have
            # taken it between its submission and the watch), to its result.
            assert kinds[gone + 1] in ("Queued", "Started") and kinds[-1] == "Completed", kinds
            assert {e.job_id for e in following[gone + 1 :]} == {again.job_id}
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def wait_async(addr: str, submitted, progress):
    from s3net_client import AsyncClient

    async with AsyncClient(addr, timeout=120, retries=30, backoff=0.2, max_backoff=0.5) as client:
        return await client.wait(submitted, progress=progress)


async def segment_async(addr: str, progress, work: dict):
    from s3net_client import AsyncClient

    async with AsyncClient(addr, timeout=120, retries=30, backoff=0.2, max_backoff=0.5) as client:
        return await client.segment(CT, progress=progress, **work)


def test_the_rust_cli_sends_a_job_its_server_shut_down_on_again(tmp_path) -> None:
    """`s3net client segment` does what the Python client's segment does (the test above): the
    job cancelled by its server's shutdown is sent again to the server that replaces it."""
    import subprocess

    from pyclient_support import BIN

    grace = {"S3NET__SERVER__SHUTDOWN_GRACE_S": "1"}
    first = start_server("--cpu-workers", "1", env=grace)
    addr, second = first.addr, None
    try:
        cli = subprocess.Popen(
            [str(BIN), "client", "segment", "--addr", f"http://{addr}", str(CT), "--out", str(tmp_path)]
            + ["--size", "64", "--iterations", "300", "--min-labels", "0", "--seed", "7"]
            + ["--retries", "30", "--backoff", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list = []
        threading.Thread(target=lambda: lines.extend(cli.stderr), daemon=True).start()
        wait_until(lambda: any("started" in line for line in lines), timeout=60)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        second = start_server("--cpu-workers", "1", "--addr", addr, env=grace)
        out, _ = cli.communicate(timeout=120)
        log = "".join(lines)
        assert cli.returncode == 0, log
        assert "server shutting down (nothing of the job was kept" in log and "sending the image again" in log, log
        assert "300 iterations" in out and (tmp_path / "CT_small.mask.png").exists()
    finally:
        first.stop()
        if second is not None:
            second.stop()

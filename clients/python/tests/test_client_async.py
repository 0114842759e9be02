"""AsyncClient: the same API on grpc.aio (run with asyncio.run, no pytest plugin needed)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from pyclient_support import DATA, FAST, SLOW
from s3net_client import AsyncClient, Cancelled, InvalidArgument, JobState, NotFound, events

PH2 = DATA / "ph2" / "IMD002.png"
CT = DATA / "dicom" / "CT_small.dcm"


def test_async_segment_and_jobs(server) -> None:
    async def main() -> None:
        async with AsyncClient(server.addr, timeout=120) as client:
            seen = []
            r = await client.segment(PH2, progress=seen.append, **FAST)
            assert r.labels.shape == (r.height, r.width) and r.iterations == 2
            assert isinstance(seen[0], events.Queued) and isinstance(seen[-1], events.Completed)

            # Two segmentations at once on one channel, one of them chunked.
            a, b = await asyncio.gather(
                client.segment(CT, **FAST), client.segment(CT, upload=True, **FAST)
            )
            np.testing.assert_array_equal(a.labels, b.labels)

            sub = await client.submit(CT, **FAST)
            watched = [ev async for ev in client.watch(sub.job_id)]
            assert isinstance(watched[-1], events.Completed)
            job = await client.get(sub.job_id)
            assert job.state == JobState.COMPLETED and job.result.labels.shape == (128, 128)
            assert (await client.wait(sub.job_id)).job_id == sub.job_id
            assert sub.job_id in {j.job_id for j in await client.list_jobs()}

    asyncio.run(main())


def test_async_cancel_and_errors(server) -> None:
    async def main() -> None:
        async with AsyncClient(server.addr, timeout=120) as client:
            sub = await client.submit(PH2, **SLOW)
            async for ev in client.watch(sub.job_id):
                if isinstance(ev, events.Started):
                    await client.cancel(sub.job_id)
                last = ev
            assert isinstance(last, events.Cancelled)
            assert (await client.get(sub.job_id)).state == JobState.CANCELLED
            with pytest.raises(Cancelled):
                await client.wait(sub.job_id)

            with pytest.raises(InvalidArgument) as e:
                await client.segment(b"")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details
            with pytest.raises(NotFound):
                await client.get("no-such-job")

            # Cancelling the task cancels the server's job (the call is dropped).
            seen = []
            task = asyncio.create_task(client.segment(PH2, progress=seen.append, **SLOW))
            while not any(isinstance(e, events.Progress) for e in seen):
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            job_id = seen[0].job_id
            for _ in range(200):
                job = await client.get(job_id)
                if job.state.finished:
                    break
                await asyncio.sleep(0.05)
            assert job.state == JobState.CANCELLED

    asyncio.run(main())


def test_async_segment_frames(server) -> None:
    """Every page of a two-page TIFF, in order, frame 0's result saying how many; a one-frame
    image yields one; frame= is refused."""
    tif = DATA / "raster" / "two-pages.tif"

    async def main() -> None:
        async with AsyncClient(server.addr) as client:
            got = [(f, r.frames, r.width, r.height) async for f, r in client.segment_frames(tif, **FAST)]
            assert got == [(0, 2, 96, 72), (1, 2, 64, 64)]
            assert [f async for f, _ in client.segment_frames(CT, **FAST)] == [0]
            with pytest.raises(TypeError, match="no frame= option"):
                async for _ in client.segment_frames(tif, frame=1, **FAST):
                    pass

    asyncio.run(main())

"""The asynchronous job API: submit, watch, wait, get, cancel, list_jobs."""

from __future__ import annotations

import numpy as np
import pytest

from pyclient_support import DATA, FAST, SLOW
from s3net_client import AlreadyExists, Cancelled, Client, JobState, NotFound, events

PH2 = DATA / "ph2" / "IMD002.png"
CT = DATA / "dicom" / "CT_small.dcm"


def test_submit_watch_get_list(client: Client) -> None:
    sub = client.submit(CT, **FAST)
    assert sub.job_id and not sub.existing
    assert sub.state in (JobState.QUEUED, JobState.RUNNING)
    seen = list(client.watch(sub.job_id))
    assert isinstance(seen[-1], events.Completed)
    assert {e.job_id for e in seen} == {sub.job_id}
    job = client.get(sub.job_id)
    assert job.state == JobState.COMPLETED and job.state.finished
    assert (job.width, job.height) == (128, 128)
    assert job.result is not None and job.result.labels.shape == (128, 128)
    np.testing.assert_array_equal(job.result.labels, seen[-1].result.labels)
    assert job.submitted_at <= job.started_at <= job.finished_at
    assert job.progress is not None and job.progress.iteration == 2
    # wait() replays a finished job's outcome.
    again = client.wait(sub.job_id)
    np.testing.assert_array_equal(again.labels, job.result.labels)
    listed = {j.job_id: j for j in client.list_jobs()}
    assert listed[sub.job_id].state == JobState.COMPLETED
    assert listed[sub.job_id].result is None  # ListJobs leaves the images out
    done = client.list_jobs("completed", limit=1000)
    assert sub.job_id in {j.job_id for j in done}
    assert all(j.state == JobState.COMPLETED for j in done)
    with pytest.raises(ValueError, match="unknown job state"):
        client.list_jobs("sleeping")


def test_wait_with_progress(client: Client) -> None:
    sub = client.submit(PH2, **FAST)
    seen = []
    r = client.wait(sub.job_id, progress=seen.append)
    assert r.job_id == sub.job_id and r.iterations == 2
    assert isinstance(seen[-1], events.Completed)


def test_cancel(client: Client) -> None:
    sub = client.submit(PH2, **SLOW)
    events_seen = []
    for ev in client.watch(sub.job_id):
        events_seen.append(ev)
        if isinstance(ev, events.Progress):
            assert client.cancel(sub.job_id) in (JobState.RUNNING, JobState.CANCELLED)
    assert isinstance(events_seen[-1], events.Cancelled)
    assert "CancelJob" in events_seen[-1].reason
    job = client.get(sub.job_id)
    assert job.state == JobState.CANCELLED
    assert job.cancellation is not None and "CancelJob" in job.cancellation.reason
    with pytest.raises(Cancelled) as e:
        client.wait(sub.job_id)
    assert e.value.job_id == sub.job_id and "CancelJob" in e.value.details
    # Cancelling a finished job is not an error: it reports the final state.
    assert client.cancel(sub.job_id) == JobState.CANCELLED


def test_idempotency_key(client: Client) -> None:
    first = client.submit(CT, idempotency_key="py-idem-1", **FAST)
    second = client.submit(CT, idempotency_key="py-idem-1", **FAST)
    assert second.existing and second.job_id == first.job_id
    with pytest.raises(AlreadyExists) as e:
        client.submit(PH2, idempotency_key="py-idem-1", **FAST)
    assert "py-idem-1" in e.value.details or "key" in e.value.details
    client.wait(first.job_id)


def test_unknown_job(client: Client) -> None:
    for call in (client.get, client.cancel, client.wait, lambda j: list(client.watch(j))):
        with pytest.raises(NotFound):
            call("0000000000000000")

"""Protobuf messages ↔ the client's Python values (one place for every field)."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

from ._pb import s3net_pb2 as pb
from .errors import status_code
from .results import (
    AppliedOptions,
    BoundingBox,
    Cancelled,
    ClusterStats,
    Completed,
    Failed,
    Job,
    JobEvent,
    JobList,
    JobState,
    Losses,
    Progress,
    Queued,
    SegmentationResult,
    Started,
    Submitted,
    Timings,
    Window,
    decode_png,
)

#: The keyword options of segment/submit: the proto's Options fields.
OPTION_NAMES = (
    "preset",
    "iterations",
    "min_labels",
    "size",
    "seed",
    "device",
    "window",
    "priority",
    "features",
    "frame",
    "precision",
    "dicom_seg",
    "dicom_seg_clusters",
    "offset_lr",
)


def check_option_names(options: Mapping[str, Any]) -> None:
    """A misspelt option is a TypeError, as for any unknown keyword argument."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}"
        )


def options_to_pb(options: Mapping[str, Any]) -> pb.Options:
    """Builds the request's Options; unset (None) options take the server's preset values.

    Ranges are the server's to check (it names the offending option); this only rejects
    what cannot be encoded at all.
    """
    check_option_names(options)
    msg = pb.Options()
    for name, value in options.items():
        if value is None:
            continue
        if name == "window":
            center, width = window_tuple(value)
            msg.window.center = center
            msg.window.width = width
            continue
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"option {name}={value!r} is invalid: {e}") from None
    return msg


def window_tuple(value: Any) -> tuple:
    """(center, width) from a Window, a mapping with those keys, or a 2-sequence."""
    if isinstance(value, Window):
        return float(value.center), float(value.width)
    if isinstance(value, Mapping):
        return float(value["center"]), float(value["width"])
    try:
        center, width = value
        return float(center), float(width)
    except (TypeError, ValueError):
        raise ValueError(
            f"window must be (center, width), a Window or a dict, got {value!r}"
        ) from None


def _losses(m: pb.LossTerms) -> Losses:
    return Losses(total=m.total, ce=m.ce, affine=m.affine, spatial=m.spatial)


def _window(m: pb.Window) -> Optional[Window]:
    return Window(center=m.center, width=m.width) if m.width > 0 else None


def result_from_pb(job_id: str, r: pb.SegmentationResult) -> SegmentationResult:
    o = r.options
    try:
        everything: Dict[str, Any] = json.loads(o.options_json) if o.options_json else {}
    except ValueError:
        everything = {}
    return SegmentationResult(
        job_id=job_id,
        labels=decode_png(r.labels_png),
        mask=decode_png(r.mask_png) > 0,
        labels_png=r.labels_png,
        mask_png=r.mask_png,
        width=r.width,
        height=r.height,
        labels_used=r.labels_used,
        clusters=[
            ClusterStats(
                label=c.label,
                pixel_count=c.pixel_count,
                bbox=BoundingBox(c.bbox.x, c.bbox.y, c.bbox.width, c.bbox.height),
                mean_intensity=c.mean_intensity,
            )
            for c in r.clusters
        ],
        iterations=r.iterations,
        losses=_losses(r.losses),
        timings=Timings(
            queued_seconds=r.timings.queued_seconds,
            fit_seconds=r.timings.fit_seconds,
            total_seconds=r.timings.total_seconds,
        ),
        options=AppliedOptions(
            preset=o.preset,
            iterations=o.iterations,
            min_labels=o.min_labels,
            size=o.size,
            seed=o.seed,
            features=o.features,
            device=o.device,
            window=_window(o.window) if o.HasField("window") else None,
            priority=o.priority,
            all=everything,
            # 0 from a server older than the field: it applied no orientation.
            orientation=o.orientation or 1,
            window_function=o.window_function,
        ),
        device=r.device,
        foreground_fraction=r.foreground_fraction,
        pixel_spacing=(
            (r.pixel_spacing.row_mm, r.pixel_spacing.column_mm)
            if r.HasField("pixel_spacing")
            else None
        ),
        foreground_area_mm2=(
            r.foreground_area_mm2 if r.HasField("foreground_area_mm2") else None
        ),
        refits=r.refits,
        frames=max(r.frames, 1),
        mask_dicom=r.mask_dicom,
        labels_dicom=r.labels_dicom,
    )


def _progress(job_id: str, p: pb.Progress) -> Progress:
    return Progress(
        job_id=job_id,
        iteration=p.iteration,
        max_iterations=p.max_iterations,
        losses=_losses(p.losses),
        labels=p.labels,
        elapsed_seconds=p.elapsed_seconds,
        attempt=max(p.attempt, 1),
    )


def event_from_pb(ev: pb.JobEvent) -> Optional[JobEvent]:
    """The event, or None for an event kind this client does not know (a newer server)."""
    kind = ev.WhichOneof("event")
    j = ev.job_id
    if kind == "queued":
        return Queued(job_id=j, position=ev.queued.position)
    if kind == "started":
        return Started(job_id=j, worker=ev.started.worker, device=ev.started.device)
    if kind == "progress":
        return _progress(j, ev.progress)
    if kind == "completed":
        return Completed(job_id=j, result=result_from_pb(j, ev.completed.result))
    if kind == "failed":
        return Failed(job_id=j, code=status_code(ev.failed.code), message=ev.failed.message)
    if kind == "cancelled":
        return Cancelled(job_id=j, reason=ev.cancelled.reason, retryable=ev.cancelled.retryable)
    return None


def job_list_from_pb(m: pb.ListJobsResponse) -> JobList:
    jobs = JobList(job_from_pb(j) for j in m.jobs)
    jobs.unreachable_replicas = tuple(m.unreachable_replicas)
    return jobs


def job_from_pb(m: pb.Job) -> Job:
    j = m.job_id
    return Job(
        job_id=j,
        state=state_from_pb(m.state),
        queue_position=m.queue_position,
        # ListJobs sends the result without its images: leave it to get().
        result=result_from_pb(j, m.result) if m.result.labels_png else None,
        failure=(
            Failed(job_id=j, code=status_code(m.failure.code), message=m.failure.message)
            if m.HasField("failure")
            else None
        ),
        cancellation=(
            Cancelled(job_id=j, reason=m.cancellation.reason, retryable=m.cancellation.retryable)
            if m.HasField("cancellation")
            else None
        ),
        submitted_at=m.submitted_at,
        started_at=m.started_at,
        finished_at=m.finished_at,
        width=m.width,
        height=m.height,
        progress=_progress(j, m.progress) if m.HasField("progress") else None,
        caller=m.caller,
    )


def submitted_from_pb(m: pb.SubmitJobResponse, request: Optional[pb.SubmitJobRequest] = None) -> Submitted:
    return Submitted(
        job_id=m.job_id,
        existing=m.existing,
        state=state_from_pb(m.state),
        queue_position=m.queue_position,
        request=request,
    )


def state_from_pb(value: int) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        return JobState.UNSPECIFIED


def state_to_pb(state: Any) -> int:
    """JobState, its name ("queued", "QUEUED") or number → the proto enum value."""
    if state is None:
        return 0
    if isinstance(state, str):
        try:
            return int(JobState[state.upper().removeprefix("JOB_STATE_")])
        except KeyError:
            names = ", ".join(s.name.lower() for s in JobState if s)
            raise ValueError(f"unknown job state {state!r}; one of {names}") from None
    return int(JobState(state))

"""Plain Python values for what the service returns: results, jobs and job events.

The protobuf messages stay inside the client; callers get frozen dataclasses with numpy
arrays, so a result can be kept, compared and pickled without the generated code.
"""

from __future__ import annotations

import enum
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import grpc
import numpy as np

from .errors import Cancelled as _CancelledError
from .errors import S3NetError, make_error

__all__ = [
    "Window",
    "Losses",
    "Timings",
    "BoundingBox",
    "ClusterStats",
    "AppliedOptions",
    "SegmentationResult",
    "JobState",
    "Job",
    "Submitted",
    "JobEvent",
    "Queued",
    "Started",
    "Progress",
    "Completed",
    "Failed",
    "Cancelled",
]


@dataclass(frozen=True)
class Window:
    """A linear display window in the image's native units (HU for CT)."""

    center: float
    width: float


@dataclass(frozen=True)
class Losses:
    """The weighted loss terms of one step; ``total = ce + affine + spatial``."""

    total: float
    ce: float
    affine: float
    spatial: float


@dataclass(frozen=True)
class Timings:
    queued_seconds: float
    fit_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class BoundingBox:
    """Columns ``x .. x+width`` and rows ``y .. y+height`` (end exclusive)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class ClusterStats:
    label: int
    pixel_count: int
    bbox: BoundingBox
    #: Mean of the normalised input (0..1) over the cluster's pixels.
    mean_intensity: float


@dataclass(frozen=True)
class AppliedOptions:
    """The options the fit actually used (request values, else the preset's)."""

    preset: str
    iterations: int
    min_labels: int
    size: int
    seed: int
    features: int
    device: str
    #: The window applied (request or DICOM file), None when none was.
    window: Optional[Window]
    priority: int
    #: Every fit option, tuning knobs included, as `s3net segment` records them.
    all: Dict[str, Any] = field(default_factory=dict)
    #: The EXIF orientation (1-8) the file carried and the server applied before the fit, as
    #: viewers do: labels and mask are the image as displayed (for 5-8 its stored pixels turned
    #: by a quarter, width and height swapped; Pillow's ``ImageOps.exif_transpose`` gives the
    #: same picture). 1: none.
    orientation: int = 1
    #: How ``window`` mapped values to grey: ``"LINEAR"`` (always for a window you gave), or for
    #: a DICOM file's own window ``"SIGMOID"`` (its VOI LUT Function) or ``"TABLE"`` (its VOI
    #: LUT Sequence's curve over the window's range). ``""`` when no window was applied.
    window_function: str = ""


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """One finished segmentation, at the input image's own resolution.

    ``labels`` is an H×W integer array (uint8, or uint16 beyond 255 clusters) with clusters
    numbered by decreasing pixel count; ``mask`` is the H×W boolean foreground mask. The PNGs
    they were decoded from are kept in ``labels_png`` and ``mask_png``.
    """

    job_id: str
    labels: np.ndarray
    mask: np.ndarray
    labels_png: bytes
    mask_png: bytes
    width: int
    height: int
    labels_used: int
    clusters: List[ClusterStats]
    iterations: int
    losses: Losses
    timings: Timings
    options: AppliedOptions
    device: str
    foreground_fraction: float
    #: The file's pixel spacing in mm, (between rows, between columns), when it gives one (a
    #: DICOM's Pixel Spacing); None otherwise.
    pixel_spacing: Optional[Tuple[float, float]] = None
    #: The foreground mask's area in mm² (its pixels times both spacings), with pixel_spacing.
    foreground_area_mm2: Optional[float] = None
    #: How many times the fit was made again with another seed because its foreground came
    #: out empty (the server's ``workers.foreground_refits``); 0 for most images.
    refits: int = 0
    #: Frames of the input (a multi-frame DICOM's, a TIFF's pages; 1 for other formats); this
    #: result is of the one the ``frame`` option named. A client segmenting every frame asks
    #: for the others next (``s3net-client segment --all-frames``).
    frames: int = 1
    #: With the option ``dicom_seg=True``: the mask as a DICOM Segmentation (a Part 10 file, in
    #: a new series of the source's study, referencing the source image) for a PACS; b"" else.
    mask_dicom: bytes = b""
    #: With ``dicom_seg_clusters=True``: the cluster map as a DICOM Segmentation, one segment
    #: per cluster, in a series of its own beside ``mask_dicom``'s; b"" else.
    labels_dicom: bytes = b""

    def to_dict(self) -> Dict[str, Any]:
        """The report `s3net segment` writes as STEM.json (everything but the images)."""
        return {
            "width": self.width,
            "height": self.height,
            "orientation": self.options.orientation,
            "window": (
                {
                    "center": self.options.window.center,
                    "width": self.options.window.width,
                    "function": self.options.window_function,
                }
                if self.options.window
                else None
            ),
            "pixel_spacing_mm": list(self.pixel_spacing) if self.pixel_spacing else None,
            "foreground_area_mm2": self.foreground_area_mm2,
            "labels_used": self.labels_used,
            "iterations": self.iterations,
            "losses": vars(self.losses).copy(),
            "fit_seconds": self.timings.fit_seconds,
            "device": self.device,
            "refits": self.refits,
            "frames": self.frames,
            "foreground_fraction": self.foreground_fraction,
            "options": self.options.all or None,
            "clusters": [
                {
                    "label": c.label,
                    "pixels": c.pixel_count,
                    "bbox": [c.bbox.x, c.bbox.y, c.bbox.width, c.bbox.height],
                    "mean_intensity": c.mean_intensity,
                }
                for c in self.clusters
            ],
            "timings": vars(self.timings).copy(),
        }

    def save(self, out_dir: Union[str, Path], stem: str) -> Tuple[Path, Path, Path]:
        """Writes STEM.labels.png, STEM.mask.png and STEM.json into ``out_dir`` (created if
        missing), the same three files as ``s3net segment``, and STEM.seg.dcm and
        STEM.labels.seg.dcm when the result has those DICOM Segmentations (``mask_dicom``,
        ``labels_dicom``); returns the three files' paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels, mask, report = (
            out / f"{stem}.labels.png",
            out / f"{stem}.mask.png",
            out / f"{stem}.json",
        )
        labels.write_bytes(self.labels_png)
        mask.write_bytes(self.mask_png)
        if self.mask_dicom:
            (out / f"{stem}.seg.dcm").write_bytes(self.mask_dicom)
        if self.labels_dicom:
            (out / f"{stem}.labels.seg.dcm").write_bytes(self.labels_dicom)
        report.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return labels, mask, report


class JobState(enum.IntEnum):
    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class Submitted:
    """What ``submit`` returns: the job id and where the job stands.

    Passed to ``wait`` instead of its id, it lets ``wait`` send the submission again when the
    job's server shuts down before the job ends (``Cancelled.retryable``), as ``segment`` does:
    it keeps the submission (the image's bytes) for that, unless ``submit`` was told
    ``resubmit=False``."""

    job_id: str
    #: True when an idempotency key matched an existing job.
    existing: bool
    state: JobState
    queue_position: int
    #: The submission, for ``wait`` to send again; None when not kept.
    request: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class JobEvent:
    """One event of a job; a stream of them ends with Completed, Failed or Cancelled."""

    job_id: str


@dataclass(frozen=True)
class Queued(JobEvent):
    #: 0-based position in the queue (0 = next to run).
    position: int


@dataclass(frozen=True)
class Started(JobEvent):
    worker: str
    device: str


@dataclass(frozen=True)
class Progress(JobEvent):
    #: 1-based step just finished.
    iteration: int
    max_iterations: int
    losses: Losses
    #: Clusters in use after this step.
    labels: int
    #: Seconds since this attempt began.
    elapsed_seconds: float
    #: 1 for the job's first start; one more each time it started over: because the batch of
    #: jobs it trained in failed (e.g. out of GPU memory), or because its foreground came out
    #: empty and it is fitted again with another seed. ``iteration`` counts from 1 again.
    attempt: int = 1


@dataclass(frozen=True, eq=False)
class Completed(JobEvent):
    result: SegmentationResult


@dataclass(frozen=True)
class Failed(JobEvent):
    code: grpc.StatusCode
    message: str

    def error(self) -> S3NetError:
        """The exception a segment call raises for this failure."""
        return make_error(self.code, self.message, job_id=self.job_id)


@dataclass(frozen=True)
class Cancelled(JobEvent):
    #: "cancelled by CancelJob", "client disconnected", "deadline exceeded", …
    reason: str
    #: True when the server cancelled the job itself because it was shutting down: the same
    #: request may be sent again (``segment`` does so by itself).
    retryable: bool = False

    def error(self) -> S3NetError:
        e = _CancelledError(self.reason, job_id=self.job_id)
        e.retryable = self.retryable
        return e


@dataclass(frozen=True, eq=False)
class Job:
    """A job as GetJob and ListJobs report it (ListJobs leaves ``result`` out)."""

    job_id: str
    state: JobState
    queue_position: int
    result: Optional[SegmentationResult]
    #: Set when the job failed.
    failure: Optional[Failed]
    #: Set when the job was cancelled.
    cancellation: Optional[Cancelled]
    #: Seconds since the Unix epoch; 0 when not reached yet.
    submitted_at: float
    started_at: float
    finished_at: float
    width: int
    height: int
    progress: Optional[Progress]
    #: The caller that submitted it: its name in the server's ``[server.callers]``,
    #: ``"service"`` for ``server.auth_token``, empty on a server without tokens.
    caller: str = ""


class JobList(List[Job]):
    """The jobs ListJobs reported (newest first), a plain list; ``unreachable_replicas`` names
    the replicas of a clustered service that did not answer, whose jobs are missing."""

    unreachable_replicas: Tuple[str, ...] = ()


def decode_png(data: bytes) -> np.ndarray:
    """A grey PNG as a 2-D array (uint8, or uint16 for 16-bit files)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img).astype(np.uint16)
        return np.asarray(img.convert("L")) if img.mode != "L" else np.asarray(img)

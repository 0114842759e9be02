from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Options(_message.Message):
    __slots__ = ("preset", "iterations", "min_labels", "size", "seed", "device", "window", "priority", "features", "frame", "precision", "dicom_seg", "dicom_seg_clusters", "offset_lr")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_LR_FIELD_NUMBER: _ClassVar[int]
    preset: str
    iterations: int
    min_labels: int
    size: int
    seed: int
    device: str
    window: Window
    priority: int
    features: int
    frame: int
    precision: str
    dicom_seg: bool
    dicom_seg_clusters: bool
    offset_lr: float
    def __init__(self, preset: _Optional[str] = ..., iterations: _Optional[int] = ..., min_labels: _Optional[int] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., priority: _Optional[int] = ..., features: _Optional[int] = ..., frame: _Optional[int] = ..., precision: _Optional[str] = ..., dicom_seg: _Optional[bool] = ..., dicom_seg_clusters: _Optional[bool] = ..., offset_lr: _Optional[float] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("center", "width")
    CENTER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    center: float
    width: float
    def __init__(self, center: _Optional[float] = ..., width: _Optional[float] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: Options
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("options", "total_bytes")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    options: Options
    total_bytes: int
    def __init__(self, options: _Optional[_Union[Options, _Mapping]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("image", "options", "idempotency_key")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    options: Options
    idempotency_key: str
    def __init__(self, image: _Optional[bytes] = ..., options: _Optional[_Union[Options, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "existing", "state", "queue_position")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    existing: bool
    state: JobState
    queue_position: int
    def __init__(self, job_id: _Optional[str] = ..., existing: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    limit: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "unreachable_replicas")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    unreachable_replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., unreachable_replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "queue_position", "result", "failure", "cancellation", "submitted_at", "started_at", "finished_at", "width", "height", "progress", "caller")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    CANCELLATION_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    queue_position: int
    result: SegmentationResult
    failure: Failed
    cancellation: Cancelled
    submitted_at: float
    started_at: float
    finished_at: float
    width: int
    height: int
    progress: Progress
    caller: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ..., result: _Optional[_Union[SegmentationResult, _Mapping]] = ..., failure: _Optional[_Union[Failed, _Mapping]] = ..., cancellation: _Optional[_Union[Cancelled, _Mapping]] = ..., submitted_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., caller: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "queued", "started", "progress", "completed", "failed", "cancelled")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queued: Queued
    started: Started
    progress: Progress
    completed: Completed
    failed: Failed
    cancelled: Cancelled
    def __init__(self, job_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., failed: _Optional[_Union[Failed, _Mapping]] = ..., cancelled: _Optional[_Union[Cancelled, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("worker", "device")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    worker: str
    device: str
    def __init__(self, worker: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "max_iterations", "losses", "labels", "elapsed_seconds", "attempt")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    max_iterations: int
    losses: LossTerms
    labels: int
    elapsed_seconds: float
    attempt: int
    def __init__(self, iteration: _Optional[int] = ..., max_iterations: _Optional[int] = ..., losses: _Optional[_Union[LossTerms, _Mapping]] = ..., labels: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., attempt: _Optional[int] = ...) -> None: ...

class LossTerms(_message.Message):
    __slots__ = ("total", "ce", "affine", "spatial")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_FIELD_NUMBER: _ClassVar[int]
    total: float
    ce: float
    affine: float
    spatial: float
    def __init__(self, total: _Optional[float] = ..., ce: _Optional[float] = ..., affine: _Optional[float] = ..., spatial: _Optional[float] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: SegmentationResult
    def __init__(self, result: _Optional[_Union[SegmentationResult, _Mapping]] = ...) -> None: ...

class Failed(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Cancelled(_message.Message):
    __slots__ = ("reason", "retryable")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    retryable: bool
    def __init__(self, reason: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class SegmentationResult(_message.Message):
    __slots__ = ("labels_png", "mask_png", "width", "height", "labels_used", "clusters", "iterations", "losses", "timings", "options", "device", "foreground_fraction", "pixel_spacing", "foreground_area_mm2", "refits", "mask_dicom", "labels_dicom", "frames")
    LABELS_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_USED_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SPACING_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    REFITS_FIELD_NUMBER: _ClassVar[int]
    MASK_DICOM_FIELD_NUMBER: _ClassVar[int]
    LABELS_DICOM_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    labels_png: bytes
    mask_png: bytes
    width: int
    height: int
    labels_used: int
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterStats]
    iterations: int
    losses: LossTerms
    timings: Timings
    options: AppliedOptions
    device: str
    foreground_fraction: float
    pixel_spacing: PixelSpacing
    foreground_area_mm2: float
    refits: int
    mask_dicom: bytes
    labels_dicom: bytes
    frames: int
    def __init__(self, labels_png: _Optional[bytes] = ..., mask_png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., labels_used: _Optional[int] = ..., clusters: _Optional[_Iterable[_Union[ClusterStats, _Mapping]]] = ..., iterations: _Optional[int] = ..., losses: _Optional[_Union[LossTerms, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., options: _Optional[_Union[AppliedOptions, _Mapping]] = ..., device: _Optional[str] = ..., foreground_fraction: _Optional[float] = ..., pixel_spacing: _Optional[_Union[PixelSpacing, _Mapping]] = ..., foreground_area_mm2: _Optional[float] = ..., refits: _Optional[int] = ..., mask_dicom: _Optional[bytes] = ..., labels_dicom: _Optional[bytes] = ..., frames: _Optional[int] = ...) -> None: ...

class PixelSpacing(_message.Message):
    __slots__ = ("row_mm", "column_mm")
    ROW_MM_FIELD_NUMBER: _ClassVar[int]
    COLUMN_MM_FIELD_NUMBER: _ClassVar[int]
    row_mm: float
    column_mm: float
    def __init__(self, row_mm: _Optional[float] = ..., column_mm: _Optional[float] = ...) -> None: ...

class ClusterStats(_message.Message):
    __slots__ = ("label", "pixel_count", "bbox", "mean_intensity")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    MEAN_INTENSITY_FIELD_NUMBER: _ClassVar[int]
    label: int
    pixel_count: int
    bbox: BoundingBox
    mean_intensity: float
    def __init__(self, label: _Optional[int] = ..., pixel_count: _Optional[int] = ..., bbox: _Optional[_Union[BoundingBox, _Mapping]] = ..., mean_intensity: _Optional[float] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_seconds", "fit_seconds", "total_seconds")
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queued_seconds: float
    fit_seconds: float
    total_seconds: float
    def __init__(self, queued_seconds: _Optional[float] = ..., fit_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class AppliedOptions(_message.Message):
    __slots__ = ("preset", "iterations", "min_labels", "size", "seed", "features", "device", "window", "priority", "options_json", "orientation", "window_function")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    ORIENTATION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    preset: str
    iterations: int
    min_labels: int
    size: int
    seed: int
    features: int
    device: str
    window: Window
    priority: int
    options_json: str
    orientation: int
    window_function: str
    def __init__(self, preset: _Optional[str] = ..., iterations: _Optional[int] = ..., min_labels: _Optional[int] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., features: _Optional[int] = ..., device: _Optional[str] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., priority: _Optional[int] = ..., options_json: _Optional[str] = ..., orientation: _Optional[int] = ..., window_function: _Optional[str] = ...) -> None: ...

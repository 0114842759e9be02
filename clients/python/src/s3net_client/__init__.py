"""Python client of the s3net segmentation service (``proto/s3net/v1/s3net.proto``).

    from s3net_client import Client

    with Client("localhost:50051") as client:
        result = client.segment("scan.png", iterations=20, progress=True)
    result.labels, result.mask          # numpy arrays at the image's own size

``Client`` blocks; ``AsyncClient`` is the same API for asyncio. Failures are ``S3NetError``
subclasses named after the gRPC code (``InvalidArgument``, ``NotFound``, …).
"""

from . import events
from .aio import AsyncClient
from .client import Client
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    S3NetError,
    Unauthenticated,
    Unavailable,
)
from .images import encode_png, encode_tiff
from .results import (
    AppliedOptions,
    BoundingBox,
    ClusterStats,
    Job,
    JobEvent,
    JobList,
    JobState,
    Losses,
    SegmentationResult,
    Submitted,
    Timings,
    Window,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "S3NetError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "ResourceExhausted",
    "Unavailable",
    "Cancelled",
    "DeadlineExceeded",
    "Internal",
    "Unauthenticated",
    "PermissionDenied",
    "OutOfRange",
    "Aborted",
    "SegmentationResult",
    "ClusterStats",
    "BoundingBox",
    "Losses",
    "Timings",
    "AppliedOptions",
    "Window",
    "Job",
    "JobList",
    "JobState",
    "JobEvent",
    "Submitted",
    "events",
    "encode_png",
    "encode_tiff",
]

"""Every failure of a call as one exception type, carrying the gRPC status code and message.

The server already says precisely what went wrong ("the image is empty", "queue is full …;
retry in about 3 s", "unknown job …"), so these exceptions keep its words and add only what a
program needs to branch on: the code, as a subclass and as ``.code``, and the retry hint.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import grpc

__all__ = [
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
]


class S3NetError(Exception):
    """A call failed: ``code`` is the gRPC status code, ``details`` the server's message.

    ``retry_after`` is the server's hint in seconds (``retry-after`` metadata, sent with
    RESOURCE_EXHAUSTED), or None. ``max_message_bytes`` is the largest message the server
    takes (``max-message-bytes`` metadata, sent when a message was longer), or None.
    ``job_id`` is set when the failure belongs to a known job (a Failed or Cancelled event).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        retry_after: Optional[float] = None,
        job_id: Optional[str] = None,
        max_message_bytes: Optional[int] = None,
    ) -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details = details
        self.retry_after = retry_after
        self.job_id = job_id
        self.max_message_bytes = max_message_bytes

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.details!r}, code={self.code.name})"


class InvalidArgument(S3NetError):
    """The image cannot be decoded or an option is out of range; the message says which."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(S3NetError):
    """Unknown job id, or a finished job whose result has expired."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(S3NetError):
    """An idempotency key was reused with a different image or options."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(S3NetError):
    """The queue is full (by job count, or by the memory of its decoded images), or the caller
    has as many jobs queued and running as the server lets it (``[server.callers]``'s
    ``max_active_jobs``): ``retry_after`` says when to try again (retried automatically); or,
    as a job's Failed event, the job ran out of memory on its own device (not retried: ask for
    a smaller ``size`` or fewer ``features``, or try again when the server is less busy)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(S3NetError):
    """The server cannot be reached or is draining (retried automatically)."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(S3NetError):
    """The job was cancelled (CancelJob, shutdown, …); ``details`` gives the reason.

    ``retryable`` is True when the server cancelled the job itself because it was shutting
    down: the same request may be sent again (``segment`` does so by itself, within its
    retries and deadline, and so does ``wait`` given what ``submit`` returned; ``wait`` given
    only a job id raises it, for its caller to submit again)."""

    code = grpc.StatusCode.CANCELLED
    retryable = False


class DeadlineExceeded(S3NetError):
    """The call's timeout passed; the server cancels the job of a segment call."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(S3NetError):
    """The fit diverged (a loss became NaN or infinite); another seed may fit."""

    code = grpc.StatusCode.ABORTED


class Internal(S3NetError):
    """The fit failed inside the server (e.g. a CUDA kernel failure); the server carries on."""

    code = grpc.StatusCode.INTERNAL


class Unauthenticated(S3NetError):
    """The server requires a bearer token and the call carried none or a wrong one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(S3NetError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRange(S3NetError):
    """A message is larger than a service accepts: tonic's own check, which the server keeps
    for health checks and reflection (4 KiB). An image message too large for the Segmenter is
    :class:`InvalidArgument` with ``max_message_bytes`` set instead (``segment()`` then sends
    it with SegmentUpload by itself)."""

    code = grpc.StatusCode.OUT_OF_RANGE


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        Unavailable,
        Cancelled,
        DeadlineExceeded,
        Aborted,
        Internal,
        Unauthenticated,
        PermissionDenied,
        OutOfRange,
    )
}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (as in a Failed event)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def make_error(
    code: grpc.StatusCode,
    details: str,
    *,
    retry_after: Optional[float] = None,
    job_id: Optional[str] = None,
    max_message_bytes: Optional[int] = None,
) -> S3NetError:
    """The exception for a status: the code's subclass, or S3NetError for the others."""
    cls = _BY_CODE.get(code, S3NetError)
    return cls(
        details,
        code=code,
        retry_after=retry_after,
        job_id=job_id,
        max_message_bytes=max_message_bytes,
    )


def _number(metadata: Optional[Iterable[Tuple[str, object]]], name: str) -> Optional[float]:
    """The value of metadata key ``name`` as a non-negative number, or None."""
    for key, value in metadata or ():
        if key.lower() == name:
            try:
                text = value.decode() if isinstance(value, bytes) else str(value)
                return max(0.0, float(text))
            except ValueError:
                return None
    return None


def from_rpc_error(e: grpc.RpcError) -> S3NetError:
    """Converts the error of a sync or asyncio gRPC call."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    try:
        trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    except Exception:  # a call that never reached the server may have none
        trailing = None
    limit = _number(trailing, "max-message-bytes")
    return make_error(
        code or grpc.StatusCode.UNKNOWN,
        details,
        retry_after=_number(trailing, "retry-after"),
        max_message_bytes=int(limit) if limit else None,
    )

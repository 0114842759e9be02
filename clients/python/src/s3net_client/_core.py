"""What the sync and asyncio clients share: connection settings, requests, the retry policy
and the handling of a job's event stream. Only the waiting differs between the two."""

from __future__ import annotations

import collections
import os
import random
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Generic, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import grpc

from . import _convert
from ._pb import s3net_pb2 as pb
from .errors import S3NetError, Unavailable
from .images import prepare
from .results import (
    Cancelled,
    Completed,
    Failed,
    JobEvent,
    Progress,
    Queued,
    SegmentationResult,
    Started,
)

PemSource = Union[str, "os.PathLike[str]", bytes, None]
ProgressArg = Union[bool, Callable[[JobEvent], Any], None]

#: Codes after which nothing happened on the server, so the call can simply be made again.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Larger than the server's own 64 MiB default so the server's limit is the one that speaks.
_MAX_MESSAGE = 256 << 20


class _Unset:
    def __repr__(self) -> str:
        return "<client default>"


#: Marks a per-call argument that was not given (``timeout=None`` means "no deadline").
UNSET: Any = _Unset()


def _pem(source: PemSource, what: str) -> Optional[bytes]:
    if source is None or isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


class TokenFile:
    """A bearer token kept in a file that is replaced under a running client (a mounted
    Kubernetes Secret, a file a secrets agent rewrites): read again whenever the file changed,
    so that a rotated token is sent from the next call on without a restart.

    The file holds one token (surrounding whitespace and blank lines left out). One that cannot
    be read at construction is a ``ValueError`` naming the path; one that cannot be read later
    (mid-rotation) leaves the last token in use, with a warning, rather than failing calls.
    The token never appears in an error or a warning.
    """

    _MAX = 64 << 10

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        try:
            self._stamp = self._stat()
        except OSError as e:
            raise ValueError(f"token file {self.path}: cannot read it ({e.strerror or e})") from None
        self._token = self._read()
        self._warned: Optional[str] = None

    def _stat(self) -> Tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                data = f.read(self._MAX + 1)
        except OSError as e:
            raise ValueError(f"token file {self.path}: cannot read it ({e.strerror or e})") from None
        if len(data) > self._MAX:
            raise ValueError(f"token file {self.path}: more than {self._MAX} bytes, not a token")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"token file {self.path}: not UTF-8 text") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"token file {self.path}: empty")
        if len(lines) > 1:
            raise ValueError(f"token file {self.path}: {len(lines)} lines, a client sends one token")
        return lines[0]

    def token(self) -> str:
        """The token, read again if the file changed since the last read."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._token, self._stamp = self._read(), stamp
                    self._warned = None
            except (OSError, ValueError) as e:
                why = str(e) if isinstance(e, ValueError) else f"token file {self.path}: cannot read it ({e.strerror or e})"
                if why != self._warned:
                    warnings.warn(f"{why}; sending the token read before", RuntimeWarning, stacklevel=3)
                    self._warned = why
            return self._token


def bearer_args(
    token: Optional[str], token_file: Optional[str], environ: Optional[Dict[str, str]] = None
) -> Dict[str, Optional[str]]:
    """The ``token=``/``token_file=`` of a command line's ``--token``/``--token-file``, else of
    ``$S3NET_TOKEN``/``$S3NET_TOKEN_FILE``; a ``ValueError`` when one level gives both."""
    env = os.environ if environ is None else environ
    if token is None and token_file is None:
        token, token_file = env.get("S3NET_TOKEN") or None, env.get("S3NET_TOKEN_FILE") or None
        if token is not None and token_file is not None:
            raise ValueError("S3NET_TOKEN and S3NET_TOKEN_FILE are both set: give the token one way")
    elif token is not None and token_file is not None:
        raise ValueError("--token and --token-file: give the token one way")
    return {"token": token, "token_file": token_file}


@dataclass
class Settings:
    """Everything a client is constructed with, checked once."""

    target: str
    tls: bool
    credentials: Optional[grpc.ChannelCredentials]
    channel_options: List[Tuple[str, Any]]
    fixed_metadata: Tuple[Tuple[str, str], ...]
    timeout: Optional[float]
    retries: int
    backoff: float
    max_backoff: float
    upload_threshold: int
    chunk_size: int
    token_file: Optional[TokenFile] = None

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """The metadata of every call: the bearer token, from its file as it is now."""
        if self.token_file is not None:
            return (("authorization", f"Bearer {self.token_file.token()}"),)
        return self.fixed_metadata

    @classmethod
    def build(
        cls,
        target: str,
        *,
        token: Optional[str],
        tls: Optional[bool],
        ca: PemSource,
        cert: PemSource,
        key: PemSource,
        server_name: Optional[str],
        timeout: Optional[float],
        retries: int,
        backoff: float,
        max_backoff: float,
        upload_threshold: int,
        chunk_size: int,
        keepalive: Optional[float] = 30.0,
        keepalive_timeout: float = 20.0,
        load_balancing: Optional[str] = None,
        token_file: Union[str, "os.PathLike[str]", None] = None,
    ) -> "Settings":
        address = target
        scheme_tls = None
        for scheme, secure in (("https://", True), ("http://", False)):
            if address.startswith(scheme):
                address, scheme_tls = address[len(scheme) :], secure
        address = address.rstrip("/")
        if not address:
            raise ValueError(f"no server address in {target!r}")
        if (cert is None) != (key is None):
            raise ValueError("mutual TLS needs both cert= and key=")
        use_tls = bool(
            tls if tls is not None else (scheme_tls or ca is not None or cert is not None)
        )
        if tls is False and (ca is not None or cert is not None):
            raise ValueError("tls=False contradicts ca=/cert=/key=")
        credentials = None
        if use_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca, "CA bundle"),
                private_key=_pem(key, "client key"),
                certificate_chain=_pem(cert, "client certificate"),
            )
        options: List[Tuple[str, Any]] = [
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        scheme, _, addresses = address.partition(":")
        if scheme in ("ipv4", "ipv6") and "," in addresses:
            # gRPC would send the whole list as the call's :authority, which no HTTP/2 server
            # takes (the commas): name the first address instead.
            options.append(("grpc.default_authority", addresses.split(",")[0].lstrip("/")))
        if load_balancing is not None:
            if load_balancing not in ("round_robin", "pick_first"):
                raise ValueError(
                    f"load_balancing must be 'round_robin' or 'pick_first', got {load_balancing!r}"
                )
            options.append(("grpc.lb_policy_name", load_balancing))
        if keepalive is not None:
            if not keepalive > 0 or not keepalive_timeout > 0:
                raise ValueError("keepalive and keepalive_timeout must be > 0 (keepalive=None: off)")
            # Pings only while a call is open, and as many as it takes without data from the
            # server (a frozen server sends none): a ping left unanswered ends the call.
            options += [
                ("grpc.keepalive_time_ms", int(keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
            ]
        metadata: Tuple[Tuple[str, str], ...] = ()
        if token and token_file is not None:
            raise ValueError("give the token one way: token= or token_file=")
        if token:
            metadata = (("authorization", f"Bearer {token}"),)
        tokens = TokenFile(token_file) if token_file is not None else None
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        return cls(
            target=address,
            tls=use_tls,
            credentials=credentials,
            channel_options=options,
            fixed_metadata=metadata,
            token_file=tokens,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            upload_threshold=upload_threshold,
            chunk_size=chunk_size,
        )

    def deadline(self, timeout: Any) -> Optional[float]:
        """The call's absolute deadline (time.monotonic) covering all its attempts."""
        t = self.timeout if timeout is UNSET else timeout
        return None if t is None else time.monotonic() + t

    def retry_delay(
        self, attempt: int, err: S3NetError, deadline: Optional[float]
    ) -> Optional[float]:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        Exponential backoff with jitter, but never sooner than the server's ``retry-after``
        hint (the queue will not have room before then), and never past the deadline.
        """
        if err.code not in RETRYABLE or attempt >= self.retries:
            return None
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def remaining(deadline: Optional[float]) -> Optional[float]:
    """The time left for the next attempt (gRPC wants a relative timeout)."""
    if deadline is None:
        return None
    return max(0.001, deadline - time.monotonic())


@dataclass
class Upload:
    """A prepared segment/submit request: the image bytes and the options message."""

    image: bytes
    stem: Optional[str]
    options: pb.Options

    @classmethod
    def of(cls, image: Any, options: Dict[str, Any]) -> "Upload":
        _convert.check_option_names(options)
        data, stem, options = prepare(image, options)
        return cls(image=data, stem=stem, options=_convert.options_to_pb(options))

    def chunked(self, settings: Settings, upload: Optional[bool]) -> bool:
        return upload if upload is not None else len(self.image) > settings.upload_threshold

    def request(self) -> pb.SegmentRequest:
        return pb.SegmentRequest(image=self.image, options=self.options)

    def segment_call(self, stub: Any, settings: Settings) -> Callable[[Optional[float]], Any]:
        """Starts a Segment call of the image in one message, given the attempt's timeout
        (the same for the sync and the asyncio stub)."""
        request = self.request()
        return lambda timeout: stub.Segment(request, timeout=timeout, metadata=settings.metadata)

    def upload_call(
        self, stub: Any, settings: Settings, chunk_size: int
    ) -> Callable[[Optional[float]], Any]:
        """Starts a SegmentUpload call of the image in ``chunk_size`` pieces."""
        return lambda timeout: stub.SegmentUpload(
            self.chunks(chunk_size), timeout=timeout, metadata=settings.metadata
        )

    def fallback_chunk_size(
        self, err: S3NetError, settings: Settings, upload: Optional[bool]
    ) -> Optional[int]:
        """The chunk size to send the image again with SegmentUpload after the server refused
        its one message as longer than it takes (``err.max_message_bytes``), or None when
        that was another refusal or the caller forbade the upload (``upload=False``).

        Why: the client picks one message or chunks by ``upload_threshold`` alone, and a
        server may be configured to take smaller messages (``server.max_message_bytes``);
        a refused message queued nothing, so sending the image again runs no job twice.
        """
        if upload is not None or err.max_message_bytes is None:
            return None
        return max(1, min(settings.chunk_size, err.max_message_bytes // 2))

    def chunks(self, chunk_size: int) -> Iterator[pb.UploadChunk]:
        """The SegmentUpload stream: the header, then the bytes in chunk_size pieces."""
        yield pb.UploadChunk(
            header=pb.UploadHeader(options=self.options, total_bytes=len(self.image))
        )
        view = memoryview(self.image)
        for start in range(0, len(view), chunk_size):
            yield pb.UploadChunk(data=bytes(view[start : start + chunk_size]))


H = TypeVar("H")


class InOrder(Generic[H]):
    """The images of a ``segment_many``, up to ``concurrency`` of them started at once (``start``
    turns an image into a handle: a future, a task) and handed back in their own order, each
    image's turn topping the started ones up again. Shared by the blocking and asyncio clients,
    which differ only in how they wait for a handle."""

    def __init__(self, images: Iterable[Any], concurrency: int, start: Callable[[Any], H]) -> None:
        self.source = iter(images)
        self.concurrency = concurrency
        self.start = start
        self.pending: Deque[Tuple[Any, H]] = collections.deque()

    def next(self) -> Optional[Tuple[Any, H]]:
        """The next image in order with its handle, once the started ones are topped up; None
        when every image has been handed back."""
        while len(self.pending) < self.concurrency:
            image = next(self.source, _END)
            if image is _END:
                break
            self.pending.append((image, self.start(image)))
        return self.pending.popleft() if self.pending else None


_END = object()


def progress_bar(images: Iterable[Any]) -> Any:
    """One tqdm bar over ``images`` (of known length when it has one)."""
    from tqdm.auto import tqdm

    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    return tqdm(total=total, unit="image", desc="s3net", leave=True)


class Resubmit(Exception):
    """A Segment call's job was cancelled by its server shutting down (``Cancelled.retryable``):
    the caller sends the same request again, as it would retry one refused as UNAVAILABLE."""

    def __init__(self, error: S3NetError) -> None:
        super().__init__(str(error))
        self.error = error
        self.as_unavailable = Unavailable(f"job {error.job_id} cancelled: {error.details}")


class Follower:
    """Consumes one job's event stream: shows progress, returns the result, raises failures.

    With ``resubmit`` (a Segment call, which holds its image), a job its server cancelled
    because it was shutting down raises :class:`Resubmit` instead of the cancellation."""

    def __init__(self, progress: ProgressArg, label: Optional[str] = None, *, resubmit: bool = False) -> None:
        self.resubmit = resubmit
        #: Set when it raised Resubmit: the job is gone, the next call must make a new one.
        self.lost = False
        self.callback: Optional[Callable[[JobEvent], Any]] = None
        self.bar = None
        if callable(progress):
            self.callback = progress
        elif progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=None, unit="step", desc=label or "s3net", leave=True, file=sys.stderr
            )
        self.label = label
        self.events = 0

    def feed(self, message: pb.JobEvent) -> Optional[SegmentationResult]:
        """Handles one event; the result once Completed arrives; raises on Failed/Cancelled."""
        self.events += 1
        event = _convert.event_from_pb(message)
        if event is None:
            return None
        if self.bar is not None:
            self._show(event)
        if self.callback is not None:
            self.callback(event)
        if isinstance(event, Completed):
            self.close()
            return event.result
        if isinstance(event, Cancelled) and event.retryable and self.resubmit:
            self.events = 0  # the next call's job is a new one
            self.lost = True
            raise Resubmit(event.error())
        if isinstance(event, (Failed, Cancelled)):
            self.close()
            raise event.error()
        return None

    def _show(self, event: JobEvent) -> None:
        bar = self.bar
        name = self.label or event.job_id
        if isinstance(event, Queued):
            bar.set_description(f"{name} queued #{event.position}")
        elif isinstance(event, Started):
            bar.set_description(f"{name} on {event.device}")
        elif isinstance(event, Progress):
            if bar.total != event.max_iterations:
                bar.total = event.max_iterations
            bar.update(event.iteration - bar.n)
            bar.set_postfix(loss=f"{event.losses.total:.3f}", labels=event.labels)
        elif isinstance(event, Completed):
            r = event.result
            bar.total = bar.n = r.iterations
            bar.set_postfix(labels=r.labels_used, fit=f"{r.timings.fit_seconds:.2f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @staticmethod
    def no_outcome() -> S3NetError:
        return Unavailable("the event stream ended without an outcome")

"""The blocking client."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple, TypeVar, Union

import grpc

from . import _convert
from ._core import (
    UNSET,
    Follower,
    InOrder,
    PemSource,
    ProgressArg,
    Resubmit,
    Settings,
    Upload,
    progress_bar,
    remaining,
)
from ._pb import s3net_pb2 as pb
from ._pb.s3net_pb2_grpc import SegmenterStub
from .errors import InvalidArgument, from_rpc_error
from .images import ImageInput
from .results import Job, JobEvent, JobList, JobState, SegmentationResult, Submitted

#: What ``segment_many`` yields for each image: the image as given, and its result or the
#: exception its segmentation raised.
Outcome = Tuple[ImageInput, Union[SegmentationResult, Exception]]

T = TypeVar("T")


class Client:
    """A connection to an s3net server.

    ``target`` is ``host:port``; an ``https://`` prefix (or ``tls=True``, or any of ``ca``,
    ``cert``, ``key``) turns TLS on, with the system's roots unless ``ca`` (a PEM path or
    bytes) is given; ``cert`` and ``key`` add a client certificate for mutual TLS, and
    ``server_name`` overrides the name checked against the server's certificate. ``token``
    is sent as ``authorization: Bearer …`` on every call; ``token_file`` instead names a file
    holding it (one line), read again whenever the file changes, so that a token rotated
    there (a mounted Kubernetes Secret) is sent from the next call on.

    ``timeout`` is the default deadline of a call in seconds (None: none), covering its
    retries; every method takes its own ``timeout=`` too. Calls that fail with UNAVAILABLE or
    RESOURCE_EXHAUSTED before the server did anything are retried up to ``retries`` times,
    ``backoff`` seconds doubling up to ``max_backoff``, but never sooner than the server's
    ``retry-after`` hint. Images larger than ``upload_threshold`` bytes go through the
    chunked SegmentUpload call in ``chunk_size`` pieces. While a call runs, the connection is
    pinged every ``keepalive`` seconds (None: never); a server that does not answer within
    ``keepalive_timeout`` (a machine that froze or dropped off the network, sending no reset)
    fails the call with ``Unavailable`` instead of leaving it waiting for ever.

    ``load_balancing="round_robin"`` spreads the calls over every address ``target`` resolves
    to (several replicas behind one DNS name, e.g. ``dns:///s3net.s3net.svc.cluster.local:50051``
    for a headless Kubernetes Service) instead of gRPC's default, the first one that answers.
    ``watch``, ``get`` and ``cancel`` may then reach another replica than the one that took
    the job: servers with ``[cluster]`` configured forward them to it.

    One client is safe to share between threads; close it (or use ``with``) when done.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: Optional[str] = None,
        tls: Optional[bool] = None,
        ca: PemSource = None,
        cert: PemSource = None,
        key: PemSource = None,
        server_name: Optional[str] = None,
        timeout: Optional[float] = None,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        upload_threshold: int = 32 << 20,
        chunk_size: int = 1 << 20,
        keepalive: Optional[float] = 30.0,
        keepalive_timeout: float = 20.0,
        load_balancing: Optional[str] = None,
        token_file: Union[str, "os.PathLike[str]", None] = None,
    ) -> None:
        self._settings = s = Settings.build(
            target,
            token=token,
            tls=tls,
            ca=ca,
            cert=cert,
            key=key,
            server_name=server_name,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            upload_threshold=upload_threshold,
            chunk_size=chunk_size,
            keepalive=keepalive,
            keepalive_timeout=keepalive_timeout,
            load_balancing=load_balancing,
            token_file=token_file,
        )
        if s.credentials is not None:
            self._channel = grpc.secure_channel(s.target, s.credentials, options=s.channel_options)
        else:
            self._channel = grpc.insecure_channel(s.target, options=s.channel_options)
        self._stub = SegmenterStub(self._channel)

    def __repr__(self) -> str:
        return f"Client({self._settings.target!r}, tls={self._settings.tls})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- segmentation -------------------------------------------------------------------------

    def segment(
        self,
        image: ImageInput,
        *,
        progress: ProgressArg = False,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> SegmentationResult:
        """Segments one image and returns its result once the fit is done.

        ``image``: a file path (PNG, JPEG, BMP, TIFF, DICOM), the encoded bytes, or a numpy
        array (see ``s3net_client.images``). ``options``: the proto's Options fields —
        ``preset``, ``iterations``, ``min_labels``, ``size``, ``seed``, ``device``,
        ``window=(center, width)``, ``priority``, ``features``, ``frame``, ``precision``
        (``"float32"`` or ``"bfloat16"``), ``dicom_seg``, ``dicom_seg_clusters``,
        ``offset_lr``; unset ones take the server's preset values. ``progress=True`` shows a tqdm bar; a callable gets
        every JobEvent. ``upload`` forces (True) or forbids (False) the chunked upload.

        Raises S3NetError (InvalidArgument, ResourceExhausted, …) when the server refuses or
        the job fails. Interrupting the call (an exception, Ctrl-C, the deadline) cancels
        the job on the server.
        """
        up = Upload.of(image, options)
        s, stub = self._settings, self._stub
        deadline = s.deadline(timeout)
        if up.chunked(s, upload):
            start = up.upload_call(stub, s, s.chunk_size)
            return self._follow(start, Follower(progress, up.stem, resubmit=True), deadline)
        try:
            return self._follow(up.segment_call(stub, s), Follower(progress, up.stem, resubmit=True), deadline)
        except InvalidArgument as e:
            size = up.fallback_chunk_size(e, s, upload)
            if size is None:
                raise
            start = up.upload_call(stub, s, size)
            return self._follow(start, Follower(progress, up.stem, resubmit=True), deadline)

    def segment_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 8,
        progress: bool = False,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> Iterator[Outcome]:
        """Segments many images (a series' slices, a folder) with up to ``concurrency`` fits
        in flight at once, and yields ``(image, result)`` for each, in the order of ``images``.

        Why: one call at a time leaves all but one of the server's workers idle, and a GPU
        worker trains the jobs waiting together in one stack; keeping several in flight is
        what makes a series fast. An image that fails yields ``(image, error)`` (the exception
        ``segment`` would raise: an S3NetError, or e.g. FileNotFoundError for a missing path)
        and the others go on. ``images`` is read as the fits go (a generator of thousands of
        paths is fine); ``timeout`` applies to each image; ``progress=True`` shows one bar over
        the images. Leaving the loop early (break, an exception) cancels the fits in flight.
        """
        return self._in_flight(
            images,
            lambda image, stopped: self.segment(image, progress=stopped, timeout=timeout, upload=upload, **options),
            concurrency,
            progress,
        )

    def segment_frames(
        self,
        image: ImageInput,
        *,
        concurrency: int = 8,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> Iterator[Tuple[int, Union[SegmentationResult, Exception]]]:
        """Segments every frame of a multi-frame DICOM (every page of a TIFF), one fit each,
        and yields ``(frame, result)`` in frame order; a one-frame image yields one.

        Frame 0 goes first: its result says how many frames the file has (``frames``); the
        others follow with up to ``concurrency`` in flight, as in ``segment_many``. A frame that
        fails yields ``(frame, error)`` and the others go on; frame 0's error is raised (how
        many frames there are is then unknown). ``frame=`` is not an option here.
        """
        if "frame" in options:
            raise TypeError("segment_frames segments every frame; it takes no frame= option")
        first = self.segment(image, timeout=timeout, upload=upload, frame=0, **options)
        yield 0, first
        yield from self._in_flight(
            range(1, first.frames),
            lambda frame, stopped: self.segment(
                image, progress=stopped, timeout=timeout, upload=upload, frame=frame, **options
            ),
            concurrency,
            False,
        )

    def _in_flight(
        self,
        items: Iterable[Any],
        call: Callable[[Any, Callable[[JobEvent], None]], SegmentationResult],
        concurrency: int,
        progress: bool,
    ) -> Iterator[Tuple[Any, Union[SegmentationResult, Exception]]]:
        """``call(item, stopped)`` for each item on a pool of ``concurrency`` threads, yielded
        as ``(item, result or error)`` in the items' order; leaving the loop early cancels the
        fits in flight (``stopped`` is their progress callback, which ends them)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        stop = threading.Event()

        def stopped(_event: JobEvent) -> None:
            if stop.is_set():
                raise _Stopped()

        def one(item: Any) -> Union[SegmentationResult, Exception]:
            try:
                return call(item, stopped)
            except Exception as e:  # yielded with its item, for the caller to handle
                return e

        bar = progress_bar(items) if progress else None
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3net-segment")
        window: InOrder[Future] = InOrder(items, concurrency, lambda item: pool.submit(one, item))
        try:
            while (started := window.next()) is not None:
                item, future = started
                outcome = future.result()
                if bar is not None:
                    bar.update(1)
                yield item, outcome
        finally:
            # Fits still in flight stop at their next event (the job is cancelled); those
            # not started do not start.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()

    # -- asynchronous jobs ----------------------------------------------------------------

    def submit(
        self,
        image: ImageInput,
        *,
        idempotency_key: Optional[str] = None,
        resubmit: bool = True,
        timeout: Optional[float] = UNSET,
        **options: Any,
    ) -> Submitted:
        """Queues a job and returns its id at once; the job outlives this client.

        With ``idempotency_key``, submitting the same image and options again returns the
        same job (``existing=True``), which also makes retried submits safe.

        The returned ``Submitted`` keeps the submission (the image's bytes), so that
        ``wait(submitted)`` can send it again if the job's server shuts down before the job
        ends; ``resubmit=False`` keeps only the id (a caller holding many jobs' handles).
        """
        up = Upload.of(image, options)
        request = pb.SubmitJobRequest(
            image=up.image, options=up.options, idempotency_key=idempotency_key or ""
        )
        m = self._unary(self._stub.SubmitJob, request, timeout)
        return _convert.submitted_from_pb(m, request if resubmit else None)

    def watch(self, job_id: str, *, timeout: Optional[float] = UNSET) -> Iterator[JobEvent]:
        """Yields a job's events: its state so far, then live ones up to the outcome event
        (Completed, Failed or Cancelled). Stopping early does not cancel the job."""
        s = self._settings
        deadline = s.deadline(timeout)
        request = pb.WatchJobRequest(job_id=job_id)
        attempt = 0
        while True:
            call = self._stub.WatchJob(request, timeout=remaining(deadline), metadata=s.metadata)
            seen = 0
            try:
                for message in call:
                    seen += 1
                    event = _convert.event_from_pb(message)
                    if event is not None:
                        yield event
                return
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                delay = None if seen else s.retry_delay(attempt, err, deadline)
                if delay is None:
                    raise err from None
            finally:
                call.cancel()
            time.sleep(delay)
            attempt += 1

    def wait(
        self,
        job: Union[str, Submitted],
        *,
        progress: ProgressArg = False,
        timeout: Optional[float] = UNSET,
    ) -> SegmentationResult:
        """Follows a submitted job to its result, like ``segment`` does (raises on failure).

        Given what ``submit`` returned (not only its id), a job its server cancelled because it
        was shutting down (``Cancelled.retryable``) is submitted again, within this client's
        retries and the deadline, and the new job followed: the result's ``job_id`` is then
        the new one. Given an id, that cancellation is raised, for the caller to submit again.
        """
        s = self._settings
        again = job.request if isinstance(job, Submitted) else None
        current = [job if isinstance(job, str) else job.job_id]  # the job followed now
        follower = Follower(progress, current[0], resubmit=again is not None)

        def start(t: Optional[float]) -> Any:
            if follower.lost:
                follower.lost = False
                current[0] = self._unary(self._stub.SubmitJob, again, t).job_id
            return self._stub.WatchJob(pb.WatchJobRequest(job_id=current[0]), timeout=t, metadata=s.metadata)

        return self._follow(start, follower, s.deadline(timeout))

    def get(self, job_id: str, *, timeout: Optional[float] = UNSET) -> Job:
        """The job's state, with its result once completed (NotFound once it expired)."""
        m = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout)
        return _convert.job_from_pb(m)

    def cancel(self, job_id: str, *, timeout: Optional[float] = UNSET) -> JobState:
        """Cancels a queued job at once, a running one at its next step; returns the state
        (a finished job is left as it is)."""
        m = self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout)
        return _convert.state_from_pb(m.state)

    def list_jobs(
        self,
        state: Any = None,
        *,
        limit: int = 0,
        timeout: Optional[float] = UNSET,
    ) -> JobList:
        """Jobs the server knows (newest first, without result images), optionally only
        those in ``state`` (a JobState or its name); ``limit`` 0 means the server's 100."""
        request = pb.ListJobsRequest(state=_convert.state_to_pb(state), limit=limit)
        m = self._unary(self._stub.ListJobs, request, timeout)
        return _convert.job_list_from_pb(m)

    # -- plumbing -----------------------------------------------------------------------------

    def _unary(self, method: Callable[..., T], request: Any, timeout: Any) -> T:
        s = self._settings
        deadline = s.deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=remaining(deadline), metadata=s.metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                delay = s.retry_delay(attempt, err, deadline)
                if delay is None:
                    raise err from None
            time.sleep(delay)
            attempt += 1

    def _follow(
        self,
        start: Callable[[Optional[float]], Any],
        follower: Follower,
        deadline: Optional[float],
    ) -> SegmentationResult:
        s = self._settings
        attempt = 0
        try:
            while True:
                call = start(remaining(deadline))
                try:
                    for message in call:
                        result = follower.feed(message)
                        if result is not None:
                            return result
                    raise follower.no_outcome()
                except grpc.RpcError as e:
                    err = from_rpc_error(e)
                    # Once an event arrived the job exists: running it again is not a retry.
                    delay = None if follower.events else s.retry_delay(attempt, err, deadline)
                    if delay is None:
                        raise err from None
                except Resubmit as r:
                    # Its server shut down before the job ended: the same request again.
                    delay = s.retry_delay(attempt, r.as_unavailable, deadline)
                    if delay is None:
                        raise r.error from None
                finally:
                    call.cancel()  # a no-op after the outcome; cancels the job otherwise
                time.sleep(delay)
                attempt += 1
        finally:
            follower.close()


class _Stopped(Exception):
    """Raised in a fit's progress callback to cancel it: its ``segment_many`` was left."""


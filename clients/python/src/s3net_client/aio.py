"""The asyncio client: the same API as ``Client``, on ``grpc.aio``."""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Tuple, Union

import grpc
import grpc.aio

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


class AsyncClient:
    """``Client`` for asyncio programs: every method is a coroutine, ``watch`` an async
    iterator. Same arguments, retries, deadlines and exceptions as ``Client``.

    Create and use it inside one running event loop, and close it with ``await
    client.close()`` or ``async with``. Cancelling a ``segment`` task cancels the job.
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
            self._channel = grpc.aio.secure_channel(
                s.target, s.credentials, options=s.channel_options
            )
        else:
            self._channel = grpc.aio.insecure_channel(s.target, options=s.channel_options)
        self._stub = SegmenterStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncClient({self._settings.target!r}, tls={self._settings.tls})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def segment(
        self,
        image: ImageInput,
        *,
        progress: ProgressArg = False,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> SegmentationResult:
        """See ``Client.segment``."""
        up = Upload.of(image, options)
        s, stub = self._settings, self._stub
        deadline = s.deadline(timeout)
        if up.chunked(s, upload):
            start = up.upload_call(stub, s, s.chunk_size)
            return await self._follow(start, Follower(progress, up.stem, resubmit=True), deadline)
        try:
            start = up.segment_call(stub, s)
            return await self._follow(start, Follower(progress, up.stem, resubmit=True), deadline)
        except InvalidArgument as e:
            size = up.fallback_chunk_size(e, s, upload)
            if size is None:
                raise
            start = up.upload_call(stub, s, size)
            return await self._follow(start, Follower(progress, up.stem, resubmit=True), deadline)

    async def segment_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 8,
        progress: bool = False,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> AsyncIterator[Tuple[ImageInput, Union[SegmentationResult, Exception]]]:
        """See ``Client.segment_many``: an async iterator of ``(image, result or error)``
        in the order of ``images``, up to ``concurrency`` fits in flight."""
        def call(image: ImageInput) -> Awaitable[SegmentationResult]:
            return self.segment(image, timeout=timeout, upload=upload, **options)

        async for outcome in self._in_flight(images, call, concurrency, progress):
            yield outcome

    async def segment_frames(
        self,
        image: ImageInput,
        *,
        concurrency: int = 8,
        timeout: Optional[float] = UNSET,
        upload: Optional[bool] = None,
        **options: Any,
    ) -> AsyncIterator[Tuple[int, Union[SegmentationResult, Exception]]]:
        """See ``Client.segment_frames``: ``(frame, result or error)`` for every frame of the
        image in frame order, frame 0 first (its error raised), then the others with up to
        ``concurrency`` in flight."""
        if "frame" in options:
            raise TypeError("segment_frames segments every frame; it takes no frame= option")
        first = await self.segment(image, timeout=timeout, upload=upload, frame=0, **options)
        yield 0, first

        def call(frame: int) -> Awaitable[SegmentationResult]:
            return self.segment(image, timeout=timeout, upload=upload, frame=frame, **options)

        async for outcome in self._in_flight(range(1, first.frames), call, concurrency, False):
            yield outcome

    async def _in_flight(
        self,
        items: Iterable[Any],
        call: Callable[[Any], Awaitable[SegmentationResult]],
        concurrency: int,
        progress: bool,
    ) -> AsyncIterator[Tuple[Any, Union[SegmentationResult, Exception]]]:
        """``await call(item)`` for each item, up to ``concurrency`` at once, yielded as
        ``(item, result or error)`` in the items' order; leaving the loop early cancels the
        fits in flight."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")

        async def one(item: Any) -> Union[SegmentationResult, Exception]:
            try:
                return await call(item)
            except Exception as e:  # yielded with its item, for the caller to handle
                return e

        bar = progress_bar(items) if progress else None
        window: InOrder[asyncio.Future] = InOrder(items, concurrency, lambda item: asyncio.ensure_future(one(item)))
        try:
            while (started := window.next()) is not None:
                item, task = started
                outcome = await task
                if bar is not None:
                    bar.update(1)
                yield item, outcome
        finally:
            # Cancelling a segment task cancels its job on the server.
            for _, task in window.pending:
                task.cancel()
            if window.pending:
                await asyncio.gather(*(t for _, t in window.pending), return_exceptions=True)
            if bar is not None:
                bar.close()

    async def submit(
        self,
        image: ImageInput,
        *,
        idempotency_key: Optional[str] = None,
        resubmit: bool = True,
        timeout: Optional[float] = UNSET,
        **options: Any,
    ) -> Submitted:
        """See ``Client.submit``."""
        up = Upload.of(image, options)
        request = pb.SubmitJobRequest(
            image=up.image, options=up.options, idempotency_key=idempotency_key or ""
        )
        m = await self._unary(self._stub.SubmitJob, request, timeout)
        return _convert.submitted_from_pb(m, request if resubmit else None)

    async def watch(
        self, job_id: str, *, timeout: Optional[float] = UNSET
    ) -> AsyncIterator[JobEvent]:
        """See ``Client.watch``."""
        s = self._settings
        deadline = s.deadline(timeout)
        request = pb.WatchJobRequest(job_id=job_id)
        attempt = 0
        while True:
            call = self._stub.WatchJob(request, timeout=remaining(deadline), metadata=s.metadata)
            seen = 0
            try:
                async for message in call:
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
            await asyncio.sleep(delay)
            attempt += 1

    async def wait(
        self,
        job: Union[str, Submitted],
        *,
        progress: ProgressArg = False,
        timeout: Optional[float] = UNSET,
    ) -> SegmentationResult:
        """See ``Client.wait``."""
        s = self._settings
        again = job.request if isinstance(job, Submitted) else None
        current = [job if isinstance(job, str) else job.job_id]  # the job followed now
        follower = Follower(progress, current[0], resubmit=again is not None)

        async def start(t: Optional[float]) -> Any:
            if follower.lost:
                follower.lost = False
                current[0] = (await self._unary(self._stub.SubmitJob, again, t)).job_id
            return self._stub.WatchJob(pb.WatchJobRequest(job_id=current[0]), timeout=t, metadata=s.metadata)

        return await self._follow(start, follower, s.deadline(timeout))

    async def get(self, job_id: str, *, timeout: Optional[float] = UNSET) -> Job:
        """See ``Client.get``."""
        m = await self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout)
        return _convert.job_from_pb(m)

    async def cancel(self, job_id: str, *, timeout: Optional[float] = UNSET) -> JobState:
        """See ``Client.cancel``."""
        m = await self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout)
        return _convert.state_from_pb(m.state)

    async def list_jobs(
        self,
        state: Any = None,
        *,
        limit: int = 0,
        timeout: Optional[float] = UNSET,
    ) -> JobList:
        """See ``Client.list_jobs``."""
        request = pb.ListJobsRequest(state=_convert.state_to_pb(state), limit=limit)
        m = await self._unary(self._stub.ListJobs, request, timeout)
        return _convert.job_list_from_pb(m)

    async def _unary(
        self, method: Callable[..., Awaitable[Any]], request: Any, timeout: Any
    ) -> Any:
        s = self._settings
        deadline = s.deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=remaining(deadline), metadata=s.metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                delay = s.retry_delay(attempt, err, deadline)
                if delay is None:
                    raise err from None
            await asyncio.sleep(delay)
            attempt += 1

    async def _follow(
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
                if inspect.isawaitable(call):  # a start that submits first (``wait``)
                    call = await call
                try:
                    async for message in call:
                        result = follower.feed(message)
                        if result is not None:
                            return result
                    raise follower.no_outcome()
                except grpc.RpcError as e:
                    err = from_rpc_error(e)
                    delay = None if follower.events else s.retry_delay(attempt, err, deadline)
                    if delay is None:
                        raise err from None
                except Resubmit as r:
                    # Its server shut down before the job ended: the same request again.
                    delay = s.retry_delay(attempt, r.as_unavailable, deadline)
                    if delay is None:
                        raise r.error from None
                finally:
                    call.cancel()
                await asyncio.sleep(delay)
                attempt += 1
        finally:
            follower.close()

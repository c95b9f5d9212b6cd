"""Both ends of a Promptline stream: reading frames as a caller, serving a stream as a hop.

`read_frames` is shared by every hop that consumes a downstream stream (edge <- prompt <- engine)
and by the Python client: it ends on the first terminal frame (done or error) and cancels the call
in `finally`, so no hop keeps reading after an error, a timeout or its own cancel.

`StreamLife` is one stream at one hop, finalized once; `serve_stream` runs a gRPC hop's frames
through it. `abort_unary` is the unary counterpart of `error_frame` (the PromptAdmin service).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, NoReturn, Protocol, TypeAlias, TypeVar

import grpc

from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.metrics import ACTIVE_STREAMS, ERRORS, StreamTimer
from promptline.v1 import common_pb2

log = logging.getLogger("promptline.streams")

DONE = "done"
CANCELLED = "cancelled"


class Frame(Protocol):
    """A frame of a Promptline stream (`GenerateResponse`, `StreamChatResponse`): its `frame`
    oneof holds `start`, `delta`, `done` or `error`."""

    @property
    def error(self) -> common_pb2.Error: ...

    def WhichOneof(self, oneof_group: str, /) -> str | None: ...


F = TypeVar("F", bound=Frame)
F_co = TypeVar("F_co", bound=Frame, covariant=True)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class ErrorFrameType(Protocol[T_co]):
    """What makes a stream's error frame: its message class, called as `cls(error=...)`."""

    def __call__(self, *, error: common_pb2.Error) -> T_co: ...


class FrameCall(Protocol[F_co]):
    """A server-streaming call of frames (`grpc.aio.UnaryStreamCall`), as `read_frames` uses it.
    """

    def __aiter__(self) -> AsyncIterator[F_co]: ...

    def cancel(self) -> bool: ...


Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
"""A handler's context; what it carries is not checked per RPC."""


def text_metadata(context: Context) -> dict[str, str]:
    """The call's metadata with text values (a `-bin` key's value is bytes: not among them)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class StreamLife:
    """One stream at one hop, from its first line to its one end (in the manner of
    OpenTelemetry's stream wrappers: finalize once, never let bookkeeping break the stream).

    Owns what every hop would otherwise repeat: the outcome (`done`, an error code, `cancelled`),
    whether text reached the caller (which makes a later error `mid_stream` instead of
    `first_packet`), the error's frame and gRPC status, the active-streams gauge, the TTFT and
    duration histograms, `promptline_errors_total`, the end-of-stream log line and `on_finish`
    hooks, run exactly once by `finish()`.
    """

    __slots__ = ("_active", "_finished", "_hooks", "_timer", "delivered", "fields", "log",
                 "origin", "outcome", "request_id")

    def __init__(self, service: str, model: str, request_id: str, *,
                 logger: logging.Logger = log, label: str | None = None) -> None:
        """`label`: the model's metric label (`Config.model_label`), when not `model` itself."""
        self.origin = service
        self.request_id = request_id
        self.log = logger
        self.delivered = False
        self.outcome = CANCELLED  # what a stream that never reports otherwise was
        self.fields: dict[str, Any] = {"request_id": request_id, "model": model}
        """Extra fields of the end-of-stream log line; each hop adds its own."""
        self._timer = StreamTimer(service, model if label is None else label)
        self._hooks: list[Callable[[str], None]] = []
        self._finished = False
        self._active = ACTIVE_STREAMS.labels(service)
        self._active.inc()

    @property
    def stage(self) -> Stage:
        """Where an error now would be: `mid_stream` once text reached the caller."""
        return Stage.MID_STREAM if self.delivered else Stage.FIRST_PACKET

    @property
    def started(self) -> float:
        """`time.perf_counter()` when the stream reached this hop."""
        return self._timer.started

    def text_delivered(self) -> None:
        """Text went to the caller: the first time, this is the hop's time to first token."""
        if not self.delivered:
            self.delivered = True
            self._timer.first_token()

    def failed(self, err: PromptlineError, *, count: bool = True) -> PromptlineError:
        """Record `err` as the outcome; fill in stage, request id and origin; count it (unless
        the caller's error path counts it: the edge's HTTP error responses do)."""
        err.at(self.stage, request_id=self.request_id, origin=self.origin)
        self.outcome = err.code.value
        if count:
            ERRORS.labels(self.origin, err.code.value, (err.stage or Stage.CONNECT).value).inc()
        return err

    def error_frame(self, context: Context, err: PromptlineError, frame_type: ErrorFrameType[F],
                    extra_metadata: tuple[tuple[str, str], ...] = ()) -> F:
        """`failed(err)`, then the status on `context` and the error frame to yield."""
        return error_frame(context, self.failed(err), frame_type, extra_metadata)

    def on_finish(self, hook: Callable[[str], None]) -> None:
        """Call `hook(outcome)` once, when the stream finishes."""
        self._hooks.append(hook)

    def finish(self) -> None:
        """The one end: hooks (which may add log fields), gauge, duration, the log line. Later
        calls do nothing."""
        if self._finished:
            return
        self._finished = True
        for hook in self._hooks:
            try:
                hook(self.outcome)
            except Exception:  # bookkeeping never breaks a stream's end
                self.log.exception("stream finish hook failed",
                                   extra={"request_id": self.request_id})
        self._active.dec()
        self._timer.finish(self.outcome)
        self.log.info("stream ended", extra={
            **self.fields, "outcome": self.outcome,
            "duration_ms": round((time.perf_counter() - self._timer.started) * 1000)})


AfterError = Callable[[PromptlineError], Awaitable[None]]


async def serve_stream(life: StreamLife, frames: AsyncGenerator[F, None], context: Context,
                       frame_type: ErrorFrameType[F], *,
                       error_metadata: Callable[[PromptlineError], tuple[tuple[str, str], ...]]
                       | None = None,
                       after_error: AfterError | None = None) -> AsyncGenerator[F, None]:
    """A gRPC hop's stream: `frames` relayed, then one end, whatever ends it.

    A PromptlineError becomes the last frame (its stage from `life`) and the RPC's status; any
    other exception becomes INTERNAL with a safe message; a cancel propagates. `after_error` runs
    after the error frame went out, so the caller never waits on it.
    """
    last: F | None = None
    try:
        async with aclosing(frames) as stream:
            async for frame in stream:
                last = frame
                yield frame
        life.outcome = DONE
    except PromptlineError as err:
        yield life.error_frame(context, err, frame_type,
                               error_metadata(err) if error_metadata else ())
        if after_error is not None:
            await after_error(err)
    except asyncio.CancelledError:
        # A caller that got `done` may cancel while this hop still settles up: still done.
        if last is None or last.WhichOneof("frame") != "done":
            life.outcome = CANCELLED
            life.log.info("stream cancelled by caller", extra={"request_id": life.request_id})
        else:
            life.outcome = DONE
        raise
    except Exception:
        life.log.exception("unexpected error in stream", extra={"request_id": life.request_id})
        internal = internal_error(life.request_id)
        yield life.error_frame(context, internal, frame_type)
        if after_error is not None:
            await after_error(internal)
    finally:
        life.finish()


# How long to wait for the end of a stream after its terminal frame. A well-behaved server ends
# the RPC right after that frame; one that does not is not waited for any longer.
END_OF_STREAM_WAIT = 1.0


async def read_frames(call: FrameCall[F], *, end_first: bool = True
                      ) -> AsyncGenerator[F, None]:
    """Yield the frames of a server-streaming call up to and including `done`.

    An `error` frame, a non-OK status or a stream that ends without a terminal frame raises
    `PromptlineError`; the downstream error's code, stage and details are kept unchanged.
    On a terminal frame one more read, bounded by END_OF_STREAM_WAIT, takes the end of the stream,
    so the RPC (and the client span of its tracing interceptor) ends cleanly; whatever comes
    instead is not read. With `end_first` that read comes before `done` is passed on, so a
    consumer that stops (or is cancelled) at `done` cannot leave the call unfinished; without it
    `done` is passed on first, for a caller whose downstream still works after `done`. Use with
    `contextlib.aclosing` so `finally` runs as soon as the consumer stops.
    """
    delivered = False
    frames = call.__aiter__()
    try:
        while True:
            try:
                frame = await anext(frames)
            except StopAsyncIteration:
                raise PromptlineError(
                    ErrorCode.UPSTREAM_ERROR,
                    "the stream ended without a final frame",
                    stage=Stage.MID_STREAM if delivered else Stage.FIRST_PACKET,
                ) from None
            kind = frame.WhichOneof("frame")
            if kind == "error":
                await _end_of_stream(frames)
                raise PromptlineError.from_pb(frame.error)
            if kind == "done":
                if end_first:
                    await _end_of_stream(frames)
                yield frame
                if not end_first:
                    await _end_of_stream(frames)
                return
            yield frame
            if kind == "delta":
                delivered = True
    except grpc.aio.AioRpcError as exc:
        raise PromptlineError.from_rpc_error(
            exc, stage=Stage.MID_STREAM if delivered else Stage.FIRST_PACKET
        ) from None
    finally:
        call.cancel()  # no-op when the call already finished


async def _end_of_stream(frames: AsyncIterator[Frame]) -> None:
    """Read the end of the stream after its terminal frame; never more than one frame."""
    try:
        async with asyncio.timeout(END_OF_STREAM_WAIT):
            await anext(frames)
    except (StopAsyncIteration, TimeoutError, grpc.aio.AioRpcError):
        pass  # the expected end (or a server that will not end): the terminal frame counts


def error_frame(context: Context, err: PromptlineError, frame_type: ErrorFrameType[T],
                extra_metadata: tuple[tuple[str, str], ...] = ()) -> T:
    """Set the matching status and rich details on `context`; return the error frame to yield.

    For async-generator handlers: the frame goes out as the last message (it survives proxies
    that drop trailers), then the RPC ends with the status generic gRPC tooling understands.
    """
    log.log(logging.ERROR if err.code is ErrorCode.INTERNAL else logging.INFO, "stream failed",
            extra={"request_id": err.request_id, "code": err.code.value,
                   "stage": err.stage.value if err.stage else None, "origin": err.origin})
    status = err.to_grpc_status()
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata((*status.trailing_metadata, *extra_metadata))
    return frame_type(error=err.to_pb())


async def abort_unary(context: Context, err: PromptlineError) -> NoReturn:
    """End a unary RPC with the error's status and rich details (`ErrorInfo`, `RetryInfo`, ...).

    `context.abort` raises to finish the RPC: call it last, outside any `except Exception`.
    """
    log.log(logging.ERROR if err.code is ErrorCode.INTERNAL else logging.INFO, "call failed",
            extra={"request_id": err.request_id, "code": err.code.value, "origin": err.origin})
    status = err.to_grpc_status()
    await context.abort(status.code, status.details, status.trailing_metadata)

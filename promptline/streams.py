"""Both ends of a Promptline stream: reading frames as a caller, ending a stream as a server.

Shared by every hop that consumes a downstream stream (edge <- prompt <- engine) and by the
Python client. The loop ends on the first terminal frame (done or error) and the call is
cancelled in `finally`, so no hop keeps reading after an error, a timeout or its own cancel.
`abort_unary` is the unary counterpart of `error_frame` (the PromptAdmin service).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from promptline.errors import ErrorCode, PromptlineError, Stage

log = logging.getLogger("promptline.streams")


# How long to wait for the end of a stream after its terminal frame. A well-behaved server ends
# the RPC right after that frame; one that does not is not waited for any longer.
END_OF_STREAM_WAIT = 1.0


async def read_frames(call: Any) -> AsyncIterator[Any]:
    """Yield the frames of a server-streaming call up to and including `done`.

    An `error` frame, a non-OK status or a stream that ends without a terminal frame raises
    `PromptlineError`; the downstream error's code, stage and details are kept unchanged.
    After the terminal frame one more read, bounded by END_OF_STREAM_WAIT, takes the end of the
    stream, so the RPC (and the client span of its tracing interceptor) ends cleanly; whatever
    comes instead is not read. Use with `contextlib.aclosing` so `finally` runs as soon as the
    consumer stops.
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
            yield frame
            if kind == "done":
                await _end_of_stream(frames)
                return
            if kind == "delta":
                delivered = True
    except grpc.aio.AioRpcError as exc:
        raise PromptlineError.from_rpc_error(
            exc, stage=Stage.MID_STREAM if delivered else Stage.FIRST_PACKET
        ) from None
    finally:
        call.cancel()  # no-op when the call already finished


async def _end_of_stream(frames: AsyncIterator[Any]) -> None:
    """Read the end of the stream after its terminal frame; never more than one frame."""
    try:
        async with asyncio.timeout(END_OF_STREAM_WAIT):
            await anext(frames)
    except (StopAsyncIteration, TimeoutError, grpc.aio.AioRpcError):
        pass  # the expected end (or a server that will not end): the terminal frame counts


def error_frame(context: grpc.aio.ServicerContext, err: PromptlineError,
                frame_type: type, extra_metadata: tuple[tuple[str, str], ...] = ()) -> Any:
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


async def abort_unary(context: grpc.aio.ServicerContext, err: PromptlineError) -> None:
    """End a unary RPC with the error's status and rich details (`ErrorInfo`, `RetryInfo`, ...).

    `context.abort` raises to finish the RPC: call it last, outside any `except Exception`.
    """
    log.log(logging.ERROR if err.code is ErrorCode.INTERNAL else logging.INFO, "call failed",
            extra={"request_id": err.request_id, "code": err.code.value, "origin": err.origin})
    status = err.to_grpc_status()
    await context.abort(status.code, status.details, status.trailing_metadata)

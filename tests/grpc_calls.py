"""Reading a server-streaming gRPC call to its end."""

from __future__ import annotations

from typing import Any

import grpc


async def read_all(call: Any) -> list[Any]:
    """Every frame of a call; a failed call's status stays on `call` (`await call.code()`)
    instead of raising."""
    frames = []
    try:
        async for frame in call:
            frames.append(frame)
    except grpc.aio.AioRpcError:
        pass
    return frames

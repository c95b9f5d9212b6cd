"""Wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0,
                     what: str = "condition", interval: float = 0.02) -> None:
    """Return once `predicate()` is true (awaited when it is a coroutine function); fail after
    `within` seconds, a generous bound, naming `what` did not happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within:g} s")
        await asyncio.sleep(interval)

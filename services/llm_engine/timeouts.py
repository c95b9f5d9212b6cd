"""First-token, idle-gap and total deadlines of one stream, and which one fired.

One `StreamClock` per request (shared across retries and fallbacks, so retries never extend the
total budget). `next_chunk` waits for the provider's next chunk until the nearest deadline and
turns a timeout into the right typed error; the cancelled `__anext__` closes the provider
generator, so the upstream call ends with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from promptline.config import Timeouts
from promptline.errors import ErrorCode, PromptlineError, Stage

T = TypeVar("T")

# The engine's own total deadline fires this much before the caller's gRPC deadline, so the caller
# receives a typed DEADLINE_EXCEEDED frame instead of a bare transport status.
DEADLINE_MARGIN = 0.05


@dataclass(slots=True)
class StreamClock:
    """Absolute loop-time deadlines for one stream."""

    timeouts: Timeouts
    total_at: float
    first_token_at: float
    last_token_at: float | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    @classmethod
    def start(cls, timeouts: Timeouts, caller_remaining: float | None) -> StreamClock:
        loop = asyncio.get_running_loop()
        now = loop.time()
        total = timeouts.total
        if caller_remaining is not None:
            total = min(total, max(0.0, caller_remaining - DEADLINE_MARGIN))
        return cls(timeouts, now + total, now + timeouts.first_token, loop=loop)

    def restart_first_token(self) -> None:
        """A retry or fallback gets a fresh first-token wait, still inside the total budget."""
        self.first_token_at = self.loop.time() + self.timeouts.first_token

    def on_token(self) -> None:
        self.last_token_at = self.loop.time()

    def remaining(self) -> float:
        return self.total_at - self.loop.time()

    def deadline(self) -> float:
        if self.last_token_at is None:
            return min(self.total_at, self.first_token_at)
        return min(self.total_at, self.last_token_at + self.timeouts.idle)

    def expired(self) -> PromptlineError:
        """The error for the deadline that has passed."""
        if self.loop.time() >= self.total_at - 1e-3:
            return PromptlineError(
                ErrorCode.DEADLINE_EXCEEDED,
                "the request exceeded its total time budget",
                stage=Stage.MID_STREAM if self.last_token_at else Stage.FIRST_PACKET,
                retryable=self.last_token_at is None,
            )
        if self.last_token_at is None:
            return PromptlineError(
                ErrorCode.FIRST_TOKEN_TIMEOUT,
                f"the model sent no token within {self.timeouts.first_token:g}s",
                stage=Stage.FIRST_PACKET,
            )
        return PromptlineError(
            ErrorCode.STREAM_TIMEOUT,
            f"the model stopped responding (no token for {self.timeouts.idle:g}s)",
            stage=Stage.MID_STREAM,
        )


async def next_chunk(it: AsyncIterator[T], clock: StreamClock) -> T:
    """`anext(it)` bounded by the clock's nearest deadline; StopAsyncIteration passes through."""
    try:
        async with asyncio.timeout_at(clock.deadline()):
            return await anext(it)
    except TimeoutError:
        raise clock.expired() from None

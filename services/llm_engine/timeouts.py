"""First-token, idle-gap and total deadlines of one stream, and which one fired.

One `StreamClock` per request (shared across retries and fallbacks, so retries never extend the
total budget). A `Watchdog` cancels the task reading the provider when the nearest deadline
passes and names the deadline that fired; the cancelled read closes the provider generator, so
the upstream call ends with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType

from promptline.config import Timeouts
from promptline.errors import ErrorCode, PromptlineError, Stage

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


class Watchdog:
    """Cancels `task` when the clock's nearest deadline passes. Used as `with watchdog:` inside
    that task, it turns that cancel into the deadline's typed error (FIRST_TOKEN_TIMEOUT,
    STREAM_TIMEOUT or DEADLINE_EXCEEDED), while any other cancel stays a cancel.

    One timer per stream instead of one per token: a token only moves `last_token_at`, and
    when the timer fires it re-arms itself for the deadline as it now stands, so the hot path
    never touches the event loop's timer heap.
    """

    __slots__ = ("_armed_at", "_clock", "_handle", "_task", "expired")

    def __init__(self, clock: StreamClock, task: asyncio.Task[object]) -> None:
        self._clock = clock
        self._task = task
        self.expired: PromptlineError | None = None
        self._arm(clock.deadline())

    def _arm(self, deadline: float) -> None:
        self._armed_at = deadline
        self._handle = self._clock.loop.call_at(deadline, self._fire)

    def on_token(self) -> None:
        """A token arrived. Re-arms only if the deadline moved earlier (an idle gap shorter
        than the first-token wait), which happens at most once per stream."""
        self._clock.on_token()
        deadline = self._clock.deadline()
        if deadline < self._armed_at:
            self._handle.cancel()
            self._arm(deadline)

    def _fire(self) -> None:
        deadline = self._clock.deadline()
        if self._clock.loop.time() < deadline:
            self._arm(deadline)
            return
        self.expired = self._clock.expired()
        self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is asyncio.CancelledError and self.expired is not None:
            self._task.uncancel()  # the task this block runs in, which `_fire` cancelled
            raise self.expired from None

"""The provider interface: what the engine needs from a model backend.

A provider turns a `GenerationRequest` into an async stream of `Chunk`s. It raises
`PromptlineError` for every failure it can name (mapping its own exceptions in one table), and
releases its upstream connection in `finally` whenever the stream ends, including when the
consumer stops early or is cancelled (`aclose()` on the async generator).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from promptline.response_format import ResponseFormat
from promptline.v1 import common_pb2


class ReadPacer:
    """Chunk shaping at the source (`shaping.py`): once the first text went out (`active`), the
    provider is read at most once per `interval` seconds, so what arrived meanwhile is parsed in
    one go: one wake-up per frame instead of one per token, and text waits in the socket buffer,
    never longer than `interval`, instead of in ours. The end of the reply is not held: `ended`
    cuts a hold short, so the last text and `done` leave as soon as the provider finished."""

    __slots__ = ("_ended", "_holding", "_next", "active", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.active = False
        self._next = 0.0
        self._holding: asyncio.Future[None] | None = None
        self._ended = False

    def start(self, now: float) -> None:
        """The first text went out: the next read waits a whole interval (unless the reply
        already ended: then nothing waits)."""
        self.active = not self._ended
        self._next = now + self.interval

    def wait(self, now: float) -> float:
        """Seconds to wait before the next read (0: read now)."""
        return max(0.0, self._next - now) if self.active else 0.0

    def read(self, now: float) -> None:
        """A read starts now: the next one waits an interval."""
        if self.active:
            self._next = now + self.interval

    async def hold(self, seconds: float) -> None:
        """Sleep `seconds`, or until `ended` is called."""
        loop = asyncio.get_running_loop()
        holding = self._holding = loop.create_future()
        timer = loop.call_later(seconds, _release, holding)
        try:
            await holding
        finally:
            timer.cancel()
            self._holding = None

    def ended(self) -> None:
        """The provider's body is complete or failed: no more waits."""
        self._ended = True
        self.active = False
        if self._holding is not None:
            _release(self._holding)


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a provider is asked to generate."""

    request_id: str
    model: str
    """Model name the provider should use upstream."""
    messages: Sequence[common_pb2.ChatMessage]
    """The engine request's own messages, as received (not copies)."""
    max_tokens: int
    temperature: float | None = None
    pace: ReadPacer | None = None
    """Read the upstream at this pace once the first text went out (None: as it comes)."""
    response_format: ResponseFormat | None = None
    """Structured output asked for (None: free text)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting reported by the provider (or counted by us)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    """Of `prompt_tokens`, those the provider served from its prompt cache (priced apart)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the reply: text (possibly empty), and on the last chunk the finish data."""

    text: str = ""
    tokens: int = 0
    """Model tokens in `text`; 0 when the provider does not say (the engine counts then)."""
    finish_reason: str | None = None
    usage: Usage | None = None


class Provider(Protocol):
    """A model backend. `stream` is an async generator; `aclose()` must release the upstream."""

    kind: str

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]: ...

    async def close(self) -> None:
        """Release process-wide resources (HTTP connection pools)."""
        ...

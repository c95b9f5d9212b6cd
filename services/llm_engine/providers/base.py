"""The provider interface: what the engine needs from a model backend.

A provider turns a `GenerationRequest` into an async stream of `Chunk`s. It raises
`PromptlineError` for every failure it can name (mapping its own exceptions in one table), and
releases its upstream connection in `finally` whenever the stream ends, including when the
consumer stops early or is cancelled (`aclose()` on the async generator).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from promptline.v1 import common_pb2


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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting reported by the provider (or counted by us)."""

    prompt_tokens: int
    completion_tokens: int

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

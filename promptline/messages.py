"""The chat message shared by the Python client and the engine's providers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: str
    """"system", "user" or "assistant"."""
    content: str


class ChatTurn(Protocol):
    """What a provider reads of a message: a `Message`, or a `ChatMessage` protobuf as received.

    The engine hands providers the request's own protobuf messages, so a long prompt is not held
    a second time, as Python strings, for the whole stream.
    """

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...

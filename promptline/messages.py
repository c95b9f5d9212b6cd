"""The chat message shared by the Python client and the engine's providers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: str
    """"system", "user" or "assistant"."""
    content: str

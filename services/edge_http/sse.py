"""Server-Sent Events wire encoding: one event or comment in, the bytes to write out.

Kept free of aiohttp so the framing can be tested (and reused by another endpoint) on its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CONTENT_TYPE = "text/event-stream; charset=utf-8"

# A comment line: EventSource ignores it, but it resets idle timers in proxies and load balancers.
HEARTBEAT = b": keep-alive\n\n"


def encode_event(event: str, data: Mapping[str, Any], *, event_id: int | None = None) -> bytes:
    """One SSE event: optional `id:`, `event:`, then the data as compact JSON, blank line."""
    if "\n" in event or "\r" in event:
        raise ValueError("an SSE event name cannot contain a line break")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines = [] if event_id is None else [f"id: {event_id}"]
    lines.append(f"event: {event}")
    # json.dumps escapes line breaks inside strings, so the payload is a single `data:` line.
    lines.append(f"data: {payload}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_comment(text: str) -> bytes:
    """A comment line (`: text`), e.g. a heartbeat."""
    return "".join(f": {line}\n" for line in text.splitlines() or [""]).encode("utf-8") + b"\n"

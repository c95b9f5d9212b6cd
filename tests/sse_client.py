"""A small SSE reader for tests: parses `event:`/`id:`/`data:` blocks from an aiohttp response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class Event:
    """One SSE event (comments are reported with event == ":comment")."""

    event: str
    data: Any
    id: str | None = None


async def events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Yield events as they arrive, until the server closes the stream."""
    name, ident, data = "message", None, []
    while True:
        raw = await resp.content.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                text = "\n".join(data)
                yield Event(name, json.loads(text) if text[:1] in "{[" else text, ident)
            name, ident, data = "message", None, []
        elif line.startswith(":"):
            yield Event(":comment", line[1:].strip())
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "id":
                ident = value
            elif field == "data":
                data.append(value)


async def collect(resp: aiohttp.ClientResponse) -> list[Event]:
    return [e async for e in events(resp)]

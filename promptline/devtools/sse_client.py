"""One SSE reader (tests, drills): `event:`/`id:`/`data:` blocks from an aiohttp response.

    events = await collect(resp)                 # everything, until the server closes
    async for event in events(resp): ...         # as they arrive
    stream = SseStream(resp); await stream.next()   # one at a time, each within a bound
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

WAIT = 10.0
"""Generous bound for the next event of a stream that should be flowing."""


@dataclass
class Event:
    """One SSE event (comments are reported with event == ":comment"); `data` is decoded when it
    is a JSON object."""

    event: str
    data: Any
    id: str | None = None


class SseStream:
    """Reads a response as SSE, one event (or comment) per `next()`."""

    def __init__(self, resp: aiohttp.ClientResponse, *, within: float = WAIT) -> None:
        self.resp = resp
        self.within = within
        self._fields: list[tuple[str, str]] = []
        """(field, value) of the event being read (a comment may arrive in the middle)."""

    async def next(self) -> Event | None:
        """The next event or comment, within `within` seconds; None at the end of the stream."""
        async with asyncio.timeout(self.within):
            return await self._read()

    async def rest(self) -> list[Event]:
        """Every event until the server closes the stream."""
        out = []
        while (event := await self.next()) is not None:
            out.append(event)
        return out

    async def _read(self) -> Event | None:
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                assert not self._fields, f"stream ended inside an event: {self._fields}"
                return None
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith(":"):
                return Event(":comment", line[1:].strip())
            if line:
                field, _, value = line.partition(":")
                self._fields.append((field, value[1:] if value.startswith(" ") else value))
                continue
            fields, self._fields = self._fields, []
            data = "\n".join(value for field, value in fields if field == "data")
            if any(field == "data" for field, _ in fields):  # else not dispatched (SSE spec)
                named = dict(fields)  # the last `event:` and `id:` win
                # Objects are JSON; anything else (OpenAI's `[DONE]`) stays text.
                return Event(named.get("event", "message"),
                             json.loads(data) if data.startswith("{") else data, named.get("id"))


async def events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Yield events as they arrive, until the server closes the stream."""
    stream = SseStream(resp)
    while (event := await stream.next()) is not None:
        yield event


async def collect(resp: aiohttp.ClientResponse) -> list[Event]:
    return await SseStream(resp).rest()


def without_comments(items: Iterable[Event]) -> list[Event]:
    return [e for e in items if e.event != ":comment"]

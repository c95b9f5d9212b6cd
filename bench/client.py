"""The load generator's stream drivers: one request, timed at every network read.

Two wire formats: Promptline's SSE (`event: delta` / `done` / `error`) and OpenAI's streaming
chat completions (`data: {chunk}` ... `data: [DONE]`, `data: {"error": ...}` in-band). Both read
raw bytes as they arrive (`iter_any`), timestamp each read, then split it into events. A
"delivery" is a read that carried reply text; frames may be coalesced, so text is what counts:
the delivered reply is compared with the expected one, and tokens are counted on the text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

SSE = "sse"
OPENAI = "openai"


@dataclass(slots=True)
class StreamResult:
    """What one stream looked like from the client."""

    t_start: float
    ttft: float | None = None
    """Seconds from just before the request was sent to the first read carrying text."""
    duration: float | None = None
    """Seconds from just before the request was sent to the end of the stream."""
    max_gap: float = 0.0
    """Largest time between two consecutive reads carrying text."""
    deliveries: int = 0
    text: str = ""
    error: str | None = None
    """None, or a short type: http_404, sse_error:STREAM_TIMEOUT, truncated, timeout, ..."""


class _Collector:
    """Splits a byte stream into SSE events and keeps the timing of text-carrying reads."""

    def __init__(self, kind: str, t_start: float) -> None:
        self.kind = kind
        self.result = StreamResult(t_start=t_start)
        self.parts: list[str] = []
        self.finished = False
        self._buf = b""
        self._last_text_at: float | None = None

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        got_text = False
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            block, self._buf = self._buf[:end], self._buf[end + 2:]
            if self.kind == SSE:
                got_text |= self._sse_event(block)
            else:
                got_text |= self._openai_event(block)
        if got_text:
            r = self.result
            if self._last_text_at is None:
                r.ttft = now - r.t_start
            else:
                r.max_gap = max(r.max_gap, now - self._last_text_at)
            self._last_text_at = now
            r.deliveries += 1

    def _sse_event(self, block: bytes) -> bool:
        event, data = "message", None
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if event == "delta" and data:
            text = json.loads(data).get("text") or ""
            if text:
                self.parts.append(text)
                return True
        elif event == "done":
            self.finished = True
        elif event == "error":
            code = "?"
            if data:
                code = (json.loads(data).get("error") or {}).get("code", "?")
            self.result.error = f"sse_error:{code}"
            self.finished = True
        return False

    def _openai_event(self, block: bytes) -> bool:
        got = False
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.finished = True
                continue
            chunk: dict[str, Any] = json.loads(payload)
            if "error" in chunk:
                err = chunk.get("error") or {}
                self.result.error = f"openai_error:{err.get('code') or err.get('type') or '?'}"
                continue
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                text = (choice.get("delta") or {}).get("content")
                if text:
                    self.parts.append(text)
                    got = True
        return got


async def run_stream(session: aiohttp.ClientSession, kind: str, url: str,
                     headers: dict[str, str], body: dict[str, Any],
                     limit_s: float) -> StreamResult:
    """One streaming request; never raises (errors are recorded on the result)."""
    t_start = time.perf_counter()
    col = _Collector(kind, t_start)
    try:
        async with asyncio.timeout(limit_s):
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    col.result.error = f"http_{resp.status}"
                else:
                    async for data in resp.content.iter_any():
                        col.feed(data, time.perf_counter())
        if not col.finished and col.result.error is None:
            col.result.error = "truncated"
    except TimeoutError:
        col.result.error = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        col.result.error = f"connect:{type(exc).__name__}"
    except ValueError as exc:  # a frame that is not JSON
        col.result.error = f"bad_frame:{type(exc).__name__}"
    col.result.duration = time.perf_counter() - t_start
    col.result.text = "".join(col.parts)
    return col.result


def request_body(kind: str, model: str, max_tokens: int, prompt_bytes: int = 0
                 ) -> dict[str, Any]:
    """The request the bench sends: one user message, a short sentence or `prompt_bytes` long."""
    content = "Stream the bench reply."
    if prompt_bytes > len(content):
        words = " ".join(f"context{i % 1000}" for i in range(prompt_bytes // 8 + 1))
        content = (content + " " + words)[:prompt_bytes]
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": content}]}
    if kind == OPENAI:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body

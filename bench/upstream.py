"""The bench's OpenAI-compatible upstream: one aiohttp process serving every load of a run.

The reply shape comes from the requested model name, so one process (and one CPU figure) serves
all loads and both the chain and the direct baseline ask it for exactly the same stream:

    up-200x20ms        200 content chunks of one token each, 20 ms apart, no extra TTFT
    up-200x0ms-t50ms   200 chunks back to back, the first one 50 ms after the role chunk

Streaming follows OpenAI: a role chunk right after the headers, the content chunks (paced
against absolute times, so event-loop jitter does not add up over a stream), a `finish_reason`
chunk, a `choices: []` usage chunk when `stream_options.include_usage`, then `data: [DONE]`.
Every chunk is pre-encoded once per model name; only the id is spliced in per request.

`GET /stats` reports what was produced (`tokens_sent`, `streams_started`, `streams_completed`,
`streams_open`), which is the denominator of the bench's CPU-per-1,000-upstream-tokens figure.

    python -m bench.upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MODEL_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+/)?up-(\d+)x(\d+)ms(?:-t(\d+)ms)?$")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"

# Words that are one cl100k token each with their leading space, so a reply of N words is N
# tokens and one content chunk carries exactly one token (checked by `reply_text`'s callers).
_WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
          " A", " stream", " of", " words", " flows", " from", " model", " to", " user", ",")


def reply_pieces(tokens: int) -> list[str]:
    """The reply of a `tokens`-token stream, one piece per token."""
    return list(itertools.islice(itertools.cycle(_WORDS), tokens))


def reply_text(tokens: int) -> str:
    return "".join(reply_pieces(tokens))


@dataclass(frozen=True, slots=True)
class Spec:
    """What one model name asks for."""

    tokens: int
    delay: float
    """Seconds between content chunks."""
    ttft: float
    """Seconds between the role chunk and the first content chunk."""


def parse_model(name: str) -> Spec | None:
    match = MODEL_RE.match(name)
    if not match:
        return None
    tokens, delay_ms, ttft_ms = match.groups()
    return Spec(int(tokens), int(delay_ms) / 1000, int(ttft_ms or 0) / 1000)


def model_name(tokens: int, delay_ms: int, ttft_ms: int = 0) -> str:
    return f"up-{tokens}x{delay_ms}ms" + (f"-t{ttft_ms}ms" if ttft_ms else "")


class _Templates:
    """Pre-encoded chunk tails for one model; each completes `data: {"id":"<id>`."""

    def __init__(self, model: str, pieces: list[str]) -> None:
        created = int(time.time())

        def line(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {"object": "chat.completion.chunk", "created": created,
                                       "model": model, "system_fingerprint": None,
                                       "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return b'",' + json.dumps(payload, separators=(",", ":")).encode()[1:] + b"\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        self.role = line(choice({"role": "assistant", "content": ""}))
        self.pieces = [line(choice({"content": p})) for p in pieces]
        self.finish = {r: line(choice({}, r)) for r in ("stop", "length")}
        self._line = line

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._line([], {"prompt_tokens": prompt_tokens,
                               "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens})


class BenchUpstream:
    """The server; `start()` binds 127.0.0.1 (port 0: any free port) and returns the base URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.tokens_sent = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_open = 0
        self._templates: dict[str, _Templates] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, backlog=1024).start()
        self.port = self._runner.addresses[0][1]
        return f"http://{self.host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "tokens_sent": self.tokens_sent, "streams_started": self.streams_started,
            "streams_completed": self.streams_completed, "streams_open": self.streams_open})

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid JSON body")
        model = str(body.get("model") or "") if isinstance(body, dict) else ""
        spec = parse_model(model)
        if spec is None:
            return _error(404, f"unknown bench model {model!r} (use up-<tokens>x<delay>ms)")
        templates = self._templates.get(model)
        if templates is None:
            templates = self._templates[model] = _Templates(model, reply_pieces(spec.tokens))
        n = spec.tokens
        finish = "stop"
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < n:
            n, finish = max_tokens, "length"
        if not body.get("stream"):
            return web.json_response({
                "id": f"chatcmpl-bench{next(self._ids)}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant",
                                         "content": "".join(reply_pieces(n))}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = b'data: {"id":"chatcmpl-bench' + str(next(self._ids)).encode()
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.streams_started += 1
        self.streams_open += 1
        try:
            await resp.prepare(request)
            await resp.write(head + templates.role)
            loop = asyncio.get_running_loop()
            if spec.ttft:
                await asyncio.sleep(spec.ttft)
            started = loop.time()
            for i in range(n):
                if i and spec.delay:
                    wait = started + i * spec.delay - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await resp.write(head + templates.pieces[i])
                self.tokens_sent += 1
            tail = head + templates.finish[finish]
            if include_usage:
                tail += head + templates.usage(10, n)
            await resp.write(tail + DONE)
            await resp.write_eof()
            self.streams_completed += 1
            return resp
        finally:
            self.streams_open -= 1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": None}}, status=status)


async def _main(port: int) -> None:
    server = BenchUpstream(port=port)
    print(f"bench upstream listening on {await server.start()}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="OpenAI-compatible upstream for `make bench`")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port))

"""An OpenAI-compatible HTTP server (aiohttp) with fault knobs: the upstream of the tests and of
the benchmarks.

    fake = FakeOpenAI(reply="Hello there", tokens=5)
    base_url = await fake.start()          # http://127.0.0.1:<port>/v1
    ...
    await fake.stop()

    python -m promptline.devtools.fake_openai --port 9100      # standalone (the bench's upstream)

The reply is `reply`, streamed one piece per word (`tokens`: exactly N pieces, merging or
repeating words). A model named `up-<N>x<D>ms` or `up-<N>x<D>ms-t<T>ms` (optionally behind a
`provider/` prefix) asks for a shape of its own instead, so one server serves every load of a
bench and the chain and a direct client get exactly the same stream: N content chunks of one
cl100k token each, D ms apart, the first one T ms after the role chunk (`model_name()` builds
such a name, `reply_text()` is its reply). The fault knobs apply to both.

Knobs are plain attributes, read when a request arrives, so tests can change them between
requests; `push(**overrides)` queues overrides for the next request only (one dict per request,
in order), e.g. `fake.push(fail_status=500)` then the following request succeeds.

Knobs: `reply`, `tokens`, `ttft`, `delay`, `fail_status`, `fail_code`, `fail_message`,
`fail_body`, `retry_after`, `retry_after_ms`, `fail_after_chunks`, `stall_after_chunks`,
`drop_after_chunks`, `truncate_after_chunks`, `garbage_after_chunks`, `models`.

Records: `requests` (RecordedRequest: body, authorization, headers, peer; kept unless
`record=False`, as the standalone server runs), `request_count`, `active_streams`,
`streams_started`, `chunks_sent`, `disconnects` (count) with the `disconnected` event,
`completed`, `drops`; `GET /stats` reports the counters; and the helpers `wait_disconnect()`,
`wait_idle()`, `wait_until()`.

Streaming follows OpenAI: a role chunk right after the headers, `ttft` later the first content
chunk, the next ones `delay` apart (paced against absolute times, so event-loop jitter does not
add up over a stream), a chunk with `finish_reason` ("length" when the request's `max_tokens` cut
the reply), a `choices: []` usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. Chunk counts in the fault knobs count content chunks. Every chunk is pre-encoded
once per reply shape; only the id is spliced in per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_REPLY = "Hello from the fake OpenAI server, streaming one word at a time."
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"

KNOBS = (
    "reply", "tokens", "ttft", "delay", "fail_status", "fail_code", "fail_message", "fail_body",
    "retry_after", "retry_after_ms", "fail_after_chunks", "stall_after_chunks",
    "drop_after_chunks", "truncate_after_chunks", "garbage_after_chunks",
)

_WORDS = re.compile(r"\S+\s*|\s+")
MODEL_RE = re.compile(r"^(?:[A-Za-z0-9_.-]+/)?up-(\d+)x(\d+)ms(?:-t(\d+)ms)?$")

# Words that are one cl100k token each with their leading space, so a shaped reply of N words is
# N tokens and one content chunk carries exactly one token.
_TOKEN_WORDS = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", " A",
    " stream", " of", " words", " flows", " from", " model", " to", " user", ",")

# Default error bodies for `fail_status`: (message, type, code). 401 echoes the presented key,
# as some compatible servers do, so tests can prove it never reaches a user.
_FAIL_DEFAULTS: dict[int, tuple[str, str, str | None]] = {
    400: ("This model's maximum context length is 8192 tokens. However, your messages resulted "
          "in 9001 tokens. Please reduce the length of the messages.",
          "invalid_request_error", "context_length_exceeded"),
    401: ("Incorrect API key provided: {key}. You can find your API key at "
          "https://platform.openai.com/account/api-keys.", "invalid_request_error",
          "invalid_api_key"),
    403: ("You are not allowed to use this model.", "invalid_request_error", None),
    404: ("The model `{model}` does not exist or you do not have access to it.",
          "invalid_request_error", "model_not_found"),
    422: ("Unprocessable request.", "invalid_request_error", None),
    429: ("Rate limit reached for requests per min. Please try again later.", "requests",
          "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


# --- reply shapes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """The reply shape an `up-<N>x<D>ms[-t<T>ms]` model name asks for."""

    tokens: int
    delay: float
    """Seconds between content chunks."""
    ttft: float
    """Seconds between the role chunk and the first content chunk."""


def parse_model(name: str) -> Spec | None:
    """The shape a model name asks for; None for any other name (the knobs decide)."""
    match = MODEL_RE.match(name)
    if not match:
        return None
    tokens, delay_ms, ttft_ms = match.groups()
    return Spec(int(tokens), int(delay_ms) / 1000, int(ttft_ms or 0) / 1000)


def model_name(tokens: int, delay_ms: int, ttft_ms: int = 0) -> str:
    """The model name that asks for `tokens` one-token chunks `delay_ms` apart."""
    return f"up-{tokens}x{delay_ms}ms" + (f"-t{ttft_ms}ms" if ttft_ms else "")


def reply_pieces(tokens: int) -> list[str]:
    """The content chunks of a shaped `tokens`-token reply, one token each."""
    return list(itertools.islice(itertools.cycle(_TOKEN_WORDS), tokens))


def reply_text(tokens: int) -> str:
    """The text of a shaped `tokens`-token reply (what `model_name(tokens, ...)` streams)."""
    return "".join(reply_pieces(tokens))


def split_reply(reply: str, tokens: int | None) -> list[str]:
    """The reply as streamed pieces: one per word, merged into `tokens` pieces, or words
    repeated (cycling through the reply) until there are `tokens` of them."""
    words = _WORDS.findall(reply) or [reply]
    if tokens is None or tokens <= 0:
        return words
    if tokens <= len(words):
        size, extra = divmod(len(words), tokens)
        pieces: list[str] = []
        start = 0
        for i in range(tokens):
            end = start + size + (1 if i < extra else 0)
            pieces.append("".join(words[start:end]))
            start = end
        return pieces
    cycled = [w if w[-1:].isspace() else w + " " for w in words]
    return list(itertools.islice(itertools.cycle(cycled), tokens))


# --- the server ------------------------------------------------------------------------------


@dataclass(slots=True)
class RecordedRequest:
    """One POST /v1/chat/completions as the fake saw it."""

    body: dict[str, Any]
    authorization: str | None
    headers: dict[str, str] = field(default_factory=dict)
    peer: Any = None
    """The client's (host, port): the same for requests sent on one reused connection."""

    @property
    def api_key(self) -> str | None:
        auth = self.authorization or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass(slots=True)
class _Plan:
    reply: str
    tokens: int | None
    ttft: float
    delay: float
    fail_status: int | None
    fail_code: str | None
    fail_message: str | None
    fail_body: dict[str, Any] | None
    retry_after: float | str | None
    retry_after_ms: int | None
    fail_after_chunks: int | None
    stall_after_chunks: int | None
    drop_after_chunks: int | None
    truncate_after_chunks: int | None
    garbage_after_chunks: int | None
    spec: Spec | None = None
    """The shape the model name asks for: it replaces reply, tokens, delay and ttft."""


class _ChunkTemplates:
    """Pre-encoded SSE lines for one (model, pieces) pair; only the id is spliced per request."""

    def __init__(self, model: str, pieces: list[str]) -> None:
        self.created = int(time.time())
        self.texts = pieces

        def line(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload: dict[str, Any] = {"object": "chat.completion.chunk",
                                       "created": self.created, "model": model,
                                       "system_fingerprint": None, "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return json.dumps(payload, separators=(",", ":")).encode()[1:] + b"\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        self.head = b'data: {"id":"'
        # Every tail completes `data: {"id":"<id>` into a full line.
        self.role = b'",' + line(choice({"role": "assistant", "content": ""}))
        self.pieces = [b'",' + line(choice({"content": p})) for p in pieces]
        self.finish = {reason: b'",' + line(choice({}, reason)) for reason in ("stop", "length")}
        self._usage_line = line

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return b'",' + self._usage_line([], {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens})


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 with fault knobs and connection accounting."""

    def __init__(
        self,
        *,
        reply: str = DEFAULT_REPLY,
        tokens: int | None = None,
        ttft: float = 0.0,
        delay: float = 0.0,
        models: tuple[str, ...] = ("gpt-test",),
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
    ) -> None:
        # --- knobs (read per request) ---
        self.reply = reply
        self.tokens = tokens
        """None: one piece per word; N: exactly N pieces (merging or repeating words)."""
        self.ttft = ttft
        """Seconds between the role chunk and the first content chunk (non-stream: before the
        body)."""
        self.delay = delay
        """Seconds between content chunks."""
        self.fail_status: int | None = None
        """Answer with this HTTP status and an OpenAI error body instead of streaming."""
        self.fail_code: str | None = None
        self.fail_message: str | None = None
        self.fail_body: dict[str, Any] | None = None
        """The whole error JSON body for `fail_status` (overrides code/message)."""
        self.retry_after: float | str | None = None
        """`retry-after` header value (seconds or an HTTP-date) sent with `fail_status`."""
        self.retry_after_ms: int | None = None
        """`retry-after-ms` header value sent with `fail_status`."""
        self.fail_after_chunks: int | None = None
        """After N content chunks send `data: {"error": {...}}` and end the response."""
        self.stall_after_chunks: int | None = None
        """After N content chunks go silent until the client disconnects (or stop())."""
        self.drop_after_chunks: int | None = None
        """After N content chunks reset the TCP connection (RST, not FIN)."""
        self.truncate_after_chunks: int | None = None
        """After N content chunks end the response cleanly, without finish_reason or [DONE]."""
        self.garbage_after_chunks: int | None = None
        """After N content chunks send a malformed SSE data line (not JSON), then go on."""
        self.models = models
        self.host = host
        self.record = record
        """Keep every request in `requests` (a long-running server only counts them)."""

        # --- records ---
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self.active_streams = 0
        self.streams_started = 0
        self.chunks_sent = 0
        """Content chunks written (for `up-...` models, one token each)."""
        self.disconnects = 0
        """Streams whose client went away before the stream ended."""
        self.disconnected = asyncio.Event()
        self.completed = 0
        """Streams (and non-stream replies) sent to the end."""
        self.drops = 0

        self._overrides: deque[tuple[str | None, dict[str, Any]]] = deque()
        self._templates: dict[tuple[str, str | None, int | None], _ChunkTemplates] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.port = port

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        """Bind (an ephemeral port unless `port` was given); return the base URL (.../v1)."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, backlog=1024).start()
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{self.port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Cancel in-flight handlers (not counted as disconnects) and close the server."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    # --- test helpers ----------------------------------------------------------------------

    def push(self, *, for_model: str | None = None, **overrides: Any) -> None:
        """Queue knob overrides for the next request (one call per request, in order); with
        `for_model`, for the next request naming that model (concurrent requests then cannot
        take each other's overrides)."""
        unknown = set(overrides) - set(KNOBS)
        if unknown:
            raise TypeError(f"unknown FakeOpenAI knobs: {sorted(unknown)}")
        self._overrides.append((for_model, overrides))

    def reset(self) -> None:
        """Forget recorded requests and counters (knobs stay as they are)."""
        self.requests.clear()
        self._overrides.clear()
        self.request_count = self.streams_started = self.chunks_sent = 0
        self.disconnects = self.completed = self.drops = 0
        self.disconnected.clear()

    def stats(self) -> dict[str, int]:
        """The counters, as `GET /stats` reports them."""
        return {"requests": self.request_count, "streams_started": self.streams_started,
                "active_streams": self.active_streams, "completed": self.completed,
                "chunks_sent": self.chunks_sent, "disconnects": self.disconnects,
                "drops": self.drops}

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until `predicate()` holds (re-checked on every state change); TimeoutError."""
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_disconnect(self, within: float = 5.0) -> None:
        """Wait until a client closed its connection mid-stream; TimeoutError otherwise."""
        async with asyncio.timeout(within):
            await self.disconnected.wait()

    async def wait_idle(self, within: float = 5.0) -> None:
        """Wait until no stream is open on the server side."""
        await self.wait_until(lambda: self.active_streams == 0, within)

    def _notify(self) -> None:
        self._changed.set()

    # --- handlers --------------------------------------------------------------------------

    def _plan(self, model: str) -> _Plan:
        values = {name: getattr(self, name) for name in KNOBS}
        for i, (for_model, overrides) in enumerate(self._overrides):
            if for_model is None or for_model == model:
                values.update(overrides)
                del self._overrides[i]
                break
        plan = _Plan(**values, spec=parse_model(model))
        if plan.spec is not None:
            plan.delay, plan.ttft = plan.spec.delay, plan.spec.ttft
        return plan

    def _templates_for(self, model: str, plan: _Plan) -> _ChunkTemplates:
        spec = plan.spec
        key = (model, None, None) if spec is not None else (model, plan.reply, plan.tokens)
        templates = self._templates.get(key)
        if templates is None:
            pieces = (reply_pieces(spec.tokens) if spec is not None
                      else split_reply(plan.reply, plan.tokens))
            if len(self._templates) > 64:
                self._templates.clear()
            templates = self._templates[key] = _ChunkTemplates(model, pieces)
        return templates

    async def _models(self, _request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error_response(400, "invalid JSON body", "invalid_request_error", None)
        if not isinstance(body, dict):
            return _error_response(400, "body must be an object", "invalid_request_error", None)
        auth = request.headers.get("Authorization")
        self.request_count += 1
        if self.record:
            self.requests.append(RecordedRequest(
                body=body, authorization=auth, headers=dict(request.headers),
                peer=request.transport.get_extra_info("peername") if request.transport else None))
        self._notify()
        model = str(body.get("model") or "")
        plan = self._plan(model)

        if plan.fail_status:
            return self._fail(plan, model, auth)

        templates = self._templates_for(model, plan)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        n_pieces = len(templates.pieces)
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < n_pieces:
            n_pieces, finish = max_tokens, "length"
        prompt_tokens = _rough_prompt_tokens(body.get("messages"))

        if not body.get("stream"):
            return await self._non_stream(plan, model, templates, n_pieces, finish,
                                          prompt_tokens)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, plan, templates, n_pieces, finish, include_usage,
                                  prompt_tokens)

    def _fail(self, plan: _Plan, model: str, auth: str | None) -> web.Response:
        status = int(plan.fail_status or 500)
        headers: dict[str, str] = {}
        if plan.retry_after is not None:
            headers["retry-after"] = str(plan.retry_after)
        if plan.retry_after_ms is not None:
            headers["retry-after-ms"] = str(plan.retry_after_ms)
        if plan.fail_body is not None:
            return web.json_response(plan.fail_body, status=status, headers=headers)
        message, etype, code = _FAIL_DEFAULTS.get(
            status, ("The fake upstream failed.", "server_error", None))
        key = (auth or "")[7:] or "none"
        message = (plan.fail_message or message).format(key=key, model=model)
        return _error_response(status, message, etype, plan.fail_code or code, headers)

    async def _non_stream(self, plan: _Plan, model: str, templates: _ChunkTemplates,
                          n_pieces: int, finish: str, prompt_tokens: int) -> web.Response:
        if plan.ttft:
            await asyncio.sleep(plan.ttft)
        text = "".join(templates.texts[:n_pieces])
        self.completed += 1
        self._notify()
        return web.json_response({
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": templates.created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n_pieces,
                      "total_tokens": prompt_tokens + n_pieces},
        })

    async def _stream(self, request: web.Request, plan: _Plan, templates: _ChunkTemplates,
                      n_pieces: int, finish: str, include_usage: bool,
                      prompt_tokens: int) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        head = templates.head + f"chatcmpl-fake{next(self._ids)}".encode()
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.active_streams += 1
        self.streams_started += 1
        self._notify()
        finished = False
        try:
            await resp.prepare(request)
            await resp.write(head + templates.role)
            loop = asyncio.get_running_loop()
            if plan.ttft:
                await asyncio.sleep(plan.ttft)
            started = loop.time()
            for i in range(n_pieces):
                if i and plan.delay:
                    wait = started + i * plan.delay - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if plan.fail_after_chunks is not None and i >= plan.fail_after_chunks:
                    await resp.write(_stream_error_line())
                    await resp.write_eof()
                    finished = True
                    return resp
                if plan.stall_after_chunks is not None and i >= plan.stall_after_chunks:
                    await asyncio.Event().wait()  # until the client goes away (or stop())
                if plan.drop_after_chunks is not None and i >= plan.drop_after_chunks:
                    self._drop(request)
                    finished = True
                    return resp
                if plan.garbage_after_chunks is not None and i == plan.garbage_after_chunks:
                    await resp.write(b"data: {not json\n\n")
                if plan.truncate_after_chunks is not None and i >= plan.truncate_after_chunks:
                    await resp.write_eof()
                    finished = True
                    return resp
                await resp.write(head + templates.pieces[i])
                self.chunks_sent += 1
            if plan.fail_after_chunks is not None and plan.fail_after_chunks >= n_pieces:
                await resp.write(_stream_error_line())
                await resp.write_eof()
                finished = True
                return resp
            tail = head + templates.finish[finish]
            if include_usage:
                tail += head + templates.usage(prompt_tokens, n_pieces)
            await resp.write(tail + DONE)
            await resp.write_eof()
            finished = True
            self.completed += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            if not finished and not self._stopping:
                self.disconnects += 1
                self.disconnected.set()
            raise
        finally:
            self.active_streams -= 1
            if task is not None:
                self._tasks.discard(task)
            self._notify()

    def _drop(self, request: web.Request) -> None:
        self.drops += 1
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST, as a crashed peer's kernel does
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()


def _error_response(status: int, message: str, etype: str, code: str | None,
                    headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _stream_error_line() -> bytes:
    err = {"error": {"message": "The fake upstream failed mid-stream.", "type": "server_error",
                     "param": None, "code": "fake_stream_failure"}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"


def _rough_prompt_tokens(messages: Any) -> int:
    total = 3
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                total += 3 + len(str(m.get("content") or "").split())
    return total


__all__ = ["DEFAULT_REPLY", "KNOBS", "FakeOpenAI", "RecordedRequest", "Spec", "model_name",
           "parse_model", "reply_pieces", "reply_text", "split_reply"]


async def _main(port: int, reply: str | None, tokens: int | None, delay: float) -> None:
    fake = FakeOpenAI(reply=reply or DEFAULT_REPLY, tokens=tokens, delay=delay, port=port,
                      record=False)
    print(f"FakeOpenAI listening on {await fake.start()}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m promptline.devtools.fake_openai",
        description="An OpenAI-compatible fake server (the tests' and the bench's upstream).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reply", default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, args.reply, args.tokens, args.delay))

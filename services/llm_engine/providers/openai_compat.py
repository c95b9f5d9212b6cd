"""Provider for any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...).

The request goes out on one long-lived `aiohttp` session per configured model (one connection
pool), and the event stream is parsed here: the `openai` SDK's request builder and its httpx
response, decoder and line layers cost time to first chunk and CPU per chunk
(docs/performance.md).
What went wrong (an error status, an in-stream error event, a transport exception) is mapped
straight to a PromptlineError by one table (`openai_errors`). No retries here: the engine
retries and falls back, and only before the first token.
Every upstream response is closed in `finally`, whatever ends the stream (normal end, error,
consumer `aclose()`, cancellation), so a stopped client stops the paid generation.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp

from promptline.config import DeploymentConfig, ModelConfig
from promptline.errors import PromptlineError
from services.llm_engine.providers.base import Chunk, GenerationRequest, ReadPacer, Usage
from services.llm_engine.providers.openai_errors import (
    CAUGHT,
    TRUNCATED,
    MalformedStreamError,
    error_for,
    exception_error,
    status_error,
    stream_error,
)

log = logging.getLogger("promptline.llm_engine.openai")

CONNECT_TIMEOUT = 10.0
# Waiting for a free pooled connection plus connecting.
POOL_AND_CONNECT_TIMEOUT = 20.0
# The engine enforces the first-token and idle timeouts itself; the socket read timeout is a
# backstop above the longer of them (before the first token one read may wait `first_token`).
READ_TIMEOUT_SLACK = 5.0
# As the SDK's pool: far above any concurrency one engine process serves.
MAX_CONNECTIONS = 1000
# Longest single SSE line we buffer; a provider sending more without a newline is broken.
MAX_LINE_BYTES = 8 * 1024 * 1024
# Most of an error body we read (the message we pass on is cut to 200 characters anyway).
MAX_ERROR_BODY = 64 * 1024
USER_AGENT = "promptline-llm-engine"


class OpenAIProvider:
    """Streams chat completions from one deployment's OpenAI-compatible `base_url` (default:
    the model's own, a pool of one)."""

    kind = "openai"

    def __init__(self, model: ModelConfig, deployment: DeploymentConfig | None = None) -> None:
        target = deployment or model.pool[0]
        if not target.base_url:
            raise ValueError(f"model {model.name!r}: an openai provider needs a base_url")
        self.model = model
        self.deployment = target.name
        self.upstream_model = target.upstream_model or model.name
        self.url = target.base_url.rstrip("/") + "/chat/completions"
        self._proxy = target.proxy
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                         "User-Agent": USER_AGENT}
        if target.api_key:  # local servers (vLLM, Ollama) need none
            self._headers["Authorization"] = f"Bearer {target.api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=POOL_AND_CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT,
            sock_read=max(model.timeouts.first_token, model.timeouts.idle) + READ_TIMEOUT_SLACK)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The connection pool, created on first use (it needs the running event loop)."""
        if self._session is None:
            # No trust_env: aiohttp would then re-read the proxy variables and ~/.netrc on every
            # request (~0.9 ms each); the config resolved the proxy once (DeploymentConfig.proxy).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS), timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _params(self, request: GenerationRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model or self.upstream_model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.response_format is not None and request.response_format.is_json:
            params["response_format"] = request.response_format.to_openai()
        return params

    async def open_stream(self, params: dict[str, Any]) -> aiohttp.ClientResponse:
        """Send the request; the response with its body unread, whatever its status.

        Raises the transport's own exceptions (`openai_errors.CAUGHT` and any bug).
        """
        return await self.session.post(self.url, data=json.dumps(params).encode(),
                                       headers=self._headers, proxy=self._proxy)

    def _failed(self, err: PromptlineError, request: GenerationRequest, what: str
                ) -> PromptlineError:
        # What happened (a status, an exception type) only: provider messages can echo text we
        # do not log verbatim.
        log.warning("provider call failed: model=%s deployment=%s request_id=%s error=%s -> %s",
                    self.model.name, self.deployment, request.request_id, what, err.code.value)
        return err

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Yield the reply's text chunks, then one final chunk with finish_reason and usage."""
        try:
            response = await self.open_stream(self._params(request))
        except CAUGHT as exc:
            raise self._failed(exception_error(exc, in_stream=False), request,
                               type(exc).__name__) from None
        if response.status >= 300:
            err = await _status_error(response)
            raise self._failed(err, request, f"HTTP {response.status}") from None
        events = _sse_blocks(response.content, request.pace)
        try:
            finish_reason: str | None = None
            usage: Usage | None = None
            try:
                async for block in events:
                    # One chunk per block read: what arrived together goes on together.
                    texts: list[str] = []
                    done = False
                    failure: BaseException | None = None
                    try:
                        for payload in _payloads(block):
                            if payload is None:  # [DONE]
                                done = True
                                break
                            if not isinstance(payload, dict):
                                continue
                            if payload.get("error"):
                                failure = self._failed(stream_error(payload["error"]), request,
                                                       "error event")
                                break
                            text, finish = _choice_zero(payload.get("choices"))
                            finish_reason = finish or finish_reason
                            if reported := payload.get("usage"):
                                usage = _usage(reported)
                            if text:
                                texts.append(text)
                    except CAUGHT as exc:  # a broken event: what came before it still counts
                        failure = exc
                    if texts:
                        yield Chunk(text="".join(texts))
                    if failure is not None:
                        raise failure from None
                    if done:
                        # Read on to the end of the body: only a fully read response gives its
                        # connection back to the pool (else a new TCP connection per request,
                        # measured at ~1 ms of TTFT).
                        await response.content.read()
                        break
            except CAUGHT as exc:  # JSON and UTF-8 errors included
                raise self._failed(exception_error(exc, in_stream=True), request,
                                   type(exc).__name__) from None
            if finish_reason is None:
                # A clean end of body without a finish: a proxy or server cut the reply short.
                raise error_for(TRUNCATED)
            yield Chunk(finish_reason=finish_reason, usage=usage)
        finally:
            # release() pools a fully read connection; on any other end (error, aclose, cancel)
            # it closes the socket, which is what tells the provider to stop generating.
            response.release()
            await events.aclose()  # a loop left by break or raise does not close it


async def _status_error(response: aiohttp.ClientResponse) -> PromptlineError:
    """An error reply, mapped from its status, headers and (at most MAX_ERROR_BODY of) body."""
    try:
        body = await response.content.read(MAX_ERROR_BODY)
    except (TimeoutError, aiohttp.ClientError):
        body = b""  # the status alone still says what happened
    finally:
        response.close()
    return status_error(response.status, response.headers, body)


async def _sse_blocks(body: aiohttp.StreamReader, pace: ReadPacer | None = None
                      ) -> AsyncGenerator[list[bytes], None]:
    """The `data` of the server-sent events in each read (multi-line data joined, comments
    skipped), one list per read that completed at least one event.

    Reads whatever bytes have arrived and splits them here, rather than `readline()` per line:
    one wake-up for every event already buffered, and no 128 KiB line limit of its own. With
    `pace`, reads are spaced by its interval once the first text went out.
    """
    data: list[bytes] = []
    buffer = bytearray()
    loop = asyncio.get_running_loop()
    # The body's end or the connection's loss cuts a hold short: the end of a reply and a
    # provider that went away are seen at once, not at the hold's next read.
    ended: asyncio.Future[None] | None = None
    if pace is not None:
        ended = asyncio.ensure_future(body.wait_eof())
        ended.add_done_callback(functools.partial(_ended, pace))
    try:
        while True:
            block = b""
            if pace is not None and (wait := pace.wait(loop.time())):
                # What already arrived is read at once (a burst, the end of the reply): only an
                # empty buffer is waited on, until the pace allows the next read.
                block = body.read_nowait()
                if not block:
                    await pace.hold(wait)
            if not block:
                if pace is not None:
                    pace.read(loop.time())
                block = await body.readany()
                if not block:
                    break
            if not buffer and block.endswith(b"\n"):  # the usual case: whole events, no copy
                lines = block[:-1].split(b"\n")
            else:
                buffer += block
                end = buffer.rfind(b"\n")
                lines = bytes(buffer[:end]).split(b"\n") if end >= 0 else []
                del buffer[:end + 1]
            events: list[bytes] = []
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    if data:
                        events.append(b"\n".join(data))
                        data.clear()
                elif line.startswith(b"data:"):
                    data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            if events:
                yield events
            if len(buffer) > MAX_LINE_BYTES:
                raise MalformedStreamError("an event-stream line exceeds the size limit")
    finally:
        if ended is not None and not ended.done():
            ended.cancel()
            await asyncio.gather(ended, return_exceptions=True)


_DONE = b"[DONE]"


def _ended(pace: ReadPacer, task: asyncio.Future[None]) -> None:
    """`wait_eof` finished: the body is complete, or failed (the read that follows raises)."""
    if not task.cancelled():
        task.exception()  # retrieved here; the next read raises the failure itself
        pace.ended()


def _payloads(events: list[bytes]) -> Iterator[Any]:
    """The events' JSON payloads, in order, then None for `[DONE]` (nothing after it).

    One `json.loads` for the whole read, as an array; only a read with a broken event is
    parsed event by event, so the events before the broken one still count."""
    done = next((i for i, event in enumerate(events) if event.startswith(_DONE)), None)
    if done is not None:
        events = events[:done]
    try:
        parsed = json.loads(b"[" + b",".join(events) + b"]") if events else []
    except ValueError:
        parsed = None
    if parsed is not None and len(parsed) == len(events):
        yield from parsed
    else:  # broken, or an event of several values: raises at that event
        for event in events:
            yield json.loads(event)
    if done is not None:
        yield None


def _choice_zero(choices: Any) -> tuple[str, str | None]:
    """Text and finish_reason of choice 0 in one chunk (other choices are not requested).
    A chunk of another shape (content that is no string, choices that are no list) is a
    malformed stream, as a broken event is."""
    if not choices:
        return "", None
    if not isinstance(choices, list):
        raise MalformedStreamError("a chunk's choices are not a list")
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") if isinstance(delta, dict) else ""
            finish = choice.get("finish_reason")
            if not isinstance(text, str) or not isinstance(finish, str | None):
                raise MalformedStreamError("a chunk's content or finish_reason is not a string")
            return text, finish
    return "", None


def _usage(reported: Any) -> Usage:
    """A chunk's `usage`; counts that are no non-negative integers are a malformed stream."""
    if not isinstance(reported, dict):
        raise MalformedStreamError("a chunk's usage is not an object")
    counts = [reported.get("prompt_tokens") or 0, reported.get("completion_tokens") or 0]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise MalformedStreamError("a chunk's token counts are not counts")
    return Usage(prompt_tokens=counts[0], completion_tokens=counts[1],
                 cached_prompt_tokens=_cached_tokens(reported))


__all__ = ["OpenAIProvider"]


def _cached_tokens(usage: dict[str, Any]) -> int:
    """OpenAI's `usage.prompt_tokens_details.cached_tokens` (0 when absent or malformed)."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 \
        else 0

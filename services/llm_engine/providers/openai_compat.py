"""Provider for any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...).

The request goes out on one long-lived `aiohttp` session per configured model (one connection
pool), and the event stream is parsed here. Through the `openai` SDK (its aiohttp transport
included) the first chunk came 0.9-1.4 ms later and each paced chunk cost 25-45% more CPU: its
request builder and its httpx response, decoder and line layers (docs/performance.md).
Failures still speak the SDK's vocabulary (`openai.APIStatusError`, `APITimeoutError`,
`APIConnectionError`, `APIError`), so one table (`openai_errors`) maps them, whoever raised
them. No retries here: the engine retries and falls back, and only before the first token.
Every upstream response is closed in `finally`, whatever ends the stream (normal end, error,
consumer `aclose()`, cancellation), so a stopped client stops the paid generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai

from promptline.config import ModelConfig
from promptline.errors import ErrorCode, PromptlineError
from services.llm_engine.providers.base import Chunk, GenerationRequest, Usage
from services.llm_engine.providers.openai_errors import (
    ORIGIN,
    MalformedStreamError,
    map_openai_error,
)

log = logging.getLogger("promptline.llm_engine.openai")

CONNECT_TIMEOUT = 10.0
# Waiting for a free pooled connection plus connecting.
POOL_AND_CONNECT_TIMEOUT = 20.0
# The engine enforces the idle timeout itself; the socket read timeout is a backstop above it.
READ_TIMEOUT_SLACK = 5.0
# As the SDK's pool: far above any concurrency one engine process serves.
MAX_CONNECTIONS = 1000
# Longest single SSE line we buffer; a provider sending more without a newline is broken.
MAX_LINE_BYTES = 8 * 1024 * 1024
# Most of an error body we read (the message we pass on is cut to 200 characters anyway).
MAX_ERROR_BODY = 64 * 1024
USER_AGENT = "promptline-llm-engine"

TRUNCATED = "the model provider ended the stream before the reply was finished"


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible `base_url`."""

    kind = "openai"

    def __init__(self, model: ModelConfig) -> None:
        if not model.base_url:
            raise ValueError(f"model {model.name!r}: an openai provider needs a base_url")
        self.model = model
        self.upstream_model = model.upstream_model or model.name
        self.url = model.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                         "User-Agent": USER_AGENT}
        if model.api_key:  # local servers (vLLM, Ollama) need none
            self._headers["Authorization"] = f"Bearer {model.api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=POOL_AND_CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT,
            sock_read=model.timeouts.idle + READ_TIMEOUT_SLACK)
        # What the SDK's errors point at; never carries the key (headers are not attached).
        self._request = httpx2.Request("POST", self.url)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The connection pool, created on first use (it needs the running event loop)."""
        if self._session is None:
            # No trust_env: aiohttp would then re-read the proxy variables and ~/.netrc on every
            # request (~0.9 ms each); the config resolved the proxy once (ModelConfig.proxy).
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
        return params

    async def open_stream(self, params: dict[str, Any]) -> aiohttp.ClientResponse:
        """Send the request; the streaming response (status 2xx, body unread), or raise.

        Raises the SDK's error types: `APIStatusError` for any other status (its body read and
        parsed as the SDK does), `APITimeoutError`, `APIConnectionError`.
        """
        try:
            response = await self.session.post(self.url, data=json.dumps(params).encode(),
                                               headers=self._headers, proxy=self.model.proxy)
        except TimeoutError:
            raise openai.APITimeoutError(request=self._request) from None
        except aiohttp.ClientError:
            raise openai.APIConnectionError(request=self._request) from None
        if response.status < 300:
            return response
        try:
            raw = await response.content.read(MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            response.close()
        raise _status_error(response, raw, self._request)

    def _mapped(self, exc: BaseException, request: GenerationRequest, *, in_stream: bool = False
                ) -> PromptlineError:
        err = map_openai_error(exc, in_stream=in_stream)
        status = getattr(exc, "status_code", None)
        # Type and status only: provider messages can echo text we do not log verbatim.
        log.warning(
            "provider call failed: model=%s request_id=%s error=%s status=%s -> %s",
            self.model.name, request.request_id, type(exc).__name__, status, err.code.value,
        )
        return err

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield the reply's text chunks, then one final chunk with finish_reason and usage."""
        try:
            response = await self.open_stream(self._params(request))
        except (openai.OpenAIError, ValueError) as exc:
            raise self._mapped(exc, request) from None
        events = _sse_data(response.content)
        try:
            finish_reason: str | None = None
            usage: Usage | None = None
            try:
                async for data in events:
                    if data.startswith(b"[DONE]"):
                        # Read on to the end of the body: only a fully read response gives its
                        # connection back to the pool (else a new TCP connection per request,
                        # measured at ~1 ms of TTFT).
                        await response.content.read()
                        break
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        raise _stream_error(chunk["error"], self._request)
                    text, finish = _choice_zero(chunk.get("choices"))
                    finish_reason = finish or finish_reason
                    if reported := chunk.get("usage"):
                        usage = Usage(prompt_tokens=reported.get("prompt_tokens") or 0,
                                      completion_tokens=reported.get("completion_tokens") or 0)
                    if text:
                        yield Chunk(text=text)
            except TimeoutError:
                raise self._mapped(openai.APITimeoutError(request=self._request), request,
                                   in_stream=True) from None
            except aiohttp.ClientError:
                raise self._mapped(openai.APIConnectionError(request=self._request), request,
                                   in_stream=True) from None
            except (openai.OpenAIError, ValueError) as exc:  # JSON and UTF-8 errors included
                raise self._mapped(exc, request, in_stream=True) from None
            if finish_reason is None:
                # A clean end of body without a finish: a proxy or server cut the reply short.
                raise PromptlineError(ErrorCode.UPSTREAM_ERROR, TRUNCATED, retryable=True,
                                      origin=ORIGIN)
            yield Chunk(finish_reason=finish_reason, usage=usage)
        finally:
            # release() pools a fully read connection; on any other end (error, aclose, cancel)
            # it closes the socket, which is what tells the provider to stop generating.
            response.release()
            await events.aclose()  # a loop left by break or raise does not close it


async def _sse_data(body: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event (multi-line data joined, comments skipped).

    Reads whatever bytes have arrived and splits them here, rather than `readline()` per line:
    one wake-up for every event already buffered, and no 128 KiB line limit of its own.
    """
    data: list[bytes] = []
    buffer = bytearray()
    async for block in body.iter_any():
        if not buffer and block.endswith(b"\n"):  # the usual case: whole events, no copy
            lines = block[:-1].split(b"\n")
        else:
            buffer += block
            end = buffer.rfind(b"\n")
            lines = bytes(buffer[:end]).split(b"\n") if end >= 0 else []
            del buffer[:end + 1]
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        if len(buffer) > MAX_LINE_BYTES:
            raise MalformedStreamError("an event-stream line exceeds the size limit")
    if buffer.startswith(b"data:"):
        data.append(bytes(buffer[6:] if buffer.startswith(b"data: ") else buffer[5:]))
    if data:
        yield b"\n".join(data)


def _choice_zero(choices: Any) -> tuple[str, str | None]:
    """Text and finish_reason of choice 0 in one chunk (other choices are not requested)."""
    if not choices:
        return "", None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta") or {}
            return (delta.get("content") or "") if isinstance(delta, dict) else "", \
                choice.get("finish_reason")
    return "", None


def _status_error(response: aiohttp.ClientResponse, raw: bytes, request: httpx2.Request
                  ) -> openai.APIStatusError:
    """A non-2xx reply as the SDK would raise it: body parsed, `error` unwrapped."""
    text = raw.decode("utf-8", errors="replace").strip()
    body: object = text
    message = f"Error code: {response.status}"
    try:
        body = json.loads(text)
    except ValueError:
        pass
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
            message += f" - {body['message']}"
    return openai.APIStatusError(
        message, body=body,
        response=httpx2.Response(response.status, headers=list(response.headers.items()),
                                 request=request))


def _stream_error(error: Any, request: httpx2.Request) -> openai.APIError:
    """An in-stream `{"error": ...}` event, as the SDK itself would raise it."""
    message = error.get("message") if isinstance(error, dict) else None
    return openai.APIError(message=message if isinstance(message, str) and message
                           else "An error occurred during streaming",
                           request=request, body=error)


__all__ = ["OpenAIProvider"]

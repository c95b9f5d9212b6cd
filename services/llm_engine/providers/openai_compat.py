"""Provider for any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...), via the official SDK.

One `AsyncOpenAI` client (one connection pool) per configured model, reused for every request,
on the SDK's aiohttp transport (`DefaultAioHttpClient`): it halves the engine's CPU per
streamed token against the default httpx transport (docs/performance.md). The SDK's own
retries are off: the engine retries and falls back, and only before the first token. Every
upstream stream is closed in `finally`, whatever ends it (normal end, error, consumer
`aclose()`, cancellation), so a stopped client stops the paid generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as http
import openai

from promptline.config import ModelConfig
from promptline.errors import ErrorCode, PromptlineError
from services.llm_engine.providers.base import Chunk, GenerationRequest, Usage
from services.llm_engine.providers.openai_errors import ORIGIN, map_openai_error

log = logging.getLogger("promptline.llm_engine.openai")

CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
POOL_TIMEOUT = 10.0
# The engine enforces the idle timeout itself; the socket read timeout is a backstop above it.
READ_TIMEOUT_SLACK = 5.0

TRUNCATED = "the model provider ended the stream before the reply was finished"


class OpenAIProvider:
    """Streams chat completions from an OpenAI-compatible `base_url`."""

    kind = "openai"

    def __init__(self, model: ModelConfig, *, client: openai.AsyncOpenAI | None = None) -> None:
        if not model.base_url:
            raise ValueError(f"model {model.name!r}: an openai provider needs a base_url")
        self.model = model
        self.upstream_model = model.upstream_model or model.name
        self._client = client or openai.AsyncOpenAI(
            base_url=model.base_url,
            # The SDK refuses to start without a key; local servers (vLLM, Ollama) need none.
            api_key=model.api_key or "unset",
            max_retries=0,
            http_client=_aiohttp_client(),
            timeout=openai.Timeout(
                connect=CONNECT_TIMEOUT,
                read=model.timeouts.idle + READ_TIMEOUT_SLACK,
                write=WRITE_TIMEOUT,
                pool=POOL_TIMEOUT,
            ),
        )

    @property
    def client(self) -> openai.AsyncOpenAI:
        return self._client

    async def close(self) -> None:
        await self._client.close()

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

    async def open_stream(self, params: dict[str, Any]) -> http.Response:
        """Send the request; the raw streaming response, its body unread, or an SDK error.

        `client.post` (the SDK's documented way to call an endpoint with a raw response) rather
        than `chat.completions.create`: create() first walks the parameters through its type
        transform, ~1 ms per request, a no-op for the plain JSON built by `_params`. Auth
        headers, status errors and timeouts are the SDK's, as with create().
        """
        return await self._client.post("/chat/completions", body=params, cast_to=http.Response,
                                       stream=True)

    def _mapped(self, exc: BaseException, request: GenerationRequest, *, in_stream: bool = False
                ) -> PromptlineError:
        err = map_openai_error(exc, in_stream=in_stream)
        status = getattr(exc, "status_code", None)
        # Type and status only: SDK messages can echo provider text we do not log verbatim.
        log.warning(
            "provider call failed: model=%s request_id=%s error=%s status=%s -> %s",
            self.model.name, request.request_id, type(exc).__name__, status, err.code.value,
        )
        return err

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield the reply's text chunks, then one final chunk with finish_reason and usage."""
        # The SDK sends the request and raises its typed errors; the event stream itself is
        # parsed here with json.loads, because the SDK builds a pydantic object per chunk, which
        # measured ~0.5 ms per token (docs/performance.md) - most of the engine's CPU.
        try:
            response = await self.open_stream(self._params(request))
        except (openai.OpenAIError, ValueError) as exc:
            raise self._mapped(exc, request) from None
        try:
            finish_reason: str | None = None
            usage: Usage | None = None
            try:
                done = False
                async for data in _sse_data(response.aiter_lines()):
                    # Read on to the end of the body after [DONE]: an HTTP/1.1 connection goes
                    # back to the pool only when its response was consumed (else: a new TCP
                    # connection per request, measured at ~1 ms of TTFT).
                    if done or data.startswith("[DONE]"):
                        done = True
                        continue
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        raise _stream_error(chunk["error"], response)
                    text, finish = _choice_zero(chunk.get("choices"))
                    finish_reason = finish or finish_reason
                    if reported := chunk.get("usage"):
                        usage = Usage(prompt_tokens=reported.get("prompt_tokens") or 0,
                                      completion_tokens=reported.get("completion_tokens") or 0)
                    if text:
                        yield Chunk(text=text)
            except (openai.OpenAIError, ValueError) as exc:
                raise self._mapped(exc, request, in_stream=True) from None
            except http.TransportError:
                raise self._mapped(openai.APIConnectionError(request=response.request),
                                   request, in_stream=True) from None
            if finish_reason is None:
                # A clean end of body without a finish: a proxy or server cut the reply short.
                raise PromptlineError(ErrorCode.UPSTREAM_ERROR, TRUNCATED, retryable=True,
                                      origin=ORIGIN)
            yield Chunk(finish_reason=finish_reason, usage=usage)
        finally:
            try:
                await response.aclose()  # closes the upstream response
            except Exception as exc:  # a broken connection must not mask the real outcome
                log.debug("closing the upstream stream failed: %s", type(exc).__name__)


def _aiohttp_client() -> http.AsyncClient | None:
    """The SDK's aiohttp transport, or None (the SDK's httpx default) where it is missing."""
    try:
        return openai.DefaultAioHttpClient()
    except (AttributeError, RuntimeError) as exc:  # an SDK built without its aiohttp extra
        log.warning("the openai SDK's aiohttp transport is unavailable (%s): using its httpx "
                    "default, which costs about twice the CPU per streamed token", exc)
        return None


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined, comments skipped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data.clear()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data:
        yield "\n".join(data)


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


def _stream_error(error: Any, response: Any) -> openai.APIError:
    """An in-stream `{"error": ...}` event, as the SDK itself would raise it."""
    message = error.get("message") if isinstance(error, dict) else None
    return openai.APIError(message=message if isinstance(message, str) and message
                           else "An error occurred during streaming",
                           request=response.request, body=error)


__all__ = ["OpenAIProvider"]

"""Provider for any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...), via the official SDK.

One `AsyncOpenAI` client (one connection pool) per configured model, reused for every request.
The SDK's own retries are off: the engine retries and falls back, and only before the first
token. Every upstream stream is closed in `finally`, whatever ends it (normal end, error,
consumer `aclose()`, cancellation), so a stopped client stops the paid generation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

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
        upstream: openai.AsyncStream[Any] | None = None
        try:
            try:
                upstream = await self._client.chat.completions.create(**self._params(request))
            except (openai.OpenAIError, ValueError) as exc:
                raise self._mapped(exc, request) from None

            finish_reason: str | None = None
            usage: Usage | None = None
            while True:
                try:
                    chunk = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except (openai.OpenAIError, ValueError) as exc:
                    raise self._mapped(exc, request, in_stream=True) from None

                if chunk.usage is not None:
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens or 0,
                        completion_tokens=chunk.usage.completion_tokens or 0,
                    )
                text = ""
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.delta is not None and choice.delta.content:
                        text += choice.delta.content
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
                if text:
                    yield Chunk(text=text)

            if finish_reason is None:
                # A clean end of body without a finish: a proxy or server cut the reply short.
                raise PromptlineError(ErrorCode.UPSTREAM_ERROR, TRUNCATED, retryable=True,
                                      origin=ORIGIN)
            yield Chunk(finish_reason=finish_reason, usage=usage)
        finally:
            if upstream is not None:
                try:
                    await upstream.close()
                except Exception as exc:  # a broken connection must not mask the real outcome
                    log.debug("closing the upstream stream failed: %s", type(exc).__name__)


__all__ = ["OpenAIProvider"]

"""LlmEngine gRPC service: route a generation to its provider and stream it back.

Per request: validate, then try the model and its `fallback` list, retrying retryable provider
failures with exponential backoff and full jitter, but only while nothing has been sent to the
caller. Once the first frame went out the stream is final: an error ends it with an error frame
and the matching gRPC status. Every provider generator is closed in `finally`, so a cancel, an
error or a timeout also ends the upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from promptline.config import Config, ModelConfig
from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.grpc_server import RunningServer, start_grpc_server
from promptline.streams import error_frame
from promptline.tokens import count_messages, count_tokens
from promptline.v1 import common_pb2, llm_engine_pb2, llm_engine_pb2_grpc

from .providers.base import GenerationRequest, Message, Provider, Usage
from .providers.registry import build_providers
from .timeouts import StreamClock, next_chunk

log = logging.getLogger("promptline.llm_engine")

SERVICE_NAME = llm_engine_pb2.DESCRIPTOR.services_by_name["LlmEngine"].full_name
ORIGIN = "llm_engine"
# Failures another attempt or another model can cure; the rest would fail the same way again.
_FALLBACK_CODES = {ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED, ErrorCode.UNAVAILABLE}


@dataclass(slots=True)
class _Progress:
    started: bool = False
    delivered: bool = False


class LlmEngineServicer(llm_engine_pb2_grpc.LlmEngineServicer):
    """Implements LlmEngine.Generate over the configured providers."""

    def __init__(self, config: Config, providers: dict[str, Provider]) -> None:
        self._config = config
        self._providers = providers
        self.active_streams = 0
        """Generate calls in flight (read by tests and, later, the active-streams gauge)."""

    async def Generate(
        self, request: llm_engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        # An async generator (not context.write) so that gRPC interceptors, OpenTelemetry's
        # included, see every frame of the stream.
        rid = request.request_id or uuid.uuid4().hex
        progress = _Progress()
        self.active_streams += 1
        try:
            async with aclosing(self._generate(request, context, rid, progress)) as frames:
                async for frame in frames:
                    yield frame
        except PromptlineError as err:
            stage = Stage.MID_STREAM if progress.delivered else Stage.FIRST_PACKET
            yield error_frame(context, err.at(stage, request_id=rid, origin=ORIGIN),
                              llm_engine_pb2.GenerateResponse)
        except asyncio.CancelledError:
            log.info("stream cancelled by caller", extra={"request_id": rid})
            raise
        except Exception:
            log.exception("unexpected error in Generate", extra={"request_id": rid})
            yield error_frame(context, internal_error(rid).at(Stage.FIRST_PACKET, origin=ORIGIN),
                              llm_engine_pb2.GenerateResponse)
        finally:
            self.active_streams -= 1

    async def _generate(self, request: llm_engine_pb2.GenerateRequest,
                        context: grpc.aio.ServicerContext, rid: str, progress: _Progress
                        ) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        model = self._config.model(request.model)
        if model is None:
            raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown model {request.model!r}",
                                  stage=Stage.CONNECT)
        if not request.messages:
            raise PromptlineError(ErrorCode.INVALID_REQUEST, "messages must not be empty",
                                  stage=Stage.CONNECT)
        messages = tuple(Message(m.role, m.content) for m in request.messages)
        clock = StreamClock.start(model.timeouts, context.time_remaining())
        route = [model, *(m for n in model.fallback if (m := self._config.model(n)))]
        retries = self._config.retries
        last: PromptlineError | None = None
        for candidate in route:
            for attempt in range(retries.max_attempts):
                if last is not None:
                    clock.restart_first_token()
                try:
                    async with aclosing(self._attempt(candidate, request, messages, rid, clock,
                                                      progress)) as frames:
                        async for frame in frames:
                            yield frame
                    return
                except PromptlineError as err:
                    if progress.started or err.code not in _FALLBACK_CODES:
                        raise
                    last = err
                    log.warning("provider attempt failed before the first token",
                                extra={"request_id": rid, "model": candidate.name,
                                       "attempt": attempt + 1, "code": err.code.value})
                    if not err.retryable or attempt + 1 >= retries.max_attempts:
                        break
                    if not await _backoff(attempt, err, clock, self._config):
                        break
        assert last is not None
        raise last

    async def _attempt(self, model: ModelConfig, request: llm_engine_pb2.GenerateRequest,
                       messages: tuple[Message, ...], rid: str, clock: StreamClock,
                       progress: _Progress) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        provider = self._providers[model.name]
        gen = provider.stream(GenerationRequest(
            request_id=rid,
            model=model.upstream_model or model.name,
            messages=messages,
            max_tokens=request.max_tokens or model.default_max_tokens,
            temperature=request.temperature if request.HasField("temperature") else None,
        ))
        completion = 0
        finish: str | None = None
        usage: Usage | None = None
        try:
            while True:
                try:
                    chunk = await next_chunk(gen, clock)
                except StopAsyncIteration:
                    break
                if not progress.started:
                    progress.started = True
                    yield llm_engine_pb2.GenerateResponse(start=llm_engine_pb2.GenerateStart(
                        request_id=rid, model=model.name, provider=provider.kind))
                if chunk.text:
                    clock.on_token()
                    tokens = chunk.tokens or count_tokens(chunk.text)
                    completion += tokens
                    progress.delivered = True
                    yield llm_engine_pb2.GenerateResponse(
                        delta=common_pb2.Delta(text=chunk.text, tokens=tokens))
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
        finally:
            await gen.aclose()
        if finish is None:
            raise PromptlineError(ErrorCode.UPSTREAM_ERROR,
                                  "the model provider ended the stream without finishing")
        if usage is None:
            usage = Usage(count_messages((m.role, m.content) for m in messages), completion)
        yield llm_engine_pb2.GenerateResponse(done=common_pb2.Done(
            finish_reason=finish,
            model=model.name,
            usage=common_pb2.Usage(prompt_tokens=usage.prompt_tokens,
                                   completion_tokens=usage.completion_tokens,
                                   total_tokens=usage.total_tokens),
        ))


async def _backoff(attempt: int, err: PromptlineError, clock: StreamClock,
                   config: Config) -> bool:
    """Full-jitter exponential backoff, at least the provider's retry-after, within the budget.

    Returns False (do not retry this model) when the provider asks for a longer pause than
    `backoff_max` or the wait would outlive the request: the caller then gets the hint instead.
    """
    retries = config.retries
    if err.retry_after_ms / 1000 > retries.backoff_max:
        return False
    delay = random.uniform(0, min(retries.backoff_max, retries.backoff_base * 2 ** attempt))
    delay = max(delay, err.retry_after_ms / 1000)
    if delay >= clock.remaining():
        return False
    await asyncio.sleep(delay)
    return True


@dataclass
class EngineServer:
    """A running llm_engine: its gRPC server and the providers it owns."""

    grpc: RunningServer
    providers: dict[str, Provider]
    servicer: LlmEngineServicer

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await self.grpc.stop(grace)
        await asyncio.gather(*(p.close() for p in self.providers.values()))


async def start_engine(config: Config, address: str | None = None) -> EngineServer:
    """Start the engine on `address` (default: config.listen.llm_engine; use port 0 in tests)."""
    providers = build_providers(config)
    servicer = LlmEngineServicer(config, providers)
    running = await start_grpc_server(
        address or config.listen.llm_engine,
        lambda server: llm_engine_pb2_grpc.add_LlmEngineServicer_to_server(servicer, server),
        [SERVICE_NAME],
    )
    return EngineServer(running, providers, servicer)

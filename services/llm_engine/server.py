"""LlmEngine gRPC service: route a generation to a deployment of its model and stream it back.

Per request: validate, then try the model and its `fallback` list, but only while nothing has
been sent to the caller. Each attempt goes to the deployment the model's pool picks (pool.py),
one this request has not tried while there is one; a retry on a deployment already tried waits
an exponential backoff with full jitter, and only for retryable errors. Once the first frame went
out the stream is final: an error ends it with an error frame and the matching gRPC status.
Every provider generator is closed in `finally`, so a cancel, an error or a timeout also ends the
upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from opentelemetry.trace import SpanKind, StatusCode

from promptline.config import Config, ModelConfig
from promptline.config_reload import LiveConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.grpc_server import RunningServer, start_grpc_server
from promptline.metrics import (
    INTER_TOKEN_GAP,
    PROVIDER_FIRST_CHUNK,
    PROVIDER_REQUESTS,
)
from promptline.metrics_server import MetricsServer
from promptline.redis_store import STORE_ERRORS, RedisStore, connect_redis
from promptline.response_format import ResponseFormat, check_reply, check_response_format
from promptline.rules import check_stream_shape, invalid
from promptline.streams import Context, StreamLife, serve_stream
from promptline.tokens import count_messages_off_loop, count_tokens, get_tokenizer
from promptline.tracing import server_interceptors, tracer
from promptline.v1 import common_pb2, llm_engine_pb2, llm_engine_pb2_grpc

from .board import SharedBoard
from .pool import Attempt, Pools, shares_state
from .providers.base import GenerationRequest, ReadPacer, Usage
from .pump import ChunkPump
from .shaping import Shape, Shaper
from .timeouts import StreamClock

log = logging.getLogger("promptline.llm_engine")

SERVICE_NAME = llm_engine_pb2.DESCRIPTOR.services_by_name["LlmEngine"].full_name
ORIGIN = "llm_engine"
# Failures another attempt or another model can cure; the rest would fail the same way again. A
# first-token timeout moves on only to a deployment of the same model not tried yet (a stalled
# deployment may be a sick one), never to another model: the loop below.
_MOVE_ON_CODES = {ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED, ErrorCode.UNAVAILABLE,
                  ErrorCode.FIRST_TOKEN_TIMEOUT}


class LlmEngineServicer(llm_engine_pb2_grpc.LlmEngineServicer):
    """Implements LlmEngine.Generate over the configured providers."""

    def __init__(self, live: LiveConfig, pools: Pools) -> None:
        self._live = live
        self._pools = pools

    async def Generate(
        self, request: llm_engine_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        # An async generator (not context.write) so that gRPC interceptors, OpenTelemetry's
        # included, see every frame of the stream.
        config = self._live.current  # this stream keeps the config it started with
        life = StreamLife(ORIGIN, request.model, request.request_id or uuid.uuid4().hex,
                          logger=log, label=config.model_label(request.model))
        self._pools.follow(config)
        async for frame in serve_stream(life, self._generate(config, request, context, life),
                                        context, llm_engine_pb2.GenerateResponse):
            yield frame

    async def _generate(self, config: Config, request: llm_engine_pb2.GenerateRequest,
                        context: Context, life: StreamLife
                        ) -> AsyncGenerator[llm_engine_pb2.GenerateResponse, None]:
        model = config.model(request.model)
        if model is None:
            raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown model {request.model!r}",
                                  stage=Stage.CONNECT)
        if not request.messages:
            raise PromptlineError(ErrorCode.INVALID_REQUEST, "messages must not be empty",
                                  stage=Stage.CONNECT)
        if request.HasField("stream_shape"):
            check_stream_shape(request.stream_shape, "stream_shape")
        fmt = (await check_response_format(request.response_format)
               if request.HasField("response_format") else None)
        if request.json_validate and (fmt is None or not fmt.is_json):
            raise invalid("json_validate needs a response_format of type json_object or "
                          "json_schema")
        check = fmt if request.json_validate else None
        clock = StreamClock.start(model.timeouts, context.time_remaining())
        route = [model, *(m for n in model.fallback if (m := config.model(n)))]
        last: PromptlineError | None = None
        stalled: PromptlineError | None = None  # a FIRST_TOKEN_TIMEOUT: what the caller gets
        committed = False  # a frame went to the caller: no more retries or fallbacks
        for candidate in route:
            pool = self._pools.get(candidate)
            tried: list[str] = []
            for attempt in range(config.retries.max_attempts):
                try:
                    chosen = await pool.choose(tried)
                    if chosen.name in tried:  # each one tried: a retry on one, after the backoff
                        assert last is not None
                        # A deployment that stalled is not waited on twice (raised below).
                        if stalled is not None or not last.retryable or not await _backoff(
                                attempt - 1, last, clock, config):
                            break
                        chosen = await pool.choose(tried)  # the room seen before may be taken
                except PromptlineError as err:  # every deployment at a limit: the next model
                    last = err
                    break
                tried.append(chosen.name)
                if last is not None:
                    clock.restart_first_token()
                try:
                    async with aclosing(self._attempt(candidate, chosen, request, clock,
                                                      life, fmt, check)) as frames:
                        async for frame in frames:
                            committed = True
                            yield frame
                    return
                except PromptlineError as err:
                    if committed or err.code not in _MOVE_ON_CODES:
                        raise
                    last = err
                    if err.code is ErrorCode.FIRST_TOKEN_TIMEOUT:
                        stalled = err
                    log.warning("provider attempt failed before the first token",
                                extra={"request_id": life.request_id, "model": candidate.name,
                                       "deployment": chosen.name, "attempt": attempt + 1,
                                       "code": err.code.value})
            if stalled is not None:
                raise stalled  # another deployment of the model, yes; another model, no
        assert last is not None
        raise last

    async def _attempt(self, model: ModelConfig, chosen: Attempt,
                       request: llm_engine_pb2.GenerateRequest, clock: StreamClock,
                       life: StreamLife, fmt: ResponseFormat | None = None,
                       check: ResponseFormat | None = None
                       ) -> AsyncGenerator[llm_engine_pb2.GenerateResponse, None]:
        """One provider call on the chosen deployment: provider chunks -> frames, bounded by the
        stream's clock; with `check` (json_validate), the finished reply is checked against it
        before `done`."""
        rid = life.request_id
        provider = chosen.provider
        shape = _shape(model, request)
        pace = ReadPacer(shape.coalesce_ms / 1000) if shape.active else None
        gen = provider.stream(GenerationRequest(
            request_id=rid,
            model=chosen.deployment.upstream_model,
            messages=request.messages,  # not copies: see ChatPlan.without_messages
            max_tokens=request.max_tokens or model.default_max_tokens,
            temperature=request.temperature if request.HasField("temperature") else None,
            pace=pace,
            response_format=fmt,
        ))
        # Not made current: a span attached across the generator's yields would be detached in
        # another context when the caller cancels.
        span = tracer.start_span(f"provider {provider.kind}", kind=SpanKind.CLIENT, attributes={
            "promptline.request_id": rid, "llm.model": model.name, "llm.provider": provider.kind,
            "llm.deployment": chosen.name})
        gap = INTER_TOKEN_GAP.labels(model.name)
        called = last = time.perf_counter()
        completion = 0
        finish: str | None = None
        usage: Usage | None = None
        outcome = "cancelled"
        first = True
        pump = ChunkPump(gen, clock, pace)
        shaper = Shaper(shape, paced=True) if shape.active else None
        reply: list[str] | None = [] if check is not None else None  # the text to check
        loop = asyncio.get_running_loop()
        # The end-of-stream log names the deployment that answered (or was tried last).
        life.fields.update(deployment_model=model.name, deployment=chosen.name)
        chosen.begin()
        try:
            while True:
                batch = await pump.take(shaper.wait(loop.time()) if shaper else None)
                if batch is None:  # held text is due
                    assert shaper is not None
                    if out := shaper.due(loop.time()):
                        yield _delta(*out)
                    continue
                if not batch:
                    break
                if first:
                    first = False
                    waited = time.perf_counter() - called
                    PROVIDER_FIRST_CHUNK.labels(model.name, provider.kind).observe(waited)
                    chosen.answered(waited)
                    yield llm_engine_pb2.GenerateResponse(start=llm_engine_pb2.GenerateStart(
                        request_id=rid, model=model.name, provider=provider.kind,
                        deployment=chosen.name))
                text: list[str] = []
                tokens = 0
                for chunk in batch:
                    if chunk.text:
                        text.append(chunk.text)
                        tokens += chunk.tokens or count_tokens(chunk.text)
                    finish = chunk.finish_reason or finish
                    usage = chunk.usage or usage
                if text:
                    now = time.perf_counter()
                    if life.delivered:
                        gap.observe(now - last)
                    else:
                        life.text_delivered()
                        span.set_attribute("llm.ttft_ms", round((now - called) * 1000, 1))
                    last = now
                    completion += tokens
                    if reply is not None:
                        reply.extend(text)
                    if shaper is None:
                        yield _delta("".join(text), tokens)
                    elif out := shaper.feed("".join(text), tokens, loop.time()):
                        yield _delta(*out)
            if shaper is not None and (out := shaper.flush()):
                yield _delta(*out)
            if finish is None:
                raise PromptlineError(ErrorCode.UPSTREAM_ERROR,
                                      "the model provider ended the stream without finishing")
            outcome = "ok"
        except PromptlineError as err:
            outcome = err.code.value
            span.set_status(StatusCode.ERROR, err.code.value)
            await chosen.failed(err)  # before `end` gives a probe's lease back
            if shaper is not None and (out := shaper.flush()):
                yield _delta(*out)  # what the provider produced before it failed is delivered
            raise
        finally:
            await pump.aclose()
            chosen.end(outcome)
            if outcome != "ok":
                chosen.used(completion)
            PROVIDER_REQUESTS.labels(model.name, provider.kind, outcome).inc()
            span.set_attribute("llm.completion_tokens", completion)
            span.end()
        if usage is None:
            usage = Usage(await count_messages_off_loop(request.messages), completion)
        chosen.used(usage.total_tokens)
        if check is not None and reply is not None:
            await _check_reply(check, "".join(reply), finish, life)
        span.set_attribute("llm.prompt_tokens", usage.prompt_tokens)
        yield llm_engine_pb2.GenerateResponse(done=common_pb2.Done(
            finish_reason=finish,
            model=model.name,
            deployment=chosen.name,
            usage=common_pb2.Usage(prompt_tokens=usage.prompt_tokens,
                                   completion_tokens=usage.completion_tokens,
                                   total_tokens=usage.total_tokens,
                                   cached_prompt_tokens=usage.cached_prompt_tokens),
        ))


async def _check_reply(check: ResponseFormat, text: str, finish: str, life: StreamLife) -> None:
    """json_validate: the model's output, once finished, against the format. A mismatch is the
    model's fault, not the deployment's (checked after the attempt, so no breaker counts it):
    UPSTREAM_ERROR at mid_stream, after the whole reply was delivered."""
    failure = await check_reply(check, text, finish)
    life.fields["json_valid"] = failure is None
    if failure is not None:
        raise PromptlineError(ErrorCode.UPSTREAM_ERROR, failure, stage=Stage.MID_STREAM)


def _delta(text: str, tokens: int) -> llm_engine_pb2.GenerateResponse:
    return llm_engine_pb2.GenerateResponse(delta=common_pb2.Delta(text=text, tokens=tokens))


def _shape(model: ModelConfig, request: llm_engine_pb2.GenerateRequest) -> Shape:
    """The model's shaping with the request's overrides."""
    stream = model.stream
    return Shape(stream.coalesce_ms, stream.min_chars, stream.boundary).with_overrides(
        request.stream_shape if request.HasField("stream_shape") else None)


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
    """A running llm_engine: its gRPC server, metrics endpoint, the pools (and providers) it
    owns, and its Redis client (None without Redis in the config)."""

    grpc: RunningServer
    metrics: MetricsServer
    pools: Pools
    servicer: LlmEngineServicer
    live: LiveConfig
    redis: RedisStore | None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await self.grpc.stop(grace)
        await self.metrics.stop()
        await self.pools.close()
        if self.redis is not None:
            await self.redis.close()


async def start_engine(config: Config, address: str | None = None, *,
                       live: LiveConfig | None = None) -> EngineServer:
    """Start the engine on `address` (default: config.listen.llm_engine; use port 0 in tests)."""
    live = live or LiveConfig(config, "llm_engine")
    redis = await _connect_redis(config)
    pools = Pools(SharedBoard(redis.client if redis else None, config.quota_policy.redis_timeout))
    for model in config.models:  # build eagerly: a broken provider fails start-up, not a request
        pools.get(model)
    pools.follow(config)
    await pools.sync()  # the breakers as the other replicas left them, before the first request
    get_tokenizer()  # loading cl100k takes ~250 ms: before serving, not in the first request
    servicer = LlmEngineServicer(live, pools)
    running = await start_grpc_server(
        address or config.listen.llm_engine,
        lambda server: llm_engine_pb2_grpc.add_LlmEngineServicer_to_server(servicer, server),
        [SERVICE_NAME],
        interceptors=server_interceptors(),
    )
    metrics = await MetricsServer().start(config.listen.llm_engine_metrics)
    return EngineServer(running, metrics, pools, servicer, live, redis)


async def _connect_redis(config: Config) -> RedisStore | None:
    """The client the pools share their state through, when the config has a Redis (it has in
    every deployment: the prompt service needs one); None: each replica on its own."""
    if config.redis_url is None and config.redis_mode != "sentinel":
        log.info("no Redis configured: deployment health and limits are this replica's own")
        return None
    store = connect_redis(config)
    if any(shares_state(model) for model in config.models):  # else no call until a reload
        try:
            async with asyncio.timeout(config.quota_policy.redis_timeout * 8):
                await store.connect()
        except STORE_ERRORS as exc:  # it connects again on first use
            log.warning("Redis not reachable at start (%s)", type(exc).__name__)
    return store

"""PromptService gRPC service: authenticate, validate, moderate, admit, then relay the engine.

Stages of one StreamChat: auth (metadata) -> plan (validation, token budget) -> input moderation
-> quota admission (one Redis round trip) -> engine call -> relay through output moderation ->
quota reconciliation (one Redis round trip, in `finally`).

The relay is one loop over `read_frames` (which ends on the first terminal frame and cancels the
engine call in `finally`), so an error, a timeout or the caller's cancel stops both hops at once.
A downstream error is relayed with its code, stage and details unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from promptline.auth import Authenticator
from promptline.config import Config
from promptline.embedded_redis import EmbeddedRedis
from promptline.errors import PromptlineError, Stage, internal_error
from promptline.grpc_server import RunningServer, insecure_channel, start_grpc_server
from promptline.ratelimit import rejection_limits
from promptline.streams import fail_stream, read_frames
from promptline.v1 import (
    common_pb2,
    llm_engine_pb2,
    llm_engine_pb2_grpc,
    prompt_pb2,
    prompt_pb2_grpc,
)

from .chat_plan import ChatPlan, plan_chat
from .moderation import Moderator, build_moderator
from .quotas import QuotaManager

log = logging.getLogger("promptline.prompt")

SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
ORIGIN = "prompt"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(slots=True)
class _Progress:
    delivered: bool = False
    """Text reached the caller: from here on errors are mid_stream."""
    completion_tokens: int = 0
    usage: common_pb2.Usage | None = None


class PromptServicer(prompt_pb2_grpc.PromptServiceServicer):
    """Implements PromptService.StreamChat."""

    def __init__(self, config: Config, engine: llm_engine_pb2_grpc.LlmEngineStub,
                 quotas: QuotaManager, moderator: Moderator) -> None:
        self._config = config
        self._auth = Authenticator(config.tenants)
        self._engine = engine
        self._quotas = quotas
        self._moderator = moderator

    async def StreamChat(
        self, request: prompt_pb2.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> None:
        metadata = dict(context.invocation_metadata() or ())
        rid = _request_id(request.request_id or metadata.get("x-request-id", ""))
        progress = _Progress()
        try:
            await self._stream_chat(request, context, metadata, rid, progress)
        except PromptlineError as err:
            stage = Stage.MID_STREAM if progress.delivered else Stage.FIRST_PACKET
            await fail_stream(context, err.at(stage, request_id=rid, origin=ORIGIN),
                              prompt_pb2.StreamChatResponse,
                              tuple(rejection_limits(self._config, err).headers().items()))
        except asyncio.CancelledError:
            log.info("stream cancelled by caller", extra={"request_id": rid})
            raise
        except Exception:
            log.exception("unexpected error in StreamChat", extra={"request_id": rid})
            await fail_stream(context, internal_error(rid).at(Stage.FIRST_PACKET, origin=ORIGIN),
                              prompt_pb2.StreamChatResponse)

    async def _stream_chat(self, request: prompt_pb2.StreamChatRequest,
                           context: grpc.aio.ServicerContext, metadata: dict[str, str],
                           rid: str, progress: _Progress) -> None:
        # Cheapest checks first: auth and validation touch neither Redis nor the model.
        tenant = self._auth.tenant_for_header(metadata.get("authorization"))
        plan = plan_chat(self._config, tenant, request)
        await self._moderator.check_input([m.content for m in plan.messages])
        reservation = await self._quotas.admit(tenant, plan.model,
                                               plan.prompt_tokens + plan.max_tokens, rid)
        try:
            await context.send_initial_metadata(tuple(reservation.limits.headers().items()))
            call = self._engine.Generate(
                llm_engine_pb2.GenerateRequest(
                    request_id=rid,
                    model=plan.model.name,
                    messages=plan.messages,
                    max_tokens=plan.max_tokens,
                    temperature=request.temperature if request.HasField("temperature") else None,
                    tenant=tenant.name,
                ),
                timeout=context.time_remaining(),
            )
            await self._relay(call, request, plan, context, rid, progress)
        finally:
            # Reconcile TPM to what was really used; a stream that produced nothing is refunded.
            if progress.usage is not None:
                await reservation.settle(progress.usage.total_tokens)
            elif progress.completion_tokens:
                await reservation.settle(plan.prompt_tokens + progress.completion_tokens)
            else:
                await reservation.refund()

    async def _relay(self, call: grpc.aio.UnaryStreamCall, request: prompt_pb2.StreamChatRequest,
                     plan: ChatPlan, context: grpc.aio.ServicerContext, rid: str,
                     progress: _Progress) -> None:
        """Engine frames -> output moderation -> caller, until the first terminal frame."""
        output = self._moderator.output_filter()
        held_tokens = 0  # tokens of text the moderation filter is still holding back
        async with aclosing(read_frames(call)) as frames:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    progress.completion_tokens += frame.delta.tokens
                    held_tokens += frame.delta.tokens
                    text = output.feed(frame.delta.text)
                    if text:
                        progress.delivered = True
                        await context.write(prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=text, tokens=held_tokens)))
                        held_tokens = 0
                elif kind == "start":
                    await context.write(prompt_pb2.StreamChatResponse(start=prompt_pb2.ChatStart(
                        request_id=rid,
                        model=frame.start.model,
                        conversation_id=request.conversation_id,
                        prompt_tokens=plan.prompt_tokens,
                    )))
                elif kind == "done":
                    tail = output.flush()
                    if tail:
                        await context.write(prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=tail, tokens=held_tokens)))
                    progress.usage = frame.done.usage
                    await context.write(prompt_pb2.StreamChatResponse(done=frame.done))


def _request_id(candidate: str) -> str:
    return candidate if _SAFE_ID.fullmatch(candidate) else uuid.uuid4().hex


@dataclass
class PromptServer:
    """A running prompt service and the clients it owns."""

    grpc: RunningServer
    engine_channel: grpc.aio.Channel
    redis: aioredis.Redis
    embedded_redis: EmbeddedRedis | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await self.grpc.stop(grace)
        await self.engine_channel.close()
        await self.redis.aclose()
        if self.embedded_redis:
            self.embedded_redis.stop()


async def start_prompt(config: Config, address: str | None = None) -> PromptServer:
    """Start the prompt service (default address: config.listen.prompt; port 0 in tests)."""
    embedded = None
    redis_url = config.redis_url
    if redis_url is None:
        log.warning("no redis_url configured: starting an embedded Redis for local use "
                    "(replicas will not share quotas or history)")
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
    redis = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    channel = insecure_channel(config.llm_engine_target)
    servicer = PromptServicer(config, llm_engine_pb2_grpc.LlmEngineStub(channel),
                              QuotaManager(redis, config.quota_policy),
                              build_moderator(config.moderation))
    running = await start_grpc_server(
        address or config.listen.prompt,
        lambda server: prompt_pb2_grpc.add_PromptServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
    )
    return PromptServer(running, channel, redis, embedded)

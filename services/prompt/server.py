"""PromptService gRPC service: authenticate, validate, plan, then relay the engine's stream.

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
from promptline.streams import fail_stream, read_frames
from promptline.v1 import llm_engine_pb2, llm_engine_pb2_grpc, prompt_pb2, prompt_pb2_grpc

from .chat_plan import plan_chat

log = logging.getLogger("promptline.prompt")

SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
ORIGIN = "prompt"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(slots=True)
class _Progress:
    delivered: bool = False


class PromptServicer(prompt_pb2_grpc.PromptServiceServicer):
    """Implements PromptService.StreamChat."""

    def __init__(self, config: Config, engine: llm_engine_pb2_grpc.LlmEngineStub,
                 redis: aioredis.Redis) -> None:
        self._config = config
        self._auth = Authenticator(config.tenants)
        self._engine = engine
        self._redis = redis

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
                              prompt_pb2.StreamChatResponse)
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
        tenant = self._auth.tenant_for_header(metadata.get("authorization"))
        plan = plan_chat(self._config, request)
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
        async with aclosing(read_frames(call)) as frames:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    progress.delivered = True
                    await context.write(prompt_pb2.StreamChatResponse(delta=frame.delta))
                elif kind == "start":
                    await context.write(prompt_pb2.StreamChatResponse(start=prompt_pb2.ChatStart(
                        request_id=rid,
                        model=frame.start.model,
                        conversation_id=request.conversation_id,
                        prompt_tokens=plan.prompt_tokens,
                    )))
                elif kind == "done":
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
    servicer = PromptServicer(config, llm_engine_pb2_grpc.LlmEngineStub(channel), redis)
    running = await start_grpc_server(
        address or config.listen.prompt,
        lambda server: prompt_pb2_grpc.add_PromptServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
    )
    return PromptServer(running, channel, redis, embedded)

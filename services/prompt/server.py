"""PromptService gRPC service: authenticate, validate, moderate, admit, then relay the engine.

Stages of one StreamChat: auth (metadata) -> plan (validation, managed prompt, conversation
history, context-window fit) -> input moderation -> quota admission (one Redis round trip) ->
engine call -> relay through output moderation -> history append (with a conversation: before the
`done` frame, or marked partial when text was delivered and the stream then failed) -> quota
reconciliation (one Redis round trip, in `finally`).

The same gRPC server also serves `PromptAdmin` (`admin.py`): prompt versions, labels and
conversation history.

The relay is one loop over `read_frames` (which ends on the first terminal frame and cancels the
engine call in `finally`), so an error, a timeout or the caller's cancel stops both hops at once.
A downstream error is relayed with its code, stage and details unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio as aioredis
from opentelemetry import trace

from promptline.auth import Authenticator
from promptline.config import Config
from promptline.config_reload import LiveConfig
from promptline.embedded_redis import EmbeddedRedis
from promptline.errors import PromptlineError, Stage, internal_error
from promptline.grpc_server import RunningServer, insecure_channel, start_grpc_server
from promptline.metrics import (
    ACTIVE_STREAMS,
    ERRORS,
    QUOTA_REJECTIONS,
    TOKENS,
    MetricsServer,
    StreamTimer,
)
from promptline.ratelimit import parse_quota_subject, rejection_limits
from promptline.streams import error_frame, read_frames
from promptline.tokens import get_tokenizer
from promptline.tracing import client_interceptors, server_interceptors
from promptline.v1 import (
    common_pb2,
    llm_engine_pb2,
    llm_engine_pb2_grpc,
    prompt_admin_pb2,
    prompt_admin_pb2_grpc,
    prompt_pb2,
    prompt_pb2_grpc,
)

from .admin import PromptAdminServicer
from .chat_plan import ChatPlan, plan_chat
from .context_fit import MessageTokenCounts
from .history import ConversationStore, exchange
from .moderation import Moderator, build_moderator
from .prompts import PromptRegistry
from .quotas import QuotaManager

log = logging.getLogger("promptline.prompt")

SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
ADMIN_SERVICE_NAME = prompt_admin_pb2.DESCRIPTOR.services_by_name["PromptAdmin"].full_name
ORIGIN = "prompt"
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ACTIVE = ACTIVE_STREAMS.labels("prompt")


@dataclass(slots=True)
class _Progress:
    delivered: bool = False
    """Text reached the caller: from here on errors are mid_stream."""
    completion_tokens: int = 0
    usage: common_pb2.Usage | None = None
    tenant: str = ""
    plan: ChatPlan | None = None
    reply: list[str] = field(default_factory=list)
    """Text written to the caller, for conversation history."""
    remembered: bool = False


class PromptServicer(prompt_pb2_grpc.PromptServiceServicer):
    """Implements PromptService.StreamChat."""

    def __init__(self, live: LiveConfig, engine: llm_engine_pb2_grpc.LlmEngineStub,
                 quotas: QuotaManager, prompts: PromptRegistry | None = None,
                 conversations: ConversationStore | None = None) -> None:
        self._live = live
        self._engine = engine
        self._quotas = quotas
        self._prompts = prompts
        self._conversations = conversations
        self.background: set[asyncio.Task[None]] = set()
        """History writes of cancelled streams; `PromptServer.stop` waits for them."""
        self.token_counts = MessageTokenCounts()
        """Counts of long messages that clients re-send every turn."""

    async def StreamChat(
        self, request: prompt_pb2.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        # An async generator (not context.write) so that gRPC interceptors, OpenTelemetry's
        # included, see every frame of the stream.
        metadata = dict(context.invocation_metadata() or ())
        rid = _request_id(request.request_id or metadata.get("x-request-id", ""))
        config = self._live.current  # this stream keeps the config it started with
        trace.get_current_span().set_attribute("promptline.request_id", rid)
        progress = _Progress()
        timer = StreamTimer("prompt", request.model)
        outcome = "cancelled"
        _ACTIVE.inc()
        try:
            async with aclosing(self._stream_chat(config, request, context, metadata, rid,
                                                  progress)) as frames:
                async for frame in frames:
                    yield frame
            outcome = "done"
        except PromptlineError as err:
            stage = Stage.MID_STREAM if progress.delivered else Stage.FIRST_PACKET
            outcome = err.code.value
            yield self._error(context, config, err.at(stage, request_id=rid, origin=ORIGIN),
                              progress)
            # After the error frame, so the caller learns of the error without waiting on Redis.
            await self._remember(progress, rid, partial=True)
        except asyncio.CancelledError:
            log.info("stream cancelled by caller", extra={"request_id": rid})
            raise
        except Exception:
            log.exception("unexpected error in StreamChat", extra={"request_id": rid})
            outcome = "INTERNAL"
            yield self._error(context, config,
                              internal_error(rid).at(Stage.FIRST_PACKET, origin=ORIGIN), progress)
            await self._remember(progress, rid, partial=True)
        finally:
            _ACTIVE.dec()
            timer.finish(outcome)
            usage = progress.usage
            log.info("chat stream ended", extra={
                "request_id": rid, "tenant": progress.tenant,
                "model": progress.plan.model.name if progress.plan else request.model,
                "outcome": outcome, "completion_tokens": usage.completion_tokens if usage
                else progress.completion_tokens,
                "duration_ms": round((time.perf_counter() - timer.started) * 1000)})
            if progress.delivered and not progress.remembered:
                # Cancelled or closed mid-stream: store the partial reply from a task of its own.
                task = asyncio.create_task(self._remember(progress, rid, partial=True))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    def _error(self, context: grpc.aio.ServicerContext, config: Config, err: PromptlineError,
               progress: _Progress) -> prompt_pb2.StreamChatResponse:
        ERRORS.labels("prompt", err.code.value, err.stage.value if err.stage else "").inc()
        if err.quota_subject:
            scope, _, kind = parse_quota_subject(err.quota_subject)
            QUOTA_REJECTIONS.labels(progress.tenant or "", f"{scope}:{kind}").inc()
        return error_frame(context, err, prompt_pb2.StreamChatResponse,
                           tuple(rejection_limits(config, err).headers().items()))

    async def _stream_chat(self, config: Config, request: prompt_pb2.StreamChatRequest,
                           context: grpc.aio.ServicerContext, metadata: dict[str, str],
                           rid: str, progress: _Progress
                           ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        # Cheapest checks first: auth touches nothing; the plan validates before it reads a
        # prompt or a conversation from Redis, and nothing before admission calls the model.
        auth = self._live.derived("auth", lambda c: Authenticator(c.tenants))
        tenant = auth.tenant_for_header(metadata.get("authorization"))
        progress.tenant = tenant.name
        plan = await plan_chat(config, tenant, request, self._prompts, self._conversations,
                               self.token_counts)
        progress.plan = plan
        moderator = self._live.derived("moderator", lambda c: build_moderator(c.moderation))
        await moderator.check_input([m.content for m in plan.messages])
        reservation = await self._quotas.admit(tenant, plan.model,
                                               plan.prompt_tokens + plan.max_tokens, rid)
        try:
            call = self._engine.Generate(
                llm_engine_pb2.GenerateRequest(
                    request_id=rid,
                    model=plan.model.name,
                    messages=plan.messages,
                    max_tokens=plan.max_tokens,
                    temperature=plan.temperature,
                    tenant=tenant.name,
                ),
                timeout=context.time_remaining(),
            )
            plan = progress.plan = plan.without_messages()
            try:
                # The engine call is on its way while the quota headers go out (one gRPC
                # round trip less before the first token); no frame is yielded before them.
                await context.send_initial_metadata(tuple(reservation.limits.headers().items()))
            except BaseException:
                call.cancel()
                raise
            async with aclosing(self._relay(call, request, plan, moderator, rid,
                                            progress)) as frames:
                async for frame in frames:
                    yield frame
        finally:
            # Reconcile TPM to what was really used; a stream that produced nothing is refunded.
            if progress.usage is not None:
                used_in, used_out = progress.usage.prompt_tokens, progress.usage.completion_tokens
            else:
                used_in = plan.prompt_tokens if progress.completion_tokens else 0
                used_out = progress.completion_tokens
            if used_in or used_out:
                TOKENS.labels(tenant.name, plan.model.name, "in").inc(used_in)
                TOKENS.labels(tenant.name, plan.model.name, "out").inc(used_out)
                await reservation.settle(used_in + used_out)
            else:
                await reservation.refund()

    async def _relay(self, call: grpc.aio.UnaryStreamCall, request: prompt_pb2.StreamChatRequest,
                     plan: ChatPlan, moderator: Moderator, rid: str, progress: _Progress
                     ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        """Engine frames -> output moderation -> caller, until the first terminal frame."""
        output = moderator.output_filter()
        held_tokens = 0  # tokens of text the moderation filter is still holding back
        # Only a conversation stores the reply; without one, a long reply is not kept in memory.
        reply = progress.reply if plan.conversation_id else None
        async with aclosing(read_frames(call)) as frames:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    progress.completion_tokens += frame.delta.tokens
                    held_tokens += frame.delta.tokens
                    text = output.feed(frame.delta.text)
                    if text:
                        progress.delivered = True
                        if reply is not None:
                            reply.append(text)
                        yield prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=text, tokens=held_tokens))
                        held_tokens = 0
                elif kind == "start":
                    yield prompt_pb2.StreamChatResponse(start=prompt_pb2.ChatStart(
                        request_id=rid,
                        model=frame.start.model,
                        conversation_id=request.conversation_id,
                        prompt_id=plan.prompt.prompt_id if plan.prompt else "",
                        prompt_version=plan.prompt.version if plan.prompt else 0,
                        prompt_tokens=plan.prompt_tokens,
                    ))
                elif kind == "done":
                    tail = output.flush()
                    if tail:
                        if reply is not None:
                            reply.append(tail)
                        yield prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=tail, tokens=held_tokens))
                    progress.usage = frame.done.usage
                    # Stored before `done`, so a caller's next request already sees this turn.
                    await self._remember(progress, rid, partial=False)
                    yield prompt_pb2.StreamChatResponse(done=frame.done)

    async def _remember(self, progress: _Progress, rid: str, *, partial: bool) -> None:
        """Append the exchange to the conversation, once; a partial reply only if text reached
        the caller. Never raises: the caller already has the reply (failures are logged)."""
        plan = progress.plan
        if (progress.remembered or plan is None or not plan.conversation_id
                or self._conversations is None or (partial and not progress.delivered)):
            return
        progress.remembered = True
        try:
            await self._conversations.append(
                progress.tenant, plan.conversation_id,
                exchange(plan.new_turns, "".join(progress.reply), partial=partial,
                         request_id=rid))
        except PromptlineError as err:
            log.error("conversation history not stored: %s", err.message,
                      extra={"request_id": rid})


def _request_id(candidate: str) -> str:
    return candidate if _SAFE_ID.fullmatch(candidate) else uuid.uuid4().hex


@dataclass
class PromptServer:
    """A running prompt service and the clients it owns."""

    grpc: RunningServer
    metrics: MetricsServer
    engine_channel: grpc.aio.Channel
    redis: aioredis.Redis
    servicer: PromptServicer
    live: LiveConfig
    embedded_redis: EmbeddedRedis | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await self.grpc.stop(grace)
        if self.servicer.background:
            # History writes of streams cancelled during the drain: short Redis calls.
            await asyncio.wait(self.servicer.background, timeout=max(grace, 1.0))
        await self.metrics.stop()
        await self.engine_channel.close()
        await self.redis.aclose()
        if self.embedded_redis:
            self.embedded_redis.stop()


def _register(servicer: PromptServicer, admin: PromptAdminServicer) -> Callable[[Any], None]:
    def register(server: grpc.aio.Server) -> None:
        prompt_pb2_grpc.add_PromptServiceServicer_to_server(servicer, server)
        prompt_admin_pb2_grpc.add_PromptAdminServicer_to_server(admin, server)
    return register


async def start_prompt(config: Config, address: str | None = None, *,
                       live: LiveConfig | None = None) -> PromptServer:
    """Start the prompt service (default address: config.listen.prompt; port 0 in tests)."""
    live = live or LiveConfig(config, "prompt")
    get_tokenizer()  # loading cl100k takes ~250 ms: before serving, not in the first request
    embedded = None
    redis_url = config.redis_url
    if redis_url is None:
        log.warning("no redis_url configured: starting an embedded Redis for local use "
                    "(replicas will not share quotas or history)")
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
    redis = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    channel = insecure_channel(config.llm_engine_target, interceptors=client_interceptors())
    prompts = PromptRegistry(redis, max_template_bytes=config.prompts.max_template_bytes)
    conversations = ConversationStore(redis, ttl=config.conversations.ttl,
                                      max_messages=config.conversations.max_messages)
    servicer = PromptServicer(live, llm_engine_pb2_grpc.LlmEngineStub(channel),
                              QuotaManager(redis, config.quota_policy), prompts, conversations)
    admin = PromptAdminServicer(live, prompts, conversations)
    running = await start_grpc_server(
        address or config.listen.prompt,
        _register(servicer, admin),
        [SERVICE_NAME, ADMIN_SERVICE_NAME],
        interceptors=server_interceptors(),
    )
    metrics = await MetricsServer().start(config.listen.prompt_metrics)
    return PromptServer(running, metrics, channel, redis, servicer, live, embedded)

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from promptline.auth import Authenticator
from promptline.channels import insecure_channel
from promptline.config import Config
from promptline.config_reload import LiveConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.grpc_server import RunningServer, start_grpc_server
from promptline.metrics import QUOTA_REJECTIONS
from promptline.metrics_server import MetricsServer
from promptline.ratelimit import parse_quota_subject, rejection_limits
from promptline.redis_store import STORE_ERRORS, RedisStore, connect_redis
from promptline.rules import SAFE_ID, check_request_id, request_id_from
from promptline.streams import (
    DONE,
    Context,
    StreamLife,
    error_frame,
    read_frames,
    serve_stream,
    text_metadata,
)
from promptline.stubs import GenerateCall, LlmEngineClient
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

from .admin import PromptAdminServicer, unary
from .alerts import AlertNotifier
from .budgets import BudgetCheck, budget_checks
from .cache import HEADER as CACHE_HEADER
from .cache import CachedReply, CacheTicket, ResponseCache, cache_key, pieces
from .cache import count as count_cache
from .chat_plan import ChatPlan, plan_chat
from .context_fit import MessageTokenCounts
from .feedback import FeedbackStore, RequestRecord, RequestRecords
from .history import ConversationStore
from .journal import Journal, unavailable
from .moderation import Moderator, build_moderator
from .pricing import budget_reservation, cost_of, to_pico, usd_text
from .prompts import PromptRegistry
from .quotas import QuotaManager
from .redis_watch import RedisWatch
from .runs import Run, RunContext, Runs, numbered
from .session import ChatSession
from .usage import UsageReader

log = logging.getLogger("promptline.prompt")

SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
ADMIN_SERVICE_NAME = prompt_admin_pb2.DESCRIPTOR.services_by_name["PromptAdmin"].full_name
ORIGIN = "prompt"


class PromptServicer(prompt_pb2_grpc.PromptServiceServicer):
    """Implements PromptService.StreamChat."""

    def __init__(self, live: LiveConfig, engine: LlmEngineClient,
                 quotas: QuotaManager, prompts: PromptRegistry | None = None,
                 conversations: ConversationStore | None = None,
                 cache: ResponseCache | None = None,
                 alerts: AlertNotifier | None = None,
                 journal: Journal | None = None,
                 records: RequestRecords | None = None) -> None:
        self._live = live
        self.alerts = alerts
        """Credit alerts this replica claimed; `PromptServer` starts and stops it."""
        self._engine = engine
        self.quotas = quotas
        if alerts is not None:  # settlements written late claim alerts too
            quotas.ledger.notify = alerts.notify
        self._prompts = prompts
        self._conversations = conversations
        self._cache = cache
        self.journal = journal
        """Where resumable streams' frames go (None: nowhere; resume answers NOT_FOUND)."""
        self.runs = Runs()
        self.records = records
        """Where each stream's record goes when it ends (None: nowhere; feedback finds none)."""
        self.background: set[asyncio.Future[Any]] = set()
        """Sessions of cancelled streams, finishing, and response-cache writes;
        `PromptServer.stop` waits for them."""
        self.token_counts = MessageTokenCounts()
        """Counts of long messages that clients re-send every turn."""

    async def StreamChat(
        self, request: prompt_pb2.StreamChatRequest, context: Context
    ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        # An async generator (not context.write) so that gRPC interceptors, OpenTelemetry's
        # included, see every frame of the stream.
        metadata = text_metadata(context)
        rid = request_id_from(request.request_id or metadata.get("x-request-id"))
        config = self._live.current  # this stream keeps the config it started with
        trace.get_current_span().set_attribute("promptline.request_id", rid)
        life = StreamLife(ORIGIN, request.model, rid, logger=log,
                          label=config.model_label(request.model))
        session = ChatSession(rid, self._conversations, config=config,
                              ledger=self.quotas.ledger, alerts=self.alerts)
        life.on_finish(lambda outcome: self._on_stream_end(session, life, outcome))
        run: Run | None = None
        if request.resumable and self._live.derived("journaled", journaled):
            run_context = RunContext(context)
            run = Run(rid, life, run_context, self.journal, config.resume)
            context = run_context  # type: ignore[assignment]  # the run's view of the call
        frames = serve_stream(
            life, self._stream_chat(config, request, context, metadata, session, life, run),
            context, prompt_pb2.StreamChatResponse,
            error_metadata=lambda err: self._rejection(config, err, session),
            after_error=lambda err: session.finish(err.code.value))
        if run is None:
            async with aclosing(frames) as stream:  # closed at once however the call ends
                async for frame in numbered(stream):
                    yield frame
            return
        run.start(frames)
        self.runs.add(run)
        ended = False
        try:
            async for frame in run.frames():
                yield frame
            ended = True
        finally:
            if not ended:  # the caller went away: not a Stop
                run.detach()

    async def ResumeChat(self, request: prompt_pb2.ResumeChatRequest, context: Context
                         ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        """A journaled stream's start, its deltas after `after_id`, then the live rest."""
        metadata = text_metadata(context)
        try:
            auth = self._live.derived("auth", lambda c: Authenticator(c.tenants))
            tenant = auth.tenant_for_header(metadata.get("authorization"))
            check_request_id(request.request_id)
            if self.journal is None:
                raise PromptlineError(ErrorCode.NOT_FOUND, "this prompt service keeps no "
                                      "stream journal", stage=Stage.CONNECT)
            async with aclosing(self.journal.read(tenant.name, request.request_id,
                                                  request.after_id)) as frames:
                async for frame in frames:
                    if frame.WhichOneof("frame") == "error":  # the stream's own end, as it was
                        frame = error_frame(context, PromptlineError.from_pb(frame.error),
                                            prompt_pb2.StreamChatResponse)
                    yield frame
        except PromptlineError as err:
            # A caller's id only once it is a safe one: never echo a bad id into trailers.
            valid = SAFE_ID.fullmatch(request.request_id) is not None
            err.at(Stage.CONNECT, request_id=request.request_id if valid else "", origin=ORIGIN)
            yield error_frame(context, err, prompt_pb2.StreamChatResponse)

    @unary
    async def CancelChat(self, request: prompt_pb2.CancelChatRequest, context: Context
                         ) -> prompt_pb2.CancelChatResponse:
        """Stop a stream at once: here when this replica runs it, else through the journal's
        stop mark, which the replica running it reads within `journal.STOP_CHECK_S`."""
        auth = self._live.derived("auth", lambda c: Authenticator(c.tenants))
        tenant = auth.tenant_for_header(text_metadata(context).get("authorization"))
        check_request_id(request.request_id)
        run = self.runs.find(tenant.name, request.request_id)
        if run is not None:
            return prompt_pb2.CancelChatResponse(cancelled=run.cancel("stopped by the caller"))
        marked = None
        if self.journal is not None:
            try:
                marked = await self.journal.mark_stop(tenant.name, request.request_id)
            except STORE_ERRORS as exc:
                raise unavailable(exc) from None
        if marked is None:
            raise PromptlineError(ErrorCode.NOT_FOUND, f"no stream {request.request_id} to "
                                  "stop (unknown, expired or not resumable)",
                                  stage=Stage.CONNECT)
        return prompt_pb2.CancelChatResponse(cancelled=marked)

    def _on_stream_end(self, session: ChatSession, life: StreamLife, outcome: str) -> None:
        """The end-of-stream log line's fields; and a stream cancelled (or closed) before its
        session finished gets it finished in a task of its own, so a second cancel cannot cut
        the settlement short (`PromptServer.stop` waits for those)."""
        life.fields.update(tenant=session.tenant.name if session.tenant else "",
                           completion_tokens=session.usage.completion_tokens if session.usage
                           else session.completion_tokens)
        if session.reservation is not None:
            life.fields["cost_usd"] = usd_text(session.cost())
        if session.plan is not None:
            life.fields["model"] = session.plan.model.name
            if session.plan.route:
                life.fields["route"] = session.plan.route
            if session.plan.prompt is not None:
                life.fields.update(prompt_id=session.plan.prompt.prompt_id,
                                   prompt_version=session.plan.prompt.version)
        record = RequestRecord.of(session, life.started, outcome)
        if record is not None and self.records is not None:  # after the terminal frame
            self._spawn(self.records.write(record))
        settling = session.finishing(outcome)
        if not settling.done():  # also one whose wait a cancel cut short: `stop` waits for it
            self.background.add(settling)
            settling.add_done_callback(self.background.discard)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    @staticmethod
    def _rejection(config: Config, err: PromptlineError, session: ChatSession
                   ) -> tuple[tuple[str, str], ...]:
        """The `x-ratelimit-*` trailing metadata of a quota rejection (the edge's headers)."""
        if not err.quota_subject:
            return ()
        scope, _, kind = parse_quota_subject(err.quota_subject)
        QUOTA_REJECTIONS.labels(session.tenant.name if session.tenant else "",
                                f"{scope}:{kind}").inc()
        return tuple(rejection_limits(config, err).headers().items())

    async def _stream_chat(self, config: Config, request: prompt_pb2.StreamChatRequest,
                           context: Context, metadata: dict[str, str],
                           session: ChatSession, life: StreamLife, run: Run | None
                           ) -> AsyncGenerator[prompt_pb2.StreamChatResponse, None]:
        # Cheapest checks first: auth touches nothing; the plan validates before it reads a
        # prompt or a conversation from Redis, and nothing before admission calls the model.
        auth = self._live.derived("auth", lambda c: Authenticator(c.tenants))
        tenant, session.key_id = auth.identify(metadata.get("authorization"))
        session.tenant = tenant
        plan = session.plan = await plan_chat(config, tenant, request, self._prompts,
                                              self._conversations, self.token_counts,
                                              request_id=session.request_id)
        session.user = request.user  # validated by the plan
        if run is not None:
            run.bind(tenant.name, config.resume_for(plan.model, tenant))
        if plan.conversation_id:
            session.reply = []
        moderator = self._live.derived("moderator", lambda c: build_moderator(c.moderation))
        await moderator.check_input([m.content for m in plan.messages] + (
            plan.response_format.texts() if plan.response_format else []))  # the model reads it
        ticket = self._cache_ticket(tenant.name, plan)
        if ticket is not None:
            hit = None if request.no_cache else await self._cache_get(ticket, session.request_id)
            life.fields["cache"] = "bypass" if request.no_cache else "hit" if hit else "miss"
            count_cache(ticket.model, life.fields["cache"])
            if hit is not None:
                async with aclosing(self._replay(hit, ticket, request, context, moderator,
                                                 session, life)) as replayed:
                    async for frame in replayed:
                        yield frame
                return
            if session.reply is None:
                session.reply = []  # the whole reply, stored when it finishes
        session.reservation = reservation = await self.quotas.admit(
            tenant, plan.model, plan.prompt_tokens + plan.max_tokens, session.request_id,
            budgets=self._budget_checks(config, session))
        call = self._engine.Generate(
            llm_engine_pb2.GenerateRequest(
                request_id=session.request_id,
                model=plan.model.name,
                messages=plan.messages,
                max_tokens=plan.max_tokens,
                temperature=plan.temperature,
                stream_shape=(request.stream_shape if request.HasField("stream_shape")
                              else None),
                response_format=(plan.response_format.to_pb() if plan.response_format
                                 else None),
                json_validate=plan.json_validate,
            ),
            timeout=context.time_remaining(),
        )
        session.plan = plan.without_messages()  # the engine call holds the prompt now
        try:
            # The engine call is on its way while the quota headers go out (one gRPC round
            # trip less before the first token); no frame is yielded before them.
            await context.send_initial_metadata((*reservation.limits.headers().items(),
                                                 *(((CACHE_HEADER, "miss"),) if ticket else ())))
        except BaseException:
            call.cancel()
            raise
        async with aclosing(self._relay(call, request, moderator, session, life,
                                        ticket)) as frames:
            async for frame in frames:
                yield frame

    def _budget_checks(self, config: Config, session: ChatSession) -> list[BudgetCheck]:
        """The budgets the request is held to, each reserving its worst case."""
        assert session.tenant is not None and session.plan is not None
        plan = session.plan
        worst = budget_reservation(config, plan.model, plan.prompt_tokens, plan.max_tokens)
        return budget_checks(session.tenant, session.key_id, session.user, to_pico(worst),
                             self.quotas.ledger.clock())

    def _cache_ticket(self, tenant: str, plan: ChatPlan) -> CacheTicket | None:
        """Where this request's reply is cached; None when its model has no cache."""
        settings = plan.model.cache
        if self._cache is None or settings is None or not settings.enabled:
            return None
        if plan.response_format is not None:  # the key does not hold the format (json-mode.md)
            return None
        return CacheTicket(cache_key(tenant, plan.model, plan.messages, plan.max_tokens,
                                     plan.temperature), settings, plan.model.name)

    async def _cache_get(self, ticket: CacheTicket, request_id: str) -> CachedReply | None:
        assert self._cache is not None  # a ticket is only issued with a cache
        return await self._cache.get(ticket.key, request_id)

    def _cache_put(self, ticket: CacheTicket, done: common_pb2.Done,
                   session: ChatSession) -> None:
        """Store a finished reply in a task of its own: `done` never waits for the write."""
        entry = ticket.entry(done, "".join(session.reply or ()))
        if entry is None or self._cache is None:
            count_cache(ticket.model, "skip")
            return
        self._spawn(self._cache.put(ticket.key, entry, ticket.settings.ttl, ticket.model,
                                    session.request_id))

    async def _replay(self, hit: CachedReply, ticket: CacheTicket,
                      request: prompt_pb2.StreamChatRequest, context: Context,
                      moderator: Moderator, session: ChatSession, life: StreamLife
                      ) -> AsyncGenerator[prompt_pb2.StreamChatResponse, None]:
        """A cache hit as a stream: start, the stored text in deltas, done with `cached`. The
        text passes today's output moderation first, whole, so a term added since it was
        stored blocks it before anything is sent. The tenant's QPM is charged, and the hit's
        cost (`hit_cost_fraction` of the reply's) to the budgets when it is not 0; no TPM, no
        provider call, no tokens."""
        plan, tenant = session.plan, session.tenant
        assert plan is not None and tenant is not None
        output = moderator.output_filter()
        try:
            text = output.feed(hit.text) + output.flush()
        except PromptlineError as err:  # nothing reached the caller: not mid-stream
            raise PromptlineError(err.code, err.message, stage=Stage.FIRST_PACKET) from None
        done = hit.done()
        cost = cost_of(plan.model.price, done.usage, cached=True,
                       fraction=Decimal(str(ticket.settings.hit_cost_fraction)))
        done.usage.cost_usd = usd_text(cost)
        session.usage, session.cached = done.usage, True
        budgets = budget_checks(tenant, session.key_id, session.user, to_pico(cost),
                                self.quotas.ledger.clock()) if cost else ()
        session.reservation = reservation = await self.quotas.admit(
            tenant, plan.model, 0, session.request_id, upstream=False, budgets=budgets)
        session.plan = plan.without_messages()
        await context.send_initial_metadata((*reservation.limits.headers().items(),
                                             (CACHE_HEADER, "hit")))
        yield prompt_pb2.StreamChatResponse(start=_chat_start(session, request, hit.model, ""))
        for piece, tokens in pieces(text, hit.completion_tokens):
            life.text_delivered()
            session.delivered_text(piece)
            yield prompt_pb2.StreamChatResponse(delta=common_pb2.Delta(text=piece,
                                                                       tokens=tokens))
        if session.keeps_history:
            await session.finish(DONE)  # as for a fresh reply: stored before `done`
        _name_prompt(done, plan)
        yield prompt_pb2.StreamChatResponse(done=done)
        await session.finish(DONE)

    async def _relay(self, call: GenerateCall, request: prompt_pb2.StreamChatRequest,
                     moderator: Moderator, session: ChatSession, life: StreamLife,
                     ticket: CacheTicket | None
                     ) -> AsyncGenerator[prompt_pb2.StreamChatResponse, None]:
        """Engine frames -> output moderation -> caller, until the first terminal frame."""
        plan = session.plan
        assert plan is not None
        output = moderator.output_filter()
        held_tokens = 0  # tokens of text the moderation filter is still holding back
        async with aclosing(read_frames(call)) as frames:
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    session.completion_tokens += frame.delta.tokens
                    held_tokens += frame.delta.tokens
                    text = output.feed(frame.delta.text)
                    if text:
                        life.text_delivered()
                        session.delivered_text(text)
                        yield prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=text, tokens=held_tokens))
                        held_tokens = 0
                elif kind == "start":
                    session.serving(frame.start.model)
                    yield prompt_pb2.StreamChatResponse(start=_chat_start(
                        session, request, frame.start.model, frame.start.deployment))
                elif kind == "done":
                    tail = output.flush()
                    if tail:
                        session.delivered_text(tail)
                        yield prompt_pb2.StreamChatResponse(
                            delta=common_pb2.Delta(text=tail, tokens=held_tokens))
                    session.serving(frame.done.model)
                    session.account(frame.done.usage)  # its cost_usd
                    if ticket is not None:
                        self._cache_put(ticket, frame.done, session)
                    if session.keeps_history:
                        # Stored before `done`, so a caller's next request already sees it.
                        await session.finish(DONE)
                    _name_prompt(frame.done, plan)
                    yield prompt_pb2.StreamChatResponse(done=frame.done)
                    await session.finish(DONE)  # without a conversation: after `done`


def journaled(config: Config) -> bool:
    """Whether any stream may be journaled (a `resume.ttl` above 0 anywhere): else a resumable
    request is served as any other, without a run of its own."""
    return any(ttl for ttl in (config.resume.ttl, *(m.resume.ttl for m in config.models),
                               *(t.resume.ttl for t in config.tenants)))


def _name_prompt(done: common_pb2.Done, plan: ChatPlan) -> None:
    """`done` names the prompt version that answered (a split label picks one per request)."""
    if plan.prompt is not None:
        done.prompt_id = plan.prompt.prompt_id
        done.prompt_version = plan.prompt.version


def _chat_start(session: ChatSession, request: prompt_pb2.StreamChatRequest, model: str,
                deployment: str) -> prompt_pb2.ChatStart:
    plan = session.plan
    assert plan is not None
    return prompt_pb2.ChatStart(
        request_id=session.request_id,
        model=model,
        conversation_id=request.conversation_id,
        prompt_id=plan.prompt.prompt_id if plan.prompt else "",
        prompt_version=plan.prompt.version if plan.prompt else 0,
        prompt_tokens=plan.prompt_tokens,
        deployment=deployment,
    )


@dataclass
class PromptServer:
    """A running prompt service and the clients it owns."""

    grpc: RunningServer
    metrics: MetricsServer
    engine_channel: aio.Channel  # `grpc` here is the field above
    redis: RedisStore
    servicer: PromptServicer
    live: LiveConfig
    redis_watch: RedisWatch

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace: float) -> None:
        await self.grpc.stop(grace)
        await self.servicer.runs.stop(max(grace, 1.0))  # detached ones outlive their calls
        await self.redis_watch.stop()
        background = self.servicer.background | self.servicer.quotas.background
        if background:
            # History writes and give-backs of streams cancelled during the drain: short calls.
            await asyncio.wait(background, timeout=max(grace, 1.0))
        await self.servicer.quotas.ledger.close()
        if self.servicer.alerts is not None:
            await self.servicer.alerts.stop()
        if self.servicer.journal is not None:
            await self.servicer.journal.drain(1.0)
        await self.metrics.stop()
        await self.engine_channel.close()
        await self.redis.close()


def _register(servicer: PromptServicer, admin: PromptAdminServicer
              ) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        prompt_pb2_grpc.add_PromptServiceServicer_to_server(servicer, server)
        prompt_admin_pb2_grpc.add_PromptAdminServicer_to_server(admin, server)
    return register


async def start_prompt(config: Config, address: str | None = None, *,
                       live: LiveConfig | None = None) -> PromptServer:
    """Start the prompt service (default address: config.listen.prompt; port 0 in tests)."""
    live = live or LiveConfig(config, "prompt")
    get_tokenizer()  # loading cl100k takes ~250 ms: before serving, not in the first request
    # Quotas and history must be shared by every replica: the prompt service never starts a
    # private Redis (`make run` starts a local one and passes it in).
    store = connect_redis(config)
    try:
        async with asyncio.timeout(config.quota_policy.redis_timeout * 8):
            await store.connect()
    except STORE_ERRORS as exc:  # it connects again on first use
        log.warning("Redis not reachable at start (%s)", type(exc).__name__)
    redis = store.client
    channel = insecure_channel(config.llm_engine_target, interceptors=client_interceptors())
    prompts = PromptRegistry(redis, max_template_bytes=config.prompts.max_template_bytes)
    conversations = ConversationStore(redis, ttl=config.conversations.ttl,
                                      max_messages=config.conversations.max_messages)
    servicer = PromptServicer(live, llm_engine_pb2_grpc.LlmEngineStub(channel),
                              QuotaManager(redis, config.quota_policy,
                                           usage_ttl=config.usage.retention),
                              prompts, conversations,
                              ResponseCache(redis, config.quota_policy.redis_timeout),
                              await AlertNotifier(lambda: live.current.alerts).start(),
                              Journal(redis, config.quota_policy.redis_timeout),
                              RequestRecords(redis, lambda: live.current.feedback.retention,
                                             timeout=config.quota_policy.redis_timeout))
    admin = PromptAdminServicer(live, prompts, conversations, UsageReader(redis),
                                feedback=FeedbackStore(redis))
    running = await start_grpc_server(
        address or config.listen.prompt,
        _register(servicer, admin),
        [SERVICE_NAME, ADMIN_SERVICE_NAME],
        interceptors=server_interceptors(),
    )
    metrics = await MetricsServer().start(config.listen.prompt_metrics)
    watch = await RedisWatch(store, running.health, config.quota_policy.redis_timeout).start()
    return PromptServer(running, metrics, channel, store, servicer, live, watch)

"""PromptAdmin gRPC service: prompt versions and labels, conversation history, usage, feedback
and prompt stats.

Every call authenticates the `authorization` metadata first and works only on the caller's own
tenant. Registry writes (CreatePromptVersion, SetPromptLabel, CreateEvalRun, SetPromptPolicy)
need a tenant with `admin: true`
(PERMISSION_DENIED otherwise); reads need any key of the tenant. Usage is the caller's tenant's;
only an admin tenant may name another (`tenant`). Failures end the call with the
rich status of `PromptlineError` (`abort_unary`); anything unexpected becomes INTERNAL with a safe
message. Protobuf stops here: the registry and the store work on dataclasses.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from promptline.auth import Authenticator
from promptline.config import TenantConfig
from promptline.config_reload import LiveConfig
from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.rules import invalid
from promptline.streams import Context, abort_unary, text_metadata
from promptline.v1 import prompt_admin_pb2, prompt_admin_pb2_grpc

from .feedback import FeedbackStore
from .history import ConversationStore
from .pricing import from_pico, usd_text
from .prompts import PromptDraft, PromptPolicy, PromptRegistry, check_split, encode_split
from .usage import UsageReader, UsageRow, usage_range

log = logging.getLogger("promptline.prompt.admin")

ORIGIN = "prompt"
R = TypeVar("R")
Handler = Callable[[Any, Any, Context], Awaitable[R]]


def unary(method: Handler[R]) -> Handler[R]:
    """Map PromptlineError (and anything unexpected) to the call's status, in one place."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        rid = text_metadata(context).get("x-request-id", "")
        try:
            return await method(self, request, context)
        except PromptlineError as exc:
            err = exc
        except Exception:
            log.exception("unexpected error in %s", method.__name__, extra={"request_id": rid})
            err = internal_error(rid)
        await abort_unary(context, err.at(Stage.CONNECT, request_id=rid, origin=ORIGIN))
        raise AssertionError("unreachable: abort raises")

    return wrapper


class PromptAdminServicer(prompt_admin_pb2_grpc.PromptAdminServicer):
    """Implements PromptAdmin over a PromptRegistry and a ConversationStore."""

    def __init__(self, live: LiveConfig, prompts: PromptRegistry,
                 conversations: ConversationStore, usage: UsageReader, *,
                 feedback: FeedbackStore) -> None:
        self._live = live
        self._prompts = prompts
        self._conversations = conversations
        self._usage = usage
        self._feedback = feedback

    def _tenant(self, context: Context, *, admin: bool = False) -> TenantConfig:
        metadata = text_metadata(context)
        auth = self._live.derived("auth", lambda c: Authenticator(c.tenants))
        tenant = auth.tenant_for_header(metadata.get("authorization"))
        if admin and not tenant.admin:
            raise PromptlineError(ErrorCode.PERMISSION_DENIED,
                                  "this API key may not manage prompts (needs an admin tenant)",
                                  stage=Stage.CONNECT)
        return tenant

    @unary
    async def CreatePromptVersion(self, request: prompt_admin_pb2.CreatePromptVersionRequest,
                                  context: Context
                                  ) -> prompt_admin_pb2.PromptVersion:
        tenant = self._tenant(context, admin=True)
        version = await self._prompts.create(tenant.name, PromptDraft.from_pb(request))
        log.info("prompt version created", extra={"tenant": tenant.name,
                                                  "prompt_id": version.prompt_id,
                                                  "version": version.version})
        return version.to_pb()

    @unary
    async def ListPromptVersions(self, request: prompt_admin_pb2.ListPromptVersionsRequest,
                                 context: Context
                                 ) -> prompt_admin_pb2.ListPromptVersionsResponse:
        tenant = self._tenant(context)
        page = await self._prompts.list(tenant.name, request.prompt_id, request.page_size,
                                        request.before_version)
        return prompt_admin_pb2.ListPromptVersionsResponse(
            prompt_id=page.prompt_id, versions=[v.to_pb() for v in page.versions],
            labels=page.labels, latest_version=page.latest_version,
            next_before_version=page.next_before_version,
            splits={label: prompt_admin_pb2.LabelSplit(weights=dict(split))
                    for label, split in page.splits.items()})

    @unary
    async def GetPromptVersion(self, request: prompt_admin_pb2.GetPromptVersionRequest,
                               context: Context
                               ) -> prompt_admin_pb2.PromptVersion:
        tenant = self._tenant(context)
        version = await self._prompts.get(tenant.name, request.prompt_id, request.version,
                                          request.label)
        return version.to_pb()

    @unary
    async def SetPromptLabel(self, request: prompt_admin_pb2.SetPromptLabelRequest,
                             context: Context
                             ) -> prompt_admin_pb2.SetPromptLabelResponse:
        tenant = self._tenant(context, admin=True)
        given = [name for name, on in (("version", request.version), ("split", request.split),
                                        ("rollback", request.rollback)) if on]
        if len(given) != 1:
            raise invalid("give exactly one of version, split and rollback"
                          + (f" (got {', '.join(given)})" if given else ""))
        if request.rollback:
            move = await self._prompts.rollback_label(tenant.name, request.prompt_id,
                                                      request.label)
        else:
            field_name = "split" if request.split else "version"
            weights = dict(request.split) or {request.version: 100}
            move = await self._prompts.move_label(
                tenant.name, request.prompt_id, request.label,
                check_split(weights, field_name), require_eval=request.require_eval,
                field_name=field_name)
        log.info("prompt label moved", extra={
            "tenant": tenant.name, "prompt_id": request.prompt_id, "label": request.label,
            "split": encode_split(move.split), "rollback": request.rollback,
            "previous_split": encode_split(move.previous) if move.previous else ""})
        return prompt_admin_pb2.SetPromptLabelResponse(
            prompt_id=request.prompt_id, label=request.label,
            version=move.split[0][0] if len(move.split) == 1 else 0,
            previous_version=move.previous[0][0] if len(move.previous) == 1 else 0,
            split=dict(move.split), previous_split=dict(move.previous))

    @unary
    async def CreateEvalRun(self, request: prompt_admin_pb2.CreateEvalRunRequest,
                            context: Context) -> prompt_admin_pb2.EvalRun:
        tenant = self._tenant(context, admin=True)
        run = await self._prompts.add_eval(tenant.name, request.prompt_id, request.version,
                                           request.run)
        log.info("eval run stored", extra={"tenant": tenant.name, "prompt_id": run.prompt_id,
                                           "version": run.version, "eval_id": run.eval_id,
                                           "pass_rate": run.pass_rate})
        return run

    @unary
    async def ListEvalRuns(self, request: prompt_admin_pb2.ListEvalRunsRequest,
                           context: Context) -> prompt_admin_pb2.ListEvalRunsResponse:
        tenant = self._tenant(context)
        runs = await self._prompts.list_evals(tenant.name, request.prompt_id, request.version)
        return prompt_admin_pb2.ListEvalRunsResponse(
            prompt_id=request.prompt_id, version=request.version, runs=runs)

    @unary
    async def GetPromptPolicy(self, request: prompt_admin_pb2.GetPromptPolicyRequest,
                              context: Context) -> prompt_admin_pb2.PromptPolicy:
        tenant = self._tenant(context)
        policy = await self._prompts.policy(tenant.name, request.prompt_id)
        return policy.to_pb(request.prompt_id)

    @unary
    async def SetPromptPolicy(self, request: prompt_admin_pb2.PromptPolicy,
                              context: Context) -> prompt_admin_pb2.PromptPolicy:
        tenant = self._tenant(context, admin=True)
        policy = await self._prompts.set_policy(tenant.name, request.prompt_id, PromptPolicy(
            request.require_eval,
            request.min_pass_rate if request.HasField("min_pass_rate") else 1.0))
        log.info("prompt policy set", extra={"tenant": tenant.name,
                                             "prompt_id": request.prompt_id,
                                             "require_eval": policy.require_eval,
                                             "min_pass_rate": policy.min_pass_rate})
        return policy.to_pb(request.prompt_id)

    @unary
    async def GetConversation(self, request: prompt_admin_pb2.GetConversationRequest,
                              context: Context) -> prompt_admin_pb2.Conversation:
        tenant = self._tenant(context)
        conversation = await self._conversations.get(tenant.name, request.conversation_id)
        return prompt_admin_pb2.Conversation(
            conversation_id=conversation.conversation_id,
            turns=[prompt_admin_pb2.ConversationTurn(
                role=t.role, content=t.content, partial=t.partial,
                created_at_ms=t.created_at_ms, request_id=t.request_id)
                for t in conversation.turns],
            expires_in_ms=conversation.expires_in_ms)

    @unary
    async def DeleteConversation(self, request: prompt_admin_pb2.DeleteConversationRequest,
                                 context: Context
                                 ) -> prompt_admin_pb2.DeleteConversationResponse:
        tenant = self._tenant(context)
        deleted = await self._conversations.delete(tenant.name, request.conversation_id)
        return prompt_admin_pb2.DeleteConversationResponse(
            conversation_id=request.conversation_id, deleted_turns=deleted)

    @unary
    async def GetUsage(self, request: prompt_admin_pb2.GetUsageRequest,
                       context: Context) -> prompt_admin_pb2.UsageReport:
        caller = self._tenant(context)
        tenant = caller.name
        if request.tenant:
            if not caller.admin:
                raise PromptlineError(ErrorCode.PERMISSION_DENIED,
                                      "tenant: only a key of an admin tenant may read another "
                                      "tenant's usage", stage=Stage.CONNECT)
            if not any(t.name == request.tenant for t in self._live.current.tenants):
                raise PromptlineError(ErrorCode.NOT_FOUND,
                                      f"tenant: unknown tenant {request.tenant!r}",
                                      stage=Stage.CONNECT)
            tenant = request.tenant
        start, end = usage_range(request.from_ms, request.to_ms, int(time.time() * 1000),
                                 self._live.current.usage.retention)
        report = await self._usage.report(tenant, start, end, request.group_by or "model")
        return prompt_admin_pb2.UsageReport(
            tenant=report.tenant, from_ms=report.from_ms, to_ms=report.to_ms,
            group_by=report.group_by, rows=[_row(r) for r in report.rows],
            total=_row(report.total))

    @unary
    async def SubmitFeedback(self, request: prompt_admin_pb2.SubmitFeedbackRequest,
                             context: Context) -> prompt_admin_pb2.Feedback:
        tenant = self._tenant(context)
        feedback = await self._feedback.submit(
            tenant.name, request.request_id,
            request.score if request.HasField("score") else None, request.comment)
        return feedback.to_pb()

    @unary
    async def GetPromptStats(self, request: prompt_admin_pb2.GetPromptStatsRequest,
                             context: Context) -> prompt_admin_pb2.PromptStats:
        tenant = self._tenant(context)
        # NOT_FOUND unless the caller's tenant has the prompt: stats keys are per tenant anyway,
        # and an empty answer would not tell a typo from a quiet prompt.
        await self._prompts.get(tenant.name, request.prompt_id)
        start, end = usage_range(request.from_ms, request.to_ms, int(time.time() * 1000),
                                 self._live.current.feedback.retention,
                                 setting="feedback.retention")
        stats = await self._feedback.stats(tenant.name, request.prompt_id, start, end)
        return stats.to_pb()


def _row(row: UsageRow) -> prompt_admin_pb2.UsageRow:
    return prompt_admin_pb2.UsageRow(
        key=row.key, requests=row.requests, errors=row.errors, prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens, cost_usd=usd_text(from_pico(row.cost)))

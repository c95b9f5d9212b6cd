"""Turn a StreamChatRequest into what the engine needs: model, messages, token budget.

Stages, cheapest first: validate the request (no I/O) -> resolve and render the managed prompt
(one or two Redis reads) -> load the conversation history (one Redis read) -> resolve a route to
its model (`routes`) -> fit everything to the model's context window (`context_fit`). Validation
here protects gRPC callers that do not come through the edge; every rejection is a typed error at
stage `connect`, naming the field.

Messages sent to the model, in order: the rendered prompt (a system message), then
- without a conversation: the request's messages, unchanged and in order;
- with a conversation: the request's system messages, the stored history (trimmed to fit) and the
  request's user/assistant messages (the new turns, stored with the reply when the stream ends).
  A request that re-sends the stored history before its new message is recognised
  (`split_resent_history`), so a client-kept transcript is neither doubled nor stored twice.
A prompt version's default model, max_tokens, temperature and response_format apply when the
request sets none, and its json_validate while its response_format is the one used.
The model (the request's or the prompt's) may be a route; the plan holds the model it resolved to.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from promptline.config import Config, ModelConfig, RouteConfig, TenantConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.response_format import ResponseFormat, check_response_format
from promptline.rules import (
    check_conversation_id,
    check_max_tokens,
    check_role,
    check_stream_shape,
    check_temperature,
    check_user,
    check_version_or_label,
    invalid,
)
from promptline.tokens import TOKENS_PER_REPLY
from promptline.v1 import common_pb2, prompt_pb2

from .context_fit import MessageTokenCounts, count_now, fit_messages
from .history import ConversationStore
from .prompts import PromptRegistry, PromptVersion
from .routes import counted_once, find_route, resolve
from .templates import render

MAX_MESSAGES = 1000


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """A validated request, ready for the engine."""

    model: ModelConfig
    messages: tuple[common_pb2.ChatMessage, ...]
    prompt_tokens: int
    max_tokens: int
    temperature: float | None = None
    prompt: PromptVersion | None = None
    """The managed prompt rendered as the first system message, if any."""
    conversation_id: str = ""
    new_turns: tuple[common_pb2.ChatMessage, ...] = ()
    """The request's user/assistant messages, stored with the reply; only with a conversation."""
    route: str = ""
    """The route the request (or its prompt) named, resolved to `model`; "" for a model."""
    response_format: ResponseFormat | None = None
    """Structured output (a JSON format; None: free text), the request's or its prompt's."""
    json_validate: bool = False
    """The engine checks the finished reply against `response_format`."""

    def without_messages(self) -> ChatPlan:
        """This plan once the engine request is built from it.

        The rule for a long prompt, along the whole chain: an open stream holds it only where
        gRPC does (each hop's request, which grpc.aio keeps for the whole call), never also in
        Python objects of its own. So past the edge messages stay `ChatMessage` protobufs, the
        request's own where the caller sent them; the plan drops its messages once the engine
        request holds them (this method); new turns and the reply are kept only when a
        conversation will store them; the engine hands its providers the request's messages.
        `tests/test_stream_memory.py` counts the copies an open stream holds.
        """
        return replace(self, messages=())


async def plan_chat(config: Config, tenant: TenantConfig, request: prompt_pb2.StreamChatRequest,
                    prompts: PromptRegistry | None = None,
                    conversations: ConversationStore | None = None,
                    token_counts: MessageTokenCounts | None = None,
                    request_id: str = "") -> ChatPlan:
    """Validate, render, load history and fit; raises PromptlineError at stage `connect`."""
    # A named model or route is checked before any Redis read; else the prompt's default applies.
    named = _named(config, tenant, request.model) if request.model else None
    _validate(request)
    asked = (await check_response_format(request.response_format)
             if request.HasField("response_format") else None)
    prompt = None
    if request.prompt.id:
        if prompts is None:
            raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown prompt {request.prompt.id!r}",
                                  stage=Stage.CONNECT)
        # A split label keeps a conversation (else an end user, else one request) on one version.
        sticky = request.conversation_id or request.user or request_id or uuid.uuid4().hex
        prompt = await prompts.get(tenant.name, request.prompt.id, request.prompt.version,
                                   request.prompt.label, sticky=sticky)
    if named is None:
        named = _named(config, tenant, prompt.model if prompt else "")
    system: list[common_pb2.ChatMessage] = []
    if prompt is not None:
        system.append(common_pb2.ChatMessage(role="system", content=render(
            prompt.template, prompt.variables, dict(request.prompt.variables))))
    messages = list(request.messages)  # the same objects all along: counts know them by identity
    history: Sequence[common_pb2.ChatMessage] = ()
    new = messages
    if request.conversation_id:
        check_conversation_id(request.conversation_id)
        if conversations is None:
            raise PromptlineError(ErrorCode.UNAVAILABLE, "conversation memory is not configured",
                                  stage=Stage.CONNECT)
        stored = await conversations.load(tenant.name, request.conversation_id)
        system += [m for m in messages if m.role == "system"]
        history, new = split_resent_history(
            tuple(common_pb2.ChatMessage(role=t.role, content=t.content) for t in stored),
            [m for m in messages if m.role != "system"])

    # An explicit max_tokens (request, else prompt) must fit; without one, history leaves room
    # for the model's default and the reply gets what is left (at least one token).
    requested = request.max_tokens or (prompt.max_tokens if prompt and prompt.max_tokens else 0)
    count = (count_now if token_counts is None
             else await token_counts.prepared(tenant.name, [*system, *history, *new]))
    route = ""
    if isinstance(named, RouteConfig):
        route = named.name
        # A size rule sees the whole assembled prompt (before any history is trimmed: that
        # depends on the model it picks), counted as the fit counts, each message once for both.
        count = counted_once(count)
        model = resolve(config, named, tenant.name, lambda: TOKENS_PER_REPLY + sum(
            count(m) for m in (*system, *history, *new)))
    else:
        model = named
    fitted = fit_messages(system, history, new, window=model.context_window,
                          reserve=requested or 1,
                          history_reserve=requested or model.default_max_tokens,
                          model=model.name, count=count)
    max_tokens = requested or min(model.default_max_tokens,
                                  model.context_window - fitted.prompt_tokens)
    temperature = request.temperature if request.HasField("temperature") else (
        prompt.temperature if prompt else None)
    response_format, json_validate = _response_format(request, asked, prompt)
    return ChatPlan(
        model=model,
        messages=fitted.messages,
        prompt_tokens=fitted.prompt_tokens,
        max_tokens=max_tokens,
        temperature=temperature,
        prompt=prompt,
        conversation_id=request.conversation_id,
        new_turns=tuple(new) if request.conversation_id else (),
        route=route,
        response_format=response_format,
        json_validate=json_validate,
    )


def _response_format(request: prompt_pb2.StreamChatRequest, asked: ResponseFormat | None,
                     prompt: PromptVersion | None) -> tuple[ResponseFormat | None, bool]:
    """(format, validate): each the request's when it sets it, else the prompt version's (its
    validate only with its format); a "text" format is None."""
    fmt = asked if asked is not None else prompt.response_format if prompt else None
    if fmt is not None and not fmt.is_json:
        fmt = None  # "text": free text, as without a format
    if request.HasField("json_validate"):
        if request.json_validate and fmt is None:
            raise invalid("json_validate needs a response_format of type json_object or "
                          "json_schema (the request's or its prompt version's)")
        return fmt, request.json_validate
    # A version's validate goes with its format: a request that replaced it asked for no check.
    return fmt, bool(fmt and asked is None and prompt and prompt.json_validate)


def split_resent_history(stored: tuple[common_pb2.ChatMessage, ...],
                         messages: list[common_pb2.ChatMessage]
                         ) -> tuple[tuple[common_pb2.ChatMessage, ...],
                                    list[common_pb2.ChatMessage]]:
    """(history for the model, new turns to store) of a conversation request.

    A client that keeps its own transcript (the browser chat, OpenAI-style clients) re-sends the
    stored history before its new message. When the request's messages contain the whole stored
    history followed by at least one more message, the messages after it are the new turns and
    the request's own copy is the history; otherwise the stored history comes first and every
    request message is new. Either way nothing is stored twice.
    """
    if stored:
        size = len(stored)
        for end in range(len(messages) - 1, size - 1, -1):  # latest match first
            if tuple(messages[end - size:end]) == stored:
                return tuple(messages[:end]), messages[end:]
    return stored, messages


def _validate(request: prompt_pb2.StreamChatRequest) -> None:
    if not request.messages:
        raise invalid("messages must contain at least one message")
    if len(request.messages) > MAX_MESSAGES:
        raise invalid(f"messages holds more than {MAX_MESSAGES} entries")
    for i, message in enumerate(request.messages):
        check_role(message.role, f"messages[{i}].role")
    if request.max_tokens:  # 0: the model's default
        check_max_tokens(request.max_tokens)
    if request.HasField("temperature"):
        check_temperature(request.temperature)
    if request.HasField("stream_shape"):
        check_stream_shape(request.stream_shape)
    check_version_or_label(request.prompt.version, request.prompt.label)
    if request.user:
        check_user(request.user)


def _named(config: Config, tenant: TenantConfig, name: str) -> ModelConfig | RouteConfig:
    """The model or route `name` names. Permission is on this name: a route allowed grants
    whatever it resolves to (docs/routes.md)."""
    if not name:
        raise invalid("model is required (unless the prompt names a default model)")
    named = config.model(name) or find_route(config, name)
    if named is None:
        raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown model {name!r}",
                              stage=Stage.CONNECT)
    if not tenant.may_use(named.name):
        raise PromptlineError(ErrorCode.PERMISSION_DENIED,
                              f"this API key may not use model {named.name!r}",
                              stage=Stage.CONNECT)
    return named




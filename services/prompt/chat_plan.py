"""Turn a StreamChatRequest into what the engine needs: model, messages, token budget.

Validation here protects gRPC callers that do not come through the edge; every rejection is a
typed error at stage `connect`, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptline.config import Config, ModelConfig, TenantConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.tokens import count_messages
from promptline.v1 import common_pb2, prompt_pb2

ROLES = frozenset({"system", "user", "assistant"})
MAX_MESSAGES = 1000


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """A validated request, ready for the engine."""

    model: ModelConfig
    messages: tuple[common_pb2.ChatMessage, ...]
    prompt_tokens: int
    max_tokens: int


def plan_chat(config: Config, tenant: TenantConfig,
              request: prompt_pb2.StreamChatRequest) -> ChatPlan:
    model = config.model(request.model)
    if not request.model:
        raise _invalid("model is required")
    if model is None:
        raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown model {request.model!r}",
                              stage=Stage.CONNECT)
    if not tenant.may_use(model.name):
        raise PromptlineError(ErrorCode.PERMISSION_DENIED,
                              f"this API key may not use model {model.name!r}",
                              stage=Stage.CONNECT)
    if request.prompt.id:
        # The prompt registry is empty until prompts are created through the admin API.
        raise PromptlineError(ErrorCode.NOT_FOUND, f"unknown prompt {request.prompt.id!r}",
                              stage=Stage.CONNECT)
    if not request.messages:
        raise _invalid("messages must contain at least one message")
    if len(request.messages) > MAX_MESSAGES:
        raise _invalid(f"messages holds more than {MAX_MESSAGES} entries")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise _invalid(f"messages[{i}].role must be one of system, user, assistant")
    if request.HasField("temperature") and not 0 <= request.temperature <= 2:
        raise _invalid("temperature must be between 0 and 2")

    prompt_tokens = count_messages((m.role, m.content) for m in request.messages)
    room = model.context_window - prompt_tokens
    if request.max_tokens:
        if request.max_tokens > room:
            raise _too_long(prompt_tokens, request.max_tokens, model)
        max_tokens = request.max_tokens
    else:
        if room < 1:
            raise _too_long(prompt_tokens, 1, model)
        max_tokens = min(model.default_max_tokens, room)
    return ChatPlan(model, tuple(request.messages), prompt_tokens, max_tokens)


def _invalid(message: str) -> PromptlineError:
    return PromptlineError(ErrorCode.INVALID_REQUEST, message, stage=Stage.CONNECT)


def _too_long(prompt_tokens: int, max_tokens: int, model: ModelConfig) -> PromptlineError:
    return PromptlineError(
        ErrorCode.CONTEXT_TOO_LONG,
        f"the messages use {prompt_tokens} tokens and max_tokens asks for {max_tokens}, "
        f"but model {model.name!r} has a context window of {model.context_window} tokens",
        stage=Stage.CONNECT,
    )

"""Fit a chat to the model's context window, counting tokens with the real tokenizer.

The rule:
- System messages (the rendered prompt, the request's own system messages) are always kept.
- The request's new messages (normally the newest user message) are always kept: they are what
  the caller is asking now. If system + new messages + `reserve` (room for max_tokens) do not fit,
  the request fails with CONTEXT_TOO_LONG, giving the token counts.
- Stored history fills what is left, newest message first; older messages that do not fit are
  dropped whole (a message is never cut), and the kept history never starts with an assistant
  message (its user turn was dropped), so the model sees whole exchanges.

Counts use `promptline.tokens.count_messages` (chat-format overhead included), so the sum of the
kept messages is exactly the prompt token count reported to the caller and charged to TPM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.tokens import TOKENS_PER_REPLY, count_messages

Message = tuple[str, str]


@dataclass(frozen=True, slots=True)
class FittedChat:
    """Messages to send, oldest first, and what fitting them cost."""

    messages: tuple[Message, ...]
    prompt_tokens: int
    dropped: int
    """History messages left out (oldest first) to make room."""


def message_tokens(role: str, content: str) -> int:
    """Tokens one message adds to a prompt (role marker overhead included)."""
    return count_messages([(role, content)]) - TOKENS_PER_REPLY


def fit_messages(system: Sequence[Message], history: Sequence[Message], new: Sequence[Message],
                 *, window: int, reserve: int, model: str,
                 history_reserve: int | None = None) -> FittedChat:
    """Keep `system` and `new` (CONTEXT_TOO_LONG unless they leave `reserve` tokens free), then
    as much of `history`, newest first, as leaves `history_reserve` (default `reserve`) free."""
    required = TOKENS_PER_REPLY + sum(message_tokens(r, c) for r, c in (*system, *new))
    if required > window - reserve:
        system_tokens = sum(message_tokens(r, c) for r, c in system)
        raise PromptlineError(
            ErrorCode.CONTEXT_TOO_LONG,
            f"the request needs {required} prompt tokens ({system_tokens} for system messages) "
            f"and max_tokens asks for {reserve}, but model {model!r} has a context window of "
            f"{window} tokens",
            stage=Stage.CONNECT)
    budget = window - max(reserve, history_reserve or 0)
    used = required
    kept: list[Message] = []
    for role, content in reversed(history):
        cost = message_tokens(role, content)
        if used + cost > budget:
            break
        kept.append((role, content))
        used += cost
    kept.reverse()
    while kept and kept[0][0] != "user":  # an orphaned reply whose question was dropped
        used -= message_tokens(*kept.pop(0))
    return FittedChat((*system, *kept, *new), used, len(history) - len(kept))

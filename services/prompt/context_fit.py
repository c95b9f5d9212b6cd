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
`MessageTokenCounts` remembers the counts of long messages, so a client that re-sends its
transcript every turn is not counted again for it. Messages are `ChatMessage` protobufs; a count
reads a message's text only while it counts it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.tokens import OFF_LOOP_CHARS, TOKENS_PER_REPLY, count_messages
from promptline.v1.common_pb2 import ChatMessage

Count = Callable[[ChatMessage], int]
"""Tokens one message adds to a prompt."""


@dataclass(frozen=True, slots=True)
class FittedChat:
    """Messages to send, oldest first, and what fitting them cost."""

    messages: tuple[ChatMessage, ...]
    prompt_tokens: int
    dropped: int
    """History messages left out (oldest first) to make room."""


def message_tokens(role: str, content: str) -> int:
    """Tokens one message adds to a prompt (role marker overhead included)."""
    return count_messages([(role, content)]) - TOKENS_PER_REPLY


def count_now(message: ChatMessage) -> int:
    """`message_tokens` of a message, counted now (nothing remembered)."""
    return message_tokens(message.role, message.content)


class MessageTokenCounts:
    """Token counts of long messages, per tenant, keyed by a digest of the text (never the text).

    Chat clients re-send the whole transcript every turn, and counting costs ~35 µs per KB on the
    way to the first token (2.2 ms for 64 KB here): with this, a turn counts only what is new.
    Per tenant, so that timing cannot tell one tenant whether another sent the same text.
    """

    def __init__(self, max_entries: int = 4096, min_chars: int = 512) -> None:
        self._counts: OrderedDict[tuple[str, str, bytes], int] = OrderedDict()
        self._max_entries = max_entries
        self._min_chars = min_chars
        """Shorter messages are counted every time: as cheap as looking them up."""

    @property
    def entries(self) -> int:
        """Counts held (not `__len__`: an empty cache must not be falsy)."""
        return len(self._counts)

    def counter(self, tenant: str) -> Count:
        """`count_now` for one tenant's messages, remembering the long ones."""

        def count(message: ChatMessage) -> int:
            role, content = message.role, message.content
            if len(content) < self._min_chars:
                return message_tokens(role, content)
            key = _key(tenant, role, content)
            tokens = self._counts.get(key)
            if tokens is None:
                tokens = message_tokens(role, content)
            self._remember(key, tokens)
            return tokens

        return count

    async def prepared(self, tenant: str, messages: Sequence[ChatMessage]) -> Count:
        """`counter(tenant)` for one request, with its messages of OFF_LOOP_CHARS or more already
        digested and counted in a worker thread (hashlib and tiktoken release the GIL), so a
        long new prompt does not stall every other stream of the process. The counter knows
        those messages by identity: pass it the same message objects."""
        count = self.counter(tenant)
        long: list[ChatMessage] = []
        texts: list[tuple[str, str]] = []
        for message in messages:
            if len(content := message.content) >= OFF_LOOP_CHARS:
                long.append(message)
                texts.append((message.role, content))
        if not long:
            return count
        found = await asyncio.to_thread(self._look_up_or_count, tenant, texts)
        # By identity, not text: hashing a text here costs ~0.5 ms per MiB. Each message is held
        # with its count, so no other object can take its id meanwhile.
        ready: dict[int, tuple[ChatMessage, int]] = {}
        for message, (key, tokens) in zip(long, found, strict=True):
            self._remember(key, tokens)
            ready[id(message)] = message, tokens

        def count_prepared(message: ChatMessage) -> int:
            entry = ready.get(id(message))
            return count(message) if entry is None else entry[1]

        return count_prepared

    def _look_up_or_count(self, tenant: str, messages: list[tuple[str, str]]
                          ) -> list[tuple[tuple[str, str, bytes], int]]:
        # In a worker thread: only reads the dict; the loop thread writes it.
        out = []
        for role, content in messages:
            key = _key(tenant, role, content)
            tokens = self._counts.get(key)
            out.append((key, message_tokens(role, content) if tokens is None else tokens))
        return out

    def _remember(self, key: tuple[str, str, bytes], tokens: int) -> None:
        self._counts[key] = tokens
        self._counts.move_to_end(key)
        if len(self._counts) > self._max_entries:
            self._counts.popitem(last=False)


def _key(tenant: str, role: str, content: str) -> tuple[str, str, bytes]:
    return tenant, role, blake2b(content.encode(), digest_size=16).digest()


def fit_messages(system: Sequence[ChatMessage], history: Sequence[ChatMessage],
                 new: Sequence[ChatMessage], *, window: int, reserve: int, model: str,
                 history_reserve: int | None = None, count: Count = count_now) -> FittedChat:
    """Keep `system` and `new` (CONTEXT_TOO_LONG unless they leave `reserve` tokens free), then
    as much of `history`, newest first, as leaves `history_reserve` (default `reserve`) free.
    `count` gives one message's tokens (default: count it now)."""
    required = TOKENS_PER_REPLY + sum(count(m) for m in (*system, *new))
    if required > window - reserve:
        system_tokens = sum(count(m) for m in system)
        raise PromptlineError(
            ErrorCode.CONTEXT_TOO_LONG,
            f"the request needs {required} prompt tokens ({system_tokens} for system messages) "
            f"and max_tokens asks for {reserve}, but model {model!r} has a context window of "
            f"{window} tokens",
            stage=Stage.CONNECT)
    budget = window - max(reserve, history_reserve or 0)
    used = required
    kept: list[ChatMessage] = []
    for message in reversed(history):
        cost = count(message)
        if used + cost > budget:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    while kept and kept[0].role != "user":  # an orphaned reply whose question was dropped
        used -= count(kept.pop(0))
    return FittedChat((*system, *kept, *new), used, len(history) - len(kept))

"""Conversation memory: each tenant's chat history in Redis, shared by every replica.

Key: `{pl:c|<tenant>|<conversation id>}:turns`, a list of JSON messages, oldest first (`|` occurs
in neither tenant names nor conversation ids). The tenant is part of the key, so a key of another
tenant reads (and deletes) a different, empty conversation: NOT_FOUND, never the data.

Append: when a stream ends, its user turn(s) and the assistant reply are pushed by ONE `RPUSH`
inside a MULTI/EXEC transaction that also trims the list to `conversations.max_messages` and
renews the TTL (`conversations.ttl` after the last append). Two streams finishing at the same
time on one conversation therefore both land, each exchange contiguous (user turn right before
its reply), in the order they finished.

Partial replies (the documented policy):
- A stream that fails or is cancelled before any reply text reached the caller stores nothing:
  the caller saw no answer and may simply send the same message again.
- A stream cut after text reached the caller (mid-stream error, output moderation, client
  disconnect / Stop) stores the user turn and exactly the text the caller received, marked
  `partial: true` (written right after the error frame). It stays part of the history the
  model sees, because the user saw it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.redis_store import RedisClient
from promptline.rules import check_conversation_id
from promptline.v1 import common_pb2

from .prompts import store_errors

STORED_ROLES = frozenset({"user", "assistant"})


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message."""

    role: str
    content: str
    partial: bool = False
    created_at_ms: int = 0
    request_id: str = ""

    def to_json(self) -> str:
        data: dict[str, Any] = {"role": self.role, "content": self.content,
                                "created_at_ms": self.created_at_ms,
                                "request_id": self.request_id}
        if self.partial:
            data["partial"] = True
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Turn:
        data = json.loads(raw)
        return cls(role=data["role"], content=data["content"],
                   partial=bool(data.get("partial", False)),
                   created_at_ms=int(data.get("created_at_ms") or 0),
                   request_id=data.get("request_id") or "")


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation's stored history and the time until it expires."""

    conversation_id: str
    turns: tuple[Turn, ...]
    expires_in_ms: int


def conversation_key(tenant: str, conversation_id: str) -> str:
    """The Redis list of one tenant's conversation (its own cluster slot)."""
    return f"{{pl:c|{tenant}|{conversation_id}}}:turns"


class ConversationStore:
    """Loads, appends, reads and deletes conversation histories."""

    def __init__(self, redis: RedisClient, *, ttl: float, max_messages: int) -> None:
        self._redis = redis
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.max_messages = max_messages

    async def load(self, tenant: str, conversation_id: str) -> tuple[Turn, ...]:
        """The stored messages, oldest first; empty for a new conversation."""
        check_conversation_id(conversation_id)
        with store_errors("conversation"):
            raw = await self._redis.lrange(conversation_key(tenant, conversation_id), 0, -1)
        return tuple(Turn.from_json(item) for item in raw)

    async def append(self, tenant: str, conversation_id: str, turns: Sequence[Turn]) -> None:
        """Append one exchange atomically (one RPUSH), trim to `max_messages`, renew the TTL."""
        check_conversation_id(conversation_id)
        if not turns:
            return
        for turn in turns:
            if turn.role not in STORED_ROLES:
                raise ValueError(f"cannot store a {turn.role!r} message")
        key = conversation_key(tenant, conversation_id)
        with store_errors("conversation"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, *(t.to_json() for t in turns))
                pipe.ltrim(key, -self.max_messages, -1)
                pipe.pexpire(key, self.ttl_ms)
                await pipe.execute()

    async def get(self, tenant: str, conversation_id: str) -> Conversation:
        """The conversation with its remaining TTL; NOT_FOUND when there is none."""
        check_conversation_id(conversation_id)
        key = conversation_key(tenant, conversation_id)
        with store_errors("conversation"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lrange(key, 0, -1)
                pipe.pttl(key)
                raw, ttl = await pipe.execute()
        if not raw:
            raise _not_found(conversation_id)
        return Conversation(conversation_id, tuple(Turn.from_json(item) for item in raw),
                            max(0, int(ttl)))

    async def delete(self, tenant: str, conversation_id: str) -> int:
        """Delete the conversation; returns how many messages it held. NOT_FOUND when none."""
        check_conversation_id(conversation_id)
        key = conversation_key(tenant, conversation_id)
        with store_errors("conversation"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.llen(key)
                pipe.delete(key)
                count, _ = await pipe.execute()
        if not count:
            raise _not_found(conversation_id)
        return int(count)


def exchange(new_messages: Sequence[common_pb2.ChatMessage], reply: str, *, partial: bool,
             request_id: str) -> list[Turn]:
    """The turns one stream stores: its user/assistant messages, then the reply it delivered."""
    now = int(time.time() * 1000)
    turns = [Turn(m.role, m.content, created_at_ms=now, request_id=request_id)
             for m in new_messages if m.role in STORED_ROLES]
    turns.append(Turn("assistant", reply, partial=partial, created_at_ms=now,
                      request_id=request_id))
    return turns


def _not_found(conversation_id: str) -> PromptlineError:
    return PromptlineError(ErrorCode.NOT_FOUND, f"no conversation {conversation_id!r}",
                           stage=Stage.CONNECT)

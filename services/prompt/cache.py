"""The exact response cache: a finished reply, replayed to the same tenant's identical request.

Opt-in per model (`models[].cache`, docs/cache.md). One entry per Redis key
`pl:cache|<tenant>|<sha256>`: the tenant is part of every key (`|` occurs in no tenant name), so
one tenant's request can only ever read that tenant's entries. The SHA-256 covers a canonical,
length-prefixed encoding of everything that changes the reply: the model (its name and the
upstream model names of its pool), the messages sent to it (after the managed prompt, history
and context fit: `ChatPlan.messages`), `max_tokens` and `temperature`. Stream shaping changes
frames, not text, so it is left out. Keys are single: no hash tag, so on a cluster the entries
spread over every shard.

Value: the reply text, finish reason, token usage (the provider's, so a hit is priced as the
reply was) and answering model, as JSON, written with one `SET ... PX ttl`. Stored: a reply that
ended with `stop` or `length` (so it passed output moderation: a block raises before `done`),
answered by the model asked for (not a fallback, which would keep serving a substitute for a
whole TTL after the model recovers) and no larger than `max_bytes`. Everything else (errors,
blocks, cancels) never reaches the store.

Redis trouble is a miss, never an error: every call is bounded by `quota_policy.redis_timeout`;
a failure is counted (`promptline_redis_errors_total{operation="cache_get|cache_set"}`), logged
once per outage, and for a second afterwards the cache is not asked at all
(`redis_store.StoreOutage`), so a hung Redis costs one timeout a second rather than one per
request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from promptline.config import CacheConfig, ModelConfig
from promptline.metrics import CACHE_REQUESTS, REDIS_ERRORS
from promptline.redis_store import STORE_ERRORS, RedisClient, StoreOutage, store_call
from promptline.v1 import common_pb2

log = logging.getLogger("promptline.cache")

KEY_PREFIX = "pl:cache|"
KEY_VERSION = b"promptline-cache-1"
"""Hashed first: a change of the key's encoding starts a fresh cache instead of misreading."""
STORED_FINISH_REASONS = frozenset({"stop", "length"})
REPLAY_PIECE_CHARS = 64
"""Text per replayed delta, cut after the last whitespace in it: a replay is shaped like a
stream (the browser's typewriter, clients counting deltas), at no pace of its own."""
HEADER = "x-promptline-cache"
"""Initial metadata the edge passes on as a response header: `hit` or `miss`."""


def count(model: str, result: str) -> None:
    """`promptline_cache_requests_total`: hit, miss, bypass, store or skip."""
    CACHE_REQUESTS.labels(model, result).inc()


def cache_key(tenant: str, model: ModelConfig, messages: Sequence[common_pb2.ChatMessage],
              max_tokens: int, temperature: float | None) -> str:
    """The tenant's key for this exact generation."""
    digest = hashlib.sha256(KEY_VERSION)

    def part(value: str) -> None:
        # Length-prefixed, so no two different inputs encode the same bytes.
        data = value.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    upstreams = sorted({d.upstream_model or model.name for d in model.pool})
    for value in (model.name, model.provider, "\n".join(upstreams), str(max_tokens),
                  "none" if temperature is None else float(temperature).hex()):
        part(value)
    for message in messages:
        part(message.role)
        part(message.content)
    return f"{KEY_PREFIX}{tenant}|{digest.hexdigest()}"


@dataclass(frozen=True, slots=True)
class CachedReply:
    """One stored reply."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    cached_prompt_tokens: int = 0
    """Of `prompt_tokens`, those the provider's prompt cache served (they price lower)."""

    def encode(self) -> bytes:
        return json.dumps({"text": self.text, "finish_reason": self.finish_reason,
                           "prompt_tokens": self.prompt_tokens,
                           "completion_tokens": self.completion_tokens, "model": self.model,
                           "cached_prompt_tokens": self.cached_prompt_tokens},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | str) -> CachedReply:
        """Raises ValueError (or a KeyError/TypeError) on anything this version did not write."""
        data = json.loads(raw)
        return cls(str(data["text"]), str(data["finish_reason"]), int(data["prompt_tokens"]),
                   int(data["completion_tokens"]), str(data["model"]),
                   int(data["cached_prompt_tokens"]))

    def done(self) -> common_pb2.Done:
        """The replay's terminal frame: the stored accounting (unpriced), `cached` set, no
        deployment."""
        return common_pb2.Done(
            finish_reason=self.finish_reason, model=self.model, cached=True,
            usage=common_pb2.Usage(prompt_tokens=self.prompt_tokens,
                                   completion_tokens=self.completion_tokens,
                                   total_tokens=self.prompt_tokens + self.completion_tokens,
                                   cached_prompt_tokens=self.cached_prompt_tokens))


def pieces(text: str, tokens: int) -> Iterator[tuple[str, int]]:
    """`text` in replay deltas of about REPLAY_PIECE_CHARS, with `tokens` spread over them in
    proportion to their length (the counts add up to `tokens`)."""
    size = len(text)
    start = 0
    while start < size:
        end = min(start + REPLAY_PIECE_CHARS, size)
        if end < size:
            space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if space > start:
                end = space + 1
        yield text[start:end], tokens * end // size - tokens * start // size
        start = end


@dataclass(frozen=True, slots=True)
class CacheTicket:
    """A stream on a model with a cache: where its reply would be stored, and the rules."""

    key: str
    settings: CacheConfig
    model: str
    """The model the request resolved to; a reply from another (a fallback) is not stored."""

    def entry(self, done: common_pb2.Done, text: str) -> bytes | None:
        """The encoded entry for a finished reply, or None when it is not to be stored."""
        if done.finish_reason not in STORED_FINISH_REASONS or done.model != self.model:
            return None
        raw = CachedReply(text, done.finish_reason, done.usage.prompt_tokens,
                          done.usage.completion_tokens, done.model,
                          done.usage.cached_prompt_tokens).encode()
        return raw if len(raw) <= self.settings.max_bytes else None


class ResponseCache:
    """Reads and writes entries; every failure is a miss (module docstring)."""

    __slots__ = ("_outage", "_redis", "timeout")

    def __init__(self, redis: RedisClient, timeout: float) -> None:
        self._redis = redis
        self.timeout = timeout
        self._outage = StoreOutage(
            log, "response cache unavailable (%s): every request is a miss until it answers",
            "response cache reachable again")

    async def get(self, key: str, request_id: str) -> CachedReply | None:
        """The stored reply, or None (absent, unreadable, or the store failed)."""
        if self._outage.skipping():
            return None
        try:
            async with asyncio.timeout(self.timeout):
                raw = await store_call(self._redis.get(key))
        except STORE_ERRORS as exc:
            self._failed("get", exc, request_id)
            return None
        self._outage.answered()
        if raw is None:
            return None
        try:
            return CachedReply.decode(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable cache entry ignored", extra={"request_id": request_id})
            return None

    async def put(self, key: str, entry: bytes, ttl: float, model: str,
                  request_id: str) -> None:
        """Store `entry` for `ttl` seconds; never raises."""
        if self._outage.skipping():
            return
        try:
            async with asyncio.timeout(self.timeout):
                await store_call(self._redis.set(key, entry, px=max(1, round(ttl * 1000))))
        except STORE_ERRORS as exc:
            self._failed("set", exc, request_id)
            return
        self._outage.answered()
        count(model, "store")

    def _failed(self, operation: str, exc: BaseException, request_id: str) -> None:
        REDIS_ERRORS.labels(f"cache_{operation}").inc()
        self._outage.failed(exc, request_id)

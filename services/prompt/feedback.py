"""Request records, feedback and per-prompt stats, in Redis (docs/prompt-lifecycle.md).

Records (`RequestRecords.write`, once per stream, in a task of its own after the terminal frame)
    A stream the prompt service planned leaves a compact hash per tenant, keyed by request id:
    prompt id and version, the model that answered, settled tokens, first-token and total ms,
    the outcome, the end time. A stream of a managed prompt also adds, in the same script call,
    to the prompt's stats hash of its UTC hour: per version, requests, errors by code, cancels,
    tokens and a first-token histogram. Both expire `feedback.retention` after the stream (the
    hash: after its hour). Nothing is written per token. Redis down or slow: the record is
    dropped, counted (`promptline_redis_errors_total{operation="request_record"}`), one warning
    per outage, and for a second after a failure the store is not tried
    (`redis_store.StoreOutage`): the stream never waits for any of it.

Feedback (`FeedbackStore.submit`)
    One script call on the tenant's slot swaps the request's score and adds the difference to
    its stats hash, so a replaced feedback never counts twice. Scores travel as integer
    thousandths (Redis counters are integers).

Stats (`FeedbackStore.stats`)
    The hours of a range, one HGETALL each, in one pipeline, summed per version; p50 and p95 are
    read from the histogram buckets (linear within a bucket, as Prometheus does).

Keys are in the tenant's hash slot (`usage.tenant_key`), so every script stays on one slot of a
cluster, and are built from the caller's tenant, which the servicer authenticated: another
tenant's request id or prompt is simply not there.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from promptline.metrics import FEEDBACK, REDIS_ERRORS
from promptline.redis_store import STORE_ERRORS, RedisClient, StoreOutage, reply_text, store_call
from promptline.rules import check_request_id, invalid
from promptline.streams import CANCELLED, DONE
from promptline.v1 import prompt_admin_pb2

from .prompts import not_found, store_errors
from .session import ChatSession, charge
from .usage import HOUR_MS, READ_TIMEOUT, tenant_key

log = logging.getLogger("promptline.feedback")

MAX_COMMENT_CHARS = 2000
SCORE_SCALE = 1000
"""Scores are kept as integer thousandths: Redis counts integers, and 0..1 needs no finer."""
FIRST_TOKEN_BUCKETS_MS = (10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000,
                          3000, 5000, 7500, 10_000, 15_000, 20_000, 30_000, 60_000, 120_000,
                          300_000)
"""Upper bounds of the first-token histogram (and `inf`): p50/p95 land within one bucket, and a
version's hour holds at most this many fields for it."""
_ATTEMPTS = 3
"""Feedback reads the record, then swaps in a script that checks it is still that record; a
request id reused in between (a caller's X-Request-Id) is read again, this many times at most."""

# KEYS[1]: the record; KEYS[2] (a stream of a managed prompt): its hour's stats hash. ARGV[1]: the
# record's expiry (ms since the epoch); ARGV[2]: its field count n; n field, value pairs; then
# with KEYS[2] the hash's expiry and field, increment pairs. A record written under a reused
# request id replaces the old one whole (its feedback stays counted where it was given).
_WRITE_LUA = """
redis.call('DEL', KEYS[1])
local n = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * n))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
if #KEYS > 1 then
  local a = 3 + 2 * n
  for i = a + 1, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIREAT', KEYS[2], ARGV[a])
end
return 1
"""

# KEYS as above. ARGV: the record's end time as read (another value: the id was reused since,
# 0 is returned and the caller reads again), the score, the comment ('' none), now (ms), the
# version. Returns nil for no record, else {1 if it replaced a feedback, the record's fields}.
_FEEDBACK_LUA = """
local ended = redis.call('HGET', KEYS[1], 't')
if not ended then return false end
if ended ~= ARGV[1] then return 0 end
local old = redis.call('HGET', KEYS[1], 'fs')
redis.call('HSET', KEYS[1], 'fs', ARGV[2], 'fa', ARGV[4])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'fc')
else
  redis.call('HSET', KEYS[1], 'fc', ARGV[3])
end
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 1 then
  if old then
    redis.call('HINCRBY', KEYS[2], ARGV[5] .. '|fs', tonumber(ARGV[2]) - tonumber(old))
  else
    redis.call('HINCRBY', KEYS[2], ARGV[5] .. '|fs', ARGV[2])
    redis.call('HINCRBY', KEYS[2], ARGV[5] .. '|fc', 1)
  end
end
return {old and 1 or 0, redis.call('HGETALL', KEYS[1])}
"""


def record_key(tenant: str, request_id: str) -> str:
    return tenant_key(tenant, f"req:{request_id}")


def stats_key(tenant: str, prompt_id: str, hour: int) -> str:
    """The prompt's stats hash of one UTC hour (hours since the epoch); prompt ids hold no `:`."""
    return tenant_key(tenant, f"pstats:{prompt_id}:{hour}")


def _bucket(ms: int) -> str:
    """The histogram field a first-token time counts in: the smallest bound it does not pass."""
    at = bisect.bisect_left(FIRST_TOKEN_BUCKETS_MS, ms)
    return str(FIRST_TOKEN_BUCKETS_MS[at]) if at < len(FIRST_TOKEN_BUCKETS_MS) else "inf"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one stream leaves behind when it ends."""

    tenant: str
    request_id: str
    prompt_id: str
    """"" without a managed prompt."""
    version: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    first_token_ms: int | None
    """None when no text reached the caller."""
    duration_ms: int
    outcome: str
    """`done`, `cancelled` or an error code."""
    ended_at_ms: int

    @classmethod
    def of(cls, session: ChatSession, started: float, outcome: str) -> RequestRecord | None:
        """The record of a stream that ends now (`started`: its `perf_counter()` start); None
        for one rejected before it was planned (no tenant, an invalid request): nothing to
        join feedback or stats to."""
        if session.tenant is None or session.plan is None:
            return None
        now = time.perf_counter()
        plan = session.plan
        used_in, used_out = (0, 0) if session.cached else charge(  # as `ChatSession` settles
            session.usage, plan.prompt_tokens, session.completion_tokens)
        first = session.first_text_at
        return cls(
            tenant=session.tenant.name, request_id=session.request_id,
            prompt_id=plan.prompt.prompt_id if plan.prompt else "",
            version=plan.prompt.version if plan.prompt else 0,
            model=(session.served or plan.model).name,
            prompt_tokens=used_in, completion_tokens=used_out,
            first_token_ms=round((first - started) * 1000) if first else None,
            duration_ms=round((now - started) * 1000), outcome=outcome,
            ended_at_ms=int(time.time() * 1000))

    @property
    def hour(self) -> int:
        return self.ended_at_ms // HOUR_MS

    def fields(self) -> list[str | int]:
        """The record hash's field, value pairs, flattened."""
        pairs: list[str | int] = ["p", self.prompt_id, "v", self.version, "m", self.model,
                                  "i", self.prompt_tokens, "o", self.completion_tokens,
                                  "d", self.duration_ms, "c", self.outcome,
                                  "t", self.ended_at_ms]
        if self.first_token_ms is not None:
            pairs += ["f", self.first_token_ms]
        return pairs

    def stat_fields(self) -> list[str | int]:
        """The prompt's hourly stats increments, as field, increment pairs, flattened."""
        v = self.version
        pairs: list[str | int] = [f"{v}|n", 1]
        if self.outcome == CANCELLED:
            pairs += [f"{v}|x", 1]
        elif self.outcome != DONE:
            pairs += [f"{v}|e|{self.outcome}", 1]
        pairs += [f"{v}|i", self.prompt_tokens, f"{v}|o", self.completion_tokens]
        if self.first_token_ms is not None:
            pairs += [f"{v}|h|{_bucket(self.first_token_ms)}", 1]
        return pairs

    @classmethod
    def from_hash(cls, tenant: str, request_id: str,
                  raw: Mapping[str, str]) -> RequestRecord:
        first = raw.get("f")
        return cls(tenant=tenant, request_id=request_id, prompt_id=raw.get("p", ""),
                   version=int(raw.get("v", 0)), model=raw.get("m", ""),
                   prompt_tokens=int(raw.get("i", 0)), completion_tokens=int(raw.get("o", 0)),
                   first_token_ms=int(first) if first is not None else None,
                   duration_ms=int(raw.get("d", 0)), outcome=raw.get("c", ""),
                   ended_at_ms=int(raw.get("t", 0)))

    def to_pb(self) -> prompt_admin_pb2.RequestRecord:
        pb = prompt_admin_pb2.RequestRecord(
            request_id=self.request_id, prompt_id=self.prompt_id, prompt_version=self.version,
            model=self.model, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, duration_ms=self.duration_ms,
            outcome=self.outcome, ended_at_ms=self.ended_at_ms)
        if self.first_token_ms is not None:
            pb.first_token_ms = self.first_token_ms
        return pb


class RequestRecords:
    """Writes each stream's record (and its prompt's stats): one script call per stream."""

    __slots__ = ("_outage", "_retention", "_script", "timeout")

    def __init__(self, redis: RedisClient, retention: Callable[[], float], *,
                 timeout: float) -> None:
        self._retention = retention
        """`feedback.retention` in seconds, read per write (a live reload applies)."""
        self.timeout = timeout
        self._script = redis.register_script(_WRITE_LUA)
        self._outage = StoreOutage(
            log, "Redis unavailable (%s): request records and prompt stats are not written "
                 "until it is back", "request records are written again")

    async def write(self, record: RequestRecord) -> None:
        """Store `record`; never raises (the stream has ended already)."""
        if self._outage.skipping():
            self._failed(None, record.request_id)
            return
        keep_ms = int(self._retention() * 1000)
        fields = record.fields()
        keys = [record_key(record.tenant, record.request_id)]
        args: list[str | int] = [record.ended_at_ms + keep_ms, len(fields) // 2, *fields]
        if record.prompt_id:
            keys.append(stats_key(record.tenant, record.prompt_id, record.hour))
            args += [(record.hour + 1) * HOUR_MS + keep_ms, *record.stat_fields()]
        try:
            async with asyncio.timeout(self.timeout):
                await store_call(self._script(keys=keys, args=[str(a) for a in args]))
        except STORE_ERRORS as exc:
            self._failed(exc, record.request_id)
            return
        self._outage.answered()

    def _failed(self, exc: BaseException | None, request_id: str) -> None:
        """Count a record Redis did not take (`exc`; None: skipped); one warning per outage."""
        REDIS_ERRORS.labels("request_record").inc()
        self._outage.failed(exc, request_id)


# --- feedback --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Feedback:
    """The feedback stored on a request, and the request."""

    score: int
    """Thousandths."""
    comment: str
    created_at_ms: int
    replaced: bool
    record: RequestRecord

    def to_pb(self) -> prompt_admin_pb2.Feedback:
        return prompt_admin_pb2.Feedback(
            request_id=self.record.request_id, score=self.score / SCORE_SCALE,
            comment=self.comment, created_at_ms=self.created_at_ms, replaced=self.replaced,
            request=self.record.to_pb())


def check_score(score: float | None) -> int:
    """A feedback score in thousandths: 1, -1 or a number from 0 to 1; else INVALID_REQUEST."""
    if score is None:
        raise invalid("score is required")
    if score != -1 and not 0 <= score <= 1:  # NaN fails both
        raise invalid(f"score must be 1, -1 or a number from 0 to 1, got {score:g}")
    return round(score * SCORE_SCALE)


def check_comment(comment: str) -> str:
    if len(comment) > MAX_COMMENT_CHARS:
        raise invalid(f"comment must be at most {MAX_COMMENT_CHARS} characters, got "
                      f"{len(comment)}")
    return comment


def score_label(score: int) -> str:
    """The metric's `score` label of a score in thousandths: "-1", or 0..1 to one decimal
    (halves up: 0.25 is "0.3"), so at most 12 values."""
    if score < 0:
        return "-1"
    tenths = (score + SCORE_SCALE // 20) // (SCORE_SCALE // 10)
    return {0: "0", 10: "1"}.get(tenths, f"0.{tenths}")


# --- stats -----------------------------------------------------------------------------------


@dataclass(slots=True)
class VersionStats:
    """One version's sums over a range."""

    version: int
    requests: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: dict[float, int] = field(default_factory=dict)
    """Histogram: upper bound (ms, `inf`) -> streams."""
    feedback_sum: int = 0
    """Thousandths."""
    feedback_count: int = 0

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    def add(self, rest: list[str], value: int) -> None:
        """One stats field (its parts after the version) of one hour."""
        kind = rest[0]
        if kind == "e" and len(rest) == 2:
            self.errors_by_code[rest[1]] = self.errors_by_code.get(rest[1], 0) + value
        elif kind == "h" and len(rest) == 2:
            bound = float(rest[1])
            self.first_token[bound] = self.first_token.get(bound, 0) + value
        elif len(rest) == 1 and kind in _SUMS:
            name = _SUMS[kind]
            setattr(self, name, getattr(self, name) + value)

    def first_token_ms(self, q: float) -> int | None:
        """The q-quantile of the first-token times, linear within its bucket; None without
        samples. A sample past the last bound reads as that bound."""
        total = sum(self.first_token.values())
        if not total:
            return None
        rank = q * total
        seen = 0
        for bound in sorted(self.first_token):
            count = self.first_token[bound]
            if count and seen + count >= rank:
                lower = _lower_bound(bound)
                if math.isinf(bound):
                    return round(lower)
                return round(lower + (bound - lower) * (rank - seen) / count)
            seen += count
        return None  # unreachable: the ranks add up to `total`

    def to_pb(self) -> prompt_admin_pb2.VersionStats:
        pb = prompt_admin_pb2.VersionStats(
            version=self.version, requests=self.requests, errors=self.errors,
            errors_by_code=self.errors_by_code, cancelled=self.cancelled,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            feedback_count=self.feedback_count)
        p50, p95 = self.first_token_ms(0.5), self.first_token_ms(0.95)
        if p50 is not None and p95 is not None:
            pb.first_token_p50_ms, pb.first_token_p95_ms = p50, p95
        if self.feedback_count:
            pb.feedback_mean = round(self.feedback_sum / self.feedback_count / SCORE_SCALE, 4)
        return pb


_SUMS = {"n": "requests", "x": "cancelled", "i": "prompt_tokens", "o": "completion_tokens",
         "fs": "feedback_sum", "fc": "feedback_count"}


def _lower_bound(bound: float) -> float:
    below = [b for b in FIRST_TOKEN_BUCKETS_MS if b < bound]
    return float(below[-1]) if below else 0.0


@dataclass(frozen=True, slots=True)
class PromptStats:
    prompt_id: str
    from_ms: int
    to_ms: int
    versions: tuple[VersionStats, ...]

    def to_pb(self) -> prompt_admin_pb2.PromptStats:
        return prompt_admin_pb2.PromptStats(
            prompt_id=self.prompt_id, from_ms=self.from_ms, to_ms=self.to_ms,
            versions=[v.to_pb() for v in self.versions])


class FeedbackStore:
    """Feedback on a tenant's requests and its prompts' stats."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._swap = redis.register_script(_FEEDBACK_LUA)

    async def submit(self, tenant: str, request_id: str, score: float | None,
                     comment: str) -> Feedback:
        """Store feedback on `tenant`'s request, replacing any earlier one; INVALID_REQUEST
        naming the field, NOT_FOUND for no such record (unknown, expired, another tenant's),
        UNAVAILABLE when Redis fails."""
        check_request_id(request_id)
        milli = check_score(score)
        check_comment(comment)
        key = record_key(tenant, request_id)
        now = int(time.time() * 1000)
        with store_errors("feedback"):
            async with asyncio.timeout(READ_TIMEOUT):
                answer = await self._submit(key, tenant, request_id, milli, comment, now)
        replaced, raw = answer
        record = RequestRecord.from_hash(tenant, request_id, raw)
        FEEDBACK.labels(record.prompt_id, str(record.version) if record.prompt_id else "",
                        score_label(milli)).inc()
        return Feedback(milli, comment, now, replaced, record)

    async def _submit(self, key: str, tenant: str, request_id: str, milli: int, comment: str,
                      now: int) -> tuple[bool, dict[str, str]]:
        for _ in range(_ATTEMPTS):
            prompt_id, version, ended = (
                reply_text(v) if v is not None else None
                for v in await self.redis.hmget(key, ["p", "v", "t"]))
            if ended is None:
                break
            keys = [key]
            if prompt_id:
                keys.append(stats_key(tenant, prompt_id, int(ended) // HOUR_MS))
            answer = await self._swap(keys=keys, args=[ended, milli, comment, now,
                                                       version or "0"])
            if answer is None:
                break
            if isinstance(answer, list):
                replaced, flat = answer
                raw = {reply_text(k): reply_text(v)
                       for k, v in zip(flat[::2], flat[1::2], strict=True)}
                return bool(int(replaced)), raw
        raise not_found(f"no request {request_id} to give feedback on (unknown, another "
                        "tenant's, or older than feedback.retention)")

    async def stats(self, tenant: str, prompt_id: str, start: int, end: int) -> PromptStats:
        """`tenant`'s stats of `prompt_id` in [start, end) (hour-aligned ms), per version."""
        hours = range(start // HOUR_MS, end // HOUR_MS)
        pipe = self.redis.pipeline(transaction=False)
        for hour in hours:
            pipe.hgetall(stats_key(tenant, prompt_id, hour))
        with store_errors("prompt_stats"):
            async with asyncio.timeout(READ_TIMEOUT):
                buckets = await store_call(pipe.execute()) if hours else []
        versions: dict[int, VersionStats] = {}
        for bucket in buckets:
            for raw_field, raw_value in bucket.items():
                number, *rest = reply_text(raw_field).split("|")
                if not number.isdigit() or not rest:
                    continue
                found = versions.setdefault(int(number), VersionStats(int(number)))
                found.add(rest, int(raw_value))
        return PromptStats(prompt_id, start, end, tuple(versions[v] for v in sorted(versions)))

"""Usage per tenant and UTC hour, in Redis: what `GET /v1/usage` and `PromptAdmin.GetUsage` read.

Writing: each admitted stream adds, at its end, to one hash per tenant and hour, in the same
script call as its budget settlement (`budgets.Ledger`), never per token: for each of its model,
its API key and its end user, `<m|k|u>|<name>|<n|e|i|o|c>` fields count requests, errors, prompt
and completion tokens and cost (pico-dollars). The hash expires `usage.retention` after its last
write.

Reading: the hours of a range, one HGETALL each, in one pipeline (every key is in the tenant's
slot), summed by model, UTC day, API key or end user. One tenant's hashes are only ever read for
that tenant: the key is built from the caller's tenant, which the servicer authenticated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.redis_store import STORE_ERRORS, RedisClient, reply_text, store_call
from promptline.rules import USAGE_GROUPS as GROUPS
from promptline.rules import invalid

HOUR_MS = 3_600_000
_DIMENSION = {"model": "m", "day": "m", "api_key": "k", "user": "u"}
"""The fields each grouping reads: every request has a model, so days sum the model fields."""
_COUNTERS = {"n": "requests", "e": "errors", "i": "prompt_tokens", "o": "completion_tokens",
             "c": "cost"}
READ_TIMEOUT = 5.0
"""Seconds a usage query may wait on Redis: off the chat path, and a long range is many hours."""


def tenant_key(tenant: str, rest: str) -> str:
    """A key in the tenant's hash slot (the hash tag of `quotas.quota_key("tenant", ...)`), so
    every script and pipeline on a tenant's keys stays on one slot of a cluster."""
    return f"{{pl:quota:tenant:{tenant}}}:{rest}"


def usage_key(tenant: str, now: float) -> str:
    """The tenant's usage hash of the hour `now` (seconds since the epoch) falls in."""
    return _hour_key(tenant, int(now * 1000) // HOUR_MS)


def _hour_key(tenant: str, hour: int) -> str:
    return tenant_key(tenant, f"usage:{hour}")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One settled stream, as its tenant's usage counts it."""

    model: str
    key_id: str
    user: str
    """"" when the request named none."""
    prompt_tokens: int
    completion_tokens: int
    cost: int
    """Pico-dollars."""
    error: bool

    def fields(self) -> Iterator[tuple[str, int]]:
        """(field, increment) pairs; zero increments are left out."""
        counts = (("n", 1), ("e", int(self.error)), ("i", self.prompt_tokens),
                  ("o", self.completion_tokens), ("c", self.cost))
        for dimension, name in (("m", self.model), ("k", self.key_id), ("u", self.user)):
            for counter, value in counts:
                if value:
                    yield f"{dimension}|{name}|{counter}", value


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group's totals (`key` "" in a report's total)."""

    key: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: int = 0
    """Pico-dollars."""

    def plus(self, counter: str, value: int) -> UsageRow:
        name = _COUNTERS[counter]
        return replace(self, **{name: getattr(self, name) + value})

    def add(self, other: UsageRow) -> UsageRow:
        return replace(self, **{f.name: getattr(self, f.name) + getattr(other, f.name)
                                for f in fields(self) if f.name != "key"})


@dataclass(frozen=True, slots=True)
class UsageReport:
    tenant: str
    from_ms: int
    to_ms: int
    group_by: str
    rows: tuple[UsageRow, ...]
    total: UsageRow


def usage_range(from_ms: int, to_ms: int, now_ms: int, retention_s: float, *,
                setting: str = "usage.retention") -> tuple[int, int]:
    """The hour-aligned range a query reads: `from_ms` rounded down (0: the start of the current
    UTC day), `to_ms` rounded up (0: now). INVALID_REQUEST naming the field when it is not a
    range or is longer than the retention (the config key `setting`)."""
    if from_ms < 0 or to_ms < 0:
        raise invalid(f"{'from' if from_ms < 0 else 'to'} must not be before 1970")
    if not from_ms:
        from_ms = now_ms - now_ms % (24 * HOUR_MS)
    to_ms = to_ms or now_ms
    start = from_ms - from_ms % HOUR_MS
    end = -(-to_ms // HOUR_MS) * HOUR_MS
    if end <= start:
        raise invalid("from must be before to")
    if end - start > retention_s * 1000 + HOUR_MS:
        raise invalid(f"from: the range may be at most {setting} ({retention_s / 86400:g} "
                      "days) long")
    return start, end


class UsageReader:
    """Reads a tenant's hourly usage hashes and sums them by a grouping."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def report(self, tenant: str, start: int, end: int, group_by: str) -> UsageReport:
        """`tenant`'s usage in [start, end) (hour-aligned ms) grouped by `group_by`; raises
        INVALID_REQUEST for an unknown grouping, UNAVAILABLE when Redis fails."""
        if group_by not in GROUPS:
            raise invalid(f"group_by must be one of {', '.join(GROUPS)}, got {group_by!r}")
        hours = range(start // HOUR_MS, end // HOUR_MS)
        pipe = self.redis.pipeline(transaction=False)
        for hour in hours:
            pipe.hgetall(_hour_key(tenant, hour))
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                buckets = await store_call(pipe.execute()) if hours else []
        except STORE_ERRORS:
            raise PromptlineError(ErrorCode.UNAVAILABLE, "usage store unavailable",
                                  stage=Stage.CONNECT, retryable=True) from None
        rows: dict[str, UsageRow] = {}
        dimension = _DIMENSION[group_by]
        for hour, bucket in zip(hours, buckets, strict=True):
            day = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%d")
            for raw_field, raw_value in bucket.items():
                parts = reply_text(raw_field).split("|")  # no name holds a `|` (rules.py)
                if len(parts) != 3 or parts[0] != dimension or parts[2] not in _COUNTERS:
                    continue
                name, counter = parts[1], parts[2]
                group = day if group_by == "day" else name
                rows[group] = rows.get(group, UsageRow(group)).plus(counter, int(raw_value))
        ordered = tuple(rows[k] for k in sorted(rows))
        total = UsageRow("")
        for row in ordered:
            total = total.add(row)
        return UsageReport(tenant, start, end, group_by, ordered, total)

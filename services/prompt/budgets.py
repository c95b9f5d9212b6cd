"""Spending budgets per tenant, API key and end user, kept in Redis beside the quotas.

Admission
    A request's budgets (`budget_checks`: the tenant's, its key's, its end user's) are checked
    and charged by the tenant side of `QuotaManager.admit`, in the same Lua script as the
    tenant's QPM/TPM: either every limit admits the request and every counter moves, or none
    does. Each budget is one hash per period, `{s: settled, r: reserved}` in pico-dollars
    (`pricing`); a request fits when `s + r + worst case <= budget` and then adds its worst case
    to `r`, and its hold's own field `q:<token>`, which settling takes (so it settles once).
    The comparison is exact for any 64-bit amount: Lua's numbers are doubles, so amounts
    travel as decimal strings and are compared as two base-1e9 limbs (`BIG_LUA`).

Settlement (`Ledger.settle`, once per admitted stream, at its end)
    One script call on the tenant's slot: each budget's reservation leaves `r` and the real cost
    joins `s`; the stream's requests, errors, tokens and cost join the tenant's hourly usage
    hash (`usage.py`); each alert threshold that `s` reached is claimed with SET NX on a key of
    its own per (tenant, budget, period, threshold), so exactly one replica raises each alert,
    once per period. A stream that failed before any output settles a cost of 0 (a refund).

Periods
    Calendar periods in UTC (day; week from Monday; month), read from this replica's clock (the
    replicas are NTP-synchronised; a skew moves a boundary by the skew). A stream is settled in
    the period it was admitted in. Keys outlive their period by `PERIOD_GRACE_S`.

Keys
    Every key is in the tenant's hash slot (`tenant_key`, the hash tag of the tenant's quota
    keys), so admission and settlement each stay one script call on one slot, on a cluster too.

Redis slow or down (`quota_policy.on_redis_error`)
    `fail_closed`: the request is rejected with UNAVAILABLE, as for quotas. `fail_open`: admitted
    unchecked. `local`: each replica holds its share (1 / `replicas`) of what was left of each
    budget when it last saw it in Redis (of the whole budget, if it never did), in memory. A
    settlement Redis does not take is logged, counted
    (`promptline_redis_errors_total{operation="quota_spend"}`) and kept to be written when it
    answers again (`Ledger`), exactly once (the hold's token in the budget hash).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from promptline.config import Budget, QuotaPolicy, TenantConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.metrics import REDIS_ERRORS
from promptline.redis_store import (
    STORE_ERRORS,
    STORE_RETRY_S,
    RedisClient,
    StoreOutage,
    store_call,
)

from .alerts import Alert
from .pricing import from_pico, to_pico
from .usage import UsageRecord, tenant_key, usage_key

log = logging.getLogger("promptline.budgets")

PERIOD_GRACE_S = 2 * 86400
"""Budget and alert keys outlive their period this long: a stream admitted just before the end
still settles into it, and the period's alerts stay claimed."""

# Amounts are decimal strings of non-negative integers up to 2^63; a double holds integers
# exactly only up to 2^53, so they are compared and added as {high, low} limbs of base 1e9.
BIG_LUA = """
local function big(s)
  if not s then return {0, 0} end
  local n = #s
  if n <= 9 then return {0, tonumber(s)} end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end
local function big_add(a, b)
  local low = a[2] + b[2]
  local carry = math.floor(low / 1e9)
  return {a[1] + b[1] + carry, low - carry * 1e9}
end
local function big_gt(a, b)
  return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2])
end
"""

# KEYS: the budget hashes, then each budget's alert keys (one per threshold, in order), then the
# usage hash when ARGV[2] is 1. ARGV: budget count, usage (0|1), the hold's token ('' when it
# reserved nothing in Redis), then per budget: reserved, actual, expire-at ms, threshold count,
# the thresholds; then with usage: its ttl in seconds and field, increment pairs. Amounts are
# pico-dollar integer strings. Returns per budget: the settled spend as {high, low} limbs, the
# number of thresholds claimed, and their indexes; nothing when the hold was settled already.
_SPEND_LUA = BIG_LUA + """
local nb = tonumber(ARGV[1])
local token = ARGV[3]
-- Admission left the hold's token in each budget hash: settling takes it, so a second call for
-- the same hold (a retry of one that timed out after it ran) moves nothing.
if token ~= '' and nb > 0 and redis.call('HDEL', KEYS[1], 'q:' .. token) == 0 then
  return {}
end
local a = 4
local alert_key = nb + 1
local out = {}
for j = 1, nb do
  local key = KEYS[j]
  local reserved, actual, expire_at = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local nt = tonumber(ARGV[a + 3])
  a = a + 4
  if token ~= '' and j > 1 then
    redis.call('HDEL', key, 'q:' .. token)
  end
  if reserved ~= '0' then
    if redis.call('HINCRBY', key, 'r', '-' .. reserved) < 0 then
      redis.call('HSET', key, 'r', 0)  -- the hash expired meanwhile, or a double release
    end
  end
  if actual ~= '0' then
    redis.call('HINCRBY', key, 's', actual)
  end
  if reserved ~= '0' or actual ~= '0' then
    redis.call('PEXPIREAT', key, expire_at)
  end
  local spent = big(redis.call('HGET', key, 's'))
  local claimed = {}
  for t = 1, nt do
    if actual ~= '0' and not big_gt(big(ARGV[a]), spent)
        and redis.call('SET', KEYS[alert_key], '1', 'NX', 'PXAT', expire_at) then
      claimed[#claimed + 1] = t
    end
    a = a + 1
    alert_key = alert_key + 1
  end
  out[#out + 1] = spent[1]
  out[#out + 1] = spent[2]
  out[#out + 1] = #claimed
  for _, t in ipairs(claimed) do out[#out + 1] = t end
end
if ARGV[2] == '1' then
  local usage = KEYS[alert_key]
  local ttl = ARGV[a]
  for i = a + 1, #ARGV, 2 do
    redis.call('HINCRBY', usage, ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', usage, ttl)
end
return out
"""


# --- periods ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period of a budget, in UTC."""

    kind: str
    """"day", "week" or "month"."""
    start: datetime
    end: datetime

    @property
    def id(self) -> str:
        """Part of the period's keys: a new period (or a new kind of period) starts at 0."""
        return f"{self.kind[0]}{self.start:%Y-%m-%d}"

    def reset_ms(self, now: float) -> int:
        """Milliseconds from `now` (seconds) to the end of the period, at least 1."""
        return max(1, math.ceil((self.end.timestamp() - now) * 1000))


def period_of(kind: str, now: float) -> Period:
    """The period of kind `kind` that `now` (seconds since the epoch) falls in."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        return Period(kind, day, day + timedelta(days=1))
    if kind == "week":
        start = day - timedelta(days=day.weekday())
        return Period(kind, start, start + timedelta(days=7))
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return Period(kind, start, end)


# --- what admission checks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """One budget a request is held to, and what it reserves against it."""

    tenant: str
    scope: str
    """"tenant", "key" or "user"."""
    who: str
    """The API key's id or the end user's id; "" for the tenant's own budget."""
    budget: Budget
    period: Period
    cost: int
    """The reservation: the request's worst case, in pico-dollars."""

    @property
    def limit(self) -> int:
        return to_pico(self.budget.usd)

    @property
    def key(self) -> str:
        who = f":{self.who}" if self.who else ""
        return tenant_key(self.tenant, f"budget:{self.scope}{who}:{self.period.id}")

    @property
    def subject(self) -> str:
        """The QuotaFailure subject: never the user's or key's id (it may be personal)."""
        return f"budget:{self.tenant}:{self.scope}"

    @property
    def expire_at_ms(self) -> int:
        return int((self.period.end.timestamp() + PERIOD_GRACE_S) * 1000)

    def thresholds(self) -> list[int]:
        """The alert thresholds in pico-dollars."""
        return [to_pico(self.budget.usd * Decimal(repr(share))) for share in self.budget.alerts]

    def alert_key(self, share: float) -> str:
        who = f":{self.who}" if self.who else ""
        return tenant_key(self.tenant, f"alert:{self.scope}{who}:{self.period.id}:{share!r}")

    def admission_args(self) -> list[Any]:
        """What the admission script reads for this budget: limit, cost, expire-at."""
        return [str(self.limit), str(self.cost), self.expire_at_ms]


def budget_checks(tenant: TenantConfig, key_id: str, user: str, cost: int,
                  now: float) -> list[BudgetCheck]:
    """The budgets a request of `tenant` made with the key `key_id` for the end user `user`
    ("" for none) is held to, each reserving `cost` pico-dollars."""
    checks = []
    for scope, who, budget in (("tenant", "", tenant.budget), ("key", key_id, tenant.key_budget),
                               ("user", user, tenant.user_budget)):
        if budget is not None and (scope == "tenant" or who):
            checks.append(BudgetCheck(tenant.name, scope, who, budget,
                                      period_of(budget.period, now), cost))
    return checks


def budget_exceeded(check: BudgetCheck, now: float, request_id: str) -> PromptlineError:
    """BUDGET_EXCEEDED for `check`, retryable after the period's reset; never retryable when the
    request alone costs more than the whole budget."""
    whose = {"tenant": "the tenant's", "key": "this API key's", "user": "the end user's"}
    every = {"day": "daily", "week": "weekly", "month": "monthly"}[check.budget.period]
    name = f"{whose[check.scope]} {every} budget of ${check.budget.usd}"
    if check.cost > check.limit:
        return PromptlineError(
            ErrorCode.BUDGET_EXCEEDED,
            f"the request may cost up to ${from_pico(check.cost)} (prompt + max_tokens), more "
            f"than {name}; lower max_tokens or shorten the prompt",
            stage=Stage.FIRST_PACKET, retryable=False, request_id=request_id,
            quota_subject=check.subject)
    reset = check.period.reset_ms(now)
    return PromptlineError(
        ErrorCode.BUDGET_EXCEEDED,
        f"{name} is used up; it resets at {check.period.end:%Y-%m-%d %H:%M} UTC",
        stage=Stage.FIRST_PACKET, retryable=True, retry_after_ms=reset, request_id=request_id,
        quota_subject=check.subject)


# --- degraded mode ---------------------------------------------------------------------------

SEEN_PRUNE_S = 3600.0


class LocalBudgets:
    """`on_redis_error: local`: each budget's share for this replica, in memory, while Redis is
    unreachable. A share is 1 / `replicas` of what was left when this replica last saw the
    budget in Redis (of the whole budget when it never did)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}
        """Budget key -> (settled + reserved, as the last admission through Redis returned it;
        the end of its period)."""
        self._used: dict[str, int] = {}
        """Budget key -> reserved here since the outage began."""
        self._prune_at = 0.0

    def seen(self, check: BudgetCheck, used: int, now: float) -> None:
        """What Redis said of `check`'s budget at `now`; budgets of ended periods are dropped
        (at most once per `SEEN_PRUNE_S`), so one entry per end user per period does not stay
        for the life of the process."""
        self._seen[check.key] = (used, check.period.end.timestamp())
        if now >= self._prune_at:
            self._prune_at = now + SEEN_PRUNE_S
            self._seen = {key: seen for key, seen in self._seen.items() if seen[1] > now}

    @property
    def remembered(self) -> int:
        """How many budgets' last Redis figures are kept."""
        return len(self._seen)

    def admit(self, checks: Sequence[BudgetCheck], replicas: int) -> BudgetCheck | None:
        """Charge every check, or none and return the first that does not fit."""
        for check in checks:
            left = max(0, check.limit - self._seen.get(check.key, (0, 0.0))[0])
            if self._used.get(check.key, 0) + check.cost > left // replicas:
                return check
        for check in checks:
            self._used[check.key] = self._used.get(check.key, 0) + check.cost
        return None

    def settle(self, checks: Sequence[BudgetCheck], actual: int) -> None:
        """Move each local reservation to the real cost."""
        for check in checks:
            if check.key in self._used:
                self._used[check.key] = max(0, self._used[check.key] + actual - check.cost)

    def clear(self) -> None:
        """Redis is back: the shared counters count again."""
        self._used.clear()


# --- settlement ------------------------------------------------------------------------------

HELD_IN_REDIS = "redis"
HELD_LOCALLY = "local"
NOT_HELD = ""


@dataclass(frozen=True, slots=True)
class Hold:
    """What admission reserved against budgets: the checks, and where (`HELD_IN_REDIS`,
    `HELD_LOCALLY`, or `NOT_HELD` when admitted without the store)."""

    checks: tuple[BudgetCheck, ...] = ()
    where: str = NOT_HELD
    token: str = ""
    """Names this hold in the budget hashes (`HELD_IN_REDIS`), so it is settled exactly once."""


def new_hold_token() -> str:
    """A hold's token: its own, even when a client reuses a request id."""
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True, slots=True)
class _Unsettled:
    """A settlement Redis did not take, kept to be written when it answers again."""

    tenant: str
    hold: Hold
    cost: int
    usage: UsageRecord | None
    request_id: str
    at: float
    """When the stream ended: its usage goes to that hour."""

    @property
    def exactly_once(self) -> bool:
        """A retry of it cannot count twice: its hold's token guards it."""
        return bool(self.hold.token and self.hold.checks and self.hold.where == HELD_IN_REDIS)


BACKLOG_MAX = 10_000
"""Settlements kept while Redis is away; past that the oldest is dropped (and logged)."""


NO_HOLD = Hold()


class Ledger:
    """Settles budgets and writes usage, one script call per stream on the tenant's slot.

    A settlement Redis does not take is kept (up to `BACKLOG_MAX`) and written once Redis
    answers again, when that cannot count it twice: it was never sent (skipped during an
    outage), or its hold's token guards it. Else (a timed-out usage-only write, which may have
    run) it is dropped. Alerts a late write claims go to `notify`."""

    __slots__ = ("_backlog", "_outage", "_replayer", "_script", "clock", "local", "notify",
                 "policy", "redis", "usage_ttl")

    def __init__(self, redis: RedisClient, policy: QuotaPolicy, *, usage_ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.policy = policy
        self.usage_ttl = usage_ttl
        self.clock = clock
        self.local = LocalBudgets()
        self.notify: Callable[[list[Alert]], None] | None = None
        self._script = redis.register_script(_SPEND_LUA)
        self._outage = StoreOutage(
            log, "Redis unavailable (%s): budget and usage settlements are kept and written "
                 "when it is back", "budget and usage settlements are recorded again")
        self._backlog: deque[_Unsettled] = deque()
        self._replayer: asyncio.Task[None] | None = None

    @property
    def unsettled(self) -> int:
        """Settlements waiting for Redis."""
        return len(self._backlog)

    async def settle(self, tenant: str, hold: Hold, cost: int, usage: UsageRecord | None,
                     request_id: str) -> list[Alert]:
        """Release `hold`, charge `cost` (pico-dollars) to its budgets and add `usage` to the
        tenant's hour; the alerts this call claimed. Never raises (the caller has its answer)."""
        if hold.where == HELD_LOCALLY:
            self.local.settle(hold.checks, cost)
        reserved = hold.where == HELD_IN_REDIS
        if usage is None and not (hold.checks and (cost or reserved)):
            return []  # nothing to write
        item = _Unsettled(tenant, hold, cost, usage, request_id, self.clock())
        if self._outage.skipping():
            self._failed(None, item)
            return []
        try:
            alerts = await self._write(item)
        except STORE_ERRORS as exc:
            self._failed(exc, item)
            return []
        self._outage.answered()
        return alerts

    async def close(self) -> None:
        """Stop writing the backlog (at shutdown); what is left in it is logged."""
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        if self._backlog:
            log.warning("%d budget and usage settlements not recorded at shutdown",
                        len(self._backlog))

    async def _write(self, item: _Unsettled) -> list[Alert]:
        hold, cost, usage = item.hold, item.cost, item.usage
        reserved = hold.where == HELD_IN_REDIS
        keys = [c.key for c in hold.checks]
        args: list[Any] = [len(hold.checks), 1 if usage else 0, hold.token if reserved else ""]
        for check in hold.checks:
            thresholds = check.thresholds() if cost else []
            args += [check.cost if reserved else 0, cost, check.expire_at_ms, len(thresholds),
                     *thresholds]
            keys += [check.alert_key(share) for share in check.budget.alerts] if cost else []
        if usage is not None:
            keys.append(usage_key(item.tenant, item.at))
            args += [math.ceil(self.usage_ttl), *(x for pair in usage.fields() for x in pair)]
        async with asyncio.timeout(self.policy.redis_timeout):
            raw = await store_call(self._script(keys=keys, args=[str(a) for a in args]))
        return _claimed(hold.checks, [int(x) for x in raw])

    def _failed(self, exc: BaseException | None, item: _Unsettled) -> None:
        """Count a settlement Redis did not take (`exc`; None: skipped), one warning per
        outage; keep it when writing it later cannot count it twice."""
        self._count_failure(exc, item.request_id)
        if exc is not None and not item.exactly_once:
            return
        if len(self._backlog) >= BACKLOG_MAX:
            dropped = self._backlog.popleft()
            log.warning("settlement backlog full: one dropped",
                        extra={"request_id": dropped.request_id})
        self._backlog.append(item)
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.create_task(self._replay(), name="budget-backlog")

    def _count_failure(self, exc: BaseException | None, request_id: str) -> None:
        REDIS_ERRORS.labels("quota_spend").inc()
        self._outage.failed(exc, request_id)

    async def _replay(self) -> None:
        # Runs while anything is kept: a try every STORE_RETRY_S, oldest first.
        while self._backlog:
            await asyncio.sleep(STORE_RETRY_S)
            while self._backlog and not self._outage.skipping():
                item = self._backlog[0]
                try:
                    alerts = await self._write(item)
                except STORE_ERRORS as exc:
                    self._count_failure(exc, item.request_id)
                    break
                self._backlog.popleft()
                self._outage.answered()
                if alerts and self.notify is not None:
                    self.notify(alerts)

    async def release(self, hold: Hold, request_id: str) -> None:
        """Give back what admission reserved (the other side of admission refused)."""
        if hold.checks:
            await self.settle(hold.checks[0].tenant, hold, 0, None, request_id)


def _claimed(checks: Sequence[BudgetCheck], values: list[int]) -> list[Alert]:
    """The alerts a spend script's reply says it claimed (none when it found the hold settled
    already: an empty reply)."""
    if not values:
        return []
    alerts = []
    at = 0
    for check in checks:
        spent = values[at] * 10**9 + values[at + 1]
        count = values[at + 2]
        for index in values[at + 3: at + 3 + count]:
            alerts.append(Alert(
                tenant=check.tenant, budget=check.scope, who=check.who,
                period=check.budget.period, period_start=check.period.start,
                period_end=check.period.end, threshold=check.budget.alerts[index - 1],
                budget_usd=check.budget.usd, spent_usd=from_pico(spent)))
        at += 3 + count
    return alerts


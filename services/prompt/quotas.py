"""QPM/TPM quotas per tenant and per model, shared by all replicas through Redis.

Admission
    `QuotaManager.admit()` checks and charges every applicable limit of a request - tenant qpm,
    tenant tpm, model qpm, model tpm (limits that are None are skipped). The tenant's limits are
    one Lua script call on the tenant's keys, the model's one on the model's keys, both sent at
    once: within each, either every limit admits the request and its counters move, or none
    moves and the script names the limit that failed and when a retry can succeed. When one
    side admits and the other rejects (or fails), the admitted side is given back within the
    same request, so the request is all-or-nothing. Redis runs a script atomically, so N
    concurrent requests (from any number of replicas) never overshoot a limit; a request the
    other side rejected holds its admitted side's budget for one round trip, so a concurrent
    request may be rejected that would have fit: over-counting by at most one reservation per
    concurrent request, never under-counting.

Tokens: reserve, then reconcile
    TPM reserves `prompt tokens (tiktoken) + max_tokens` at admission, before the provider is
    called. When the stream ends, `Reservation.settle(actual_tokens)` moves the bucket the
    reservation was charged to by `actual - reserved` (clamped at zero), so the budget reflects
    real usage; `Reservation.refund()` (= `settle(0)`) returns the whole reservation when the
    stream failed before producing anything. Both are one atomic script call, idempotent (the
    second call is a no-op) and never raise, so they are safe in `finally`. QPM is not refunded:
    a request that reached admission counts as a request, even if it later failed (this also
    throttles clients that hammer a failing upstream).

Window algorithm: sliding-window counter
    Each limited subject ("tenant:dev:tpm", "model:sim:qpm", ...) keeps two fixed one-minute
    buckets, the current (`c`) and the previous (`p`) minute, in one Redis hash
    `{w: minute index, c, p}`. Usage "over the last 60 s" is estimated as
    `p * (60 - elapsed) / 60 + c`, where `elapsed` is the time since the current minute began:
    the previous minute's count is assumed evenly spread and slides out linearly (the
    Cloudflare / "sliding window counter" approach). It is O(1) per limit, smooths the burst a
    fixed window allows at minute boundaries, and never under-counts a steady rate. When a
    limit rejects, `retry_after_ms` is the exact time at which the estimate (with no other
    traffic or refunds) drops low enough for this request to fit: later in this minute if only
    the previous bucket's share is in the way, else after the current bucket itself becomes
    the sliding-out previous bucket. A request that can never fit (reservation larger than
    the limit itself) is rejected with `retryable=False`.
    Settling a reservation charged to minute m adjusts bucket m while it is still counted (the
    current or previous minute); extra tokens reported later are charged to the current minute
    (that is when they were used); a refund to a bucket that has already slid out is a no-op.

Clock
    By default (`clock=None`) the scripts read the Redis server's `TIME`, so every replica
    shares one clock. A `clock` callable (seconds, like `time.time`) may be injected instead -
    tests use it to move across minutes without sleeping; with client clocks the replicas
    should be NTP-synchronised (skew only shifts the window boundaries by the skew, and a
    bucket written by a replica whose clock is ahead is treated as the current one).

Keys and Redis Cluster
    Every key is `{pl:quota:<scope>:<name>}:<qpm|tpm>` (a hash, expiring two minutes after its
    last write): each tenant's limits share one hash slot, each model's another, so on a
    cluster the quota traffic spreads over the shards with the tenants and models, and every
    script call stays inside one slot. The price is the compensation above (two scripts instead
    of one atomic one); the two run concurrently, so admission still costs one round trip.

Redis slow or down
    Every call is bounded by `QuotaPolicy.redis_timeout`. On a Redis error or timeout, admission
    fails closed (`UNAVAILABLE`, retryable), or with `fail_open` admits the request with a
    WARNING log and a no-op reservation, or with `local` runs the same scripts on this process's
    memory (`local_quotas.py`) against limit / `replicas`, until a Redis call succeeds again
    (one warning when it starts, one when it ends; `promptline_quota_degraded`).
    Settle/usage failures are logged and never raise.
    Each failure increments `promptline_redis_errors_total{operation="quota_<op>"}`. Note:
    a call that timed out on our side may still be executed by Redis later (e.g. after a
    CLIENT PAUSE): that can only over-count, never over-admit, and expires with the window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from promptline.config import ModelConfig, QuotaPolicy, TenantConfig
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.metrics import QUOTA_DEGRADED, QUOTA_DEGRADED_ADMISSIONS, REDIS_ERRORS
from promptline.ratelimit import RateLimitInfo
from promptline.redis_store import STORE_ERRORS, RedisClient, StoreOutage, store_call

from .budgets import (
    BIG_LUA,
    HELD_IN_REDIS,
    HELD_LOCALLY,
    NO_HOLD,
    NOT_HELD,
    BudgetCheck,
    Hold,
    Ledger,
    budget_exceeded,
    new_hold_token,
)
from .local_quotas import LocalWindows

log = logging.getLogger("promptline.quotas")

WINDOW_MS = 60_000
KEY_PREFIX = "{pl:quota:"

# --- Lua -------------------------------------------------------------------------------------

_LUA_PRELUDE = """
local function now_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- State of one limit at window `win`: effective window, current count, previous count, exists.
local function state(key, win)
  local v = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = tonumber(v[1])
  if w == nil then return win, 0, 0, false end
  local c = tonumber(v[2]) or 0
  local p = tonumber(v[3]) or 0
  if w >= win then return w, c, p, true end
  if w == win - 1 then return win, 0, c, true end
  return win, 0, 0, true
end
"""

# KEYS: one hash per limit (nw of them), then one per budget (budgets.py). ARGV: now_ms ('' =
# server TIME), window_ms, nw, then limit_i, cost_i per limit, then limit, cost, expire-at ms per
# budget (pico-dollar integer strings). Returns {0, i, retry_ms} (retry_ms -1: can never fit; 0:
# a budget, whose wait the caller knows) or {1, window, now_ms, estimate_i, current_i,
# previous_i ..., then each budget's settled + reserved as {high, low} limbs} after charging all.
_ADMIT_LUA = _LUA_PRELUDE + BIG_LUA + """
local now = now_ms(ARGV[1])
local W = tonumber(ARGV[2])
local nw = tonumber(ARGV[3])
local win = math.floor(now / W)
local elapsed = now - win * W
-- A budget used up is the answer whatever the limits say: its wait is the longest.
local b = 4 + 2 * nw
for j = nw + 1, #KEYS do
  local v = redis.call('HMGET', KEYS[j], 's', 'r')
  if big_gt(big_add(big_add(big(v[1]), big(v[2])), big(ARGV[b + 1])), big(ARGV[b])) then
    return {0, j, 0}
  end
  b = b + 3
end
local st = {}
local worst_i, worst_ms = 0, -1
for i = 1, nw do
  local limit = tonumber(ARGV[2 + 2 * i])
  local cost = tonumber(ARGV[3 + 2 * i])
  local w, c, p = state(KEYS[i], win)
  -- usage * W, in integers (exact in a double far beyond any sane limit): no rounding surprises
  local scaled = p * (W - elapsed) + c * W
  st[i] = {w, c, p, scaled}
  if cost > limit then
    return {0, i, -1}
  end
  if scaled + cost * W > limit * W then
    local wait
    if c + cost <= limit then
      -- only the previous minute's share is in the way (p > 0 here): wait until it slid out
      wait = math.ceil(W * (p - (limit - c - cost)) / p) - elapsed
    else
      -- wait for this minute to become the previous one, then for enough of it to slide out
      wait = (W - elapsed) + math.ceil(W * (c - (limit - cost)) / c)
    end
    if wait < 1 then wait = 1 end
    if wait > worst_ms then worst_i, worst_ms = i, wait end
  end
end
if worst_i > 0 then return {0, worst_i, worst_ms} end
local out = {1, win, now}
for i = 1, nw do
  local cost = tonumber(ARGV[3 + 2 * i])
  local s = st[i]
  local c = s[2] + cost
  redis.call('HSET', KEYS[i], 'w', s[1], 'c', c, 'p', s[3])
  redis.call('PEXPIRE', KEYS[i], 2 * W)
  out[#out + 1] = math.ceil(s[4] / W) + cost
  out[#out + 1] = c
  out[#out + 1] = s[3]
end
b = 4 + 2 * nw
for j = nw + 1, #KEYS do
  redis.call('HINCRBY', KEYS[j], 'r', ARGV[b + 1])
  redis.call('HSET', KEYS[j], 'q:' .. ARGV[#ARGV], ARGV[b + 1])  -- settled once (_SPEND_LUA)
  redis.call('PEXPIREAT', KEYS[j], ARGV[b + 2])
  local v = redis.call('HMGET', KEYS[j], 's', 'r')
  local used = big_add(big(v[1]), big(v[2]))
  out[#out + 1] = used[1]
  out[#out + 1] = used[2]
  b = b + 3
end
return out
"""

# KEYS: the tpm hashes a reservation charged. ARGV: now_ms|'', window_ms, charged window, delta.
_SETTLE_LUA = _LUA_PRELUDE + """
local now = now_ms(ARGV[1])
local W = tonumber(ARGV[2])
local charged = tonumber(ARGV[3])
local delta = tonumber(ARGV[4])
local win = math.floor(now / W)
for i = 1, #KEYS do
  local w, c, p, exists = state(KEYS[i], win)
  if exists or delta > 0 then
    if charged == w then
      c = math.max(0, c + delta)
    elseif charged == w - 1 then
      p = math.max(0, p + delta)
    elseif delta > 0 then
      c = c + delta
    end
    redis.call('HSET', KEYS[i], 'w', w, 'c', c, 'p', p)
    redis.call('PEXPIRE', KEYS[i], 2 * W)
  end
end
return 1
"""

# KEYS: hashes to read. ARGV: now_ms|'', window_ms. Returns {now_ms, current_i, previous_i ...}.
_USAGE_LUA = _LUA_PRELUDE + """
local now = now_ms(ARGV[1])
local W = tonumber(ARGV[2])
local win = math.floor(now / W)
local out = {now}
for i = 1, #KEYS do
  local _, c, p = state(KEYS[i], win)
  out[#out + 1] = c
  out[#out + 1] = p
end
return out
"""

# --- public types ----------------------------------------------------------------------------


class Reservation:
    """An admitted request's token reservation; settle or refund it exactly once (extra calls
    are no-ops, failures are logged, nothing raises)."""

    __slots__ = ("_charged", "_local", "_manager", "_settled", "degraded", "hold", "limits",
                 "request_id", "reserved_tokens", "window")

    def __init__(self, manager: QuotaManager | None, request_id: str, reserved_tokens: int,
                 window: int | None, charged: tuple[_Charged, ...] = (),
                 limits: RateLimitInfo | None = None, degraded: bool = False,
                 local: bool = False, hold: Hold = NO_HOLD) -> None:
        self._manager = manager
        self._local = local
        """Charged to the in-memory share (degraded mode): settled there too."""
        self.request_id = request_id
        self.reserved_tokens = reserved_tokens
        """Tokens charged to the tpm limits at admission."""
        self.window = window
        """Index of the one-minute bucket the tokens were charged to (None: nothing charged)."""
        self._charged = tuple(c for c in charged if c.tpm_keys)
        self.limits = limits or RateLimitInfo()
        self.degraded = degraded
        """True when admitted without the quota store (fail-open): settle does nothing."""
        self.hold = hold
        """What was reserved against budgets; `Ledger.settle` settles it with the real cost."""
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    async def settle(self, actual_tokens: int) -> None:
        """Reconcile the reservation to the real usage (prompt + completion tokens)."""
        if self._settled:
            return
        self._settled = True  # before any await: a concurrent second call is a no-op too
        if self._manager is None or not self._charged or self.window is None:
            return
        delta = max(0, int(actual_tokens)) - self.reserved_tokens
        if delta == 0:
            return
        manager = self._manager
        if self._local:
            for c in self._charged:
                manager._settle_local(c.tpm_keys, c.window, delta)
            return
        await asyncio.gather(*(manager._settle(c.tpm_keys, c.window, delta, self.request_id)
                               for c in self._charged))

    async def refund(self) -> None:
        """Return the whole token reservation (the stream failed before using any)."""
        await self.settle(0)

    def __repr__(self) -> str:
        return (f"Reservation(request_id={self.request_id!r}, reserved_tokens="
                f"{self.reserved_tokens}, window={self.window}, degraded={self.degraded}, "
                f"settled={self._settled})")


@dataclass(frozen=True, slots=True)
class _Check:
    scope: str  # "tenant" | "model"
    name: str
    kind: str  # "qpm" | "tpm"
    limit: int
    cost: int

    @property
    def subject(self) -> str:
        return f"{self.scope}:{self.name}:{self.kind}"

    @property
    def key(self) -> str:
        return quota_key(self.scope, self.name, self.kind)


_Side = tuple[list["_Check"], tuple[BudgetCheck, ...]]
"""One script call of admission: a slot's limits, and the budgets (on the tenant's slot)."""


@dataclass(frozen=True, slots=True)
class _Charged:
    """What one side (a tenant's or a model's limits, one hash slot) charged at admission."""

    qpm_keys: tuple[str, ...]
    tpm_keys: tuple[str, ...]
    window: int


def quota_key(scope: str, name: str, kind: str) -> str:
    """Redis key of one limit; a tenant's (or a model's) keys share one hash slot."""
    return f"{KEY_PREFIX}{scope}:{name}}}:{kind}"


class QuotaManager:
    """Admits requests against tenant/model QPM and TPM limits stored in Redis.

    `clock`: seconds since the epoch (like `time.time`); None (default) uses the Redis server's
    TIME, one clock for every replica. Budget periods are on this process's clock (`clock`, else
    `time.time`). `usage_ttl`: how long an hour's usage is kept (`usage.retention`).
    """

    __slots__ = ("_local", "_outage", "_scripts", "background", "clock", "ledger", "policy",
                 "redis")

    def __init__(self, redis: RedisClient, policy: QuotaPolicy, *,
                 clock: Callable[[], float] | None = None,
                 usage_ttl: float = 90 * 86400.0) -> None:
        self.redis = redis
        self.policy = policy
        self.clock = clock
        self.ledger = Ledger(redis, policy, usage_ttl=usage_ttl, clock=clock or time.time)
        """Budgets and usage: settles what admission reserved against budgets."""
        self._local = LocalWindows()
        self._outage = StoreOutage(log, "quota store unavailable (%s)",
                                   "quota store reachable again: quotas are shared again")
        """Admissions skip the store for a second after a failure (one warning each way)."""
        self.background: set[asyncio.Task[None]] = set()
        """Give-backs of admissions whose caller went away meanwhile (the server's stop waits)."""
        self._scripts = {
            "admit": redis.register_script(_ADMIT_LUA),
            "settle": redis.register_script(_SETTLE_LUA),
            "usage": redis.register_script(_USAGE_LUA),
        }

    async def admit(self, tenant: TenantConfig, model: ModelConfig, reserve_tokens: int,
                    request_id: str, *, upstream: bool = True,
                    budgets: Sequence[BudgetCheck] = ()) -> Reservation:
        """Charge one request and `reserve_tokens` to every applicable limit, and each budget
        check's cost to its budget (`budgets.budget_checks`), or raise.

        `upstream=False` (a response-cache hit: no provider call) charges the tenant's qpm
        alone: TPM and the model's limits guard the provider.

        Raises PromptlineError QPM_EXCEEDED / TPM_EXCEEDED / BUDGET_EXCEEDED (stage
        first_packet, with retry_after_ms and quota_subject), or UNAVAILABLE when the quota
        store failed and the policy is fail-closed.

        A caller cancelled meanwhile (the client left) does not cut it short: the scripts may
        have run already, so it finishes (within `redis_timeout`) and what it admitted is
        given back, as for a stream that failed before any output.
        """
        work = asyncio.ensure_future(self._admit(tenant, model, reserve_tokens, request_id,
                                                 upstream, budgets))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(self._abandoned)
            raise

    def _abandoned(self, work: asyncio.Future[Reservation]) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        task = asyncio.ensure_future(self._give_back_all(work.result()))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _give_back_all(self, reservation: Reservation) -> None:
        await asyncio.gather(reservation.refund(),
                             self.ledger.release(reservation.hold, reservation.request_id))

    async def _admit(self, tenant: TenantConfig, model: ModelConfig, reserve_tokens: int,
                     request_id: str, upstream: bool, budgets: Sequence[BudgetCheck]
                     ) -> Reservation:
        reserve = max(0, int(reserve_tokens))
        checks = _checks(tenant, model, reserve)
        if not upstream:
            checks = [c for c in checks if c.scope == "tenant" and c.kind == "qpm"]
        if not checks and not budgets:
            return Reservation(None, request_id, 0, None)
        for check in checks:
            if check.cost > check.limit:
                raise _never_fits(check, request_id)
        for budget in budgets:
            if budget.cost > budget.limit:
                raise budget_exceeded(budget, self.ledger.clock(), request_id)
        # One script per slot (the tenant's keys and budgets, the model's keys), both at once.
        sides: list[_Side] = [
            (side, held) for side, held in (([c for c in checks if c.scope == "tenant"],
                                             tuple(budgets)),
                                            ([c for c in checks if c.scope == "model"], ()))
            if side or held]
        if self._outage.skipping():
            return self._without_store(tenant, sides, reserve, request_id, None)
        now = self._now_arg()
        token = new_hold_token()
        calls = [asyncio.ensure_future(self._admit_side(side, now, token)) for side in sides]
        try:
            _, pending = await asyncio.wait(calls, timeout=self.policy.redis_timeout)
        finally:
            for call in calls:
                if not call.done():  # past the timeout, or we are cancelled ourselves
                    call.cancel()
                    call.add_done_callback(_retrieved)
        results = [TimeoutError() if call in pending else _outcome(call) for call in calls]
        admitted = [(side, r) for side, r in zip(sides, results, strict=True)
                    if isinstance(r, list) and r[0] == 1]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        rejection = next(((side, r) for side, r in zip(sides, results, strict=True)
                          if isinstance(r, list) and r[0] != 1), None)
        if failure is None:
            self._store_is_back()
        if failure is not None or rejection is not None:
            await self._give_back(admitted, request_id, token)  # all-or-nothing: both slots
            if rejection is not None:
                (side, held), result = rejection
                if result[1] > len(side):
                    raise budget_exceeded(held[result[1] - len(side) - 1], self.ledger.clock(),
                                          request_id)
                check = side[result[1] - 1]
                if result[2] < 0:
                    raise _never_fits(check, request_id)
                raise _exceeded(check, result[2], request_id)
            assert failure is not None
            if not isinstance(failure, STORE_ERRORS):
                raise failure
            return self._without_store(tenant, sides, reserve, request_id, failure)
        per_check: dict[str, list[int]] = {}
        charged = []
        now_ms = 0
        for (side, held), result in admitted:
            window, now_ms = result[1], result[2]
            per_check.update({c.subject: result[3 + 3 * i: 6 + 3 * i]
                              for i, c in enumerate(side)})
            charged.append(_Charged(tuple(c.key for c in side if c.kind == "qpm"),
                                    tuple(c.key for c in side if c.kind == "tpm"), window))
            at = 3 + 3 * len(side)
            if self.policy.on_redis_error == "local":  # what is left, should Redis go away
                for j, budget in enumerate(held):
                    self.ledger.local.seen(budget, result[at + 2 * j] * 10**9
                                           + result[at + 2 * j + 1], self.ledger.clock())
        tpm = any(c.tpm_keys for c in charged)
        return Reservation(self, request_id, reserve if tpm else 0, charged[0].window,
                           tuple(charged), _limits(tenant, per_check, now_ms),
                           hold=Hold(tuple(budgets), HELD_IN_REDIS, token))

    async def usage(self, tenant: TenantConfig) -> dict[str, Any]:
        """The tenant's current sliding-window usage of each limit that applies.

        `{"qpm": {"limit", "used", "remaining", "reset_s"} | None, "tpm": ... | None}`.
        Raises UNAVAILABLE when the store failed under fail-closed; fail-open returns {}.
        """
        kinds = [k for k in ("qpm", "tpm") if getattr(tenant.quotas, k) is not None]
        out: dict[str, Any] = {"qpm": None, "tpm": None}
        if not kinds:
            return out
        keys = [quota_key("tenant", tenant.name, k) for k in kinds]
        try:
            async with asyncio.timeout(self.policy.redis_timeout):
                raw = await store_call(self._scripts["usage"](
                    keys=keys, args=[self._now_arg(), WINDOW_MS]))
        except STORE_ERRORS as exc:
            _record_store_error("usage", exc, "")
            if self.policy.on_redis_error != "fail_closed":
                return {}
            raise _unavailable("") from None
        values = [int(x) for x in raw]
        now_ms = values[0]
        for i, kind in enumerate(kinds):
            limit = getattr(tenant.quotas, kind)
            current, previous = values[1 + 2 * i], values[2 + 2 * i]
            used = _estimate(current, previous, now_ms)
            out[kind] = {"limit": limit, "used": used, "remaining": max(0, limit - used),
                         "reset_s": _reset_s(current, previous, now_ms)}
        return out

    # --- internals ---------------------------------------------------------------------------

    def _now_arg(self) -> int | str:
        return "" if self.clock is None else int(self.clock() * 1000)

    def _without_store(self, tenant: TenantConfig, sides: list[_Side], reserve: int,
                       request_id: str, exc: BaseException | None) -> Reservation:
        """The policy's answer while the store is down (`exc`: the failure just seen; None when
        the call was skipped). One warning per outage, whatever the policy."""
        if exc is not None:
            _record_store_error("admit", exc, request_id)
        policy = self.policy.on_redis_error
        effect = {"local": f"enforcing limit / {self.policy.replicas} in memory until it is "
                           "back (local)",
                  "fail_open": "admitting without quota check until it is back (fail_open)",
                  }.get(policy, "rejecting requests until it is back (fail_closed)")
        if self._outage.failed(exc, request_id, f"{self._outage.lost}: {effect}") \
                and policy == "local":
            QUOTA_DEGRADED.set(1)
        if self.policy.on_redis_error == "local":
            return self._admit_locally(tenant, sides, reserve, request_id)
        if not self.policy.fail_open:
            raise _unavailable(request_id)
        return Reservation(None, request_id, 0, None, degraded=True,
                           hold=Hold(tuple(b for _, held in sides for b in held), NOT_HELD))

    def _admit_locally(self, tenant: TenantConfig, sides: list[_Side], reserve: int,
                       request_id: str) -> Reservation:
        """Degraded mode: this replica's share of every limit and budget, in memory, one
        window."""
        checks = [c for side, _ in sides for c in side]
        budgets = tuple(b for _, held in sides for b in held)
        over = self.ledger.local.admit(budgets, self.policy.replicas)
        if over is not None:
            raise budget_exceeded(over, self.ledger.clock(), request_id)
        limits = [max(1, math.ceil(c.limit / self.policy.replicas)) for c in checks]
        now = int((self.clock or time.time)() * 1000)
        result = self._local.admit([c.key for c in checks], limits, [c.cost for c in checks],
                                   now, WINDOW_MS)
        if result[0] != 1:
            self.ledger.local.settle(budgets, 0)  # all or nothing
            check = checks[result[1] - 1]
            if result[2] < 0:
                raise _never_fits(check, request_id)
            raise _exceeded(check, result[2], request_id)
        QUOTA_DEGRADED_ADMISSIONS.inc()
        window = result[1]
        charged = (_Charged((), tuple(c.key for c in checks if c.kind == "tpm"), window),)
        per_check = {c.subject: result[3 + 3 * i: 6 + 3 * i] for i, c in enumerate(checks)}
        return Reservation(self, request_id, reserve if charged[0].tpm_keys else 0, window,
                           charged, _limits(tenant, per_check, now), degraded=True, local=True,
                           hold=Hold(budgets, HELD_LOCALLY))

    def _store_is_back(self) -> None:
        if self._outage.answered():
            self._local.clear()  # the shared budget counts again
            self.ledger.local.clear()
            QUOTA_DEGRADED.set(0)

    def _settle_local(self, keys: tuple[str, ...], window: int, delta: int) -> None:
        now = int((self.clock or time.time)() * 1000)
        self._local.settle(keys, now, WINDOW_MS, window, delta)

    async def _admit_side(self, side: _Side, now: int | str, token: str) -> list[int]:
        checks, budgets = side
        args: list[Any] = [now, WINDOW_MS, len(checks)]
        for check in checks:
            args += [check.limit, check.cost]
        for budget in budgets:
            args += budget.admission_args()
        args.append(token)
        raw = await store_call(self._scripts["admit"](
            keys=[c.key for c in checks] + [b.key for b in budgets], args=args))
        return [int(x) for x in raw]

    async def _give_back(self, admitted: list[tuple[_Side, list[int]]],
                         request_id: str, token: str) -> None:
        """Undo what the sides that admitted charged, when the other one did not admit."""
        undo = []
        for (side, held), result in admitted:
            if held:
                undo.append(self.ledger.release(Hold(held, HELD_IN_REDIS, token), request_id))
            window = result[1]
            qpm = [c.key for c in side if c.kind == "qpm"]
            tpm = [c for c in side if c.kind == "tpm"]
            if qpm:
                undo.append(self._settle(tuple(qpm), window, -1, request_id))
            for check in tpm:
                undo.append(self._settle((check.key,), window, -check.cost, request_id))
        await asyncio.gather(*undo)

    async def _settle(self, keys: tuple[str, ...], window: int, delta: int,
                      request_id: str) -> None:
        """Move the bucket `window` of `keys` (one slot) by `delta`; never raises."""
        try:
            async with asyncio.timeout(self.policy.redis_timeout):
                await store_call(self._scripts["settle"](
                    keys=list(keys), args=[self._now_arg(), WINDOW_MS, window, delta]))
        except STORE_ERRORS as exc:
            _record_store_error("settle", exc, request_id)


def _outcome(call: asyncio.Future[list[int]]) -> list[int] | BaseException:
    """A finished admission call's result or error."""
    return call.exception() or call.result()


def _retrieved(call: asyncio.Future[list[int]]) -> None:
    # A call cut short may still end with an error of its own: it was counted as a timeout.
    if not call.cancelled():
        call.exception()


def _checks(tenant: TenantConfig, model: ModelConfig, reserve: int) -> list[_Check]:
    checks = []
    for scope, name, quotas in (("tenant", tenant.name, tenant.quotas),
                                ("model", model.name, model.quotas)):
        if quotas.qpm is not None:
            checks.append(_Check(scope, name, "qpm", quotas.qpm, 1))
        if quotas.tpm is not None:
            checks.append(_Check(scope, name, "tpm", quotas.tpm, reserve))
    return checks


def _estimate(current: int, previous: int, now_ms: int) -> int:
    """Sliding-window usage, rounded up (integer arithmetic, like the scripts)."""
    elapsed = now_ms % WINDOW_MS
    return -(-(previous * (WINDOW_MS - elapsed) + current * WINDOW_MS) // WINDOW_MS)


def _reset_s(current: int, previous: int, now_ms: int) -> float:
    rest = (WINDOW_MS - now_ms % WINDOW_MS) / 1000
    if current > 0:
        return rest + WINDOW_MS / 1000
    return rest if previous > 0 else 0.0


def _limits(tenant: TenantConfig, per_check: dict[str, list[int]], now_ms: int) -> RateLimitInfo:
    fields: dict[str, Any] = {}
    for kind, suffix in (("qpm", "requests"), ("tpm", "tokens")):
        row = per_check.get(f"tenant:{tenant.name}:{kind}")
        if row is None:
            continue
        limit = getattr(tenant.quotas, kind)
        estimate, current, previous = row
        fields[f"limit_{suffix}"] = limit
        fields[f"remaining_{suffix}"] = max(0, limit - estimate)
        fields[f"reset_{suffix}_s"] = _reset_s(current, previous, now_ms)
    return RateLimitInfo(**fields)


def _describe(check: _Check) -> tuple[str, str]:
    what = "request" if check.kind == "qpm" else "token"
    unit = "requests" if check.kind == "qpm" else "tokens"
    return f"{check.scope} {what} quota", f"{check.limit} {unit} per minute"


def _exceeded(check: _Check, retry_ms: int, request_id: str) -> PromptlineError:
    name, rate = _describe(check)
    code = ErrorCode.QPM_EXCEEDED if check.kind == "qpm" else ErrorCode.TPM_EXCEEDED
    return PromptlineError(
        code, f"{name} exceeded ({rate}); retry in {math.ceil(retry_ms / 1000)} s",
        stage=Stage.FIRST_PACKET, retryable=True, retry_after_ms=retry_ms,
        request_id=request_id, quota_subject=check.subject,
    )


def _never_fits(check: _Check, request_id: str) -> PromptlineError:
    name, rate = _describe(check)
    return PromptlineError(
        ErrorCode.TPM_EXCEEDED,
        f"request needs {check.cost} tokens (prompt + max_tokens), more than the {name} "
        f"allows ({rate}); lower max_tokens or shorten the prompt",
        stage=Stage.FIRST_PACKET, retryable=False, request_id=request_id,
        quota_subject=check.subject,
    )


def _unavailable(request_id: str) -> PromptlineError:
    return PromptlineError(ErrorCode.UNAVAILABLE, "quota store unavailable",
                           stage=Stage.FIRST_PACKET, retryable=True, request_id=request_id)


def _record_store_error(operation: str, exc: BaseException, request_id: str) -> None:
    REDIS_ERRORS.labels(f"quota_{operation}").inc()
    if operation != "admit":
        log.warning("quota store unavailable during %s (%s)", operation, type(exc).__name__,
                    extra={"request_id": request_id})

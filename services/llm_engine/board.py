"""What the engine replicas share through Redis about each model's pool: the deployments'
breakers (health.py), their probe leases, and their requests and tokens per minute (limits.py).

Keys carry one hash tag per model, so one script reads or writes a whole pool in every
`redis_mode`:

    {pl:pool|<model>}:health             hash    <deployment>|until, |level, |recovered (ms)
    {pl:pool|<model>}:fails|<deployment> zset    failure times within the window
    {pl:pool|<model>}:probe|<deployment> string  the probe lease (SET NX PX)
    {pl:pool|<model>}:use|<minute>       hash    <deployment>|r, |t: requests, tokens

Round trips: none per token, none for an ordinary request. A pool in use is synced in the
background at most every SYNC_EVERY seconds: one script pushes this replica's counts and reads
every deployment's state and counts. A failure is one script, awaited on the error path (its
answer updates this replica at once). A half-open deployment costs the request that probes it a
SET NX, and the probe's outcome one more call, in the background.

Every call is bounded by `timeout`. While Redis does not answer, each replica runs the breakers
in memory on its own traffic and says so in one log line; the next sync that succeeds says so
too, and Redis' state then replaces what was decided alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from promptline.config import HealthConfig
from promptline.redis_store import STORE_ERRORS, RedisClient, store_call

from .health import Breaker
from .limits import MINUTE, UsageWindow

log = logging.getLogger("promptline.llm_engine.pool")

SYNC_EVERY = 1.0
"""Seconds between two syncs of a pool in use: how stale another replica's news may be."""
PROBE_RETRY = 1.0
"""Seconds before this replica asks again for a probe lease another one holds."""
HEALTH_TTL_MS = 86_400_000
"""A pool's health hash outlives its last change by a day (then every deployment is healthy)."""
USE_TTL_MS = 2 * 60_000
"""A minute's counts are read during the next minute, then expire."""

# KEYS: health, fails, probe. ARGV: deployment, now, window, failures, cooldown, max_cooldown
# (ms, except failures), a unique member, the health hash's ttl. Returns {ejected now 0|1,
# until, level}. Mirrors Breaker.fail.
_FAIL_LUA = """
local d, now = ARGV[1], tonumber(ARGV[2])
local until_ = tonumber(redis.call('HGET', KEYS[1], d .. '|until') or '0')
local level = tonumber(redis.call('HGET', KEYS[1], d .. '|level') or '0')
if until_ > now then return {0, until_, level} end
local eject = until_ > 0
if not eject then
  redis.call('ZADD', KEYS[2], now, ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  eject = redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4])
end
if not eject then return {0, until_, level} end
local recovered = tonumber(redis.call('HGET', KEYS[1], d .. '|recovered') or '0')
if until_ == 0 and now - recovered > tonumber(ARGV[6]) then level = 0 end
level = level + 1
until_ = now + math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ (level - 1))
redis.call('HSET', KEYS[1], d .. '|until', string.format('%.0f', until_), d .. '|level', level)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('DEL', KEYS[2], KEYS[3])
return {1, until_, level}
"""

# KEYS: health, fails, probe. ARGV: deployment, now (ms), lease token. Returns 1 when the
# probe brought the deployment back (0: healthy already, or ejected again meanwhile).
_RECOVER_LUA = """
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
local until_ = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. '|until') or '0')
if until_ == 0 or until_ > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1] .. '|until', 0, ARGV[1] .. '|recovered', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: probe. ARGV: lease token. Gives back an inconclusive probe's lease, if still ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: health, this minute's use, the previous minute's. ARGV: ttl (ms), then triples (key
# index, field, delta) of this replica's counts. Returns the three hashes.
_SYNC_LUA = """
for i = 2, #ARGV, 3 do
  local k = KEYS[tonumber(ARGV[i])]
  redis.call('HINCRBY', k, ARGV[i + 1], ARGV[i + 2])
  redis.call('PEXPIRE', k, ARGV[1])
end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3])}
"""


class Synced(Protocol):
    """What a sync needs of one deployment (pool.DeploymentState)."""

    @property
    def name(self) -> str: ...

    @property
    def breaker(self) -> Breaker: ...

    @property
    def usage(self) -> UsageWindow: ...


def _tag(model: str) -> str:
    return f"{{pl:pool|{model}}}"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class SharedBoard:
    """The engine's one view of the pools' shared state; `client` None: in memory only."""

    def __init__(self, client: RedisClient | None, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._reachable = True
        self._synced_at: dict[str, float] = {}
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scripts: dict[str, Any] = {} if client is None else {
            name: client.register_script(lua) for name, lua in (
                ("fail", _FAIL_LUA), ("recover", _RECOVER_LUA), ("release", _RELEASE_LUA),
                ("sync", _SYNC_LUA))}

    def _shared(self, shared: bool) -> bool:
        """Go through Redis now: a shared pool, and Redis answered its last call."""
        return shared and self._client is not None and self._reachable

    # --- syncs --------------------------------------------------------------------------------

    def sync_soon(self, model: str, states: Sequence[Synced]) -> None:
        """Sync `model`'s pool in the background, SYNC_EVERY after its last sync (at once if
        that is past): a pool in use syncs once a second, and its last counts go out at most
        a second after its last request."""
        if self._client is None or model in self._syncing:
            return
        task = asyncio.create_task(self._sync_when_due(model, states), name=f"pool-sync {model}")
        self._syncing[model] = task
        task.add_done_callback(lambda _: self._syncing.pop(model, None))

    async def _sync_when_due(self, model: str, states: Sequence[Synced]) -> None:
        wait = self._synced_at.get(model, -SYNC_EVERY) + SYNC_EVERY - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.sync(model, states)

    async def sync(self, model: str, states: Sequence[Synced]) -> None:
        """Push this replica's counts of `model`'s pool, read every replica's state back."""
        if self._client is None:
            return
        began = self._synced_at[model] = time.monotonic()  # Redis down too: one try a second
        minute = int(time.time() // MINUTE)
        tag = _tag(model)
        args: list[Any] = [USE_TTL_MS]
        taken = [(state, state.usage.take_pending()) for state in states]
        for state, pending in taken:
            for when, (requests, tokens) in pending.items():
                if when in (minute, minute - 1):  # older counts no longer count anywhere
                    index = 2 if when == minute else 3
                    args += [index, f"{state.name}|r", requests, index, f"{state.name}|t", tokens]
        try:
            reply = await self._call(self._scripts["sync"](
                keys=[f"{tag}:health", f"{tag}:use|{minute}", f"{tag}:use|{minute - 1}"],
                args=args))
        except STORE_ERRORS as exc:
            for state, pending in taken:
                state.usage.give_back(pending)
            self._unreachable(exc)
            return
        health, current, previous = (_pairs(part) for part in reply)
        for state in states:
            name = state.name
            state.usage.synced(minute, (current.get(f"{name}|r", 0), current.get(f"{name}|t", 0)),
                               (previous.get(f"{name}|r", 0), previous.get(f"{name}|t", 0)))
            if state.breaker.changed_at <= began:  # else this replica knows newer
                state.breaker.seen(health.get(f"{name}|until", 0) / 1000,
                                   health.get(f"{name}|level", 0),
                                   health.get(f"{name}|recovered", 0) / 1000)

    # --- breaker events -----------------------------------------------------------------------

    async def failed(self, breaker: Breaker, rules: HealthConfig, *, shared: bool) -> None:
        """A failure of the deployment: counted (in Redis for a shared pool), maybe ejecting it."""
        now = time.time()
        if self._shared(shared):
            tag = _tag(breaker.model)
            try:
                ejected, until, level = await self._call(self._scripts["fail"](
                    keys=[f"{tag}:health", f"{tag}:fails|{breaker.deployment}",
                          f"{tag}:probe|{breaker.deployment}"],
                    args=[breaker.deployment, _ms(now), _ms(rules.window), rules.failures,
                          _ms(rules.cooldown), _ms(rules.max_cooldown), uuid.uuid4().hex,
                          HEALTH_TTL_MS]))
            except STORE_ERRORS as exc:
                self._unreachable(exc)
            else:
                if ejected:
                    breaker.decided(int(until) / 1000, int(level))
                    _log_ejection(breaker, now, shared=True)
                elif int(until):  # ejected already, by another replica
                    breaker.seen(int(until) / 1000, int(level), breaker.recovered_at)
                return
        if breaker.fail(rules, now):
            _log_ejection(breaker, now, shared=False)

    async def take_probe(self, breaker: Breaker, lease: float, *, shared: bool) -> bool:
        """Whether this request may probe the half-open deployment (one probe at a time, over
        every replica of a shared pool)."""
        now = time.time()
        if breaker.probe_until > now:
            return False
        if self._shared(shared) and self._client is not None:
            token = uuid.uuid4().hex
            try:
                won = await self._call(self._client.set(
                    f"{_tag(breaker.model)}:probe|{breaker.deployment}", token, nx=True,
                    px=_ms(lease)))
            except STORE_ERRORS as exc:
                self._unreachable(exc)
            else:
                breaker.probe_until = now + (lease if won else PROBE_RETRY)
                breaker.probe_token = token if won else ""
                return bool(won)
        return breaker.take_probe(now, lease)

    def recovered(self, breaker: Breaker, *, shared: bool) -> None:
        """The probe got its first token: the deployment is back (Redis told in the background,
        not to delay the probe's stream)."""
        now = time.time()
        token = breaker.probe_token
        if breaker.recover(now):
            log.info("deployment recovered: its probe answered",
                     extra={"model": breaker.model, "deployment": breaker.deployment})
        if self._shared(shared) and token:
            tag = _tag(breaker.model)

            async def tell() -> None:
                await self._scripts["recover"](
                    keys=[f"{tag}:health", f"{tag}:fails|{breaker.deployment}",
                          f"{tag}:probe|{breaker.deployment}"],
                    args=[breaker.deployment, _ms(now), token])
                breaker.changed_at = time.monotonic()  # a sync begun before this is older

            self._background(tell)

    def release_probe(self, breaker: Breaker) -> None:
        """A probe that proved nothing (cancelled, or the request's own fault): another
        request may probe at once."""
        token = breaker.probe_token
        breaker.probe_until, breaker.probe_token = 0.0, ""
        if token and self._client is not None:
            self._background(lambda: self._scripts["release"](
                keys=[f"{_tag(breaker.model)}:probe|{breaker.deployment}"], args=[token]))

    # --- plumbing -----------------------------------------------------------------------------

    async def _call(self, call: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self._timeout):
            reply = await store_call(call)
        if not self._reachable:
            self._reachable = True
            log.info("deployment health: Redis answers again; breakers and limits are shared "
                     "by every replica again")
        return reply

    def _unreachable(self, exc: BaseException) -> None:
        if self._reachable:
            self._reachable = False
            log.warning("deployment health: Redis unreachable (%s); each replica runs the "
                        "breakers and limits on its own traffic until it answers",
                        type(exc).__name__)

    def _background(self, call: Callable[[], Awaitable[Any]]) -> None:
        """Run `call()` (one Redis call) in a task of this board, awaited by `close()`."""
        async def run() -> None:
            try:
                await self._call(call())
            except STORE_ERRORS as exc:
                self._unreachable(exc)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let the outcome reports still running finish (each is bounded by the timeout);
        cancel the syncs."""
        syncs = list(self._syncing.values())
        for task in syncs:
            task.cancel()
        await asyncio.gather(*self._tasks, *syncs, return_exceptions=True)


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    """HGETALL's flat reply as {field: integer value}."""
    out: dict[str, int] = {}
    for i in range(0, len(flat) - 1, 2):
        field = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        out[field] = int(float(flat[i + 1]))
    return out


def _log_ejection(breaker: Breaker, now: float, *, shared: bool) -> None:
    log.warning("deployment ejected: too many failures", extra={
        "model": breaker.model, "deployment": breaker.deployment,
        "cooldown_s": round(breaker.until - now, 1), "ejections_in_a_row": breaker.level,
        "shared": shared})

"""Redis killed (SIGKILL) and paused (SIGSTOP: a hung server), under load, then brought back."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import Env, Load, Result, metric_sum, metrics, ms, tally

REDIS_TIMEOUT = 0.25
BOUND = REDIS_TIMEOUT + 1.0  # the contract: redis_timeout (plus one retry at most) and a margin
RECOVERY = 5.0


async def _readyz_redis(http: aiohttp.ClientSession, edge_url: str) -> str:
    async with http.get(f"{edge_url}/readyz") as resp:
        body = await resp.json(content_type=None)
    return str(body.get("redis", "?")) if isinstance(body, dict) else "?"


async def redis_kill(env: Env) -> Result:
    down = env.scale.s(4.0, 1.5)
    result = Result(
        "redis-kill",
        f"Redis SIGKILLed under load (4 callers), down {down:g} s, then started again "
        "(fail_closed)",
        f"every request ends within redis_timeout + 1 s ({BOUND:g} s); callers get 503 "
        f"UNAVAILABLE with the error body; /readyz says redis unreachable; requests succeed "
        f"again within {RECOVERY:g} s of Redis' return")
    config = env.config(quota_policy={"on_redis_error": "fail_closed",
                                      "redis_timeout": f"{int(REDIS_TIMEOUT * 1000)}ms"})
    async with env.deployment(config) as deployment:
        async with Load(env.session, deployment.edge_url) as load:
            await asyncio.sleep(env.scale.s(1.0, 0.3))
            killed = time.monotonic()
            await asyncio.to_thread(env.redis.kill)
            await asyncio.sleep(min(down, 1.5))  # the prompt service probes every second
            readyz = await _readyz_redis(env.session, deployment.edge_url)
            await asyncio.sleep(max(0.0, down - 1.5))
            back = time.monotonic()
            await asyncio.to_thread(env.redis.start)
            recovered = None
            deadline = back + RECOVERY * 2
            while time.monotonic() < deadline:
                if await load.succeeded_after(back):
                    recovered = min(o.started for o in load.outcomes
                                    if o.done and o.started >= back) - back
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
    during = load.started_between(killed, back)
    failed = [o for o in during if not o.done]
    slowest = max((o.seconds for o in during), default=0.0)
    result.observed = {"requests_during": len(during), "outcomes_during": tally(during),
                       "slowest_ms": ms(slowest), "readyz_redis": readyz,
                       "recovered_after_ms": ms(recovered)}
    result.expect(bool(during), "requests were made during the fault")
    result.expect(slowest <= BOUND, f"slowest request {slowest:.2f} s > {BOUND:g} s")
    result.expect(all(o.status == 503 and o.terminal == "UNAVAILABLE" for o in failed),
                  "every failure is 503 UNAVAILABLE")
    result.expect(len(failed) >= len(during) - 4, "requests admitted while Redis was dead")
    result.expect(readyz == "unreachable", f"/readyz said redis {readyz}")
    result.expect(recovered is not None and recovered <= RECOVERY,
                  f"no success within {RECOVERY:g} s of Redis' return")
    return result


async def redis_pause(env: Env) -> Result:
    paused_for = env.scale.s(4.0, 1.5)
    result = Result(
        "redis-pause",
        f"Redis SIGSTOPped under load (4 callers) for {paused_for:g} s, then SIGCONT "
        "(on_redis_error: local)",
        f"every request ends within redis_timeout + 1 s ({BOUND:g} s); callers are served on "
        "the replica's in-memory share (degraded admissions, gauge 1); shared quotas again "
        f"(gauge 0) within {RECOVERY:g} s of SIGCONT")
    config = env.config(quota_policy={"on_redis_error": "local", "replicas": 1,
                                      "redis_timeout": f"{int(REDIS_TIMEOUT * 1000)}ms"})
    async with env.deployment(config) as deployment:
        prompt = deployment.replica("prompt")
        async with Load(env.session, deployment.edge_url) as load:
            await asyncio.sleep(env.scale.s(1.0, 0.3))
            before = metric_sum(await metrics(env.session, prompt),
                                "promptline_quota_degraded_admissions_total")
            paused = time.monotonic()
            env.redis.pause()
            try:
                await asyncio.sleep(paused_for)
                during = await metrics(env.session, prompt)
            finally:
                env.redis.resume()
            resumed = time.monotonic()
            shared_again = None
            while time.monotonic() - resumed < RECOVERY * 2:
                now = await metrics(env.session, prompt)
                if metric_sum(now, "promptline_quota_degraded") == 0:
                    shared_again = time.monotonic() - resumed
                    break
                await asyncio.sleep(0.05)
    in_fault = load.started_between(paused, resumed)
    slowest = max((o.seconds for o in in_fault), default=0.0)
    degraded = metric_sum(during, "promptline_quota_degraded_admissions_total") - before
    result.observed = {"requests_during": len(in_fault), "outcomes_during": tally(in_fault),
                       "slowest_ms": ms(slowest), "degraded_admissions": degraded,
                       "degraded_gauge_during": metric_sum(during, "promptline_quota_degraded"),
                       "shared_again_after_ms": ms(shared_again)}
    result.expect(bool(in_fault), "requests were made during the fault")
    result.expect(slowest <= BOUND, f"slowest request {slowest:.2f} s > {BOUND:g} s")
    result.expect(all(o.done for o in in_fault), "a request failed in degraded mode")
    result.expect(degraded > 0, "no degraded admission counted")
    result.expect(shared_again is not None and shared_again <= RECOVERY,
                  f"still degraded {RECOVERY:g} s after SIGCONT")
    return result


# --- planted faults (tests/test_drills.py): each must fail its drill ----------------------------


@fault("redis-health-blind", "services.prompt")
def _health_blind() -> None:
    """The Redis probe never runs: readiness keeps saying what it said at start."""
    from services.prompt.redis_watch import RedisWatch

    async def never(self: RedisWatch) -> None:
        return None

    RedisWatch._run = never  # type: ignore[method-assign]


@fault("redis-unbounded", "services.prompt")
def _unbounded() -> None:
    """Quota calls wait on a hung Redis for 30 s instead of `redis_timeout`."""
    import dataclasses

    import promptline.redis_store
    from services.prompt import quotas

    promptline.redis_store.SOCKET_TIMEOUT = 30.0
    original = quotas.QuotaManager.__init__

    def patient(self: quotas.QuotaManager, redis: object, policy: object, **kw: object) -> None:
        original(self, redis, dataclasses.replace(policy, redis_timeout=30.0), **kw)  # type: ignore

    quotas.QuotaManager.__init__ = patient  # type: ignore[method-assign]


DRILLS = {"redis-kill": redis_kill, "redis-pause": redis_pause}

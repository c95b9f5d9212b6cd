"""Quota admissions under load while the Redis master is SIGKILLed, on a cluster and on Sentinel:
no admission waits longer than `redis_timeout` (plus a little), callers get typed UNAVAILABLE
meanwhile (fail_closed), and admissions succeed again within ~6 s, without a restart.

Each test starts its own topology: killing a node of the session's shared one would break the
tests after it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.crc import key_slot

from promptline.devtools.redis_topologies import LocalRedisCluster, LocalRedisSentinel
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import connect_redis
from services.prompt.quotas import QuotaManager, quota_key
from tests.conftest import make_config

TIMEOUT = 0.25


async def admissions_through(kill: Any, config: Any) -> dict[str, Any]:
    """Admit in a loop from 8 workers; SIGKILL the master after 0.5 s; figures of the ride."""
    store = connect_redis(config)
    await store.connect()
    manager = QuotaManager(store.client, config.quota_policy)
    tenant, model = config.tenants[0], config.models[0]
    slowest = 0.0
    errors: set[ErrorCode] = set()
    killed_at: float | None = None
    last_error_at = 0.0
    ok_after_kill = 0
    stop = time.monotonic() + 12

    async def worker(n: int) -> None:
        nonlocal slowest, last_error_at, ok_after_kill
        while time.monotonic() < stop and ok_after_kill < 50:
            started = time.monotonic()
            try:
                await manager.admit(tenant, model, 1, f"w{n}")
                if killed_at is not None:
                    ok_after_kill += 1
            except PromptlineError as err:
                errors.add(err.code)
                last_error_at = time.monotonic()
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.01)

    try:
        workers = [asyncio.create_task(worker(n)) for n in range(8)]
        await asyncio.sleep(0.5)
        killed_at = time.monotonic()
        await asyncio.to_thread(kill)
        await asyncio.gather(*workers)
    finally:
        await store.close()
    assert killed_at is not None
    return {"slowest_s": slowest, "recovered_s": max(0.0, last_error_at - killed_at),
            "ok_after_kill": ok_after_kill, "codes": errors}


def policy() -> dict[str, Any]:
    return {"quota_policy": {"on_redis_error": "fail_closed", "redis_timeout": f"{TIMEOUT}s"},
            "tenants": [{"name": "ha", "api_keys": ["ha-key"], "quotas": {"qpm": 100_000}}]}


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_a_master_killed_under_load_is_ridden_out(topology: str) -> None:
    if topology == "cluster":
        with LocalRedisCluster() as redis:
            config = make_config({**policy(), "redis_mode": "cluster", "redis_url": redis.url})
            slot = key_slot(quota_key("tenant", "ha", "qpm").encode())
            figures = await admissions_through(lambda: redis.kill_master(slot), config)
    else:
        with LocalRedisSentinel() as redis:
            config = make_config({**policy(), "redis_mode": "sentinel", "redis_sentinel": {
                "master": redis.master_name, "nodes": redis.sentinels}})
            figures = await admissions_through(redis.kill_master, config)
    assert figures["ok_after_kill"] >= 50, figures  # admissions work again, no restart
    assert figures["recovered_s"] < 6.0, figures
    assert figures["slowest_s"] < TIMEOUT + 0.5, figures  # nothing hangs meanwhile
    assert figures["codes"] <= {ErrorCode.UNAVAILABLE}, figures  # typed, never a raw error

"""`quota_policy.on_redis_error: local`: while Redis is unreachable each replica enforces its share
of every limit in memory; when Redis is back the shared budget counts again. A real redis-server,
stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from promptline.config import ModelConfig, QuotaPolicy, Quotas, TenantConfig
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import STORE_RETRY_S
from services.prompt.quotas import QuotaManager

LOCAL = QuotaPolicy(on_redis_error="local", redis_timeout=0.2, replicas=2)


def gauge() -> float:
    return REGISTRY.get_sample_value("promptline_quota_degraded") or 0


def degraded_admissions() -> float:
    return REGISTRY.get_sample_value("promptline_quota_degraded_admissions_total") or 0


async def test_a_hung_redis_costs_one_timeout_a_second_not_one_per_request() -> None:
    team = TenantConfig(name="hung-team", key_digests=(b"h" * 32,), quotas=Quotas(qpm=100))
    sim = ModelConfig(name="sim", provider="simulated")
    with EmbeddedRedis() as server:
        client = aioredis.from_url(server.url, socket_timeout=5, socket_connect_timeout=5)
        manager = QuotaManager(client, LOCAL)
        try:
            assert not (await manager.admit(team, sim, 1, "up")).degraded
            server.pause()  # SIGSTOP: connections open, nothing answers
            waits = []
            for i in range(10):
                started = time.monotonic()
                assert (await manager.admit(team, sim, 1, f"hung-{i}")).degraded
                waits.append(time.monotonic() - started)
            assert waits[0] >= LOCAL.redis_timeout * 0.9  # the failure is found out once...
            assert max(waits[1:]) < LOCAL.redis_timeout / 2  # ...then skipped, not waited for
            server.resume()
            await asyncio.sleep(STORE_RETRY_S)
            assert not (await manager.admit(team, sim, 1, "back")).degraded
        finally:
            server.resume()
            await client.aclose()


async def test_a_stall_one_call_outlives_is_no_outage() -> None:
    """Redis stalls past one admission's bound but not past the next one's: when that one
    answers, the store is there, and the request after it is admitted, not refused unasked for
    the rest of STORE_RETRY_S (fail_closed)."""
    team = TenantConfig(name="stalled-team", key_digests=(b"s" * 32,), quotas=Quotas(qpm=100))
    sim = ModelConfig(name="sim", provider="simulated")
    closed = QuotaPolicy(on_redis_error="fail_closed", redis_timeout=1.0)
    with EmbeddedRedis() as server:
        client = aioredis.from_url(server.url, socket_timeout=5, socket_connect_timeout=5)
        manager = QuotaManager(client, closed)
        try:
            await manager.admit(team, sim, 1, "warm")
            server.pause()
            first = asyncio.create_task(manager.admit(team, sim, 1, "stalled"))
            await asyncio.sleep(0.5)
            second = asyncio.create_task(manager.admit(team, sim, 1, "outlives"))
            with pytest.raises(PromptlineError) as failed:
                await first
            assert failed.value.code == ErrorCode.UNAVAILABLE
            await asyncio.sleep(0.2)
            server.resume()
            await second
            started = time.monotonic()
            await manager.admit(team, sim, 1, "after")
            assert time.monotonic() - started < STORE_RETRY_S / 2
        finally:
            server.resume()
            await client.aclose()


async def test_each_replica_enforces_its_share_until_redis_is_back(
        caplog: pytest.LogCaptureFixture) -> None:
    team = TenantConfig(name="degraded-team", key_digests=(b"k" * 32,), quotas=Quotas(qpm=10))
    sim = ModelConfig(name="sim", provider="simulated")
    caplog.set_level(logging.WARNING, logger="promptline.quotas")
    server = EmbeddedRedis().start()
    client = aioredis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    manager = QuotaManager(client, LOCAL)
    try:
        for i in range(3):
            assert not (await manager.admit(team, sim, 1, f"up-{i}")).degraded
        assert gauge() == 0
        server.stop()  # Redis is gone
        before = degraded_admissions()
        admitted = 0
        for i in range(8):
            started = time.monotonic()
            try:
                reservation = await manager.admit(team, sim, 1, f"down-{i}")
                assert reservation.degraded
                admitted += 1
            except PromptlineError as err:
                assert err.code is ErrorCode.QPM_EXCEEDED and err.retryable
            assert time.monotonic() - started < 1.0  # bounded by redis_timeout, every time
        assert admitted == 5  # ceil(10 / 2 replicas): this replica's share, in memory
        assert gauge() == 1 and degraded_admissions() == before + 5
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("in memory until it is back" in w for w in warnings) == 1  # one per outage

        server = EmbeddedRedis(port=server.port).start()  # back, empty: the shared budget
        await asyncio.sleep(STORE_RETRY_S)  # the store is tried again a second after a failure
        reservation = await manager.admit(team, sim, 1, "back")
        assert not reservation.degraded and gauge() == 0
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert (await manager.usage(team))["qpm"]["used"] == 1
    finally:
        await client.aclose()
        server.stop()

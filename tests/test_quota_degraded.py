"""`quota_policy.on_redis_error: local`: while Redis is unreachable each replica enforces its share
of every limit in memory; when Redis is back the shared budget counts again. A real redis-server,
stopped and started again on the same port."""

from __future__ import annotations

import logging
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from promptline.config import ModelConfig, QuotaPolicy, Quotas, TenantConfig
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.errors import ErrorCode, PromptlineError
from services.prompt.quotas import QuotaManager

LOCAL = QuotaPolicy(on_redis_error="local", redis_timeout=0.2, replicas=2)


def gauge() -> float:
    return REGISTRY.get_sample_value("promptline_quota_degraded") or 0


def degraded_admissions() -> float:
    return REGISTRY.get_sample_value("promptline_quota_degraded_admissions_total") or 0


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
        reservation = await manager.admit(team, sim, 1, "back")
        assert not reservation.degraded and gauge() == 0
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert (await manager.usage(team))["qpm"]["used"] == 1
    finally:
        await client.aclose()
        server.stop()

"""Quotas against the private real redis-server: admission, reconcile, windows, atomicity,
concurrency across two clients, and Redis down/slow under both policies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.crc import key_slot

from promptline.config import ModelConfig, QuotaPolicy, Quotas, TenantConfig
from promptline.devtools.embedded_redis import EmbeddedRedis, free_port
from promptline.errors import ErrorCode, PromptlineError, Stage
from services.prompt.quotas import (
    QuotaManager,
    RateLimitInfo,
    Reservation,
    quota_key,
)
from tests.conftest import make_config

T0 = 1_700_000_040.0  # a minute boundary: T0 % 60 == 0
# Generous: a loaded CI machine must not turn a slow admit into a spurious UNAVAILABLE.
CLOSED = QuotaPolicy(on_redis_error="fail_closed", redis_timeout=2.0)
OPEN = QuotaPolicy(on_redis_error="fail_open", redis_timeout=0.25)


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def quota_store_errors(operation: str) -> float:
    """`promptline_redis_errors_total` for one quota operation (admit, settle, ...)."""
    return REGISTRY.get_sample_value("promptline_redis_errors_total",
                                     {"operation": f"quota_{operation}"}) or 0


def tenant(name: str = "dev", qpm: int | None = None, tpm: int | None = None) -> TenantConfig:
    return TenantConfig(name=name, key_digests=(), quotas=Quotas(qpm=qpm, tpm=tpm))


def model(name: str = "sim", qpm: int | None = None, tpm: int | None = None) -> ModelConfig:
    return ModelConfig(name=name, provider="simulated", quotas=Quotas(qpm=qpm, tpm=tpm))


async def rejected(manager: QuotaManager, t: TenantConfig, m: ModelConfig,
                   tokens: int) -> PromptlineError:
    with pytest.raises(PromptlineError) as info:
        await manager.admit(t, m, tokens, "req-x")
    return info.value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quotas(redis_client: aioredis.Redis, clock: FakeClock) -> QuotaManager:
    return QuotaManager(redis_client, CLOSED, clock=clock)


@pytest.fixture
async def second_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def down_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        yield client
    finally:
        await client.aclose()


# --- admission -------------------------------------------------------------------------------


async def test_qpm_admits_n_then_rejects_with_retry_after(quotas: QuotaManager,
                                                          clock: FakeClock) -> None:
    t, m = tenant(qpm=3), model()
    clock.now = T0 + 15
    for i in range(3):
        await quotas.admit(t, m, 100, f"req-{i}")
    err = await rejected(quotas, t, m, 100)
    assert err.code == ErrorCode.QPM_EXCEEDED
    assert err.stage == Stage.FIRST_PACKET
    assert err.retryable is True
    assert err.quota_subject == "tenant:dev:qpm"
    assert err.request_id == "req-x"
    assert "tenant request quota exceeded (3 requests per minute)" in err.message
    # 45 s to the end of the minute, then 2/3 of this minute's 3 requests must slide out.
    assert err.retry_after_ms == 45_000 + 20_000
    assert err.message.endswith("retry in 65 s")
    clock.now = T0 + 15 + 64.9
    assert (await rejected(quotas, t, m, 100)).code == ErrorCode.QPM_EXCEEDED
    clock.now = T0 + 15 + 65
    await quotas.admit(t, m, 100, "req-later")


async def test_tpm_rejects_a_reservation_that_would_exceed(quotas: QuotaManager) -> None:
    t, m = tenant(tpm=10_000), model()
    await quotas.admit(t, m, 6_000, "a")
    err = await rejected(quotas, t, m, 5_000)
    assert err.code == ErrorCode.TPM_EXCEEDED
    assert err.quota_subject == "tenant:dev:tpm"
    assert err.retry_after_ms > 0 and err.retryable
    assert "tenant token quota exceeded (10000 tokens per minute)" in err.message
    await quotas.admit(t, m, 4_000, "b")  # exactly fills the limit
    assert (await quotas.usage(t))["tpm"]["used"] == 10_000


async def test_reservation_larger_than_the_limit_is_not_retryable(quotas: QuotaManager) -> None:
    t, m = tenant(tpm=10_000), model(tpm=1_000_000)
    err = await rejected(quotas, t, m, 10_001)
    assert err.code == ErrorCode.TPM_EXCEEDED
    assert err.retryable is False
    assert err.quota_subject == "tenant:dev:tpm"
    assert (await quotas.usage(t))["tpm"]["used"] == 0


async def test_retry_after_when_only_the_previous_minute_is_in_the_way(
        quotas: QuotaManager, clock: FakeClock) -> None:
    t, m = tenant(tpm=10_000), model()
    await quotas.admit(t, m, 8_000, "a")
    clock.now = T0 + 60  # previous minute holds 8000, fully weighted at the boundary
    err = await rejected(quotas, t, m, 4_000)
    assert err.retry_after_ms == 15_000  # 8000 * (1 - 15/60) + 4000 == 10000
    clock.now = T0 + 74.9
    await rejected(quotas, t, m, 4_000)
    clock.now = T0 + 75
    await quotas.admit(t, m, 4_000, "b")


async def test_unlimited_tenant_and_model_admit_without_touching_redis(
        quotas: QuotaManager, redis_client: aioredis.Redis) -> None:
    reservation = await quotas.admit(tenant(), model(), 10**9, "a")
    assert reservation.limits == RateLimitInfo()
    assert reservation.limits.headers() == {}
    await reservation.settle(5)
    assert await redis_client.keys("*") == []
    assert await quotas.usage(tenant()) == {"qpm": None, "tpm": None}


# --- reconcile / refund ----------------------------------------------------------------------


async def test_settle_reduces_usage_to_actual_so_more_requests_fit(quotas: QuotaManager) -> None:
    t, m = tenant(tpm=10_000), model(tpm=50_000)
    reservation = await quotas.admit(t, m, 8_000, "a")
    assert reservation.reserved_tokens == 8_000
    await rejected(quotas, t, m, 5_000)
    await reservation.settle(2_000)
    assert reservation.settled
    assert (await quotas.usage(t))["tpm"]["used"] == 2_000
    await quotas.admit(t, m, 5_000, "b")
    assert (await quotas.usage(t))["tpm"]["used"] == 7_000


async def test_refund_returns_the_whole_reservation(quotas: QuotaManager,
                                                    redis_client: aioredis.Redis) -> None:
    t, m = tenant(qpm=10, tpm=10_000), model(tpm=10_000)
    reservation = await quotas.admit(t, m, 10_000, "a")
    await rejected(quotas, t, m, 1)
    await reservation.refund()
    usage = await quotas.usage(t)
    assert usage["tpm"]["used"] == 0
    assert usage["qpm"]["used"] == 1  # a request that reached admission stays counted
    assert await redis_client.hget("{pl:quota:model:sim}:tpm", "c") == b"0"
    await quotas.admit(t, m, 10_000, "b")


async def test_settle_is_idempotent_and_extra_usage_is_charged(quotas: QuotaManager) -> None:
    t, m = tenant(tpm=100_000), model()
    first = await quotas.admit(t, m, 5_000, "a")
    await first.settle(2_000)
    await first.settle(2_000)
    await first.refund()
    await first.settle(0)
    assert (await quotas.usage(t))["tpm"]["used"] == 2_000
    second = await quotas.admit(t, m, 1_000, "b")
    await asyncio.gather(second.settle(4_000), second.settle(4_000))  # concurrent double call
    assert (await quotas.usage(t))["tpm"]["used"] == 6_000


async def test_refund_never_drives_counters_negative(quotas: QuotaManager,
                                                     redis_client: aioredis.Redis) -> None:
    t, m = tenant(tpm=10_000), model()
    reservation = await quotas.admit(t, m, 3_000, "a")
    await redis_client.hset("{pl:quota:tenant:dev}:tpm", "c", 1_000)  # e.g. an operator reset
    await reservation.refund()
    assert await redis_client.hget("{pl:quota:tenant:dev}:tpm", "c") == b"0"


# --- windows ---------------------------------------------------------------------------------


async def test_window_slides_and_rolls_over(quotas: QuotaManager, clock: FakeClock) -> None:
    t, m = tenant(tpm=10_000), model()
    await quotas.admit(t, m, 10_000, "a")
    await rejected(quotas, t, m, 1)
    clock.now = T0 + 60  # next minute: the previous one still counts fully
    await rejected(quotas, t, m, 1)
    clock.now = T0 + 90  # half of it has slid out
    assert (await quotas.usage(t))["tpm"]["used"] == 5_000
    await quotas.admit(t, m, 5_000, "b")
    await rejected(quotas, t, m, 1)
    clock.now = T0 + 180  # two minutes later: the 5000 of minute 1 slid out completely
    assert (await quotas.usage(t))["tpm"]["used"] == 0
    await quotas.admit(t, m, 10_000, "c")


async def test_settle_adjusts_the_bucket_it_was_charged_to(quotas: QuotaManager,
                                                           clock: FakeClock) -> None:
    t, m = tenant(tpm=10_000), model()
    reservation = await quotas.admit(t, m, 8_000, "a")
    clock.now = T0 + 60  # the reservation is now in the previous bucket
    await quotas.admit(t, m, 1_000, "b")
    await reservation.settle(1_000)
    assert (await quotas.usage(t))["tpm"]["used"] == 2_000  # 1000 (prev, weight 1) + 1000

    late = await quotas.admit(t, m, 1_000, "c")
    clock.now = T0 + 240  # its bucket slid out: extra tokens land in the current minute
    await late.settle(3_000)
    assert (await quotas.usage(t))["tpm"]["used"] == 2_000


async def test_server_time_is_the_default_clock(redis_client: aioredis.Redis) -> None:
    manager = QuotaManager(redis_client, CLOSED)
    reservation = await manager.admit(tenant(tpm=1_000), model(), 10, "a")
    seconds, _ = await redis_client.time()
    assert reservation.window in {seconds // 60, seconds // 60 - 1}
    assert int(await redis_client.hget("{pl:quota:tenant:dev}:tpm", "w")) == reservation.window


# --- tenant + model, atomicity, keys ---------------------------------------------------------


async def test_model_rejection_leaves_tenant_counters_unchanged(
        quotas: QuotaManager, redis_client: aioredis.Redis) -> None:
    shared = model(qpm=3, tpm=5_000)
    alice, bob = tenant("alice", qpm=100, tpm=100_000), tenant("bob", qpm=100, tpm=100_000)
    await quotas.admit(alice, shared, 4_000, "a1")
    err = await rejected(quotas, bob, shared, 2_000)
    assert err.code == ErrorCode.TPM_EXCEEDED
    assert err.quota_subject == "model:sim:tpm"
    assert "alice" not in err.message and "4000" not in err.message
    # bob's side was admitted and given back within the same request: nothing is left counted
    assert await quotas.usage(bob) == {"qpm": {"limit": 100, "used": 0, "remaining": 100,
                                               "reset_s": 0.0},
                                       "tpm": {"limit": 100_000, "used": 0,
                                               "remaining": 100_000, "reset_s": 0.0}}

    await quotas.admit(bob, shared, 500, "b1")
    await quotas.admit(alice, shared, 100, "a2")
    before = await quotas.usage(alice)
    err = await rejected(quotas, alice, shared, 100)
    assert err.code == ErrorCode.QPM_EXCEEDED
    assert err.quota_subject == "model:sim:qpm"
    assert await quotas.usage(alice) == before
    assert before["qpm"]["used"] == 2 and before["tpm"]["used"] == 4_100


async def test_tenant_limit_enforced_below_a_roomy_model_limit(quotas: QuotaManager) -> None:
    t, m = tenant(tpm=1_000), model(qpm=1_000, tpm=1_000_000)
    await quotas.admit(t, m, 1_000, "a")
    err = await rejected(quotas, t, m, 1)
    assert err.quota_subject == "tenant:dev:tpm"


async def test_keys_spread_by_tenant_and_model(quotas: QuotaManager,
                                              redis_client: aioredis.Redis) -> None:
    # On a cluster each tenant's and each model's limits live in a slot of their own, so quota
    # traffic grows with the shards; each script call stays inside one slot.
    await quotas.admit(tenant(qpm=5, tpm=500), model(qpm=5, tpm=500), 10, "a")
    keys = sorted(await redis_client.keys("*"))
    assert keys == [b"{pl:quota:model:sim}:qpm", b"{pl:quota:model:sim}:tpm",
                    b"{pl:quota:tenant:dev}:qpm", b"{pl:quota:tenant:dev}:tpm"]
    assert key_slot(keys[0]) == key_slot(keys[1]) != key_slot(keys[2]) == key_slot(keys[3])
    slots = {key_slot(quota_key("tenant", f"t{i}", "tpm").encode()) for i in range(50)}
    assert len(slots) > 40  # tenants land all over the slot space
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= 120_000


async def test_reservation_reports_tenant_limits_for_headers(quotas: QuotaManager,
                                                             clock: FakeClock) -> None:
    clock.now = T0 + 15
    reservation = await quotas.admit(tenant(qpm=10, tpm=10_000), model(tpm=50), 40, "a")
    limits = reservation.limits
    assert (limits.limit_requests, limits.remaining_requests) == (10, 9)
    assert (limits.limit_tokens, limits.remaining_tokens) == (10_000, 9_960)  # not the model's
    assert limits.reset_tokens_s == pytest.approx(105.0)
    assert limits.headers() == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "105s", "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9960", "x-ratelimit-reset-tokens": "105s",
    }


async def test_works_with_tenants_and_models_from_the_config(quotas: QuotaManager) -> None:
    config = make_config({"tenants": [{"name": "dev", "api_keys": ["dev-key"],
                                       "quotas": {"qpm": 1, "tpm": 100}}]},
                         models=[{"name": "m2", "provider": "simulated",
                                  "quotas": {"tpm": 1000}}])
    t, m = config.tenants[0], config.models[1]
    await quotas.admit(t, m, 100, "a")
    assert (await rejected(quotas, t, m, 1)).quota_subject == "tenant:dev:qpm"


# --- concurrency -----------------------------------------------------------------------------


async def test_100_concurrent_admits_from_two_replicas_never_overshoot(
        redis_client: aioredis.Redis, second_client: aioredis.Redis, clock: FakeClock) -> None:
    replicas = [QuotaManager(redis_client, CLOSED, clock=clock),
                QuotaManager(second_client, CLOSED, clock=clock)]
    t, m = tenant(tpm=10_000), model(qpm=1_000)

    async def one(i: int) -> Reservation | PromptlineError:
        try:
            return await replicas[i % 2].admit(t, m, 1_000, f"req-{i}")
        except PromptlineError as err:
            return err

    results = await asyncio.gather(*(one(i) for i in range(100)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    errors = [r for r in results if isinstance(r, PromptlineError)]
    assert len(admitted) == 10
    assert {e.code for e in errors} == {ErrorCode.TPM_EXCEEDED}
    assert {a.request_id for a in admitted} & {f"req-{i}" for i in range(0, 100, 2)}
    assert {a.request_id for a in admitted} & {f"req-{i}" for i in range(1, 100, 2)}
    usage = await replicas[1].usage(t)
    assert usage["tpm"]["used"] == 10_000
    assert int(await redis_client.hget("{pl:quota:model:sim}:qpm", "c")) == 10

    await asyncio.gather(*(r.settle(500) for r in admitted))
    assert (await replicas[0].usage(t))["tpm"]["used"] == 5_000


# --- Redis down / slow -----------------------------------------------------------------------


async def test_redis_down_fail_closed_raises_unavailable_quickly(
        down_client: aioredis.Redis) -> None:
    from prometheus_client import REGISTRY

    manager = QuotaManager(down_client, CLOSED)
    before = quota_store_errors("admit")
    metric = REGISTRY.get_sample_value("promptline_redis_errors_total",
                                       {"operation": "quota_admit"}) or 0.0
    started = time.monotonic()
    err = await rejected(manager, tenant(qpm=10), model(), 10)
    assert time.monotonic() - started < 1.0
    assert REGISTRY.get_sample_value("promptline_redis_errors_total",
                                     {"operation": "quota_admit"}) == metric + 1
    assert err.code == ErrorCode.UNAVAILABLE
    assert err.message == "quota store unavailable"
    assert err.stage == Stage.FIRST_PACKET and err.retryable
    assert quota_store_errors("admit") == before + 1


async def test_redis_down_fail_open_admits_with_warning_and_metric(
        down_client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    manager = QuotaManager(down_client, OPEN)
    before = quota_store_errors("admit")
    caplog.set_level(logging.WARNING, logger="promptline.quotas")
    started = time.monotonic()
    reservation = await manager.admit(tenant(qpm=10, tpm=100), model(), 10, "req-open")
    assert time.monotonic() - started < 1.0
    assert reservation.degraded
    assert quota_store_errors("admit") == before + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fail_open" in r.getMessage() for r in warnings)
    assert not any("pl:quota" in r.getMessage() for r in warnings)
    settle_errors = quota_store_errors("settle")
    await reservation.settle(50)  # no-op: no Redis call, so no second error
    assert reservation.settled
    assert quota_store_errors("settle") == settle_errors
    assert await manager.usage(tenant(qpm=10)) == {}
    with pytest.raises(PromptlineError):
        await QuotaManager(down_client, CLOSED).usage(tenant(qpm=10))


@pytest.mark.parametrize("fail_open", [False, True])
async def test_slow_redis_is_bounded_and_follows_the_policy(
        redis_client: aioredis.Redis, second_client: aioredis.Redis, fail_open: bool) -> None:
    policy = QuotaPolicy(on_redis_error="fail_open" if fail_open else "fail_closed",
                         redis_timeout=0.1)
    manager = QuotaManager(second_client, policy)
    await second_client.ping()  # connection ready: the pause below delays the script itself
    before = quota_store_errors("admit")
    # Redis 7.0 holds even CLIENT UNPAUSE until the pause ends, so keep the pause short.
    await redis_client.execute_command("CLIENT", "PAUSE", 600, "ALL")
    try:
        started = time.monotonic()
        if fail_open:
            reservation = await manager.admit(tenant(qpm=10), model(), 10, "a")
            assert reservation.degraded
        else:
            err = await rejected(manager, tenant(qpm=10), model(), 10)
            assert err.code == ErrorCode.UNAVAILABLE
        assert time.monotonic() - started < 0.4
        assert quota_store_errors("admit") == before + 1
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")


async def test_settle_on_a_slow_redis_is_bounded_and_never_raises(
        redis_client: aioredis.Redis, second_client: aioredis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    manager = QuotaManager(second_client,
                           QuotaPolicy(on_redis_error="fail_closed", redis_timeout=0.1))
    reservation = await manager.admit(tenant(tpm=1_000), model(), 500, "a")
    before = quota_store_errors("settle")
    caplog.set_level(logging.WARNING, logger="promptline.quotas")
    await redis_client.execute_command("CLIENT", "PAUSE", 600, "ALL")
    try:
        started = time.monotonic()
        await reservation.settle(100)
        assert time.monotonic() - started < 0.4
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    assert quota_store_errors("settle") == before + 1
    assert any("during settle" in r.getMessage() for r in caplog.records)
    assert reservation.settled
    await reservation.settle(100)  # still a no-op afterwards
    assert quota_store_errors("settle") == before + 1

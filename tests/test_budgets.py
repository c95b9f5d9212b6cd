"""Spending budgets against real Redis: periods, the exact boundary under concurrency, the
all-or-nothing admission with the quotas, reconcile and refund, key and user budgets, exactness
past 2^53, degraded modes, credit alerts claimed once, and BUDGET_EXCEEDED on every wire.

Ledgers and managers here are separate replicas on separate clients of one Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client import REGISTRY

from promptline.config import (
    Budget,
    ModelConfig,
    QuotaPolicy,
    Quotas,
    TenantConfig,
    load_config,
)
from promptline.devtools.embedded_redis import EmbeddedRedis, free_port
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_admin_pb2, prompt_admin_pb2_grpc, prompt_pb2
from services.prompt.budgets import (
    SEEN_PRUNE_S,
    BudgetCheck,
    LocalBudgets,
    budget_checks,
    period_of,
)
from services.prompt.pricing import to_pico
from services.prompt.quotas import QuotaManager, Reservation
from services.prompt.usage import UsageRecord, usage_key
from tests.chain import Chain, running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all
from tests.test_redis_modes import Mode, mode  # noqa: F401 - the fixture, for every mode

NOW = datetime(2031, 3, 12, 15, 30, tzinfo=UTC).timestamp()  # a Wednesday; keys expire after it
CLOSED = QuotaPolicy(on_redis_error="fail_closed", redis_timeout=2.0)
SIM = ModelConfig(name="sim", provider="simulated")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def team(name: str, usd: str = "10", *, key_usd: str | None = None, user_usd: str | None = None,
         qpm: int | None = None, alerts: tuple[float, ...] = (0.5, 0.8, 1.0)) -> TenantConfig:
    def budget(usd: str | None) -> Budget | None:
        return None if usd is None else Budget(Decimal(usd), "day", alerts)

    return TenantConfig(name=name, key_digests=(b"k" * 32,), quotas=Quotas(qpm=qpm),
                        budget=budget(usd), key_budget=budget(key_usd),
                        user_budget=budget(user_usd))


def usd(amount: str) -> int:
    return to_pico(Decimal(amount))


async def spend(client: aioredis.Redis, check: BudgetCheck) -> tuple[int, int]:
    """(settled, reserved) of a budget, in pico-dollars."""
    held = await client.hgetall(check.key)
    return int(held.get(b"s", 0)), int(held.get(b"r", 0))


@pytest.fixture
async def replicas(redis_client: aioredis.Redis, redis_server: EmbeddedRedis
                   ) -> AsyncIterator[list[QuotaManager]]:
    """Two prompt-service replicas' quota managers, on clients of their own, one clock."""
    clock = Clock()
    other = aioredis.from_url(redis_server.url)
    try:
        yield [QuotaManager(redis_client, CLOSED, clock=clock),
               QuotaManager(other, CLOSED, clock=clock)]
    finally:
        await other.aclose()


async def admit(manager: QuotaManager, tenant: TenantConfig, cost: int, *, key: str = "key-1",
                user: str = "", model: ModelConfig = SIM) -> Reservation:
    checks = budget_checks(tenant, key, user, cost, manager.ledger.clock())
    return await manager.admit(tenant, model, 10, "req", budgets=checks)


async def settle(manager: QuotaManager, tenant: TenantConfig, reservation: Reservation,
                 cost: int) -> list[Any]:
    return await manager.ledger.settle(
        tenant.name, reservation.hold, cost, UsageRecord("sim", "key-1", "", 1, 1, cost, False),
        "req")


# --- periods ---------------------------------------------------------------------------------


def test_periods_are_utc_calendar_periods() -> None:
    day, week, month = (period_of(kind, NOW) for kind in ("day", "week", "month"))
    assert (day.start, day.end) == (datetime(2031, 3, 12, tzinfo=UTC),
                                    datetime(2031, 3, 13, tzinfo=UTC))
    assert (week.start, week.end) == (datetime(2031, 3, 10, tzinfo=UTC),  # Monday
                                      datetime(2031, 3, 17, tzinfo=UTC))
    assert (month.start, month.end) == (datetime(2031, 3, 1, tzinfo=UTC),
                                        datetime(2031, 4, 1, tzinfo=UTC))
    assert period_of("month", datetime(2024, 12, 31, 23, 59, tzinfo=UTC).timestamp()).end == \
        datetime(2025, 1, 1, tzinfo=UTC)
    assert day.reset_ms(NOW) == 8.5 * 3600 * 1000
    assert (day.id, week.id, month.id) == ("d2031-03-12", "w2031-03-10", "m2031-03-01")


# --- admission and settlement -------------------------------------------------------------------


async def test_exhausted_exactly_at_the_boundary_by_50_concurrent_requests(
        replicas: list[QuotaManager], redis_client: aioredis.Redis) -> None:
    tenant = team("boundary", "0.001")
    cost = usd("0.0001")  # ten of them fit, exactly

    async def one(i: int) -> Reservation | PromptlineError:
        try:
            return await admit(replicas[i % 2], tenant, cost)
        except PromptlineError as err:
            return err

    results = await asyncio.gather(*(one(i) for i in range(50)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, PromptlineError)]
    assert len(admitted) == 10
    assert {(e.code, e.stage, e.retryable) for e in refused} == {
        (ErrorCode.BUDGET_EXCEEDED, Stage.FIRST_PACKET, True)}
    assert {e.retry_after_ms for e in refused} == {8.5 * 3600 * 1000}  # to midnight UTC
    assert {e.quota_subject for e in refused} == {"budget:boundary:tenant"}
    (check,) = admitted[0].hold.checks
    assert await spend(redis_client, check) == (0, 10 * cost)
    # every one costs its whole reservation: the budget is spent to the pico-dollar
    await asyncio.gather(*(settle(replicas[i % 2], tenant, r, cost)
                           for i, r in enumerate(admitted)))
    assert await spend(redis_client, check) == (usd("0.001"), 0)
    with pytest.raises(PromptlineError) as caught:
        await admit(replicas[0], tenant, 1)  # not one pico-dollar more
    assert caught.value.code is ErrorCode.BUDGET_EXCEEDED


async def test_reconcile_gives_back_the_unused_part_and_a_failure_refunds(
        replicas: list[QuotaManager], redis_client: aioredis.Redis) -> None:
    tenant = team("reconcile", "0.001")
    manager = replicas[0]
    first = await admit(manager, tenant, usd("0.0006"))
    with pytest.raises(PromptlineError):
        await admit(manager, tenant, usd("0.0006"))  # the first one's worst case holds it
    await settle(manager, tenant, first, usd("0.0001"))  # it cost less
    second = await admit(manager, tenant, usd("0.0006"))
    (check,) = second.hold.checks
    assert await spend(redis_client, check) == (usd("0.0001"), usd("0.0006"))
    await settle(manager, tenant, second, 0)  # failed before any output: refunded
    assert await spend(redis_client, check) == (usd("0.0001"), 0)


async def test_a_quota_rejection_gives_the_budget_back(replicas: list[QuotaManager],
                                                       redis_client: aioredis.Redis) -> None:
    tenant = team("all-or-nothing", "1")
    model = ModelConfig(name="one-a-minute", provider="simulated", quotas=Quotas(qpm=1))
    first = await admit(replicas[0], tenant, usd("0.1"), model=model)
    with pytest.raises(PromptlineError) as caught:
        await admit(replicas[1], tenant, usd("0.1"), model=model)
    assert caught.value.code is ErrorCode.QPM_EXCEEDED
    (check,) = first.hold.checks
    assert await spend(redis_client, check) == (0, usd("0.1"))  # only the admitted one
    with pytest.raises(PromptlineError) as caught:  # budgets are checked with the quotas
        await admit(replicas[0], team("all-or-nothing", "1", qpm=5), usd("0.95"))
    assert caught.value.code is ErrorCode.BUDGET_EXCEEDED
    assert await redis_client.hget("{pl:quota:tenant:all-or-nothing}:qpm", "c") is None


async def test_a_caller_gone_mid_admission_leaves_nothing_held() -> None:
    """The client leaves while its admission scripts are on their way (Redis stalled): they run
    when Redis is back, and what they charged, budget and tokens, is given back, as for a
    stream that failed before any output, instead of holding the budget to the period's end."""
    tenant = TenantConfig(name="gone", key_digests=(b"k" * 32,), quotas=Quotas(tpm=10_000),
                          budget=Budget(Decimal("1"), "day", ()))
    model = ModelConfig(name="gone-model", provider="simulated", quotas=Quotas(tpm=10_000))
    with EmbeddedRedis() as server:  # our own: this test stalls it
        client = aioredis.from_url(server.url)
        manager = QuotaManager(client, CLOSED, clock=Clock())
        try:
            await admit(manager, team("warm"), usd("0.1"))  # scripts loaded, connections open
            server.pause()
            admitting = asyncio.create_task(admit(manager, tenant, usd("0.5"), model=model))
            await asyncio.sleep(0.2)
            admitting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await admitting
            server.resume()
            (check,) = budget_checks(tenant, "key-1", "", usd("0.5"), NOW)
            tpm = ["{pl:quota:tenant:gone}:tpm", "{pl:quota:model:gone-model}:tpm"]

            async def nothing_held() -> bool:
                charged = [await client.hgetall(key) for key in tpm]
                return (await spend(client, check) == (0, 0)  # reserved, then given back
                        and all(h and int(h[b"c"]) == 0 for h in charged))

            await eventually(nothing_held, within=5, what="the abandoned admission given back")
            assert not manager.background
        finally:
            server.resume()
            await client.aclose()


async def test_key_and_user_budgets_are_kept_apart(replicas: list[QuotaManager]) -> None:
    tenant = team("apart", "1", key_usd="0.5", user_usd="0.2")
    manager = replicas[0]
    await admit(manager, tenant, usd("0.2"), user="alice")
    with pytest.raises(PromptlineError) as caught:
        await admit(manager, tenant, usd("0.1"), user="alice")
    assert caught.value.quota_subject == "budget:apart:user"
    assert "alice" not in caught.value.message and "end user" in caught.value.message
    await admit(manager, tenant, usd("0.2"), user="bob")  # another user's own budget
    with pytest.raises(PromptlineError) as caught:
        await admit(manager, tenant, usd("0.2"), user="carol")  # the key's 0.5 is used up
    assert caught.value.quota_subject == "budget:apart:key"
    await admit(manager, tenant, usd("0.2"), key="key-2", user="carol")
    with pytest.raises(PromptlineError) as caught:
        await admit(manager, tenant, usd("0.5"), key="key-3")
    assert caught.value.quota_subject == "budget:apart:tenant"  # 0.6 of 1 is held


async def test_a_request_dearer_than_the_budget_can_never_fit(
        replicas: list[QuotaManager]) -> None:
    with pytest.raises(PromptlineError) as caught:
        await admit(replicas[0], team("small", "0.01"), usd("0.02"))
    err = caught.value
    assert (err.code, err.retryable, err.retry_after_ms) == (ErrorCode.BUDGET_EXCEEDED, False, 0)
    assert "lower max_tokens" in err.message


async def test_amounts_past_two_to_the_53_stay_exact(replicas: list[QuotaManager],
                                                     redis_client: aioredis.Redis) -> None:
    # $1,000,000 is 10^18 pico-dollars: a double cannot tell 10^18 - 1 from 10^18
    tenant = team("millionaire", "1000000")
    (check,) = budget_checks(tenant, "k", "", 1, NOW)
    await redis_client.hset(check.key, mapping={"s": 10**18 - 2, "r": 0})
    reservation = await admit(replicas[0], tenant, 1)
    with pytest.raises(PromptlineError) as caught:
        await admit(replicas[1], tenant, 2)  # one pico-dollar too many
    assert caught.value.code is ErrorCode.BUDGET_EXCEEDED
    await admit(replicas[1], tenant, 1)
    assert await spend(redis_client, check) == (10**18 - 2, 2)
    await settle(replicas[0], tenant, reservation, 1)
    assert await spend(redis_client, check) == (10**18 - 1, 1)


async def test_a_new_period_starts_at_zero(replicas: list[QuotaManager]) -> None:
    tenant = team("daily", "0.1")
    await admit(replicas[0], tenant, usd("0.1"))
    with pytest.raises(PromptlineError):
        await admit(replicas[0], tenant, usd("0.1"))
    clock = replicas[0].ledger.clock
    assert isinstance(clock, Clock)
    clock.now += 8.5 * 3600  # midnight UTC
    await admit(replicas[0], tenant, usd("0.1"))


# --- alerts ------------------------------------------------------------------------------------


async def test_each_threshold_is_claimed_once_over_all_replicas(
        replicas: list[QuotaManager]) -> None:
    tenant = team("alerted", "1", alerts=(0.25, 0.5, 1.0))
    reservations = [await admit(replicas[i % 2], tenant, usd("0.1")) for i in range(10)]
    claimed = await asyncio.gather(*(settle(replicas[i % 2], tenant, r, usd("0.1"))
                                     for i, r in enumerate(reservations)))
    alerts = [a for batch in claimed for a in batch]
    assert sorted(a.threshold for a in alerts) == [0.25, 0.5, 1.0]
    assert {(a.tenant, a.budget, a.period) for a in alerts} == {("alerted", "tenant", "day")}
    crossing = {a.threshold: a.spent_usd for a in alerts}
    assert crossing[1.0] == Decimal(1)
    assert all(Decimal(str(t)) <= spent < Decimal(str(t)) + Decimal("0.1")
               for t, spent in crossing.items())
    # the same shares of a budget raised mid-period are not told again
    extra = await admit(replicas[0], team("alerted", "2", alerts=(0.25, 0.5, 1.0)), usd("0.1"))
    assert await settle(replicas[0], tenant, extra, usd("0.1")) == []


# --- degraded modes ----------------------------------------------------------------------------


@pytest.fixture
async def down_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_down_follows_the_policy(down_client: aioredis.Redis) -> None:
    tenant = team("outage", "1")
    closed = QuotaManager(down_client, QuotaPolicy(redis_timeout=0.2), clock=Clock())
    with pytest.raises(PromptlineError) as caught:
        await admit(closed, tenant, usd("0.1"))
    assert caught.value.code is ErrorCode.UNAVAILABLE
    opened = QuotaManager(down_client, QuotaPolicy(on_redis_error="fail_open",
                                                   redis_timeout=0.2), clock=Clock())
    for _ in range(20):  # unchecked
        assert (await admit(opened, tenant, usd("0.1"))).degraded
    started = time.monotonic()
    reservation = await admit(opened, tenant, usd("0.1"))
    assert await settle(opened, tenant, reservation, usd("0.1")) == []  # never raises
    assert time.monotonic() - started < 1.0


async def test_local_mode_holds_each_replicas_share_of_what_was_left() -> None:
    tenant = team("local-share", "1")
    policy = QuotaPolicy(on_redis_error="local", redis_timeout=0.2, replicas=2)
    server = EmbeddedRedis().start()
    client = aioredis.from_url(server.url)
    manager = QuotaManager(client, policy, clock=Clock())
    try:
        spent = await admit(manager, tenant, usd("0.4"))  # seen in Redis: 0.6 is left
        await settle(manager, tenant, spent, usd("0.4"))
        server.stop()  # for good
        admitted = 0
        for _ in range(10):
            try:
                assert (await admit(manager, tenant, usd("0.1"))).degraded
                admitted += 1
            except PromptlineError as err:
                assert err.code is ErrorCode.BUDGET_EXCEEDED
        assert admitted == 3  # half of the 0.6 left, for this one of two replicas
    finally:
        await client.aclose()


async def test_a_hold_is_settled_once_however_often_it_is_sent(
        replicas: list[QuotaManager], redis_client: aioredis.Redis) -> None:
    """A settlement sent again (a retry of one that timed out after Redis ran it) moves nothing:
    admission left the hold's token in the budget hash, and settling takes it."""
    tenant = team("once", "1")
    held = await admit(replicas[0], tenant, usd("0.1"))
    for _ in range(2):
        await settle(replicas[0], tenant, held, usd("0.04"))
    (check,) = held.hold.checks
    assert await spend(redis_client, check) == (usd("0.04"), 0)
    usage = await redis_client.hgetall(usage_key("once", NOW))
    assert usage[b"m|sim|n"] == b"1"


async def test_settlements_redis_did_not_take_are_written_when_it_is_back() -> None:
    """Redis stalls as two streams end: one settlement times out (Redis may still run it when
    it wakes), the next is skipped. Both are kept and written once Redis answers, each exactly
    once: the budget holds nothing and counts both costs, the usage both requests, instead of
    the reservations holding the budget until the period ends."""
    tenant = team("late", "1")
    policy = QuotaPolicy(on_redis_error="fail_closed", redis_timeout=0.2)
    with EmbeddedRedis() as server:  # our own: this test stalls it
        client = aioredis.from_url(server.url)
        manager = QuotaManager(client, policy, clock=Clock())
        try:
            first = await admit(manager, tenant, usd("0.1"))
            second = await admit(manager, tenant, usd("0.1"))
            server.pause()
            await settle(manager, tenant, first, usd("0.03"))  # times out
            await settle(manager, tenant, second, usd("0.05"))  # skipped: Redis just failed
            assert manager.ledger.unsettled == 2
            server.resume()
            await eventually(lambda: manager.ledger.unsettled == 0, what="the backlog written")
            (check,) = first.hold.checks
            assert await spend(client, check) == (usd("0.08"), 0)
            usage = await client.hgetall(usage_key("late", NOW))
            assert usage[b"m|sim|n"] == b"2"
        finally:
            server.resume()
            await manager.ledger.close()
            await client.aclose()


def test_local_mode_forgets_the_budgets_of_ended_periods() -> None:
    """One entry per end user per period would otherwise stay for the life of the process."""
    local = LocalBudgets()
    tenant = team("forgets", "1", user_usd="0.1")
    for user in range(100):
        for check in budget_checks(tenant, "k", f"user-{user}", 1, NOW):
            local.seen(check, 10, NOW)
    assert local.remembered == 101  # the tenant's budget and each user's
    tomorrow = NOW + 86400
    (today,) = budget_checks(tenant, "", "", 1, tomorrow)  # no key, no user: the tenant's alone
    local.seen(today, 0, tomorrow + SEEN_PRUNE_S)
    assert local.remembered == 1


async def test_only_local_mode_remembers_what_redis_said(
        replicas: list[QuotaManager]) -> None:
    await admit(replicas[0], team("unremembered", "1", user_usd="0.5"), usd("0.1"), user="u")
    assert replicas[0].ledger.local.remembered == 0  # fail_closed never reads it


# --- through the chain -------------------------------------------------------------------------

METERED = {"name": "metered", "provider": "simulated",
           "simulated": {"ttft_ms": 20, "tokens_per_second": 0, "reply": "tick " * 50},
           "price": {"input_per_mtok": 0, "output_per_mtok": 10}}
"""Every request runs to `max_tokens` (10): it costs exactly its worst case, $0.0001."""
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
async def chain(redis_server: Any) -> AsyncIterator[Chain]:
    tenants = [*BASE_CONFIG["tenants"],
               {"name": "spender", "api_keys": ["spender-key"],
                "budget": {"usd": "0.0007", "period": "day"}},
               {"name": "spender-oai", "api_keys": ["spender-oai-key"],
                "budget": {"usd": "0.0001", "period": "week"}},
               {"name": "spender-grpc", "api_keys": ["spender-grpc-key"],
                "user_budget": {"usd": "0.0001", "period": "month"}}]
    # 2 s as in CLOSED: the fifty-request burst must not read a stall of this box as an outage.
    config = make_config({"tenants": tenants, "quota_policy": {"redis_timeout": "2s"}},
                         redis_url=redis_server.url, models=[METERED])
    async with running_chain(config) as running:
        yield running


def seconds_to(kind: str) -> float:
    return period_of(kind, time.time()).end.timestamp() - time.time()


def alerted(tenant: str, threshold: str) -> float:
    return REGISTRY.get_sample_value("promptline_budget_alerts_total", {
        "tenant": tenant, "budget": "tenant", "threshold": threshold}) or 0


async def test_fifty_concurrent_http_requests_spend_the_budget_exactly(
        chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="promptline.alerts")
    async with aiohttp.ClientSession() as http:
        async def one() -> tuple[int, dict[str, str], str]:
            async with http.post(f"{chain.base_url}/v1/chat/stream",
                                 headers={"Authorization": "Bearer spender-key"},
                                 json={"model": "metered", "messages": HI,
                                       "max_tokens": 10}) as resp:
                return resp.status, dict(resp.headers), await resp.text()

        results = await asyncio.gather(*(one() for _ in range(50)))
    served = [body for status, _, body in results if status == 200]
    refused = [(headers, json.loads(body)["error"]) for status, headers, body in results
               if status != 200]
    assert len(served) == 7
    costs = [Decimal(json.loads(body.split("event: done\ndata: ")[1])["usage"]["cost_usd"])
             for body in served]
    assert sum(costs) == Decimal("0.0007")  # the whole budget, not a pico-dollar over
    for headers, error in refused:
        assert error["code"] == "BUDGET_EXCEEDED" and error["stage"] == "first_packet"
        assert error["retryable"] is True
        assert abs(int(headers["Retry-After"]) - seconds_to("day")) < 5
    # each alert once: a log line and a count
    await eventually(lambda: alerted("spender", "1") == 1, what="the spent budget's alert")
    assert [alerted("spender", t) for t in ("0.5", "0.8", "1")] == [1, 1, 1]
    logged = [r for r in caplog.records if r.name == "promptline.alerts"]
    assert sorted(getattr(r, "threshold", 0) for r in logged) == [0.5, 0.8, 1.0]
    assert {getattr(r, "spent_usd", "") for r in logged} <= {"0.0004", "0.0006", "0.0007"}


async def test_openai_clients_see_insufficient_quota(chain: Chain) -> None:
    client = openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key="spender-oai-key",
                                max_retries=0)
    done = await client.chat.completions.create(model="metered", messages=HI, max_tokens=10)
    assert done.usage is not None and Decimal(done.usage.model_dump()["cost_usd"]) == Decimal(
        "0.0001")
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="metered", messages=HI, max_tokens=10)
    assert caught.value.status_code == 429
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "insufficient_quota"
    assert abs(int(caught.value.response.headers["Retry-After"]) - seconds_to("week")) < 5


async def test_grpc_callers_get_resource_exhausted_with_quota_failure(chain: Chain) -> None:
    def chat(user: str) -> prompt_pb2.StreamChatRequest:
        return prompt_pb2.StreamChatRequest(model="metered", max_tokens=10, user=user, messages=[
            common_pb2.ChatMessage(role="user", content="Hi")])

    key = (("authorization", "Bearer spender-grpc-key"),)
    assert (await read_all(chain.prompt_stub.StreamChat(chat("ann"), metadata=key,
                                                        timeout=10)))[-1].HasField("done")
    call = chain.prompt_stub.StreamChat(chat("ann"), metadata=key, timeout=10)
    frames = await read_all(call)
    assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.quota_subject) == (ErrorCode.BUDGET_EXCEEDED, "budget:spender-grpc:user")
    rebuilt = PromptlineError.from_rpc_error(grpc.aio.AioRpcError(
        await call.code(), await call.initial_metadata(), await call.trailing_metadata(),
        await call.details()))
    assert rebuilt.quota_subject == "budget:spender-grpc:user" and rebuilt.retry_after_ms > 0
    # another end user has a budget of their own
    assert (await read_all(chain.prompt_stub.StreamChat(chat("ben"), metadata=key,
                                                        timeout=10)))[-1].HasField("done")


async def test_a_budget_change_applies_to_new_streams_on_reload(redis_server: Any,
                                                                tmp_path: Path) -> None:
    raw = {**BASE_CONFIG, "redis_url": redis_server.url, "models": [METERED],
           "tenants": [{"name": "reloaded", "api_keys": ["reloaded-key"],
                        "budget": {"usd": "0.0001", "period": "day"}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    request = prompt_pb2.StreamChatRequest(model="metered", max_tokens=10, messages=[
        common_pb2.ChatMessage(role="user", content="Hi")])
    key = (("authorization", "Bearer reloaded-key"),)
    async with running_chain(load_config(path, env={}), with_edge=False) as chain:
        assert (await read_all(chain.prompt_stub.StreamChat(request, metadata=key,
                                                            timeout=10)))[-1].HasField("done")
        frames = await read_all(chain.prompt_stub.StreamChat(request, metadata=key, timeout=10))
        assert frames[-1].error.code == common_pb2.ERROR_CODE_BUDGET_EXCEEDED
        raw["tenants"][0]["budget"]["usd"] = "0.0002"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert chain.prompt.live.reload()
        assert (await read_all(chain.prompt_stub.StreamChat(request, metadata=key,
                                                            timeout=10)))[-1].HasField("done")


async def test_budgets_usage_and_alerts_in_every_redis_mode(mode: Mode) -> None:  # noqa: F811
    name = f"modes-{mode.name}-{uuid.uuid4().hex[:8]}"  # the shared topologies are not flushed
    config = make_config({**mode.overrides, "tenants": [
        {"name": name, "api_keys": [f"{name}-key"],
         "budget": {"usd": "0.0003", "period": "month"},
         "user_budget": {"usd": "0.0001", "period": "day"}}]}, models=[METERED])
    key = (("authorization", f"Bearer {name}-key"),)

    def chat(user: str) -> prompt_pb2.StreamChatRequest:
        return prompt_pb2.StreamChatRequest(model="metered", max_tokens=10, user=user, messages=[
            common_pb2.ChatMessage(role="user", content="Hi")])

    async with running_chain(config, with_edge=False) as chain:
        ends = [(await read_all(chain.prompt_stub.StreamChat(chat(user), metadata=key,
                                                             timeout=10)))[-1]
                for user in ("u1", "u1", "u2", "u3", "u4")]
        codes = [e.error.code if e.HasField("error") else 0 for e in ends]
        assert codes == [0, common_pb2.ERROR_CODE_BUDGET_EXCEEDED, 0, 0,
                         common_pb2.ERROR_CODE_BUDGET_EXCEEDED]
        assert [e.error.quota_subject for e in ends if e.HasField("error")] == [
            f"budget:{name}:user", f"budget:{name}:tenant"]
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)

        async def used() -> prompt_admin_pb2.UsageReport:
            return await admin.GetUsage(prompt_admin_pb2.GetUsageRequest(group_by="user"),
                                        metadata=key, timeout=10)

        await eventually(lambda: alerted(name, "1") == 1, what="the spent budget's alert")
        report = await used()
    assert [(r.key, r.requests, r.cost_usd) for r in report.rows] == [
        ("u1", 1, "0.0001"), ("u2", 1, "0.0001"), ("u3", 1, "0.0001")]
    assert report.total.cost_usd == "0.0003"
    assert [alerted(name, t) for t in ("0.5", "0.8", "1")] == [1, 1, 1]

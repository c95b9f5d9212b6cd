"""Prices and costs, the usage API and its CLI, through the real chain (docs/costs.md).

Each test uses tenants of its own: usage is kept per tenant in the session's Redis.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from decimal import Decimal
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from prometheus_client import REGISTRY

from promptline import cli
from promptline.config import ConfigError, Price
from promptline.errors import ErrorCode, PromptlineError
from promptline.v1 import common_pb2, prompt_admin_pb2, prompt_admin_pb2_grpc, prompt_pb2
from services.llm_engine.providers.openai_compat import _cached_tokens
from services.prompt.pricing import cost_of, from_pico, to_pico, usd_text, worst_case
from tests.chain import Chain, chain_fixture
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

REPLY = "one two three four five six seven eight nine ten"
PRICE = {"input_per_mtok": "0.15", "output_per_mtok": 0.6}
FAST = {"ttft_ms": 0, "tokens_per_second": 0, "reply": REPLY}
TENANTS = [
    *BASE_CONFIG["tenants"],
    *({"name": f"cost-{n}", "api_keys": [f"cost-{n}-key"]} for n in "abcdefgh"),
    {"name": "cost-admin", "api_keys": ["cost-admin-key"], "admin": True},
]
MODELS = [
    {"name": "priced", "provider": "simulated", "simulated": FAST, "price": PRICE},
    {"name": "priced-fail3", "provider": "simulated", "price": PRICE,
     "simulated": {**FAST, "fail_after_tokens": 3}},
    {"name": "priced-stall", "provider": "simulated", "price": PRICE,
     "simulated": {**FAST, "stall_after_tokens": 0},
     "timeouts": {"first_token": "200ms", "idle": "5s", "total": "10s"}},
    # refuses every request: the engine falls back to the dearer model, whose price applies
    {"name": "cheap-broken", "provider": "simulated", "price": PRICE,
     "simulated": {**FAST, "fail_after_tokens": 0}, "fallback": ["dear"]},
    {"name": "dear", "provider": "simulated", "simulated": FAST,
     "price": {"input_per_mtok": 5, "output_per_mtok": 15}},
    {"name": "free", "provider": "simulated", "simulated": FAST},
]
HI = [{"role": "user", "content": "Hi"}]


chain = chain_fixture({"tenants": TENANTS}, MODELS)



def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant}-key"}


async def stream(http: aiohttp.ClientSession, chain: Chain, tenant: str, model: str = "priced",
                 **body: Any) -> list[tuple[str, Any]]:
    """The (event, data) pairs of one native SSE stream."""
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=auth(tenant),
                         json={"model": model, "messages": HI, **body}) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def usage(http: aiohttp.ClientSession, chain: Chain, tenant: str, query: str = ""
                ) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{chain.base_url}/v1/usage{query}", headers=auth(tenant)) as resp:
        return resp.status, await resp.json()


async def settled(http: aiohttp.ClientSession, chain: Chain, tenant: str, requests: int
                  ) -> dict[str, Any]:
    """The tenant's usage once `requests` streams were settled (settlement follows `done`)."""
    report: dict[str, Any] = {}

    async def counted() -> bool:
        nonlocal report
        _, report = await usage(http, chain, tenant)
        return bool(report["total"]["requests"] == requests)

    try:
        await eventually(counted, what=f"{requests} settled requests")
    except AssertionError:
        raise AssertionError(f"{requests} settled requests, last seen: {report}") from None
    return report


# --- the arithmetic -------------------------------------------------------------------------------


def test_costs_are_exact_decimals() -> None:
    price = Price(Decimal("0.15"), Decimal("0.6"), Decimal("0.01875"))
    usage = common_pb2.Usage(prompt_tokens=1000, completion_tokens=333, cached_prompt_tokens=400)
    # 600 fresh x 0.15 + 400 cached x 0.01875 + 333 x 0.6, per million
    assert cost_of(price, usage) == Decimal("0.0002973")
    assert cost_of(price, common_pb2.Usage(prompt_tokens=1)) == Decimal("0.00000015")
    assert to_pico(Decimal("0.00000015")) == 150_000  # one token: whole pico-dollars
    assert from_pico(to_pico(Decimal("0.0002973"))) == Decimal("0.0002973")
    # a cache hit at a fraction, rounded half-up to the pico-dollar
    one = common_pb2.Usage(prompt_tokens=1)
    assert cost_of(price, one, cached=True, fraction=Decimal("0.1")) == Decimal("1.5E-8")
    assert cost_of(price, one, cached=True, fraction=1 / 3) == Decimal("5E-8")
    assert cost_of(price, one, cached=True) == 0
    # without a cached price, cached tokens cost the input price
    assert cost_of(Price(Decimal(1), Decimal(2)), usage) == Decimal("0.001666")
    assert worst_case(price, 100, 50) == Decimal("0.000045")
    assert usd_text(Decimal("1.50000E-7")) == "0.00000015"
    assert usd_text(Decimal("100")) == "100" and usd_text(Decimal(0)) == "0"


def test_openai_cached_tokens_are_read() -> None:
    assert _cached_tokens({"prompt_tokens_details": {"cached_tokens": 1920}}) == 1920
    for odd in ({}, {"prompt_tokens_details": None}, {"prompt_tokens_details": {
            "cached_tokens": "12"}}, {"prompt_tokens_details": {"cached_tokens": True}}):
        assert _cached_tokens(odd) == 0


@pytest.mark.parametrize(("price", "error"), [
    ({"input_per_mtok": -1}, "models[1].price.input_per_mtok: must be at least 0"),
    ({"output_per_mtok": "cheap"}, "models[1].price.output_per_mtok: must be an amount of US "
                                   "dollars"),
    ({"output_per_mtok": [1]}, "models[1].price.output_per_mtok: must be an amount"),
    ({"input_per_mtok": "NaN"}, "models[1].price.input_per_mtok: must be a finite amount"),
    ({"input_per_mtok": 150000}, "models[1].price.input_per_mtok: must be at most 10,000"),
    ({"cached_input_per_mtok": "0.0000001"}, "models[1].price.cached_input_per_mtok: at most 6 "
                                             "decimal places"),
    ({"input_per_mtok": True}, "models[1].price.input_per_mtok: must be an amount"),
    ({"per_token": 1}, "models[1].price.per_token: unknown key"),
])
def test_bad_prices_are_config_errors(price: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(models=[{"name": "m", "provider": "simulated", "price": price}])
    assert str(caught.value).startswith(error), caught.value


@pytest.mark.parametrize(("budget", "error"), [
    ({"usd": -5}, "tenants[0].budget.usd: must be greater than 0"),
    ({"usd": 0}, "tenants[0].budget.usd: must be greater than 0"),
    ({"usd": "lots"}, "tenants[0].budget.usd: must be an amount of US dollars"),
    ({"usd": 5e6}, "tenants[0].budget.usd: must be at most 1,000,000"),
    ({}, "tenants[0].budget.usd: required"),
    ({"usd": 5, "period": "year"}, "tenants[0].budget.period: must be one of"),
    ({"usd": 5, "alerts": [0.8, 0.5]}, "tenants[0].budget.alerts[1]: must be greater than the "
                                       "one before"),
    ({"usd": 5, "alerts": [0]}, "tenants[0].budget.alerts[0]: must be greater than 0"),
    ({"usd": 5, "alerts": [2]}, "tenants[0].budget.alerts[0]: must be at most 1"),
    ({"usd": 5, "alerts": ["half"]}, "tenants[0].budget.alerts[0]: must be a number"),
])
def test_bad_budgets_are_config_errors(budget: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"tenants": [{"name": "t", "api_keys": ["t-key"], "budget": budget}]})
    assert str(caught.value).startswith(error), caught.value


def test_a_webhook_needs_a_secret() -> None:
    with pytest.raises(ConfigError, match=r"^alerts\.webhook_secret_env: required"):
        make_config({"alerts": {"webhook_url": "https://hooks.example/x"}})
    config = make_config({"alerts": {"webhook_url": "https://hooks.example/x",
                                     "webhook_secret_env": "HOOK_SECRET"}})
    assert config.alerts.webhook_secret is None  # read from the environment at load
    assert "hooks.example" not in repr(config.alerts)  # a URL may hold a token


# --- costs on every wire --------------------------------------------------------------------------


async def test_done_frames_carry_the_cost_and_usage_totals_are_their_sum(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    costs: list[Decimal] = []
    tokens = [0, 0]

    def add(usage: dict[str, Any]) -> None:
        costs.append(Decimal(usage["cost_usd"]))
        tokens[0] += usage["prompt_tokens"]
        tokens[1] += usage["completion_tokens"]

    for max_tokens in (3, 7, 1024):
        events = await stream(http, chain, "cost-a", max_tokens=max_tokens)
        kind, done = events[-1]
        assert kind == "done"
        u = done["usage"]
        assert Decimal(u["cost_usd"]) == (u["prompt_tokens"] * Decimal("0.15") + u[
            "completion_tokens"] * Decimal("0.6")) / 1_000_000
        add(u)
    client = openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key="cost-a-key",
                                max_retries=0)
    completion = await client.chat.completions.create(model="priced", messages=HI, user="ann")
    add(completion.usage.model_dump())
    chunks = [c async for c in await client.chat.completions.create(
        model="priced", messages=HI, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].usage is not None
    add(chunks[-1].usage.model_dump())
    frames = await read_all(chain.prompt_stub.StreamChat(prompt_pb2.StreamChatRequest(
        model="priced", messages=[common_pb2.ChatMessage(role="user", content="Hi")]),
        metadata=(("authorization", "Bearer cost-a-key"),), timeout=10))
    add({"cost_usd": frames[-1].done.usage.cost_usd,
         "prompt_tokens": frames[-1].done.usage.prompt_tokens,
         "completion_tokens": frames[-1].done.usage.completion_tokens})
    report = await settled(http, chain, "cost-a", len(costs))
    assert report["total"] == {"requests": 6, "errors": 0, "prompt_tokens": tokens[0],
                               "completion_tokens": tokens[1], "cost_usd": str(sum(costs))}
    assert [(r["key"], r["cost_usd"]) for r in report["data"]] == [("priced", str(sum(costs)))]
    assert REGISTRY.get_sample_value("promptline_cost_usd_total", {
        "tenant": "cost-a", "model": "priced"}) == pytest.approx(float(sum(costs)))


async def test_a_model_without_a_price_costs_nothing(chain: Chain,
                                                     http: aiohttp.ClientSession) -> None:
    _, done = (await stream(http, chain, "cost-f", model="free"))[-1]
    assert done["usage"]["cost_usd"] == "0"
    report = await settled(http, chain, "cost-f", 1)
    assert report["total"]["cost_usd"] == "0" and report["total"]["requests"] == 1


async def test_failures_count_as_errors_and_pay_what_was_generated(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=auth("cost-b"),
                         json={"model": "priced-fail3", "messages": HI}) as resp:
        body = await resp.text()
    assert "event: error" in body and "UPSTREAM_ERROR" in body
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=auth("cost-b"),
                         json={"model": "priced-stall", "messages": HI}) as resp:
        assert resp.status == 504  # before the first token: refunded, costs nothing
    report = await settled(http, chain, "cost-b", 2)
    rows = {r["key"]: r for r in report["data"]}
    failed = rows["priced-fail3"]
    assert (failed["errors"], failed["completion_tokens"]) == (1, 3)
    assert Decimal(failed["cost_usd"]) == (failed["prompt_tokens"] * Decimal("0.15")
                                           + 3 * Decimal("0.6")) / 1_000_000
    assert rows["priced-stall"] == {"key": "priced-stall", "requests": 1, "errors": 1,
                                    "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": "0"}


async def test_a_fallback_is_priced_at_its_own_price(chain: Chain,
                                                     http: aiohttp.ClientSession) -> None:
    _, done = (await stream(http, chain, "cost-c", model="cheap-broken"))[-1]
    assert done["model"] == "dear"
    u = done["usage"]
    assert Decimal(u["cost_usd"]) == (u["prompt_tokens"] * 5 + u["completion_tokens"] * 15
                                      ) / Decimal(1_000_000)
    report = await settled(http, chain, "cost-c", 1)
    assert [r["key"] for r in report["data"]] == ["dear"]  # usage by the model that answered


# --- the usage API --------------------------------------------------------------------------------


async def test_usage_by_user_key_and_day(chain: Chain, http: aiohttp.ClientSession) -> None:
    await stream(http, chain, "cost-d", user="alice@example.com")
    await stream(http, chain, "cost-d", user="alice@example.com")
    await stream(http, chain, "cost-d", user="bob")
    await stream(http, chain, "cost-d")
    total = (await settled(http, chain, "cost-d", 4))["total"]
    _, by_user = await usage(http, chain, "cost-d", "?group_by=user")
    assert [(r["key"], r["requests"]) for r in by_user["data"]] == [
        (None, 1), ("alice@example.com", 2), ("bob", 1)]
    _, by_key = await usage(http, chain, "cost-d", "?group_by=api_key")
    (row,) = by_key["data"]
    assert row["key"].startswith("key-") and len(row["key"]) == 16 and "cost-d" not in row["key"]
    _, by_day = await usage(http, chain, "cost-d", "?group_by=day")
    assert [r["key"] for r in by_day["data"]] == [by_day["from"][:10]]
    for report in (by_user, by_key, by_day):
        assert report["total"] == total
    # a range without traffic
    _, old = await usage(http, chain, "cost-d", "?from=2020-01-01&to=2020-01-02T00:00:00Z")
    assert (old["from"], old["to"], old["data"]) == ("2020-01-01T00:00:00Z",
                                                     "2020-01-02T00:00:00Z", [])
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=auth("cost-d"), json={
            "model": "priced", "messages": HI, "user": "no spaces please"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith("user must be 1-128")


async def test_one_tenant_never_sees_anothers_usage(chain: Chain,
                                                    http: aiohttp.ClientSession) -> None:
    await stream(http, chain, "cost-e")
    await settled(http, chain, "cost-e", 1)
    _, own = await usage(http, chain, "cost-f")  # another tenant: its own traffic only
    assert own["tenant"] == "cost-f" and "priced" not in [r["key"] for r in own["data"]]
    status, body = await usage(http, chain, "cost-f", "?tenant=cost-e")
    assert status == 403 and body["error"]["code"] == "PERMISSION_DENIED"
    assert "tenant" in body["error"]["message"]
    status, body = await usage(http, chain, "cost-e", "?tenant=cost-e")  # even its own name
    assert status == 403
    status, body = await usage(http, chain, "cost-admin", "?tenant=cost-e")
    assert status == 200 and body["tenant"] == "cost-e" and body["total"]["requests"] == 1
    status, body = await usage(http, chain, "cost-admin", "?tenant=nobody")
    assert status == 404 and "tenant" in body["error"]["message"]
    status, body = await usage(http, chain, "cost-admin")
    assert (status, body["tenant"], body["data"]) == (200, "cost-admin", [])


@pytest.mark.parametrize(("query", "field"), [
    ("?from=yesterday", "from"),
    ("?to=2025-13-01", "to"),
    ("?from=2025-01-02&to=2025-01-01", "from"),
    ("?from=2020-01-01&to=2025-01-01", "from"),  # longer than usage.retention
    ("?group_by=week", "group_by"),
    ("?group_by=model&group_by=day", "group_by"),
    ("?tenant=a%20b", "tenant"),
    ("?groupby=model", "groupby"),
    ("?from=1969-12-31", "from"),
    ("?from=9999-12-31T20:00:00&to=9999-12-31T23:30:00", "from"),  # was a 500: year 10000
])
async def test_invalid_usage_queries_are_400_naming_the_field(
        chain: Chain, http: aiohttp.ClientSession, query: str, field: str) -> None:
    status, body = await usage(http, chain, "cost-a", query)
    assert status == 400, body
    assert body["error"]["code"] == "INVALID_REQUEST"
    assert re.search(rf"(?<!\w){field}(?!\w)", body["error"]["message"]), body["error"]


async def test_usage_over_grpc(chain: Chain, http: aiohttp.ClientSession) -> None:
    await stream(http, chain, "cost-g")
    await stream(http, chain, "cost-g", user="carol")
    await settled(http, chain, "cost-g", 2)
    admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
    key = (("authorization", "Bearer cost-g-key"),)
    report = await admin.GetUsage(prompt_admin_pb2.GetUsageRequest(group_by="user"),
                                  metadata=key, timeout=10)
    assert [(r.key, r.requests) for r in report.rows] == [("", 1), ("carol", 1)]
    assert report.tenant == "cost-g" and report.to_ms % 3_600_000 == 0
    assert report.total.requests == 2 and report.total.key == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetUsage(prompt_admin_pb2.GetUsageRequest(tenant="cost-a"), metadata=key,
                             timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetUsage(prompt_admin_pb2.GetUsageRequest(group_by="hour"), metadata=key,
                             timeout=10)
    err = PromptlineError.from_rpc_error(caught.value)
    assert err.code is ErrorCode.INVALID_REQUEST and err.message.startswith("group_by")


async def _cli(*argv: str, key: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.main, list(argv), env={"PROMPTLINE_API_KEY": key},
                                   stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_cli_prints_usage_as_a_table_and_as_csv(chain: Chain,
                                                     http: aiohttp.ClientSession) -> None:
    for user in ("", "dan", "dan", "eve"):
        await stream(http, chain, "cost-h", **({"user": user} if user else {}))
    total = (await settled(http, chain, "cost-h", 4))["total"]
    code, out, err = await _cli("usage", "--url", chain.base_url, "--group-by", "user",
                                key="cost-h-key")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("tenant cost-h, ")
    assert lines[1].split() == ["USER", "REQUESTS", "ERRORS", "PROMPT_TOKENS",
                                "COMPLETION_TOKENS", "COST_USD"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["(none)", "1"], ["dan", "2"], ["eve", "1"], ["TOTAL", "4"]]
    assert lines[-1].split()[-1] == total["cost_usd"]
    code, out, _ = await _cli("usage", "--url", chain.base_url, "--group-by", "user", "--csv",
                              key="cost-h-key")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["user"] for r in rows] == ["", "dan", "eve"]
    assert sum(Decimal(r["cost_usd"]) for r in rows) == Decimal(total["cost_usd"])
    code, _, err = await _cli("usage", "--url", chain.base_url, "--tenant", "cost-a",
                              key="cost-h-key")
    assert code == 1 and "PERMISSION_DENIED" in err
    code, _, err = await _cli("usage", "--url", chain.base_url, "--from", "soon",
                              key="cost-h-key")
    assert code == 1 and "INVALID_REQUEST: query parameter from" in err

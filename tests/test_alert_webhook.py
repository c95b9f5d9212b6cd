"""Credit alerts through the real chain with two prompt-service replicas on one Redis, and a
webhook receiver in the test that verifies every signature: one alert per threshold and period
over both replicas; a failing receiver is retried; a hanging one never slows a chat.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from promptline.channels import insecure_channel
from promptline.config import Config, Targets, parse_config
from promptline.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc
from services.prompt import alerts as alerts_module
from services.prompt.alerts import SIGNATURE_HEADER, Alert, AlertNotifier
from services.prompt.server import start_prompt
from tests.chain import running_chain
from tests.conftest import BASE_CONFIG
from tests.eventually import eventually
from tests.grpc_calls import read_all

SECRET = "whsec-test-3f9a"
SECRET_ENV = "PL_TEST_HOOK_SECRET"
METERED = {"name": "metered", "provider": "simulated",
           "simulated": {"ttft_ms": 0, "tokens_per_second": 0, "reply": "tick " * 50},
           "price": {"input_per_mtok": 0, "output_per_mtok": 10}}
"""$0.0001 a request at `max_tokens` 10: a $0.001 budget is ten requests."""


@dataclass
class Receiver:
    """A webhook endpoint: answers each POST with the next of `statuses` (then 200), or never
    (`hang`); keeps the events whose signature verifies and counts those that do not."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    forged: int = 0
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
            self.forged += 1
            return web.Response(status=401)
        if self.hang:
            await self._release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.events.append(json.loads(body))
        return web.Response(status=status)


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield receiver
    finally:
        receiver._release.set()
        await runner.cleanup()


def config(redis_url: str, tenant: str, receiver: Receiver, **alerts: Any) -> Config:
    raw = copy.deepcopy(BASE_CONFIG)
    raw.update(redis_url=redis_url, models=[METERED], tenants=[
        {"name": tenant, "api_keys": [f"{tenant}-key"],
         "budget": {"usd": "0.001", "period": "day", "alerts": [0.5, 0.8, 1.0]}}],
        alerts={"webhook_url": receiver.url, "webhook_secret_env": SECRET_ENV,
                "webhook_backoff": "10ms", **alerts})
    return parse_config(raw, env={SECRET_ENV: SECRET})


@asynccontextmanager
async def two_replicas(config: Config) -> AsyncIterator[list[Callable[[], Any]]]:
    """The chain plus a second prompt-service replica; one chat function per replica."""
    async with running_chain(config, with_edge=False) as chain:
        assert chain.config.targets is not None
        second = await start_prompt(dataclasses.replace(config, targets=Targets(
            prompt="127.0.0.1:1", llm_engine=chain.config.targets.llm_engine)), "127.0.0.1:0")
        try:
            async with insecure_channel(f"127.0.0.1:{second.port}") as channel:
                stubs = [chain.prompt_stub, prompt_pb2_grpc.PromptServiceStub(channel)]
                yield [_chat(stub, config.tenants[0].name) for stub in stubs]
        finally:
            await second.stop(0.5)


def _chat(stub: Any, tenant: str) -> Callable[[], Any]:
    async def chat() -> prompt_pb2.StreamChatResponse:
        frames = await read_all(stub.StreamChat(prompt_pb2.StreamChatRequest(
            model="metered", max_tokens=10, messages=[
                common_pb2.ChatMessage(role="user", content="Hi")]),
            metadata=(("authorization", f"Bearer {tenant}-key"),), timeout=10))
        return frames[-1]
    return chat


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("promptline_alert_webhook_failures_total",
                                     {"reason": reason}) or 0


async def test_one_alert_per_threshold_over_two_replicas_each_signed(
        redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with receiving(Receiver()) as receiver:
        async with two_replicas(config(redis_server.url, "hook-a", receiver)) as chats:
            ends = await asyncio.gather(*(chats[i % 2]() for i in range(14)))
            assert sum(end.HasField("done") for end in ends) == 10
            assert {end.error.code for end in ends if end.HasField("error")} == {
                common_pb2.ERROR_CODE_BUDGET_EXCEEDED}
            await eventually(lambda: len(receiver.events) == 3, what="three webhook events")
            for _ in range(4):  # refused requests spend nothing and tell nothing
                assert (await chats[0]()).HasField("error")
            await asyncio.sleep(0.3)
    assert receiver.forged == 0 and receiver.attempts == 3
    assert sorted(e["threshold"] for e in receiver.events) == [0.5, 0.8, 1.0]
    for event in receiver.events:
        assert event["type"] == "budget.threshold_crossed"
        assert (event["tenant"], event["budget"], event["subject"], event["period"]) == (
            "hook-a", "tenant", "", "day")
        assert event["budget_usd"] == "0.001"
        assert Decimal(str(event["threshold"])) * Decimal("0.001") <= Decimal(
            event["spent_usd"]) <= Decimal("0.001")
        assert event["period_start"].endswith("T00:00:00Z") and len(event["id"]) == 32
    assert len({e["id"] for e in receiver.events}) == 3
    for threshold in ("0.5", "0.8", "1"):
        assert REGISTRY.get_sample_value("promptline_budget_alerts_total", {
            "tenant": "hook-a", "budget": "tenant", "threshold": threshold}) == 1
    logged = [r for r in caplog.records if r.name == "promptline.alerts"]
    assert len(logged) == 3
    for record in caplog.records:  # neither the secret nor the URL, anywhere
        text = f"{record.getMessage()} {vars(record)}"
        assert SECRET not in text and receiver.url not in text


async def test_a_failing_receiver_is_retried_and_counted(redis_server: Any) -> None:
    before = {r: failures(r) for r in ("status", "refused", "gave_up")}
    async with receiving(Receiver(statuses=[500, 503])) as receiver:
        async with two_replicas(config(redis_server.url, "hook-b", receiver,
                                       webhook_attempts=5)) as chats:
            for _ in range(5):  # 0.5 crossed
                assert (await chats[0]()).HasField("done")
            await eventually(lambda: len(receiver.events) == 1, what="the retried alert")
            assert receiver.attempts == 3 and failures("status") - before["status"] == 2
            receiver.statuses = [401]  # a refusal is final: no retry
            for _ in range(3):  # 0.8 crossed
                assert (await chats[1]()).HasField("done")
            await eventually(lambda: failures("gave_up") > before["gave_up"],
                             what="the refused alert given up")
    assert [e["threshold"] for e in receiver.events] == [0.5]
    assert receiver.attempts == 4
    assert failures("refused") - before["refused"] == 1
    assert failures("gave_up") - before["gave_up"] == 1


async def test_a_hanging_receiver_never_slows_a_chat(redis_server: Any) -> None:
    before = failures("timeout")
    async with receiving(Receiver(hang=True)) as receiver:
        cfg = config(redis_server.url, "hook-c", receiver, webhook_timeout="300ms",
                     webhook_attempts=2)
        async with two_replicas(cfg) as chats:
            assert (await chats[0]()).HasField("done")  # warm: connections made
            took = []
            for i in range(12):
                started = time.monotonic()
                await chats[i % 2]()
                took.append(time.monotonic() - started)
            # each alert waits 300 ms per attempt on a receiver that never answers: a chat that
            # waited for one would take that long
            assert max(took) < 0.25, took
            await eventually(lambda: failures("timeout") - before >= 6,
                             what="every attempt timed out")
            assert receiver.events == [] and receiver.attempts == 6


def test_a_full_queue_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts_module, "QUEUE_SIZE", 2)
    settings = parse_config({**copy.deepcopy(BASE_CONFIG), "alerts": {
        "webhook_url": "http://127.0.0.1:9/hook", "webhook_secret_env": SECRET_ENV}},
        env={SECRET_ENV: SECRET}).alerts
    notifier = AlertNotifier(lambda: settings)  # not started: nothing drains the queue
    before = failures("queue_full")
    start = alerts_module.datetime(2031, 1, 1, tzinfo=alerts_module.UTC)
    alert = Alert("q", "user", "u1", "day", start, start, 0.5, Decimal(1), Decimal("0.5"))
    notifier.notify([alert, alert, alert])
    assert failures("queue_full") - before == 1

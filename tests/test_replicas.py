"""Replicas behind one target: a prompt service dialling two engines (`ipv4:a,b`, round-robin)
spreads streams over both, and when one is gone, new streams go to the other one (before their
first token: nothing is ever retried mid-stream)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptline.channels import insecure_channel
from promptline.config import Targets
from promptline.devtools.deployment import LocalDeployment, Replica
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc
from services.llm_engine.server import start_engine
from services.prompt.server import start_prompt
from tests.chain import Chain
from tests.conftest import make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)
CHAT = prompt_pb2.StreamChatRequest(
    model="up", messages=[common_pb2.ChatMessage(role="user", content="hi")])


async def test_streams_spread_over_two_engines_and_survive_one(redis_server: Any) -> None:
    async with FakeOpenAI(reply="from a") as up_a, FakeOpenAI(reply="from b") as up_b:
        base = make_config(redis_url=redis_server.url)
        engines = [await start_engine(make_config(redis_url=redis_server.url, models=[
            {"name": "up", "provider": "openai", "base_url": up.base_url}]), "127.0.0.1:0")
                   for up in (up_a, up_b)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{e.port}" for e in engines)
        config = dataclasses.replace(
            make_config(redis_url=redis_server.url, models=[
                {"name": "up", "provider": "openai", "base_url": up_a.base_url}]),
            targets=Targets(prompt="127.0.0.1:1", llm_engine=target))
        prompt = await start_prompt(config, "127.0.0.1:0")
        try:
            async with insecure_channel(f"127.0.0.1:{prompt.port}") as channel:
                chain = Chain(base, engines[0], prompt, None, channel, channel)
                replies = []
                for _ in range(10):
                    frames = await read_all(chain.prompt_stub.StreamChat(CHAT, metadata=AUTH,
                                                                         timeout=10))
                    assert frames[-1].HasField("done")
                    replies.append("".join(f.delta.text for f in frames if f.HasField("delta")))
                assert {"from a", "from b"} <= set(replies)  # both replicas served
                await engines[0].stop(0)
                # no pause: new streams go to the live replica at once
                after = []
                for _ in range(10):
                    frames = await read_all(chain.prompt_stub.StreamChat(CHAT, metadata=AUTH,
                                                                         timeout=10))
                    assert frames[-1].HasField("done"), frames[-1]
                    after.append("".join(f.delta.text for f in frames if f.HasField("delta")))
                assert set(after) == {"from b"}
        finally:
            await prompt.stop(0)
            for engine in engines:
                await engine.stop(0)


# --- separate processes: 2 engines and 2 prompt services on one Redis --------------------------

SLOW_START_MS = 2500
TOKENS = "one two three four five six seven eight nine ten eleven twelve"


def process_config(redis_url: str) -> dict[str, Any]:
    timeouts = {"first_token": "20s", "idle": "20s", "total": "60s"}
    return {
        "redis_url": redis_url,
        "tenants": [{"name": "procs-budget", "api_keys": ["budget-key"], "quotas": {"qpm": 8}},
                    {"name": "procs-free", "api_keys": ["free-key"]}],
        "models": [
            {"name": "sim", "provider": "simulated", "timeouts": timeouts,
             "simulated": {"ttft_ms": 5, "tokens_per_second": 2000, "reply": TOKENS}},
            {"name": "slow-start", "provider": "simulated", "timeouts": timeouts,
             "simulated": {"ttft_ms": SLOW_START_MS, "tokens_per_second": 2000, "reply": TOKENS}},
            {"name": "slow-tokens", "provider": "simulated", "timeouts": timeouts,
             "simulated": {"ttft_ms": 0, "tokens_per_second": 10, "reply": TOKENS}},
        ],
        "shutdown_grace": "1s",
    }


def chat_to(model: str) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content="hi")])


async def metric(replica: Replica, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with `labels` on this process's own /metrics."""
    async with aiohttp.ClientSession() as http, http.get(replica.metrics_url) as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and labels.items() <= sample.labels.items())


async def provider_calls(replica: Replica, model: str) -> float:
    """Provider calls this engine process finished for `model`."""
    return await metric(replica, "promptline_provider_requests_total", model=model)


async def both_engines_in_rotation(stub: prompt_pb2_grpc.PromptServiceStub,
                                   engines: list[Replica]) -> None:
    """Chat until this prompt process reaches both engines again (one restarted by another
    test is redialled within the channel's reconnect backoff, <= 1 s)."""
    before = [await provider_calls(e, "sim") for e in engines]

    async def both_served() -> bool:
        await read_all(stub.StreamChat(chat_to("sim"), timeout=10,
                                       metadata=(("authorization", "Bearer free-key"),)))
        return all([await provider_calls(e, "sim") > b
                    for e, b in zip(engines, before, strict=True)])

    await eventually(both_served, what="both engines serving this prompt process")


@pytest.fixture(scope="module")
def deployment(redis_server: Any) -> Iterator[LocalDeployment]:
    with LocalDeployment(process_config(redis_server.url), engines=2, prompts=2) as running:
        yield running


async def test_a_budget_holds_across_two_prompt_processes(deployment: LocalDeployment) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stubs = [prompt_pb2_grpc.PromptServiceStub(await stack.enter_async_context(
            insecure_channel(r.address))) for r in deployment.replicas["prompt"]]
        calls = [read_all(stubs[i % 2].StreamChat(
            chat_to("sim"), metadata=(("authorization", "Bearer budget-key"),), timeout=20))
            for i in range(20)]
        results = await asyncio.gather(*calls)
    outcomes = Counter("done" if f[-1].HasField("done")
                       else PromptlineError.from_pb(f[-1].error).code.value for f in results)
    assert outcomes == {"done": 8, "QPM_EXCEEDED": 12}  # qpm 8, shared by both replicas


async def test_streams_spread_over_the_processes(deployment: LocalDeployment) -> None:
    engines = deployment.replicas["llm_engine"]
    before = [await provider_calls(e, "sim") for e in engines]
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            async with http.post(f"{deployment.edge_url}/v1/chat/completions", json={
                    "model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": "Bearer free-key"}) as resp:
                assert resp.status == 200, await resp.text()
    served = [await provider_calls(e, "sim") - b for e, b in zip(engines, before, strict=True)]
    assert sum(served) == 10 and min(served) >= 3, served  # round-robin over both engines


async def test_an_engine_killed_before_the_first_token_is_retried_on_the_other(
        deployment: LocalDeployment) -> None:
    stub_channel = insecure_channel(deployment.replica("prompt", 0).address)
    async with stub_channel:
        stub = prompt_pb2_grpc.PromptServiceStub(stub_channel)
        streams = [asyncio.ensure_future(read_all(stub.StreamChat(
            chat_to("slow-start"), metadata=(("authorization", "Bearer free-key"),),
            timeout=20))) for _ in range(6)]
        victim, survivor = deployment.replicas["llm_engine"]

        async def victim_has_streams() -> bool:
            return await metric(victim, "promptline_active_streams") >= 2

        await eventually(victim_has_streams, what="streams waiting on the engine to kill")
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)  # every stream is still waiting for its first token
        results = await asyncio.gather(*streams)
        assert time.monotonic() - killed_at < SLOW_START_MS / 1000 + 3
        try:
            for frames in results:
                assert frames[-1].HasField("done"), frames[-1]
                assert "".join(f.delta.text for f in frames if f.HasField("delta")) == TOKENS
            assert await provider_calls(survivor, "slow-start") == 6  # its own 3 + the retried
        finally:
            await asyncio.to_thread(victim.start)


async def test_a_stream_is_never_retried_after_its_first_token(
        deployment: LocalDeployment) -> None:
    engines = deployment.replicas["llm_engine"]
    async with insecure_channel(deployment.replica("prompt", 1).address) as channel:
        stub = prompt_pb2_grpc.PromptServiceStub(channel)
        await both_engines_in_rotation(stub, engines)
        calls = [stub.StreamChat(chat_to("slow-tokens"),
                                 metadata=(("authorization", "Bearer free-key"),), timeout=20)
                 for _ in range(4)]
        firsts = []
        for call in calls:  # each has its start frame and first token: committed
            frames = [await call.read(), await call.read()]
            assert frames[0].HasField("start") and frames[1].HasField("delta"), frames
            firsts.append(frames)
        assert [await metric(e, "promptline_active_streams") for e in engines] == [2, 2]
        await asyncio.to_thread(engines[1].kill)
        try:
            outcomes = []
            for call, first in zip(calls, firsts, strict=True):
                frames = first
                with contextlib.suppress(grpc.aio.AioRpcError):  # the status after the frame
                    while (frame := await call.read()) is not grpc.aio.EOF:
                        frames.append(frame)
                text = "".join(f.delta.text for f in frames if f.HasField("delta"))
                if frames[-1].HasField("done"):
                    assert text == TOKENS
                    outcomes.append("done")
                else:
                    err = PromptlineError.from_pb(frames[-1].error)
                    assert (err.code, err.stage) == (ErrorCode.UNAVAILABLE, Stage.MID_STREAM)
                    assert TOKENS.startswith(text) and text != TOKENS  # nothing repeated
                    outcomes.append("cut")
            assert sorted(outcomes) == ["cut", "cut", "done", "done"]
        finally:
            await asyncio.to_thread(engines[1].start)

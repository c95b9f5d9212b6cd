"""Replicas behind one target: a prompt service dialling two engines (`ipv4:a,b`, round-robin)
spreads streams over both, and when one is gone, new streams go to the other one (before their
first token: nothing is ever retried mid-stream)."""

from __future__ import annotations

import dataclasses
from typing import Any

from promptline.channels import insecure_channel
from promptline.config import Targets
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.v1 import common_pb2, prompt_pb2
from services.llm_engine.server import start_engine
from services.prompt.server import start_prompt
from tests.chain import Chain
from tests.conftest import make_config
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

"""A hop whose next hop restarts: requests fail fast with UNAVAILABLE while it is down, and the
first one after it is back succeeds within about a second (gRPC's reconnect backoff, tuned in
`promptline/channels.py`). Down for ~6 s, the default backoff took 0.07-4.07 s to reconnect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from promptline.errors import ErrorCode, PromptlineError
from promptline.v1 import common_pb2, prompt_pb2
from services.llm_engine.server import start_engine
from services.prompt.server import start_prompt
from tests.chain import running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)
CHAT = prompt_pb2.StreamChatRequest(
    model="sim", messages=[common_pb2.ChatMessage(role="user", content="hi")])


async def chat_outcome(chain: Any) -> str:
    frames = await read_all(chain.prompt_stub.StreamChat(CHAT, metadata=AUTH, timeout=10))
    if frames and frames[-1].HasField("done"):
        return "done"
    return PromptlineError.from_pb(frames[-1].error).code.value if frames else "no frames"


async def until_done(attempt: Any, within: float) -> float:
    """Seconds until `attempt()` first returns "done" (requests 50 ms apart)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await attempt() == "done":
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"no success within {within} s")


async def test_the_prompt_service_rides_out_an_engine_restart(redis_server: Any) -> None:
    config = make_config(redis_url=redis_server.url)
    async with running_chain(config, with_edge=False) as chain:
        assert await chat_outcome(chain) == "done"
        port = chain.engine.port
        await chain.engine.stop(0)
        # while it is down, for long enough that gRPC's default backoff would have grown
        for _ in range(10):
            started = time.monotonic()
            assert await chat_outcome(chain) == ErrorCode.UNAVAILABLE.value
            assert time.monotonic() - started < 1.0  # fails fast, not at its deadline
            await asyncio.sleep(0.5)
        engine = await start_engine(config, f"127.0.0.1:{port}")
        try:
            took = await until_done(lambda: chat_outcome(chain), within=8)
            assert took <= 2.0
        finally:
            await engine.stop(0)


async def test_the_edge_rides_out_a_prompt_service_restart(redis_server: Any) -> None:
    config = make_config(redis_url=redis_server.url)
    async with running_chain(config) as chain, aiohttp.ClientSession() as http:

        async def post() -> str:
            async with http.post(f"{chain.base_url}/v1/chat/completions", json={
                    "model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": "Bearer dev-key"}) as resp:
                body = await resp.json()
                return "done" if resp.status == 200 else body["error"]["code"]

        assert await post() == "done"
        port = chain.prompt.port
        await chain.prompt.stop(0)
        for _ in range(10):
            started = time.monotonic()
            assert await post() == "unavailable"
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.5)
        prompt = await start_prompt(chain.config, f"127.0.0.1:{port}")
        try:
            took = await until_done(post, within=8)
            assert took <= 2.0
        finally:
            await prompt.stop(0)

"""After every way a stream can end, nothing is left running: no task, no open stream on any
hop, no upstream connection still streaming."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client import REGISTRY

from promptline.devtools.fake_openai import FakeOpenAI
from promptline.devtools.sse_client import events
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually

AUTH = {"Authorization": "Bearer dev-key"}
LONG = "and the reply keeps going " * 40


def active(service: str) -> float:
    return REGISTRY.get_sample_value("promptline_active_streams", {"service": service}) or 0.0


async def test_nothing_survives_any_ending(redis_client, redis_server):
    async with FakeOpenAI(reply=LONG, delay=0.005) as upstream:
        config = make_config(redis_url=redis_server.url, models=[
            {"name": "up", "provider": "openai", "base_url": upstream.base_url},
            {"name": "up-stall", "provider": "openai", "base_url": upstream.base_url,
             "timeouts": {"first_token": "5s", "idle": "300ms", "total": "30s"}},
            {"name": "fail", "provider": "simulated",
             "simulated": {"ttft_ms": 0, "tokens_per_second": 200, "fail_after_tokens": 3}},
            {"name": "badword", "provider": "simulated",
             "simulated": {"ttft_ms": 0, "tokens_per_second": 200,
                           "reply": "fine so far, then forbidden-word and more"}},
        ])
        async with running_chain(config) as chain:
            url = f"{chain.base_url}/v1/chat/stream"

            async def complete(model: str, content: str = "Hi") -> None:
                async with aiohttp.ClientSession() as http, http.post(
                        url, json={"model": model, "messages": [{"role": "user",
                                                                 "content": content}]},
                        headers=AUTH) as resp:
                    if resp.status == 200:
                        async for _ in events(resp):
                            pass

            async def hang_up(model: str) -> None:
                async with aiohttp.ClientSession() as http:
                    resp = await http.post(url, json={"model": model, "messages": [
                        {"role": "user", "content": "Hi"}]}, headers=AUTH)
                    async for event in events(resp):
                        if event.event == "delta":
                            break
                    resp.close()  # the user closes the tab mid-stream

            async def stall_then_timeout() -> None:
                upstream.push(for_model="up-stall", stall_after_chunks=2)
                await complete("up-stall")

            await asyncio.gather(
                complete("sim"), complete("up"), complete("fail"), complete("badword"),
                complete("sim", "say forbidden-word"), complete("no-such-model"),
                hang_up("up"), hang_up("sim"), stall_then_timeout(),
            )
            await eventually(lambda: chain.engine_streams == 0
                             and active("edge_http") == active("prompt")
                             == active("llm_engine") == 0, what="every hop idle")
            await eventually(lambda: upstream.active_streams == 0, what="upstream idle")
            await eventually(lambda: not our_tasks(), what="no task of ours left")


def our_tasks() -> list[asyncio.Task]:
    """Tasks running code of the services or the shared package (gRPC's and aiohttp's own
    connection tasks are theirs to manage: kept-alive connections may rightly stay), but for the
    prompt service's Redis probe, which lives as long as the service."""
    mine = []
    for task in asyncio.all_tasks():
        if task.get_name() == "redis-watch":
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        path = code.co_filename if code else ""
        if "/services/" in path or "/promptline/" in path:
            mine.append(task)
    return mine

"""End to end through all three hops over HTTP/SSE: simulated and OpenAI-compatible providers."""

from __future__ import annotations

import aiohttp

from promptline.devtools.fake_openai import FakeOpenAI
from promptline.devtools.sse_client import collect, events, without_comments
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually

AUTH = {"Authorization": "Bearer dev-key"}
BODY = {"model": "sim", "messages": [{"role": "user", "content": "Hi"}]}


async def test_sim_stream_reaches_http_client_in_order(redis_server):
    # 200 tokens/s: a pace every hop keeps up with, so tokens arrive as separate deltas
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "paced", "provider": "simulated",
        "simulated": {"ttft_ms": 5, "tokens_per_second": 200, "reply": "word " * 30},
        "stream": {"coalesce_ms": 0}}])
    async with running_chain(config) as chain, aiohttp.ClientSession() as http:
        async with http.post(f"{chain.base_url}/v1/chat/stream",
                             json={**BODY, "model": "paced"}, headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-Accel-Buffering"] == "no"
            got = without_comments(await collect(resp))
    assert got[0].event == "start" and got[0].data["model"] == "paced"
    assert got[0].data["request_id"]
    deltas = [e for e in got if e.event == "delta"]
    assert len(deltas) >= 5
    assert [int(e.id) for e in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(e.data["text"] for e in deltas) == "word " * 30
    assert got[-1].event == "done"
    usage = got[-1].data["usage"]
    assert got[-1].data["finish_reason"] == "stop"
    assert usage["completion_tokens"] >= len(deltas)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_openai_provider_through_the_chain(redis_server):
    async with FakeOpenAI(reply="Streaming from an OpenAI-compatible upstream, chunk by chunk.",
                          ) as upstream:
        config = make_config(redis_url=redis_server.url, models=[{
            "name": "gpt-test", "provider": "openai", "base_url": upstream.base_url}])
        body = {**BODY, "model": "gpt-test"}
        async with running_chain(config) as chain, aiohttp.ClientSession() as http:
            async with http.post(f"{chain.base_url}/v1/chat/stream", json=body,
                                 headers=AUTH) as resp:
                assert resp.status == 200
                got = without_comments(await collect(resp))
        assert got[0].event == "start" and got[-1].event == "done"
        text = "".join(e.data["text"] for e in got if e.event == "delta")
        assert text == upstream.reply
        assert upstream.requests[-1].body["model"] == "gpt-test"
        assert upstream.requests[-1].body["stream"] is True


async def test_client_disconnect_closes_the_provider_connection(redis_server):
    async with FakeOpenAI(reply="word " * 200, tokens=200, delay=0.05) as upstream:
        config = make_config(redis_url=redis_server.url, models=[{
            "name": "gpt-test", "provider": "openai", "base_url": upstream.base_url}])
        body = {**BODY, "model": "gpt-test"}
        async with running_chain(config) as chain:
            async with aiohttp.ClientSession() as http:
                resp = await http.post(f"{chain.base_url}/v1/chat/stream", json=body,
                                       headers=AUTH)
                seen = 0
                async for event in events(resp):
                    if event.event == "delta":
                        seen += 1
                        if seen == 3:
                            break
                resp.close()  # the browser tab closes
            await upstream.wait_disconnect(within=10)
            await upstream.wait_idle(within=10)
            assert upstream.active_streams == 0
            assert upstream.completed == 0


async def test_sim_disconnect_cancels_engine_stream(redis_server):
    """Stop on a slow simulated stream: the engine handler ends long before the reply would."""
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "slow", "provider": "simulated",
        "simulated": {"ttft_ms": 0, "tokens_per_second": 5, "reply": "tick " * 100}}])
    async with running_chain(config) as chain:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{chain.base_url}/v1/chat/stream",
                                   json={**BODY, "model": "slow"}, headers=AUTH)
            async for event in events(resp):
                if event.event == "delta":
                    break
            resp.close()
        # the engine's handler (and with it the provider generator) ends long before the reply
        await eventually(lambda: chain.engine_streams == 0, within=10,
                         what="engine stream cancelled")
        assert chain.engine_streams == 0

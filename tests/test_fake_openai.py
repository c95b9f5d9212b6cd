"""Self-test of the OpenAI-compatible fake (promptline/devtools/fake_openai.py): what the tests
and the bench rely on it to do, checked with the `openai` SDK and on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from promptline.devtools.fake_openai import FakeOpenAI, model_name, reply_pieces, reply_text
from promptline.devtools.sse_client import SseStream
from promptline.tokens import count_tokens

API_KEY = "sk-test-0123456789abcdef"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key=API_KEY,
                                  max_retries=0) as sdk:
        yield sdk


async def stream_texts(client: openai.AsyncOpenAI, model: str = "m", **kw: Any) -> list[str]:
    stream = await client.chat.completions.create(model=model, messages=HI, stream=True, **kw)
    return [c.choices[0].delta.content async for c in stream
            if c.choices and c.choices[0].delta.content]


async def timed_chunks(fake: FakeOpenAI, body: dict[str, Any]) -> list[tuple[float, Any]]:
    """(loop time, chunk) of every `data:` line of one streamed reply, `[DONE]` included."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, http.post(
            f"{fake.base_url}/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        stream, out = SseStream(resp), []
        while (event := await stream.next()) is not None:
            out.append((loop.time(), event.data))
    return out


async def test_401_echoes_the_presented_key(fake: FakeOpenAI,
                                            client: openai.AsyncOpenAI) -> None:
    # What test_openai_provider's 401 test relies on: the raw upstream text contains the key.
    fake.fail_status = 401
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="m", messages=[], stream=True)
    assert API_KEY in str(info.value)


async def test_tokens_knob_repeats_words(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.reply, fake.tokens = "one two", 5
    assert await stream_texts(client) == ["one ", "two ", "one ", "two ", "one "]
    fake.tokens = 1
    assert await stream_texts(client) == ["one two"]


async def test_push_overrides_the_next_request_only(fake: FakeOpenAI,
                                                    client: openai.AsyncOpenAI) -> None:
    fake.push(fail_status=500)
    fake.push(for_model="other", reply="for the other model")
    with pytest.raises(openai.InternalServerError):
        await stream_texts(client)
    assert "".join(await stream_texts(client)) == fake.reply  # "other" keeps its override
    assert "".join(await stream_texts(client, "other")) == "for the other model"
    with pytest.raises(TypeError, match="unknown FakeOpenAI knobs"):
        fake.push(no_such_knob=1)
    assert [r.api_key for r in fake.requests] == [API_KEY] * 3


async def test_max_tokens_cuts_with_length_and_usage(fake: FakeOpenAI,
                                                     client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=HI, stream=True, max_tokens=2,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    completion = await client.chat.completions.create(model="m", messages=HI)
    assert completion.choices[0].message.content == fake.reply
    assert completion.choices[0].finish_reason == "stop"


async def test_a_shaped_model_streams_one_token_per_chunk_paced(fake: FakeOpenAI) -> None:
    """`up-<N>x<D>ms-t<T>ms`, as the bench names its models: N one-token chunks D ms apart, the
    first T ms after the role chunk, whatever the reply knob says."""
    fake.reply = "ignored for shaped models"
    name = model_name(5, 20, 30)
    assert name == "up-5x20ms-t30ms"
    chunks = await timed_chunks(fake, {"model": f"openai/{name}", "messages": HI})
    (role_at, role), *content, (_, finish), (_, done) = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"]["content"] for _, c in content]
    assert texts == reply_pieces(5) and "".join(texts) == reply_text(5)
    assert all(count_tokens(t) == 1 for t in texts)
    assert finish["choices"][0]["finish_reason"] == "stop" and done == "[DONE]"
    # Read in this same event loop: a late read of the earlier chunk (up to 10 ms) is slack.
    first_at = content[0][0]
    assert first_at - role_at >= 0.030 - 0.010
    # Paced against the first content chunk: chunk i leaves i * 20 ms after it.
    assert content[-1][0] - first_at >= 4 * 0.020 - 0.010
    assert fake.stats() == {"requests": 1, "streams_started": 1, "active_streams": 0,
                            "completed": 1, "chunks_sent": 5, "disconnects": 0, "drops": 0}


async def test_stats_over_http_and_a_server_that_does_not_record() -> None:
    async with FakeOpenAI(record=False) as fake, aiohttp.ClientSession() as http:
        body = {"model": model_name(3, 0), "messages": HI, "stream": True}
        for _ in range(2):
            async with http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
                await resp.read()
        async with http.get(f"{fake.base_url.removesuffix('/v1')}/stats") as resp:
            stats = await resp.json()
    assert stats["requests"] == 2 and stats["chunks_sent"] == 6 and stats["completed"] == 2
    assert fake.requests == []


async def test_a_client_that_goes_away_is_a_disconnect(fake: FakeOpenAI) -> None:
    fake.tokens, fake.delay = 50, 0.05
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{fake.base_url}/chat/completions",
                               json={"model": "m", "messages": HI, "stream": True})
        assert (await SseStream(resp).next()) is not None
        resp.close()
    await fake.wait_disconnect()
    await fake.wait_idle()
    assert (fake.disconnects, fake.completed, fake.active_streams) == (1, 0, 0)

"""The OpenAI-compatible API through the real chain, driven by the official `openai` client.

The sync client runs in a thread (`asyncio.to_thread`) because the chain runs in this event loop.
Every client is built with `max_retries=0`, so an error surfaces exactly as the server sent it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from services.edge_http.openai_api import parse_completion_request
from tests.chain import Chain, chain_fixture
from tests.conftest import BASE_CONFIG
from tests.eventually import eventually

REPLY = BASE_CONFIG["models"][0]["simulated"]["reply"]
HI = [{"role": "user", "content": "Hi"}]
# Output moderation holds back the last 13 characters (len("forbidden-word") - 1), so the client
# sees a prefix of the 6 tokens sent before the failure.
FLAKY_REPLY = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
TENANTS = [
    *BASE_CONFIG["tenants"],
    {"name": "oai-qpm1", "api_keys": ["oai-qpm1-key"], "quotas": {"qpm": 1}},
    {"name": "oai-sim-only", "api_keys": ["oai-sim-only-key"], "models": ["sim"]},
]
MODELS = [
    {"name": "flaky", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 2000, "fail_after_tokens": 6,
                   "reply": FLAKY_REPLY}},
    {"name": "slow", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 10, "reply": "tick " * 200}},
    # a pace every hop keeps up with, so tokens are not coalesced into fewer chunks
    {"name": "paced", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 200, "reply": REPLY},
     "stream": {"coalesce_ms": 0}},
]


chain = chain_fixture({"tenants": TENANTS}, MODELS)


def sync_client(chain: Chain, key: str = "dev-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{chain.base_url}/v1", api_key=key, max_retries=0)


def async_client(chain: Chain, key: str = "dev-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key=key, max_retries=0)


# --- success -------------------------------------------------------------------------------------


async def test_async_stream_with_usage(chain: Chain) -> None:
    async with async_client(chain) as client:
        stream = await client.chat.completions.create(
            model="paced", messages=HI, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len(chunks) > 5  # really streamed, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.model == "paced" for c in chunks)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens >= 5
    assert usage_chunk.usage.total_tokens == (usage_chunk.usage.prompt_tokens
                                              + usage_chunk.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def _sync_stream(chain: Chain) -> tuple[str, list[Any]]:
    with sync_client(chain) as client:
        stream = client.chat.completions.create(model="sim", messages=HI, stream=True)
        chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


async def test_sync_stream_without_usage(chain: Chain) -> None:
    text, chunks = await asyncio.to_thread(_sync_stream, chain)
    assert text == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


async def test_async_non_stream(chain: Chain) -> None:
    async with async_client(chain) as client:
        completion = await client.chat.completions.create(model="sim", messages=HI)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                             + completion.usage.completion_tokens)


def _sync_non_stream(chain: Chain, **kwargs: Any) -> Any:
    with sync_client(chain) as client:
        return client.chat.completions.with_raw_response.create(model="sim", **kwargs)


async def test_sync_non_stream_with_text_parts_and_request_id(chain: Chain) -> None:
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]
    raw = await asyncio.to_thread(_sync_non_stream, chain, messages=messages, user="u-1",
                                  max_completion_tokens=500)
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    rid = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{rid}"


async def test_finish_reason_length(chain: Chain) -> None:
    async with async_client(chain) as client:
        completion = await client.chat.completions.create(model="sim", messages=HI, max_tokens=3)
        stream = await client.chat.completions.create(
            model="sim", messages=HI, max_tokens=3, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_models_list_honours_the_tenant_allowlist(chain: Chain) -> None:
    async with async_client(chain) as client:
        everything = [m.id async for m in client.models.list()]
    async with async_client(chain, "oai-sim-only-key") as client:
        allowed = [m.id async for m in client.models.list()]
    assert everything == ["sim", "flaky", "slow", "paced"]
    assert allowed == ["sim"]


# --- errors before the stream: real HTTP statuses ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_bad_key_is_authentication_error(chain: Chain, stream: bool) -> None:
    async with async_client(chain, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="sim", messages=HI, stream=stream)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "unauthenticated"
    assert caught.value.type == "authentication_error"


def _sync_create(chain: Chain, key: str = "dev-key", **kwargs: Any) -> Any:
    with sync_client(chain, key) as client:
        return client.chat.completions.create(**kwargs)


async def test_unknown_model_is_not_found(chain: Chain) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await asyncio.to_thread(_sync_create, chain, model="no-such-model", messages=HI,
                                stream=True)
    assert caught.value.status_code == 404
    assert caught.value.code == "not_found"
    assert "no-such-model" in caught.value.message


async def test_tenant_quota_is_rate_limit_error(chain: Chain) -> None:
    async with async_client(chain, "oai-qpm1-key") as client:
        await client.chat.completions.create(model="sim", messages=HI)  # the one allowed
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="sim", messages=HI, stream=True)
    err = caught.value
    assert err.status_code == 429
    assert err.code == "qpm_exceeded" and err.type == "rate_limit_error"
    assert isinstance(err.body, dict) and err.body["retryable"] is True
    assert err.body["retry_after_ms"] > 0
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.body["request_id"] == err.response.headers["x-request-id"]


async def test_blocked_input_is_bad_request(chain: Chain) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.to_thread(_sync_create, chain, model="sim",
                                messages=[{"role": "user", "content": "say forbidden-word"}])
    assert caught.value.status_code == 400
    assert caught.value.code == "moderation_blocked"
    assert caught.value.type == "content_filter"


async def test_unsupported_request_shapes_are_bad_requests(chain: Chain) -> None:
    async with async_client(chain) as client:
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            await client.chat.completions.create(model="sim", messages=HI, n=2)
        with pytest.raises(openai.BadRequestError, match="only text content"):
            await client.chat.completions.create(model="sim", messages=[{
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])


def test_request_parsing() -> None:
    chat, options = parse_completion_request(
        b'{"model":"sim","messages":[{"role":"user","content":"Hi"}],"stream":true,'
        b'"stream_options":{"include_usage":true},"max_tokens":7,"temperature":0.5,'
        b'"top_p":0.9,"user":"someone","n":1}')
    assert (chat.model, chat.max_tokens, round(chat.temperature, 3)) == ("sim", 7, 0.5)
    assert options.stream and options.include_usage
    for body, message in [
        (b'{"model":"sim","messages":[],"stream_options":{"include_usage":true}}',
         "stream_options is only allowed when stream is true"),
        (b'{"model":"sim","messages":[{"role":"tool","content":"x"}]}', "tool calling"),
        (b'{"model":"sim","messages":[{"role":"user","content":"x"}],"stream":"yes"}',
         "stream must be a boolean"),
        (b'{"model":"sim","messages":[{"role":"user","content":"x"}],'
         b'"max_tokens":5,"max_completion_tokens":6}', "not both"),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model is required"),
    ]:
        with pytest.raises(Exception, match=message):
            parse_completion_request(body)


# --- errors after the stream started -------------------------------------------------------------


async def test_mid_stream_error_raises_in_the_async_client(chain: Chain) -> None:
    text = ""
    async with async_client(chain) as client:
        stream = await client.chat.completions.create(model="flaky", messages=HI, stream=True)
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
    assert text and FLAKY_REPLY.startswith(text) and len(text) < len(FLAKY_REPLY)  # partial
    assert "fail_after_tokens" in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_error"
    assert caught.value.body["stage"] == "mid_stream"


def _sync_flaky_stream(chain: Chain) -> str:
    text = ""
    with sync_client(chain) as client:
        for chunk in client.chat.completions.create(model="flaky", messages=HI, stream=True):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    return text


async def test_mid_stream_error_raises_in_the_sync_client(chain: Chain) -> None:
    with pytest.raises(openai.APIError, match="fail_after_tokens"):
        await asyncio.to_thread(_sync_flaky_stream, chain)


async def test_mid_stream_error_wire_format(chain: Chain) -> None:
    body = {"model": "flaky", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/completions", json=body,
            headers={"Authorization": "Bearer dev-key"}) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    assert blocks[-2].startswith('data: {"error":{')
    assert all(b.startswith("data: {") for b in blocks[:-1])


async def test_non_stream_error_after_tokens_is_http_error(chain: Chain) -> None:
    async with async_client(chain) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="flaky", messages=HI)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert isinstance(caught.value.body, dict) and caught.value.body["stage"] == "mid_stream"


async def test_client_disconnect_cancels_the_chain(chain: Chain) -> None:
    async with async_client(chain) as client:
        stream = await client.chat.completions.create(model="slow", messages=HI, stream=True)
        seen = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
                if seen == 2:
                    break
        assert chain.engine_streams >= 1  # still generating: 200 ticks at 10/s
        await stream.close()
    await eventually(lambda: chain.engine_streams == 0, within=10,
                     what="engine stream cancelled")

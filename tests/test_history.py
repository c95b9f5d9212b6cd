"""Conversation memory on real Redis: append, TTL, trimming, tenant isolation, concurrency, and
end to end through the chain (history in the model's context, partial replies, GET/DELETE)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from promptline.devtools.sse_client import collect, events
from promptline.errors import ErrorCode, PromptlineError
from promptline.tokens import count_messages
from promptline.v1.common_pb2 import ChatMessage
from services.prompt.history import ConversationStore, Turn, conversation_key, exchange
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually

DEV = {"Authorization": "Bearer dev-key"}
OTHER = {"Authorization": "Bearer other-key"}
REPLY = "Hello from the simulated model, streaming token by token."  # BASE_CONFIG's sim reply
LONG_REPLY = "Streaming replies arrive token by token, and every hop relays them at once. " * 4


# --- the store -----------------------------------------------------------------------------------


@pytest.fixture
def store(redis_client) -> ConversationStore:
    return ConversationStore(redis_client, ttl=3600, max_messages=6)


def pair(i: int, partial: bool = False) -> list[Turn]:
    return exchange([ChatMessage(role="user", content=f"question {i}")], f"answer {i}",
                    partial=partial, request_id=f"r{i}")


async def test_append_load_and_get(store):
    await store.append("dev", "c1", pair(1))
    await store.append("dev", "c1", pair(2, partial=True))
    turns = await store.load("dev", "c1")
    assert [(t.role, t.content, t.partial) for t in turns] == [
        ("user", "question 1", False), ("assistant", "answer 1", False),
        ("user", "question 2", False), ("assistant", "answer 2", True)]
    assert turns[0].request_id == "r1" and turns[0].created_at_ms > 0
    conversation = await store.get("dev", "c1")
    assert conversation.turns == turns
    assert 3_590_000 < conversation.expires_in_ms <= 3_600_000


async def test_ttl_is_set_renewed_and_expires(redis_client):
    store = ConversationStore(redis_client, ttl=1.0, max_messages=10)
    await store.append("dev", "c1", pair(1))
    key = conversation_key("dev", "c1")
    assert 0 < await redis_client.pttl(key) <= 1000
    await asyncio.sleep(0.6)
    await store.append("dev", "c1", pair(2))  # renews the TTL to the full second
    assert await redis_client.pttl(key) > 600

    async def gone() -> bool:
        return not await redis_client.exists(key)

    await eventually(gone, what="the conversation expiring")
    with pytest.raises(PromptlineError) as info:
        await store.get("dev", "c1")
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_keeps_only_max_messages(store):
    for i in range(5):
        await store.append("dev", "c1", pair(i))
    turns = await store.load("dev", "c1")
    assert [t.content for t in turns] == ["question 2", "answer 2", "question 3", "answer 3",
                                          "question 4", "answer 4"]


async def test_another_tenant_gets_not_found_never_the_data(store):
    await store.append("dev", "c1", pair(1))
    assert await store.load("other", "c1") == ()
    for call in (store.get, store.delete):
        with pytest.raises(PromptlineError) as info:
            await call("other", "c1")
        assert info.value.code is ErrorCode.NOT_FOUND
        assert "question" not in info.value.message
    assert len(await store.load("dev", "c1")) == 2  # untouched by the other tenant's delete
    assert await store.delete("dev", "c1") == 2
    with pytest.raises(PromptlineError):
        await store.delete("dev", "c1")


async def test_concurrent_appends_all_land_as_contiguous_exchanges(redis_client):
    store = ConversationStore(redis_client, ttl=3600, max_messages=1000)
    await asyncio.gather(*(store.append("dev", "c1", pair(i)) for i in range(50)))
    turns = await store.load("dev", "c1")
    assert len(turns) == 100
    for user, reply in zip(turns[::2], turns[1::2], strict=True):
        assert user.role == "user" and reply.role == "assistant"
        assert reply.content == user.content.replace("question", "answer")
    assert sorted(int(t.content.split()[1]) for t in turns[::2]) == list(range(50))


async def test_ids_are_validated(store):
    with pytest.raises(PromptlineError) as info:
        await store.load("dev", "bad id|x")
    assert info.value.code is ErrorCode.INVALID_REQUEST


# --- through the chain ---------------------------------------------------------------------------


def chain_config(redis_url: str, **overrides: Any) -> Any:
    fast = {"ttft_ms": 0, "tokens_per_second": 0}
    models = [
        {"name": "tiny", "provider": "simulated", "context_window": 120, "max_tokens": 20,
         "simulated": {**fast, "reply": "ok"}},
        {"name": "fail3", "provider": "simulated",
         "simulated": {**fast, "reply": LONG_REPLY, "fail_after_tokens": 3}},
        {"name": "fail0", "provider": "simulated",
         "simulated": {**fast, "fail_after_tokens": 0}},
        {"name": "slow", "provider": "simulated",
         "simulated": {"ttft_ms": 0, "tokens_per_second": 20, "reply": LONG_REPLY * 3}},
    ]
    return make_config({"conversations": {"ttl": "1h", "max_messages": 50}, **overrides},
                       redis_url=redis_url, models=models)


async def chat(http: aiohttp.ClientSession, base: str, content: str, *, model: str = "sim",
               conversation_id: str = "c1", headers: dict[str, str] = DEV,
               **extra: Any) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "conversation_id": conversation_id, **extra}
    async with http.post(f"{base}/v1/chat/stream", json=body, headers=headers) as resp:
        if resp.status != 200:
            return resp.status, await resp.json()
        return 200, await collect(resp)


async def history(http: aiohttp.ClientSession, base: str, conversation_id: str = "c1",
                  headers: dict[str, str] = DEV) -> tuple[int, Any]:
    async with http.get(f"{base}/v1/conversations/{conversation_id}", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_history_feeds_the_next_request_and_is_readable(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        status, first = await chat(http, base, "My name is Ada.")
        assert status == 200 and first[-1].event == "done"
        assert first[0].data["conversation_id"] == "c1"
        assert first[0].data["prompt_tokens"] == count_messages([("user", "My name is Ada.")])
        # the second request's prompt is the stored exchange plus its new message
        status, second = await chat(http, base, "What is my name?")
        assert second[0].data["prompt_tokens"] == count_messages([
            ("user", "My name is Ada."), ("assistant", REPLY), ("user", "What is my name?")])
        status, body = await history(http, base)
        assert status == 200
        assert [(m["role"], m["content"], m["partial"]) for m in body["messages"]] == [
            ("user", "My name is Ada.", False), ("assistant", REPLY, False),
            ("user", "What is my name?", False), ("assistant", REPLY, False)]
        assert 3_590_000 < body["expires_in_ms"] <= 3_600_000  # conversations.ttl: 1h
        assert body["messages"][0]["request_id"] == first[0].data["request_id"]


async def test_tenant_isolation_over_http(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        await chat(http, base, "secret plans for dev")
        status, body = await history(http, base, headers=OTHER)
        assert status == 404 and body["error"]["code"] == "NOT_FOUND"
        assert "secret" not in str(body)
        async with http.delete(f"{base}/v1/conversations/c1", headers=OTHER) as resp:
            assert resp.status == 404
        # the other tenant's stream on the same id starts from an empty history
        status, events_ = await chat(http, base, "hello", headers=OTHER)
        assert events_[0].data["prompt_tokens"] == count_messages([("user", "hello")])
        status, body = await history(http, base)
        assert status == 200 and len(body["messages"]) == 2  # dev's is intact
        status, body = await history(http, base, headers=OTHER)
        assert [m["content"] for m in body["messages"]] == ["hello", REPLY]
        async with http.delete(f"{base}/v1/conversations/c1", headers=DEV) as resp:
            assert resp.status == 204
        assert (await history(http, base))[0] == 404
        assert (await history(http, base, headers=OTHER))[0] == 200
        async with http.get(f"{base}/v1/conversations/c1") as resp:
            assert resp.status == 401


async def test_trimmed_to_the_window_with_real_counts(redis_client, redis_server):
    """Model tiny: 120-token window, default max_tokens 20. Old turns fall out of the prompt
    (never out of storage), whole, and the newest ones stay."""
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        sent: list[tuple[str, str]] = []
        for i in range(8):
            content = f"Message number {i} talks about labels and rollbacks."
            status, frames = await chat(http, base, content, model="tiny")
            assert status == 200 and frames[-1].event == "done", frames
            # expected: the longest newest-first suffix of whole stored messages that fits
            kept: list[tuple[str, str]] = []
            for message in reversed(sent):
                if count_messages([message, *kept, ("user", content)]) > 100:
                    break
                kept.insert(0, message)
            while kept and kept[0][0] != "user":
                kept.pop(0)
            assert frames[0].data["prompt_tokens"] == count_messages([*kept, ("user", content)])
            assert frames[0].data["prompt_tokens"] + 20 <= 120
            sent += [("user", content), ("assistant", "ok")]
        assert len(kept) < len(sent) - 2  # trimming really happened
        _, body = await history(http, base)
        assert len(body["messages"]) == 16  # storage keeps everything (up to max_messages)

        # a newest message that alone cannot fit: CONTEXT_TOO_LONG with the counts, not stored
        huge = "tokens " * 200
        status, body = await chat(http, base, huge, model="tiny")
        assert status == 400 and body["error"]["code"] == "CONTEXT_TOO_LONG"
        needed = count_messages([("user", huge)])
        assert f"needs {needed} prompt tokens" in body["error"]["message"]
        assert "context window of 120 tokens" in body["error"]["message"]
        _, body = await history(http, base)
        assert len(body["messages"]) == 16


async def test_partial_reply_policy(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        # failed before any text reached the caller: nothing stored
        status, body = await chat(http, base, "first try", model="fail0", conversation_id="p0")
        assert status == 502
        assert (await history(http, base, "p0"))[0] == 404
        # cut mid-stream: the user turn and exactly the delivered text, marked partial
        status, frames = await chat(http, base, "second try", model="fail3",
                                    conversation_id="p1")
        assert status == 200 and frames[-1].event == "error"
        delivered = "".join(e.data["text"] for e in frames if e.event == "delta")
        assert delivered

        async def stored() -> bool:  # written right after the error frame
            return (await history(http, base, "p1"))[0] == 200

        await eventually(stored, what="the stored partial reply")
        _, body = await history(http, base, "p1")
        assert [(m["role"], m["content"], m["partial"]) for m in body["messages"]] == [
            ("user", "second try", False), ("assistant", delivered, True)]


async def test_client_disconnect_stores_the_partial_reply(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        body = {"model": "slow", "messages": [{"role": "user", "content": "tell me a lot"}],
                "conversation_id": "stop1"}
        async with http.post(f"{base}/v1/chat/stream", json=body, headers=DEV) as resp:
            seen = 0
            async for event in events(resp):
                seen += event.event == "delta"
                if seen == 3:
                    break  # the Stop button: close the connection mid-stream
            resp.close()

        async def stored() -> bool:
            return (await history(http, base, "stop1"))[0] == 200

        await eventually(stored, what="the stored partial reply")
        _, data = await history(http, base, "stop1")
        user, reply = data["messages"]
        assert user["content"] == "tell me a lot" and reply["partial"] is True
        assert reply["content"] and LONG_REPLY.startswith(reply["content"])
        assert len(reply["content"]) < len(LONG_REPLY * 3)


async def test_two_concurrent_streams_both_land(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        results = await asyncio.gather(*(chat(http, base, f"parallel {i}", conversation_id="cc")
                                         for i in range(2)))
        assert all(status == 200 and frames[-1].event == "done" for status, frames in results)
        _, body = await history(http, base, "cc")
    messages = body["messages"]
    assert len(messages) == 4
    assert sorted(m["content"] for m in messages[::2]) == ["parallel 0", "parallel 1"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert all(m["content"] == REPLY for m in messages[1::2])
    # each reply sits right after its own user turn (same request id)
    for user, reply in zip(messages[::2], messages[1::2], strict=True):
        assert user["request_id"] == reply["request_id"]


async def test_prompt_and_history_together(redis_client, redis_server):
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        async with http.post(f"{base}/v1/prompts/helper/versions", headers=DEV,
                             json={"template": "Help {{name}}."}) as resp:
            assert resp.status == 201
        prompt = {"id": "helper", "variables": {"name": "Ada"}}
        await chat(http, base, "one", conversation_id="pc", prompt=prompt)
        _, frames = await chat(http, base, "two", conversation_id="pc", prompt=prompt)
        assert frames[0].data["prompt_tokens"] == count_messages([
            ("system", "Help Ada."), ("user", "one"), ("assistant", REPLY), ("user", "two")])
        _, body = await history(http, base, "pc")
        assert [m["role"] for m in body["messages"]] == ["user", "assistant"] * 2  # no system


async def test_a_client_that_resends_its_transcript_is_not_doubled(redis_client, redis_server):
    """The browser chat and OpenAI-style clients send the whole transcript every turn."""
    async with running_chain(chain_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        transcript = [{"role": "user", "content": "first"}]
        for turn in ("second", "third"):
            _, frames = await _post(http, base, transcript)
            assert frames[-1].event == "done"
            transcript += [{"role": "assistant", "content": REPLY},
                           {"role": "user", "content": turn}]
        _, frames = await _post(http, base, transcript)
        pairs = [(m["role"], m["content"]) for m in transcript]
        assert frames[0].data["prompt_tokens"] == count_messages(pairs)  # not doubled
        _, body = await history(http, base, "t1")
        assert [(m["role"], m["content"]) for m in body["messages"]] == [
            *pairs, ("assistant", REPLY)]


async def _post(http: aiohttp.ClientSession, base: str, messages: list[dict[str, str]]) -> Any:
    body = {"model": "sim", "messages": messages, "conversation_id": "t1"}
    async with http.post(f"{base}/v1/chat/stream", json=body, headers=DEV) as resp:
        return resp.status, await collect(resp)

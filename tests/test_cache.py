"""The exact response cache (docs/cache.md), through the real chain on a real Redis.

A hit streams the stored reply again with no provider call (counted on a FakeOpenAI upstream)
and no TPM charge (the quota hashes in Redis do not move); only a reply that ended with `stop`
or `length`, passed output moderation and fits `max_bytes` is stored; tenants never share an
entry; `Cache-Control: no-cache` skips the lookup; a term added by a live reload blocks a stored
reply; entries expire; Redis trouble is a miss; every `redis_mode` works.
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
import yaml
from multidict import CIMultiDictProxy
from prometheus_client import REGISTRY

from promptline.client import Finished, PromptlineClient
from promptline.config import CacheConfig, Config, ConfigError, load_config
from promptline.devtools.embedded_redis import EmbeddedRedis, free_port
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.devtools.sse_client import Event, collect, without_comments
from promptline.v1 import common_pb2, prompt_pb2
from services.edge_http.chat_request import cache_bypass
from services.edge_http.relay import CACHE_HEADER as EDGE_CACHE_HEADER
from services.prompt import cache as cache_module
from services.prompt.cache import (
    KEY_PREFIX,
    REPLAY_PIECE_CHARS,
    CachedReply,
    CacheTicket,
    ResponseCache,
    cache_key,
    pieces,
)
from services.prompt.quotas import quota_key
from tests.chain import Chain, running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

DEV = "dev-key"
OTHER = "other-key"
REPLY = ("A cached answer, long enough to come back in several pieces when it is replayed "
         "from the cache, one word after another, as if it were streamed.")
HI = [{"role": "user", "content": "What is a response cache?"}]


# --- helpers -------------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cache_count(model: str, result: str) -> float:
    return sample("promptline_cache_requests_total", model=model, result=result)


def config_for(upstream: FakeOpenAI, model: str, redis: dict[str, Any], *,
               cache: dict[str, Any] | None = None, tenants: list[dict[str, Any]] | None = None,
               **extra: Any) -> Config:
    return make_config({**redis, **({"tenants": tenants} if tenants else {})}, models=[{
        "name": model, "provider": "openai", "base_url": upstream.base_url,
        "cache": cache or {"ttl": "1h"}, **extra}])


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    events: list[Event] = field(default_factory=list)
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta")

    @property
    def done(self) -> dict[str, Any]:
        assert self.events and self.events[-1].event == "done", self.events[-1:]
        data: dict[str, Any] = self.events[-1].data
        return data

    @property
    def cache(self) -> str | None:
        return self.headers.get(EDGE_CACHE_HEADER)


async def chat(chain: Chain, model: str, *, key: str = DEV, headers: dict[str, str] | None = None,
               messages: list[dict[str, str]] | None = None, **body: Any) -> Reply:
    """POST /v1/chat/stream, read to the end."""
    payload = {"model": model, "messages": messages or HI, **body}
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", json=payload,
            headers={"Authorization": f"Bearer {key}", **(headers or {})}) as resp:
        if resp.status != 200:
            return Reply(resp.status, resp.headers, body=await resp.json())
        return Reply(resp.status, resp.headers, without_comments(await collect(resp)))


async def settled(chain: Chain) -> None:
    """Every stream of the prompt service ended and its settlement and cache write are done."""
    await eventually(lambda: sample("promptline_active_streams", service="prompt") == 0
                     and not chain.prompt.servicer.background, what="the streams settling")


async def stored(model: str, before: float) -> None:
    await eventually(lambda: cache_count(model, "store") > before, what="the reply stored")


async def quota_state(redis_url: str, tenant: str, model: str) -> dict[str, dict[bytes, bytes]]:
    client = aioredis.from_url(redis_url)
    try:
        return {f"{scope}:{kind}": await client.hgetall(quota_key(scope, name, kind))
                for scope, name in (("tenant", tenant), ("model", model))
                for kind in ("qpm", "tpm")}
    finally:
        await client.aclose()


# --- the unit rules ------------------------------------------------------------------------------


def test_the_key_covers_tenant_model_messages_and_parameters() -> None:
    config = make_config(models=[{"name": "m", "provider": "simulated", "cache": {"ttl": "1h"}},
                                 {"name": "n", "provider": "simulated", "cache": {"ttl": "1h"}}])
    m, n = config.models[1], config.models[2]
    hello = [common_pb2.ChatMessage(role="user", content="hello")]
    base = cache_key("dev", m, hello, 100, None)
    assert base == cache_key("dev", m, [common_pb2.ChatMessage(role="user", content="hello")],
                             100, None)  # stable: the same request finds it again
    assert base.startswith(f"{KEY_PREFIX}dev|")
    variants = [
        cache_key("other", m, hello, 100, None),
        cache_key("dev", n, hello, 100, None),
        cache_key("dev", m, [common_pb2.ChatMessage(role="user", content="hello!")], 100, None),
        cache_key("dev", m, [common_pb2.ChatMessage(role="system", content="hello")], 100, None),
        cache_key("dev", m, [*hello, *hello], 100, None),
        cache_key("dev", m, hello, 101, None),
        cache_key("dev", m, hello, 100, 0.0),
        cache_key("dev", m, hello, 100, 0.5),
        # the same characters split differently between messages
        cache_key("dev", m, [common_pb2.ChatMessage(role="user", content="hel"),
                             common_pb2.ChatMessage(role="user", content="lo")], 100, None),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # another upstream model behind the same name answers differently: another key
    renamed = make_config(models=[{"name": "m", "provider": "simulated", "cache": {"ttl": "1h"},
                                   "upstream_model": "m-2"}]).models[1]
    assert cache_key("dev", renamed, hello, 100, None) != base


def test_replay_pieces_are_a_stream_of_the_whole_text() -> None:
    parts = list(pieces(REPLY * 3, 97))
    assert len(parts) >= len(REPLY * 3) // REPLAY_PIECE_CHARS
    assert "".join(text for text, _ in parts) == REPLY * 3
    assert sum(tokens for _, tokens in parts) == 97
    assert all(len(text) <= REPLAY_PIECE_CHARS for text, _ in parts)
    assert all(text.endswith(" ") for text, _ in parts[:-1])  # cut after words
    assert list(pieces("", 0)) == []
    assert list(pieces("x" * 130, 3)) == [("x" * 64, 1), ("x" * 64, 1), ("xx", 1)]


def test_only_a_complete_reply_of_the_model_within_the_cap_is_an_entry() -> None:
    ticket = CacheTicket("k", CacheConfig(ttl=60, max_bytes=200), "m")
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    for reason in ("stop", "length"):
        raw = ticket.entry(common_pb2.Done(finish_reason=reason, usage=usage, model="m"), "hi")
        assert raw is not None
        assert CachedReply.decode(raw) == CachedReply("hi", reason, 3, 5, "m")
    assert ticket.entry(common_pb2.Done(finish_reason="content_filter", model="m"), "hi") is None
    assert ticket.entry(common_pb2.Done(finish_reason="stop", model="fallback"), "hi") is None
    size = len(CachedReply("", "stop", 3, 5, "m").encode())
    fits, over = "x" * (200 - size), "x" * (201 - size)
    assert ticket.entry(common_pb2.Done(finish_reason="stop", usage=usage, model="m"), fits)
    assert ticket.entry(common_pb2.Done(finish_reason="stop", usage=usage, model="m"),
                        over) is None


def test_cache_control_no_cache() -> None:
    assert cache_bypass(["no-cache"])
    assert cache_bypass(["max-age=0, No-Cache"])
    assert cache_bypass(["private", "no-cache=\"set-cookie\""])
    assert not cache_bypass([])
    assert not cache_bypass(["no-store", "max-age=0"])
    assert EDGE_CACHE_HEADER == cache_module.HEADER  # the edge passes on what prompt sends


def test_config_names_the_key() -> None:
    def model(cache: Any) -> dict[str, Any]:
        return {"name": "c", "provider": "simulated", "cache": cache}

    assert make_config(models=[model({"ttl": "1h"})]).models[1].cache == CacheConfig(3600.0)
    assert not make_config(models=[model({"ttl": 0})]).models[1].cache.enabled  # type: ignore
    assert make_config().models[0].cache is None  # absent: off
    for bad, message in (({}, "models[1].cache.ttl: required"),
                         ({"ttl": "-1s"}, "models[1].cache.ttl: invalid duration"),
                         ({"ttl": "1h", "max_bytes": 0}, "models[1].cache.max_bytes: must be"),
                         ({"ttl": "1h", "hit_cost_fraction": 1.5},
                          "models[1].cache.hit_cost_fraction: must be at most 1"),
                         ({"ttl": "1h", "size": 3}, "models[1].cache.size: unknown key")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_config(models=[model(bad)])


async def test_a_failing_store_is_a_miss_bounded_in_time() -> None:
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    cache = ResponseCache(dead, timeout=0.25)
    errors = sample("promptline_redis_errors_total", operation="cache_get")
    try:
        began = time.monotonic()
        assert await cache.get(f"{KEY_PREFIX}dev|x", "r1") is None
        await cache.put(f"{KEY_PREFIX}dev|x", b"{}", 60, "m", "r1")  # never raises
        assert time.monotonic() - began < 1.0
        assert sample("promptline_redis_errors_total", operation="cache_get") == errors + 1
        # within the retry window the store is not asked at all: no second timeout
        assert await cache.get(f"{KEY_PREFIX}dev|x", "r2") is None
        assert sample("promptline_redis_errors_total", operation="cache_get") == errors + 1
    finally:
        await dead.aclose()


# --- through the chain ---------------------------------------------------------------------------


async def test_a_hit_replays_the_reply_without_the_provider_or_tpm(redis_server: Any) -> None:
    model, tenant = "gpt-hit", f"hit-{time.time_ns()}"  # quota keys of its own
    quotas = {"qpm": 1000, "tpm": 100_000}
    tenants = [{"name": tenant, "api_keys": [DEV], "quotas": quotas}]
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url}, tenants=tenants,
                            quotas=quotas)
        async with running_chain(config) as chain:
            before = cache_count(model, "store")
            miss = await chat(chain, model)
            assert miss.status == 200 and miss.cache == "miss"
            assert miss.text == REPLY and "cached" not in miss.done
            await stored(model, before)
            await settled(chain)
            calls = upstream.request_count
            quota = await quota_state(redis_server.url, tenant, model)
            tokens = sample("promptline_tokens_total", tenant=tenant, model=model,
                            direction="out")

            hit = await chat(chain, model)
            assert hit.status == 200 and hit.cache == "hit"
            assert hit.text == REPLY
            assert hit.done["cached"] is True
            assert hit.done["usage"] == miss.done["usage"]
            assert hit.done["finish_reason"] == miss.done["finish_reason"] == "stop"
            assert hit.done["model"] == model and "deployment" not in hit.done
            assert "X-Promptline-Deployment" not in hit.headers
            assert len([e for e in hit.events if e.event == "delta"]) >= 1
            assert upstream.request_count == calls  # no provider call
            await settled(chain)
            after = await quota_state(redis_server.url, tenant, model)
            # no TPM charge, nothing on the model's limits; the tenant's QPM counts the request
            assert after["tenant:tpm"] == quota["tenant:tpm"]
            assert after["model:tpm"] == quota["model:tpm"]
            assert after["model:qpm"] == quota["model:qpm"]
            assert after["tenant:qpm"] != quota["tenant:qpm"]
            assert sample("promptline_tokens_total", tenant=tenant, model=model,
                          direction="out") == tokens
            assert hit.headers["x-ratelimit-limit-requests"] == "1000"
            assert cache_count(model, "hit") == 1 and cache_count(model, "miss") == 1


async def test_a_hit_costs_its_fraction_of_the_reply(redis_server: Any) -> None:
    model, tenant = "gpt-priced", f"priced-{time.time_ns()}"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url},
                            tenants=[{"name": tenant, "api_keys": [DEV]}],
                            cache={"ttl": "1h", "hit_cost_fraction": 0.25},
                            price={"input_per_mtok": 3, "output_per_mtok": 15})
        async with running_chain(config) as chain:
            miss = await chat(chain, model)
            await stored(model, 0)
            await settled(chain)
            spent = sample("promptline_cost_usd_total", tenant=tenant, model=model)
            hit = await chat(chain, model)
            await settled(chain)
    full = Decimal(miss.done["usage"]["cost_usd"])
    assert full > 0 and hit.done["cached"] is True
    assert Decimal(hit.done["usage"]["cost_usd"]) == (full / 4).quantize(Decimal("1e-12"),
                                                                           ROUND_HALF_UP)
    assert sample("promptline_cost_usd_total", tenant=tenant, model=model) - spent == \
        pytest.approx(float(full / 4))


async def test_a_hit_over_grpc_is_several_deltas_and_says_cached(redis_server: Any) -> None:
    model = "gpt-grpc"
    async with FakeOpenAI(reply=REPLY * 2) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config, with_edge=False) as chain:
            request = prompt_pb2.StreamChatRequest(model=model, messages=[
                common_pb2.ChatMessage(role="user", content="hello")])
            auth = (("authorization", f"Bearer {DEV}"),)
            before = cache_count(model, "store")
            first = await read_all(chain.prompt_stub.StreamChat(request, metadata=auth,
                                                                timeout=10))
            assert first[-1].HasField("done") and not first[-1].done.cached
            await stored(model, before)
            call = chain.prompt_stub.StreamChat(request, metadata=auth, timeout=10)
            frames = await read_all(call)
            assert dict(await call.initial_metadata())[cache_module.HEADER] == "hit"
    assert frames[0].HasField("start") and frames[0].start.model == model
    assert frames[0].start.prompt_tokens == first[0].start.prompt_tokens
    deltas = [f.delta for f in frames if f.HasField("delta")]
    assert len(deltas) >= 3
    assert "".join(d.text for d in deltas) == REPLY * 2
    done = frames[-1].done
    assert done.cached and done.finish_reason == "stop"
    assert sum(d.tokens for d in deltas) == done.usage.completion_tokens > 0
    assert upstream.request_count == 1


async def test_the_python_client_sees_cached_and_can_bypass(redis_server: Any) -> None:
    model = "gpt-client"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config, with_edge=False) as chain:
            target = f"127.0.0.1:{chain.prompt.port}"
            async with PromptlineClient(target, DEV) as client:
                async def ask(**kw: Any) -> Finished:
                    events = [e async for e in client.stream_chat(model, [("user", "hi")], **kw)]
                    assert isinstance(events[-1], Finished)
                    return events[-1]

                assert not (await ask()).cached
                await stored(model, 0)
                assert (await ask()).cached
                assert not (await ask(no_cache=True)).cached
    assert upstream.request_count == 2


async def test_the_openai_endpoint_says_hit_and_cached(redis_server: Any) -> None:
    model = "gpt-oa"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config) as chain:
            client = openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key=DEV,
                                        max_retries=0)
            before = cache_count(model, "store")
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=HI)  # type: ignore[arg-type]
            assert raw.headers[EDGE_CACHE_HEADER] == "miss"
            assert not (raw.parse().model_extra or {}).get("cached")
            await stored(model, before)

            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=HI)  # type: ignore[arg-type]
            completion = raw.parse()
            assert raw.headers[EDGE_CACHE_HEADER] == "hit"
            assert completion.choices[0].message.content == REPLY
            assert (completion.model_extra or {})["cached"] is True

            stream = await client.chat.completions.with_raw_response.create(
                model=model, messages=HI, stream=True,
                stream_options={"include_usage": True})  # type: ignore[arg-type]
            assert stream.headers[EDGE_CACHE_HEADER] == "hit"
            chunks = [chunk async for chunk in stream.parse()]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
            last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
            assert (last.model_extra or {})["cached"] is True
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
            await client.close()
    assert upstream.request_count == 1  # one fresh reply served all three


async def test_tenants_never_share_an_entry(redis_server: Any,
                                            redis_client: aioredis.Redis) -> None:
    model = "gpt-tenants"
    async with FakeOpenAI(reply="for dev only") as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config) as chain:
            before = cache_count(model, "store")
            assert (await chat(chain, model)).text == "for dev only"
            await stored(model, before)
            upstream.reply = "for the other tenant"
            other = await chat(chain, model, key=OTHER)
            assert other.cache == "miss" and other.text == "for the other tenant"
            assert upstream.request_count == 2
            await stored(model, before + 1)
            mine, theirs = await chat(chain, model), await chat(chain, model, key=OTHER)
            assert (mine.cache, mine.text) == ("hit", "for dev only")
            assert (theirs.cache, theirs.text) == ("hit", "for the other tenant")
            assert upstream.request_count == 2
    assert len([k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}dev|*")]) == 1
    assert len([k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}other|*")]) == 1


async def test_no_cache_skips_the_lookup_and_stores_the_fresh_reply(redis_server: Any) -> None:
    model = "gpt-bypass"
    async with FakeOpenAI(reply="the first reply") as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config) as chain:
            before = cache_count(model, "store")
            await chat(chain, model)
            await stored(model, before)
            upstream.reply = "a fresher reply"
            bypass = await chat(chain, model, headers={"Cache-Control": "max-age=0, no-cache"})
            assert (bypass.cache, bypass.text) == ("miss", "a fresher reply")
            assert "cached" not in bypass.done
            assert upstream.request_count == 2
            assert cache_count(model, "bypass") == 1
            await stored(model, before + 1)
            hit = await chat(chain, model)
            assert (hit.cache, hit.text) == ("hit", "a fresher reply")
            assert upstream.request_count == 2


async def test_only_finished_replies_are_stored(redis_server: Any) -> None:
    model = "gpt-partial"
    long_reply = "word " * 60
    async with FakeOpenAI(reply=long_reply) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config) as chain:
            async def fresh(**body: Any) -> Reply:
                calls = upstream.request_count
                reply = await chat(chain, model, **body)
                await settled(chain)
                assert upstream.request_count == calls + 1, "served from the cache"
                assert reply.cache == "miss"
                return reply

            # a mid-stream error
            upstream.push(fail_after_chunks=3)
            failed = await fresh()
            assert failed.events[-1].event == "error"
            assert failed.events[-1].data["error"]["stage"] == "mid_stream"
            # an output moderation block
            upstream.push(reply="this reply says forbidden-word halfway through")
            blocked = await fresh()
            assert blocked.events[-1].event == "error"
            assert blocked.events[-1].data["error"]["code"] == "MODERATION_BLOCKED"
            # a stream the client cancels
            upstream.push(delay=0.05)
            async with aiohttp.ClientSession() as http, http.post(
                    f"{chain.base_url}/v1/chat/stream", json={"model": model, "messages": HI},
                    headers={"Authorization": f"Bearer {DEV}"}) as resp:
                async for line in resp.content:
                    if line.startswith(b"event: delta"):
                        break
            await upstream.wait_until(lambda: upstream.active_streams == 0)
            await settled(chain)
            assert cache_count(model, "store") == 0
            # none of the three was stored: the next request calls the provider
            whole = await fresh()
            assert whole.text == long_reply and whole.done["finish_reason"] == "stop"
            await stored(model, 0)
            # `length` is a finished reply too
            cut = await fresh(max_tokens=5, messages=[{"role": "user", "content": "short"}])
            assert cut.done["finish_reason"] == "length"
            await stored(model, 1)
            again = await chat(chain, model, max_tokens=5,
                               messages=[{"role": "user", "content": "short"}])
            assert (again.cache, again.text) == ("hit", cut.text)
            assert again.done["finish_reason"] == "length"


async def test_a_fallback_reply_is_not_stored(redis_server: Any) -> None:
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "primary", "provider": "simulated", "fallback": ["sim"],
        "simulated": {"ttft_ms": 0, "fail_after_tokens": 0}, "cache": {"ttl": "1h"}}])
    async with running_chain(config) as chain:
        skipped = cache_count("primary", "skip")
        first = await chat(chain, "primary")
        assert first.done["model"] == "sim" and first.cache == "miss"
        await settled(chain)
        assert cache_count("primary", "skip") == skipped + 1
        assert (await chat(chain, "primary")).cache == "miss"


async def test_a_reply_over_max_bytes_is_not_stored(redis_server: Any) -> None:
    model = "gpt-small"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url},
                            cache={"ttl": "1h", "max_bytes": 200})
        async with running_chain(config) as chain:
            big = await chat(chain, model)
            assert big.text == REPLY and len(CachedReply(REPLY, "stop", 0, 0, model).encode()) > 200
            await settled(chain)
            assert cache_count(model, "skip") == 1 and cache_count(model, "store") == 0
            assert (await chat(chain, model)).cache == "miss"
            upstream.reply = "short"
            small = [{"role": "user", "content": "and briefly?"}]
            await chat(chain, model, messages=small)
            await stored(model, 0)
            assert (await chat(chain, model, messages=small)).cache == "hit"
    assert upstream.request_count == 3


async def test_a_term_added_by_a_reload_blocks_a_stored_reply(redis_server: Any,
                                                              tmp_path: Path) -> None:
    model = "gpt-reload"
    async with FakeOpenAI(reply="Bananas are berries; strawberries are not.") as upstream:
        raw = {**copy.deepcopy(BASE_CONFIG), "redis_url": redis_server.url,
               "models": [*BASE_CONFIG["models"], {"name": model, "provider": "openai",
                                                   "base_url": upstream.base_url,
                                                   "cache": {"ttl": "1h"}}]}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        async with running_chain(load_config(path, env={})) as chain:
            before = cache_count(model, "store")
            assert (await chat(chain, model)).status == 200
            await stored(model, before)
            raw["moderation"] = {"blocked_terms": ["forbidden-word", "bananas"]}
            path.write_text(yaml.safe_dump(raw), encoding="utf-8")
            assert chain.prompt.live.reload()
            blocked = await chat(chain, model)
            assert blocked.status == 400, blocked
            assert blocked.body["error"]["code"] == "MODERATION_BLOCKED"
            assert blocked.body["error"]["stage"] == "first_packet"  # nothing was sent
            assert upstream.request_count == 1
            assert cache_count(model, "hit") == 1


async def test_an_entry_expires_after_its_ttl(redis_server: Any,
                                              redis_client: aioredis.Redis) -> None:
    model = "gpt-ttl"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url},
                            cache={"ttl": "1500ms"})
        async with running_chain(config) as chain:
            await chat(chain, model)
            await stored(model, 0)
            (entry,) = [k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}dev|*")]
            assert 0 < await redis_client.pttl(entry) <= 1500

            async def expired() -> bool:
                return not await redis_client.exists(entry)

            await eventually(expired, within=5, what="the entry expiring")
            assert (await chat(chain, model)).cache == "miss"
            assert upstream.request_count == 2


async def test_a_hit_counts_against_qpm_but_never_meets_tpm(redis_server: Any) -> None:
    model = "gpt-quota"
    tenants = [{"name": f"quota-{time.time_ns()}", "api_keys": [DEV],  # quota keys of its own
                "quotas": {"qpm": 3, "tpm": 400}}]
    async with FakeOpenAI(reply="word " * 200, tokens=200) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url}, tenants=tenants)
        async with running_chain(config) as chain:
            before = cache_count(model, "store")
            assert (await chat(chain, model, max_tokens=250)).status == 200  # request 1
            await stored(model, before)
            await settled(chain)
            # ~215 tokens used: a fresh request's reservation (prompt + 250) is over the 400 TPM
            assert (await chat(chain, model, max_tokens=250)).cache == "hit"  # request 2
            rejected = await chat(chain, model, max_tokens=250, headers={
                "Cache-Control": "no-cache"})
            assert rejected.status == 429, rejected
            assert rejected.body["error"]["code"] == "TPM_EXCEEDED"  # charged nothing
            assert (await chat(chain, model, max_tokens=250)).cache == "hit"  # request 3
            over = await chat(chain, model, max_tokens=250)  # a hit too, but over the QPM
            assert over.status == 429 and over.body["error"]["code"] == "QPM_EXCEEDED"
    assert upstream.request_count == 1


async def test_a_hit_in_a_conversation_is_remembered(redis_server: Any) -> None:
    model = "gpt-conv"
    async with FakeOpenAI(reply=REPLY) as upstream:
        config = config_for(upstream, model, {"redis_url": redis_server.url})
        async with running_chain(config) as chain, aiohttp.ClientSession() as http:
            before = cache_count(model, "store")
            await chat(chain, model, conversation_id="conv-one")
            await stored(model, before)
            hit = await chat(chain, model, conversation_id="conv-two")  # the same first turn
            assert hit.cache == "hit"
            async with http.get(f"{chain.base_url}/v1/conversations/conv-two",
                                headers={"Authorization": f"Bearer {DEV}"}) as resp:
                history = await resp.json()
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", HI[0]["content"]), ("assistant", REPLY)]
    assert upstream.request_count == 1


async def test_redis_trouble_is_a_miss_never_an_error() -> None:
    model = "gpt-down"
    with EmbeddedRedis() as private:
        async with FakeOpenAI(reply=REPLY) as upstream:
            config = config_for(upstream, model, {"redis_url": private.url,
                                                  "quota_policy": {"on_redis_error": "fail_open",
                                                                   "redis_timeout": "200ms"}})
            async with running_chain(config) as chain:
                await chat(chain, model)
                await stored(model, 0)
                private.stop()
                errors = sample("promptline_redis_errors_total", operation="cache_get")
                down = await chat(chain, model)
                assert down.status == 200 and down.cache == "miss" and down.text == REPLY
                assert sample("promptline_redis_errors_total", operation="cache_get") > errors
                assert upstream.request_count == 2


async def test_a_model_without_a_cache_sends_no_header(redis_server: Any) -> None:
    async with running_chain(make_config(redis_url=redis_server.url)) as chain:
        reply = await chat(chain, "sim")
    assert reply.status == 200 and reply.cache is None and "cached" not in reply.done


# --- every redis_mode ----------------------------------------------------------------------------


@pytest.fixture(params=["standalone", "cluster", "sentinel"])
def redis_mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "standalone":
        return {"redis_url": request.getfixturevalue("redis_server").url}
    if request.param == "cluster":
        return {"redis_mode": "cluster", "redis_url": request.getfixturevalue("redis_cluster").url}
    sentinel = request.getfixturevalue("redis_sentinel")
    return {"redis_mode": "sentinel", "redis_sentinel": {
        "master": sentinel.master_name, "nodes": sentinel.sentinels}}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(reply=REPLY) as fake:
        yield fake


async def test_every_redis_mode(redis_mode: dict[str, Any], upstream: FakeOpenAI) -> None:
    # Tenant names unique per run: the shared topologies are never flushed.
    suffix = f"{redis_mode.get('redis_mode', 'standalone')}-{time.time_ns()}"
    model = f"gpt-mode-{suffix}"
    tenants = [{"name": f"a-{suffix}", "api_keys": [DEV]},
               {"name": f"b-{suffix}", "api_keys": [OTHER]}]
    config = config_for(upstream, model, redis_mode, tenants=tenants)
    async with running_chain(config) as chain:
        assert (await chat(chain, model)).cache == "miss"
        await stored(model, 0)
        hit = await chat(chain, model)
        assert (hit.cache, hit.text, hit.done["cached"]) == ("hit", REPLY, True)
        assert (await chat(chain, model, key=OTHER)).cache == "miss"  # per tenant here too
    assert upstream.request_count == 2

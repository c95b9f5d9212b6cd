"""Every Redis user (quotas, prompts, conversations) through the real chain in each `redis_mode`,
against real topologies: one redis-server, a 3-master cluster, a master + replica + 3 sentinels.

The cluster and Sentinel sets are the session's shared ones (`tests/conftest.py`); nothing here
kills a node, so they stay healthy for the next test. Failovers: tests/test_redis_topologies.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from promptline.config import Config, QuotaPolicy
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import connect_redis
from promptline.v1 import common_pb2, prompt_admin_pb2, prompt_admin_pb2_grpc, prompt_pb2
from services.prompt.quotas import QuotaManager, Reservation, quota_key
from tests.chain import running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)


@dataclass
class Mode:
    name: str
    overrides: dict[str, Any]


@pytest.fixture(params=["standalone", "cluster", "sentinel"])
def mode(request: pytest.FixtureRequest) -> Mode:
    if request.param == "standalone":
        return Mode("standalone", {"redis_url": request.getfixturevalue("redis_server").url})
    if request.param == "cluster":
        return Mode("cluster", {"redis_mode": "cluster",
                                "redis_url": request.getfixturevalue("redis_cluster").url})
    sentinel = request.getfixturevalue("redis_sentinel")
    return Mode("sentinel", {"redis_mode": "sentinel", "redis_sentinel": {
        "master": sentinel.master_name, "nodes": sentinel.sentinels}})


def config_for(mode: Mode, suffix: str) -> Config:
    # Tenant and model names unique per test: the shared topologies are never flushed.
    return make_config({**mode.overrides, "tenants": [
        {"name": f"team-{suffix}", "api_keys": ["dev-key"], "admin": True,
         "quotas": {"qpm": 3, "tpm": 100_000}}]})


def chat(text: str, **kw: Any) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model="sim", messages=[common_pb2.ChatMessage(role="user", content=text)], **kw)


async def test_quotas_prompts_and_history_work_in_every_mode(mode: Mode) -> None:
    suffix = f"{mode.name}-{id(mode)}"
    async with running_chain(config_for(mode, suffix), with_edge=False) as chain:
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
        await admin.CreatePromptVersion(prompt_admin_pb2.CreatePromptVersionRequest(
            prompt_id="greet", template="Answer as {{who}}."), metadata=AUTH, timeout=10)
        conversation = f"conv-{suffix}"
        for turn in ("first", "second"):
            frames = await read_all(chain.prompt_stub.StreamChat(chat(
                turn, conversation_id=conversation,
                prompt=prompt_pb2.PromptRef(id="greet", version=1, variables={"who": "a bot"})),
                metadata=AUTH, timeout=10))
            assert frames[-1].HasField("done"), frames[-1]
        history = await admin.GetConversation(prompt_admin_pb2.GetConversationRequest(
            conversation_id=conversation), metadata=AUTH, timeout=10)
        assert [t.content for t in history.turns if t.role == "user"] == ["first", "second"]
        # qpm 3: the third chat was admitted, the fourth is rejected by the shared budget
        frames = await read_all(chain.prompt_stub.StreamChat(chat("third"), metadata=AUTH,
                                                             timeout=10))
        assert frames[-1].HasField("done")
        frames = await read_all(chain.prompt_stub.StreamChat(chat("fourth"), metadata=AUTH,
                                                             timeout=10))
        err = PromptlineError.from_pb(frames[-1].error)
        assert err.code is ErrorCode.QPM_EXCEEDED and err.quota_subject.startswith("tenant:")


async def test_quota_keys_spread_over_the_cluster_shards(redis_cluster: Any) -> None:
    names = [f"spread-{i}-{id(redis_cluster)}" for i in range(12)]
    config = make_config({"redis_mode": "cluster", "redis_url": redis_cluster.url, "tenants": [
        {"name": n, "api_keys": [f"key-{n}"], "quotas": {"qpm": 100}} for n in names]})
    store = connect_redis(config)
    try:
        assert isinstance(store.client, RedisCluster)
        manager = QuotaManager(store.client, QuotaPolicy())
        for tenant in config.tenants:
            await manager.admit(tenant, config.models[0], 10, "r")
        shards = {redis_cluster.master_for_slot(key_slot(quota_key("tenant", n, "qpm").encode()))
                  for n in names}
        assert len(shards) == 3  # a dozen tenants' admissions land on every master
    finally:
        await store.close()


async def test_no_overshoot_from_two_replicas_on_a_cluster(redis_cluster: Any) -> None:
    name = f"burst-{id(redis_cluster)}"
    config = make_config({"redis_mode": "cluster", "redis_url": redis_cluster.url, "tenants": [
        {"name": name, "api_keys": ["burst-key"], "quotas": {"tpm": 10_000}}]}, models=[
        {"name": f"m-{name}", "provider": "simulated", "quotas": {"qpm": 1_000}}])
    tenant, model = config.tenants[0], config.models[-1]
    stores = [connect_redis(config), connect_redis(config)]  # two prompt-service replicas
    try:
        for store in stores:
            await store.connect()  # as the prompt service does at start
        replicas = [QuotaManager(s.client, QuotaPolicy(redis_timeout=2.0)) for s in stores]

        async def one(i: int) -> Reservation | PromptlineError:
            try:
                return await replicas[i % 2].admit(tenant, model, 1_000, f"req-{i}")
            except PromptlineError as err:
                return err

        results = await asyncio.gather(*(one(i) for i in range(100)))
        admitted = [r for r in results if isinstance(r, Reservation)]
        assert len(admitted) == 10  # 10 x 1,000 of a 10,000 TPM: never one more
        assert {r.code for r in results if isinstance(r, PromptlineError)} == {
            ErrorCode.TPM_EXCEEDED}
        # all-or-nothing across the two slots: the model counted only the admitted requests
        model_qpm = await stores[0].client.hget(quota_key("model", model.name, "qpm"), "c")
        assert int(model_qpm) == 10
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
async def sentinel_store(redis_sentinel: Any) -> AsyncIterator[Any]:
    config = make_config({"redis_mode": "sentinel", "redis_sentinel": {
        "master": redis_sentinel.master_name, "nodes": redis_sentinel.sentinels}})
    store = connect_redis(config)
    try:
        yield store
    finally:
        await store.close()


async def test_sentinel_mode_writes_to_the_master(sentinel_store: Any, redis_sentinel: Any
                                                  ) -> None:
    await sentinel_store.client.set("pl:test:sentinel", "found-through-sentinels")
    master = aioredis.from_url(f"redis://{redis_sentinel.master_address}/0")
    try:
        assert await master.get("pl:test:sentinel") == b"found-through-sentinels"
        assert (await master.info("replication"))["role"] == "master"
    finally:
        await master.aclose()


async def test_a_burst_beyond_redis_pys_default_pool_is_served(mode: Mode) -> None:
    # redis-py's default pool (100 connections) raised MaxConnectionsError here: 150 concurrent
    # admissions are 300 scripts in flight.
    name = f"burst150-{mode.name}-{id(mode)}"
    config = make_config({**mode.overrides, "tenants": [
        {"name": name, "api_keys": ["burst-150"], "quotas": {"qpm": 10_000}}]}, models=[
        {"name": f"m-{name}", "provider": "simulated", "quotas": {"qpm": 10_000}}])
    store = connect_redis(config)
    await store.connect()
    try:
        manager = QuotaManager(store.client, QuotaPolicy(redis_timeout=5.0))
        results = await asyncio.gather(*(manager.admit(config.tenants[0], config.models[-1], 1,
                                                       f"r{i}") for i in range(150)),
                                       return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
    finally:
        await store.close()

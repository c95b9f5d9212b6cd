"""Shared fixtures: a private redis-server for the whole session, config builders."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from promptline.config import Config, parse_config
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.redis_topologies import LocalRedisCluster, LocalRedisSentinel

BASE_CONFIG: dict[str, Any] = {
    "tenants": [
        {"name": "dev", "api_keys": ["dev-key"], "admin": True},
        {"name": "other", "api_keys": ["other-key"]},
    ],
    "models": [
        {
            "name": "sim",
            "provider": "simulated",
            "simulated": {"ttft_ms": 5, "tokens_per_second": 2000,
                          "reply": "Hello from the simulated model, streaming token by token."},
            "timeouts": {"first_token": "10s", "idle": "10s", "total": "30s"},
            # frame by frame, as most tests count frames; tests/test_shaping.py shapes
            "stream": {"coalesce_ms": 0},
        },
    ],
    "moderation": {"blocked_terms": ["forbidden-word"]},
    "edge": {"heartbeat": "15s", "header_hold": "3s"},
    "retries": {"max_attempts": 2, "backoff_base": "10ms", "backoff_max": "50ms"},
    "shutdown_grace": "1s",
    # port 0: every test chain gets its own metrics ports
    "listen": {"prompt_metrics": "127.0.0.1:0", "llm_engine_metrics": "127.0.0.1:0"},
}


def make_config(overrides: dict[str, Any] | None = None, *, redis_url: str | None = None,
                models: list[dict[str, Any]] | None = None) -> Config:
    """A validated Config from BASE_CONFIG with top-level keys replaced and models appended."""
    raw = copy.deepcopy(BASE_CONFIG)
    raw.update(copy.deepcopy(overrides or {}))
    if models:
        raw["models"] = raw["models"] + copy.deepcopy(models)
    if redis_url:
        raw["redis_url"] = redis_url
    return parse_config(raw, env={})


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server per test session, on a free port; never a shared instance."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """One local Redis Cluster (3 masters, 3 replicas) per session, started when a test first
    asks. Shared: use unique keys and leave its nodes alive (failover tests start their own)."""
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalRedisSentinel]:
    """One local Sentinel set (master, replica, 3 sentinels) per session, started when a test
    first asks. Shared: use unique keys and leave its master alive (failover tests start their
    own)."""
    with LocalRedisSentinel() as sentinel:
        yield sentinel


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client per test module, for the chain's edge (a module may define its own)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=False)
    await client.flushdb()  # our private server only
    try:
        yield client
    finally:
        await client.aclose()

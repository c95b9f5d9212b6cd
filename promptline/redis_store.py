"""The one Redis client of a process, for the configured `redis_mode`; no other module knows it.

- standalone: `redis_url`.
- cluster: redis-py's `RedisCluster`, which discovers the other nodes from the one in
  `redis_url` and follows MOVED/ASK redirections and failovers.
- sentinel: a master connection managed by redis-py's `Sentinel`, which asks the sentinels for
  the master and asks again after a failover; password, database and TLS come from
  `redis_url` when one is given.

Every user keeps each multi-key call inside one hash slot (hash tags), so the three modes behave
the same to them. Socket timeouts are a backstop: each caller bounds its own waits (quotas:
`quota_policy.redis_timeout`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.connection import SSLConnection, parse_url
from redis.exceptions import RedisError

from promptline.config import Config, ConfigError, split_address

SOCKET_TIMEOUT = 1.0
"""Seconds; longer than any caller's own bound, so a dead socket cannot hang a request."""

MAX_CONNECTIONS = 10_000
"""Connections per Redis node. redis-py's default pool (100) raises MaxConnectionsError as soon
as 100 commands are in flight, which 50 concurrent admissions (two scripts each) and their
settlements reach."""

RedisClient = aioredis.Redis | RedisCluster
"""What the stores (quotas, prompts, conversations) are given: both speak the same commands."""

STORE_ERRORS = (RedisError, TimeoutError, OSError)
"""What a Redis call raises when the store is down, slow or failing over."""

T = TypeVar("T")


def is_store_failure(exc: BaseException) -> bool:
    """The store failed: a Redis error, a timeout, a socket error, or any other exception raised
    inside redis-py itself. Its cluster client, mid-failover, has raised AttributeError on a
    connection another coroutine closed: still "the store is unavailable", never INTERNAL."""
    if isinstance(exc, STORE_ERRORS):
        return True
    if not isinstance(exc, Exception) or exc.__traceback__ is None:
        return False
    frame = exc.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return str(frame.tb_frame.f_globals.get("__name__", "")).partition(".")[0] == "redis"


async def store_call(call: Awaitable[T]) -> T:
    """Await a Redis call; any store failure (`is_store_failure`) is raised as a RedisError, so
    callers catch `STORE_ERRORS` alone."""
    try:
        return await call
    except STORE_ERRORS:
        raise
    except Exception as exc:
        if not is_store_failure(exc):
            raise
        raise RedisError(f"redis client failed: {type(exc).__name__}") from exc


@dataclass
class RedisStore:
    """The process's client, and what else must close with it (a Sentinel's own connections)."""

    client: RedisClient
    mode: str
    _sentinel: Sentinel | None = field(default=None, repr=False)

    async def connect(self) -> None:
        """Learn a cluster's slots before the first burst of requests: redis-py's cluster
        client, first used by many coroutines at once, closes connections others are using
        when the slots it learns move them. Other modes connect on first use."""
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for connection in self._sentinel.sentinels:
                await connection.aclose()


def connect_redis(config: Config) -> RedisStore:
    """The client for `config.redis_mode`; it connects on first use."""
    timeouts: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT,
                                "socket_connect_timeout": SOCKET_TIMEOUT,
                                "max_connections": MAX_CONNECTIONS}
    if config.redis_mode == "sentinel":
        return _sentinel_store(config, timeouts)
    if config.redis_url is None:
        raise ConfigError("redis_url: required by the prompt service (make run starts a local "
                          "Redis when the config has none)")
    if config.redis_mode == "cluster":
        cluster = RedisCluster.from_url(config.redis_url, **timeouts)
        return RedisStore(cluster, "cluster")
    return RedisStore(aioredis.from_url(config.redis_url, **timeouts), "standalone")


def _sentinel_store(config: Config, timeouts: dict[str, Any]) -> RedisStore:
    options = parse_url(config.redis_url) if config.redis_url else {}
    tls = options.get("connection_class") is SSLConnection
    kept = {k: options[k] for k in ("username", "password", "db") if options.get(k) is not None}
    probes = {k: v for k, v in timeouts.items() if k != "max_connections"}
    sentinel = Sentinel([split_address(node) for node in config.redis_sentinel.nodes],
                        sentinel_kwargs=probes, **probes)
    master = sentinel.master_for(config.redis_sentinel.master, **timeouts, **kept, ssl=tls)
    return RedisStore(master, "sentinel", sentinel)

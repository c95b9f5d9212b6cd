"""The one Redis client of a process, for the configured `redis_mode`; no other module knows it.

- standalone: `redis_url`.
- cluster: redis-py's `RedisCluster`, which discovers the other nodes from the one in
  `redis_url` and follows MOVED/ASK redirections and failovers.
- sentinel: a master connection managed by redis-py's `Sentinel`, which asks the sentinels for
  the master and asks again after a failover; password, database and TLS come from
  `redis_url` when one is given. The sentinels' own password is `redis_sentinel.password`, and
  `redis_sentinel.tls` has them reached over TLS with the same `ssl_*` settings.

Passwords: in `redis_url` in every mode (`rediss://user:pass@host:port/0`). TLS: `rediss://`,
with `redis_url`'s query arguments `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
`ssl_cert_reqs` and `ssl_check_hostname` (`TLS_ARGS`) applied the same way in every mode; they
are checked here, at start, so a bad one stops the service with its name rather than failing
every request later.

Every user keeps each multi-key call inside one hash slot (hash tags), so the three modes behave
the same to them. Socket timeouts are a backstop: each caller bounds its own waits (quotas:
`quota_policy.redis_timeout`).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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

TLS_ARGS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
            "ssl_check_hostname")
"""The `redis_url` query arguments for TLS, each passed to redis-py under the same name."""

_CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

STORE_RETRY_S = 1.0
"""After a failed call a Redis user skips the store this long, so a hung Redis costs one
timeout a second instead of one per request; the next call finds it back."""

STORE_ERRORS = (RedisError, TimeoutError, OSError)
"""What a Redis call raises when the store is down, slow or failing over."""

T = TypeVar("T")


def reply_text(value: bytes | str) -> str:
    """A Redis reply as text: clients made without `decode_responses` give bytes."""
    return value.decode() if isinstance(value, bytes) else value


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


class StoreOutage:
    """The rule every Redis user shares while the store fails: after a failed call it is skipped
    for STORE_RETRY_S, and the outage is logged once when it begins and once when it ends. Each
    user keeps one, with its own words (`lost` has one `%s`: the failure's name)."""

    __slots__ = ("_down", "_retry_at", "back", "log", "lost")

    def __init__(self, logger: logging.Logger, lost: str, back: str) -> None:
        self.log = logger
        self.lost = lost
        self.back = back
        self._down = False
        self._retry_at = 0.0

    def skipping(self) -> bool:
        """The store failed a moment ago: do not call it."""
        return time.monotonic() < self._retry_at

    def failed(self, exc: BaseException | None, request_id: str = "",
               lost: str | None = None) -> bool:
        """A call failed (`exc`) or was skipped (None); True when this begins an outage (then
        logged, with `lost` instead of the usual words when given)."""
        if exc is not None:
            self._retry_at = time.monotonic() + STORE_RETRY_S
        if self._down:
            return False
        self._down = True
        self.log.warning(lost or self.lost, type(exc).__name__ if exc else "skipped",
                         extra={"request_id": request_id} if request_id else None)
        return True

    def answered(self) -> bool:
        """The store answered; True when that ends an outage (then logged). Calls stop being
        skipped at once: a stall that timed out its neighbours is no outage once one answers."""
        self._retry_at = 0.0
        if not self._down:
            return False
        self._down = False
        self.log.warning(self.back)
        return True


@dataclass
class RedisStore:
    """The process's client, and what else must close with it (a Sentinel's own connections)."""

    client: RedisClient
    mode: str
    _sentinel: Sentinel | None = field(default=None, repr=False)

    async def connect(self) -> None:
        """Learn a cluster's slots before the first burst of requests: redis-py's cluster
        client, first used by many coroutines at once, closes connections others are using
        when the slots it learns move them. Other modes connect on first use. A failure is
        raised as a store error: its "cannot be connected" is no RedisError."""
        if isinstance(self.client, RedisCluster):
            await store_call(self.client.initialize())

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for connection in self._sentinel.sentinels:
                await connection.aclose()


def connect_redis(config: Config) -> RedisStore:
    """The client for `config.redis_mode`; it connects on first use. A bad TLS setting in
    `redis_url` raises ConfigError here."""
    timeouts: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT,
                                "socket_connect_timeout": SOCKET_TIMEOUT,
                                "max_connections": MAX_CONNECTIONS}
    url, tls = _split_tls_args(config.redis_url) if config.redis_url else (None, {})
    if config.redis_mode == "sentinel":
        return _sentinel_store(config, url, tls, timeouts)
    if url is None:
        raise ConfigError("redis_url: required by the prompt service (make run starts a local "
                          "Redis when the config has none)")
    _require_tls_scheme(url, tls)
    if config.redis_mode == "cluster":
        cluster = RedisCluster.from_url(url, **timeouts, **tls)
        return RedisStore(cluster, "cluster")
    return RedisStore(aioredis.from_url(url, **timeouts, **tls), "standalone")


def _sentinel_store(config: Config, url: str | None, tls: dict[str, Any],
                    timeouts: dict[str, Any]) -> RedisStore:
    options = parse_url(url) if url else {}
    master_tls = options.get("connection_class") is SSLConnection
    if url is not None and not config.redis_sentinel.tls:
        _require_tls_scheme(url, tls)  # else they may be for the sentinels alone
    kept = {k: options[k] for k in ("username", "password", "db") if options.get(k) is not None}
    probes = {k: v for k, v in timeouts.items() if k != "max_connections"}
    to_sentinels = dict(probes)
    if config.redis_sentinel.password is not None:
        to_sentinels["password"] = config.redis_sentinel.password
    if config.redis_sentinel.tls:
        to_sentinels.update(ssl=True, **tls)
    sentinel = Sentinel([split_address(node) for node in config.redis_sentinel.nodes],
                        sentinel_kwargs=to_sentinels, **probes)
    master = sentinel.master_for(config.redis_sentinel.master, **timeouts, **kept,
                                 ssl=master_tls, **(tls if master_tls else {}))
    return RedisStore(master, "sentinel", sentinel)


def _split_tls_args(url: str) -> tuple[str, dict[str, Any]]:
    """`url` without its `ssl_*` query arguments, and those arguments checked and typed as
    redis-py takes them. Raises ConfigError naming the argument; never shows the URL (it may
    hold a password)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(name.startswith("ssl_") for name, _ in query):
        return url, {}
    tls: dict[str, Any] = {}
    for name, value in query:
        if not name.startswith("ssl_"):
            continue
        where = f"redis_url: query argument {name}"
        if name not in TLS_ARGS:
            raise ConfigError(f"{where}: unknown (TLS takes {', '.join(TLS_ARGS)})")
        tls[name] = _tls_value(name, value, where)
    if "ssl_keyfile" in tls and "ssl_certfile" not in tls:
        raise ConfigError("redis_url: query argument ssl_keyfile: needs ssl_certfile")
    _check_files(tls)
    rest = urlencode([(k, v) for k, v in query if not k.startswith("ssl_")])
    return urlunsplit(parts._replace(query=rest)), tls


def _tls_value(name: str, value: str, where: str) -> Any:
    if name == "ssl_cert_reqs":
        if value not in _CERT_REQS:
            raise ConfigError(f"{where}: must be one of {', '.join(_CERT_REQS)}, got {value!r}")
        return value
    if name == "ssl_check_hostname":
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return _BOOLEANS[value.lower()]
    if not value:
        raise ConfigError(f"{where}: must be a file path")
    return value


def _check_files(tls: dict[str, Any]) -> None:
    """Load the CA and the client certificate once, now: a missing or bad file is a startup
    error, not a failure of every connection."""
    context = ssl.create_default_context()
    name = ""
    try:
        if "ssl_ca_certs" in tls:
            name = "ssl_ca_certs"
            context.load_verify_locations(cafile=tls[name])
        if "ssl_certfile" in tls:
            name = "ssl_certfile"
            context.load_cert_chain(tls[name], tls.get("ssl_keyfile"))
    except OSError as exc:  # ssl.SSLError too: not PEM, or a key that does not match
        raise ConfigError(f"redis_url: query argument {name}: cannot load {tls[name]!r} "
                          f"({exc.strerror or exc})") from None


def _require_tls_scheme(url: str, tls: dict[str, Any]) -> None:
    if tls and not url.startswith("rediss://"):
        raise ConfigError(f"redis_url: query argument {next(iter(tls))}: applies to rediss:// "
                          "only")

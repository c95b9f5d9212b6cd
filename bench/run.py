"""The load generator: concurrent streams through the whole chain, next to the same load sent
direct to the upstream.

    python -m bench.run --quick --baseline bench/baseline.json   # `make bench`, ~45 s
    python -m bench.run                 # the issue's loads, ~2-4 minutes
    python -m bench.run --litellm .venv-litellm/bin/litellm --portkey bench/portkey --unshaped
                                        # `make bench-compare`: + LiteLLM and Portkey, ratios

With `--baseline`, the run's figures are compared with that file (bench/baseline.py says how)
and the run fails when one is worse beyond the tolerance; `--update-baseline` makes this run the
new baseline instead (`make bench-baseline`).

Processes (each separate, so /proc gives each one's CPU and memory and the load generator's
own CPU is excluded): an embedded Redis, the upstream (`promptline.devtools.fake_openai`, the
tests' OpenAI-compatible fake, whose reply shape is chosen by the model name), and llm_engine,
prompt and edge_http with a generated config, all on free 127.0.0.1 ports; the bench reaches
them over their public wire only (HTTP, gRPC, /metrics, /proc). The load generator is this
process (one aiohttp ClientSession); its CPU is measured and reported, and it competes with the
services for the same cores.

Scenarios, each run with every load: `direct` (the upstream alone, the baseline), `sse-sim`
(POST /v1/chat/stream, simulated provider), `sse-up` (POST /v1/chat/stream, the upstream),
`openai-up` (POST /v1/chat/completions at the edge, the upstream; skipped if the edge answers
404); with --unshaped, `sse-up-noshape` and `openai-up-noshape` (the same with `stream:
{coalesce_ms: 0}` on the bench models: chunk shaping off; the others keep the config's default);
with --resume-off, `sse-up-noresume` (no stream journal: `resume: {ttl: 0}`); with --ref,
`sse-up-ref` and `openai-up-ref` (the same two paths served by another commit's
services, e.g. the one before chunk shaping, in the same run); the peers, same upstream, same
client, same loads: with --litellm, `litellm` (the LiteLLM proxy), with --portkey, `portkey`
(the Portkey gateway under node, bench/portkey/). The chain is restarted for each scenario so
memory figures start from a fresh idle process.

The bench tenant is a realistic one (qpm/tpm quotas high enough never to reject, so every
request makes its quota round trips to Redis, one blocked moderation term that neither the
prompt nor the reply contains, and a spending budget that never runs out on models with prices,
so every stream reserves, settles and records its cost); `--plain-tenant` drops all three. A
`--ref` checkout older than prices gets the same config without them.

Everything is bounded: per-stream and per-load timeouts, and a watchdog that kills every child
and exits after --hard-timeout seconds whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import baseline
from bench.client import OPENAI, SSE, StreamResult, request_body, run_stream
from bench.report import evaluate_peer_targets, evaluate_targets, markdown, peer_ratios
from bench.stats import ms, percentile
from promptline.devtools import procstat
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.fake_openai import model_name, reply_text
from promptline.tokens import count_tokens

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("llm_engine", "prompt", "edge_http")  # start order
UPSTREAM_MODULE = "promptline.devtools.fake_openai"
API_KEY = "bench-key"
TENANT_QUOTAS = {"qpm": 10_000_000, "tpm": 10_000_000_000}
"""The realistic tenant's quotas: far above anything a bench run sends, so never a rejection."""
BLOCKED_TERM = "project nightingale"
"""The realistic tenant's one blocked moderation term (in neither the prompt nor the reply)."""
PRICE = {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}
"""The bench models' price (a small model's) for the realistic tenant."""
TENANT_BUDGET = {"usd": 1_000_000, "period": "month"}
"""The realistic tenant's budget: the largest the config accepts, never exhausted by a bench."""
PORTKEY_DIR = ROOT / "bench" / "portkey"
PORTKEY_START = Path("node_modules", "@portkey-ai", "gateway", "build", "start-server.js")
PORTKEY_LOOPBACK = PORTKEY_DIR / "loopback.mjs"
TREE_RSS = frozenset({"litellm"})
"""Targets whose memory is their whole process tree (LiteLLM may fork workers); the others are
one process each (our services, node), read from /proc/<pid>/status."""
SAMPLE_INTERVAL = 0.1
STREAM_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    concurrency: int
    tokens: int
    delay_ms: int
    streams: int
    """Streams in the load (closed loop: `concurrency` workers, each starting its next stream
    when its previous one ended)."""
    ramp_s: float = 0.0
    """Workers start spread evenly over this many seconds."""
    timeout_s: float = 120.0
    prompt_bytes: int = 0
    """The user message padded to this many bytes (0: one short sentence)."""


LOADS = {
    "c1": Load("c1", 1, 200, 0, streams=60),
    "c50": Load("c50", 50, 200, 0, streams=200),
    "c200": Load("c200", 200, 200, 20, streams=200, ramp_s=1.0),
}
QUICK_STREAMS = {"c1": 15, "c50": 50, "c200": 200}


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    label: str
    kind: str
    """SSE or OPENAI wire format."""
    provider: str
    """"sim" or "up": which model family the requests name."""
    chain: bool = True
    coalesce_ms: int | None = None
    """`models[].stream.coalesce_ms` of the bench models; None: the config's default."""
    ref: bool = False
    """Served by the --ref checkout's services instead of this one's."""
    journal: bool = True
    """False: `resume: {ttl: 0}`, no stream journal (the resume-off side of `--resume-off`)."""


SCENARIOS = (
    Scenario("direct", "direct to upstream (baseline)", OPENAI, "up", chain=False),
    Scenario("sse-sim", "edge /v1/chat/stream -> simulated", SSE, "sim"),
    Scenario("sse-up", "edge /v1/chat/stream -> upstream", SSE, "up"),
    Scenario("openai-up", "edge /v1/chat/completions -> upstream", OPENAI, "up"),
)
UNSHAPED = (
    Scenario("sse-up-noshape", "edge /v1/chat/stream -> upstream, coalesce_ms 0", SSE, "up",
             coalesce_ms=0),
    Scenario("openai-up-noshape", "edge /v1/chat/completions -> upstream, coalesce_ms 0", OPENAI,
             "up", coalesce_ms=0),
)
NO_RESUME = (
    Scenario("sse-up-noresume", "edge /v1/chat/stream -> upstream, resume.ttl 0 (no journal)",
             SSE, "up", journal=False),
)
REFERENCE = (
    Scenario("sse-up-ref", "--ref checkout: edge /v1/chat/stream -> upstream", SSE, "up",
             ref=True),
    Scenario("openai-up-ref", "--ref checkout: edge /v1/chat/completions -> upstream", OPENAI,
             "up", ref=True),
)
LITELLM = Scenario("litellm", "LiteLLM proxy -> upstream", OPENAI, "up", chain=False)
PORTKEY = Scenario("portkey", "Portkey gateway (node) -> upstream", OPENAI, "up", chain=False)
PEERS = (LITELLM, PORTKEY)


def chain_scenarios(unshaped: bool, ref: bool, resume_off: bool = False) -> list[Scenario]:
    """The scenarios of a run, in order: each unshaped, resume-off and reference variant next to
    its default scenario, so the ones compared run close together in time."""
    out = []
    for sc in SCENARIOS:
        out.append(sc)
        out += [v for v in UNSHAPED if unshaped and v.key == f"{sc.key}-noshape"]
        out += [v for v in NO_RESUME if resume_off and v.key == f"{sc.key}-noresume"]
        out += [v for v in REFERENCE if ref and v.key == f"{sc.key}-ref"]
    return out


def sim_name(tokens: int, delay_ms: int) -> str:
    return f"sim-{tokens}x{delay_ms}ms"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cores": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kib / 2**20, 1),
            "python": sys.version.split()[0], "clk_tck": procstat.CLK_TCK}


# --- the stack ---------------------------------------------------------------------------------


class Stack:
    """Redis, the upstream and (per scenario) the three services; `close()` ends them all."""

    def __init__(self, workdir: Path, loads: list[Load], root: Path = ROOT,
                 own_sessions: bool = True) -> None:
        self.workdir = workdir
        self.own_sessions = own_sessions
        """False: every process stays in the bench's session (`--one-session`)."""
        self.root = root
        """The checkout whose services run (another one compares before/after a change)."""
        self.loads = loads
        self.redis: EmbeddedRedis | None = None
        self.upstream: procstat.Child | None = None
        self.upstream_port = 0
        self.services: dict[str, procstat.Child] = {}
        self.metrics_urls: dict[str, str] = {}
        """/metrics of each service of the running chain (for its GC pauses)."""
        self.ports: dict[str, int] = {}
        """The listen port of each service of the running chain."""
        self.edge_port = 0
        self.litellm: procstat.Child | None = None
        self.litellm_port = 0
        self.litellm_key = ""
        self.portkey: procstat.Child | None = None
        self.portkey_port = 0
        self.ref_root: Path | None = None
        """The --ref checkout whose services serve the `-ref` scenarios."""
        self.plain_tenant = False
        """No quotas and no moderation term (`--plain-tenant`)."""
        self.pool = 0
        """Deployments of each upstream model, all at the bench upstream (`--pool`); 0: none."""
        self.env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
        for var in list(self.env):  # the generated config is the whole truth
            if var.startswith("PROMPTLINE_"):
                del self.env[var]
        self._lock = threading.Lock()

    def children(self) -> list[procstat.Child]:
        out = [*self.services.values()]
        for extra in (self.upstream, self.litellm, self.portkey):
            if extra is not None:
                out.append(extra)
        return out

    def start_base(self) -> None:
        self.redis = EmbeddedRedis().start()
        self.upstream_port = procstat.free_port()
        self.upstream = procstat.Child(
            "upstream", [sys.executable, "-m", UPSTREAM_MODULE, "--port",
                         str(self.upstream_port)],
            env={**self.env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
            log_path=self.workdir / "upstream.log", own_session=self.own_sessions)
        procstat.wait_port(self.upstream_port, self.upstream.proc, "bench upstream", 20)

    @property
    def redis_pid(self) -> int | None:
        proc = getattr(self.redis, "_proc", None)
        return proc.pid if proc is not None else None

    def config(self, ports: dict[str, int], coalesce_ms: int | None = None) -> dict[str, Any]:
        """The services' config; `coalesce_ms` (not None) is set on every bench model."""
        timeouts = {"first_token": "60s", "idle": "30s", "total": "5m"}
        shaping = {} if coalesce_ms is None else {"stream": {"coalesce_ms": coalesce_ms}}
        models: list[dict[str, Any]] = []
        seen: set[str] = set()
        for load in self.loads:
            sim, up = sim_name(load.tokens, load.delay_ms), model_name(load.tokens, load.delay_ms)
            if sim in seen:
                continue
            seen.add(sim)
            tps = 1000.0 / load.delay_ms if load.delay_ms else 0
            models.append({"name": sim, "provider": "simulated", "timeouts": timeouts,
                           "context_window": 65536, "max_tokens": load.tokens,
                           "simulated": {"ttft_ms": 0, "tokens_per_second": tps,
                                         "reply": reply_text(load.tokens)}, **shaping})
            upstream = f"http://127.0.0.1:{self.upstream_port}/v1"
            pool = ({"deployments": [{"name": f"d{i}", "base_url": upstream}
                                     for i in range(self.pool)]} if self.pool
                    else {"base_url": upstream})
            models.append({"name": up, "provider": "openai", "timeouts": timeouts,
                           "context_window": 65536, "max_tokens": load.tokens, **pool,
                           **shaping})
        tenant: dict[str, Any] = {"name": "bench", "api_keys": [API_KEY]}
        extra: dict[str, Any] = {}
        if not self.plain_tenant:
            tenant["quotas"] = dict(TENANT_QUOTAS)
            tenant["budget"] = dict(TENANT_BUDGET)
            extra["moderation"] = {"blocked_terms": [BLOCKED_TERM]}
            for model in models:
                model["price"] = dict(PRICE)
        return {
            "redis_url": self.redis.url if self.redis else None,
            "listen": {name: f"127.0.0.1:{port}" for name, port in ports.items()},
            "tenants": [tenant],
            **extra,
            "models": models,
            "retries": {"max_attempts": 1},
            "shutdown_grace": "1s",
            "log_level": "INFO",
        }

    def start_chain(self, tag: str, services: tuple[str, ...] = SERVICES,
                    coalesce_ms: int | None = None, root: Path | None = None,
                    journal: bool = True) -> None:
        """Start `services` (in SERVICES' order) with a generated config, from `root` (default:
        the stack's checkout); RuntimeError naming the one that did not come up."""
        root = root or self.root
        ports = {name: procstat.free_port() for name in SERVICES}
        config = self.config(ports, coalesce_ms)
        # Checkouts that serve /metrics on their own ports get free ones too, so a bench never
        # collides with a `make run`, a test or the other side of `bench-ab` on the defaults
        # (older configs reject the keys).
        source = ""
        for path in (root / "promptline").glob("**/*.py"):
            with contextlib.suppress(OSError):
                source += path.read_text()
        for key in ("prompt_metrics", "llm_engine_metrics"):
            if key in source:
                config["listen"][key] = f"127.0.0.1:{procstat.free_port()}"
        if not journal:
            config["resume"] = {"ttl": 0}
        if "class ResumeConfig" not in source:  # a checkout from before resumable streams
            config.pop("resume", None)
        if "class Price" not in source:  # a checkout from before prices and budgets
            config["tenants"][0].pop("budget", None)
            for model in config["models"]:
                model.pop("price", None)
        self.metrics_urls = {"edge_http": f"http://{config['listen']['edge_http']}/metrics"}
        for name, key in (("prompt", "prompt_metrics"), ("llm_engine", "llm_engine_metrics")):
            if key in config["listen"]:
                self.metrics_urls[name] = f"http://{config['listen'][key]}/metrics"
        cfg_path = self.workdir / f"config-{tag}.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**self.env, "PROMPTLINE_CONFIG": str(cfg_path), "PYTHONPATH": str(root)}
        self.ports = {name: ports[name] for name in services}
        for name in (n for n in SERVICES if n in services):
            child = procstat.Child(name, [sys.executable, "-m", f"services.{name}"], env=env,
                                   cwd=str(root),
                                   log_path=self.workdir / f"{tag}-{name}.log",
                                   own_session=self.own_sessions)
            self.services[name] = child
            try:
                procstat.wait_port(ports[name], child.proc, name, 30)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n--- {name} log ---\n{child.tail()}") from None
        if "edge_http" not in services:
            self.check_chain()
            return
        self.edge_port = ports["edge_http"]
        deadline = time.monotonic() + 20
        while not _http_ok(f"http://127.0.0.1:{self.edge_port}/readyz"):
            if time.monotonic() > deadline:
                raise RuntimeError("the edge did not become ready within 20s")
            time.sleep(0.1)
        time.sleep(0.3)
        self.check_chain()

    def check_chain(self) -> None:
        """RuntimeError naming any service that died (e.g. a port of its own already in use)."""
        for name, child in self.services.items():
            if not child.alive():
                raise RuntimeError(f"{name} exited with code {child.proc.returncode}\n"
                                   f"--- {name} log ---\n{child.tail()}")

    def stop_chain(self) -> None:
        for name in reversed(SERVICES):
            child = self.services.pop(name, None)
            if child is not None:
                child.stop(grace=5)

    def start_litellm(self, binary: str) -> None:
        self.litellm_port = procstat.free_port()
        model_list = []
        seen: set[str] = set()
        for load in self.loads:
            up = model_name(load.tokens, load.delay_ms)
            if up in seen:
                continue
            seen.add(up)
            model_list.append({"model_name": up, "litellm_params": {
                "model": f"openai/{up}", "api_base": f"http://127.0.0.1:{self.upstream_port}/v1",
                "api_key": "bench-upstream-key"}})
        cfg = {"model_list": model_list,
               "litellm_settings": {"telemetry": False, "drop_params": True,
                                    "set_verbose": False}}
        cfg_path = self.workdir / "litellm.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        # A fresh strong key per run: LiteLLM refuses to start without one (the real set-up).
        self.litellm_key = "sk-" + secrets.token_hex(32)
        env = {**self.env, "LITELLM_MASTER_KEY": self.litellm_key,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
        env.pop("PYTHONPATH", None)
        self.litellm = self._start_peer_process(
            "litellm", [os.path.abspath(binary), "--config", str(cfg_path), "--host",
                        "127.0.0.1", "--port", str(self.litellm_port), "--num_workers", "1"],
            env, self.litellm_port, "/health/liveliness", port_wait=120, http_wait=60)

    def stop_litellm(self) -> None:
        if self.litellm is not None:
            self.litellm.stop(grace=5)
            self.litellm = None

    def start_portkey(self, where: str) -> None:
        """The Portkey gateway's own start script under node, on a free port of 127.0.0.1.

        `where` is bench/portkey (where `npm ci` installed it) or the start script itself. The
        gateway has no option for its bind address (it listens on every interface), so
        bench/portkey/loopback.mjs is preloaded (`node --import`) to bind 127.0.0.1. It routes
        by headers (run_scenario): provider `openai`, custom host = the bench upstream."""
        path = Path(where).resolve()
        script = path / PORTKEY_START if path.is_dir() else path
        if not script.is_file():
            raise RuntimeError(f"no Portkey gateway at {script} (npm ci --prefix bench/portkey)")
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH")
        self.portkey_port = procstat.free_port()
        env = {k: v for k, v in self.env.items() if not k.startswith("PYTHON")}
        env["NODE_ENV"] = "production"
        self.portkey = self._start_peer_process(
            "portkey", [node, "--import", PORTKEY_LOOPBACK.as_uri(), str(script),
                        f"--port={self.portkey_port}", "--headless"],
            env, self.portkey_port, "/", port_wait=60, http_wait=30)

    def _start_peer_process(self, name: str, argv: list[str], env: dict[str, str], port: int,
                            health: str, *, port_wait: float, http_wait: float
                            ) -> procstat.Child:
        """A peer's process, once it listens on `port` and answers GET `health` with a 2xx;
        a start that fails raises with the tail of its log."""
        child = procstat.Child(name, argv, env=env, cwd=str(self.workdir),
                               log_path=self.workdir / f"{name}.log",
                               own_session=self.own_sessions)
        try:
            procstat.wait_port(port, child.proc, name, port_wait)
        except RuntimeError as exc:
            child.stop(grace=1)
            raise RuntimeError(f"{exc}\n--- {name} log ---\n{child.tail()}") from None
        deadline = time.monotonic() + http_wait
        while not _http_ok(f"http://127.0.0.1:{port}{health}"):
            if time.monotonic() > deadline:
                child.stop(grace=1)
                raise RuntimeError(f"{name} did not answer GET {health} within "
                                   f"{http_wait:.0f}s\n--- {name} log ---\n{child.tail()}")
            time.sleep(0.2)
        return child

    def stop_portkey(self) -> None:
        if self.portkey is not None:
            self.portkey.stop(grace=5)
            self.portkey = None

    def start_peer(self, key: str, where: str) -> None:
        if key == "litellm":
            self.start_litellm(where)
        else:
            self.start_portkey(where)

    def stop_peer(self, key: str) -> None:
        if key == "litellm":
            self.stop_litellm()
        else:
            self.stop_portkey()

    def close(self) -> None:
        with self._lock:
            self.stop_chain()
            self.stop_litellm()
            self.stop_portkey()
            if self.upstream is not None:
                self.upstream.stop(grace=3)
                self.upstream = None
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def kill_all(self) -> None:
        """The watchdog's last resort: SIGKILL every process group we started."""
        for child in self.children():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
        pid = self.redis_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _git_commit(root: Path, rev: str = "HEAD") -> str | None:
    """`rev` (HEAD: + "-dirty" when `root` has local changes) of `root`, or None outside
    git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev],
                              capture_output=True, text=True, timeout=5, check=True).stdout
        if rev != "HEAD":
            return head.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head.strip() + ("-dirty" if dirty.strip() else "")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


# --- one load ----------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a scenario's requests go and which processes serve them."""

    scenario: Scenario
    url: str
    headers: dict[str, str]
    pids: dict[str, int]
    """Processes whose CPU and memory are attributed to the system under test."""
    other_pids: dict[str, int] = field(default_factory=dict)
    """Processes measured but not part of the sum (upstream, redis)."""
    idle_rss: dict[str, int] = field(default_factory=dict)
    metrics_urls: dict[str, str] = field(default_factory=dict)

    def model(self, load: Load) -> str:
        if self.scenario.provider == "sim":
            return sim_name(load.tokens, load.delay_ms)
        return model_name(load.tokens, load.delay_ms)


class Sampler:
    """Samples RSS of the measured processes every SAMPLE_INTERVAL while a load runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.open_streams = 0
        self.peak_open = 0
        self.peak_rss: dict[str, int] = dict.fromkeys(pids, 0)
        self.peak_sum = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        total = 0
        for name, pid in self.pids.items():
            rss = _rss(name, pid)
            self.peak_rss[name] = max(self.peak_rss[name], rss)
            total += rss
        self.peak_sum = max(self.peak_sum, total)
        self.peak_open = max(self.peak_open, self.open_streams)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sample()


def _rss(name: str, pid: int) -> int:
    return procstat.rss_tree(pid) if name in TREE_RSS else procstat.status_kib(pid, "VmRSS")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: procstat.cpu_tree(pid) for name, pid in pids.items()}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _upstream_stats(session: aiohttp.ClientSession, port: int) -> dict[str, int]:
    """The upstream's counters (`chunks_sent`: one token each, `active_streams`)."""
    async with session.get(f"http://127.0.0.1:{port}/stats") as resp:
        return await resp.json()


GC_BUCKET = "promptline_gc_pause_seconds_bucket"


Buckets = dict[str, dict[float, float]]
"""Cumulative GC pause counts: generation -> histogram bucket bound (s) -> count."""


async def _gc_pauses(session: aiohttp.ClientSession, urls: dict[str, str]
                     ) -> dict[str, Buckets]:
    """Per service, its `promptline_gc_pause_seconds` buckets; services without the histogram
    (older checkouts) are left out."""
    out: dict[str, Buckets] = {}
    for name, url in urls.items():
        try:
            async with session.get(url) as resp:
                text = await resp.text()
        except aiohttp.ClientError:
            continue
        buckets: Buckets = {}
        for line in text.splitlines():
            if line.startswith(GC_BUCKET):
                generation = line.split('generation="', 1)[1].split('"', 1)[0]
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets.setdefault(generation, {})[bound] = float(line.rsplit(" ", 1)[1])
        if buckets:
            out[name] = buckets
    return out


def _gc_figures(before: dict[str, Buckets], after: dict[str, Buckets]
                ) -> dict[str, dict[str, Any]]:
    """Collections during the load, those over 10 ms (by generation), and the histogram bucket
    of the longest one."""
    figures: dict[str, dict[str, Any]] = {}
    for name, generations in after.items():
        over: dict[str, int] = {}
        collections = 0
        longest = 0.0
        for generation, cumulative in generations.items():
            earlier = before.get(name, {}).get(generation, {})
            counts = {b: n - earlier.get(b, 0.0) for b, n in sorted(cumulative.items())}
            total = counts.get(float("inf"), 0.0)
            collections += int(total)
            over[generation] = int(total - counts.get(0.01, total))
            if total:
                longest = max(longest, next(b for b, n in counts.items() if n >= total))
        figures[name] = {
            "collections": collections,
            "over_10ms": sum(over.values()),
            "over_10ms_by_generation": over,
            "longest_up_to_ms": (None if not longest or longest == float("inf")
                                 else round(longest * 1000, 1)),
        }
    return figures


async def run_load(session: aiohttp.ClientSession, target: Target, load: Load,
                   upstream_port: int) -> dict[str, Any]:
    """Run one load against one target; return its figures."""
    sc = target.scenario
    body = request_body(sc.kind, target.model(load), load.tokens, load.prompt_bytes)
    expected = reply_text(load.tokens)
    all_pids = {**target.pids, **target.other_pids}
    results: list[StreamResult] = []
    started = 0

    await asyncio.sleep(0.3)  # let the previous load's tail (closing sockets, GC) settle
    up_before = await _upstream_stats(session, upstream_port)
    gc_before = await _gc_pauses(session, target.metrics_urls)
    cpu_before, own_before = _cpu(all_pids), _own_cpu()
    sampler = Sampler(target.pids)

    async def worker(index: int) -> None:
        nonlocal started
        if load.ramp_s:
            await asyncio.sleep(load.ramp_s * index / load.concurrency)
        while started < load.streams:
            started += 1
            sampler.open_streams += 1
            try:
                results.append(await run_stream(session, sc.kind, target.url, target.headers,
                                                body, STREAM_TIMEOUT))
            finally:
                sampler.open_streams -= 1

    t0 = time.perf_counter()
    with sampler:
        workers = [asyncio.create_task(worker(i)) for i in range(load.concurrency)]
        try:
            async with asyncio.timeout(load.timeout_s):
                await asyncio.gather(*workers)
        except TimeoutError:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    wall = time.perf_counter() - t0
    own_after, cpu_after = _own_cpu(), _cpu(all_pids)
    gc_after = await _gc_pauses(session, target.metrics_urls)
    hwm = {name: procstat.status_kib(pid, "VmHWM") for name, pid in target.pids.items()
           if name not in TREE_RSS}
    for _ in range(100):  # the upstream's counters settle just after [DONE]; at most 5 s
        up_after = await _upstream_stats(session, upstream_port)
        if not up_after["active_streams"]:
            break
        await asyncio.sleep(0.05)

    # --- figures (computed after the load, so the generator's CPU above is the load's) ---
    errors: Counter[str] = Counter(r.error for r in results if r.error)
    unfinished = started - len(results)
    if unfinished:
        errors["load_timeout"] += unfinished
    ok = [r for r in results if r.error is None]
    incomplete = sum(1 for r in ok if r.text != expected)
    delivered_tokens = sum(count_tokens(r.text) for r in results)
    if sc.provider == "sim":
        upstream_tokens = load.tokens * started  # what the simulated provider produced
    else:
        upstream_tokens = up_after["chunks_sent"] - up_before["chunks_sent"]
    ttfts = [r.ttft for r in results if r.ttft is not None]
    durations = [r.duration for r in ok if r.duration is not None]
    gaps = [r.max_gap for r in ok]
    cpu_ms = {name: round((cpu_after[name] - cpu_before[name]) * 1000, 1) for name in all_pids}
    measured = [n for n in target.pids]
    if measured:
        cpu_ms["sum"] = round(sum(cpu_ms[n] for n in measured), 1)
    cpu_ms["generator"] = round((own_after - own_before) * 1000, 1)
    per_1k = {name: (round(v * 1000 / upstream_tokens, 1) if upstream_tokens else None)
              for name, v in cpu_ms.items()}
    idle_sum = sum(target.idle_rss.values())
    conc = max(1, sampler.peak_open)
    kib_per_stream = {name: round((sampler.peak_rss[name] - target.idle_rss[name]) / conc, 1)
                      for name in target.pids}
    kib_per_stream["sum"] = round((sampler.peak_sum - idle_sum) / conc, 1)
    return {
        "load": asdict(load),
        "model": target.model(load),
        "streams": started,
        "completed": len(results),
        "ok": len(ok),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "incomplete": incomplete,
        "all_tokens_delivered": not errors and incomplete == 0,
        "expected_tokens_per_stream": load.tokens,
        "delivered_tokens": delivered_tokens,
        "upstream_tokens": upstream_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(delivered_tokens / wall, 1) if wall else None,
        "ttft_ms": {"p50": ms(percentile(ttfts, 50)), "p99": ms(percentile(ttfts, 99)),
                    "min": ms(min(ttfts, default=None))},
        "duration_ms": {"p50": ms(percentile(durations, 50)),
                        "p99": ms(percentile(durations, 99))},
        "max_gap_ms": {"p50": ms(percentile(gaps, 50)), "p99": ms(percentile(gaps, 99)),
                       "max": ms(max(gaps, default=None))},
        "gc_pauses": _gc_figures(gc_before, gc_after),
        "deliveries_per_stream": round(sum(r.deliveries for r in ok) / len(ok), 1) if ok else None,
        "cpu_ms": cpu_ms,
        "cpu_ms_per_1k_upstream_tokens": per_1k,
        "generator_cpu_pct_of_one_core": (round(cpu_ms["generator"] / 10 / wall, 1)
                                          if wall else None),
        "peak_open_streams": sampler.peak_open,
        "rss_idle_kib": dict(target.idle_rss),
        "rss_peak_sampled_kib": dict(sampler.peak_rss),
        "vm_hwm_kib": hwm,
        "kib_per_open_stream": kib_per_stream,
    }


# --- scenarios ---------------------------------------------------------------------------------


async def _warm_up(session: aiohttp.ClientSession, target: Target, loads: list[Load]) -> str | None:
    """A few streams per model so imports, pools and caches are warm; an error text or None."""
    sc = target.scenario
    for load in loads:
        body = request_body(sc.kind, target.model(load), load.tokens, load.prompt_bytes)
        if load.delay_ms:  # a paced model: a short reply is enough to open its pool
            body["max_tokens"] = 5
        for _ in range(2):
            r = await run_stream(session, sc.kind, target.url, target.headers, body, 30)
            if r.error:
                return r.error
    load = loads[0]
    body = request_body(sc.kind, target.model(load), load.tokens, load.prompt_bytes)
    burst = await asyncio.gather(*(run_stream(session, sc.kind, target.url, target.headers,
                                              body, 30) for _ in range(20)))
    errs = {r.error for r in burst if r.error}
    return ", ".join(sorted(errs)) if errs else None


async def run_scenario(session: aiohttp.ClientSession, stack: Stack, sc: Scenario,
                       loads: list[Load], say: Any) -> dict[str, Any]:
    up_pid = stack.upstream.pid if stack.upstream else 0
    other = {"upstream": up_pid}
    if sc.key == "direct":
        target = Target(sc, f"http://127.0.0.1:{stack.upstream_port}/v1/chat/completions",
                        {"Authorization": "Bearer bench-upstream-key"}, pids={}, other_pids=other)
    elif sc.key == "litellm":
        assert stack.litellm is not None
        target = Target(sc, f"http://127.0.0.1:{stack.litellm_port}/v1/chat/completions",
                        {"Authorization": f"Bearer {stack.litellm_key}"},
                        pids={"litellm": stack.litellm.pid}, other_pids=other)
    elif sc.key == "portkey":
        assert stack.portkey is not None
        # Portkey's header routing: an OpenAI-compatible provider at a custom host (loopback
        # is on its default list of trusted custom hosts); Authorization goes to the upstream.
        target = Target(sc, f"http://127.0.0.1:{stack.portkey_port}/v1/chat/completions",
                        {"Authorization": "Bearer bench-upstream-key",
                         "x-portkey-provider": "openai",
                         "x-portkey-custom-host": f"http://127.0.0.1:{stack.upstream_port}/v1"},
                        pids={"portkey": stack.portkey.pid}, other_pids=other)
    else:
        path = "/v1/chat/stream" if sc.kind == SSE else "/v1/chat/completions"
        pids = {name: child.pid for name, child in stack.services.items()}
        if stack.redis_pid:
            other["redis"] = stack.redis_pid
        target = Target(sc, f"http://127.0.0.1:{stack.edge_port}{path}",
                        {"Authorization": f"Bearer {API_KEY}"}, pids=pids, other_pids=other,
                        metrics_urls=dict(stack.metrics_urls))
    problem = await _warm_up(session, target, loads)
    if problem and sc.chain:
        dead = [n for n, c in stack.services.items() if not c.alive()]
        if dead:
            problem += f"; {', '.join(dead)} exited (logs in {stack.workdir})"
    if problem:
        if sc.kind == OPENAI and sc.chain and problem == "http_404":
            msg = ("skipped: the edge answers 404 to POST /v1/chat/completions "
                   "(the OpenAI-compatible endpoint is not there yet)")
        else:
            msg = f"skipped: warm-up failed ({problem})"
        say(f"  {sc.key}: {msg}")
        return {"scenario": sc.key, "label": sc.label, "skipped": msg, "loads": {}}
    await asyncio.sleep(0.5)
    target.idle_rss = {name: _rss(name, pid) for name, pid in target.pids.items()}
    out: dict[str, Any] = {"scenario": sc.key, "label": sc.label, "skipped": None,
                           "idle_rss_kib": target.idle_rss, "loads": {}}
    for load in loads:
        fig = await run_load(session, target, load, stack.upstream_port)
        out["loads"][load.name] = fig
        say(f"  {sc.key:10s} {load.name:5s} C={load.concurrency:<3d} streams={fig['streams']:<4d}"
            f" ttft p50={fig['ttft_ms']['p50']}ms p99={fig['ttft_ms']['p99']}ms"
            f" dur p50={fig['duration_ms']['p50']}ms tok/s={fig['tokens_per_s']}"
            f" cpu/1k={fig['cpu_ms_per_1k_upstream_tokens'].get('sum')}ms"
            f" errors={fig['error_count']} incomplete={fig['incomplete']}"
            f" gen={fig['generator_cpu_pct_of_one_core']}%")
    return out


def add_comparisons(report: dict[str, Any]) -> None:
    """Added TTFT and duration ratio of every scenario vs `direct`, load by load."""
    direct = next((s for s in report["scenarios"] if s["scenario"] == "direct"), None)
    if direct is None:
        return
    for sc in report["scenarios"]:
        if sc["scenario"] == "direct":
            continue
        for name, fig in sc["loads"].items():
            base = direct["loads"].get(name)
            if not base:
                continue
            added = {}
            for q in ("p50", "p99"):
                a, b = fig["ttft_ms"][q], base["ttft_ms"][q]
                added[q] = round(a - b, 2) if a is not None and b is not None else None
            fig["added_ttft_ms_vs_direct"] = added
            a, b = fig["duration_ms"]["p50"], base["duration_ms"]["p50"]
            fig["duration_p50_vs_direct"] = round(a / b, 3) if a and b else None


# --- main --------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, stack: Stack, loads: list[Load],
                  say: Any) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    report: dict[str, Any] = {"scenarios": []}
    wanted = set(args.scenarios.split(",")) if args.scenarios else None
    scenarios = chain_scenarios(
        args.unshaped or bool(wanted and wanted & {u.key for u in UNSHAPED}),
        stack.ref_root is not None,
        args.resume_off or bool(wanted and wanted & {u.key for u in NO_RESUME}))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for sc in scenarios:
            if wanted and sc.key not in wanted:
                continue
            if sc.kind == OPENAI and sc.chain and args.skip_openai_endpoint:
                report["scenarios"].append({"scenario": sc.key, "label": sc.label,
                                            "skipped": "skipped: --skip-openai-endpoint",
                                            "loads": {}})
                continue
            say(f"scenario {sc.key}: {sc.label}")
            if sc.chain:
                try:
                    stack.start_chain(sc.key, coalesce_ms=sc.coalesce_ms,
                                      root=stack.ref_root if sc.ref else None,
                                      journal=sc.journal)
                except RuntimeError as exc:
                    stack.stop_chain()
                    say(f"  {sc.key}: the chain did not start: {exc}")
                    report["scenarios"].append({"scenario": sc.key, "label": sc.label,
                                                "skipped": f"chain did not start: {exc}"[:2000],
                                                "loads": {}})
                    continue
            try:
                report["scenarios"].append(await run_scenario(session, stack, sc, loads, say))
            finally:
                if sc.chain:
                    stack.stop_chain()
        for peer in PEERS:
            where = getattr(args, peer.key)
            if not where:
                continue
            say(f"scenario {peer.key}: {peer.label}")
            try:
                await asyncio.to_thread(stack.start_peer, peer.key, where)
            except (RuntimeError, OSError) as exc:
                stack.stop_peer(peer.key)
                say(f"  {peer.key}: could not start: {exc}")
                report["scenarios"].append({"scenario": peer.key, "label": peer.label,
                                            "skipped": f"could not start: {exc}"[:2000],
                                            "loads": {}})
                continue
            try:
                report["scenarios"].append(await run_scenario(session, stack, peer, loads, say))
            finally:
                stack.stop_peer(peer.key)
    return report


def peer_versions(args: argparse.Namespace) -> dict[str, str]:
    """What the peers were: LiteLLM's version (from its venv), Portkey's and node's."""
    out: dict[str, str] = {}
    if args.litellm:
        python = Path(args.litellm).parent / "python"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["litellm"] = subprocess.run(
                [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    if args.portkey:
        path = Path(args.portkey).resolve()
        script = path / PORTKEY_START if path.is_dir() else path
        version = "?"
        with contextlib.suppress(OSError, ValueError):
            version = json.loads((script.parent.parent / "package.json").read_text())["version"]
        node = "?"
        with contextlib.suppress(OSError, subprocess.SubprocessError, TypeError):
            node = subprocess.run([shutil.which("node") or "node", "--version"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        out["portkey"] = f"@portkey-ai/gateway {version}, node {node}"
    return out


def export_ref(ref: str, into: Path) -> Path:
    """The checkout that serves the `-ref` scenarios: `ref` itself when it is a directory
    (its generated gRPC code made when missing), else the commit `ref` of this repository
    exported (git archive) under `into`, its gRPC code generated with this venv's protoc."""
    path = Path(ref)
    if not path.is_dir():
        path = into / f"ref-{ref.replace('/', '_')}"
        path.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                                 capture_output=True, timeout=120)
        if archive.returncode:
            raise RuntimeError(f"--ref {ref}: git archive failed: "
                               f"{archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True,
                       timeout=120)
    path = path.resolve()
    if not (path / "services").is_dir() or not (path / "promptline").is_dir():
        raise RuntimeError(f"--ref {ref}: {path} is not a Promptline checkout")
    if not (path / "promptline" / "v1" / "__init__.py").exists():
        protos = sorted(str(p.relative_to(path)) for p in (path / "protos").glob(
            "promptline/v1/*.proto"))
        done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
                               "--python_out=.", "--grpc_python_out=.", "--pyi_out=.", *protos],
                              cwd=path, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"--ref {ref}: protoc failed: {done.stderr.strip()}")
        (path / "promptline" / "v1" / "__init__.py").touch()
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--loads", default="c1,c50,c200",
                        help="comma-separated load names (c1, c50, c200) or custom "
                             "NAME:C:TOKENS:DELAY_MS:STREAMS entries (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer streams per load")
    parser.add_argument("--prompt-bytes", type=int, default=0,
                        help="pad every request's user message to this many bytes, as a chat "
                             "with a long history sends (default: one short sentence)")
    parser.add_argument("--scenarios", default="",
                        help="subset of direct,sse-sim,sse-up,openai-up (default: all)")
    parser.add_argument("--one-session", action="store_true",
                        help="keep the services, the upstream and LiteLLM in the bench's own "
                             "session; by default each runs in its own, as `make run` starts "
                             "the services, which kernels with autogroups schedule as separate "
                             "groups")
    parser.add_argument("--skip-openai-endpoint", action="store_true",
                        help="do not drive the edge's POST /v1/chat/completions")
    parser.add_argument("--litellm", default="",
                        help="path of a `litellm` executable: also drive the LiteLLM proxy")
    parser.add_argument("--portkey", default="",
                        help="bench/portkey (where `npm ci --prefix bench/portkey` installed "
                             "the Portkey gateway) or its build/start-server.js: also drive "
                             "the Portkey gateway under node")
    parser.add_argument("--unshaped", action="store_true",
                        help="also run sse-up and openai-up with chunk shaping off "
                             "(`stream: {coalesce_ms: 0}` on the bench models)")
    parser.add_argument("--resume-off", action="store_true",
                        help="also `sse-up-noresume`: the same chain with `resume: {ttl: 0}` "
                             "(no stream journal), next to sse-up in the same run")
    parser.add_argument("--ref", default="",
                        help="a commit of this repository (exported with git archive) or "
                             "another checkout's directory: also run sse-up and openai-up on "
                             "its services, in the same run (`-ref` scenarios), as the "
                             "reference of the 'without shaping, no regression' target")
    parser.add_argument("--plain-tenant", action="store_true",
                        help="the bench tenant without quotas and without a moderation term "
                             "(the bench before issue 20)")
    parser.add_argument("--pool", type=int, default=0,
                        help="serve each upstream model by a pool of this many deployments, all "
                             "at the bench upstream (docs/provider-pools.md); 0: a plain model")
    parser.add_argument("--out", default="",
                        help="output path without extension (default: bench/results/<timestamp>)")
    parser.add_argument("--root", default=str(ROOT),
                        help="checkout whose services to run, e.g. a `git worktree` of the "
                             "commit before a change (default: this one)")
    parser.add_argument("--hard-timeout", type=float, default=0.0,
                        help="kill everything and exit after this many seconds (default: 600, "
                             "plus 300 per peer and per extra variant)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--baseline", default="",
                        help="compare the figures with this baseline file and fail when one is "
                             "worse beyond the tolerance (written from this run when missing)")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write this run's figures to --baseline instead of comparing")
    parser.add_argument("--tolerance", type=float, default=baseline.DEFAULT_TOLERANCE,
                        help="relative tolerance of the comparison (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.update_baseline and not args.baseline:
        parser.error("--update-baseline needs --baseline")
    if not args.hard_timeout:
        extras = sum(map(bool, (args.litellm, args.portkey, args.unshaped, args.ref,
                                args.resume_off)))
        args.hard_timeout = 600.0 + 300.0 * extras
    return args


def parse_loads(spec: str, quick: bool) -> list[Load]:
    loads = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in LOADS:
            load = LOADS[item]
            if quick:
                load = Load(load.name, load.concurrency, load.tokens, load.delay_ms,
                            QUICK_STREAMS[item], load.ramp_s, load.timeout_s)
        else:
            try:
                name, c, tokens, delay, streams = item.split(":")
                load = Load(name, int(c), int(tokens), int(delay), int(streams))
            except ValueError:
                raise SystemExit(f"bench: bad load {item!r} (use c1, c50, c200 or "
                                 "NAME:C:TOKENS:DELAY_MS:STREAMS)") from None
        loads.append(load)
    if not loads:
        raise SystemExit("bench: no loads given")
    return loads


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loads = [replace(load, prompt_bytes=args.prompt_bytes)
             for load in parse_loads(args.loads, args.quick)]
    machine = machine_info()
    print(f"cores: {machine['cores']}  ({machine['cpu_model']})", flush=True)

    def say(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_base = Path(args.out) if args.out else ROOT / "bench" / "results" / stamp
    out_base.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="promptline-bench-"))
    stack = Stack(workdir, loads, Path(args.root).resolve(), own_sessions=not args.one_session)
    stack.plain_tenant = args.plain_tenant
    stack.pool = args.pool
    if args.ref:
        try:
            stack.ref_root = export_ref(args.ref, workdir)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        print(f"reference checkout (--ref {args.ref}): {stack.ref_root}", flush=True)

    def watchdog() -> None:
        print(f"bench: hard timeout ({args.hard_timeout:g}s) reached: killing everything",
              file=sys.stderr, flush=True)
        stack.kill_all()
        os._exit(3)

    timer = threading.Timer(args.hard_timeout, watchdog)
    timer.daemon = True
    timer.start()

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        stack.start_base()
        report = asyncio.run(run_all(args, stack, loads, say))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.close()
        timer.cancel()
    report.update({
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "argv": sys.argv[1:] if argv is None else argv,
        "root": str(Path(args.root).resolve()),
        "commit": _git_commit(Path(args.root)),
        "ref": ({"arg": args.ref, "root": str(stack.ref_root),
                 "commit": (_git_commit(stack.ref_root) if Path(args.ref).is_dir()
                            else _git_commit(ROOT, args.ref))}
                if stack.ref_root else None),
        "tenant": ("plain: no quotas, no moderation" if args.plain_tenant else
                   f"realistic: quotas qpm={TENANT_QUOTAS['qpm']} tpm={TENANT_QUOTAS['tpm']}, "
                   f"blocked term {BLOCKED_TERM!r}"),
        "peers": peer_versions(args),
        "quick": args.quick,
        "pool": args.pool,
        "one_session": args.one_session,
        "loads": [asdict(load) for load in loads],
        "run_seconds": round(time.monotonic() - started, 1),
        "logs": str(workdir),
        "notes": [
            "The load generator (one aiohttp process) and the bench upstream run on the same "
            "cores as the services; their CPU is reported separately and excluded from the sum.",
            "CPU from /proc/<pid>/stat utime+stime (10 ms ticks); RSS sampled every 100 ms; "
            "KiB per open stream = (peak sampled RSS - idle RSS after warm-up) / peak open "
            "streams.",
            "Percentiles interpolate linearly between closest ranks; p99 of < 100 streams is "
            "near the maximum.",
        ],
    })
    add_comparisons(report)
    report["targets"] = evaluate_targets(report)
    report["peer_ratios"] = peer_ratios(report)
    report["peer_targets"] = evaluate_peer_targets(report, args.tolerance)
    table = markdown(report)
    out_base.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out_base.with_suffix(".md").write_text(table)
    print()
    print(table)
    print(f"wrote {out_base.with_suffix('.json')} and {out_base.with_suffix('.md')} "
          f"(service logs in {workdir})")
    if not args.baseline:
        return 0
    print()
    if args.update_baseline:
        baseline.write(report, Path(args.baseline))
        print(f"wrote the baseline {args.baseline} from this run")
        return 0
    return baseline.check(report, Path(args.baseline), args.tolerance)


if __name__ == "__main__":
    sys.exit(main())

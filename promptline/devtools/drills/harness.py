"""What every drill uses: its result row, the scale, the shared environment (a Redis, the fake
OpenAI-compatible upstream, one local deployment at a time), chat clients that record what a
caller saw, and per-process samples (CPU, memory, descriptors, threads, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from promptline.devtools import procstat
from promptline.devtools.deployment import LocalDeployment, Replica
from promptline.devtools.embedded_redis import EmbeddedRedis, free_port
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.devtools.sse_client import SseStream

API_KEY = "drill-key"
TENANT = "drills"
REPLY = ("Drills run on a real deployment: each service its own process, a real Redis, the "
         "simulated model and a fake upstream, and every fault ends with a typed error.")


# --- results -----------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the report: what was done, what the contract expects, what was seen."""

    name: str
    action: str
    expected: str
    observed: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def expect(self, ok: bool, what: str) -> bool:
        """Record an expectation; a false one fails the drill, naming `what`."""
        if not ok:
            self.failures.append(what)
        return ok

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Scale:
    """Full size (`make drills`) or the seconds-long smoke version (`make test`)."""

    smoke: bool = False

    def n(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def s(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full


# --- the environment ---------------------------------------------------------------------------


class Env:
    """A Redis and the fake upstream for the whole run; deployments drill by drill.

    `fault` (tests only) starts every service through `promptline.devtools.drills.faults`, which
    plants that fault first: a drill must catch it."""

    def __init__(self, scale: Scale, workdir: Path, fault: str | None = None) -> None:
        self.scale = scale
        self.workdir = workdir
        self.fault = fault
        self.redis = EmbeddedRedis()
        self.upstream = FakeOpenAI(reply=REPLY, models=("up",), record=False)
        self.refused_port = free_port()  # nothing listens: "connection refused"
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Env:
        await asyncio.to_thread(self.redis.start)
        await self.upstream.start()
        # Many streams at once, no per-host cap; drills set their own timeouts.
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                          timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.close()
        await self.upstream.stop()
        await asyncio.to_thread(self.redis.stop)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.http is not None, "use Env as an async context manager"
        return self.http

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The drills' config: a tenant with quotas and a moderation term (a realistic path),
        simulated models, and models on the fake upstream; top-level keys replaced."""
        timeouts = {"first_token": "10s", "idle": "5s", "total": "2m"}

        def sim(name: str, **knobs: Any) -> dict[str, Any]:
            return {"name": name, "provider": "simulated", "timeouts": timeouts,
                    "simulated": {"ttft_ms": 20, "tokens_per_second": 200, "reply": REPLY,
                                  **knobs}}

        def up(name: str, base_url: str) -> dict[str, Any]:
            return {"name": name, "provider": "openai", "base_url": base_url,
                    "upstream_model": "up", "timeouts": timeouts}

        raw: dict[str, Any] = {
            "redis_url": self.redis.url,
            "tenants": [{"name": TENANT, "api_keys": [API_KEY], "admin": True,
                         "quotas": {"qpm": 100_000, "tpm": 100_000_000}}],
            "models": [
                sim("sim"),
                sim("sim-slow", tokens_per_second=10),     # slow streams: capacity, SIGTERM
                sim("sim-long", tokens_per_second=20, reply=REPLY * 8),  # long-lived streams
                up("up", self.upstream.base_url),
                up("up-refused", f"http://127.0.0.1:{self.refused_port}/v1"),
            ],
            "moderation": {"blocked_terms": ["forbidden-word"]},
            "retries": {"max_attempts": 2, "backoff_base": "20ms", "backoff_max": "100ms"},
            "quota_policy": {"redis_timeout": "250ms"},
            "shutdown_grace": "5s",
            "log_level": "WARNING",
        }
        raw.update(copy.deepcopy(overrides))
        return raw

    @contextlib.asynccontextmanager
    async def deployment(self, config: dict[str, Any] | None = None, *, engines: int = 1,
                         prompts: int = 1, edges: int = 1) -> AsyncIterator[LocalDeployment]:
        """A fresh deployment for one drill, stopped (and its logs dropped) after it."""
        wrapper = (("-m", "promptline.devtools.drills.faults", self.fault)
                   if self.fault else ())
        deployment = LocalDeployment(config or self.config(), engines=engines, prompts=prompts,
                                     edges=edges, wrapper=wrapper)
        await asyncio.to_thread(deployment.start)
        try:
            yield deployment
        finally:
            await asyncio.to_thread(deployment.stop)


# --- callers -----------------------------------------------------------------------------------


class StopReading(Exception):
    """Raised by an `on_delta` callback: the caller leaves mid-stream."""


@dataclass
class Outcome:
    """What one caller of `POST /v1/chat/stream` saw."""

    status: int = 0
    text: str = ""
    terminal: str = ""
    """"done", an error code, "no terminal frame" or "connection error"."""
    stage: str = ""
    body: Any = None
    """The JSON error body of a non-200 answer."""
    started: float = 0.0
    first_delta: float | None = None
    ended: float = 0.0
    max_gap: float = 0.0
    deltas: int = 0

    @property
    def done(self) -> bool:
        return self.terminal == "done"

    @property
    def seconds(self) -> float:
        return self.ended - self.started


async def chat(http: aiohttp.ClientSession, base_url: str, model: str = "sim", *,
               text: str = "hi", max_tokens: int | None = None, key: str = API_KEY,
               within: float = 60.0, on_delta: Callable[[Outcome], Awaitable[None]] | None = None,
               extra: dict[str, Any] | None = None) -> Outcome:
    """One chat stream, read to its end (or `within` seconds); never raises for what the
    server did, so a drill can count outcomes. `extra`: more body fields (conversation_id,
    prompt). An `on_delta` that raises `StopReading` leaves the stream (a disconnect)."""
    out = Outcome(started=time.monotonic())
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                            **(extra or {})}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    last = out.started
    try:
        async with asyncio.timeout(within), http.post(
                f"{base_url}/v1/chat/stream", json=body,
                headers={"Authorization": f"Bearer {key}"}) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.body = await _json_or_text(resp)
                error = out.body.get("error", {}) if isinstance(out.body, dict) else {}
                out.terminal = str(error.get("code") or f"HTTP {resp.status}")
                out.stage = str(error.get("stage") or "")
                return out
            stream = SseStream(resp, within=within)
            while (event := await stream.next()) is not None:
                now = time.monotonic()
                if event.event == "delta":
                    out.deltas += 1
                    out.text += event.data.get("text", "")
                    if out.first_delta is None:
                        out.first_delta = now
                    else:
                        out.max_gap = max(out.max_gap, now - last)
                    last = now
                    if on_delta is not None:
                        await on_delta(out)
                elif event.event == "done":
                    out.terminal = "done"
                elif event.event == "error":
                    error = event.data.get("error", {})
                    out.terminal, out.stage = str(error.get("code")), str(error.get("stage"))
            out.terminal = out.terminal or "no terminal frame"
    except StopReading:
        out.terminal = "left"
    except (aiohttp.ClientError, ConnectionError, AssertionError):
        out.terminal = out.terminal or "connection error"
    except TimeoutError:
        out.terminal = out.terminal or "client timeout"
    finally:
        out.ended = time.monotonic()
    return out


class Load:
    """`concurrency` callers chatting in a loop until `stop()`; every outcome is kept."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, model: str = "sim", *,
                 concurrency: int = 4, pause: float = 0.02, within: float = 30.0) -> None:
        self._args = (http, base_url, model)
        self._concurrency = concurrency
        self._pause = pause
        self._within = within
        self.outcomes: list[Outcome] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(self._concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _caller(self) -> None:
        http, base_url, model = self._args
        while not self._stopping.is_set():
            self.outcomes.append(await chat(http, base_url, model, within=self._within))
            await asyncio.sleep(self._pause)

    async def stop(self) -> list[Outcome]:
        """Let the callers finish the request they are in, then return every outcome."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    def started_between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.started < end]

    async def succeeded_after(self, moment: float) -> bool:
        """A request that started after `moment` completed (for `until`)."""
        return any(o.done and o.started >= moment for o in self.outcomes)


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.text()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Outcome counts: {"done": 18, "UNAVAILABLE/mid_stream": 2, ...}."""
    counts: dict[str, int] = {}
    for out in outcomes:
        key = out.terminal if out.done or not out.stage else f"{out.terminal}/{out.stage}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- processes ---------------------------------------------------------------------------------


async def metrics(http: aiohttp.ClientSession, replica: Replica) -> dict[str, float]:
    """A process's /metrics as {name{labels}: value} (label-less names as they are); {} when it
    does not answer."""
    try:
        async with asyncio.timeout(2), http.get(replica.metrics_url) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(values: dict[str, float], name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


@dataclass
class ProcessSample:
    cpu_s: float
    rss_kib: int
    fds: int
    threads: int


def sample(replica: Replica) -> ProcessSample:
    pid = replica.pid
    return ProcessSample(procstat.cpu_seconds(pid), procstat.status_kib(pid, "VmRSS"),
                         procstat.open_fds(pid), procstat.threads(pid))


async def cpu_share(replicas: list[Replica], seconds: float) -> dict[str, float]:
    """Each process's CPU over the next `seconds`, in cores (a spinning loop shows as ~1)."""
    before = {r.name: procstat.cpu_seconds(r.pid) for r in replicas}
    await asyncio.sleep(seconds)
    return {r.name: round((procstat.cpu_seconds(r.pid) - before[r.name]) / seconds, 3)
            for r in replicas}


async def until(predicate: Callable[[], Awaitable[bool]], within: float,
                interval: float = 0.05) -> float | None:
    """Seconds until `predicate()` holds, or None after `within`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)

"""A model's pool of deployments, and which one serves the next attempt of a request.

`Pools` holds one `DeploymentPool` per model config: a reload that changes a model gets a new
pool (new providers, new connections) while streams that started before keep theirs, and the old
providers close once those streams are over. A `DeploymentState` outlives reloads (keyed by model
and deployment name): its breaker (health.py), its minute windows (limits.py), the streams in
flight on this replica and a decaying average of its first-token time.

`choose`, in order:
1. a half-open deployment whose probe lease this request wins takes it, as the probe;
2. else the healthy deployments; all of them while the healthy share of the pool is below
   `health.panic_threshold`, and always when none is healthy (panic mode, logged once);
3. minus those at a limit (`max_concurrency` here, `rpm`/`tpm` over all replicas): when none is
   left the attempt fails with UPSTREAM_RATE_LIMITED before any call;
4. minus those this request already tried, unless that would leave none;
5. the model's `routing`: `weighted` (smooth weighted round robin: exact shares, interleaved),
   `least_busy` (fewest streams in flight per weight; ties by weight) or `lowest_latency`
   (lowest average first-token time; a deployment without a recent sample is measured first).
A pool of one without limits skips all of that.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from promptline.config import Config, DeploymentConfig, ModelConfig
from promptline.errors import ErrorCode, PromptlineError
from promptline.metrics import DEPLOYMENT_HEALTHY, DEPLOYMENT_REQUESTS

from .board import SharedBoard
from .health import FAILURES, Breaker, State
from .limits import UsageWindow, wait_for_room
from .providers.base import Provider
from .providers.registry import build_provider

log = logging.getLogger("promptline.llm_engine.pool")

RETIRE_SLACK = 5.0
"""Seconds past a retired pool's total timeout before its providers (connection pools) close."""
LATENCY_WEIGHT = 0.3
"""Weight of the newest first-token time in a deployment's average."""
LATENCY_STALE = 10.0
"""Seconds after which a deployment's average is measured again (one request goes to it)."""
PROBE_SLACK = 1.0
"""Seconds a probe lease outlives the probe's first-token timeout."""


@dataclass(slots=True)
class DeploymentState:
    """What this replica knows of one deployment, whatever its config (outlives reloads)."""

    name: str
    breaker: Breaker
    usage: UsageWindow = field(default_factory=UsageWindow)
    in_flight: int = 0
    ttft: float | None = None
    """Decaying average of the first-token time, in seconds (None: never measured)."""
    measured_at: float = 0.0
    """time.monotonic() of the last sample (or of the request sent to take one)."""
    turn: float = 0.0
    """The smooth weighted round robin's current weight."""


@dataclass(slots=True)
class Deployment:
    """One deployment of one pool: its config, its provider, its state."""

    name: str
    weight: float
    upstream_model: str
    """The model name the provider is asked for."""
    config: DeploymentConfig
    provider: Provider
    state: DeploymentState


class Attempt:
    """One provider call on the deployment `choose` picked, from `begin` to `end`."""

    __slots__ = ("_ended", "_resolved", "deployment", "pool", "probe")

    def __init__(self, pool: DeploymentPool, deployment: Deployment, *, probe: bool) -> None:
        self.pool = pool
        self.deployment = deployment
        self.probe = probe
        self._resolved = False  # the probe has its answer
        self._ended = False

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def provider(self) -> Provider:
        return self.deployment.provider

    def begin(self) -> None:
        """The call starts: one more stream in flight, one more request in the window."""
        state = self.deployment.state
        state.in_flight += 1
        if self.pool.counts_usage:
            state.usage.add(time.time(), requests=1)

    def answered(self, seconds: float) -> None:
        """The first chunk came `seconds` after the call."""
        state = self.deployment.state
        state.ttft = seconds if state.ttft is None else (
            state.ttft + LATENCY_WEIGHT * (seconds - state.ttft))
        state.measured_at = time.monotonic()
        if self.probe:
            self._resolved = True
            self.pool.board.recovered(state.breaker, shared=self.pool.shared)

    async def failed(self, err: PromptlineError) -> None:
        """The call failed: the breaker counts what says something about the deployment."""
        if err.code in FAILURES:
            self._resolved = True
            await self.pool.board.failed(self.deployment.state.breaker, self.pool.model.health,
                                         shared=self.pool.shared)

    def used(self, tokens: int) -> None:
        """The tokens the call cost (for `tpm`), known when it ends."""
        if self.pool.counts_usage and tokens:
            self.deployment.state.usage.add(time.time(), tokens=tokens)

    def end(self, outcome: str) -> None:
        """The call is over (`ok`, an error code or `cancelled`); idempotent."""
        if self._ended:
            return
        self._ended = True
        self.deployment.state.in_flight -= 1
        if self.pool.counts_usage:  # this replica's counts reach the others within a second
            self.pool.board.sync_soon(self.pool.model.name, self.pool.states)
        DEPLOYMENT_REQUESTS.labels(self.pool.model.name, self.deployment.name, outcome).inc()
        if self.probe and not self._resolved:
            self.pool.board.release_probe(self.deployment.state.breaker)


def shares_state(model: ModelConfig) -> bool:
    """Whether `model`'s pool shares its state through Redis: when it has several deployments
    (a breaker then changes where requests go) or an `rpm`/`tpm` limit."""
    return len(model.pool) > 1 or any(d.rpm or d.tpm for d in model.pool)


class DeploymentPool:
    """The deployments of one model config, and the policy that picks one per attempt."""

    def __init__(self, model: ModelConfig, states: dict[tuple[str, str], DeploymentState],
                 board: SharedBoard) -> None:
        self.model = model
        self.board = board
        deployments = []
        for config in model.pool:
            state = states.get((model.name, config.name))
            if state is None:
                state = states[model.name, config.name] = DeploymentState(
                    config.name, Breaker(model.name, config.name),
                    turn=random.uniform(0, config.weight))  # replicas do not start in step
            deployments.append(Deployment(config.name, config.weight,
                                          config.upstream_model or model.name, config,
                                          build_provider(model, config), state))
        self.deployments: tuple[Deployment, ...] = tuple(deployments)
        self.states = tuple(d.state for d in deployments)
        self.counts_usage = any(d.rpm or d.tpm for d in model.pool)
        self.shared = shares_state(model)
        """Breakers and windows go through Redis (a pool of one has no other to turn to)."""
        self._simple = len(deployments) == 1 and not model.pool[0].limited
        self._lease = model.timeouts.first_token + PROBE_SLACK
        self._panic = False
        self._policy = {"weighted": _weighted, "least_busy": _least_busy,
                        "lowest_latency": _lowest_latency}[model.routing]

    async def choose(self, tried: Collection[str]) -> Attempt:
        """The deployment for the next attempt (see the module's docstring). Raises
        UPSTREAM_RATE_LIMITED when every usable deployment is at a limit."""
        if self._simple:
            return Attempt(self, self.deployments[0], probe=False)
        if self.shared:
            self.board.sync_soon(self.model.name, self.states)
        now = time.time()
        for d in self.deployments:
            if (d.name not in tried and d.state.breaker.state(now) is State.HALF_OPEN
                    and self._room(d, now) is None
                    and await self.board.take_probe(d.state.breaker, self._lease,
                                                    shared=self.shared)):
                return Attempt(self, d, probe=True)
        room: list[Deployment] = []
        wait: float | None = None
        for d in self._usable(now):
            if (w := self._room(d, now)) is None:
                room.append(d)
            else:
                wait = w if wait is None else min(wait, w)
        if not room:
            raise PromptlineError(
                ErrorCode.UPSTREAM_RATE_LIMITED,
                f"every deployment of model {self.model.name!r} is at its configured limit",
                retry_after_ms=round((wait or 0) * 1000), origin="llm_engine")
        fresh = [d for d in room if d.name not in tried] or room
        return Attempt(self, self._policy(fresh) if len(fresh) > 1 else fresh[0], probe=False)

    @staticmethod
    def _room(d: Deployment, now: float) -> float | None:
        if not d.config.limited:
            return None
        return wait_for_room(d.config, d.state.in_flight, d.state.usage, now)

    def _usable(self, now: float) -> Sequence[Deployment]:
        healthy = [d for d in self.deployments if d.state.breaker.state(now) is State.HEALTHY]
        panic = (not healthy
                 or len(healthy) < self.model.health.panic_threshold * len(self.deployments))
        if panic != self._panic:
            self._panic = panic
            extra = {"model": self.model.name, "healthy": len(healthy),
                     "deployments": len(self.deployments)}
            if panic:
                log.warning("pool in panic mode: too few healthy deployments, using them all",
                            extra=extra)
            else:
                log.info("pool out of panic mode", extra=extra)
        return self.deployments if panic else healthy

    async def close(self) -> None:
        await asyncio.gather(*(d.provider.close() for d in self.deployments))


def _weighted(candidates: Sequence[Deployment]) -> Deployment:
    """Smooth weighted round robin (nginx's): every deployment gets exactly its share of each
    round, interleaved rather than in runs."""
    total = 0.0
    best = candidates[0]
    for d in candidates:
        d.state.turn += d.weight
        total += d.weight
        if d.state.turn > best.state.turn:
            best = d
    best.state.turn -= total
    return best


def _least_busy(candidates: Sequence[Deployment]) -> Deployment:
    """Fewest streams in flight on this replica per weight, counting the one to come."""
    def load(d: Deployment) -> float:
        return (d.state.in_flight + 1) / d.weight

    lowest = min(load(d) for d in candidates)
    ties = [d for d in candidates if load(d) == lowest]
    return ties[0] if len(ties) == 1 else _weighted(ties)


def _lowest_latency(candidates: Sequence[Deployment]) -> Deployment:
    """The lowest first-token average; one never measured, or not for LATENCY_STALE, first
    (so a deployment that was slow once is measured again)."""
    now = time.monotonic()
    stale = [d for d in candidates
             if d.state.ttft is None or now - d.state.measured_at > LATENCY_STALE]
    if stale:
        chosen = min(stale, key=lambda d: d.state.measured_at)
        chosen.state.measured_at = now  # the next requests need not all measure it too
        return chosen
    return min(candidates, key=lambda d: d.state.ttft or 0.0)


class Pools:
    """The engine's pools, one per model config, built on first use."""

    def __init__(self, board: SharedBoard) -> None:
        self.board = board
        self._pools: dict[ModelConfig, DeploymentPool] = {}
        self._states: dict[tuple[str, str], DeploymentState] = {}
        self._config: Config | None = None
        self.retiring: dict[asyncio.Task[None], DeploymentPool] = {}

    def get(self, model: ModelConfig) -> DeploymentPool:
        pool = self._pools.get(model)
        if pool is None:
            # A stream begun before a reload retries or falls back on its old model config:
            # the retiring pool serves it, rather than a new one nobody closes.
            pool = next((p for p in self.retiring.values() if p.model == model), None)
        if pool is None:
            pool = self._pools[model] = DeploymentPool(model, self._states, self.board)
        return pool

    def follow(self, config: Config) -> None:
        """Called with the config each stream starts with; cheap unless it is a new one. A pool
        whose model config left is closed once the longest stream that may use it is over."""
        if config is self._config:
            return
        self._config = config
        current = set(config.models)
        for model in [m for m in self._pools if m not in current]:
            pool = self._pools.pop(model)
            task = asyncio.create_task(self._close_later(pool, model.timeouts.total))
            self.retiring[task] = pool
            task.add_done_callback(self.retiring.pop)
        names = {(m.name, d.name) for m in config.models for d in m.pool}
        for gone in [key for key in self._states if key not in names]:
            del self._states[gone]  # a retiring pool keeps its own reference
            DEPLOYMENT_HEALTHY.remove(*gone)

    async def sync(self) -> None:
        """Read every shared pool's state from Redis (at start: before the first request)."""
        await asyncio.gather(*(self.board.sync(p.model.name, p.states)
                               for p in self._pools.values() if p.shared))

    @staticmethod
    async def _close_later(pool: DeploymentPool, after: float) -> None:
        await asyncio.sleep(after + RETIRE_SLACK)
        await pool.close()

    async def close(self) -> None:
        retiring = list(self.retiring.items())
        for task, _ in retiring:
            task.cancel()
        await asyncio.gather(*(task for task, _ in retiring), return_exceptions=True)
        await asyncio.gather(*(p.close() for p in [*self._pools.values(),
                                                   *(p for _, p in retiring)]))
        self._pools.clear()
        await self.board.close()

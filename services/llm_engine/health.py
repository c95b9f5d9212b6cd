"""The circuit breaker of one deployment: healthy -> ejected -> half-open -> healthy.

A deployment that fails `health.failures` times within `health.window` is ejected for
`health.cooldown`, doubled on each repeat ejection up to `health.max_cooldown`; one that stayed
healthy for `max_cooldown` after its recovery starts again at `cooldown`. Once the cooldown is
over the deployment is half-open: a single live request probes it (whoever holds the probe
lease), its first token recovers the deployment, a failure ejects it again, for longer.

`Breaker` is this replica's view of one deployment, and the same algorithm run in memory: alone
when the pool is not shared or Redis is unreachable; otherwise `board.SharedBoard` runs it in
Redis for every replica (its Lua scripts mirror `fail` and `recover`) and writes the outcome
here. Times are wall-clock seconds, so that replicas can compare them.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Gauge

from promptline.config import HealthConfig
from promptline.errors import ErrorCode
from promptline.metrics import DEPLOYMENT_HEALTHY

FAILURES = frozenset({ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_RATE_LIMITED,
                      ErrorCode.UNAVAILABLE, ErrorCode.FIRST_TOKEN_TIMEOUT,
                      ErrorCode.STREAM_TIMEOUT})
"""Errors that say something about the deployment (the rest are the request's or the caller's)."""


class State(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"


def cooldown(rules: HealthConfig, level: int) -> float:
    """The length of the `level`-th ejection in a row (1: the first)."""
    return float(min(rules.max_cooldown, rules.cooldown * 2 ** (level - 1)))


@dataclass(slots=True)
class Breaker:
    """One deployment's breaker as this replica knows it."""

    model: str
    deployment: str
    until: float = 0.0
    """Ejected until then (epoch seconds); 0: healthy; in the past: half-open."""
    level: int = 0
    """Ejections in a row; each one doubles the cooldown."""
    recovered_at: float = 0.0
    probe_until: float = 0.0
    """A probe lease is held until then, by this replica or (as far as it knows) another."""
    probe_token: str = ""
    """The lease this replica holds in Redis ("" when it holds none there)."""
    changed_at: float = 0.0
    """time.monotonic() of this replica's last own change: an older sync does not undo it."""
    failures: deque[float] = field(default_factory=deque)
    """Failure times within the window (in-memory mode only; Redis keeps the shared ones)."""
    gauge: Gauge = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.gauge = DEPLOYMENT_HEALTHY.labels(self.model, self.deployment)
        self.gauge.set(1)

    def state(self, now: float) -> State:
        if not self.until:
            return State.HEALTHY
        return State.EJECTED if self.until > now else State.HALF_OPEN

    def fail(self, rules: HealthConfig, now: float) -> bool:
        """Count a failure; True when it ejects the deployment (a failed probe always does)."""
        if self.until > now:
            return False  # already out: traffic reaches it only in panic mode
        eject = bool(self.until)
        if not eject:
            self.failures.append(now)
            while self.failures[0] <= now - rules.window:
                self.failures.popleft()
            eject = len(self.failures) >= rules.failures
        if eject:
            if not self.until and now - self.recovered_at > rules.max_cooldown:
                self.level = 0
            self.level += 1
            self._set(now + cooldown(rules, self.level))
        return eject

    def recover(self, now: float) -> bool:
        """A probe got its first token; True when that brought the deployment back."""
        if not self.until or self.until > now:
            self.probe_until, self.probe_token = 0.0, ""
            return False
        self.recovered_at = now
        self._set(0.0)
        return True

    def take_probe(self, now: float, lease: float) -> bool:
        """The in-memory probe lease: one probe at a time on this replica."""
        if self.probe_until > now:
            return False
        self.probe_until = now + lease
        return True

    def seen(self, until: float, level: int, recovered_at: float) -> None:
        """The shared state, as Redis has it."""
        self.until, self.level, self.recovered_at = until, level, recovered_at
        self.gauge.set(0 if until else 1)

    def decided(self, until: float, level: int) -> None:
        """An ejection this replica's failure caused in the shared state."""
        self.level = level
        self._set(until)

    def _set(self, until: float) -> None:
        """An ejection or a recovery decided here: the probe, if any, is over."""
        self.until = until
        self.failures.clear()
        self.probe_until, self.probe_token = 0.0, ""
        self.changed_at = time.monotonic()
        self.gauge.set(0 if until else 1)

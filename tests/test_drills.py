"""`make drills` in its smoke version: every drill passes on the real deployment, and each one
fails when the fault it exists to catch is planted in a service (`drills/faults.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptline.devtools.drills.harness import Env, Scale
from promptline.devtools.drills.runner import catalog, run_drills
from promptline.devtools.drills.soak import soak

SMOKE = Scale(smoke=True)

# drill -> (planted fault, words of the failure it must report, or a tuple of alternatives)
PLANTED = {
    "redis-kill": ("redis-health-blind", "/readyz said redis"),
    "redis-pause": ("redis-unbounded", "slowest request"),
    "provider-errors": ("provider-429-as-error", "expected 429 UPSTREAM_RATE_LIMITED"),
    "provider-stream-faults": ("provider-spin-after-error", "spins after the fault"),
    # the engine reading on shows as memory or as a provider never pushed back, by timing
    "slow-reader": ("pump-unbounded", ("RSS grew", "never pushed back")),
    "disconnect-storm": ("provider-ignores-cancel", "provider connections still open"),
    "capacity": ("engine-stream-leak", "KiB per open stream"),
    "engine-kill": ("prompt-slow-reconnect", "first success"),
    "prompt-kill": ("edge-slow-reconnect", "first success"),
    "edge-kill": ("prompt-leaves-engine-calls", "chain not cancelled"),
    "sigterm": ("engine-no-drain", "did not end with done"),
    "fuzz": ("edge-500-on-temperature", "HTTP 5xx"),
}


@pytest.mark.parametrize("name", list(catalog()))
async def test_the_drill_passes(name: str) -> None:
    [result] = await run_drills([name], SMOKE)
    assert result.passed, (result.failures, result.observed)


@pytest.mark.parametrize("name", list(PLANTED))
async def test_the_drill_catches_its_planted_fault(name: str) -> None:
    planted, symptom = PLANTED[name]
    symptoms = (symptom,) if isinstance(symptom, str) else symptom
    [result] = await run_drills([name], SMOKE, fault=planted)
    assert not result.passed, result.observed
    assert any(s in failure for failure in result.failures for s in symptoms), result.failures


def test_every_drill_has_a_planted_fault() -> None:
    assert set(PLANTED) == set(catalog())


@pytest.mark.parametrize("planted", [None, "edge-leaks-per-request"])
async def test_a_short_soak_sees_no_growth_and_catches_a_leak(planted: str | None,
                                                              tmp_path: Path) -> None:
    async with Env(SMOKE, tmp_path, fault=planted) as env:
        report = await soak(env, minutes=0.2, warmup=0.05, interval=2, log=lambda _: None)
    assert report["requests"] > 100
    if planted is None:
        # 12 s is too short for the connection pools (Redis, gRPC) to reach their working size:
        # a few more descriptors is warm-up here, which `make soak`'s 3 minutes absorb.
        failures = [f for f in report["failures"] if " fds grew " not in f]
        assert not failures, (failures, report["growth"])
    else:
        assert any("edge_http rss_kib grew" in f for f in report["failures"]), report["growth"]

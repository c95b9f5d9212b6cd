"""`make bench`'s check: a run's figures against the committed baseline (bench/baseline.json).

Every figure below is better when lower, and compared for the loads where it means something
(time to first token of one stream, CPU and memory under concurrency, the duration and the gaps
of every stream, no error). One is outside the tolerance when it differs
from the baseline by more than max(tolerance x baseline, the figure's noise floor): worse (the
run fails) or better (listed, so the baseline can be refreshed: `make bench-baseline`). A figure
of the baseline that the run did not measure (a scenario that was skipped) fails the run too.

Figures are only comparable between runs of the same loads on the same machine: other loads are
not compared at all, and a baseline from another machine is compared but never fails the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import fmt

DEFAULT_TOLERANCE = 0.5
"""Whole-chain figures move by 15-30% between runs of the same code on an idle 2-core box, and
by more whenever anything else runs there."""


def _any_load(figures: dict[str, Any]) -> bool:
    return True


def _one_stream(figures: dict[str, Any]) -> bool:
    """Under concurrency, time to first token is the queue (which duration covers)."""
    return bool(figures["load"]["concurrency"] == 1)


def _concurrent(figures: dict[str, Any]) -> bool:
    """One stream's CPU is a few 10 ms ticks of /proc."""
    return bool(figures["load"]["concurrency"] > 1)


def _concurrent_services(figures: dict[str, Any]) -> bool:
    """One stream's memory is the noise of RSS; `direct` measures no service's."""
    return _concurrent(figures) and bool(figures["rss_peak_sampled_kib"])


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    """Dotted path inside one load's figures of a bench report."""
    label: str
    floor: float
    """Differences up to this much are noise whatever the tolerance (the figure's unit)."""
    applies: Callable[[dict[str, Any]], bool] = _any_load
    """Whether the figure is compared for a load (given the load's figures)."""


FIGURES = (
    Figure("ttft_ms.p50", "TTFT p50 ms", 1.0, _one_stream),
    Figure("duration_ms.p50", "duration p50 ms", 2.0),
    # A runnable task can wait a whole scheduling latency (24 ms by default) on a busy core.
    Figure("max_gap_ms.p99", "largest gap p99 ms", 25.0),
    Figure("cpu_ms_per_1k_upstream_tokens.sum", "CPU ms per 1k tokens", 10.0, _concurrent),
    Figure("kib_per_open_stream.sum", "KiB per open stream", 20.0, _concurrent_services),
    Figure("error_count", "errors", 0.0),
    Figure("incomplete", "incomplete streams", 0.0),
)
LABELS = {f.key: f.label for f in FIGURES}
FLOORS = {f.key: f.floor for f in FIGURES}


@dataclass(frozen=True, slots=True)
class Finding:
    """A figure outside the tolerance."""

    key: str
    """`scenario/load/figure`."""
    baseline: float
    measured: float | None
    allowed: float
    verdict: str
    """"worse", "better" or "missing"."""

    @property
    def fails(self) -> bool:
        return self.verdict in ("worse", "missing")


def _lookup(figures: dict[str, Any], dotted: str) -> float | None:
    node: Any = figures
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def extract(report: dict[str, Any]) -> dict[str, float]:
    """`scenario/load/figure` -> value, for every compared figure the report measured."""
    out = {}
    for sc in report["scenarios"]:
        for load, figures in sc["loads"].items():
            for figure in (f for f in FIGURES if f.applies(figures)):
                value = _lookup(figures, figure.key)
                if value is not None:
                    out[f"{sc['scenario']}/{load}/{figure.key}"] = value
    return out


def snapshot(report: dict[str, Any]) -> dict[str, Any]:
    """What bench/baseline.json holds: where and how the figures were measured, and them."""
    return {key: report.get(key) for key in ("when", "commit", "machine", "argv", "loads")} | {
        "figures": extract(report)}


def compare(report: dict[str, Any], baseline: dict[str, Any],
            tolerance: float = DEFAULT_TOLERANCE) -> list[Finding]:
    """Every figure of the baseline that the report has outside the tolerance, or lacks."""
    measured = extract(report)
    findings = []
    for key, base in baseline["figures"].items():
        allowed = max(tolerance * abs(base), FLOORS.get(key.rsplit("/", 1)[-1], 0.0))
        value = measured.get(key)
        if value is None:
            findings.append(Finding(key, base, None, allowed, "missing"))
        elif value > base + allowed:
            findings.append(Finding(key, base, value, allowed, "worse"))
        elif value < base - allowed:
            findings.append(Finding(key, base, value, allowed, "better"))
    return findings


def same_machine(report: dict[str, Any], baseline: dict[str, Any]) -> bool:
    ours, theirs = report.get("machine") or {}, baseline.get("machine") or {}
    return all(ours.get(k) == theirs.get(k) for k in ("cores", "cpu_model", "mem_gib"))


def check(report: dict[str, Any], path: Path, tolerance: float = DEFAULT_TOLERANCE,
          say: Callable[[str], object] = print) -> int:
    """Compare a finished run with the baseline at `path` and say how it went; the exit code
    (1: worse on the same machine). Without a baseline yet, this run becomes it."""
    if not path.exists():
        write(report, path)
        say(f"no baseline yet: wrote {path} from this run (commit it)")
        return 0
    baseline = json.loads(path.read_text())
    where = f"baseline {path} (commit {baseline.get('commit')}, {baseline.get('when')})"
    if baseline.get("loads") != report.get("loads"):
        say(f"not compared with the {where}: it was measured with other loads "
            "(`make bench-baseline` measures a new one)")
        return 0
    findings = compare(report, baseline, tolerance)
    here = same_machine(report, baseline)
    if not here:
        m = baseline.get("machine") or {}
        say(f"note: the baseline comes from another machine ({m.get('cores')} cores, "
            f"{m.get('cpu_model')}): indicative only, it does not fail the run")
    total = len(baseline["figures"])
    say(f"{where}: {len(findings)} of {total} figures outside ±{tolerance:.0%} "
        "(or their noise floor)")
    if findings:
        say("")
        say("| figure | baseline | this run | allowed ± | |")
        say("|---|--:|--:|--:|---|")
        for f in sorted(findings, key=lambda f: (not f.fails, f.key)):
            scenario, load, key = f.key.split("/")
            say(f"| {scenario} {load} {LABELS.get(key, key)} | {fmt(f.baseline, 2)} | "
                f"{fmt(f.measured, 2)} | {fmt(f.allowed, 2)} | "
                f"{'**' + f.verdict + '**' if f.fails else f.verdict} |")
    failed = [f for f in findings if f.fails]
    if failed and here:
        say(f"bench: {len(failed)} figures worse than the baseline beyond the tolerance, or "
            "not measured (a real change: measure it with `make bench-ab`; noise: "
            "`--tolerance`)")
        return 1
    return 0


def write(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(snapshot(report), indent=2) + "\n")

"""`make bench`'s own pieces: a tiny run of the load generator (it starts, measures sane numbers
and stops), the baseline it is compared with, and the helpers of its figures.

One small load (C=2, 20 tokens, 6 streams) direct and through the chain, plus the pure logic of
the bench config and of the peer comparison (no peer needed); the real loads are
`make bench`, which is not part of `make test` (nor are the one-time bench/experiments/).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import baseline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """One tiny run with a baseline file that does not exist yet: (report, baseline, stdout)."""
    tmp = tmp_path_factory.mktemp("bench")
    out, first = tmp / "smoke", tmp / "baseline.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--loads", "smoke:2:20:0:6",
         "--scenarios", "direct,sse-sim,sse-up", "--out", str(out), "--quiet",
         "--hard-timeout", "60", "--baseline", str(first)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.with_suffix(".md").read_text() in proc.stdout  # the tables, printed
    report = json.loads(out.with_suffix(".json").read_text())
    skipped = {s["scenario"]: s["skipped"] for s in report["scenarios"] if s["skipped"]}
    assert not skipped, skipped
    return report, first, proc.stdout


def test_bench_smoke_run_produces_sane_figures(smoke: tuple[dict[str, Any], Path, str]) -> None:
    report, _, stdout = smoke
    assert "cores: " in stdout
    assert "| direct | smoke |" in stdout and "| sse-up | smoke |" in stdout

    scenarios = {s["scenario"]: s for s in report["scenarios"]}
    assert set(scenarios) == {"direct", "sse-sim", "sse-up"}
    for key, sc in scenarios.items():
        fig = sc["loads"]["smoke"]
        assert fig["streams"] == 6, key
        assert fig["error_count"] == 0, (key, fig["errors"])
        assert fig["all_tokens_delivered"], key
        assert fig["delivered_tokens"] == 6 * 20, key
        assert fig["upstream_tokens"] == 6 * 20, key
        assert fig["ttft_ms"]["p50"] > 0 and fig["ttft_ms"]["p99"] >= fig["ttft_ms"]["p50"]
        assert fig["duration_ms"]["p50"] >= fig["ttft_ms"]["p50"]
        assert fig["tokens_per_s"] > 0
        # Every process's CPU is reported, and per 1,000 of the upstream's tokens.
        assert {"upstream", "generator"} <= fig["cpu_ms"].keys(), key
        assert fig["cpu_ms_per_1k_upstream_tokens"] == {
            name: round(ms * 1000 / fig["upstream_tokens"], 1)
            for name, ms in fig["cpu_ms"].items()}, key
    for key in ("sse-sim", "sse-up"):
        fig = scenarios[key]["loads"]["smoke"]
        per_1k = fig["cpu_ms_per_1k_upstream_tokens"]
        assert {"edge_http", "prompt", "llm_engine", "sum"} <= per_1k.keys()
        assert per_1k["sum"] > 0  # three Python services cannot relay 120 tokens for free
        assert all(v > 0 for v in fig["rss_idle_kib"].values())
        assert "added_ttft_ms_vs_direct" in fig
        # Scraped from each service's /metrics before and after the load.
        assert set(fig["gc_pauses"]) == {"edge_http", "prompt", "llm_engine"}, fig["gc_pauses"]
        assert all(p["collections"] >= p["over_10ms"] >= 0 for p in fig["gc_pauses"].values())
    assert any(t["target"].startswith("C=") for t in report["targets"]) is False  # custom load


def test_the_first_run_writes_the_baseline(smoke: tuple[dict[str, Any], Path, str]) -> None:
    report, path, stdout = smoke
    assert f"no baseline yet: wrote {path}" in stdout
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(baseline.snapshot(report)))
    assert written["loads"] == report["loads"] and written["machine"] == report["machine"]
    assert written["figures"]["sse-up/smoke/duration_ms.p50"] == \
        report["scenarios"][2]["loads"]["smoke"]["duration_ms"]["p50"]
    # C=2: all but one stream's TTFT, for each scenario; `direct` has no services' CPU or memory.
    assert len(written["figures"]) == 3 * (len(baseline.FIGURES) - 1) - 2 == 16
    # A run is within any tolerance of itself.
    assert baseline.compare(report, written) == []
    said: list[str] = []
    assert baseline.check(report, path, say=said.append) == 0
    assert "0 of 16 figures outside" in said[0]


def _changed(report: dict[str, Any], scenario: str, dotted: str,
             change: Callable[[float], float]) -> dict[str, Any]:
    """A copy of the report with one figure of the smoke load changed."""
    out = copy.deepcopy(report)
    fig = next(s for s in out["scenarios"] if s["scenario"] == scenario)["loads"]["smoke"]
    *parents, leaf = dotted.split(".")
    for part in parents:
        fig = fig[part]
    fig[leaf] = change(fig[leaf])
    return out


def test_figures_outside_the_tolerance_are_named_and_fail_the_run(
        smoke: tuple[dict[str, Any], Path, str]) -> None:
    report, path, _ = smoke
    slower = _changed(report, "sse-up", "duration_ms.p50", lambda v: v * 3)
    said: list[str] = []
    assert baseline.check(slower, path, say=said.append) == 1
    text = "\n".join(said)
    assert "1 of 16 figures outside ±50%" in text
    assert "| sse-up smoke duration p50 ms |" in text and "**worse**" in text
    # Wider tolerance: noise.
    assert baseline.check(slower, path, tolerance=2.5, say=said.append) == 0
    # Better beyond the tolerance is listed, and passes.
    slow_baseline = json.loads(path.read_text())
    slow_baseline["figures"]["sse-up/smoke/duration_ms.p50"] += 1000
    [finding] = baseline.compare(report, slow_baseline)
    assert (finding.verdict, finding.fails) == ("better", False)
    # One error where the baseline had none is outside any relative tolerance.
    [finding] = baseline.compare(_changed(report, "direct", "error_count", lambda v: v + 1),
                                 json.loads(path.read_text()), tolerance=10)
    assert finding.key == "direct/smoke/error_count" and finding.verdict == "worse"


def test_a_missing_scenario_fails_and_other_loads_or_machines_do_not(
        smoke: tuple[dict[str, Any], Path, str]) -> None:
    report, path, _ = smoke
    said: list[str] = []
    skipped = copy.deepcopy(report)
    skipped["scenarios"] = [s for s in skipped["scenarios"] if s["scenario"] != "sse-sim"]
    assert baseline.check(skipped, path, say=said.append) == 1
    assert said[-1].startswith("bench: 6 figures worse")  # all of sse-sim: not measured
    elsewhere = _changed(report, "sse-up", "duration_ms.p50", lambda v: v * 3)
    elsewhere["machine"] = {**elsewhere["machine"], "cores": 64}
    assert baseline.check(elsewhere, path, say=said.append) == 0
    other_loads = copy.deepcopy(report)
    other_loads["loads"][0]["streams"] = 60
    said.clear()
    assert baseline.check(other_loads, path, say=said.append) == 0
    assert said[0].startswith("not compared")


def test_gc_figures_count_the_load_only_and_find_the_longest_bucket() -> None:
    from bench.run import _gc_figures

    inf = float("inf")
    before = {"edge_http": {"0": {0.001: 5, 0.01: 9, 0.025: 9, inf: 9},
                            "2": {0.001: 0, 0.01: 0, 0.1: 1, inf: 1}}}
    after = {"edge_http": {"0": {0.001: 8, 0.01: 14, 0.025: 15, inf: 15},
                           "2": {0.001: 0, 0.01: 0, 0.1: 2, inf: 2}}}
    fig = _gc_figures(before, after)["edge_http"]
    assert fig == {"collections": 7, "over_10ms": 2,
                   "over_10ms_by_generation": {"0": 1, "2": 1}, "longest_up_to_ms": 100.0}


def test_prompt_bytes_pads_the_user_message_and_the_report_says_so() -> None:
    from bench.client import SSE, request_body
    from bench.report import prompt_note

    short = request_body(SSE, "m", 5)["messages"][0]["content"]
    long = request_body(SSE, "m", 5, 16384)["messages"][0]["content"]
    assert long.startswith(short) and len(long.encode()) == 16384
    assert prompt_note({"loads": [{"prompt_bytes": 0}]}) == []
    assert "16384 bytes" in prompt_note({"loads": [{"prompt_bytes": 16384}]})[-1]


def test_bench_children_get_a_session_of_their_own_unless_one_session(tmp_path: Path) -> None:
    import os

    from bench.run import parse_args
    from promptline.devtools import procstat

    own = procstat.Child("own", ["sleep", "30"], env=dict(os.environ), cwd=str(tmp_path),
                         log_path=tmp_path / "own.log")
    shared = procstat.Child("shared", ["sleep", "30"], env=dict(os.environ), cwd=str(tmp_path),
                            log_path=tmp_path / "shared.log", own_session=False)
    try:
        assert os.getsid(own.pid) == own.pid
        # Still its own process group, so the bench's Ctrl-C and kill_all work as before.
        assert os.getsid(shared.pid) == os.getsid(0) and os.getpgid(shared.pid) == shared.pid
    finally:
        own.stop(grace=1)
        shared.stop(grace=1)
    assert parse_args(["--one-session"]).one_session and not parse_args([]).one_session


def _load_figures(concurrency: int, *, ttft: float = 10.0, added: float = 8.0,
                  duration: float = 1.05, gap: float = 50.0, cpu: float = 100.0,
                  kib: float = 40.0, errors: int = 0) -> dict[str, Any]:
    """The figures of one load that the peer comparison reads (a made-up run)."""
    return {
        "load": {"concurrency": concurrency}, "ttft_ms": {"p50": ttft},
        "added_ttft_ms_vs_direct": {"p50": added}, "duration_ms": {"p50": duration * 1000},
        "duration_p50_vs_direct": duration, "max_gap_ms": {"p99": gap},
        "cpu_ms_per_1k_upstream_tokens": {"sum": cpu}, "kib_per_open_stream": {"sum": kib},
        "rss_peak_sampled_kib": {"p": 1024 * 100}, "error_count": errors, "incomplete": 0,
        "delivered_tokens": 400 - 200 * errors, "streams": 2, "expected_tokens_per_stream": 200,
        "all_tokens_delivered": errors == 0,
    }


def _peer_report(**ours: dict[str, Any]) -> dict[str, Any]:
    def scenario(key: str, c1: dict[str, Any], c50: dict[str, Any], c200: dict[str, Any]
                 ) -> dict[str, Any]:
        return {"scenario": key, "label": key, "skipped": None,
                "loads": {"c1": c1, "c50": c50, "c200": c200}}

    base = {"c1": _load_figures(1), "c50": _load_figures(50), "c200": _load_figures(200)}
    return {"scenarios": [
        scenario("openai-up", **{**base, **ours}),
        scenario("openai-up-noshape", **base),
        scenario("openai-up-ref", **base),
        scenario("litellm", _load_figures(1, added=20.0), _load_figures(50, cpu=500.0),
                 _load_figures(200, cpu=600.0, kib=300.0, duration=1.5)),
        scenario("portkey", _load_figures(1, added=30.0), _load_figures(50, cpu=80.0),
                 _load_figures(200, cpu=200.0, kib=500.0, duration=1.02)),
        {"scenario": "sse-up", "label": "sse-up", "skipped": "chain did not start", "loads": {}},
    ]}


def test_peer_ratios_and_issue_20_targets() -> None:
    from bench.report import evaluate_peer_targets, peer_ratios, peer_tables, ratio, target_lines

    assert ratio(50.0, 200.0) == 0.25 and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    report = _peer_report()
    rows = peer_ratios(report)
    index = {(r["scenario"], r["load"], r["figure"]): r for r in rows}
    cpu = index["openai-up", "c50", "cpu_per_1k"]
    assert cpu["value"] == 100.0 and cpu["peers"] == {"litellm": 500.0, "portkey": 80.0}
    assert cpu["ratios"] == {"litellm": 0.2, "portkey": 1.25}
    # One stream's TTFT, memory and gaps under concurrency only; no skipped scenario's rows.
    assert ("openai-up", "c1", "added_ttft_p50") in index
    assert ("openai-up", "c200", "added_ttft_p50") not in index
    assert ("openai-up", "c1", "kib_per_stream") not in index
    assert not any(r["scenario"].startswith("sse-up") for r in rows)
    assert {r["scenario"] for r in rows} == {"openai-up", "openai-up-noshape", "openai-up-ref"}

    targets = {(t["target"], t["scenario"]): t for t in evaluate_peer_targets(report)}
    status = {key[0]: t["pass"] for key, t in targets.items() if key[1] == "openai-up"}
    assert status == {
        "C=200 CPU per 1k tokens (3 services)": True,         # 100 <= 200
        "C=200 stream duration p50 / direct": False,          # 1.05 > 1.02
        "C=200 zero errors, every token in order": True,
        "C=1 added TTFT p50 <= 0.5 x the better peer's": True,  # 8 <= 0.5 x 20 (LiteLLM)
        "C=50 unpaced CPU per 1k tokens (3 services)": False,   # 100 > 80
        "C=200 memory per open stream (3 services)": True,
        "C=50 memory per open stream (3 services)": True,
    }
    assert "vs LiteLLM 20.00 ms (0.40x)" in targets[
        "C=1 added TTFT p50 <= 0.5 x the better peer's", "openai-up"]["measured"]
    same = targets["without shaping (coalesce_ms 0): no regression beyond noise",
                   "openai-up-noshape"]
    assert same["pass"] is True and same["measured"].startswith("0 of ")

    # Slower unshaped than the reference beyond the tolerance: named, and failed.
    worse = _peer_report()
    worse["scenarios"][1]["loads"]["c200"] = _load_figures(200, cpu=300.0)
    [row] = [t for t in evaluate_peer_targets(worse) if t["scenario"] == "openai-up-noshape"]
    assert row["pass"] is False
    assert "c200/cpu_ms_per_1k_upstream_tokens.sum 300.00 vs 100.00" in row["measured"]
    # Errors at C=200 fail that target; without a reference the regression one is n/a.
    broken = _peer_report(c200=_load_figures(200, errors=1))
    broken["scenarios"] = [s for s in broken["scenarios"] if s["scenario"] != "openai-up-ref"]
    targets = {(t["target"], t["scenario"]): t for t in evaluate_peer_targets(broken)}
    assert targets["C=200 zero errors, every token in order", "openai-up"]["pass"] is False
    assert targets["without shaping (coalesce_ms 0): no regression beyond noise",
                   "openai-up-noshape"]["pass"] is None
    # No peer and no reference: nothing to compare, and the tables say nothing about peers.
    alone = {"scenarios": _peer_report()["scenarios"][:2]}
    assert peer_ratios(alone) == [] and evaluate_peer_targets(alone) == []

    report["peer_ratios"] = rows
    text = "\n".join(peer_tables(report) + target_lines("T", evaluate_peer_targets(report)))
    assert "## Against the peers" in text and "### `openai-up`" in text
    assert "| c50 | CPU ms / 1k tokens | 100.00 | 100.00 | 100.00 | 500.00 | 80.00 | " \
           "0.20x | 1.25x | 0.20x | 1.25x | 0.20x | 1.25x |" in text
    assert "| C=50 unpaced CPU per 1k tokens (3 services) | openai-up | 100.00 ms vs 80.00 ms " \
           "(1.25x) | <= Portkey's | **FAIL** |" in text


def test_the_bench_config_has_the_realistic_tenant_and_the_shaping_variant(
        tmp_path: Path) -> None:
    from bench.run import LOADS, TENANT_QUOTAS, Stack, chain_scenarios
    from promptline.config import load_config

    stack = Stack(tmp_path, [LOADS["c1"], LOADS["c200"]])
    stack.upstream_port = 9
    ports = {"edge_http": 1, "prompt": 2, "llm_engine": 3}
    default, off = stack.config(ports), stack.config(ports, coalesce_ms=0)
    assert default["tenants"][0]["quotas"] == TENANT_QUOTAS
    assert len(default["moderation"]["blocked_terms"]) == 1
    assert all("stream" not in m for m in default["models"])  # the config's default shaping
    assert all(m["stream"] == {"coalesce_ms": 0} for m in off["models"])
    for cfg in (default, off):  # what the services will load
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        config = load_config(str(path))
        assert config.tenants[0].quotas.qpm == TENANT_QUOTAS["qpm"]
    assert {m.stream.coalesce_ms for m in config.models} == {0}
    stack.plain_tenant = True
    plain = stack.config(ports)
    assert "quotas" not in plain["tenants"][0] and "moderation" not in plain
    keys = [s.key for s in chain_scenarios(unshaped=True, ref=True)]
    assert keys == ["direct", "sse-sim", "sse-up", "sse-up-noshape", "sse-up-ref", "openai-up",
                    "openai-up-noshape", "openai-up-ref"]
    assert [s.key for s in chain_scenarios(unshaped=False, ref=False)] == [
        "direct", "sse-sim", "sse-up", "openai-up"]

"""A tiny run of the bench harness (`make bench`): it starts, measures sane numbers and stops.

One small load (C=2, 20 tokens, 6 streams) direct and through the chain; the real loads are
`make bench`, which is not part of `make test`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_produces_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--loads", "smoke:2:20:0:6",
         "--scenarios", "direct,sse-sim,sse-up", "--out", str(out), "--quiet",
         "--hard-timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cores: " in proc.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md").read_text()
    assert "| direct | smoke |" in markdown and "| sse-up | smoke |" in markdown

    scenarios = {s["scenario"]: s for s in report["scenarios"]}
    assert set(scenarios) == {"direct", "sse-sim", "sse-up"}
    for key, sc in scenarios.items():
        fig = sc["loads"]["smoke"]
        assert fig["streams"] == 6, key
        assert fig["error_count"] == 0, (key, fig["errors"])
        assert fig["all_tokens_delivered"], key
        assert fig["delivered_tokens"] == 6 * 20, key
        assert fig["ttft_ms"]["p50"] > 0 and fig["ttft_ms"]["p99"] >= fig["ttft_ms"]["p50"]
        assert fig["duration_ms"]["p50"] >= fig["ttft_ms"]["p50"]
        assert fig["tokens_per_s"] > 0
        assert fig["cpu_ms"]["upstream"] >= 0 and fig["cpu_ms"]["generator"] >= 0
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
    assert scenarios["sse-up"]["loads"]["smoke"]["upstream_tokens"] == 6 * 20
    assert any(t["target"].startswith("C=") for t in report["targets"]) is False  # custom load


def test_floor_smoke_run_measures_bare_grpc_and_our_hops(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| bare grpc.aio: backend + 2 relays |" in proc.stdout
    result = json.loads(out.read_text())
    bare = {label: p50 for label, p50, _p90 in result["bare_ttft_ms"]}
    # Each relay is one more process on the path: the first message arrives later, never sooner.
    assert 0 < bare["backend (one hop)"] < bare["backend + 2 relays"]
    paced = result["bare_paced"]
    assert paced["messages"] == paced["streams"] * paced["messages_per_stream"]
    assert set(paced["cpu_us_per_message"]) == {"backend", "relay1", "relay2"}
    assert all(v > 0 for v in paced["cpu_us_per_message"].values())
    assert paced["cpu_us_per_message_sum"] == sum(paced["cpu_us_per_message"].values())
    # The backend paces against its own start, which is after the client's: never faster.
    assert paced["duration_p50_vs_ideal"] >= 1.0
    assert 0 < paced["gap_p99_ms"] < 1000 * paced["wall_s"]
    assert "| largest gap between messages p99 |" in proc.stdout
    hops = {(model, hop): p50 for model, hop, p50, _p90 in result["chain_ttft_ms"]}
    assert len(hops) == 6 and all(v > 0 for v in hops.values())
    # The edge relays what the prompt service streams, which relays the engine.
    assert hops[("sim-1x0ms", "gRPC to llm_engine")] < hops[("sim-1x0ms", "HTTP to the edge")]


def test_provider_bench_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "provider.json"
    proc = subprocess.run([sys.executable, "-m", "bench.provider", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "time to first chunk" in proc.stdout
    result = json.loads(out.read_text())
    assert 0 < result["ttft_ms"]["p50"] <= result["ttft_ms"]["p90"]
    assert result["burst_cpu_ms_per_stream"] > 0 and result["paced_cpu_us_per_chunk"] > 0


def test_ab_smoke_run_interleaves_two_chains(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "-m", "bench.ab", "--root", str(ROOT), "--quick",
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| A |" in proc.stdout and "| B |" in proc.stdout
    result = json.loads(out.read_text())
    for side in ("A", "B"):
        fig = result["sides"][side]
        assert fig["n"] == result["rounds"] * result["streams"]
        assert 0 < fig["p50"] <= fig["p90"] <= fig["p99"]


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

    from bench import procstat
    from bench.run import parse_args

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

"""Issue #7's targets checked against a bench report, and the report as markdown tables."""

from __future__ import annotations

from typing import Any

from bench.stats import fmt

CHAIN = ("sse-sim", "sse-up", "openai-up")
VS_UPSTREAM = ("sse-up", "openai-up")
SERVICE_COLUMNS = (("edge_http", "edge"), ("prompt", "prompt"), ("llm_engine", "engine"))


def _fig(report: dict[str, Any], scenario: str, load: str) -> dict[str, Any] | None:
    for sc in report["scenarios"]:
        if sc["scenario"] == scenario:
            return sc["loads"].get(load)
    return None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, scenario) that the run measured: measured value, limit, pass."""
    rows: list[dict[str, Any]] = []

    def add(target: str, scenario: str, measured: Any, limit: str, ok: bool | None) -> None:
        rows.append({"target": target, "scenario": scenario, "measured": measured,
                     "limit": limit, "pass": ok})

    for sc in VS_UPSTREAM:
        fig = _fig(report, sc, "c1")
        if fig and "added_ttft_ms_vs_direct" in fig:
            added = fig["added_ttft_ms_vs_direct"]
            p50, p99 = added["p50"], added["p99"]
            add("C=1 added TTFT p50", sc, p50, "<= 3 ms", p50 is not None and p50 <= 3)
            add("C=1 added TTFT p99", sc, p99, "<= 10 ms", p99 is not None and p99 <= 10)
    for sc in CHAIN:
        fig = _fig(report, sc, "c50")
        if fig:
            v = fig["cpu_ms_per_1k_upstream_tokens"].get("sum")
            add("C=50 CPU edge+prompt+engine per 1k upstream tokens", sc, v, "<= 150 ms",
                v is not None and v <= 150)
    for sc in CHAIN:
        fig = _fig(report, sc, "c200")
        if not fig:
            continue
        add("C=200 zero errors", sc, fig["error_count"], "0", fig["error_count"] == 0)
        add("C=200 every token delivered", sc,
            f"{fig['delivered_tokens']}/{fig['streams'] * fig['expected_tokens_per_stream']}",
            "all", fig["all_tokens_delivered"])
        ratio = fig.get("duration_p50_vs_direct")
        add("C=200 stream duration p50 vs direct", sc,
            None if ratio is None else f"{ratio:.3f}x", "<= 1.10x",
            None if ratio is None else ratio <= 1.10)
        gap = fig["max_gap_ms"]["p99"]
        add("C=200 largest delivery gap p99", sc, gap, "<= 100 ms",
            gap is not None and gap <= 100)
        kib = fig["kib_per_open_stream"].get("sum")
        add("C=200 memory per open stream (3 services)", sc, kib, "<= 50 KiB",
            kib is not None and kib <= 50)
    return rows


def gc_cell(pauses: dict[str, dict[str, Any]] | None) -> str:
    """`n (longest <= x ms)` over the services that report GC pauses; `-` when none does."""
    if not pauses:
        return "-"
    over = sum(p["over_10ms"] for p in pauses.values())
    bounds = [p["longest_up_to_ms"] for p in pauses.values() if p["longest_up_to_ms"]]
    longest = f" (longest <= {fmt(max(bounds))} ms)" if bounds else ""
    return f"{over}{longest}"


def prompt_note(report: dict[str, Any]) -> list[str]:
    """A line naming the padded prompt size, when the run used one (`--prompt-bytes`)."""
    sizes = {load.get("prompt_bytes", 0) for load in report.get("loads", [])} - {0}
    if not sizes:
        return []
    return ["", f"Every request's user message padded to {max(sizes)} bytes (`--prompt-bytes`)."]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Promptline bench — {report['when']}",
        "",
        f"cores: {m['cores']} · CPU: {m['cpu_model']} · memory: {m['mem_gib']} GiB · "
        f"Python {m['python']} · {'quick' if report['quick'] else 'full'} run, "
        f"{report['run_seconds']} s",
        "",
        "The load generator and the upstream share these cores with the services under test.",
        "Every process in the bench's session (`--one-session`)." if report.get("one_session")
        else "Each service, the upstream and LiteLLM in a session of its own.",
        *prompt_note(report),
        "",
        "## Latency and delivery",
        "",
        "| scenario | load | C | tokens x delay | streams | TTFT p50 / p99 ms | added TTFT "
        "p50 / p99 ms | duration p50 / p99 ms | dur p50 / direct | tokens/s | gap p99 ms | "
        "errors | incomplete |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    skipped = []
    for sc in report["scenarios"]:
        if sc.get("skipped"):
            skipped.append(f"- `{sc['scenario']}` ({sc['label']}): {sc['skipped']}")
            continue
        for name, f in sc["loads"].items():
            load = f["load"]
            added = f.get("added_ttft_ms_vs_direct") or {}
            ratio = f.get("duration_p50_vs_direct")
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(f["errors"].items())) or "0"
            lines.append(
                f"| {sc['scenario']} | {name} | {load['concurrency']} | "
                f"{load['tokens']} x {load['delay_ms']} ms | {f['streams']} | "
                f"{fmt(f['ttft_ms']['p50'], 2)} / {fmt(f['ttft_ms']['p99'], 2)} | "
                f"{fmt(added.get('p50'), 2)} / {fmt(added.get('p99'), 2)} | "
                f"{fmt(f['duration_ms']['p50'])} / {fmt(f['duration_ms']['p99'])} | "
                f"{'-' if ratio is None else f'{ratio:.3f}'} | {fmt(f['tokens_per_s'], 0)} | "
                f"{fmt(f['max_gap_ms']['p99'])} | {errors} | {f['incomplete']} |")
    lines += [
        "",
        "## CPU and memory",
        "",
        "CPU-ms per 1,000 upstream tokens (the provider's tokens; for `sse-sim`, the simulated "
        "provider's). `sum` = edge + prompt + engine (LiteLLM: its process tree). Generator = "
        "this bench's own client process, as % of one core over the load. GC = Python collections "
        "over 10 ms in the three services during the load (each one stalls every stream of its "
        "process) and the histogram bucket of the longest one.",
        "",
        "| scenario | load | edge | prompt | engine | **sum** | upstream | redis | generator | "
        "generator % core | peak RSS MiB (sum) | KiB / open stream (sum) | GC > 10 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for sc in report["scenarios"]:
        if sc.get("skipped"):
            continue
        for name, f in sc["loads"].items():
            per = f["cpu_ms_per_1k_upstream_tokens"]
            cells = [fmt(per.get(key)) for key, _ in SERVICE_COLUMNS]
            peak = sum(f["rss_peak_sampled_kib"].values()) / 1024 if f["rss_peak_sampled_kib"] \
                else None
            kib = f["kib_per_open_stream"].get("sum") if f["rss_peak_sampled_kib"] else None
            total = per.get("litellm") if sc["scenario"] == "litellm" else per.get("sum")
            lines.append(
                f"| {sc['scenario']} | {name} | {' | '.join(cells)} | **{fmt(total)}** | "
                f"{fmt(per.get('upstream'))} | {fmt(per.get('redis'))} | "
                f"{fmt(per.get('generator'))} | {fmt(f['generator_cpu_pct_of_one_core'], 0)} | "
                f"{fmt(peak)} | {fmt(kib)} | {gc_cell(f.get('gc_pauses'))} |")
    if report.get("targets"):
        lines += ["", "## Targets (issue #7)", "",
                  "| target | scenario | measured | limit | status |", "|---|---|--:|---|---|"]
        for t in report["targets"]:
            status = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "**FAIL**")
            lines.append(f"| {t['target']} | {t['scenario']} | {t['measured']} | {t['limit']} | "
                         f"{status} |")
    if skipped:
        lines += ["", "## Skipped", "", *skipped]
    return "\n".join(lines) + "\n"

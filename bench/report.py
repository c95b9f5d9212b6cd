"""Issue #7's targets checked against a bench report; our figures as ratios to the peers' (the
LiteLLM proxy and the Portkey gateway on the same upstream, loads and client) and issue 20's
targets on them; the report as markdown tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import baseline
from bench.stats import fmt

CHAIN = ("sse-sim", "sse-up", "openai-up")
SERVICE_COLUMNS = (("edge_http", "edge"), ("prompt", "prompt"), ("llm_engine", "engine"))


def _fig(report: dict[str, Any], scenario: str, load: str) -> dict[str, Any] | None:
    for sc in report["scenarios"]:
        if sc["scenario"] == scenario:
            return sc["loads"].get(load)
    return None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks every run makes of our chain, peers or not: at C=200, zero errors and every
    token delivered in order. (Speed and memory are judged against the peers, `peer_targets`,
    and against the committed baseline, `make bench`: absolute limits do not hold on a shared
    2-core box.)"""
    rows: list[dict[str, Any]] = []
    for sc in CHAIN:
        fig = _fig(report, sc, "c200")
        if not fig:
            continue
        rows.append({"target": "C=200 zero errors", "scenario": sc,
                     "measured": fig["error_count"], "limit": "0",
                     "pass": fig["error_count"] == 0})
        rows.append({"target": "C=200 every token delivered, in order", "scenario": sc,
                     "measured": f"{fig['delivered_tokens']}/"
                                 f"{fig['streams'] * fig['expected_tokens_per_stream']}",
                     "limit": "all", "pass": fig["all_tokens_delivered"]})
    return rows


# --- against the peers (issue 20) --------------------------------------------------------------

PEERS = (("litellm", "LiteLLM"), ("portkey", "Portkey"))
FAMILIES = (("openai-up", "openai-up-noshape"), ("sse-up", "sse-up-noshape"))
"""Our scenarios compared with the peers: (default shaping, shaping off). `openai-up` speaks
the peers' wire (/v1/chat/completions), so it is the like-for-like one."""
VARIANT_LABELS = {"": "default shaping", "-noshape": "coalesce_ms 0", "-ref": "--ref checkout"}


def _one(f: dict[str, Any]) -> bool:
    return bool(f["load"]["concurrency"] == 1)


def _many(f: dict[str, Any]) -> bool:
    return bool(f["load"]["concurrency"] > 1)


def _always(f: dict[str, Any]) -> bool:
    return True


def _peak_mib(f: dict[str, Any]) -> float | None:
    peaks = f.get("rss_peak_sampled_kib") or {}
    return round(sum(peaks.values()) / 1024, 1) if peaks else None


RATIO_FIGURES: tuple[tuple[str, str, Callable[[dict[str, Any]], Any],
                           Callable[[dict[str, Any]], bool]], ...] = (
    ("ttft_p50", "TTFT p50 ms", lambda f: f["ttft_ms"]["p50"], _one),
    ("added_ttft_p50", "added TTFT p50 ms",
     lambda f: (f.get("added_ttft_ms_vs_direct") or {}).get("p50"), _one),
    ("duration_vs_direct", "duration p50 / direct", lambda f: f.get("duration_p50_vs_direct"),
     _always),
    ("gap_p99", "largest gap p99 ms", lambda f: f["max_gap_ms"]["p99"], _many),
    ("cpu_per_1k", "CPU ms / 1k tokens", lambda f: f["cpu_ms_per_1k_upstream_tokens"].get("sum"),
     _always),
    ("kib_per_stream", "KiB / open stream", lambda f: f["kib_per_open_stream"].get("sum"), _many),
    ("peak_rss_mib", "peak RSS MiB", _peak_mib, _always),
    ("errors", "errors + incomplete", lambda f: f["error_count"] + f["incomplete"], _always),
)
"""(key, label, value of one load's figures, whether it means something for that load): one
stream's time to first token; memory and gaps under concurrency. Every one is better lower."""


def ratio(ours: float | None, peer: float | None) -> float | None:
    """ours / peer, rounded; None when either is missing or the peer's is not positive."""
    if ours is None or peer is None or peer <= 0:
        return None
    return round(ours / peer, 3)


def _scenario(report: dict[str, Any], key: str) -> dict[str, Any] | None:
    sc: dict[str, Any]
    for sc in report["scenarios"]:
        if sc["scenario"] == key and not sc.get("skipped"):
            return sc
    return None


def peer_ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (our scenario, load, figure) where a peer was measured: our value, each
    peer's, and ours / theirs. Empty when no peer ran."""
    peers = {key: sc for key, _ in PEERS if (sc := _scenario(report, key)) is not None}
    if not peers:
        return []
    rows = []
    for family in FAMILIES:
        for variant in (family[0], family[1], f"{family[0]}-ref"):
            ours = _scenario(report, variant)
            if ours is None:
                continue
            for load, fig in ours["loads"].items():
                for key, label, value, applies in RATIO_FIGURES:
                    if not applies(fig):
                        continue
                    mine = value(fig)
                    theirs = {p: (value(sc["loads"][load]) if load in sc["loads"] else None)
                              for p, sc in peers.items()}
                    rows.append({"scenario": variant, "load": load, "figure": key,
                                 "label": label, "value": mine, "peers": theirs,
                                 "ratios": {p: ratio(mine, v) if key != "errors" else None
                                            for p, v in theirs.items()}})
    return rows


def _measured(ours: float | None, peer: float | None, unit: str = "") -> str:
    r = ratio(ours, peer)
    return (f"{fmt(ours, 2)}{unit} vs {fmt(peer, 2)}{unit}"
            + ("" if r is None else f" ({r:.2f}x)"))


def evaluate_peer_targets(report: dict[str, Any],
                          tolerance: float = baseline.DEFAULT_TOLERANCE) -> list[dict[str, Any]]:
    """Issue 20's targets, for each of our default-shaped scenarios (`openai-up`, `sse-up`)
    the run measured, when a peer ran: measured, limit, pass (None: a figure is missing).
    "Without shaping, no regression" compares each `-noshape` scenario with the same path on
    the --ref checkout in the same run, within `tolerance` (or each figure's noise floor, as
    `make bench` does)."""
    rows: list[dict[str, Any]] = []
    peers_ran = [key for key, _ in PEERS if _scenario(report, key) is not None]
    has_ref = any(_scenario(report, f"{f[0]}-ref") for f in FAMILIES)
    if not peers_ran and not has_ref:
        return rows

    def add(target: str, scenario: str, measured: Any, limit: str, ok: bool | None) -> None:
        rows.append({"target": target, "scenario": scenario, "measured": measured,
                     "limit": limit, "pass": ok})

    def fig(scenario: str, load: str) -> dict[str, Any] | None:
        sc = _scenario(report, scenario)
        return sc["loads"].get(load) if sc else None

    def vs_portkey(target: str, scenario: str, load: str,
                   value: Callable[[dict[str, Any]], float | None], unit: str) -> None:
        ours, peer = fig(scenario, load), fig("portkey", load)
        a = value(ours) if ours else None
        b = value(peer) if peer else None
        note = "" if peer else " (Portkey not measured)"
        add(target, scenario, _measured(a, b, unit) + note, "<= Portkey's",
            None if a is None or b is None else a <= b)

    def cpu(f: dict[str, Any]) -> float | None:
        value: float | None = f["cpu_ms_per_1k_upstream_tokens"].get("sum")
        return value

    def duration(f: dict[str, Any]) -> float | None:
        value: float | None = f.get("duration_p50_vs_direct")
        return value

    def kib(f: dict[str, Any]) -> float | None:
        value: float | None = f["kib_per_open_stream"].get("sum")
        return value

    def added(f: dict[str, Any]) -> float | None:
        value: float | None = (f.get("added_ttft_ms_vs_direct") or {}).get("p50")
        return value

    for scenario, _ in FAMILIES:
        if _scenario(report, scenario) is None or not peers_ran:
            continue
        if fig(scenario, "c200"):
            vs_portkey("C=200 CPU per 1k tokens (3 services)", scenario, "c200", cpu, " ms")
            vs_portkey("C=200 stream duration p50 / direct", scenario, "c200", duration, "x")
            f = fig(scenario, "c200")
            assert f is not None
            add("C=200 zero errors, every token in order", scenario,
                f"{f['error_count']} errors, {f['incomplete']} incomplete, "
                f"{f['delivered_tokens']}/{f['streams'] * f['expected_tokens_per_stream']} "
                "tokens", "0, all in order", f["all_tokens_delivered"])
        if fig(scenario, "c1"):
            ours = fig(scenario, "c1")
            assert ours is not None
            theirs = {name: added(f) for key, name in PEERS if (f := fig(key, "c1"))}
            positive = {n: v for n, v in theirs.items() if v is not None and v > 0}
            best = min(positive, key=lambda n: positive[n]) if positive else None
            a = added(ours)
            if best is None:
                add("C=1 added TTFT p50 <= 0.5 x the better peer's", scenario,
                    f"{fmt(a, 2)} ms (no peer's measured)", "<= 0.5x", None)
            else:
                b = positive[best]
                r = ratio(a, b)
                add("C=1 added TTFT p50 <= 0.5 x the better peer's", scenario,
                    f"{fmt(a, 2)} ms vs {best} {fmt(b, 2)} ms"
                    + ("" if r is None else f" ({r:.2f}x)"), "<= 0.5x",
                    None if a is None else a <= 0.5 * b)
        if fig(scenario, "c50"):
            vs_portkey("C=50 unpaced CPU per 1k tokens (3 services)", scenario, "c50", cpu, " ms")
        for load in ("c200", "c50"):
            if fig(scenario, load):
                vs_portkey(f"{load.replace('c', 'C=')} memory per open stream (3 services)",
                           scenario, load, kib, " KiB")
    for shaped, unshaped in FAMILIES:
        if _scenario(report, unshaped) is None:
            continue
        reference = _scenario(report, f"{shaped}-ref")
        target = "without shaping (coalesce_ms 0): no regression beyond noise"
        limit = f"each figure within +{tolerance:.0%} (or its noise floor) of --ref"
        if reference is None:
            add(target, unshaped, "no reference in this run (--ref / BENCH_REF)", limit, None)
            continue
        worse, compared = regression(report, unshaped, f"{shaped}-ref", tolerance)
        add(target, unshaped,
            f"{len(worse)} of {compared} figures worse"
            + (": " + "; ".join(f"{f.key.split('/', 1)[1]} {fmt(f.measured, 2)} vs "
                                 f"{fmt(f.baseline, 2)}" for f in worse) if worse else ""),
            limit, None if not compared else not worse)
    return rows


def regression(report: dict[str, Any], scenario: str, reference: str,
               tolerance: float) -> tuple[list[baseline.Finding], int]:
    """The figures `make bench` compares (bench/baseline.py), of `scenario` against those of
    `reference` in the same report: (worse or missing ones, how many were compared)."""
    ours, ref = _scenario(report, scenario), _scenario(report, reference)
    if ours is None or ref is None:
        return [], 0
    figures = baseline.extract({"scenarios": [{"scenario": scenario, "loads": ref["loads"]}]})
    findings = baseline.compare({"scenarios": [ours]}, {"figures": figures}, tolerance)
    return [f for f in findings if f.fails], len(figures)


def ratio_cell(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def peer_tables(report: dict[str, Any]) -> list[str]:
    """Markdown: per family of our scenarios, one row per (load, figure): our variants' values,
    the peers', and each of our variants / each peer."""
    rows = report.get("peer_ratios") or []
    if not rows:
        return []
    peers = [(k, n) for k, n in PEERS if _scenario(report, k) is not None]
    lines = ["", "## Against the peers (same upstream, loads and client; lower is better)", "",
             "Ratios are ours / the peer's: below 1.00x, ours is lower (better)."]
    index = {(r["scenario"], r["load"], r["figure"]): r for r in rows}
    for family in FAMILIES:
        variants = [v for v in (family[0], family[1], f"{family[0]}-ref")
                    if any(r["scenario"] == v for r in rows)]
        if not variants:
            continue
        suffix = {v: v[len(family[0]):] for v in variants}
        head = ["load", "figure", *(f"`{v}`" for v in variants), *(n for _, n in peers)]
        head += [f"{VARIANT_LABELS[suffix[v]]} / {n}" for v in variants for _, n in peers]
        lines += ["", f"### `{family[0]}`", "", "| " + " | ".join(head) + " |",
                  "|---|---|" + "--:|" * (len(head) - 2)]
        loads = list(dict.fromkeys(r["load"] for r in rows if r["scenario"] in variants))
        for load in loads:
            for key, label, _, _ in RATIO_FIGURES:
                found = [index.get((v, load, key)) for v in variants]
                first = next((r for r in found if r), None)
                if first is None:
                    continue
                cells = [fmt(r["value"], 2) if r else "-" for r in found]
                cells += [fmt(first["peers"].get(p), 2) for p, _ in peers]
                cells += [ratio_cell(r["ratios"].get(p)) if r else "-"
                          for r in found for p, _ in peers]
                lines.append(f"| {load} | {label} | " + " | ".join(cells) + " |")
    return lines


def target_lines(title: str, targets: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"## {title}", "", "| target | scenario | measured | limit | status |",
             "|---|---|--:|---|---|"]
    for t in targets:
        status = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "**FAIL**")
        lines.append(f"| {t['target']} | {t['scenario']} | {t['measured']} | {t['limit']} | "
                     f"{status} |")
    return lines


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


def resume_cost(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Resume on (`sse-up`) against off (`sse-up-noresume`, no journal) per load, measured in
    the same run: CPU per token (<= +15 %) at every load; added first-token time p50 (<= 0.5
    ms) at C=1 (under concurrency it is queueing, whose run-to-run spread is far wider)."""
    rows = []
    for sc in report["scenarios"]:
        if sc["scenario"] != "sse-up":
            continue
        for load, on in sc["loads"].items():
            off = _fig(report, "sse-up-noresume", load)
            if off is None:
                continue
            added = on["ttft_ms"]["p50"] - off["ttft_ms"]["p50"]
            cpu_on = on["cpu_ms_per_1k_upstream_tokens"].get("sum")
            cpu_off = off["cpu_ms_per_1k_upstream_tokens"].get("sum")
            cpu = ratio(cpu_on, cpu_off)
            ttft_ok = added <= 0.5 or on["load"]["concurrency"] > 1
            rows.append({"load": load, "added_ttft_ms": added, "cpu_on": cpu_on,
                         "cpu_off": cpu_off, "cpu_ratio": cpu,
                         "pass": ttft_ok and cpu is not None and cpu <= 1.15})
    return rows


def resume_lines(report: dict[str, Any]) -> list[str]:
    rows = resume_cost(report)
    if not rows:
        return []
    lines = ["", "## Resume on vs off (`sse-up` vs `sse-up-noresume`, same run)", "",
             "| load | added TTFT p50 ms (<= 0.5 at C=1) | CPU / 1k on | off | on / off (<= 1.15) "
             "| |",
             "|---|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['load']} | {r['added_ttft_ms']:+.2f} | {fmt(r['cpu_on'])} | "
                     f"{fmt(r['cpu_off'])} | {ratio_cell(r['cpu_ratio'])} | "
                     f"{'pass' if r['pass'] else '**FAIL**'} |")
    return lines


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
        else "Each service, the upstream and each peer in a session of its own.",
        *prompt_note(report),
        *([f"Bench tenant: {report['tenant']}."] if report.get("tenant") else []),
        *([f"Reference (`-ref` scenarios): {report['ref']['arg']} "
           f"({report['ref']['commit']})."] if report.get("ref") else []),
        *([f"Peers: {', '.join(f'{k} {v}' for k, v in report['peers'].items())}."]
          if report.get("peers") else []),
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
        "provider's). `sum` = edge + prompt + engine (LiteLLM: its process tree; Portkey: its "
        "node process). Generator = "
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
            total = per.get("sum")
            lines.append(
                f"| {sc['scenario']} | {name} | {' | '.join(cells)} | **{fmt(total)}** | "
                f"{fmt(per.get('upstream'))} | {fmt(per.get('redis'))} | "
                f"{fmt(per.get('generator'))} | {fmt(f['generator_cpu_pct_of_one_core'], 0)} | "
                f"{fmt(peak)} | {fmt(kib)} | {gc_cell(f.get('gc_pauses'))} |")
    lines += peer_tables(report)
    lines += resume_lines(report)
    if report.get("peer_targets"):
        lines += target_lines("Targets against the peers (issue 20)", report["peer_targets"])
    if report.get("targets"):
        lines += target_lines("Checks", report["targets"])
    if skipped:
        lines += ["", "## Skipped", "", *skipped]
    return "\n".join(lines) + "\n"

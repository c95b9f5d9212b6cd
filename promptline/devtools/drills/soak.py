"""`make soak`: mixed load on a real local deployment for 15 minutes, sampling each service's
memory, descriptors, threads and asyncio tasks; growth after the warm-up must stay under 5 %.

    python -m promptline.devtools.drills.soak [--minutes 15] [--warmup 3] [--interval 10]

The load mixes what production sees: streams, a model that fails mid-stream, callers that leave
after the first token, conversations (history read and written each turn), managed prompts, the
OpenAI-compatible endpoint and prompt reads. Every `interval` seconds the load pauses, in-flight
requests finish, and each process is sampled at rest, so a sample counts what is kept, not what
is in flight. Growth is the median of the last third of the samples against the median of the
first third after the warm-up. Writes soak.json, soak.md and soak.png (matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from promptline.devtools.deployment import LocalDeployment
from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import (
    API_KEY,
    Env,
    Outcome,
    Scale,
    StopReading,
    chat,
    metric_sum,
    metrics,
    sample,
)

LIMIT = 0.05
# Counts so small that one more is 5 %: a growth within this many is not a trend.
SLACK = {"rss_kib": 0, "fds": 2, "threads": 1, "tasks": 2}
QUANTITIES = ("rss_kib", "fds", "threads", "tasks")
CONCURRENCY = 8
# What the mix may end with: the failing model's typed error, a caller that left, answers.
EXPECTED_OUTCOMES = {"done", "left", "UPSTREAM_ERROR", "read 200", "openai 200"}


@dataclass
class Sample:
    at_s: float
    service: str
    rss_kib: int
    fds: int
    threads: int
    tasks: int


async def _one_request(env: Env, deployment: LocalDeployment, rng: random.Random,
                       counter: itertools.count[int]) -> Outcome | str:
    url = deployment.edge_url
    kind = rng.choices(["stream", "fails", "leaves", "conversation", "prompt", "openai",
                        "read-prompt"], weights=[30, 8, 10, 20, 10, 12, 10])[0]
    n = next(counter)
    if kind == "stream":
        return await chat(env.session, url, "sim")
    if kind == "fails":
        return await chat(env.session, url, "sim-fails")
    if kind == "leaves":
        async def leave(_out: Outcome) -> None:
            raise StopReading
        return await chat(env.session, url, "sim-long", on_delta=leave)
    if kind == "conversation":
        return await chat(env.session, url, "sim", text=f"turn {n}",
                          extra={"conversation_id": f"soak-{n % 40}"})
    if kind == "prompt":
        return await chat(env.session, url, "sim", extra={
            "prompt": {"id": "soak", "version": 1, "variables": {"who": f"caller {n % 7}"}}})
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if kind == "openai":
        async with env.session.post(f"{url}/v1/chat/completions", headers=headers, json={
                "model": "sim", "messages": [{"role": "user", "content": "hi"}],
                "stream": bool(n % 2)}) as resp:
            await resp.read()
            return f"openai {resp.status}"
    async with env.session.get(f"{url}/v1/prompts/soak/versions/1", headers=headers) as resp:
        await resp.read()
        return f"read {resp.status}"


async def soak(env: Env, minutes: float, warmup: float, interval: float,
               log: Any = print) -> dict[str, Any]:
    config = env.config()
    config["models"].append({"name": "sim-fails", "provider": "simulated", "simulated": {
        "ttft_ms": 10, "tokens_per_second": 400, "fail_after_tokens": 5}})
    rng = random.Random(7)  # the same mix every run
    counter = itertools.count()
    samples: list[Sample] = []
    outcomes: dict[str, int] = {}
    async with env.deployment(config) as deployment:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with env.session.post(f"{deployment.edge_url}/v1/prompts/soak/versions",
                                    headers=headers,
                                    json={"template": "Answer as {{who}}."}) as resp:
            assert resp.status in (200, 201), await resp.text()
        started = time.monotonic()
        end = started + minutes * 60
        while True:
            for replica in deployment.all():
                now = sample(replica)
                values = await metrics(env.session, replica)
                samples.append(Sample(round(time.monotonic() - started, 1), replica.service,
                                      now.rss_kib, now.fds, now.threads,
                                      int(metric_sum(values, "promptline_asyncio_tasks"))))
            if time.monotonic() >= end:
                break
            burst_end = min(end, time.monotonic() + interval)

            async def caller(burst_end: float = burst_end) -> None:
                while time.monotonic() < burst_end:
                    try:
                        result = await _one_request(env, deployment, rng, counter)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        result = type(exc).__name__
                    key = result if isinstance(result, str) else result.terminal
                    outcomes[key] = outcomes.get(key, 0) + 1

            await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
            await asyncio.sleep(0.5)  # settlements and history writes after the last frame
            log(f"soak: {time.monotonic() - started:.0f} s, {sum(outcomes.values())} requests")
    return analyse(samples, outcomes, minutes, warmup)


def analyse(samples: list[Sample], outcomes: dict[str, int], minutes: float,
            warmup: float) -> dict[str, Any]:
    services = sorted({s.service for s in samples})
    growth: dict[str, dict[str, Any]] = {}
    failures = []
    for service in services:
        mine = [s for s in samples if s.service == service and s.at_s >= warmup * 60]
        third = max(1, len(mine) // 3)
        growth[service] = {}
        for quantity in QUANTITIES:
            first = statistics.median(getattr(s, quantity) for s in mine[:third])
            last = statistics.median(getattr(s, quantity) for s in mine[-third:])
            ratio = (last - first) / first if first else 0.0
            growth[service][quantity] = {"after_warmup": first, "end": last,
                                         "growth": round(ratio, 4)}
            if ratio > LIMIT and last - first > SLACK[quantity]:
                failures.append(f"{service} {quantity} grew {ratio:.1%} ({first:g} -> {last:g})")
    unexpected = {k: v for k, v in outcomes.items() if k not in EXPECTED_OUTCOMES}
    if unexpected:
        failures.append(f"unexpected outcomes {unexpected}")
    return {"minutes": minutes, "warmup_minutes": warmup, "requests": sum(outcomes.values()),
            "outcomes": outcomes, "growth": growth, "failures": failures,
            "samples": [s.__dict__ for s in samples]}


def table(report: dict[str, Any]) -> str:
    lines = ["| service | RSS MiB (after warm-up -> end) | fds | threads | asyncio tasks |",
             "|---|---|---|---|---|"]
    for service, rows in report["growth"].items():
        cells = []
        for quantity in QUANTITIES:
            row = rows[quantity]
            scale = 1024 if quantity == "rss_kib" else 1
            cells.append(f"{row['after_warmup'] / scale:.1f} -> {row['end'] / scale:.1f} "
                         f"({row['growth']:+.1%})")
        lines.append(f"| {service} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    titles = {"rss_kib": "RSS (MiB)", "fds": "open file descriptors", "threads": "threads",
              "tasks": "asyncio tasks (at rest)"}
    services = sorted({s["service"] for s in report["samples"]})
    for ax, quantity in zip(axes.flat, QUANTITIES, strict=True):
        for service in services:
            points = [s for s in report["samples"] if s["service"] == service]
            values = [s[quantity] / (1024 if quantity == "rss_kib" else 1) for s in points]
            ax.plot([s["at_s"] / 60 for s in points], values, label=service)
        ax.axvline(report["warmup_minutes"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(titles[quantity])
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    axes[0][0].legend()
    fig.suptitle(f"make soak: {report['requests']:,} requests in {report['minutes']:g} min; "
                 "dotted line: end of warm-up")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@fault("edge-leaks-per-request", "services.edge_http")
def _leak() -> None:
    """Every request leaves 64 KiB behind (planted for tests/test_drills.py)."""
    from aiohttp import web

    from services.edge_http import app

    kept: list[bytes] = []
    original = app.chat_stream

    async def leaky(request: web.Request) -> web.StreamResponse:
        kept.append(bytes(64 * 1024))
        return await original(request)

    app.chat_stream = leaky


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mixed load; resource growth after warm-up.")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("bench/results") / time.strftime("soak-%Y%m%d-%H%M%S")

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="promptline-soak-") as tmp:
            async with Env(Scale(), Path(tmp)) as env:
                return await soak(env, args.minutes, args.warmup, args.interval)

    report = asyncio.run(run())
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    (out / "soak.md").write_text(table(report) + "\n")
    plot(report, out / "soak.png")
    print(table(report))
    print(f"soak: {report['requests']:,} requests, outcomes {report['outcomes']}; report in {out}")
    if report["failures"]:
        print("soak: FAILED: " + "; ".join(report["failures"]), file=sys.stderr)
        return 1
    print(f"soak: every quantity grew less than {LIMIT:.0%} after the warm-up")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

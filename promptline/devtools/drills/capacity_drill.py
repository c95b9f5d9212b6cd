"""Capacity: many slow streams open at once, all complete, every token in order, and what one open
stream costs each service in memory."""

from __future__ import annotations

import asyncio
import time

from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import (
    REPLY,
    Env,
    Result,
    chat,
    metric_sum,
    metrics,
    ms,
    sample,
    tally,
)

MODEL = "sim-slow"
"""10 tokens a second: the reply's 35 tokens take 3.5 s, so every stream is open at once."""
KIB_PER_STREAM = 128
"""Bound on RSS per open stream, per service (KiB): about 2x the worst figure measured (at 500
streams: edge 55, prompt 47, engine 22 KiB; at 50: 21, 13, 13)."""
SLACK_S = 10.0
"""A stream may take this much longer than the model's own pace (3.5 s) under the load."""


async def capacity(env: Env) -> Result:
    streams = env.scale.n(500, 50)
    result = Result(
        "capacity",
        f"{streams} concurrent streams on `{MODEL}` (10 tokens/s, 35 tokens each)",
        f"all end with done and the whole reply in order, each within 3.5 s + {SLACK_S:g} s; "
        f"all {streams} open at once; RSS per open stream < {KIB_PER_STREAM} KiB in every "
        f"service (about 2x today's worst: 55 KiB at the edge with 500 streams)")
    async with env.deployment(env.config()) as deployment:
        replicas = deployment.all()
        edge = deployment.replica("edge_http")
        # Warm-up: pools, caches and the allocator's arenas exist before the baseline.
        warm = await asyncio.gather(*(chat(env.session, deployment.edge_url, "sim", within=30)
                                      for _ in range(20)))
        result.expect(all(o.done for o in warm), f"warm-up failed: {tally(warm)}")
        await asyncio.sleep(0.5)
        base = {r.name: sample(r).rss_kib for r in replicas}
        peak = dict(base)
        peak_open = 0.0
        started = time.monotonic()
        tasks = [asyncio.create_task(chat(env.session, deployment.edge_url, MODEL,
                                          within=3.5 + SLACK_S + 30))
                 for _ in range(streams)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            for r in replicas:
                peak[r.name] = max(peak[r.name], sample(r).rss_kib)
            peak_open = max(peak_open, metric_sum(await metrics(env.session, edge),
                                                  "promptline_active_streams"))
        outcomes = [t.result() for t in tasks]
        took = time.monotonic() - started
    slowest = max(o.seconds for o in outcomes)
    first = sorted(o.first_delta - o.started for o in outcomes if o.first_delta is not None)
    per_stream = {name: round((peak[name] - base[name]) / streams, 1) for name in base}
    wrong = sum(1 for o in outcomes if o.done and o.text != REPLY)
    result.observed = {
        "outcomes": tally(outcomes), "peak_open_at_edge": peak_open,
        "kib_per_stream": per_stream,
        "rss_baseline_mib": {n: round(v / 1024, 1) for n, v in base.items()},
        "ttft_p50_p99_ms": [ms(first[len(first) // 2]), ms(first[int(len(first) * 0.99)])]
        if first else None,
        "slowest_ms": ms(slowest), "all_done_after_s": round(took, 1),
        "wrong_text": wrong,
    }
    result.expect(all(o.done for o in outcomes), f"streams failed: {tally(outcomes)}")
    result.expect(wrong == 0, f"{wrong} replies not the reply in order")
    result.expect(slowest <= 3.5 + SLACK_S, f"slowest stream {slowest:.1f} s > "
                                            f"{3.5 + SLACK_S:g} s")
    result.expect(peak_open >= streams, f"only {peak_open:g} of {streams} streams open at once")
    for name, kib in per_stream.items():
        result.expect(kib < KIB_PER_STREAM, f"{name}: {kib:g} KiB per open stream > "
                                            f"{KIB_PER_STREAM} KiB")
    return result


# --- planted faults (tests/test_drills.py): each must fail its drill ----------------------------

_LEAKED: list[bytes] = []


@fault("engine-stream-leak", "services.llm_engine")
def _stream_leak() -> None:
    """Every engine stream keeps 1 MiB for good (a per-request cache that is never evicted)."""
    from collections.abc import AsyncIterator
    from typing import Any

    from services.llm_engine import server

    original = server.LlmEngineServicer.Generate

    async def generate(self: server.LlmEngineServicer, request: Any, context: Any
                       ) -> AsyncIterator[Any]:
        _LEAKED.append(b"\x01" * (1 << 20))  # written, so it is resident
        async for frame in original(self, request, context):
            yield frame

    server.LlmEngineServicer.Generate = generate  # type: ignore[method-assign]


DRILLS = {"capacity": capacity}

"""`make bench-ab`: time to first token at C=1, this checkout against another, interleaved.

Whole-chain C=1 figures move by ±0.7 ms between runs of the same code on a 2-core box, as much
as a change to one hop moves them. Here both chains run side by side (each with its own Redis
and upstream, from this checkout's bench) and the client alternates between them in rounds, so
both see the same machine state; the order of the two sides flips every round. The side that
starts second has measured up to 0.4 ms faster against the same code, so for a small difference
run it both ways (from the other checkout with `--root` pointing back here) and once against
itself (`--root .`) for the spread of the moment.

    python -m bench.ab --root /tmp/before                      # SSE, up-200x0ms, ~30 s
    python -m bench.ab --root /tmp/before --endpoint openai --model sim-200x0ms
    python -m bench.ab --root /tmp/before --quick              # a few seconds (smoke test)
    python -m bench.ab --root . --resume-off B                 # resume on (A) vs off (B)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.client import OPENAI, SSE, request_body, run_stream
from bench.run import API_KEY, ROOT, Load, Stack
from bench.stats import percentile

FULL = {"rounds": 6, "streams": 40}
QUICK = {"rounds": 2, "streams": 5}
WARM_UP = 5


async def interleave(edges: dict[str, str], kind: str, model: str, tokens: int, rounds: int,
                     streams: int) -> dict[str, list[float]]:
    """TTFT in ms per side: `rounds` rounds of `streams` sequential streams on each side."""
    path = "/v1/chat/stream" if kind == SSE else "/v1/chat/completions"
    body = request_body(kind, model, tokens)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ttfts: dict[str, list[float]] = {side: [] for side in edges}
    async with aiohttp.ClientSession() as session:
        for n in range(rounds):
            for side in (sorted(edges) if n % 2 == 0 else sorted(edges, reverse=True)):
                url = f"http://{edges[side]}{path}"
                for i in range(WARM_UP + streams):
                    result = await run_stream(session, kind, url, headers, body, 30)
                    if result.error is not None or result.ttft is None:
                        raise RuntimeError(f"{side}: stream failed: {result.error}")
                    if i >= WARM_UP:
                        ttfts[side].append(result.ttft * 1000)
    return ttfts


def summary(values: list[float]) -> dict[str, float | None]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": statistics.fmean(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the other checkout (side B)")
    parser.add_argument("--endpoint", choices=("sse", "openai"), default="sse")
    parser.add_argument("--model", default="up-200x0ms",
                        help="a bench model name: up-NxDms (upstream) or sim-NxDms")
    parser.add_argument("--quick", action="store_true", help="a few streams (smoke test)")
    parser.add_argument("--resume-off", choices=("A", "B"), default=None,
                        help="that side without a stream journal (`resume: {ttl: 0}`)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    kind = SSE if args.endpoint == "sse" else OPENAI
    tokens = int(args.model.split("-", 1)[1].split("x", 1)[0])
    roots = {"A": ROOT, "B": Path(args.root).resolve()}
    stacks: dict[str, Stack] = {}
    try:
        edges = {}
        for side, root in roots.items():
            workdir = Path(tempfile.mkdtemp(prefix=f"promptline-ab-{side}-"))
            stack = stacks[side] = Stack(workdir, [Load("ab", 1, tokens, 0, 1)], root=root)
            stack.start_base()
            stack.start_chain("ab", journal=side != args.resume_off)
            edges[side] = yaml.safe_load((workdir / "config-ab.yaml").read_text()
                                         )["listen"]["edge_http"]
        ttfts = asyncio.run(interleave(edges, kind, args.model, tokens, sizes["rounds"],
                                       sizes["streams"]))
    finally:
        for stack in stacks.values():
            stack.close()
    result: dict[str, Any] = {"endpoint": args.endpoint, "model": args.model, **sizes,
                              "sides": {side: {"root": str(roots[side]), **summary(v)}
                                        for side, v in ttfts.items()}}
    print(f"# bench.ab — TTFT at C=1, {args.endpoint}, {args.model}, "
          f"{sizes['rounds']} rounds x {sizes['streams']} streams per side\n")
    print("| side | checkout | streams | p50 ms | p90 ms | p99 ms |")
    print("|---|---|--:|--:|--:|--:|")
    for side, fig in result["sides"].items():
        print(f"| {side} | {fig['root']} | {fig['n']} | {fig['p50']:.2f} | {fig['p90']:.2f} | "
              f"{fig['p99']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

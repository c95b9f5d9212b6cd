"""`python -m bench.experiments.journal_lag`: how long a frame waits for the stream journal.

The three services as processes (bench/run.py's `Stack`, the realistic tenant), the bench
upstream at 50 tokens/s, `--concurrency` streams of 200 tokens at once over `POST
/v1/chat/stream` (resumable, journaled with the default `resume`), then the prompt service's
`promptline_journal_lag_seconds` histogram: from a frame's arrival in the journal's buffer to the
Redis write that holds it. The caller never waits for it; it is how far behind the live stream a
resuming reader can be.

    python -m bench.experiments.journal_lag [--concurrency 100]      # ~10 s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.run import API_KEY, Load, Stack
from promptline.devtools.fake_openai import model_name

TOKENS = 200
DELAY_MS = 20
METRIC = "promptline_journal_lag_seconds"


async def load(edge_port: int, concurrency: int) -> None:
    url = f"http://127.0.0.1:{edge_port}/v1/chat/stream"
    body = {"model": model_name(TOKENS, DELAY_MS), "messages": [{"role": "user", "content": "hi"}]}

    async def one(http: aiohttp.ClientSession) -> None:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) \
                as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for _ in resp.content:
                pass

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http) for _ in range(concurrency)))


async def histogram(url: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the journal-lag histogram."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == METRIC:
            return [(float(s.labels["le"]), s.value) for s in family.samples
                    if s.name == f"{METRIC}_bucket"]
    raise RuntimeError(f"{METRIC} not on {url}")


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Linear within the bucket that holds the q-th observation (Prometheus' rule)."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / max(count - below, 1))
        lower, below = bound, count
    return lower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    stack = Stack(Path(tempfile.mkdtemp(prefix="promptline-journal-")),
                  [Load("paced", args.concurrency, TOKENS, DELAY_MS, args.concurrency)])
    try:
        stack.start_base()
        stack.start_chain("journal")
        asyncio.run(load(stack.edge_port, args.concurrency))
        buckets = asyncio.run(histogram(stack.metrics_urls["prompt"]))
    except RuntimeError as exc:
        print(f"journal_lag: {exc} (logs in {stack.workdir})", file=sys.stderr)
        return 1
    finally:
        stack.close()
    print(f"# journal lag, C={args.concurrency}, {TOKENS} tokens at {1000 // DELAY_MS}/s, "
          f"{int(buckets[-1][1])} batches written\n")
    print("| p50 | p90 | p99 |\n|--:|--:|--:|")
    print("| " + " | ".join(f"{quantile(buckets, q) * 1000:.1f} ms" for q in (0.5, 0.9, 0.99))
          + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

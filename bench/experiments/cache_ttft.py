"""`python -m bench.experiments.cache_ttft`: time to the first token of a response-cache hit.

The three services as processes (bench/run.py's `Stack`: the realistic tenant, with quotas and a
moderation term), the bench upstream, sequential streams (C=1) over `POST /v1/chat/stream`; the
time from sending the request to the first `delta` event, p50 / p90, for:

- `floor`: a model without a cache whose upstream answers at once (0 ms to its first chunk): what
  the chain itself costs;
- `uncached`: a model without a cache whose upstream takes UPSTREAM_TTFT_MS to its first chunk;
- `miss`: the same upstream behind a model with a cache, each request new (the lookup, then the
  provider: `miss - uncached` is what the lookup costs a miss);
- `hit`: the same model, the same request again (the lookup, the tenant's QPM, the replay; no
  engine hop, no provider).

    python -m bench.experiments.cache_ttft [--streams 200]      # ~15 s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import API_KEY, Load, Stack
from bench.stats import percentile
from promptline.devtools.fake_openai import model_name

TOKENS = 200
UPSTREAM_TTFT_MS = 300  # a fast hosted model's first chunk
CACHED = "cached"
UNCACHED = "uncached"
WARM_UP = 20


class CacheStack(Stack):
    """The bench stack plus one model with a cache, in front of a slower upstream."""

    def config(self, ports: dict[str, int], coalesce_ms: int | None = None) -> dict[str, Any]:
        config = super().config(ports, coalesce_ms)
        fast = next(m for m in config["models"] if m["name"] == model_name(TOKENS, 0))
        slow = {**fast, "upstream_model": model_name(TOKENS, 0, UPSTREAM_TTFT_MS)}
        config["models"] += [{**slow, "name": UNCACHED},
                             {**slow, "name": CACHED, "cache": {"ttl": "1h"}}]
        return config


async def first_delta(http: aiohttp.ClientSession, url: str, model: str, text: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    start = time.perf_counter()
    elapsed = None
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if elapsed is None and line.startswith(b"event: delta"):
                elapsed = time.perf_counter() - start
            if line.startswith(b"event: error"):
                raise RuntimeError(f"{model}: the stream failed")
    if elapsed is None:
        raise RuntimeError(f"{model}: no delta")
    return elapsed


async def measure(edge_port: int, streams: int) -> dict[str, list[float]]:
    url = f"http://127.0.0.1:{edge_port}/v1/chat/stream"
    out: dict[str, list[float]] = {"floor": [], "uncached": [], "miss": [], "hit": []}
    async with aiohttp.ClientSession() as http:
        for i in range(WARM_UP):
            await first_delta(http, url, model_name(TOKENS, 0), f"warm {i}")
        await first_delta(http, url, CACHED, "the cached question")
        await asyncio.sleep(0.5)  # stored right after `done`
        for i in range(streams):  # interleaved: drift in the box's load hits all three alike
            out["floor"].append(await first_delta(http, url, model_name(TOKENS, 0), f"f {i}"))
            out["uncached"].append(await first_delta(http, url, UNCACHED, f"u {i}"))
            out["miss"].append(await first_delta(http, url, CACHED, f"new question {i}"))
            out["hit"].append(await first_delta(http, url, CACHED, "the cached question"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="streams of each kind")
    args = parser.parse_args(argv)
    stack = CacheStack(Path(tempfile.mkdtemp(prefix="promptline-cache-")),
                       [Load("one", 1, TOKENS, 0, 1)])
    try:
        stack.start_base()
        stack.start_chain("cache")
        times = asyncio.run(measure(stack.edge_port, args.streams))
    except RuntimeError as exc:
        print(f"cache_ttft: {exc} (logs in {stack.workdir})", file=sys.stderr)
        return 1
    finally:
        stack.close()
    print(f"# time to first delta, C=1, {args.streams} streams each "
          f"(upstream first chunk: floor 0 ms, the others {UPSTREAM_TTFT_MS} ms)\n")
    print("| | p50 | p90 |\n|---|--:|--:|")
    for kind, values in times.items():
        p50, p90 = (percentile(values, q) or 0.0 for q in (50, 90))
        print(f"| {kind} | {p50 * 1000:.1f} ms | {p90 * 1000:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

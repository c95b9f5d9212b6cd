"""`make bench-provider`: the engine's OpenAI-compatible provider, through llm_engine alone.

The whole-chain bench moves ±15-30% between runs on a 2-core box; a change to the provider is
measured here instead, with nothing but llm_engine (its own process: CPU and memory from /proc)
and the upstream (another process), driven over the engine's gRPC wire (`Generate`):

1. time to the first delta, p50/p90 over sequential one-token streams;
2. the engine's CPU per chunk and RSS growth per open stream at C=200, chunks 20 ms apart (one
   read per chunk, as in the issue's C=200 load), measured before anything else grew the heap;
3. the engine's CPU per 200-chunk stream at C=50, chunks back to back (they arrive in large
   reads).

`--root` measures another checkout's engine (e.g. a `git worktree` of the commit before a
change), with this checkout's upstream, so both sides see the same server:

    python -m bench.experiments.provider                    # ~20 s
    python -m bench.experiments.provider --root /tmp/before
    python -m bench.experiments.provider --quick            # a few seconds
    python -m bench.experiments.provider --pool 4           # each model a pool of 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.run import ROOT, Load, Stack
from promptline.devtools import procstat
from promptline.devtools.fake_openai import model_name
from promptline.v1 import common_pb2, llm_engine_pb2, llm_engine_pb2_grpc

FULL = {"ttft_streams": 400, "burst_rounds": 3, "burst_streams": 50, "paced_streams": 200,
        "paced_chunks": 200}
QUICK = {"ttft_streams": 30, "burst_rounds": 1, "burst_streams": 5, "paced_streams": 10,
         "paced_chunks": 10}
WARM_UP = 30
PACED_GAP = 0.020


def _request(model: str, tokens: int) -> llm_engine_pb2.GenerateRequest:
    return llm_engine_pb2.GenerateRequest(
        model=model, max_tokens=tokens,
        messages=[common_pb2.ChatMessage(role="user", content="hi")])


async def measure(target: str, pid: int, models: list[str], sizes: dict[str, int]
                  ) -> dict[str, Any]:
    """Drive the engine at `target` (process `pid`) with the three loads."""
    one, burst, paced = models
    chunks = sizes["paced_chunks"]
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = llm_engine_pb2_grpc.LlmEngineStub(channel)

        async def first_delta() -> float:
            start = time.perf_counter()
            elapsed = None
            async for frame in stub.Generate(_request(one, 1)):
                if elapsed is None and frame.HasField("delta"):
                    elapsed = time.perf_counter() - start
            if elapsed is None:
                raise RuntimeError(f"{one}: the stream ended without a delta")
            return elapsed

        async def drain(model: str, tokens: int) -> None:
            async for frame in stub.Generate(_request(model, tokens)):
                if frame.HasField("error"):
                    raise RuntimeError(f"{model}: {frame.error.code}: {frame.error.message}")

        for _ in range(WARM_UP):
            await first_delta()
        ttft = sorted([await first_delta() for _ in range(sizes["ttft_streams"])])

        # Paced first, on a heap only the sequential streams touched: after the burst, freed
        # memory would be reused and hide what an open stream holds.
        idle_rss = procstat.status_kib(pid, "VmRSS")
        cpu = procstat.cpu_seconds(pid)
        tasks = [asyncio.ensure_future(drain(paced, chunks))
                 for _ in range(sizes["paced_streams"])]
        await asyncio.sleep(chunks * PACED_GAP / 2)  # mid-stream: every stream open
        open_rss = procstat.status_kib(pid, "VmRSS")
        await asyncio.gather(*tasks)
        paced_cpu = procstat.cpu_seconds(pid) - cpu

        cpu = procstat.cpu_seconds(pid)
        for _ in range(sizes["burst_rounds"]):
            await asyncio.gather(*(drain(burst, 200) for _ in range(sizes["burst_streams"])))
        burst_cpu = (procstat.cpu_seconds(pid) - cpu) / (sizes["burst_rounds"]
                                                         * sizes["burst_streams"])
    n = len(ttft)
    return {
        "ttft_ms": {"p50": round(ttft[n // 2] * 1000, 2),
                    "p90": round(ttft[n * 9 // 10] * 1000, 2)},
        "burst_cpu_ms_per_stream": round(burst_cpu * 1000, 2),
        "paced_cpu_us_per_chunk": round(paced_cpu * 1e6 / (sizes["paced_streams"] * chunks), 1),
        "paced_kib_per_open_stream": round((open_rss - idle_rss) / sizes["paced_streams"], 1),
    }


def report(root: str, result: dict[str, Any]) -> str:
    return "\n".join([
        f"# bench.experiments.provider — llm_engine of {root}",
        "",
        "| time to first delta p50 / p90 | engine CPU per 200-chunk stream, C=50 burst | "
        "engine CPU per chunk, C=200 paced | engine KiB per open stream, C=200 paced |",
        "|--:|--:|--:|--:|",
        f"| {result['ttft_ms']['p50']} / {result['ttft_ms']['p90']} ms | "
        f"{result['burst_cpu_ms_per_stream']} ms | {result['paced_cpu_us_per_chunk']} µs | "
        f"{result['paced_kib_per_open_stream']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose engine is measured")
    parser.add_argument("--quick", action="store_true", help="fewer streams (a few seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--pool", type=int, default=0,
                        help="serve each model by a pool of this many deployments, all at the "
                             "upstream (docs/provider-pools.md); 0: a plain model")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    chunks = sizes["paced_chunks"]
    loads = [Load("one", 1, 1, 0, 1), Load("burst", 50, 200, 0, 1),
             Load("paced", 200, chunks, int(PACED_GAP * 1000), 1)]
    models = [model_name(load.tokens, load.delay_ms) for load in loads]
    stack = Stack(Path(tempfile.mkdtemp(prefix="promptline-provider-")), loads,
                  root=Path(args.root).resolve())
    stack.pool = args.pool
    try:
        stack.start_base()
        stack.start_chain("provider", services=("llm_engine",))
        result = asyncio.run(measure(f"127.0.0.1:{stack.ports['llm_engine']}",
                                     stack.services["llm_engine"].pid, models, sizes))
    except RuntimeError as exc:
        print(f"bench-provider: {exc} (logs in {stack.workdir})", file=sys.stderr)
        return 1
    finally:
        stack.close()
    print(report(args.root, result))
    if args.json:
        args.json.write_text(json.dumps({"root": args.root, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

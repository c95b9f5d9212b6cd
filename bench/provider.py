"""`make bench-provider`: the engine's OpenAI-compatible provider on its own, in one process.

The whole-chain bench moves ±15-30% between runs on a 2-core box; a change to the provider is
measured here instead, with nothing but the provider and the bench upstream (its own process):

1. time to the first chunk, p50/p90 over sequential one-token streams;
2. CPU per chunk and RSS growth per open stream at C=200, chunks 20 ms apart (one read per
   chunk, as in the issue's C=200 load), measured before anything else grew the heap;
3. CPU per 200-chunk stream at C=50, chunks back to back (they arrive in large reads).

`--root` measures another checkout's provider (e.g. a `git worktree` of the commit before a
change), with this checkout's upstream, so both sides see the same server:

    python -m bench.provider                    # ~20 s
    python -m bench.provider --root /tmp/before
    python -m bench.provider --quick            # a few seconds (the smoke test's run)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the measuring child runs this file as a script with
# the measured checkout (which may predate this file) alone on its path.
ROOT = Path(__file__).resolve().parent.parent
FULL = {"ttft_streams": 400, "burst_rounds": 3, "burst_streams": 50, "paced_streams": 200,
        "paced_chunks": 200}
QUICK = {"ttft_streams": 30, "burst_rounds": 1, "burst_streams": 5, "paced_streams": 10,
         "paced_chunks": 10}
WARM_UP = 30


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


async def measure(base_url: str, models: list[str], sizes: dict[str, int]) -> dict[str, Any]:
    """Run inside the process whose provider is measured (imported from sys.path)."""
    from promptline.config import parse_config
    from promptline.messages import Message
    from services.llm_engine.providers.base import GenerationRequest
    from services.llm_engine.providers.openai_compat import OpenAIProvider

    def provider(model: str) -> Any:
        raw = {"tenants": [{"name": "bench", "api_keys": ["bench-key-0123456789"]}],
               "models": [{"name": model, "provider": "openai", "base_url": base_url,
                           "api_key_env": "BENCH_KEY"}]}
        return OpenAIProvider(parse_config(raw, env={"BENCH_KEY": "sk-bench"}).models[0])

    def request(model: str, tokens: int) -> Any:
        return GenerationRequest("bench", model, (Message("user", "hi"),), tokens)

    chunks = sizes["paced_chunks"]
    one, burst, paced = models
    providers = {m: provider(m) for m in (one, burst, paced)}

    async def first_chunk() -> float:
        start = time.perf_counter()
        stream = providers[one].stream(request(one, 1))
        await anext(stream)
        elapsed = time.perf_counter() - start
        async for _ in stream:
            pass
        return elapsed

    async def drain(model: str, tokens: int) -> None:
        async for _ in providers[model].stream(request(model, tokens)):
            pass

    try:
        for _ in range(WARM_UP):
            await first_chunk()
        ttft = sorted([await first_chunk() for _ in range(sizes["ttft_streams"])])

        # Paced first, on a heap only the sequential streams touched: after the burst, freed
        # memory would be reused and hide what an open stream holds.
        gc.collect()
        idle_rss = _rss_kib()
        cpu = time.process_time()
        tasks = [asyncio.ensure_future(drain(paced, chunks))
                 for _ in range(sizes["paced_streams"])]
        await asyncio.sleep(chunks * 0.020 / 2)  # mid-stream: every stream open
        open_rss = _rss_kib()
        await asyncio.gather(*tasks)
        paced_cpu = time.process_time() - cpu

        cpu = time.process_time()
        for _ in range(sizes["burst_rounds"]):
            await asyncio.gather(*(drain(burst, 200) for _ in range(sizes["burst_streams"])))
        burst_cpu = (time.process_time() - cpu) / (sizes["burst_rounds"]
                                                   * sizes["burst_streams"])
    finally:
        for p in providers.values():
            await p.close()
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
        f"# bench.provider — {root}",
        "",
        "| time to first chunk p50 / p90 | CPU per 200-chunk stream, C=50 burst | "
        "CPU per chunk, C=200 paced | KiB per open stream, C=200 paced |",
        "|--:|--:|--:|--:|",
        f"| {result['ttft_ms']['p50']} / {result['ttft_ms']['p90']} ms | "
        f"{result['burst_cpu_ms_per_stream']} ms | {result['paced_cpu_us_per_chunk']} µs | "
        f"{result['paced_kib_per_open_stream']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose provider is measured")
    parser.add_argument("--quick", action="store_true", help="fewer streams (a few seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)  # the measuring child
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.measure:
        base_url, *models = args.measure
        try:
            import uvloop  # as the services run
            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        print(json.dumps(runner(measure(base_url, models, sizes))))
        return 0

    from bench import procstat
    from bench.upstream import model_name

    models = [model_name(1, 0), model_name(200, 0), model_name(sizes["paced_chunks"], 20)]
    port = procstat.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        upstream = procstat.Child("upstream", [sys.executable, "-m", "bench.upstream", "--port",
                                               str(port)],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
                                  log_path=Path(tmp) / "upstream.log")
        try:
            procstat.wait_port(port, upstream.proc, "bench upstream", 20)
            child = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--measure",
                 f"http://127.0.0.1:{port}/v1", *models, *(["--quick"] if args.quick else [])],
                cwd=args.root, env={**os.environ, "PYTHONPATH": args.root},
                capture_output=True, text=True, timeout=300)
        finally:
            upstream.stop(grace=5)
    if child.returncode != 0:
        sys.stderr.write(child.stdout[-2000:] + child.stderr[-2000:])
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(report(args.root, result))
    if args.json:
        args.json.write_text(json.dumps({"root": args.root, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

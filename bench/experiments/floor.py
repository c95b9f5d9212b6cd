"""`make bench-floor`: what bare grpc.aio costs on this machine, next to what our hops cost.

Issue #7's absolute targets assume a floor below them. This measures that floor with servers
that do nothing but stream (`backend`) or relay a stream (`relay`: one server call, one client
call, `async for ... yield`), each in its own process on uvloop, as our services run, and then
the same figures for our own chain, hop by hop:

1. Time to the first message at C=1: a client straight to `backend` (one hop), through one
   `relay`, through two; and for our chain, gRPC straight to llm_engine, gRPC to prompt, HTTP to
   the edge (simulated and bench-upstream models, one token each, so nothing but the first
   message is measured).
2. The issue's C=200 load (200 messages 20 ms apart, workers started over 1 s) through the bare
   backend + 2 relays: each C=200 target's figure for a chain of our shape that does nothing
   else (duration against the paced time, largest gap p99, KiB per open stream), and CPU per
   message per process from /proc, as `make bench` measures them.

    python -m bench.experiments.floor            # ~1 minute; prints a markdown report
    python -m bench.experiments.floor --quick    # a few seconds, fewer streams
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml

from bench.run import API_KEY, ROOT, Load, Stack, sim_name
from bench.stats import percentile
from promptline.devtools import procstat
from promptline.devtools.fake_openai import model_name
from promptline.v1 import (
    common_pb2,
    llm_engine_pb2,
    llm_engine_pb2_grpc,
    prompt_pb2,
    prompt_pb2_grpc,
)

TTFT_STREAMS = 300
WARM_UP = 20
PACED_MESSAGES = 200
PACED_GAP = 0.020
PACED_STREAMS = 200
PACED_RAMP = 1.0
QUICK = {"ttft_streams": 30, "paced_streams": 20, "paced_messages": 20}


# --- the bare servers ------------------------------------------------------------------------


class Backend(llm_engine_pb2_grpc.LlmEngineServicer):
    """Streams `max_tokens` deltas (1 when unset), paced `temperature` seconds apart."""

    async def Generate(self, request: llm_engine_pb2.GenerateRequest, context: Any
                       ) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        gap = request.temperature if request.HasField("temperature") else 0.0
        for i in range(request.max_tokens or 1):
            if gap:  # paced against absolute times, like the bench upstream
                await asyncio.sleep(max(0.0, start + (i + 1) * gap - loop.time()))
            yield llm_engine_pb2.GenerateResponse(delta=common_pb2.Delta(text=" word", tokens=1))
        yield llm_engine_pb2.GenerateResponse(done=common_pb2.Done(finish_reason="stop"))


class Relay(llm_engine_pb2_grpc.LlmEngineServicer):
    """Relays another server's stream, frame for frame, and nothing else."""

    def __init__(self, target: str) -> None:
        self._stub = llm_engine_pb2_grpc.LlmEngineStub(grpc.aio.insecure_channel(target))

    async def Generate(self, request: llm_engine_pb2.GenerateRequest, context: Any
                       ) -> AsyncIterator[llm_engine_pb2.GenerateResponse]:
        async for frame in self._stub.Generate(request):
            yield frame


async def _serve(kind: str, port: int, target: str | None) -> None:
    server = grpc.aio.server()
    servicer = Backend() if kind == "backend" else Relay(target or "")
    llm_engine_pb2_grpc.add_LlmEngineServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- measuring -------------------------------------------------------------------------------


async def _ttft_ms(first: Callable[[], Awaitable[float | None]], n: int
                   ) -> tuple[float, float]:
    """p50 and p90 of `first()` (seconds to the first message) over `n` sequential streams."""
    values: list[float] = []
    for i in range(n + WARM_UP):
        got = await first()
        if got is None:
            raise RuntimeError("a stream ended without a message")
        if i >= WARM_UP:
            values.append(got * 1000)
    return statistics.median(values), statistics.quantiles(values, n=10)[-1]


def _grpc_first(stub: Any, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()
                ) -> Callable[[], Awaitable[float | None]]:
    async def first() -> float | None:
        began = time.perf_counter()
        got = None
        async for frame in getattr(stub, method)(request, metadata=metadata):
            if got is None and frame.HasField("delta"):
                got = time.perf_counter() - began
        return got
    return first


def _http_first(session: aiohttp.ClientSession, url: str, model: str
                ) -> Callable[[], Awaitable[float | None]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def first() -> float | None:
        began = time.perf_counter()
        got = None
        async with session.post(url, json=body, headers=headers) as resp:
            async for line in resp.content:
                if got is None and line.startswith(b"event: delta"):
                    got = time.perf_counter() - began
        return got
    return first


def _engine_request(model: str, **extra: Any) -> llm_engine_pb2.GenerateRequest:
    return llm_engine_pb2.GenerateRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content="hi")], **extra)


async def bare_ttft(ports: dict[str, int], n: int) -> list[tuple[str, float, float]]:
    rows = []
    for label, port in (("backend (one hop)", ports["backend"]),
                        ("backend + 1 relay", ports["relay1"]),
                        ("backend + 2 relays", ports["relay2"])):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = llm_engine_pb2_grpc.LlmEngineStub(channel)
            rows.append((label, *await _ttft_ms(_grpc_first(stub, "Generate",
                                                            _engine_request("m")), n)))
    return rows


async def bare_paced(ports: dict[str, int], pids: dict[str, int], streams: int, messages: int
                     ) -> dict[str, Any]:
    """The issue's C=200 load through the bare chain (backend + 2 relays, the shape of our three
    services), workers started over PACED_RAMP as `make bench` starts them: per stream its
    duration and largest gap between messages; per process CPU per message and KiB per stream."""
    request = _engine_request("m", max_tokens=messages, temperature=PACED_GAP)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['relay2']}") as channel:
        stub = llm_engine_pb2_grpc.LlmEngineStub(channel)

        async def one(delay: float = 0.0) -> tuple[int, float, float]:
            await asyncio.sleep(delay)
            began = last = time.perf_counter()
            count, gap = 0, 0.0
            async for frame in stub.Generate(request):
                if frame.HasField("delta"):
                    now = time.perf_counter()
                    if count:
                        gap = max(gap, now - last)
                    count, last = count + 1, now
            return count, time.perf_counter() - began, gap

        await asyncio.gather(*(one() for _ in range(5)))  # warm-up, as `make bench` does
        cpu0 = {k: procstat.cpu_seconds(p) for k, p in pids.items()}
        idle = {k: procstat.status_kib(p, "VmRSS") for k, p in pids.items()}
        peak = dict(idle)

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.1)
                for k, p in pids.items():
                    peak[k] = max(peak[k], procstat.status_kib(p, "VmRSS"))

        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        try:
            results = await asyncio.gather(*(one(PACED_RAMP * i / streams)
                                             for i in range(streams)))
        finally:
            sampler.cancel()
        wall = time.perf_counter() - began
        cpu1 = {k: procstat.cpu_seconds(p) for k, p in pids.items()}
    delivered = sum(count for count, _, _ in results)
    cpu = {k: 1e6 * (cpu1[k] - cpu0[k]) / max(1, delivered) for k in pids}
    kib = {k: (peak[k] - idle[k]) / streams for k in pids}
    ideal = messages * PACED_GAP
    return {
        "streams": streams, "messages_per_stream": messages, "messages": delivered,
        "wall_s": wall, "ideal_s": ideal, "ramp_s": PACED_RAMP,
        "duration_p50_vs_ideal": statistics.median(d for _, d, _ in results) / ideal,
        "gap_p99_ms": 1000 * (percentile([g for _, _, g in results], 99) or 0.0),
        "cpu_us_per_message": cpu, "cpu_us_per_message_sum": sum(cpu.values()),
        "kib_per_stream": kib, "kib_per_stream_sum": sum(kib.values()),
        # What the summed CPU per message comes to at the load's own rate, in cores.
        "cores_at_load_rate": sum(cpu.values()) * streams / PACED_GAP / 1e6,
    }


async def chain_ttft(config: dict[str, Any], n: int) -> list[tuple[str, str, float, float]]:
    listen = config["listen"]
    rows = []
    async with grpc.aio.insecure_channel(listen["llm_engine"]) as engine_channel, \
            grpc.aio.insecure_channel(listen["prompt"]) as prompt_channel, \
            aiohttp.ClientSession() as session:
        engine = llm_engine_pb2_grpc.LlmEngineStub(engine_channel)
        prompt = prompt_pb2_grpc.PromptServiceStub(prompt_channel)
        auth = (("authorization", f"Bearer {API_KEY}"),)
        for model in (sim_name(1, 0), model_name(1, 0)):
            chat = prompt_pb2.StreamChatRequest(
                model=model, messages=[common_pb2.ChatMessage(role="user", content="hi")],
                max_tokens=1)
            for hop, first in (
                    ("gRPC to llm_engine", _grpc_first(engine, "Generate",
                                                      _engine_request(model, max_tokens=1))),
                    ("gRPC to prompt", _grpc_first(prompt, "StreamChat", chat, auth)),
                    ("HTTP to the edge", _http_first(
                        session, f"http://{listen['edge_http']}/v1/chat/stream", model))):
                rows.append((model, hop, *await _ttft_ms(first, n)))
    return rows


# --- running ---------------------------------------------------------------------------------


def _start_bare(workdir: Path) -> tuple[dict[str, int], dict[str, procstat.Child]]:
    ports = {name: procstat.free_port() for name in ("backend", "relay1", "relay2")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children: dict[str, procstat.Child] = {}
    for name, target in (("backend", None), ("relay1", "backend"), ("relay2", "relay1")):
        argv = [sys.executable, "-m", "bench.experiments.floor", "--serve",
                "backend" if name == "backend" else "relay", str(ports[name])]
        if target:
            argv.append(f"127.0.0.1:{ports[target]}")
        children[name] = procstat.Child(name, argv, env=env, cwd=str(ROOT),
                                        log_path=workdir / f"{name}.log")
        procstat.wait_port(ports[name], children[name].proc, name, 20)
    return ports, children


def _run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def report(result: dict[str, Any]) -> str:
    bare, paced, chain = result["bare_ttft_ms"], result["bare_paced"], result["chain_ttft_ms"]
    lines = [f"# bench.experiments.floor — {os.cpu_count()} cores, "
             f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}", "",
             "## Time to the first message at C=1 (p50 / p90 ms, "
             f"{result['ttft_streams']} sequential streams)", "",
             "| path | p50 | p90 |", "|---|--:|--:|"]
    lines += [f"| bare grpc.aio: {label} | {p50:.2f} | {p90:.2f} |" for label, p50, p90 in bare]
    lines += [f"| Promptline, {model}: {hop} | {p50:.2f} | {p90:.2f} |"
              for model, hop, p50, p90 in chain]
    cpu, kib = paced["cpu_us_per_message"], paced["kib_per_stream"]
    lines += ["", f"## Bare grpc.aio, backend + 2 relays, at C={paced['streams']}: "
              f"{paced['messages_per_stream']} messages {PACED_GAP * 1000:.0f} ms apart, "
              f"workers started over {paced['ramp_s']:.0f} s (`make bench`'s c200)", "",
              f"wall {paced['wall_s']:.2f} s, {paced['messages']} messages; what the issue's "
              "C=200 targets measure, for a chain of this shape that does nothing else:", "",
              "| figure | bare chain | target (whole chain) |", "|---|--:|--:|",
              f"| stream duration p50 / paced ({paced['ideal_s']:.1f} s) | "
              f"{paced['duration_p50_vs_ideal']:.3f}x | <= 1.10x |",
              f"| largest gap between messages p99 | {paced['gap_p99_ms']:.1f} ms | <= 100 ms |",
              f"| KiB per open stream, 3 processes | {paced['kib_per_stream_sum']:.1f} | <= 50 |",
              f"| CPU µs per message, 3 processes | {paced['cpu_us_per_message_sum']:.0f} | - |",
              f"| the same at this load's rate ({paced['streams'] / PACED_GAP:,.0f} messages/s) | "
              f"{paced['cores_at_load_rate']:.2f} cores | - |", "",
              "| process | CPU µs per message | KiB per open stream |", "|---|--:|--:|"]
    lines += [f"| {name} | {cpu[name]:.0f} | {kib[name]:.1f} |" for name in cpu]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams (a few seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # one bare server
    args = parser.parse_args(argv)
    if args.serve:
        kind, port, *target = args.serve
        _run_loop(_serve(kind, int(port), target[0] if target else None))
        return 0
    n = QUICK["ttft_streams"] if args.quick else TTFT_STREAMS
    streams = QUICK["paced_streams"] if args.quick else PACED_STREAMS
    messages = QUICK["paced_messages"] if args.quick else PACED_MESSAGES
    workdir = Path(tempfile.mkdtemp(prefix="promptline-floor-"))
    ports, children = _start_bare(workdir)
    try:
        bare = _run_loop(bare_ttft(ports, n))
        paced = _run_loop(bare_paced(ports, {name: child.pid for name, child in children.items()},
                                     streams, messages))
    finally:
        for child in children.values():
            child.stop(grace=2)
    stack = Stack(workdir, [Load("floor", 1, 1, 0, 1)])
    try:
        stack.start_base()
        stack.start_chain("floor")
        config = yaml.safe_load((workdir / "config-floor.yaml").read_text())
        chain = _run_loop(chain_ttft(config, n))
    finally:
        stack.close()
    result = {"ttft_streams": n, "bare_ttft_ms": bare, "bare_paced": paced,
              "chain_ttft_ms": chain}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

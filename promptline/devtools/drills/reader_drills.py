"""Callers that misbehave: one that stops reading a flooding stream, and many that hang up at
once. The chain holds a bounded amount for a stopped reader (the provider's own send blocks),
other callers do not notice, and a hang-up reaches the provider and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from promptline.devtools.deployment import LocalDeployment
from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import (
    API_KEY,
    Env,
    Load,
    Outcome,
    Result,
    metric_sum,
    metrics,
    ms,
    sample,
    tally,
    until,
)
from promptline.devtools.fake_openai import model_name, split_reply

# --- slow reader -------------------------------------------------------------------------------

PIECE = 1000
"""Characters per provider chunk of the flood."""
FLOOD_CHUNKS = 60_000
"""The flood's length in chunks (~60 MB): far more than the sockets and hops between the
provider and a stopped reader hold (~20 MB measured), so the provider must block."""
FLOOD_REPLY = "".join(f"{i:04d}" + "-word" * ((PIECE - 5) // 5) + " " for i in range(64))
"""64 numbered 1000-character words, cycled: text out of order or missing does not compare
equal."""
RSS_BOUND_KIB = 32 * 1024
"""Most any service's RSS may grow while the readers are stopped (measured: 4-10 MiB)."""
SENT_SHARE = 0.75
"""The provider must block before it sent this share of the two replies (measured: ~35 %)."""
BLOCKED_AFTER = 0.5
"""The provider's send counts as blocked once it made no progress for this long (s)."""
GAP_SLACK = 0.05
"""Other streams' worst gaps may grow by this much (s) or 2x, whichever is more."""


@dataclass
class _Read:
    """What a raw SSE reader saw (no line limit: a slow reader's deltas come merged, and one
    line can be larger than aiohttp's readline allows)."""

    status: int = 0
    terminal: str = ""
    stage: str = ""
    text: list[str] = field(default_factory=list)
    received: int = 0
    ended: float = 0.0


async def _read_stream(http: aiohttp.ClientSession, base_url: str, model: str, max_tokens: int,
                       stop_after: int, stopped_for: float, within: float) -> _Read:
    """A stream that reads `stop_after` bytes, stops reading for `stopped_for` s (its kernel
    buffers fill, and aiohttp stops reading the socket), then reads to the end."""
    out = _Read()
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "flood me"}]}
    buffer = b""
    stopped = False
    try:
        async with asyncio.timeout(within), http.post(
                f"{base_url}/v1/chat/stream", json=body,
                headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            out.status = resp.status
            async for block in resp.content.iter_any():
                out.received += len(block)
                buffer += block
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    _parse(event, out)
                if not stopped and out.received >= stop_after:
                    stopped = True
                    await asyncio.sleep(stopped_for)
    except (aiohttp.ClientError, ConnectionError):
        out.terminal = out.terminal or "connection error"
    except TimeoutError:
        out.terminal = out.terminal or "client timeout"
    out.terminal = out.terminal or "no terminal frame"
    out.ended = time.monotonic()
    return out


def _parse(event: bytes, out: _Read) -> None:
    kind, data = "", b""
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    if kind == "delta":
        out.text.append(json.loads(data)["text"])
    elif kind == "done":
        out.terminal = "done"
    elif kind == "error":
        error = json.loads(data)["error"]
        out.terminal, out.stage = str(error.get("code")), str(error.get("stage"))


def _gaps(outcomes: list[Outcome]) -> dict[str, Any]:
    """The worst gap of each stream: median and p95 over the streams (ms), and their count."""
    worst = sorted(o.max_gap for o in outcomes if o.done)
    if not worst:
        return {"streams": 0}
    p95 = worst[min(len(worst) - 1, int(len(worst) * 0.95))]
    return {"streams": len(worst), "median_ms": ms(statistics.median(worst)), "p95_ms": ms(p95)}


def _flood(env: Env, name: str, idle: float) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "base_url": env.upstream.base_url,
            "upstream_model": "flood", "context_window": 1_000_000,
            "timeouts": {"first_token": "10s", "idle": f"{idle:g}s", "total": "5m"}}


async def slow_reader(env: Env) -> Result:
    stop = env.scale.s(30.0, 8.0)
    short_idle, long_idle = env.scale.s(10.0, 1.5), stop * 2
    baseline_s = env.scale.s(3.0, 1.0)
    mib = FLOOD_CHUNKS * PIECE / 2**20
    result = Result(
        "slow-reader",
        f"2 callers stop reading a flooding stream ({mib:.0f} MiB, 1 KB chunks) for {stop:g} s: "
        f"one on a model with idle {short_idle:g} s, one with idle {long_idle:g} s; 4 callers "
        f"stream `sim` meanwhile",
        f"each service's RSS grows < {RSS_BOUND_KIB // 1024} MiB and the provider's send blocks "
        f"(< {SENT_SHARE:.0%} of the replies sent); the other streams' worst gaps (median over "
        f"streams) stay within 2x or +{GAP_SLACK * 1000:.0f} ms of before once it blocked; "
        f"the short-idle stream ends by the idle rule (edge STREAM_TIMEOUT, provider closed), "
        f"the other one completes, every byte in order")
    config = env.config()
    config["models"] += [_flood(env, "flood-short", short_idle),
                         _flood(env, "flood-long", long_idle)]
    expected = "".join(split_reply(FLOOD_REPLY, FLOOD_CHUNKS))
    up = env.upstream
    async with env.deployment(config) as deployment:
        replicas = deployment.all()
        edge = deployment.replica("edge_http")
        async with Load(env.session, deployment.edge_url, "sim", concurrency=4) as load:
            await asyncio.sleep(baseline_s)
            base_rss = {r.name: sample(r).rss_kib for r in replicas}
            sent_before = up.chunks_sent
            for _ in range(2):
                up.push(for_model="flood", reply=FLOOD_REPLY, tokens=FLOOD_CHUNKS)
            started = time.monotonic()
            readers = [asyncio.create_task(_read_stream(
                env.session, deployment.edge_url, model, FLOOD_CHUNKS, 4096, stop,
                within=stop + 120)) for model in ("flood-short", "flood-long")]
            peak = dict(base_rss)
            blocked_at: float | None = None
            timed_out_at: float | None = None
            last_sent, last_change = up.chunks_sent, time.monotonic()
            while time.monotonic() - started < stop - 0.3:
                await asyncio.sleep(0.2)
                for r in replicas:
                    peak[r.name] = max(peak[r.name], sample(r).rss_kib)
                now = time.monotonic()
                if up.chunks_sent != last_sent:
                    last_sent, last_change = up.chunks_sent, now
                elif (blocked_at is None and now - last_change >= BLOCKED_AFTER
                      and up.active_streams > 0):  # waiting in its send, not finished
                    blocked_at = last_change
                if timed_out_at is None and _stream_timeouts(await metrics(env.session, edge)):
                    timed_out_at = now
            sent = up.chunks_sent - sent_before
            resumed = time.monotonic()
            short, long = await asyncio.gather(*readers)
            finished = time.monotonic()
            await asyncio.sleep(0.5)
        closed = await until(_idle_upstream(env), 3.0)
        edge_metrics = await metrics(env.session, edge)
    outcomes = load.outcomes
    before = _gaps([o for o in outcomes if o.ended < started])
    filling = _gaps([o for o in outcomes if started <= o.started
                     and o.ended < (blocked_at or resumed)])
    stalled = _gaps([o for o in outcomes if (blocked_at or resumed) <= o.started
                     and o.ended < resumed])
    growth = {name: peak[name] - base_rss[name] for name in peak}
    sent_mib = sent * PIECE / 2**20
    timeouts = _stream_timeouts(edge_metrics)
    result.observed = {
        "rss_growth_kib": growth,
        "provider_sent_mib": round(sent_mib, 1),
        "provider_blocked_after_s": None if blocked_at is None else round(blocked_at - started, 1),
        "gaps_before": before, "gaps_filling": filling, "gaps_stalled": stalled,
        "short_idle": f"{short.terminal} after {short.ended - started:.1f} s, "
                      f"{sum(map(len, short.text)) / 2**20:.1f} MiB of text",
        "long_idle": f"{long.terminal} {finished - resumed:.1f} s after resuming, "
                     f"{sum(map(len, long.text)) / 2**20:.1f} MiB of text",
        "edge_stream_timeouts": timeouts,
        "edge_timeout_after_s": None if timed_out_at is None else round(timed_out_at - started, 1),
        "other_outcomes": tally(outcomes),
    }
    for name, kib in growth.items():
        result.expect(kib < RSS_BOUND_KIB, f"{name} RSS grew {kib / 1024:.1f} MiB for stopped "
                                           "readers")
    result.expect(blocked_at is not None and sent < SENT_SHARE * 2 * FLOOD_CHUNKS,
                  f"the provider was never pushed back: it sent {sent_mib:.1f} of "
                  f"{2 * mib:.0f} MiB into stopped readers")
    result.expect(all(o.done for o in outcomes), f"other streams failed: {tally(outcomes)}")
    if before.get("streams") and stalled.get("streams"):
        bound = max(2 * before["median_ms"], before["median_ms"] + GAP_SLACK * 1000)
        result.expect(stalled["median_ms"] <= bound,
                      f"other streams' worst gaps grew: median {stalled['median_ms']} ms > "
                      f"{bound:g} ms")
    else:
        result.expect(False, "no other stream to compare gaps with")
    result.expect(short.terminal != "done" and "".join(short.text) == expected[
        :sum(map(len, short.text))], f"short idle: {short.terminal}, expected a cut prefix")
    result.expect(timed_out_at is not None,
                  f"the edge did not end the short-idle stream (STREAM_TIMEOUT) while its "
                  f"reader was stopped ({stop:g} s > idle {short_idle:g} s); it counted "
                  f"{timeouts:g} after the reader resumed")
    result.expect(long.terminal == "done", f"long idle: {long.terminal} after resuming, "
                                           "expected done")
    result.expect("".join(long.text) == expected, "long idle: the text is not the reply, in "
                                                  "order")
    result.expect(closed is not None, "provider streams still open after the readers ended")
    return result


def _stream_timeouts(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items()
               if k.startswith("promptline_errors_total{") and "code=STREAM_TIMEOUT" in k)


def _idle_upstream(env: Env) -> Any:
    async def idle() -> bool:
        return env.upstream.active_streams == 0
    return idle


# --- disconnect storm --------------------------------------------------------------------------

STORM_PACE_MS = 200
"""The fake's pace for the storm's streams: slow, so every stream is open when they hang up."""
CLOSE_WITHIN = 3.0
TASK_SLACK = 2
"""Background tasks that may happen to be alive at a scrape (probes, timers)."""


async def _open_stream(http: aiohttp.ClientSession, base_url: str, model: str,
                       opened: asyncio.Event, hang_up: asyncio.Event) -> bool:
    """A stream that reads until its first delta, then waits for `hang_up` and closes the
    connection; True when it got that far."""
    body = {"model": model, "messages": [{"role": "user", "content": "hang up on me"}]}
    resp = await http.post(f"{base_url}/v1/chat/stream", json=body,
                           headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        if resp.status != 200:
            return False
        while line := await resp.content.readline():
            if line.startswith(b"event: delta"):
                break
        else:
            return False
        opened.set()
        await hang_up.wait()
        return True
    finally:
        resp.close()  # closes the connection: the client has gone


async def _service_gauges(env: Env, deployment: LocalDeployment) -> dict[str, tuple[float,
                                                                                    float]]:
    """(active streams, asyncio tasks) of each service."""
    out = {}
    for replica in deployment.all():
        values = await metrics(env.session, replica)
        out[replica.name] = (metric_sum(values, "promptline_active_streams"),
                             metric_sum(values, "promptline_asyncio_tasks"))
    return out


async def disconnect_storm(env: Env) -> Result:
    streams = env.scale.n(200, 30)
    result = Result(
        "disconnect-storm",
        f"{streams} streams on the fake upstream ({STORM_PACE_MS} ms a token), all closed by "
        f"their clients at once",
        f"every provider connection closed within {CLOSE_WITHIN:g} s; each service's "
        f"promptline_active_streams and promptline_asyncio_tasks back to their baseline "
        f"(tasks within {TASK_SLACK}) within {CLOSE_WITHIN:g} s more")
    config = env.config()
    config["models"].append({"name": "paced", "provider": "openai",
                             "base_url": env.upstream.base_url,
                             "upstream_model": model_name(1000, STORM_PACE_MS),
                             "timeouts": {"first_token": "10s", "idle": "5s", "total": "5m"}})
    up = env.upstream
    async with env.deployment(config) as deployment:
        warm = _Streams(env, deployment, 2, "paced")
        warmed = await warm.open(10)
        await warm.hang_up()
        result.expect(warmed == 2, f"warm-up: {warmed} of 2 streams opened")
        await until(_idle_upstream(env), CLOSE_WITHIN)
        await asyncio.sleep(0.5)
        baseline = await _service_gauges(env, deployment)
        disconnects = up.disconnects
        storm = _Streams(env, deployment, streams, "paced")
        opened = await storm.open(30)
        provider_open = up.active_streams
        during = await _service_gauges(env, deployment)
        hung_up_at = time.monotonic()
        hang_up_s = await storm.hang_up()
        closed = await until(_idle_upstream(env), CLOSE_WITHIN)
        closed_s = None if closed is None else time.monotonic() - hung_up_at
        still_open, cut = up.active_streams, up.disconnects - disconnects
        settled: dict[str, tuple[float, float]] = {}

        async def back() -> bool:
            nonlocal settled
            settled = await _service_gauges(env, deployment)
            return all(settled[n][0] <= baseline[n][0]
                       and settled[n][1] <= baseline[n][1] + TASK_SLACK for n in baseline)

        gauges_back = await until(back, CLOSE_WITHIN, interval=0.2)
    result.observed = {
        "opened": opened, "provider_streams_open": provider_open,
        "hang_up_ms": ms(hang_up_s), "provider_closed_ms": ms(closed_s),
        "provider_disconnects": cut,
        "provider_streams_open_after": still_open,
        "active_streams_tasks": {n: f"{_pair(baseline[n])} -> {_pair(during[n])} -> "
                                    f"{_pair(settled.get(n, (-1, -1)))}" for n in baseline},
        "gauges_back_ms": ms(gauges_back),
    }
    result.expect(opened == streams, f"only {opened} of {streams} streams opened")
    result.expect(closed is not None, f"provider connections still open {CLOSE_WITHIN:g} s "
                                      f"after the hang-up: {still_open}")
    result.expect(gauges_back is not None, "active streams or asyncio tasks not back to their "
                                           f"baseline: {settled} (baseline {baseline})")
    return result


def _pair(values: tuple[float, float]) -> str:
    return f"{values[0]:g}/{values[1]:g}"


class _Streams:
    """`count` streams on `model`, each open until it delivered text; then hung up at once."""

    def __init__(self, env: Env, deployment: LocalDeployment, count: int, model: str) -> None:
        self._hang_up = asyncio.Event()
        self._opened = [asyncio.Event() for _ in range(count)]
        self._tasks = [asyncio.create_task(_open_stream(env.session, deployment.edge_url, model,
                                                        ev, self._hang_up))
                       for ev in self._opened]

    async def open(self, within: float) -> int:
        """How many delivered text within `within` s."""
        waits = [asyncio.create_task(e.wait()) for e in self._opened]
        await asyncio.wait(waits, timeout=within)
        for wait in waits:
            wait.cancel()
        return sum(e.is_set() for e in self._opened)

    async def hang_up(self) -> float:
        """Every client closes its connection; the seconds that took."""
        started = time.monotonic()
        self._hang_up.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return time.monotonic() - started


# --- planted faults (tests/test_drills.py): each must fail its drill ----------------------------


@fault("pump-unbounded", "services.llm_engine")
def _pump_unbounded() -> None:
    """The engine reads the provider on, whatever the writer took: a stopped reader costs
    memory without end, and the provider is never pushed back."""
    from services.llm_engine import pump

    pump.MAX_PENDING_CHARS = 1 << 60
    pump.MAX_PENDING_CHUNKS = 1 << 60


_KEPT: list[object] = []


@fault("provider-ignores-cancel", "services.llm_engine")
def _ignores_cancel() -> None:
    """The OpenAI provider never closes its HTTP response: a cancelled stream leaves the
    provider's connection open (and the provider generating)."""
    from services.llm_engine.providers import openai_compat

    original = openai_compat.OpenAIProvider.open_stream

    async def open_stream(self: openai_compat.OpenAIProvider, params: dict[str, Any]
                          ) -> aiohttp.ClientResponse:
        response = await original(self, params)
        _KEPT.append(response)  # never collected, so never closed
        response.release = lambda: None  # type: ignore[method-assign]
        response.close = lambda: None  # type: ignore[method-assign]
        return response

    openai_compat.OpenAIProvider.open_stream = open_stream  # type: ignore[method-assign]


DRILLS = {"slow-reader": slow_reader, "disconnect-storm": disconnect_storm}

"""Provider faults through the fake upstream: refused, a 500 storm, 429 with retry-after, a stall,
a malformed SSE line, a TCP reset, ... Each ends with the contract's code and stage (a real HTTP
status before the headers, an SSE error after them), the provider call is closed, and no process
spins afterwards."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from promptline.devtools.deployment import LocalDeployment
from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import (
    API_KEY,
    REPLY,
    Env,
    Load,
    Outcome,
    Result,
    chat,
    cpu_share,
    ms,
    tally,
    until,
)

CPU_LIMIT = 0.10
"""Most of a core any service may use just after a fault (a loop that did not exit shows ~1)."""
CLOSED_WITHIN = 1.0
"""The provider's stream is closed this soon after the caller saw the error."""
MAX_ATTEMPTS = 2  # the drills' config: retries.max_attempts
RETRY_AFTER_S = 2  # > retries.backoff_max: the engine gives the hint instead of waiting
PACE = 0.05  # seconds between the fake's chunks in mid-stream faults: the fault comes mid-reply
AFTER = 5  # chunks before a mid-stream fault


def _with_timeouts(config: dict[str, Any], model: str, **timeouts: str) -> dict[str, Any]:
    for entry in config["models"]:
        if entry["name"] == model:
            entry["timeouts"] = {**entry["timeouts"], **timeouts}
    return config


async def _quiet(env: Env, deployment: LocalDeployment) -> float:
    """The busiest service's CPU (cores) over the 2 s after a fault: a short settle, then a
    window (smoke: shorter)."""
    await asyncio.sleep(env.scale.s(0.5, 0.2))
    shares = await cpu_share(deployment.all(), env.scale.s(1.5, 0.8))
    return max(shares.values())


def _line(out: Outcome, extra: str = "") -> str:
    what = f"{out.terminal}/{out.stage}" if out.stage else out.terminal
    return f"HTTP {out.status} {what} in {ms(out.seconds):g} ms{extra}"


@dataclass
class _Case:
    """One fault: knobs for the fake's next request, and what the caller must see."""

    name: str
    knobs: dict[str, Any]
    code: str
    stage: str
    status: int
    """200 for a fault after the headers (the error is an SSE event)."""
    model: str = "up"
    cut: bool = False
    """The engine must close the provider's stream itself (the provider would go on)."""


async def _one_case(env: Env, deployment: LocalDeployment, case: _Case,
                    result: Result) -> None:
    up = env.upstream
    if case.knobs:
        up.push(for_model="up", **case.knobs)
    disconnects, drops = up.disconnects, up.drops
    out = await chat(env.session, deployment.edge_url, case.model, within=20)
    closed = await until(lambda: _true(up.active_streams == 0), CLOSED_WITHIN)
    cpu = await _quiet(env, deployment)
    cut = up.disconnects > disconnects
    ender = ("engine closed it" if cut else "provider reset it" if up.drops > drops
             else "provider ended it" if case.knobs else "no provider stream")
    result.observed[case.name] = _line(out, f", {ender}, cpu max {cpu:g}")
    seen = f"{case.name}: {out.status} {out.terminal}/{out.stage}"
    result.expect((out.terminal, out.stage, out.status) == (case.code, case.stage, case.status),
                  f"{seen}, expected {case.status} {case.code}/{case.stage}")
    if case.status == 200:
        result.expect(REPLY.startswith(out.text), f"{case.name}: text is not a prefix of the "
                                                  "reply")
    result.expect(closed is not None and (cut or not case.cut),
                  f"{case.name}: provider stream still open {CLOSED_WITHIN:g} s after the error")
    result.expect(cpu < CPU_LIMIT, f"{case.name}: a service spins after the fault "
                                   f"({cpu:g} of a core)")


async def _true(value: bool) -> bool:
    return value


async def provider_errors(env: Env) -> Result:
    storm = env.scale.s(3.0, 1.0)
    result = Result(
        "provider-errors",
        f"provider refuses connections; answers 500 to every request for {storm:g} s "
        f"(4 callers); answers 429 with retry-after {RETRY_AFTER_S} s",
        f"refused: 503 UNAVAILABLE/first_packet; storm: 502 UPSTREAM_ERROR/first_packet, at most "
        f"{MAX_ATTEMPTS} provider attempts per request, success right after the storm; 429: 429 "
        f"UPSTREAM_RATE_LIMITED/first_packet with Retry-After {RETRY_AFTER_S} and no retry "
        f"sooner; every service under {CPU_LIMIT:.0%} of a core within 2 s of each fault")
    up = env.upstream
    async with env.deployment(env.config()) as deployment:
        warm = await chat(env.session, deployment.edge_url, "up", within=10)
        result.expect(warm.done, f"a request before the faults failed: {warm.terminal}")

        # Connection refused: nothing listens on up-refused's port.
        await _one_case(env, deployment, _Case("refused", {}, "UNAVAILABLE", "first_packet", 503,
                                               model="up-refused"), result)

        # A 500 storm: every request fails for a while, then the provider is back.
        before = up.request_count
        up.fail_status = 500
        try:
            async with Load(env.session, deployment.edge_url, "up", concurrency=4,
                            within=10) as load:
                await asyncio.sleep(storm)
                outcomes = await load.stop()
        finally:
            up.fail_status = None
        attempts = up.request_count - before
        ended = time.monotonic()
        cpu = await _quiet(env, deployment)
        after = await chat(env.session, deployment.edge_url, "up", within=10)
        failed = [o for o in outcomes if not o.done]
        slowest = max((o.seconds for o in outcomes), default=0.0)
        per_request = attempts / len(outcomes) if outcomes else 0.0
        result.observed["storm"] = (f"{len(outcomes)} requests {tally(outcomes)}, statuses "
                                    f"{sorted({o.status for o in outcomes})}, {per_request:.2f} "
                                    f"attempts each, slowest {ms(slowest):g} ms, cpu max {cpu:g}")
        result.observed["after_storm"] = _line(after)
        result.expect(bool(outcomes), "storm: no request was made")
        result.expect(all(o.status == 502 and (o.terminal, o.stage)
                          == ("UPSTREAM_ERROR", "first_packet") for o in failed),
                      f"storm: not every failure is 502 UPSTREAM_ERROR/first_packet "
                      f"({tally(failed)})")
        result.expect(len(failed) == len(outcomes),
                      f"storm: {len(outcomes) - len(failed)} requests succeeded during it")
        result.expect(per_request <= MAX_ATTEMPTS,
                      f"storm: {per_request:.2f} provider attempts per request > {MAX_ATTEMPTS}")
        result.expect(cpu < CPU_LIMIT, f"storm: a service spins after the fault ({cpu:g} of a "
                                       "core)")
        result.expect(after.done, f"after the storm: {after.terminal} "
                                  f"{time.monotonic() - ended:.1f} s later")

        # 429 with a retry-after longer than backoff_max: the caller gets the hint.
        before = up.request_count
        up.push(for_model="up", fail_status=429, retry_after=RETRY_AFTER_S)
        started = time.monotonic()
        async with env.session.post(
                f"{deployment.edge_url}/v1/chat/stream",
                json={"model": "up", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            status, retry_after = resp.status, resp.headers.get("Retry-After")
            body = await resp.json(content_type=None) if status != 200 else {}
            if status == 200:
                await resp.read()
        took = time.monotonic() - started
        attempts = up.request_count - before
        error = body.get("error", {}) if isinstance(body, dict) else {}
        cpu = await _quiet(env, deployment)
        result.observed["rate_limited"] = (
            f"HTTP {status} {error.get('code', 'done')}/{error.get('stage', '')} in "
            f"{ms(took):g} ms, Retry-After {retry_after}, retry_after_ms "
            f"{error.get('retry_after_ms')}, {attempts} provider attempt(s), cpu max {cpu:g}")
        result.expect((status, error.get("code"), error.get("stage"))
                      == (429, "UPSTREAM_RATE_LIMITED", "first_packet"),
                      f"429: {status} {error.get('code', 'done')}/{error.get('stage', '')}, "
                      "expected 429 UPSTREAM_RATE_LIMITED/first_packet")
        result.expect(retry_after == str(RETRY_AFTER_S)
                      and error.get("retry_after_ms") == RETRY_AFTER_S * 1000,
                      f"429: the retry hint is lost (Retry-After {retry_after}, retry_after_ms "
                      f"{error.get('retry_after_ms')})")
        result.expect(attempts == 1, f"429: retried {attempts - 1} time(s) before the "
                                     "provider's retry-after")
        result.expect(cpu < CPU_LIMIT, f"429: a service spins after the fault ({cpu:g} of a "
                                       "core)")
    return result


async def provider_stream_faults(env: Env) -> Result:
    idle = 1
    cases = [
        _Case("stall_after_role", {"stall_after_chunks": 0}, "FIRST_TOKEN_TIMEOUT",
              "first_packet", 504, cut=True),
        _Case("stall_mid_stream", {"stall_after_chunks": AFTER, "delay": PACE},
              "STREAM_TIMEOUT", "mid_stream", 200, cut=True),
        _Case("malformed_line", {"garbage_after_chunks": AFTER, "delay": PACE},
              "UPSTREAM_ERROR", "mid_stream", 200, cut=True),
        _Case("tcp_reset", {"drop_after_chunks": AFTER, "delay": PACE},
              "UNAVAILABLE", "mid_stream", 200),
        _Case("error_event", {"fail_after_chunks": AFTER, "delay": PACE},
              "UPSTREAM_ERROR", "mid_stream", 200),
        _Case("truncated", {"truncate_after_chunks": AFTER, "delay": PACE},
              "UPSTREAM_ERROR", "mid_stream", 200),
    ]
    result = Result(
        "provider-stream-faults",
        f"the provider, after its headers, stalls (after the role chunk; after {AFTER} chunks), "
        f"sends a malformed SSE line, resets the TCP connection, sends an error event, ends "
        f"without a finish (first_token and idle timeouts {idle} s)",
        f"stall after role: 504 FIRST_TOKEN_TIMEOUT/first_packet; then SSE errors: "
        f"STREAM_TIMEOUT, UPSTREAM_ERROR, UNAVAILABLE, UPSTREAM_ERROR, UPSTREAM_ERROR, all "
        f"mid_stream after a prefix of the reply; the provider stream closed within "
        f"{CLOSED_WITHIN:g} s; every service under {CPU_LIMIT:.0%} of a core within 2 s")
    config = _with_timeouts(env.config(), "up", first_token=f"{idle}s", idle=f"{idle}s")
    async with env.deployment(config) as deployment:
        warm = await chat(env.session, deployment.edge_url, "up", within=10)
        result.expect(warm.done, f"a request before the faults failed: {warm.terminal}")
        for case in cases:
            await _one_case(env, deployment, case, result)
    return result


# --- planted faults (tests/test_drills.py): each must fail its drill ----------------------------


@fault("provider-429-as-error", "services.llm_engine")
def _rate_limit_as_error() -> None:
    """The engine maps the provider's 429 to a plain UPSTREAM_ERROR (the retry hint is lost)."""
    from services.llm_engine.providers import openai_errors

    table = dict(openai_errors.BY_STATUS)
    table[429] = openai_errors.SERVER_ERROR
    openai_errors.BY_STATUS = table


_SPINNERS: set[asyncio.Task[None]] = set()


@fault("provider-spin-after-error", "services.llm_engine")
def _spin_after_error() -> None:
    """After a provider error, a detached loop keeps polling the finished provider stream: the
    error was treated as an ordinary packet, and the loop never exits."""
    from services.llm_engine import pump

    original = pump.ChunkPump._read

    async def read(self: pump.ChunkPump) -> None:
        await original(self)
        if self._error is not None:
            _SPINNERS.add(asyncio.create_task(_poll_forever()))

    pump.ChunkPump._read = read  # type: ignore[method-assign]


async def _poll_forever() -> None:
    while True:  # noqa: ASYNC110 - the busy loop is the fault
        await asyncio.sleep(0)


DRILLS = {"provider-errors": provider_errors, "provider-stream-faults": provider_stream_faults}

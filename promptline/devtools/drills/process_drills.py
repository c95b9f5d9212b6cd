"""A service process dies (SIGKILL) under streams and is started again; and the whole deployment
gets SIGTERM under streams (a node drain)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from promptline.devtools.deployment import LocalDeployment, Replica
from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import (
    Env,
    Outcome,
    Result,
    chat,
    metric_sum,
    metrics,
    ms,
    tally,
    until,
)

TYPED_WITHIN = 2.0  # every open stream hears of a dead hop this fast
FIRST_SUCCESS_WITHIN = 2.0  # after the restarted hop serves
FAIL_FAST = 1.0  # a request while the hop is down
CHAIN_CANCELLED_WITHIN = 3.0


async def _open_streams(env: Env, deployment: LocalDeployment, count: int, model: str
                        ) -> tuple[list[asyncio.Task[Outcome]], bool]:
    """`count` streams, each past its first token; the tasks read them to their end."""
    started = 0
    all_started = asyncio.Event()

    async def first(_out: Outcome) -> None:
        nonlocal started
        if _out.deltas == 1:
            started += 1
            if started == count:
                all_started.set()

    tasks = [asyncio.create_task(chat(env.session, deployment.edge_url, model, within=60,
                                      on_delta=first)) for _ in range(count)]
    try:
        async with asyncio.timeout(20):
            await all_started.wait()
    except TimeoutError:
        return tasks, False
    return tasks, True


async def _first_success_after(env: Env, url: str, within: float) -> float | None:
    """Seconds until a chat succeeds (tries 20 ms apart)."""
    async def succeeds() -> bool:
        return (await chat(env.session, url, "sim", within=5)).done
    return await until(succeeds, within, interval=0.02)


async def _restart(victim: Replica) -> float:
    """Start `victim` again on its port; seconds until it serves."""
    started = time.monotonic()
    await asyncio.to_thread(victim.start)
    return time.monotonic() - started


async def _hop_kill(env: Env, service: str, name: str) -> Result:
    count = env.scale.n(20, 6)
    label = {"llm_engine": "engine", "prompt": "prompt service"}[service]
    result = Result(
        name,
        f"{label} SIGKILLed with {count} streams past their first token, a request while it "
        "is down, then started again on its port",
        f"every stream ends with a typed UNAVAILABLE mid_stream error within {TYPED_WITHIN:g} s; "
        f"the request while down fails with 503 UNAVAILABLE within {FAIL_FAST:g} s; a chat "
        f"succeeds within {FIRST_SUCCESS_WITHIN:g} s of the restarted {label} serving")
    async with env.deployment() as deployment:
        tasks, ready = await _open_streams(env, deployment, count, "sim-long")
        result.expect(ready, f"{count} streams did not all start")
        victim = deployment.replica(service)
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill)
        outcomes = await asyncio.gather(*tasks)
        heard = [o.ended - killed for o in outcomes]
        down = await chat(env.session, deployment.edge_url, "sim", within=10)
        serving_after = await _restart(victim)
        first = await _first_success_after(env, deployment.edge_url, FIRST_SUCCESS_WITHIN * 3)
    result.observed = {"outcomes": tally(outcomes), "slowest_to_hear_ms": ms(max(heard)),
                       "while_down": f"{down.status} {down.terminal}",
                       "while_down_ms": ms(down.seconds), "restart_to_serving_ms":
                       ms(serving_after), "serving_to_first_success_ms": ms(first)}
    result.expect(all(o.terminal == "UNAVAILABLE" and o.stage == "mid_stream"
                      for o in outcomes), "a stream did not end with UNAVAILABLE mid_stream")
    result.expect(max(heard) <= TYPED_WITHIN, f"a stream heard of it after {max(heard):.2f} s")
    result.expect(down.status == 503 and down.terminal == "UNAVAILABLE"
                  and down.seconds <= FAIL_FAST,
                  f"while down: {down.status} {down.terminal} in {down.seconds:.2f} s")
    result.expect(first is not None and first <= FIRST_SUCCESS_WITHIN,
                  f"first success {first} s after the restarted {label} served")
    return result


async def engine_kill(env: Env) -> Result:
    return await _hop_kill(env, "llm_engine", "engine-kill")


async def prompt_kill(env: Env) -> Result:
    return await _hop_kill(env, "prompt", "prompt-kill")


async def edge_kill(env: Env) -> Result:
    """The edge dies: its streams' callers see the connection drop, the chain behind it is
    cancelled down to the provider, and a client that retries is served once it is back."""
    count = env.scale.n(20, 6)
    result = Result(
        "edge-kill",
        f"edge SIGKILLed with {count} streams on the upstream past their first token; clients "
        "retry every 50 ms until served; the edge started again on its port",
        f"every client sees its connection drop within {TYPED_WITHIN:g} s; the provider "
        f"connections and the engine's and prompt's streams are closed within "
        f"{CHAIN_CANCELLED_WITHIN:g} s; a retrying client is served within "
        f"{FIRST_SUCCESS_WITHIN:g} s of the edge serving")
    env.upstream.delay = 0.05  # long streams: ~6 s each
    env.upstream.tokens = 120
    try:
        async with env.deployment() as deployment:
            tasks, ready = await _open_streams(env, deployment, count, "up")
            result.expect(ready, f"{count} streams did not all start")
            edge = deployment.replica("edge_http")
            killed = time.monotonic()
            await asyncio.to_thread(edge.kill)
            outcomes = await asyncio.gather(*tasks)
            heard = max(o.ended - killed for o in outcomes)

            async def chain_idle() -> bool:
                streams = 0.0
                for replica in (deployment.replica("prompt"), deployment.replica("llm_engine")):
                    streams += metric_sum(await metrics(env.session, replica),
                                          "promptline_active_streams")
                return streams == 0 and env.upstream.active_streams == 0

            cancelled = await until(chain_idle, CHAIN_CANCELLED_WITHIN * 2)
            retrying = asyncio.create_task(_first_success_after(env, deployment.edge_url, 30))
            serving_after = await _restart(edge)
            served_at = time.monotonic()
            await retrying
            first = time.monotonic() - served_at
    finally:
        env.upstream.delay, env.upstream.tokens = 0.0, None
    result.observed = {"client_saw": tally(outcomes), "slowest_to_hear_ms": ms(heard),
                       "chain_cancelled_ms": ms(cancelled),
                       "restart_to_serving_ms": ms(serving_after),
                       "serving_to_first_success_ms": ms(first)}
    result.expect(all(not o.done for o in outcomes), "a stream claims to have finished")
    result.expect(heard <= TYPED_WITHIN, f"a client heard of it after {heard:.2f} s")
    result.expect(cancelled is not None and cancelled <= CHAIN_CANCELLED_WITHIN,
                  f"chain not cancelled within {CHAIN_CANCELLED_WITHIN:g} s")
    result.expect(first <= FIRST_SUCCESS_WITHIN, f"first success {first:.2f} s after serving")
    return result


async def sigterm(env: Env) -> Result:
    """A node drain: every process gets SIGTERM at once with streams in flight."""
    count = env.scale.n(50, 10)
    grace = 5.0
    result = Result(
        "sigterm",
        f"SIGTERM to every process at once with {count} streams in flight (~3.5 s each, "
        f"shutdown_grace {grace:g} s)",
        "every stream ends with done within shutdown_grace; a new connection to the edge is "
        "refused once it drains; every process exits with status 0")
    config = env.config(shutdown_grace=f"{grace:g}s")
    async with env.deployment(config) as deployment:
        tasks, ready = await _open_streams(env, deployment, count, "sim-slow")
        result.expect(ready, f"{count} streams did not all start")
        signalled = time.monotonic()
        for replica in deployment.all():
            replica.signal(15)
        await asyncio.sleep(0.3)
        refused = await _connect_refused(env.session, deployment.edge_url)
        outcomes = await asyncio.gather(*tasks)
        codes: dict[str, Any] = {}
        for replica in deployment.all():
            codes[replica.name] = await asyncio.to_thread(replica.wait, grace + 5)
        ended = max(o.ended for o in outcomes) - signalled
    result.observed = {"outcomes": tally(outcomes), "last_stream_ended_ms": ms(ended),
                       "new_connection": refused, "exit_codes": codes}
    result.expect(all(o.done for o in outcomes), "a stream did not end with done")
    result.expect(ended <= grace, f"the last stream ended {ended:.2f} s after SIGTERM")
    result.expect(refused == "refused", f"a new connection during the drain was {refused}")
    result.expect(all(code == 0 for code in codes.values()), f"exit codes {codes}")
    return result


async def _connect_refused(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with asyncio.timeout(3), http.get(f"{url}/healthz") as resp:
            return f"answered {resp.status}"
    except (aiohttp.ClientConnectorError, ConnectionRefusedError):
        return "refused"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


# --- planted faults (tests/test_drills.py): each must fail its drill ----------------------------


def _slow_reconnect() -> None:
    """gRPC's reconnect backoff pinned at 10 s: a restarted next hop waits to be dialled."""
    from promptline import channels

    slow = {"grpc.initial_reconnect_backoff_ms": 10_000, "grpc.min_reconnect_backoff_ms": 10_000,
            "grpc.max_reconnect_backoff_ms": 10_000}
    channels.CHANNEL_OPTIONS[:] = [(k, slow.get(k, v)) for k, v in channels.CHANNEL_OPTIONS]


fault("prompt-slow-reconnect", "services.prompt")(_slow_reconnect)
fault("edge-slow-reconnect", "services.edge_http")(_slow_reconnect)


@fault("prompt-leaves-engine-calls", "services.prompt")
def _leaves_engine_calls() -> None:
    """The prompt service reads the engine from a detached task: when its caller is gone, the
    engine call goes on to its end instead of being cancelled."""
    import asyncio
    from collections.abc import AsyncGenerator

    from services.prompt import server

    detached: set[asyncio.Task[None]] = set()

    async def never_cancels(call: Any) -> AsyncGenerator[Any, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            async for frame in call:
                queue.put_nowait(frame)
            queue.put_nowait(None)

        task = asyncio.ensure_future(read())
        detached.add(task)
        task.add_done_callback(detached.discard)
        while (frame := await queue.get()) is not None:
            yield frame
            if frame.WhichOneof("frame") in ("done", "error"):
                return

    setattr(server, "read_frames", never_cancels)  # noqa: B010  # the name the relay calls


@fault("engine-no-drain", "services.llm_engine")
def _no_drain() -> None:
    """The engine stops at once on SIGTERM: its streams are cut instead of drained."""
    from services.llm_engine import server

    original = server.EngineServer.stop

    async def abrupt(self: server.EngineServer, grace: float) -> None:
        await original(self, 0)

    server.EngineServer.stop = abrupt  # type: ignore[method-assign]


DRILLS = {"engine-kill": engine_kill, "prompt-kill": prompt_kill, "edge-kill": edge_kill,
          "sigterm": sigterm}

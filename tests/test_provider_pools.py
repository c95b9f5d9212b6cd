"""Provider pools (docs/provider-pools.md): several deployments per model, balanced by weight,
load or latency, with a circuit breaker shared by every engine replica through Redis.

Real parts throughout: FakeOpenAI upstreams on ephemeral ports (one made to fail, 429 or stall),
engines over real gRPC, the session's redis-server and Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY

from promptline.channels import insecure_channel
from promptline.config import ConfigError, ModelConfig
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.errors import ErrorCode, PromptlineError
from promptline.v1 import common_pb2, llm_engine_pb2, llm_engine_pb2_grpc
from services.llm_engine.board import SharedBoard
from services.llm_engine.health import State
from services.llm_engine.pool import DeploymentPool, DeploymentState, Pools
from services.llm_engine.server import EngineServer, start_engine
from tests.conftest import make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

QUICK = {"first_token": "2s", "idle": "2s", "total": "10s"}


def pool_model(name: str, upstreams: dict[str, FakeOpenAI], weights: dict[str, float] | None = None,
               **extra: Any) -> dict[str, Any]:
    """An openai model whose deployments are the named fake upstreams."""
    deployments = [{"name": d, "base_url": up.base_url, "weight": (weights or {}).get(d, 1)}
                   for d, up in upstreams.items()]
    return {"name": name, "provider": "openai", "upstream_model": "gpt-test",
            "timeouts": QUICK, "deployments": deployments, "stream": {"coalesce_ms": 0}, **extra}


def unique(prefix: str) -> str:
    """A model name of its own: pool keys in the shared Redis topologies are never flushed."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def upstreams(*names: str, **knobs: Any) -> AsyncIterator[dict[str, FakeOpenAI]]:
    async with AsyncExitStack() as stack:
        yield {n: await stack.enter_async_context(FakeOpenAI(reply="pooled reply", **knobs))
               for n in names}


@asynccontextmanager
async def engine(models: list[dict[str, Any]], **overrides: Any
                 ) -> AsyncIterator[tuple[EngineServer, llm_engine_pb2_grpc.LlmEngineStub]]:
    server = await start_engine(make_config(overrides, models=models), "127.0.0.1:0")
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, llm_engine_pb2_grpc.LlmEngineStub(channel)
    finally:
        await server.stop(0.2)


def request(model: str) -> llm_engine_pb2.GenerateRequest:
    return llm_engine_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, model=model,
        messages=[common_pb2.ChatMessage(role="user", content="hello")])


async def generate(stub: llm_engine_pb2_grpc.LlmEngineStub, model: str) -> list[Any]:
    return await read_all(stub.Generate(request(model), timeout=10))


def answered_by(frames: list[Any]) -> str:
    """The deployment that answered; fails on an error frame."""
    assert frames and frames[0].HasField("start"), frames
    assert frames[-1].HasField("done"), PromptlineError.from_pb(frames[-1].error)
    assert frames[0].start.deployment == frames[-1].done.deployment
    return str(frames[-1].done.deployment)


def error_of(frames: list[Any]) -> PromptlineError:
    assert frames and frames[-1].HasField("error"), frames
    return PromptlineError.from_pb(frames[-1].error)


def pool_of(server: EngineServer, model: str) -> DeploymentPool:
    config = server.live.current.model(model)
    assert config is not None
    return server.pools.get(config)


def state(server: EngineServer, model: str, deployment: str) -> DeploymentState:
    return next(d.state for d in pool_of(server, model).deployments if d.name == deployment)


def counts(fakes: dict[str, FakeOpenAI]) -> dict[str, int]:
    return {name: fake.request_count for name, fake in fakes.items()}


def healthy_gauge(model: str, deployment: str) -> float | None:
    return REGISTRY.get_sample_value("promptline_deployment_healthy",
                                     {"model": model, "deployment": deployment})


def messages(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(start)]


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deployments,error", [
    ([{"name": "a", "base_url": "http://x/v1", "weight": 0}],
     "models[1].deployments[0].weight: must be greater than 0"),
    ([{"name": "a", "base_url": "http://x/v1", "weight": -1}],
     "models[1].deployments[0].weight: must be at least 0"),
    ([{"name": "a", "base_url": "http://x/v1"}, {"name": "a", "base_url": "http://y/v1"}],
     "models[1].deployments[1].name: duplicate deployment name 'a'"),
    ([{"name": "a"}], "models[1].deployments[0].base_url: an openai deployment needs"),
    ([{"name": "a", "base_url": "http://x/v1", "simulated": {"ttft_ms": 1}}],
     "models[1].deployments[0].simulated: applies only to provider 'simulated'"),
    ([{"name": "a", "base_url": "http://x/v1", "rpm": 0}],
     "models[1].deployments[0].rpm: must be at least 1"),
    ([{"name": "a", "base_url": "ftp://x"}], "models[1].deployments[0].base_url: must be"),
])
def test_bad_pools_stop_start_up_naming_the_key(deployments: list[dict[str, Any]],
                                                error: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(models=[{"name": "p", "provider": "openai", "deployments": deployments}])
    assert str(info.value).startswith(error), info.value


def test_bad_simulated_pool_and_health_keys() -> None:
    with pytest.raises(ConfigError, match=r"^models\[1\]\.deployments\[0\]: base_url/api_key_env"):
        make_config(models=[{"name": "p", "provider": "simulated",
                             "deployments": [{"name": "a", "base_url": "http://x/v1"}]}])
    with pytest.raises(ConfigError, match=r"^models\[1\]\.health\.max_cooldown: must be at least"):
        make_config(models=[{"name": "p", "provider": "simulated",
                             "health": {"cooldown": "10m", "max_cooldown": "1m"}}])
    with pytest.raises(ConfigError, match=r"^models\[1\]\.routing: must be one of"):
        make_config(models=[{"name": "p", "provider": "simulated", "routing": "fastest"}])
    with pytest.raises(ConfigError,
                       match=r"^models\[1\]\.health\.panic_threshold: must be at most"):
        make_config(models=[{"name": "p", "provider": "simulated",
                             "health": {"panic_threshold": 2}}])


def test_deployments_take_the_models_keys_where_they_have_none() -> None:
    config = make_config(models=[
        {"name": "p", "provider": "openai", "base_url": "https://main.example/v1",
         "api_key_env": "MAIN_KEY", "upstream_model": "gpt-x", "proxy": "",
         "deployments": [{"name": "a"},
                         {"name": "b", "base_url": "https://b.example/v1", "api_key_env": "B_KEY",
                          "upstream_model": "gpt-b", "weight": 3, "rpm": 60}]},
        {"name": "s", "provider": "simulated", "simulated": {"ttft_ms": 7, "reply": "base"},
         "deployments": [{"name": "x"},
                         {"name": "y", "simulated": {"fail_after_tokens": 0, "ttft_ms": None}}]},
    ])
    # parse_config read the keys from an env of its own; redo it with keys set
    from promptline.config import parse_config
    from tests.conftest import BASE_CONFIG
    raw = {**BASE_CONFIG, "models": [
        {"name": "p", "provider": "openai", "base_url": "https://main.example/v1",
         "api_key_env": "MAIN_KEY", "deployments": [{"name": "a"},
                                                    {"name": "b", "api_key_env": "B_KEY"}]}]}
    keyed = parse_config(raw, env={"MAIN_KEY": "sk-main", "B_KEY": "sk-b",
                                   "https_proxy": "http://proxy:3128"}).model("p")
    assert keyed is not None
    assert [(d.api_key, d.proxy) for d in keyed.pool] == [("sk-main", "http://proxy:3128"),
                                                          ("sk-b", "http://proxy:3128")]
    assert "sk-" not in repr(keyed)

    p, s, sim = config.model("p"), config.model("s"), config.model("sim")
    assert p is not None and s is not None and sim is not None
    a, b = p.pool
    assert (a.base_url, a.api_key_env, a.upstream_model, a.proxy, a.weight) == (
        "https://main.example/v1", "MAIN_KEY", "gpt-x", None, 1.0)
    assert (b.base_url, b.api_key_env, b.upstream_model, b.weight, b.rpm) == (
        "https://b.example/v1", "B_KEY", "gpt-b", 3.0, 60)
    x, y = s.pool
    assert x.simulated == s.simulated
    assert y.simulated is not None and (y.simulated.ttft_ms, y.simulated.reply,
                                        y.simulated.fail_after_tokens) == (7, "base", 0)
    # the one-deployment shorthand is a pool of one named after the model
    assert [d.name for d in sim.pool] == ["sim"] and sim.deployments == ()


# --- balancing -------------------------------------------------------------------------------


async def test_weighted_spreads_1000_requests_within_5_percent_of_the_weights() -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    async with upstreams(*weights, tokens=1, record=False) as fakes, \
            engine([pool_model("w", fakes, weights)]) as (_, stub):
        gate = asyncio.Semaphore(25)

        async def one() -> str:
            async with gate:
                return answered_by(await generate(stub, "w"))

        answers = await asyncio.gather(*(one() for _ in range(1000)))
    total = sum(weights.values())
    for name, weight in weights.items():
        expected = 1000 * weight / total
        got = answers.count(name)
        assert abs(got - expected) <= 0.05 * expected, (name, got, expected)
        assert fakes[name].request_count == got


async def test_least_busy_keeps_in_flight_counts_within_one() -> None:
    async with upstreams("a", "b", "c", tokens=20, delay=0.05) as fakes, \
            engine([pool_model("lb", fakes, routing="least_busy")]) as (server, stub):
        pool = pool_of(server, "lb")
        spreads: list[list[int]] = []

        async def sample() -> None:
            while True:
                spreads.append([d.state.in_flight for d in pool.deployments])
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        streams = []
        for _ in range(10):
            streams.append(asyncio.create_task(generate(stub, "lb")))
            await asyncio.sleep(0.03)
        await eventually(lambda: sum(f.active_streams for f in fakes.values()) == 10,
                         what="10 streams open upstream", interval=0.005)
        plateau = sorted(f.active_streams for f in fakes.values())
        results = await asyncio.gather(*streams)
        await eventually(lambda: all(d.state.in_flight == 0 for d in pool.deployments),
                         what="every attempt ended")
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    assert plateau == [3, 3, 4], plateau
    assert all(f.active_streams == 0 for f in fakes.values())
    # every pick went to the least busy one: until the first stream ended (whose end no pick
    # can foresee), the counts never drifted apart by more than one
    rising = spreads[:next(i for i in range(1, len(spreads))
                           if sum(spreads[i]) < sum(spreads[i - 1]))]
    assert max(map(sum, rising)) == 10
    assert all(max(s) - min(s) <= 1 for s in rising), rising
    assert sorted(answered_by(r) for r in results).count("a") in (3, 4)


async def test_lowest_latency_prefers_the_faster_deployment() -> None:
    async with upstreams("fast", "slow", tokens=2) as fakes, \
            engine([pool_model("ll", fakes, routing="lowest_latency")]) as (_, stub):
        fakes["slow"].ttft = 0.2
        answers = [answered_by(await generate(stub, "ll")) for _ in range(12)]
    # each is measured once, then the faster one takes the traffic
    assert sorted(answers[:2]) == ["fast", "slow"]
    assert answers[2:] == ["fast"] * 10


# --- health ----------------------------------------------------------------------------------


def _break(fake: FakeOpenAI, fault: str) -> None:
    if fault == "stall":
        fake.stall_after_chunks = 0
    else:
        fake.fail_status = int(fault)


def _heal(fake: FakeOpenAI) -> None:
    fake.stall_after_chunks = fake.fail_status = None


@pytest.mark.parametrize("fault", ["500", "429", "stall"])
async def test_ejected_deployment_gets_no_traffic_until_its_probe_succeeds(
        fault: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.llm_engine")
    name = unique("ej")
    # 1 s: a stall of this shared box right after the ejection must not eat the whole cooldown
    # before the first request that checks it (400 ms once did, in CI).
    health = {"failures": 2, "window": "10s", "cooldown": "1s", "max_cooldown": "10s"}
    timeouts = {"first_token": "300ms", "idle": "2s", "total": "10s"}
    async with upstreams("good", "bad", tokens=3) as fakes, \
            engine([pool_model(name, fakes, health=health, timeouts=timeouts)]) as (server, stub):
        good, bad = fakes["good"], fakes["bad"]
        _break(bad, fault)
        while bad.request_count < 2:  # until the bad one failed twice
            before = bad.request_count
            frames = await generate(stub, name)
            if bad.request_count > before:
                # the attempt on `bad` failed before any token (a stall: its first-token
                # timeout): retried on the other one
                assert answered_by(frames) == "good"
        breaker = state(server, name, "bad").breaker
        assert breaker.state(time.time()) is State.EJECTED and breaker.level == 1
        assert healthy_gauge(name, "bad") == 0

        async def none_to_bad() -> None:
            """Requests until the cooldown is nearly over: every one to the good deployment."""
            before, sent = bad.request_count, 0
            while breaker.until - time.time() > 0.05:
                assert answered_by(await generate(stub, name)) == "good"
                sent += 1
            assert sent >= 3 and bad.request_count == before, "an ejected one got traffic"

        await none_to_bad()
        await asyncio.sleep(max(0.0, breaker.until - time.time()) + 0.02)
        # half-open: one request probes it, still broken: ejected again, for twice as long
        before = bad.request_count
        frames = await generate(stub, name)
        assert bad.request_count == before + 1
        assert answered_by(frames) == "good"
        assert breaker.level == 2 and 1.0 < breaker.until - time.time() <= 2.0
        await none_to_bad()

        _heal(bad)
        await asyncio.sleep(max(0.0, breaker.until - time.time()) + 0.02)
        assert answered_by(await generate(stub, name)) == "bad"  # the probe, and it answered
        assert breaker.state(time.time()) is State.HEALTHY and healthy_gauge(name, "bad") == 1
        answers = [answered_by(await generate(stub, name)) for _ in range(20)]
        assert answers.count("bad") == 10
        await good.wait_idle()
        await bad.wait_idle()
        await eventually(lambda: all(d.state.in_flight == 0
                                     for d in pool_of(server, name).deployments),
                         what="every attempt ended")
    assert [r.levelno for r in messages(caplog, "deployment ejected")] == [logging.WARNING] * 2
    assert len(messages(caplog, "deployment recovered")) == 1
    ok = REGISTRY.get_sample_value("promptline_deployment_requests_total",
                                   {"model": name, "deployment": "bad", "outcome": "ok"})
    assert ok == 10 + 1


async def test_a_failure_before_the_first_token_is_retried_on_the_other_deployment(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.llm_engine")
    health = {"failures": 100}
    async with upstreams("a", "b", tokens=2) as fakes, \
            engine([pool_model("rt", fakes, health=health)],
                   retries={"max_attempts": 2, "backoff_base": "2s", "backoff_max": "2s"}
                   ) as (_, stub):
        fakes["b"].fail_status = 503
        started = time.perf_counter()
        answers = [answered_by(await generate(stub, "rt")) for _ in range(6)]
        elapsed = time.perf_counter() - started
    assert answers == ["a"] * 6
    assert fakes["b"].request_count == 3  # every other request tried `b` first
    assert elapsed < 1.5, "the retry on another deployment waited a backoff"
    # the end-of-stream log names who answered; each failed attempt's warning, where it failed
    ended = messages(caplog, "stream ended")
    assert [(vars(r)["deployment_model"], vars(r)["deployment"]) for r in ended] == [
        ("rt", "a")] * 6
    assert [vars(r)["deployment"] for r in messages(caplog, "provider attempt failed")] == [
        "b"] * 3


async def test_panic_mode_uses_every_deployment_when_all_are_ejected(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.llm_engine")
    health = {"failures": 1, "cooldown": "30s"}
    async with upstreams("a", "b", tokens=2) as fakes, \
            engine([pool_model("pn", fakes, health=health)]) as (server, stub):
        for fake in fakes.values():
            fake.fail_status = 500
        assert error_of(await generate(stub, "pn")).code is ErrorCode.UPSTREAM_ERROR
        now = time.time()
        assert all(state(server, "pn", d).breaker.state(now) is State.EJECTED for d in fakes)
        for fake in fakes.values():
            fake.fail_status = None
        answers = [answered_by(await generate(stub, "pn")) for _ in range(4)]
    assert sorted(answers) == ["a", "a", "b", "b"]  # both, while both are ejected
    assert len(messages(caplog, "pool in panic mode")) == 1


def test_panic_threshold_counts_the_healthy_share() -> None:
    config = make_config(models=[{
        "name": "four", "provider": "simulated", "health": {"panic_threshold": 0.5},
        "deployments": [{"name": n} for n in "abcd"]}])
    model = config.model("four")
    assert model is not None
    pool = DeploymentPool(model, {}, SharedBoard(None, 0.25))
    now = time.time()
    for d in pool.deployments[:2]:
        d.state.breaker.until = now + 60
    assert {d.name for d in pool._usable(now)} == {"c", "d"}  # half healthy: not below 0.5
    pool.deployments[2].state.breaker.until = now + 60
    assert {d.name for d in pool._usable(now)} == {"a", "b", "c", "d"}  # a quarter: panic


# --- limits ----------------------------------------------------------------------------------


async def test_a_deployment_at_its_limit_is_skipped_before_the_call() -> None:
    async with upstreams("a", "b", tokens=10, delay=0.05) as fakes:
        model = pool_model("cc", fakes, fallback=["sim"])
        for d in model["deployments"]:
            d["max_concurrency"] = 1
        async with engine([model]) as (_, stub):
            first = [asyncio.create_task(generate(stub, "cc")) for _ in range(2)]
            await asyncio.gather(*(f.wait_until(lambda f=f: f.active_streams == 1)
                                   for f in fakes.values()))
            third = await generate(stub, "cc")
            assert third[0].start.model == "sim" and answered_by(third) == "sim"
            assert counts(fakes) == {"a": 1, "b": 1}, "a deployment at its limit was called"
            assert sorted(answered_by(f) for f in await asyncio.gather(*first)) == ["a", "b"]


async def test_a_retry_after_its_backoff_still_respects_max_concurrency() -> None:
    """X's attempt got a 429 and backs off; Y takes the only slot meanwhile: X's retry must not
    run beside Y (the room was checked before the backoff, the stream counted after it)."""
    async with upstreams("one", tokens=30) as fakes:
        model = pool_model("mc", fakes)
        model["deployments"][0]["max_concurrency"] = 1
        retries = {"max_attempts": 2, "backoff_base": "10ms", "backoff_max": "2s"}
        async with engine([model], retries=retries) as (server, stub):
            fake = fakes["one"]
            fake.push(fail_status=429, retry_after_ms=1500)  # Y starts well inside it
            x = asyncio.create_task(generate(stub, "mc"))
            await fake.wait_until(lambda: fake.request_count == 1)
            await eventually(lambda: state(server, "mc", "one").in_flight == 0,
                             what="X's first attempt over")
            fake.delay = 0.1  # Y holds the slot ~3 s, past X's backoff
            y = asyncio.create_task(generate(stub, "mc"))
            await fake.wait_until(lambda: fake.active_streams == 1)
            assert error_of(await x).code is ErrorCode.UPSTREAM_RATE_LIMITED
            assert answered_by(await y) == "one"
            assert fake.request_count == 2  # X's retry never went out beside Y


async def test_rpm_and_tpm_limits_answer_429_before_the_call() -> None:
    async with upstreams("only", tokens=5) as fakes:
        rpm = pool_model("rpm", fakes)
        rpm["deployments"][0]["rpm"] = 3
        tpm = pool_model("tpm", fakes)
        tpm["deployments"][0]["tpm"] = 10  # the first reply's usage (~14 tokens) fills it
        async with engine([rpm, tpm]) as (_, stub):
            assert [answered_by(await generate(stub, "rpm")) for _ in range(3)] == ["only"] * 3
            err = error_of(await generate(stub, "rpm"))
            assert (err.code, err.retryable) == (ErrorCode.UPSTREAM_RATE_LIMITED, True)
            assert 0 < err.retry_after_ms <= 60_000
            assert answered_by(await generate(stub, "tpm")) == "only"
            assert error_of(await generate(stub, "tpm")).code is ErrorCode.UPSTREAM_RATE_LIMITED
        assert fakes["only"].request_count == 4


# --- shared through Redis --------------------------------------------------------------------


@pytest.fixture(params=["standalone", "cluster", "sentinel"])
def redis_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each `redis_mode`, on the session's topologies."""
    if request.param == "standalone":
        return {"redis_url": request.getfixturevalue("redis_server").url}
    if request.param == "cluster":
        return {"redis_mode": "cluster",
                "redis_url": request.getfixturevalue("redis_cluster").url}
    sentinel = request.getfixturevalue("redis_sentinel")
    return {"redis_mode": "sentinel", "redis_sentinel": {"master": sentinel.master_name,
                                                         "nodes": sentinel.sentinels}}


async def test_two_replicas_on_one_redis_see_the_same_ejection(
        redis_settings: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.llm_engine")
    name = unique("shared")
    health = {"failures": 3, "window": "30s", "cooldown": "30s"}
    async with upstreams("a", "b", tokens=2) as fakes, \
            engine([pool_model(name, fakes, health=health)], **redis_settings) as (one, stub1), \
            engine([pool_model(name, fakes, health=health)], **redis_settings) as (two, stub2):
        assert {answered_by(await generate(stub2, name)) for _ in range(4)} == {"a", "b"}
        fakes["b"].fail_status = 500
        while not state(one, name, "b").breaker.until:  # replica one ejects b
            assert answered_by(await generate(stub1, name)) == "a"
        fakes["b"].fail_status = None  # were replica two to call b now, b would answer
        assert state(two, name, "b").breaker.state(time.time()) is State.HEALTHY

        # replica two learns of it within a sync (about a second), never by failing itself
        deadline = time.monotonic() + 5  # a sync is ~1 s; slack for a loaded box
        while state(two, name, "b").breaker.state(time.time()) is not State.EJECTED:
            assert time.monotonic() < deadline, "replica two never saw the ejection"
            await generate(stub2, name)
            await asyncio.sleep(0.05)
        before = fakes["b"].request_count
        assert [answered_by(await generate(stub2, name)) for _ in range(10)] == ["a"] * 10
        assert fakes["b"].request_count == before
    assert len(messages(caplog, "deployment ejected")) == 1  # once, by the replica that saw it
    assert not messages(caplog, "deployment health: Redis unreachable")


async def test_one_probe_at_a_time_over_every_replica(redis_server: Any) -> None:
    """Two replicas' boards on one Redis: one failure ejects for both, one of them probes, and
    the probe's success brings the deployment back for both."""
    from promptline.redis_store import connect_redis
    from services.llm_engine.health import Breaker

    stores = [connect_redis(make_config(redis_url=redis_server.url)) for _ in range(2)]
    boards = [SharedBoard(s.client, 0.5) for s in stores]
    try:
        name = unique("probe")
        model = make_config(models=[{"name": "x", "provider": "simulated",
                                     "health": {"failures": 1, "cooldown": "100ms"}}]).model("x")
        assert isinstance(model, ModelConfig)
        views = [Breaker(name, "d"), Breaker(name, "d")]
        states = [DeploymentState("d", view) for view in views]
        await boards[0].failed(views[0], model.health, shared=True)
        await boards[1].sync(name, [states[1]])
        assert [v.state(time.time()) for v in views] == [State.EJECTED] * 2
        await asyncio.sleep(0.15)
        assert [v.state(time.time()) for v in views] == [State.HALF_OPEN] * 2
        won = [await b.take_probe(v, 5.0, shared=True)
               for b, v in zip(boards, views, strict=True)]
        assert won == [True, False]
        boards[0].recovered(views[0], shared=True)
        await boards[0].close()  # waits for its report to Redis
        await asyncio.sleep(0.01)  # a sync begun in the same clock tick would be ignored
        await boards[1].sync(name, [states[1]])
        assert [v.state(time.time()) for v in views] == [State.HEALTHY] * 2
        assert not await stores[0].client.exists(f"{{pl:pool|{name}}}:probe|d")
    finally:
        await boards[1].close()
        for s in stores:
            await s.close()


async def test_without_redis_each_replica_runs_its_breakers_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    from promptline.devtools.embedded_redis import free_port

    caplog.set_level(logging.INFO, logger="promptline.llm_engine")
    health = {"failures": 2, "cooldown": "30s"}
    async with upstreams("a", "b", tokens=2) as fakes, \
            engine([pool_model("alone", fakes, health=health)],
                   redis_url=f"redis://127.0.0.1:{free_port()}/0") as (server, stub):
        fakes["b"].fail_status = 500
        for _ in range(6):
            assert answered_by(await generate(stub, "alone")) == "a"
        assert state(server, "alone", "b").breaker.state(time.time()) is State.EJECTED
        await asyncio.sleep(1.1)  # a sync is tried again meanwhile
        await generate(stub, "alone")
    assert len(messages(caplog, "deployment health: Redis unreachable")) == 1


# --- the simulated provider, reload, frames ---------------------------------------------------


async def test_simulated_deployments_have_their_own_fault_knobs() -> None:
    model = {"name": "simpool", "provider": "simulated", "timeouts": QUICK,
             "simulated": {"ttft_ms": 0, "tokens_per_second": 0, "reply": "from the pool"},
             "health": {"failures": 1, "cooldown": "30s"},
             "deployments": [{"name": "broken", "simulated": {"fail_after_tokens": 0}},
                             {"name": "fine"}]}
    async with engine([model]) as (server, stub):
        frames = [await generate(stub, "simpool") for _ in range(6)]
    assert {answered_by(f) for f in frames} == {"fine"}
    assert "".join(f.delta.text for f in frames[0] if f.HasField("delta")) == "from the pool"
    assert state(server, "simpool", "broken").breaker.until > 0


async def test_reload_applies_pool_changes_to_new_streams(tmp_path: Any) -> None:
    import yaml

    from promptline.config import load_config
    from tests.conftest import BASE_CONFIG

    async with upstreams("a", "b", tokens=2) as fakes:
        path = tmp_path / "engine.yaml"
        one = pool_model("rl", {"a": fakes["a"]})
        path.write_text(yaml.safe_dump({**BASE_CONFIG, "models": [one]}))
        server = await start_engine(load_config(path, env={}), "127.0.0.1:0")
        try:
            async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = llm_engine_pb2_grpc.LlmEngineStub(channel)
                assert answered_by(await generate(stub, "rl")) == "a"
                bad = pool_model("rl", fakes)
                bad["deployments"][1]["weight"] = 0
                path.write_text(yaml.safe_dump({**BASE_CONFIG, "models": [bad]}))
                assert not server.live.reload()  # rejected: the running pool stays
                path.write_text(yaml.safe_dump({**BASE_CONFIG,
                                                 "models": [pool_model("rl", fakes)]}))
                assert server.live.reload()
                answers = {answered_by(await generate(stub, "rl")) for _ in range(4)}
                assert answers == {"a", "b"}
        finally:
            await server.stop(0.2)


async def test_the_start_and_done_events_name_the_deployment(redis_server: Any,
                                                              redis_client: Any) -> None:
    import aiohttp

    from tests.chain import running_chain

    async with upstreams("east", "west", tokens=3) as fakes:
        config = make_config(redis_url=redis_server.url, models=[pool_model("geo", fakes)])
        async with running_chain(config) as chain:
            async with aiohttp.ClientSession() as http:
                seen = set()
                for _ in range(2):
                    async with http.post(f"{chain.base_url}/v1/chat/stream", json={
                            "model": "geo", "messages": [{"role": "user", "content": "hi"}]},
                            headers={"Authorization": "Bearer dev-key"}) as resp:
                        body = await resp.text()
                    events = _sse_data(body)
                    assert events["start"]["deployment"] == events["done"]["deployment"]
                    assert resp.headers["X-Promptline-Deployment"] == events["done"]["deployment"]
                    seen.add(events["done"]["deployment"])
                for stream in (False, True):  # the OpenAI wire: a header says who answered
                    async with http.post(f"{chain.base_url}/v1/chat/completions", json={
                            "model": "geo", "messages": [{"role": "user", "content": "hi"}],
                            "stream": stream}, headers={"Authorization": "Bearer dev-key"}) as resp:
                        await resp.read()
                        assert resp.status == 200
                        seen.add(resp.headers["X-Promptline-Deployment"])
    assert seen == {"east", "west"}


def _sse_data(body: str) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for block in body.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines()
                     if ": " in line and not line.startswith(":"))
        if "event" in lines:
            out[lines["event"]] = json.loads(lines["data"])
    return out


async def test_a_first_token_timeout_moves_to_another_deployment_not_another_model() -> None:
    fast = {"first_token": "500ms", "idle": "2s", "total": "10s"}
    async with upstreams("a", "b", tokens=2) as fakes, upstreams("solo", tokens=2) as alone, \
            upstreams("fb", tokens=2) as fallback, engine([
                pool_model("ft", fakes, health={"failures": 100}, timeouts=fast),
                pool_model("ftfb", fallback, timeouts=fast),
                pool_model("ft1", alone, timeouts=fast, fallback=["ftfb"]),
            ]) as (_, stub):
        fakes["b"].stall_after_chunks = 0  # headers, then silence: a stalled deployment
        answers = [answered_by(await generate(stub, "ft")) for _ in range(4)]
        assert answers == ["a"] * 4 and fakes["b"].request_count == 2  # tried once each time
        alone["solo"].stall_after_chunks = 0
        err = error_of(await generate(stub, "ft1"))
        assert err.code is ErrorCode.FIRST_TOKEN_TIMEOUT
        assert alone["solo"].request_count == 1 and fallback["fb"].request_count == 0


async def test_a_first_token_timeout_stays_the_answer_when_the_rest_are_at_a_limit() -> None:
    """One stalls (and is ejected), the other is at its max_concurrency: the caller gets the
    stall's FIRST_TOKEN_TIMEOUT, not UPSTREAM_RATE_LIMITED with a fallback model run after it."""
    fast = {"first_token": "500ms", "idle": "2s", "total": "10s"}
    async with upstreams("a", "b", tokens=20) as fakes, upstreams("fb", tokens=2) as fallback:
        model = pool_model("ftrl", fakes, health={"failures": 1}, timeouts=fast,
                           fallback=["ftrlfb"])
        for deployment in model["deployments"]:
            deployment["max_concurrency"] = 1
        async with engine([model, pool_model("ftrlfb", fallback, timeouts=fast)]) as (_, stub):
            for fake in fakes.values():
                fake.delay = 0.1  # 2 s a stream
            busy = asyncio.create_task(generate(stub, "ftrl"))
            await eventually(lambda: sum(f.active_streams for f in fakes.values()) == 1,
                             what="one deployment busy")
            full = next(name for name, f in fakes.items() if f.active_streams)
            stalls = next(name for name in fakes if name != full)
            fakes[stalls].stall_after_chunks = 0
            err = error_of(await generate(stub, "ftrl"))
            assert err.code is ErrorCode.FIRST_TOKEN_TIMEOUT
            assert fallback["fb"].request_count == 0
            assert answered_by(await busy) == full


async def test_a_stream_from_before_a_reload_uses_the_retiring_pool() -> None:
    """Its retry or fallback asks for the old model config: it gets the pool being retired
    (closed once its streams are over), not a new pool that nothing would close."""
    async with upstreams("a", "b") as fakes:
        old = make_config(models=[pool_model("rl", fakes)])
        new = make_config(models=[pool_model("rl", fakes, routing="least_busy")])
        pools = Pools(SharedBoard(None, 0.25))
        try:
            pools.follow(old)
            before = pools.get(old.model("rl"))
            pools.follow(new)
            assert pools.get(old.model("rl")) is before  # retiring, still serving
            assert pools.get(new.model("rl")) is not before
            assert len(pools.retiring) == 1
        finally:
            await pools.close()

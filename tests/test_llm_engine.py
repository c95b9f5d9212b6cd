"""LlmEngine over real gRPC: simulated streams, timeouts, fault drills, retries and fallbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from promptline.channels import insecure_channel
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, llm_engine_pb2, llm_engine_pb2_grpc
from services.llm_engine.server import start_engine
from tests.conftest import make_config
from tests.grpc_calls import read_all

REPLY = "one two three four five six seven eight nine ten eleven twelve"


def sim(name: str = "m", **simulated: Any) -> dict[str, Any]:
    timeouts = simulated.pop("timeouts", {"first_token": "5s", "idle": "5s", "total": "20s"})
    fallback = simulated.pop("fallback", [])
    settings = {"ttft_ms": 0, "tokens_per_second": 0, "reply": REPLY, **simulated}
    return {"name": name, "provider": "simulated", "simulated": settings, "timeouts": timeouts,
            "fallback": fallback}


@asynccontextmanager
async def engine(*models: dict[str, Any]) -> AsyncIterator[llm_engine_pb2_grpc.LlmEngineStub]:
    server = await start_engine(make_config(models=list(models)), "127.0.0.1:0")
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield llm_engine_pb2_grpc.LlmEngineStub(channel)
    finally:
        await server.stop(0.2)


def request(model: str = "m", **kw: Any) -> llm_engine_pb2.GenerateRequest:
    return llm_engine_pb2.GenerateRequest(
        request_id="rid-1", model=model,
        messages=[common_pb2.ChatMessage(role="user", content="hello")], **kw)


async def run(call: Any) -> tuple[list[Any], grpc.StatusCode]:
    return await read_all(call), await call.code()


def kinds(frames: list[Any]) -> list[str]:
    return [f.WhichOneof("frame") for f in frames]


def delivered_tokens(frames: list[Any]) -> int:
    return sum(f.delta.tokens for f in frames if f.HasField("delta"))


def text(frames: list[Any]) -> str:
    return "".join(f.delta.text for f in frames if f.HasField("delta"))


async def test_simulated_stream_and_usage():
    async with engine(sim()) as stub:
        frames, code = await run(stub.Generate(request(), timeout=10))
    assert code == grpc.StatusCode.OK
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "done"
    assert text(frames) == REPLY
    done = frames[-1].done
    assert done.finish_reason == "stop" and done.model == "m"
    # deltas may be coalesced when the caller falls behind; every token is accounted for
    assert done.usage.completion_tokens == delivered_tokens(frames)
    assert done.usage.prompt_tokens > 0


async def test_max_tokens_finishes_with_length():
    async with engine(sim()) as stub:
        frames, code = await run(stub.Generate(request(max_tokens=3), timeout=10))
    assert code == grpc.StatusCode.OK
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "done"
    assert delivered_tokens(frames) == 3 == frames[-1].done.usage.completion_tokens
    assert frames[-1].done.finish_reason == "length"


async def test_unknown_model_is_not_found_at_connect():
    async with engine(sim()) as stub:
        frames, code = await run(stub.Generate(request("nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage, err.origin) == (ErrorCode.NOT_FOUND, Stage.CONNECT, "llm_engine")


async def test_provider_failure_mid_stream_ends_stream_without_retry():
    async with engine(sim(fail_after_tokens=3, fallback=["b"]), sim("b")) as stub:
        frames, code = await run(stub.Generate(request(), timeout=10))
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "error"
    assert delivered_tokens(frames) == 3
    assert code == grpc.StatusCode.UNAVAILABLE
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.UPSTREAM_ERROR, Stage.MID_STREAM)
    assert err.request_id == "rid-1"


async def test_failure_before_first_token_falls_back():
    async with engine(sim("a", fail_after_tokens=0, fallback=["b"]), sim("b")) as stub:
        frames, code = await run(stub.Generate(request("a"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert frames[0].start.model == "b" and frames[-1].done.model == "b"
    assert text(frames) == REPLY


async def test_failure_before_first_token_without_fallback_reports_error():
    async with engine(sim("a", fail_after_tokens=0)) as stub:
        frames, code = await run(stub.Generate(request("a"), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert kinds(frames) == ["error"]
    err = PromptlineError.from_pb(frames[0].error)
    assert (err.code, err.stage, err.retryable) == (ErrorCode.UPSTREAM_ERROR, Stage.FIRST_PACKET,
                                                    True)


async def test_first_token_timeout():
    timeouts = {"first_token": "300ms", "idle": "5s", "total": "20s"}
    async with engine(sim(stall_after_tokens=0, timeouts=timeouts)) as stub:
        frames, code = await run(stub.Generate(request(), timeout=10))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage, err.retryable) == (ErrorCode.FIRST_TOKEN_TIMEOUT,
                                                    Stage.FIRST_PACKET, True)


async def test_idle_gap_timeout_mid_stream():
    timeouts = {"first_token": "5s", "idle": "300ms", "total": "20s"}
    async with engine(sim(stall_after_tokens=2, timeouts=timeouts)) as stub:
        frames, code = await run(stub.Generate(request(), timeout=10))
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "error"
    assert delivered_tokens(frames) == 2
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.STREAM_TIMEOUT, Stage.MID_STREAM)


async def test_total_timeout_mid_stream():
    timeouts = {"first_token": "400ms", "idle": "5s", "total": "500ms"}
    async with engine(sim(tokens_per_second=10, timeouts=timeouts)) as stub:
        frames, code = await run(stub.Generate(request(), timeout=10))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert kinds(frames)[-1] == "error" and 1 <= kinds(frames).count("delta") < 12
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.DEADLINE_EXCEEDED, Stage.MID_STREAM)


async def test_caller_deadline_becomes_a_typed_frame():
    async with engine(sim(tokens_per_second=10)) as stub:
        frames, code = await run(stub.Generate(request(), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert kinds(frames)[-1] == "error"
    assert PromptlineError.from_pb(frames[-1].error).code is ErrorCode.DEADLINE_EXCEEDED


async def test_reload_retires_providers_of_changed_models(tmp_path, monkeypatch):
    """A model changed by a reload gets a new pool (new providers); the old one closes after the
    longest stream that may still use it (its total timeout)."""
    import yaml

    import services.llm_engine.pool as engine_pool
    from promptline.config import load_config
    from tests.conftest import BASE_CONFIG

    monkeypatch.setattr(engine_pool, "RETIRE_SLACK", 0.0)
    quick = {"first_token": "1s", "idle": "1s", "total": "1s"}
    path = tmp_path / "engine.yaml"
    raw = {**BASE_CONFIG, "models": [sim("m", timeouts=quick)]}
    path.write_text(yaml.safe_dump(raw))
    server = await start_engine(load_config(path, env={}), "127.0.0.1:0")
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = llm_engine_pb2_grpc.LlmEngineStub(channel)
            assert (await run(stub.Generate(request(), timeout=10)))[1] == grpc.StatusCode.OK
            old = server.pools.get(server.live.current.model("m"))

            path.write_text(yaml.safe_dump({**raw, "models": [sim("m", timeouts=quick,
                                                                  reply="changed")]}))
            assert server.live.reload()
            frames, code = await run(stub.Generate(request(), timeout=10))
            assert code == grpc.StatusCode.OK and text(frames) == "changed"
            assert server.pools.get(server.live.current.model("m")) is not old
            assert list(server.pools.retiring.values()) == [old]
            await asyncio.wait(list(server.pools.retiring), timeout=10)
            assert not server.pools.retiring
    finally:
        await server.stop(0.2)

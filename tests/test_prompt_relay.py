"""The prompt service's relay against a scripted fake engine: it stops at the first error frame,
cancels the engine call, and maps bare transport failures to typed errors."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from promptline.auth import Authenticator
from promptline.channels import insecure_channel
from promptline.config import Targets, key_digest
from promptline.devtools.embedded_redis import free_port
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.grpc_server import start_grpc_server
from promptline.v1 import (
    common_pb2,
    llm_engine_pb2,
    llm_engine_pb2_grpc,
    prompt_pb2,
    prompt_pb2_grpc,
)
from services.prompt.server import start_prompt
from tests.conftest import make_config
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)
Script = Callable[[Any, Any], Any]


class FakeEngine(llm_engine_pb2_grpc.LlmEngineServicer):
    """Runs a scripted async generator per call and records how each call ended."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.cancelled = asyncio.Event()
        self.ended = asyncio.Event()
        """Set when the handler is over: it cannot produce another frame after that."""
        self.frames_sent = 0

    async def Generate(self, request, context):
        try:
            async for frame in self.script(request, context):
                self.frames_sent += 1
                yield frame
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.ended.set()


def start_frame() -> llm_engine_pb2.GenerateResponse:
    return llm_engine_pb2.GenerateResponse(start=llm_engine_pb2.GenerateStart(model="sim"))


def delta(text: str) -> llm_engine_pb2.GenerateResponse:
    return llm_engine_pb2.GenerateResponse(delta=common_pb2.Delta(text=text, tokens=1))


@asynccontextmanager
async def prompt_with(engine: FakeEngine | None, redis_url: str
                      ) -> AsyncIterator[prompt_pb2_grpc.PromptServiceStub]:
    fake = None
    if engine is not None:
        fake = await start_grpc_server(
            "127.0.0.1:0", lambda s: llm_engine_pb2_grpc.add_LlmEngineServicer_to_server(engine, s),
            ["promptline.v1.LlmEngine"])
        target = f"127.0.0.1:{fake.port}"
    else:
        target = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = dataclasses.replace(make_config(redis_url=redis_url),
                                 targets=Targets(prompt="127.0.0.1:1", llm_engine=target))
    prompt = await start_prompt(config, "127.0.0.1:0")
    try:
        async with insecure_channel(f"127.0.0.1:{prompt.port}") as channel:
            stub = prompt_pb2_grpc.PromptServiceStub(channel)
            stub.channel = channel  # type: ignore[attr-defined]  (raw calls in one test)
            yield stub
    finally:
        await prompt.stop(0.2)
        if fake is not None:
            await fake.stop(0.2)


def chat() -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model="sim", messages=[common_pb2.ChatMessage(role="user", content="hi")])


async def test_relay_stops_at_error_frame_and_cancels_the_engine(redis_server):
    async def script(request, context):
        yield start_frame()
        yield delta("partial ")
        err = PromptlineError(ErrorCode.STREAM_TIMEOUT, "no token", stage=Stage.MID_STREAM,
                              origin="llm_engine", request_id=request.request_id)
        yield llm_engine_pb2.GenerateResponse(error=err.to_pb())
        # a misbehaving engine that keeps the stream open and keeps talking after its error
        while True:
            yield delta("more ")
            await asyncio.sleep(0.01)

    engine = FakeEngine(script)
    async with prompt_with(engine, redis_server.url) as stub:
        call = stub.StreamChat(chat(), metadata=AUTH, timeout=10)
        frames = await read_all(call)
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(engine.cancelled.wait(), 10)
        sent_when_cancelled = engine.frames_sent
        await asyncio.wait_for(engine.ended.wait(), 10)  # the window in which it could go on
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds[-1] == "error" and "error" not in kinds[:-1]
    relayed = PromptlineError.from_pb(frames[-1].error)
    # relayed unchanged: same code, stage and origin, never rewrapped
    assert (relayed.code, relayed.stage, relayed.origin) == (
        ErrorCode.STREAM_TIMEOUT, Stage.MID_STREAM, "llm_engine")
    assert engine.frames_sent == sent_when_cancelled  # nothing more was produced


async def test_bare_internal_status_becomes_a_safe_internal_error(redis_server):
    async def script(request, context):
        yield start_frame()
        await context.abort(grpc.StatusCode.INTERNAL, "Traceback: secret internals at 0xdead")

    async with prompt_with(FakeEngine(script), redis_server.url) as stub:
        call = stub.StreamChat(chat(), metadata=AUTH, timeout=10)
        frames = await read_all(call)
        assert await call.code() == grpc.StatusCode.INTERNAL
    err = PromptlineError.from_pb(frames[-1].error)
    assert err.code is ErrorCode.INTERNAL and err.stage is Stage.FIRST_PACKET
    assert "secret" not in err.message and "Traceback" not in err.message


async def test_stream_without_terminal_frame_is_upstream_error(redis_server):
    async def script(request, context):
        yield start_frame()
        yield delta("cut off")

    async with prompt_with(FakeEngine(script), redis_server.url) as stub:
        call = stub.StreamChat(chat(), metadata=AUTH, timeout=10)
        frames = await read_all(call)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.UPSTREAM_ERROR, Stage.MID_STREAM)


async def test_engine_down_is_unavailable(redis_server):
    async with prompt_with(None, redis_server.url) as stub:
        call = stub.StreamChat(chat(), metadata=AUTH, timeout=10)
        frames = await read_all(call)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
    err = PromptlineError.from_pb(frames[-1].error)
    assert err.code is ErrorCode.UNAVAILABLE and err.retryable


async def test_caller_cancel_reaches_the_engine(redis_server):
    async def script(request, context):
        yield start_frame()
        while True:
            yield delta("tick ")
            await asyncio.sleep(0.02)

    engine = FakeEngine(script)
    async with prompt_with(engine, redis_server.url) as stub:
        call = stub.StreamChat(chat(), metadata=AUTH, timeout=30)
        async for frame in call:
            if frame.HasField("delta"):
                break
        call.cancel()
        await asyncio.wait_for(engine.cancelled.wait(), 10)


def test_authenticator_plain_and_hashed_keys():
    config = make_config({"tenants": [
        {"name": "plain", "api_keys": ["plain-key"]},
        {"name": "hashed", "api_keys": ["sha256:" + key_digest("hashed-key").hex()]}]})
    auth = Authenticator(config.tenants)
    assert auth.tenant_for_header("Bearer plain-key").name == "plain"
    assert auth.tenant_for_header("bearer hashed-key").name == "hashed"
    for header in (None, "", "Basic abc", "Bearer ", "Bearer wrong-key", "plain-key"):
        with pytest.raises(PromptlineError) as info:
            auth.tenant_for_header(header)
        assert info.value.code is ErrorCode.UNAUTHENTICATED
        assert "wrong-key" not in info.value.message


@pytest.mark.parametrize("payload", [b"\x0a\x02\xff\xfe", b"\xff\xff\xff"])
async def test_undecodable_grpc_request_is_invalid_request(redis_server, payload):
    """Invalid UTF-8 or broken protobuf from a gRPC caller: a typed INVALID_REQUEST frame and
    INVALID_ARGUMENT status, not gRPC's bare INTERNAL."""
    async with prompt_with(None, redis_server.url) as stub:
        call = stub.channel.unary_stream(
            "/promptline.v1.PromptService/StreamChat",
            request_serializer=lambda raw: raw,
            response_deserializer=prompt_pb2.StreamChatResponse.FromString,
        )(payload, metadata=AUTH, timeout=10)
        frames = await read_all(call)
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = PromptlineError.from_pb(frames[-1].error)
    assert (err.code, err.stage) == (ErrorCode.INVALID_REQUEST, Stage.CONNECT)
    assert "could not be decoded" in err.message


async def test_undecodable_unary_request_is_invalid_argument(redis_server):
    async with prompt_with(None, redis_server.url) as stub:
        call = stub.channel.unary_unary(
            "/promptline.v1.PromptAdmin/GetPromptVersion",
            request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw,
        )(b"\x0a\x02\xff\xfe", metadata=AUTH, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = PromptlineError.from_rpc_error(info.value)
    assert err.code is ErrorCode.INVALID_REQUEST

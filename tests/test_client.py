"""The typed Python gRPC client against the real chain; server reflection on both gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from promptline.client import (
    Finished,
    Message,
    PromptlineClient,
    Started,
    TextDelta,
)
from promptline.errors import ErrorCode, PromptlineError, Stage
from tests.chain import Chain, chain_fixture
from tests.conftest import BASE_CONFIG
from tests.eventually import eventually

REPLY = BASE_CONFIG["models"][0]["simulated"]["reply"]
TENANTS = [
    *BASE_CONFIG["tenants"],
    {"name": "client-qpm1", "api_keys": ["client-qpm1-key"], "quotas": {"qpm": 1}},
]
MODELS = [{"name": "slow", "provider": "simulated",
           "simulated": {"ttft_ms": 0, "tokens_per_second": 10, "reply": "tick " * 200}}]


chain = chain_fixture({"tenants": TENANTS}, MODELS)


def target(chain: Chain) -> str:
    return f"127.0.0.1:{chain.prompt.port}"


async def test_stream_chat_yields_typed_events(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key") as client:
        events = [e async for e in client.stream_chat(
            "sim", [Message("system", "Be brief."), {"role": "user", "content": "Hi"},
                    ("user", "again")],
            request_id="client-test-1", metadata=(("x-extra", "1"),))]
    assert isinstance(events[0], Started)
    assert events[0].request_id == "client-test-1" and events[0].model == "sim"
    assert events[0].prompt_tokens > 0
    assert events[0].deployment == "sim"  # a model without deployments is a pool of one
    deltas = [e for e in events[1:-1]]
    assert deltas and all(isinstance(e, TextDelta) for e in deltas)
    assert "".join(e.text for e in deltas) == REPLY
    done = events[-1]
    assert isinstance(done, Finished) and done.finish_reason == "stop" and done.model == "sim"
    assert done.deployment == "sim"
    assert done.usage.completion_tokens >= len(deltas)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_max_tokens_gives_length(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key") as client:
        events = [e async for e in client.stream_chat("sim", [("user", "Hi")], max_tokens=2)]
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 2


async def test_quota_raises_typed_error_with_retry_hint(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "client-qpm1-key") as client:
        [e async for e in client.stream_chat("sim", [("user", "Hi")])]  # the one allowed
        with pytest.raises(PromptlineError) as caught:
            async for _ in client.stream_chat("sim", [("user", "Hi")]):
                pytest.fail("no event may arrive for a rejected request")
    err = caught.value
    assert err.code is ErrorCode.QPM_EXCEEDED and err.stage is Stage.FIRST_PACKET
    assert err.retryable and err.retry_after_ms > 0
    assert err.request_id and err.quota_subject == "tenant:client-qpm1:qpm"


async def test_bad_key_and_unknown_model(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "wrong-key") as client:
        with pytest.raises(PromptlineError) as caught:
            [e async for e in client.stream_chat("sim", [("user", "Hi")])]
    assert caught.value.code is ErrorCode.UNAUTHENTICATED and not caught.value.retryable
    async with PromptlineClient(target(chain), "dev-key") as client:
        with pytest.raises(PromptlineError) as caught:
            [e async for e in client.stream_chat("nope", [("user", "Hi")])]
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_deadline_is_a_typed_error(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key", timeout=60) as client:
        text = ""
        with pytest.raises(PromptlineError) as caught:
            async for event in client.stream_chat("slow", [("user", "Hi")], timeout=1.0):
                if isinstance(event, TextDelta):
                    text += event.text
    assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert text  # some ticks arrived before the deadline
    await eventually(lambda: chain.engine_streams == 0, what="engine idle")


async def test_early_break_cancels_the_call(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key") as client:
        stream = client.stream_chat("slow", [("user", "Hi")])
        async with contextlib.aclosing(stream):
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
        # 200 ticks at 10/s would take 20 s; the engine stops as soon as the call is cancelled
        assert chain.engine_streams <= 1
        await eventually(lambda: chain.engine_streams == 0, within=10,
                         what="engine stream cancelled")


async def test_break_without_aclosing_also_cancels(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key") as client:
        async for event in client.stream_chat("slow", [("user", "Hi")]):
            if isinstance(event, TextDelta):
                break
        await eventually(lambda: chain.engine_streams == 0, within=10,
                         what="engine stream cancelled")


async def test_closing_the_client_mid_stream_is_a_typed_error_not_a_cancel(chain: Chain) -> None:
    """close() cancels the calls in flight: the consumer gets PromptlineError CANCELLED, and its
    task is not marked cancelled (a CancelledError would spread to whoever awaits it); a
    consumer task that is itself cancelled still sees CancelledError."""
    async with PromptlineClient(target(chain), "dev-key") as client:
        first = asyncio.Event()

        async def consume() -> str:
            try:
                async for event in client.stream_chat("slow", [("user", "Hi")]):
                    if isinstance(event, TextDelta):
                        first.set()
            except PromptlineError as err:
                return err.code.value
            return "finished"

        consumer = asyncio.create_task(consume())
        await first.wait()
        await client.close()
        assert await consumer == "CANCELLED"
    async with PromptlineClient(target(chain), "dev-key") as client:
        started = asyncio.Event()

        async def read() -> None:
            async for event in client.stream_chat("slow", [("user", "Hi")]):
                if isinstance(event, TextDelta):
                    started.set()

        reader = asyncio.create_task(read())
        await started.wait()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    await eventually(lambda: chain.engine_streams == 0, within=10, what="engine streams ended")


async def test_a_resume_after_id_out_of_range_is_invalid(chain: Chain) -> None:
    async with PromptlineClient(target(chain), "dev-key") as client:
        for after in (-1, 2**32):
            with pytest.raises(PromptlineError) as caught:
                await anext(client.resume_chat("any-id", after))
            assert caught.value.code is ErrorCode.INVALID_REQUEST


async def test_client_outside_context_manager_is_refused() -> None:
    client = PromptlineClient("127.0.0.1:1", "k")
    with pytest.raises(RuntimeError, match="async with"):
        await anext(client.stream_chat("sim", [("user", "Hi")]))


@pytest.mark.parametrize("server", ["prompt", "engine"])
async def test_reflection_lists_services(chain: Chain, server: str) -> None:
    """What `grpcurl ... list` does: ServerReflection's list_services."""
    channel = chain.prompt_channel if server == "prompt" else chain.engine_channel
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: set[str] = set()
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    async for reply in call:
        names.update(s.name for s in reply.list_services_response.service)
    expected = "promptline.v1.PromptService" if server == "prompt" else "promptline.v1.LlmEngine"
    assert {expected, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_reflection_describes_stream_chat(chain: Chain) -> None:
    """grpcurl needs the file descriptor of the service to encode a JSON request."""
    stub = reflection_pb2_grpc.ServerReflectionStub(chain.prompt_channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="promptline.v1.PromptService")]))
    replies = [r async for r in call]
    assert replies and replies[0].file_descriptor_response.file_descriptor_proto
    assert not replies[0].HasField("error_response")


@pytest.mark.parametrize("server", ["prompt", "engine"])
async def test_reflection_v1_answers_clients_that_speak_only_v1(chain: Chain, server: str) -> None:
    """grpc-js's reflection client and newer tools ask `grpc.reflection.v1` (same messages)."""
    channel = chain.prompt_channel if server == "prompt" else chain.engine_channel
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    service = "promptline.v1.PromptService" if server == "prompt" else "promptline.v1.LlmEngine"
    replies = [r async for r in info(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {service, "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    for reply in replies[1:]:
        assert not reply.HasField("error_response"), reply.error_response
        assert reply.file_descriptor_response.file_descriptor_proto

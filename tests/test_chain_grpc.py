"""The chain over gRPC only (prompt -> engine -> simulated provider), with a real Redis."""

from __future__ import annotations

import grpc
import pytest

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_pb2
from tests.chain import running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)


def chat(model: str = "sim", text: str = "hi", **kw: object) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model=model, messages=[common_pb2.ChatMessage(role="user", content=text)], **kw)


async def test_stream_through_prompt_and_engine(redis_server):
    # 200 tokens/s: a pace both hops keep up with, so tokens arrive as separate deltas
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "paced", "provider": "simulated",
        "simulated": {"ttft_ms": 0, "tokens_per_second": 200, "reply": "word " * 30},
        "stream": {"coalesce_ms": 0}}])
    async with running_chain(config, with_edge=False) as chain:
        call = chain.prompt_stub.StreamChat(chat("paced"), metadata=AUTH, timeout=10)
        frames = [f async for f in call]
        assert await call.code() == grpc.StatusCode.OK
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("delta") >= 5
    text = "".join(f.delta.text for f in frames if f.HasField("delta"))
    assert text == "word " * 30
    done = frames[-1].done
    assert done.finish_reason == "stop"
    # output moderation may merge tokens into fewer deltas, but every token is accounted for
    delivered = sum(f.delta.tokens for f in frames if f.HasField("delta"))
    assert done.usage.completion_tokens == delivered
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert frames[0].start.request_id and frames[0].start.model == "paced"


@pytest.mark.parametrize(
    ("metadata", "request_kw", "code", "status"),
    [
        ((), {}, ErrorCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), {}, ErrorCode.UNAUTHENTICATED,
         grpc.StatusCode.UNAUTHENTICATED),
        (AUTH, {"model": "nope"}, ErrorCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
        (AUTH, {"max_tokens": 100_000}, ErrorCode.CONTEXT_TOO_LONG,
         grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_connect_errors_are_frame_and_status(redis_server, metadata, request_kw, code,
                                                   status):
    config = make_config(redis_url=redis_server.url)
    kw = {"model": "sim", **request_kw}
    async with running_chain(config, with_edge=False) as chain:
        call = chain.prompt_stub.StreamChat(chat(kw.pop("model"), **kw), metadata=metadata,
                                            timeout=10)
        frames = await read_all(call)
        assert await call.code() == status
        assert [f.WhichOneof("frame") for f in frames] == ["error"]
        from_frame = PromptlineError.from_pb(frames[0].error)
        assert from_frame.code is code and from_frame.stage is Stage.CONNECT
        assert from_frame.request_id
        # the same error, rebuilt from the status details alone (generic gRPC tooling's view)
        err = grpc.aio.AioRpcError(await call.code(), await call.initial_metadata(),
                                   await call.trailing_metadata(), await call.details())
        from_status = PromptlineError.from_rpc_error(err)
        assert (from_status.code, from_status.stage) == (code, Stage.CONNECT)
        assert "wrong" not in from_frame.message


async def test_dns_targets_with_round_robin(redis_server):
    """`dns:///host:port` targets (headless Services in Kubernetes) work on every hop."""
    config = make_config(redis_url=redis_server.url)
    async with running_chain(config, scheme="dns:///") as chain:
        assert chain.config.prompt_target.startswith("dns:///")
        call = chain.prompt_stub.StreamChat(chat(), metadata=AUTH, timeout=10)
        frames = [f async for f in call]
    assert frames[-1].HasField("done")

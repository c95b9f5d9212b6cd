"""What a stream is charged when it does not finish, through the real chain (prompt -> engine).

The reconcile decision (`services.prompt.session.charge`): the provider's usage when it reported
one; else the tokens relayed, plus the prompt once the model produced anything; nothing (the
reservation refunded) when it failed before the first token.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

from promptline.errors import ErrorCode, PromptlineError
from promptline.v1 import common_pb2, prompt_pb2
from services.prompt.session import charge
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

AUTH = (("authorization", "Bearer dev-key"),)
REPLY = "one two three four five six seven eight nine ten " * 4


def tokens(model: str, direction: str) -> float:
    return REGISTRY.get_sample_value("promptline_tokens_total", {
        "tenant": "dev", "model": model, "direction": direction}) or 0


def chat(model: str, max_tokens: int = 64) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(model=model, max_tokens=max_tokens, messages=[
        common_pb2.ChatMessage(role="user", content="count to forty")])


def test_the_decision() -> None:
    usage = common_pb2.Usage(prompt_tokens=9, completion_tokens=4, total_tokens=13)
    assert charge(usage, 12, 3) == (9, 4)  # the provider's own count wins
    assert charge(None, 12, 5) == (12, 5)  # ended after tokens: prompt and what was relayed
    assert charge(None, 12, 0) == (0, 0)  # ended before any: nothing


async def test_mid_stream_error_pays_prompt_and_relayed_tokens(redis_server) -> None:
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "breaks", "provider": "simulated",
        "simulated": {"ttft_ms": 0, "tokens_per_second": 2000, "reply": REPLY,
                      "fail_after_tokens": 6}}])
    before_in, before_out = tokens("breaks", "in"), tokens("breaks", "out")
    async with running_chain(config, with_edge=False) as chain:
        frames = await read_all(chain.prompt_stub.StreamChat(chat("breaks"), metadata=AUTH,
                                                             timeout=10))
    assert frames[-1].HasField("error")
    relayed = sum(f.delta.tokens for f in frames if f.HasField("delta"))
    assert relayed == 6
    assert tokens("breaks", "out") - before_out == relayed
    assert tokens("breaks", "in") - before_in == frames[0].start.prompt_tokens > 0


async def test_cancel_pays_what_was_generated(redis_server) -> None:
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "slow", "provider": "simulated",
        "simulated": {"ttft_ms": 0, "tokens_per_second": 40, "reply": REPLY}}])
    before_in, before_out = tokens("slow", "in"), tokens("slow", "out")
    async with running_chain(config, with_edge=False) as chain:
        call = chain.prompt_stub.StreamChat(chat("slow"), metadata=AUTH, timeout=10)
        seen, prompt_tokens = 0, 0
        async for frame in call:
            prompt_tokens = prompt_tokens or frame.start.prompt_tokens
            seen += frame.delta.tokens
            if seen >= 3:
                break
        call.cancel()
        # Settled by the session's own task after the cancel; the engine stops with it.
        await eventually(lambda: tokens("slow", "out") > before_out, what="the settlement")
        await eventually(lambda: chain.engine_streams == 0, what="the engine stream ending")
    charged = tokens("slow", "out") - before_out
    assert seen <= charged < len(REPLY.split())  # a few more may have reached the prompt hop
    assert tokens("slow", "in") - before_in == prompt_tokens > 0


async def test_first_token_timeout_pays_nothing_and_refunds(redis_server) -> None:
    # 2 * (prompt + max_tokens) is over the tenant's TPM: the second request is admitted only if
    # the first one's reservation was given back.
    config = make_config({"tenants": [{"name": "dev", "api_keys": ["dev-key"],
                                       "quotas": {"tpm": 3000}}]},
                         redis_url=redis_server.url, models=[{
                             "name": "mute", "provider": "simulated",
                             "simulated": {"ttft_ms": 5000, "reply": REPLY},
                             "timeouts": {"first_token": "200ms", "idle": "5s", "total": "10s"}}])
    before = tokens("mute", "in"), tokens("mute", "out")
    async with running_chain(config, with_edge=False) as chain:
        for _ in range(2):
            frames = await read_all(chain.prompt_stub.StreamChat(
                chat("mute", max_tokens=2000), metadata=AUTH, timeout=10))
            err = PromptlineError.from_pb(frames[-1].error)
            assert err.code is ErrorCode.FIRST_TOKEN_TIMEOUT, err
    assert (tokens("mute", "in"), tokens("mute", "out")) == before

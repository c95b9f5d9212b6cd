"""What a request's values mean is checked once, by the prompt service (`promptline.rules`): an
HTTP caller (through the edge, which checks only shape and types) and a gRPC caller get the same
INVALID_REQUEST naming the field."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_pb2
from tests.chain import Chain, chain_fixture
from tests.grpc_calls import read_all

BODY: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
CASES = [
    ({"model": "sim", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({**BODY, "temperature": 2.5}, "temperature must be between 0 and 2"),
    ({**BODY, "max_tokens": 1_000_001}, "max_tokens must be between 1 and 1000000"),
    ({**BODY, "conversation_id": "has space"}, "conversation_id must be"),
    ({**BODY, "conversation_id": "x" * 129}, "conversation_id must be"),
    ({**BODY, "prompt": {"id": "p", "version": 1, "label": "prod"}}, "either version or label"),
]


chain = chain_fixture()


@pytest.mark.parametrize(("body", "fragment"), CASES)
async def test_http_callers_get_the_prompt_service_answer(chain: Chain, body: dict[str, Any],
                                                          fragment: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", json=body,
            headers={"Authorization": "Bearer dev-key"}) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["code"] == "INVALID_REQUEST" and err["stage"] == "connect"
    assert fragment in err["message"], err


@pytest.mark.parametrize(("body", "fragment"), CASES)
async def test_grpc_callers_get_the_same(chain: Chain, body: dict[str, Any],
                                         fragment: str) -> None:
    prompt = body.get("prompt", {})
    request = prompt_pb2.StreamChatRequest(
        model=body["model"], max_tokens=body.get("max_tokens", 0),
        conversation_id=body.get("conversation_id", ""),
        messages=[common_pb2.ChatMessage(**m) for m in body["messages"]],
        prompt=prompt_pb2.PromptRef(id=prompt.get("id", ""), version=prompt.get("version", 0),
                                    label=prompt.get("label", "")))
    if "temperature" in body:
        request.temperature = body["temperature"]
    frames = await read_all(chain.prompt_stub.StreamChat(
        request, metadata=(("authorization", "Bearer dev-key"),), timeout=10))
    err = PromptlineError.from_pb(frames[-1].error)
    assert err.code is ErrorCode.INVALID_REQUEST and err.stage is Stage.CONNECT
    assert fragment in err.message, err

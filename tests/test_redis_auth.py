"""A password-protected Redis: the prompt service authenticates from `redis_url`, and the
password never shows in what callers, logs or metrics see."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import aiohttp
import pytest

from promptline.devtools.embedded_redis import (
    EPHEMERAL_ARGS,
    free_port,
    start_redis_server,
    stop_process,
)
from promptline.v1 import common_pb2, prompt_pb2
from tests.chain import running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

SECRET = "s3cret-redis-pw"


async def test_a_password_in_redis_url_is_used_and_never_shown(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = start_redis_server(["--port", str(port), *EPHEMERAL_ARGS,
                                   "--requirepass", SECRET], port, Path(workdir))
        try:
            good = make_config({"tenants": [{"name": "dev", "api_keys": ["dev-key"],
                                             "quotas": {"qpm": 5}}]},
                               redis_url=f"redis://:{SECRET}@127.0.0.1:{port}/0")
            async with running_chain(good, with_edge=False) as chain:
                frames = await read_all(chain.prompt_stub.StreamChat(
                    prompt_pb2.StreamChatRequest(model="sim", messages=[
                        common_pb2.ChatMessage(role="user", content="hi")]),
                    metadata=(("authorization", "Bearer dev-key"),), timeout=10))
                assert frames[-1].HasField("done")  # admitted: the quota script ran
            wrong = make_config({"tenants": [{"name": "dev", "api_keys": ["dev-key"],
                                              "quotas": {"qpm": 5}}]},
                                redis_url=f"redis://:wrong-{SECRET}@127.0.0.1:{port}/0")
            async with running_chain(wrong) as chain, aiohttp.ClientSession() as http:
                async with http.post(f"{chain.base_url}/v1/chat/stream", json={
                        "model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": "Bearer dev-key"}) as resp:
                    body = await resp.text()
                    assert resp.status == 503 and "quota store unavailable" in body
                async with http.get(f"{chain.base_url}/metrics") as resp:
                    assert SECRET not in await resp.text()
            assert SECRET not in body
            assert not [r for r in caplog.records if SECRET in r.getMessage()
                        or SECRET in str(r.__dict__)]
        finally:
            stop_process(proc)

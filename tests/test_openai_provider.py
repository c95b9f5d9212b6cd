"""OpenAIProvider against real OpenAI-compatible servers (FakeOpenAI, and raw aiohttp handlers
for byte-level cases), and the error table (`openai_errors`) row by row."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from promptline.config import ModelConfig, parse_config
from promptline.devtools.fake_openai import FakeOpenAI, split_reply
from promptline.errors import ErrorCode, PromptlineError
from promptline.v1.common_pb2 import ChatMessage
from services.llm_engine.providers import openai_compat
from services.llm_engine.providers.base import Chunk, GenerationRequest, Usage
from services.llm_engine.providers.openai_compat import OpenAIProvider
from services.llm_engine.providers.openai_errors import (
    CAUGHT,
    CREDENTIALS_REJECTED,
    MODEL_NOT_FOUND,
    UNREACHABLE,
    MalformedStreamError,
    exception_error,
    parse_retry_after_ms,
    sanitize_provider_message,
    status_error,
    stream_error,
)
from tests.conftest import BASE_CONFIG

API_KEY = "sk-test-0123456789abcdef"
REPLY = "The quick brown fox jumps over the lazy dog, twice, for the tests."
UPSTREAM_MODEL = "gpt-upstream-2024"
WAIT = 5.0  # generous bound for anything that must happen "promptly"


def model_config(base_url: str, **extra: Any) -> ModelConfig:
    raw = {
        "tenants": BASE_CONFIG["tenants"],
        "models": [{"name": "gpt-test", "provider": "openai", "base_url": base_url,
                    "api_key_env": "X", "upstream_model": UPSTREAM_MODEL,
                    "timeouts": {"first_token": "10s", "idle": "10s", "total": "30s"},
                    **extra}],
    }
    config = parse_config(raw, env={"X": API_KEY})
    model = config.model("gpt-test")
    assert model is not None
    return model


def make_request(provider: OpenAIProvider, *, max_tokens: int = 256,
                 temperature: float | None = None, model: str | None = None
                 ) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-1",
        model=provider.upstream_model if model is None else model,
        messages=(ChatMessage(role="system", content="Be brief."),
                  ChatMessage(role="user", content="Say something")),
        max_tokens=max_tokens,
        temperature=temperature,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(reply=REPLY)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    prov = OpenAIProvider(model_config(fake.base_url))
    try:
        yield prov
    finally:
        await prov.close()


async def collect(provider: OpenAIProvider, request: GenerationRequest | None = None
                  ) -> list[Chunk]:
    return [c async for c in provider.stream(request or make_request(provider))]


async def collect_once(model: ModelConfig) -> list[Chunk]:
    """One stream from a provider of its own, closed afterwards."""
    provider = OpenAIProvider(model)
    try:
        return await collect(provider)
    finally:
        await provider.close()


async def fail_with(provider: OpenAIProvider, request: GenerationRequest | None = None
                    ) -> tuple[list[Chunk], PromptlineError]:
    got: list[Chunk] = []
    with pytest.raises(PromptlineError) as info:
        async for chunk in provider.stream(request or make_request(provider)):
            got.append(chunk)
    return got, info.value


def assert_llm_engine_error(err: PromptlineError) -> None:
    assert err.stage is None  # the engine stamps it
    assert err.origin == "llm_engine"
    assert err.__cause__ is None and err.__suppress_context__  # `raise ... from None`


def capture_streams(provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
                    ) -> list[Any]:
    """Record the upstream responses the provider opens (to check they were closed)."""
    streams: list[Any] = []
    original = provider.open_stream

    async def open_stream(params: dict[str, Any]) -> Any:
        stream = await original(params)
        streams.append(stream)
        return stream

    monkeypatch.setattr(provider, "open_stream", open_stream)
    return streams


# --- happy path --------------------------------------------------------------------------------


async def test_streams_the_reply_and_reports_usage(fake: FakeOpenAI,
                                                   provider: OpenAIProvider) -> None:
    chunks = await collect(provider)

    *texts, final = chunks
    assert "".join(c.text for c in texts) == REPLY  # a chunk per read: pieces merge
    assert all(c.text for c in texts), "the role-only first chunk must not be yielded"
    assert all(c.finish_reason is None and c.usage is None for c in texts)
    assert final.text == ""
    assert final.finish_reason == "stop"
    assert final.usage == Usage(prompt_tokens=fake_prompt_tokens(fake),
                                completion_tokens=len(split_reply(REPLY, None)))
    assert fake.completed == 1
    await fake.wait_idle(WAIT)


def fake_prompt_tokens(fake: FakeOpenAI) -> int:
    # FakeOpenAI counts 3 + (3 + words) per message.
    messages = fake.requests[-1].body["messages"]
    return 3 + sum(3 + len(m["content"].split()) for m in messages)


async def test_a_first_token_slower_than_idle_is_waited_for(
        fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its first token a provider may be silent up to `first_token` (a queueing vLLM, a
    long prompt), longer than `idle`: the socket's backstop must not cut that wait short (it
    was idle + slack, then a retried, falling-back UPSTREAM_ERROR instead of a 504)."""
    monkeypatch.setattr(openai_compat, "READ_TIMEOUT_SLACK", 0.2)
    fake.ttft = 1.0
    provider = OpenAIProvider(model_config(fake.base_url, timeouts={
        "first_token": "5s", "idle": "300ms", "total": "30s"}))
    try:
        chunks = await collect(provider)
    finally:
        await provider.close()
    assert "".join(c.text for c in chunks) == REPLY


async def test_sequential_streams_reuse_one_upstream_connection(
        fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    for _ in range(3):
        await collect(provider)
    peers = {r.peer for r in fake.requests}
    # Read to the end of each body, a connection goes back to the pool: no TCP set-up per request.
    assert len(fake.requests) == 3 and len(peers) == 1 and None not in peers


async def test_request_carries_key_upstream_model_and_parameters(
        fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    await collect(provider, make_request(provider, max_tokens=77))
    await collect(provider, make_request(provider, temperature=0.25, model=""))

    first, second = fake.requests
    assert first.authorization == f"Bearer {API_KEY}"
    body = first.body
    assert body["model"] == UPSTREAM_MODEL
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say something"}]
    assert body["max_tokens"] == 77
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "temperature" not in body
    # An empty request model falls back to the configured upstream model.
    assert second.body["model"] == UPSTREAM_MODEL
    assert second.body["temperature"] == 0.25


async def test_max_tokens_cut_reports_length(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    chunks = await collect(provider, make_request(provider, max_tokens=3))
    *texts, final = chunks
    assert "".join(c.text for c in texts) == "".join(split_reply(REPLY, None)[:3])
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 3


async def test_missing_usage_chunk_yields_final_chunk_without_usage(
        fake: FakeOpenAI, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that ignores stream_options sends no usage chunk.
    original = provider.open_stream

    async def open_stream(params: dict[str, Any]) -> Any:
        params.pop("stream_options")
        return await original(params)

    monkeypatch.setattr(provider, "open_stream", open_stream)
    chunks = await collect(provider)
    assert "".join(c.text for c in chunks) == REPLY
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is None


async def test_one_session_serves_concurrent_streams(fake: FakeOpenAI,
                                                     provider: OpenAIProvider) -> None:
    fake.delay = 0.005
    await collect(provider)
    session = provider.session
    results = await asyncio.gather(*(collect(provider) for _ in range(5)))
    for chunks in results:
        assert "".join(c.text for c in chunks) == REPLY
    assert provider.session is session
    assert len(fake.requests) == 6
    await provider.close()
    assert session.closed


# --- errors before the stream ------------------------------------------------------------------


async def test_429_with_retry_after_seconds(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=429, retry_after=3)
    got, err = await fail_with(provider)
    assert got == []
    assert err.code is ErrorCode.UPSTREAM_RATE_LIMITED
    assert err.retryable is True
    assert err.retry_after_ms == 3000
    assert_llm_engine_error(err)


async def test_429_with_retry_after_ms(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=429, retry_after_ms=1500, retry_after=9)
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.UPSTREAM_RATE_LIMITED
    assert err.retry_after_ms == 1500


async def test_500_is_retryable_upstream_error(fake: FakeOpenAI,
                                               provider: OpenAIProvider) -> None:
    fake.push(fail_status=500)
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.UPSTREAM_ERROR
    assert err.retryable is True
    assert_llm_engine_error(err)
    # The next request (no override queued) succeeds: the failure was per request.
    assert "".join(c.text for c in await collect(provider)) == REPLY


async def test_401_blames_our_credentials_and_never_leaks_the_key(
        fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=401)
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.UPSTREAM_ERROR
    assert err.retryable is False
    assert err.message == CREDENTIALS_REJECTED
    for text in (err.message, str(err), repr(err), str(err.to_dict())):
        assert API_KEY not in text
        assert "sk-" not in text
    assert_llm_engine_error(err)


async def test_400_context_length_exceeded(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=400)  # the fake's default 400 is context_length_exceeded
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.CONTEXT_TOO_LONG
    assert err.retryable is False
    assert_llm_engine_error(err)


async def test_other_400_is_invalid_request(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=400, fail_code="invalid_value",
              fail_message="Invalid value for 'temperature': must be at most 2.")
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.INVALID_REQUEST
    assert err.retryable is False
    assert "temperature" in err.message  # a short sanitized provider message helps the caller


async def test_404_is_model_not_found(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.push(fail_status=404)
    _, err = await fail_with(provider)
    assert err.code is ErrorCode.UPSTREAM_ERROR
    assert err.retryable is False
    assert err.message == MODEL_NOT_FOUND


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The socket is closed: nothing listens on the port.
    provider = OpenAIProvider(model_config(f"http://127.0.0.1:{port}/v1"))
    try:
        _, err = await fail_with(provider)
    finally:
        await provider.close()
    assert err.code is ErrorCode.UNAVAILABLE
    assert err.retryable is True
    assert err.message == UNREACHABLE
    assert_llm_engine_error(err)


# --- errors during the stream ------------------------------------------------------------------


async def test_in_stream_error_event_is_upstream_error(fake: FakeOpenAI,
                                                       provider: OpenAIProvider) -> None:
    fake.push(fail_after_chunks=2)
    got, err = await fail_with(provider)
    # what came before the error is delivered, merged or not
    assert "".join(c.text for c in got) == "".join(split_reply(REPLY, None)[:2])
    assert err.code is ErrorCode.UPSTREAM_ERROR
    assert_llm_engine_error(err)
    await fake.wait_idle(WAIT)


async def test_dropped_connection_mid_stream_is_unavailable(fake: FakeOpenAI,
                                                            provider: OpenAIProvider) -> None:
    fake.push(drop_after_chunks=3)
    got, err = await fail_with(provider)
    assert "".join(c.text for c in got) == "".join(split_reply(REPLY, None)[:3])
    assert err.code is ErrorCode.UNAVAILABLE
    assert err.retryable is True
    assert fake.drops == 1


async def test_stream_ending_without_finish_is_an_error(fake: FakeOpenAI,
                                                        provider: OpenAIProvider) -> None:
    fake.push(truncate_after_chunks=2)
    got, err = await fail_with(provider)
    assert "".join(c.text for c in got) == "".join(split_reply(REPLY, None)[:2])
    assert err.code is ErrorCode.UPSTREAM_ERROR


# --- what arrives on the wire, byte by byte ------------------------------------------------------


def _event(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}]}).encode() + b"\n\n"


@contextlib.asynccontextmanager
async def raw_upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> AsyncIterator[OpenAIProvider]:
    """A provider pointed at a one-route server whose bytes the test writes itself."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider = OpenAIProvider(model_config(f"http://127.0.0.1:{port}/v1"))
    try:
        yield provider
    finally:
        await provider.close()
        await runner.cleanup()


async def _stream_bytes(request: web.Request, *pieces: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
        await asyncio.sleep(0)  # separate TCP writes, so events straddle reads
    await response.write_eof()
    return response


async def test_events_split_at_every_byte_with_crlf_line_ends() -> None:
    wire = (_event("Hello") + _event(" wor") + b": keep-alive comment\n\n" + _event("ld")
            + _event(finish="stop") + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _stream_bytes(request, *(wire[i:i + 1] for i in range(len(wire))))

    async with raw_upstream(handler) as provider:
        chunks = await collect(provider)
    assert [c.text for c in chunks] == ["Hello", " wor", "ld", ""]
    assert chunks[-1].finish_reason == "stop"


async def test_invalid_utf8_in_the_stream_is_a_bad_response() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _stream_bytes(request, _event("fine"),
                                   b'data: {"choices": [{"index": 0, "delta": {"content": "\xff'
                                   b'"}}]}\n\n', _event(finish="stop"))

    async with raw_upstream(handler) as provider:
        got, err = await fail_with(provider)
    assert [c.text for c in got] == ["fine"]
    assert err.code is ErrorCode.UPSTREAM_ERROR and err.retryable is True
    assert "could not read" in err.message
    assert_llm_engine_error(err)


@pytest.mark.parametrize("event", [
    b'{"choices": [{"index": 0, "delta": {"content": 5}}]}',
    b'{"choices": [{"index": 0, "delta": {}, "finish_reason": 7}]}',
    b'{"choices": 5}',
    b'{"choices": [], "usage": [1, 2]}',
    b'{"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": 2}}',
], ids=["content", "finish", "choices", "usage", "counts"])
async def test_valid_json_of_the_wrong_shape_is_a_bad_response(event: bytes) -> None:
    """Parsed, but no chunk OpenAI sends: the malformed-stream row (retryable, so the pool
    moves on), never INTERNAL."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _stream_bytes(request, _event("fine"), b"data: " + event + b"\n\n",
                                   _event(finish="stop"))

    async with raw_upstream(handler) as provider:
        got, err = await fail_with(provider)
    assert [c.text for c in got] == ["fine"]
    assert err.code is ErrorCode.UPSTREAM_ERROR and err.retryable is True
    assert "could not read" in err.message
    assert_llm_engine_error(err)


async def test_a_line_beyond_the_size_limit_is_a_bad_response(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_compat, "MAX_LINE_BYTES", 1024)
    held = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event("ok"))
        with contextlib.suppress(ConnectionError):
            for _ in range(16):  # 16 KiB and still no newline: never buffered whole
                await response.write(b"x" * 1024)
                await asyncio.sleep(0)
            await held.wait()  # the provider must give up by itself, not wait for the end
        return response

    async with raw_upstream(handler) as provider:
        got, err = await fail_with(provider)
        held.set()
    assert [c.text for c in got] == ["ok"]
    assert err.code is ErrorCode.UPSTREAM_ERROR and "could not read" in err.message


async def test_html_error_page_is_retryable_and_never_shown() -> None:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=502, content_type="text/html",
                            text="<html>upstream secret-internal-host:8443 failed</html>")

    async with raw_upstream(handler) as provider:
        _, err = await fail_with(provider)
    assert err.code is ErrorCode.UPSTREAM_ERROR and err.retryable is True
    assert "502" in err.message and "secret-internal-host" not in err.message


async def test_without_an_api_key_no_authorization_header_is_sent(fake: FakeOpenAI) -> None:
    config = parse_config({"tenants": BASE_CONFIG["tenants"],
                           "models": [{"name": "local", "provider": "openai",
                                       "base_url": fake.base_url}]}, env={})
    model = config.model("local")
    assert model is not None
    chunks = await collect_once(model)
    assert "".join(c.text for c in chunks) == REPLY
    assert fake.requests[-1].authorization is None
    assert fake.requests[-1].body["model"] == "local"


async def test_requests_go_through_the_configured_proxy(fake: FakeOpenAI) -> None:
    # The fake serves the absolute-form request a forward proxy receives; the upstream host
    # itself does not resolve, so a reply proves the request went through the proxy.
    proxy = fake.base_url.removesuffix("/v1")
    model = model_config("http://upstream.invalid/v1", proxy=proxy)
    assert model.proxy == proxy
    chunks = await collect_once(model)
    assert "".join(c.text for c in chunks) == REPLY
    assert fake.requests[-1].headers.get("Host") == "upstream.invalid"


# --- the upstream stream is closed whatever ends it --------------------------------------------


async def test_consumer_aclose_closes_the_upstream(fake: FakeOpenAI, provider: OpenAIProvider,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    streams = capture_streams(provider, monkeypatch)
    fake.delay = 0.05  # the server is still writing when we stop
    fake.tokens = 200
    gen = provider.stream(make_request(provider))
    got = [await anext(gen), await anext(gen)]
    assert all(c.text for c in got)
    assert fake.active_streams == 1

    await gen.aclose()  # type: ignore[attr-defined]

    # Closed by the provider itself, not later by a garbage-collection hook.
    assert streams[0].closed
    await fake.wait_disconnect(WAIT)
    await fake.wait_idle(WAIT)
    assert fake.disconnects == 1
    assert fake.completed == 0


async def test_cancelled_consumer_closes_the_upstream(fake: FakeOpenAI,
                                                      provider: OpenAIProvider,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    streams = capture_streams(provider, monkeypatch)
    fake.delay = 0.05
    fake.tokens = 200
    two = asyncio.Event()

    async def consume() -> None:
        n = 0
        async for _chunk in provider.stream(make_request(provider)):
            n += 1
            if n == 2:
                two.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(WAIT):
        await two.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled(), "CancelledError must propagate, never be swallowed"
    assert streams[0].closed
    await fake.wait_disconnect(WAIT)
    await fake.wait_idle(WAIT)
    assert fake.completed == 0


async def test_cancel_while_upstream_is_stalled(fake: FakeOpenAI,
                                                provider: OpenAIProvider) -> None:
    fake.push(stall_after_chunks=2)
    two = asyncio.Event()
    got: list[Chunk] = []

    first_two = "".join(split_reply(REPLY, None)[:2])

    async def consume() -> None:
        async for chunk in provider.stream(make_request(provider)):
            got.append(chunk)
            if "".join(c.text for c in got) == first_two:
                two.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(WAIT):
        await two.wait()
    # The consumer now waits on a silent upstream, as under an idle timeout.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_disconnect(WAIT)
    await fake.wait_idle(WAIT)
    assert "".join(c.text for c in got) == first_two


async def test_upstream_closed_after_error_and_normal_end(
        fake: FakeOpenAI, provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    streams = capture_streams(provider, monkeypatch)
    await collect(provider)
    fake.push(fail_after_chunks=1)
    await fail_with(provider)
    assert len(streams) == 2
    assert all(s.closed for s in streams)
    await fake.wait_idle(WAIT)
    assert fake.disconnects == 0


# --- the error table, row by row ---------------------------------------------------------------


def _body(message: str = "boom", code: object = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "x", "param": None,
                                 "code": code}}).encode()


def _status(status: int, message: str = "boom", code: object = None,
            headers: dict[str, str] | None = None) -> PromptlineError:
    return status_error(status, headers or {}, _body(message, code))


VLLM_CONTEXT = json.dumps({
    "object": "error", "type": "BadRequestError", "param": None, "code": 400,
    "message": "This model's maximum context length is 4096 tokens. However, you requested "
               "5000 tokens."}).encode()

ROWS: list[tuple[str, Callable[[], PromptlineError], ErrorCode, bool]] = [
    ("429", lambda: _status(429), ErrorCode.UPSTREAM_RATE_LIMITED, True),
    ("401", lambda: _status(401), ErrorCode.UPSTREAM_ERROR, False),
    ("403", lambda: _status(403), ErrorCode.UPSTREAM_ERROR, False),
    ("400 context code", lambda: _status(400, "too long", "context_length_exceeded"),
     ErrorCode.CONTEXT_TOO_LONG, False),
    ("400 context text", lambda: _status(
        400, "This model's maximum context length is 4096 tokens. However, you requested 5000 "
        "tokens."), ErrorCode.CONTEXT_TOO_LONG, False),
    ("400 context, bare body (vLLM)", lambda: status_error(400, {}, VLLM_CONTEXT),
     ErrorCode.CONTEXT_TOO_LONG, False),
    ("400 other", lambda: _status(400, "bad temperature", "invalid_value"),
     ErrorCode.INVALID_REQUEST, False),
    ("413", lambda: _status(413), ErrorCode.INVALID_REQUEST, False),
    ("422", lambda: _status(422), ErrorCode.INVALID_REQUEST, False),
    ("404", lambda: _status(404), ErrorCode.UPSTREAM_ERROR, False),
    ("409", lambda: _status(409), ErrorCode.UPSTREAM_ERROR, True),
    ("500", lambda: _status(500), ErrorCode.UPSTREAM_ERROR, True),
    ("503", lambda: _status(503), ErrorCode.UPSTREAM_ERROR, True),
    ("408", lambda: _status(408), ErrorCode.UPSTREAM_ERROR, True),
    ("418 (other 4xx)", lambda: _status(418), ErrorCode.UPSTREAM_ERROR, False),
    ("500 context code is still a server error",
     lambda: _status(500, "too long", "context_length_exceeded"), ErrorCode.UPSTREAM_ERROR, True),
    ("timeout", lambda: exception_error(TimeoutError(), in_stream=False),
     ErrorCode.UPSTREAM_ERROR, True),
    ("aiohttp socket timeout (a ClientError too)",
     lambda: exception_error(aiohttp.SocketTimeoutError(), in_stream=True),
     ErrorCode.UPSTREAM_ERROR, True),
    ("connection", lambda: exception_error(aiohttp.ClientConnectionError(), in_stream=False),
     ErrorCode.UNAVAILABLE, True),
    ("connection lost", lambda: exception_error(aiohttp.ServerDisconnectedError(),
                                                in_stream=True),
     ErrorCode.UNAVAILABLE, True),
    ("in-stream", lambda: stream_error({"message": "overloaded", "type": "server_error"}),
     ErrorCode.UPSTREAM_ERROR, True),
    ("malformed JSON", lambda: exception_error(json.JSONDecodeError("x", "{", 1),
                                               in_stream=True),
     ErrorCode.UPSTREAM_ERROR, True),
    ("invalid UTF-8", lambda: exception_error(
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), in_stream=True),
     ErrorCode.UPSTREAM_ERROR, True),
    ("line too long", lambda: exception_error(MalformedStreamError("too long"), in_stream=True),
     ErrorCode.UPSTREAM_ERROR, True),
    ("other ValueError (our bug)", lambda: exception_error(ValueError("x"), in_stream=False),
     ErrorCode.INTERNAL, False),
    ("foreign exception", lambda: exception_error(RuntimeError("boom"), in_stream=True),
     ErrorCode.INTERNAL, False),
]


@pytest.mark.parametrize(("build", "code", "retryable"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_error_table(build: Callable[[], PromptlineError], code: ErrorCode,
                     retryable: bool) -> None:
    err = build()
    assert isinstance(err, PromptlineError)
    assert err.code is code
    assert err.retryable is retryable
    assert err.stage is None
    assert err.origin == "llm_engine"
    assert err.message


def test_specific_messages() -> None:
    refused = exception_error(aiohttp.ClientConnectionError(), in_stream=False)
    assert refused.message == UNREACHABLE
    assert _status(404).message == MODEL_NOT_FOUND
    assert "credentials" in _status(401).message
    assert exception_error(RuntimeError("password=hunter2"), in_stream=False).message == \
        "internal error"
    lost = exception_error(aiohttp.ClientConnectionError(), in_stream=True)
    assert lost.code is ErrorCode.UNAVAILABLE and lost.message != UNREACHABLE
    assert "HTTP 503" in _status(503).message and "HTTP 418" in _status(418).message


def test_cancellation_is_never_mapped() -> None:
    # It propagates to whoever cancelled (see the cancel tests above), never as an error frame.
    assert not issubclass(asyncio.CancelledError, CAUGHT)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "2"}, 2000),
    ({"retry-after": "0.25"}, 250),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1500),
    ({"retry-after-ms": "junk", "retry-after": "4"}, 4000),
    ({}, 0),
    ({"retry-after": "soon"}, 0),
    ({"retry-after": "-5"}, 0),
    ({"retry-after": "99999999"}, 3_600_000),
])
def test_rate_limit_retry_after_headers(headers: dict[str, str], expected: int) -> None:
    err = _status(429, headers=headers)
    assert err.code is ErrorCode.UPSTREAM_RATE_LIMITED
    assert err.retry_after_ms == expected


def test_retry_after_header_names_are_case_insensitive() -> None:
    # As aiohttp hands them over (CIMultiDictProxy), whatever case the provider wrote.
    err = status_error(429, CIMultiDict({"Retry-After-Ms": "700"}), b"")
    assert err.retry_after_ms == 700
    # Only a rate limit reads them: a 503's Retry-After does not make it a quota error.
    assert status_error(503, CIMultiDict({"Retry-After": "5"}), b"").retry_after_ms == 0


def test_retry_after_http_date() -> None:
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28_000 <= parse_retry_after_ms({"retry-after": date}, now=now) <= 31_000
    err = _status(429, headers={"retry-after": date})
    assert 25_000 <= err.retry_after_ms <= 31_000
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after_ms({"retry-after": past}, now=now) == 0


def test_messages_never_carry_secrets_or_raw_bodies() -> None:
    key = "sk-proj-abcdefghijklmnop1234"
    assert key not in _status(401, f"Incorrect API key provided: {key}").message

    msg = _status(400, f"bad header Authorization: Bearer {key} in request " + "x" * 500).message
    assert key not in msg and "Bearer" not in msg
    assert len(msg) < 300

    html = b"<html><body>upstream stack trace: secret-internal-host:8443</body></html>"
    assert "secret-internal-host" not in status_error(502, {}, html).message
    assert "secret-internal-host" not in status_error(400, {}, html).message

    assert key not in stream_error({"message": f"failed for key {key}"}).message
    assert key not in stream_error(f"failed for key {key}").message


def test_provider_messages_from_every_error_shape() -> None:
    # `{"error": {...}}` (OpenAI), a bare object (vLLM), `{"error": "text"}`, an in-stream string.
    assert _status(400, "bad temperature").message.endswith(": bad temperature")
    assert "maximum context length" in status_error(400, {}, VLLM_CONTEXT).message
    assert status_error(400, {}, b'{"error": "bad value"}').message.endswith(": bad value")
    assert stream_error("overloaded").message.endswith(": overloaded")
    # Nothing readable: the row's own words, no empty detail.
    assert status_error(400, {}, b"").message == "the model provider rejected the request"
    assert stream_error(["?"]).message == \
        "the model provider reported an error during the stream"


def test_sanitize_provider_message() -> None:
    assert sanitize_provider_message("  Invalid  value\n for x ") == "Invalid value for x"
    assert sanitize_provider_message(None) == ""
    assert len(sanitize_provider_message("y" * 1000)) <= 200

"""Edge HTTP service against a scripted fake PromptService (real gRPC server, real HTTP client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import TestServer

from promptline.channels import insecure_channel
from promptline.devtools.sse_client import Event, SseStream, without_comments
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.grpc_server import RunningServer, start_grpc_server
from promptline.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc
from services.edge_http import sse
from services.edge_http.app import PROMPT_SERVICE_NAME, EdgeServer, build_app, start_edge
from services.edge_http.chat_request import parse_chat_request, read_body
from tests.conftest import make_config

WAIT = 10.0  # generous bound for anything that should happen "promptly"
AUTH = {"Authorization": "Bearer dev-key"}
BODY: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "Hi"}]}

Script = Callable[[prompt_pb2.StreamChatRequest, grpc.aio.ServicerContext],
                  AsyncIterator[prompt_pb2.StreamChatResponse]]


# --- frames --------------------------------------------------------------------------------------


def start(request: prompt_pb2.StreamChatRequest, **extra: Any) -> prompt_pb2.StreamChatResponse:
    return prompt_pb2.StreamChatResponse(start=prompt_pb2.ChatStart(
        request_id=request.request_id, model=request.model, **extra))


def delta(text: str) -> prompt_pb2.StreamChatResponse:
    return prompt_pb2.StreamChatResponse(delta=common_pb2.Delta(text=text, tokens=1))


def done(prompt_tokens: int = 9, completion_tokens: int = 6) -> prompt_pb2.StreamChatResponse:
    usage = common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             total_tokens=prompt_tokens + completion_tokens)
    return prompt_pb2.StreamChatResponse(
        done=common_pb2.Done(finish_reason="stop", usage=usage, model="sim"))


def fail(context: grpc.aio.ServicerContext, err: PromptlineError) -> prompt_pb2.StreamChatResponse:
    """The error frame to yield last; the RPC status is set the way a real hop sets it."""
    status = err.to_grpc_status()
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
    return prompt_pb2.StreamChatResponse(error=err.to_pb())


async def happy(request: prompt_pb2.StreamChatRequest,
                context: grpc.aio.ServicerContext) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
    yield start(request, prompt_tokens=9)
    for word in ("Hel", "lo ", "from ", "the ", "fake ", "model"):
        yield delta(word)
    yield done()


class FakePromptService(prompt_pb2_grpc.PromptServiceServicer):
    """Runs whatever `script` a test set, and records calls and cancellations."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.script: Script = happy
        self.calls: list[tuple[prompt_pb2.StreamChatRequest, dict[str, str]]] = []
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()

    async def StreamChat(self, request: prompt_pb2.StreamChatRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[prompt_pb2.StreamChatResponse]:
        self.calls.append((request, dict(context.invocation_metadata() or ())))
        try:
            async for frame in self.script(request, context):
                yield frame
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()  # what the real chain relies on to stop the provider
            raise


async def _start_fake(fake: FakePromptService) -> RunningServer:
    return await start_grpc_server(
        "127.0.0.1:0",
        lambda server: prompt_pb2_grpc.add_PromptServiceServicer_to_server(fake, server),
        [PROMPT_SERVICE_NAME],
    )


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def fake_server() -> AsyncIterator[tuple[FakePromptService, int]]:
    fake = FakePromptService()
    running = await _start_fake(fake)
    try:
        yield fake, running.port
    finally:
        await running.stop(0)


@pytest.fixture
def fake(fake_server: tuple[FakePromptService, int]) -> FakePromptService:
    fake_server[0].reset()
    return fake_server[0]


EdgeFactory = Callable[..., Awaitable[EdgeServer]]


@pytest.fixture
async def make_edge(fake_server: tuple[FakePromptService, int]) -> AsyncIterator[EdgeFactory]:
    """Start an edge pointed at the fake (or at `prompt_port`), with `edge:` overrides."""
    started: list[EdgeServer] = []

    async def factory(prompt_port: int | None = None, **edge: Any) -> EdgeServer:
        port = fake_server[1] if prompt_port is None else prompt_port
        config = make_config({"targets": {"prompt": f"127.0.0.1:{port}"},
                              "edge": {"heartbeat": "15s", "header_hold": "3s", **edge}})
        server = await start_edge(config)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            await server.stop()


@pytest.fixture
async def edge(make_edge: EdgeFactory) -> EdgeServer:
    return await make_edge()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


# --- requests ------------------------------------------------------------------------------------


async def post_chat(session: aiohttp.ClientSession, edge: EdgeServer, body: Any = None,
                    headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    payload = body if isinstance(body, bytes) else json.dumps(BODY if body is None else body)
    return await asyncio.wait_for(
        session.post(f"{edge.url}/v1/chat/stream", data=payload,
                     headers={**AUTH, **(headers or {})}),
        WAIT,
    )


# --- the happy path ------------------------------------------------------------------------------


async def test_happy_path_streams_start_deltas_done(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    body = {**BODY, "max_tokens": 64, "temperature": 0.5, "conversation_id": "conv-1",
            "prompt": {"id": "greeter", "version": 3, "variables": {"name": "Ada"}}}
    async with await post_chat(session, edge, body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        rid = resp.headers["X-Request-Id"]
        items = without_comments(await SseStream(resp).rest())

    events = [e.event for e in items]
    # deltas that queue up while the client reads are sent as one: 1 to 6 of them, in order
    assert events[0] == "start" and events[-1] == "done" and set(events[1:-1]) == {"delta"}
    assert items[0].data == {"request_id": rid, "model": "sim", "prompt_tokens": 9}
    deltas = items[1:-1]
    assert 1 <= len(deltas) <= 6
    assert [e.id for e in deltas] == [str(i) for i in range(1, len(deltas) + 1)]
    assert "".join(e.data["text"] for e in deltas) == "Hello from the fake model"
    assert items[-1].data == {
        "finish_reason": "stop", "model": "sim",
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }

    [(request, metadata)] = fake.calls
    assert metadata["authorization"] == "Bearer dev-key"
    assert metadata["x-request-id"] == rid == request.request_id
    assert len(rid) == 32
    assert request.model == "sim" and request.max_tokens == 64
    assert request.temperature == pytest.approx(0.5)
    assert [(m.role, m.content) for m in request.messages] == [("user", "Hi")]
    assert request.conversation_id == "conv-1"
    assert (request.prompt.id, request.prompt.version) == ("greeter", 3)
    assert dict(request.prompt.variables) == {"name": "Ada"}


async def test_start_event_carries_conversation_and_prompt(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request, conversation_id="c1", prompt_id="p1", prompt_version=2,
                    prompt_tokens=4)
        yield done()

    fake.script = script
    async with await post_chat(session, edge) as resp:
        items = without_comments(await SseStream(resp).rest())
    assert items[0].data == {"request_id": resp.headers["X-Request-Id"], "model": "sim",
                                "conversation_id": "c1", "prompt_id": "p1", "prompt_version": 2,
                                "prompt_tokens": 4}
    assert [e.event for e in items] == ["start", "done"]


@pytest.mark.parametrize(("given", "kept"), [("req-42.a:b_c", True), ("bad id", False),
                                             ("x" * 129, False)])
async def test_request_id_header_is_reused_only_when_safe(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession,
    given: str, kept: bool,
) -> None:
    async with await post_chat(session, edge, headers={"X-Request-Id": given}) as resp:
        await SseStream(resp).rest()
    rid = resp.headers["X-Request-Id"]
    assert (rid == given) is kept
    assert fake.calls[0][1]["x-request-id"] == rid


# --- errors before any model work ----------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-secret-key-123",
                                           "Basic wrong-secret-key-123", "Bearer "])
async def test_bad_or_missing_key_is_401_without_calling_downstream(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession,
    authorization: str | None,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with session.post(f"{edge.url}/v1/chat/stream", json=BODY, headers=headers) as resp:
        text = await resp.text()
    assert resp.status == 401
    assert "wrong-secret-key-123" not in text
    error = json.loads(text)["error"]
    assert error["code"] == "UNAUTHENTICATED" and error["stage"] == "connect"
    assert error["request_id"] == resp.headers["X-Request-Id"] != ""
    assert fake.calls == []


async def test_auth_is_checked_before_the_body_is_read(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(max_body_bytes=2048)
    async with session.post(f"{edge.url}/v1/chat/stream", data=b"x" * 10_000,
                            headers={"Authorization": "Bearer nope-nope"}) as resp:
        assert resp.status == 401


@pytest.mark.parametrize(("body", "fragment"), [
    (b'{"model": "sim", "messages": [', "body is not valid JSON"),
    (b'{"model": "sim",\n "messages": [}', "line 2 column"),
    (json.dumps({"model": "sim", "messages": [{"role": "user", "content": 5}]}).encode(),
     "messages[0].content must be a string"),
    (json.dumps({"model": 7, "messages": BODY["messages"]}).encode(), "model must be a string"),
    (b'{"model": "sim", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     "body is not valid UTF-8"),
    (b"", "body is empty"),
])
async def test_bad_body_is_400_naming_the_problem(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession,
    body: bytes, fragment: str,
) -> None:
    async with await post_chat(session, edge, body) as resp:
        payload = await resp.json()
    assert resp.status == 400
    assert payload["error"]["code"] == "INVALID_REQUEST"
    assert payload["error"]["stage"] == "connect"
    assert fragment in payload["error"]["message"]
    assert payload["error"]["request_id"] == resp.headers["X-Request-Id"]
    assert fake.calls == []


async def test_oversize_body_is_413(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(max_body_bytes=2048)
    big = {**BODY, "messages": [{"role": "user", "content": "a" * 4096}]}
    async with await post_chat(session, edge, big) as resp:
        payload = await resp.json()
    assert resp.status == 413
    assert payload["error"]["code"] == "INVALID_REQUEST"
    assert "2048 bytes" in payload["error"]["message"]
    assert fake.calls == []


async def test_oversize_chunked_body_is_cut_off_at_the_limit() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000

    with pytest.raises(PromptlineError) as info:
        await read_body(chunks(), 2048)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert await read_body(chunks(), 100_000) == b"x" * 100_000


# --- downstream errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("err", "status", "retry_after"), [
    (PromptlineError(ErrorCode.QPM_EXCEEDED, "tenant dev is over its requests per minute",
                     stage=Stage.FIRST_PACKET, retry_after_ms=1500, origin="prompt",
                     quota_subject="tenant:dev:qpm"), 429, "2"),
    (PromptlineError(ErrorCode.NOT_FOUND, "unknown model 'nope'", stage=Stage.CONNECT,
                     origin="prompt"), 404, None),
    (PromptlineError(ErrorCode.FIRST_TOKEN_TIMEOUT, "no first token in time",
                     stage=Stage.FIRST_PACKET, origin="llm_engine"), 504, None),
])
async def test_error_before_start_is_a_real_http_status(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession,
    err: PromptlineError, status: int, retry_after: str | None,
) -> None:
    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield fail(context, err)

    fake.script = script
    async with await post_chat(session, edge) as resp:
        payload = await resp.json()
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers.get("Retry-After") == retry_after
    assert payload["error"]["code"] == err.code.value
    assert payload["error"]["stage"] == err.stage.value  # type: ignore[union-attr]
    assert payload["error"]["message"] == err.message
    # The downstream frame had no request id: the edge fills in the one it sent.
    assert payload["error"]["request_id"] == resp.headers["X-Request-Id"]


async def test_status_without_error_frame_still_maps(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "backend at 10.0.0.7 refused")
        yield delta("never")

    fake.script = script
    async with await post_chat(session, edge) as resp:
        payload = await resp.json()
    assert resp.status == 503
    assert payload["error"]["code"] == "UNAVAILABLE"
    assert "10.0.0.7" not in payload["error"]["message"]


async def test_error_after_deltas_is_an_sse_error_event_then_the_stream_closes(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    err = PromptlineError(ErrorCode.UPSTREAM_ERROR, "the provider failed mid-stream",
                          stage=Stage.MID_STREAM, retryable=False, origin="llm_engine")

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        for word in ("a", "b", "c"):
            yield delta(word)
        yield fail(context, err)
        await fake.release.wait()  # a hop that (wrongly) kept its stream open after the error
        yield delta("after the error")

    fake.script = script
    async with await post_chat(session, edge) as resp:
        assert resp.status == 200
        # returns only once the edge closed the stream
        items = without_comments(await SseStream(resp).rest())
    events = [e.event for e in items]
    assert events[0] == "start" and events[-1] == "error" and set(events[1:-1]) == {"delta"}
    assert "".join(e.data["text"] for e in items if e.event == "delta") == "abc"
    error = items[-1].data["error"]
    assert error["code"] == "UPSTREAM_ERROR" and error["stage"] == "mid_stream"
    assert error["request_id"] == resp.headers["X-Request-Id"]
    assert items[-1].id is None


async def test_done_leaves_with_the_end_of_the_body(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write is a syscall and a packet: headers, `start`, one delta, and `done` with the
    # chunked body's terminator make four (five when the terminator went on its own).
    writes: list[bytes] = []
    original_write, original_writelines = StreamWriter._write, StreamWriter._writelines

    def write(self: StreamWriter, chunk: Any) -> None:
        writes.append(bytes(chunk))
        original_write(self, chunk)

    def writelines(self: StreamWriter, chunks: Any) -> None:
        chunks = [bytes(c) for c in chunks]
        writes.append(b"".join(chunks))
        original_writelines(self, chunks)

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        yield delta("hi")
        yield done()

    fake.script = script
    monkeypatch.setattr(StreamWriter, "_write", write)
    monkeypatch.setattr(StreamWriter, "_writelines", writelines)
    async with await post_chat(session, edge) as resp:
        items = without_comments(await SseStream(resp).rest())
    monkeypatch.undo()
    assert [e.event for e in items] == ["start", "delta", "done"]
    sent = [w for w in writes if not w.startswith(b"POST ")]  # the client's own request
    assert len(sent) == 4, sent
    assert sent[0].startswith(b"HTTP/1.1 200") and b"event: start" in sent[1]
    assert b"event: delta" in sent[2]
    assert b"event: done" in sent[3] and sent[3].endswith(b"0\r\n\r\n")


# --- heartbeats, header hold, disconnects --------------------------------------------------------


async def test_heartbeat_comments_while_the_stream_stalls(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(heartbeat="200ms")

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        await fake.release.wait()
        yield delta("late")
        yield done()

    fake.script = script
    async with await post_chat(session, edge) as resp:
        reader = SseStream(resp)
        assert (await reader.next()).event == "start"
        assert await reader.next() == Event(":comment", "keep-alive")
        assert await reader.next() == Event(":comment", "keep-alive")
        fake.release.set()
        items = without_comments(await reader.rest())
    assert [e.event for e in items] == ["delta", "done"]
    assert items[0].id == "1"


async def test_no_heartbeat_while_text_flows_faster_than_the_interval(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(heartbeat="500ms")

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        for i in range(10):  # 1 s of text, one delta every 100 ms: each write moves the deadline
            await asyncio.sleep(0.1)
            yield delta(f"t{i} ")
        await fake.release.wait()  # then a stall: heartbeats resume
        yield done()

    fake.script = script
    async with await post_chat(session, edge) as resp:
        reader = SseStream(resp)
        seen = [await reader.next() for _ in range(12)]
        fake.release.set()
        await reader.rest()
    assert [item.event for item in seen] == ["start"] + ["delta"] * 10 + [":comment"]


async def test_headers_are_committed_when_the_hold_cap_passes(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(header_hold="300ms")

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        await fake.release.wait()  # admission takes longer than the hold
        yield start(request)
        yield delta("hi")
        yield done()

    fake.script = script
    async with await post_chat(session, edge) as resp:
        assert not fake.release.is_set()
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        fake.release.set()
        items = without_comments(await SseStream(resp).rest())
    assert [e.event for e in items] == ["start", "delta", "done"]


async def test_error_after_the_hold_cap_is_an_sse_event(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge(header_hold="300ms")
    err = PromptlineError(ErrorCode.TPM_EXCEEDED, "over tokens per minute",
                          stage=Stage.FIRST_PACKET, retry_after_ms=3000)

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        await fake.release.wait()
        yield fail(context, err)

    fake.script = script
    async with await post_chat(session, edge) as resp:
        assert resp.status == 200
        fake.release.set()
        items = without_comments(await SseStream(resp).rest())
    assert [e.event for e in items] == ["error"]
    assert items[0].data["error"]["code"] == "TPM_EXCEEDED"
    assert items[0].data["error"]["retry_after_ms"] == 3000


async def test_client_disconnect_cancels_the_downstream_call(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        yield delta("one")
        await asyncio.Event().wait()  # stalls until cancelled
        yield delta("never")

    fake.script = script
    resp = await post_chat(session, edge)
    reader = SseStream(resp)
    assert (await reader.next()).event == "start"
    assert (await reader.next()).event == "delta"
    assert not fake.cancelled.is_set()
    resp.close()  # drops the connection, like a closed tab
    await asyncio.wait_for(fake.cancelled.wait(), WAIT)


async def test_client_disconnect_while_headers_are_held_cancels_too(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    # A hold longer than WAIT: only handler cancellation (not a failed write) can end it in time.
    edge = await make_edge(header_hold="60s")
    called = asyncio.Event()

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        called.set()
        await asyncio.Event().wait()
        yield start(request)

    fake.script = script
    post = asyncio.create_task(post_chat(session, edge))
    await asyncio.wait_for(called.wait(), WAIT)
    post.cancel()  # the client gives up before any header arrived
    await asyncio.wait({post})
    await asyncio.wait_for(fake.cancelled.wait(), WAIT)


# --- probes and routing --------------------------------------------------------------------------


async def test_healthz_and_readyz(
    fake: FakePromptService, edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{edge.url}/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with session.get(f"{edge.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


async def test_readyz_is_503_when_the_prompt_service_is_gone(
    make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    running = await _start_fake(FakePromptService())
    edge = await make_edge(prompt_port=running.port)
    async with session.get(f"{edge.url}/readyz") as resp:
        assert resp.status == 200
    await running.stop(0)
    async with session.get(f"{edge.url}/readyz") as resp:
        payload = await resp.json()
    assert resp.status == 503
    assert payload["status"] == "unavailable" and "prompt service" in payload["reason"]


async def test_unknown_route_and_wrong_method_are_json_errors(
    edge: EdgeServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{edge.url}/nope") as resp:
        payload = await resp.json()
    assert resp.status == 404 and payload["error"]["code"] == "NOT_FOUND"
    async with session.get(f"{edge.url}/v1/chat/stream") as resp:
        payload = await resp.json()
    assert resp.status == 405 and payload["error"]["code"] == "INVALID_REQUEST"
    assert resp.headers["Allow"] == "POST"


async def test_unexpected_exception_is_a_json_500_without_its_text(
    session: aiohttp.ClientSession,
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret-internal-detail")

    channel = insecure_channel("127.0.0.1:1")
    app = build_app(make_config(), channel)
    app.router.add_get("/boom", boom)
    server = TestServer(app)
    await server.start_server()
    try:
        async with session.get(server.make_url("/boom")) as resp:
            text = await resp.text()
    finally:
        await server.close()
        await channel.close()
    assert resp.status == 500
    assert "secret-internal-detail" not in text
    assert json.loads(text)["error"]["code"] == "INTERNAL"


async def test_stop_is_idempotent_and_closes_the_port(
    make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge()
    await edge.stop()
    await edge.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"{edge.url}/healthz"):
            pass


# --- body parsing and SSE encoding (no servers) --------------------------------------------------


def test_parse_full_request() -> None:
    body = {"model": "sim", "max_tokens": 1, "temperature": 2,
            "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "é"}],
            "prompt": {"id": "p", "label": "prod"}, "conversation_id": "a.b:c-d_e"}
    request = parse_chat_request(json.dumps(body).encode())
    assert request.max_tokens == 1 and request.temperature == 2.0
    assert request.prompt.label == "prod" and request.prompt.version == 0
    assert request.messages[1].content == "é"
    assert not parse_chat_request(json.dumps(BODY).encode()).HasField("temperature")


@pytest.mark.parametrize(("body", "fragment"), [
    ([], "body must be a JSON object, got array"),
    ({"messages": BODY["messages"]}, "model is required"),
    ({"model": "", "messages": BODY["messages"]}, "model must not be empty"),
    ({"model": "sim"}, "messages is required"),
    ({"model": "sim", "messages": []}, "messages must not be empty"),
    ({"model": "sim", "messages": {"role": "user"}}, "messages must be a list"),
    ({"model": "sim", "messages": ["hi"]}, "messages[0] must be an object"),
    ({"model": "sim", "messages": [{"role": "user"}]}, "messages[0].content is required"),
    ({**BODY, "max_tokens": 0}, "max_tokens must be between 1 and 1000000"),
    ({**BODY, "max_tokens": 1_000_001}, "max_tokens must be between"),
    ({**BODY, "max_tokens": 1.5}, "max_tokens must be an integer"),
    ({**BODY, "max_tokens": True}, "max_tokens must be an integer, got boolean"),
    ({**BODY, "temperature": "hot"}, "temperature must be a number"),
    ({**BODY, "conversation_id": 5}, "conversation_id must be a string"),
    ({**BODY, "prompt": "p"}, "prompt must be an object"),
    ({**BODY, "prompt": {"version": 1}}, "prompt.id is required"),
    ({**BODY, "prompt": {"id": "p", "version": "3"}}, "prompt.version must be an integer"),
    ({**BODY, "prompt": {"id": "p", "variables": {"a": 1}}}, "prompt.variables.a must be a string"),
    ({**BODY, "prompt": {"id": "p", "variables": []}}, "prompt.variables must be an object"),
])
def test_parse_rejects_naming_the_field(body: Any, fragment: str) -> None:
    # What the values mean is checked behind the edge: tests/test_request_rules.py.
    with pytest.raises(PromptlineError) as info:
        parse_chat_request(json.dumps(body).encode())
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert info.value.stage is Stage.CONNECT
    assert fragment in info.value.message


@pytest.mark.parametrize(("raw", "fragment"), [
    (b'{"model": NaN}', "NaN is not a JSON value"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content contains an invalid Unicode escape"),
])
def test_parse_rejects_json_python_would_accept(raw: bytes, fragment: str) -> None:
    with pytest.raises(PromptlineError) as info:
        parse_chat_request(raw)
    assert fragment in info.value.message


def test_sse_encoding() -> None:
    assert sse.encode_event("delta", {"text": "a\nb"}, event_id=3) == (
        b'id: 3\nevent: delta\ndata: {"text":"a\\nb"}\n\n')
    expected = 'event: start\ndata: {"model":"é"}\n\n'.encode()
    assert sse.encode_event("start", {"model": "é"}) == expected
    assert sse.HEARTBEAT == b": keep-alive\n\n"
    assert sse.encode_comment("keep-alive") == sse.HEARTBEAT
    with pytest.raises(ValueError):
        sse.encode_event("bad\nname", {})


async def test_stop_cancels_streams_that_outlive_the_grace(
    fake: FakePromptService, make_edge: EdgeFactory, session: aiohttp.ClientSession
) -> None:
    edge = await make_edge()  # shutdown_grace is 1s in the test config

    async def script(request: Any, context: Any) -> AsyncIterator[Any]:
        yield start(request)
        await asyncio.Event().wait()
        yield delta("never")

    fake.script = script
    resp = await post_chat(session, edge)
    reader = SseStream(resp)
    assert (await reader.next()).event == "start"
    await asyncio.wait_for(edge.stop(), WAIT)
    await asyncio.wait_for(fake.cancelled.wait(), WAIT)
    resp.close()

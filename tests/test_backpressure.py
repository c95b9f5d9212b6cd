"""A client that stops reading while the provider floods: every hop holds a bounded amount, the
provider's own send blocks, and the stream then ends by the idle rule, down to the provider.

The provider here is a raw socket server that writes OpenAI-style chunks as fast as the socket
takes them and records how far it got, so "its send blocks" is observed, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web

from promptline.channels import insecure_channel
from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc
from services.edge_http.app import build_app
from services.edge_http.http_errors import EdgeRunner
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually

CHUNK_TEXT = "x" * 1000
EVENT = ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": CHUNK_TEXT}}]})
         + "\n\n").encode()
IDLE_S = 20.0
"""Long enough for the kernel to grow the sockets' buffers and then block the provider (7-10 s
here), short enough that the idle rule then ends the stream within the test."""


class FloodingProvider:
    """Streams chunks until the connection closes; `sent` bytes, `waiting_since` while blocked."""

    def __init__(self) -> None:
        self.sent = 0
        self.waiting_since: float | None = None
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> FloodingProvider:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # a test that failed early leaves a send blocked
            writer.transport.abort()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    def blocked_for(self) -> float:
        return 0.0 if self.waiting_since is None else time.monotonic() - self.waiting_since

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n")
            while True:
                writer.write(EVENT * 16)
                self.waiting_since = time.monotonic()
                await writer.drain()  # blocks once nobody reads: what the test is about
                self.waiting_since = None
                self.sent += len(EVENT) * 16
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def provider() -> AsyncIterator[FloodingProvider]:
    async with FloodingProvider() as running:
        yield running


async def test_a_stopped_reader_pushes_back_to_the_provider(redis_server: Any,
                                                            provider: FloodingProvider) -> None:
    config = make_config(redis_url=redis_server.url, models=[{
        "name": "flood", "provider": "openai", "base_url": provider.base_url,
        "timeouts": {"first_token": "10s", "idle": f"{IDLE_S}s", "total": "2m"}}])
    tracemalloc.start()
    try:
        async with running_chain(config) as chain:
            assert chain.edge is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", chain.edge.port)
            body = json.dumps({"model": "flood", "max_tokens": 4000,
                               "messages": [{"role": "user", "content": "go"}]}).encode()
            writer.write(b"POST /v1/chat/stream HTTP/1.1\r\nHost: edge\r\n"
                         b"Authorization: Bearer dev-key\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            first = await asyncio.wait_for(reader.read(4096), 10)
            assert first.startswith(b"HTTP/1.1 200"), first[:200]
            baseline, _ = tracemalloc.get_traced_memory()
            # The client reads nothing more. With an unbounded engine buffer the provider never
            # blocked (it sent 228 MiB to a reader that took 80 KiB); now it stops once the
            # sockets' buffers (which the kernel grows for a few seconds) and the hops' are full.
            await eventually(lambda: provider.blocked_for() > 2.0, within=IDLE_S - 1,
                             what="the provider's send blocking")
            sent = provider.sent
            grown = tracemalloc.get_traced_memory()[0] - baseline
            assert sent < 64 * 2**20, f"provider sent {sent / 2**20:.1f} MiB into a stopped reader"
            # Python heap of all three services together; gRPC's and the kernel's buffers are
            # bounded by flow control and socket sizes.
            assert grown < 8 * 2**20, f"heap grew {grown / 2**20:.1f} MiB"
            # The idle rule still ends a stream whose reader stopped: down to the provider.
            await asyncio.wait_for(provider.closed.wait(), IDLE_S + 10)
            await eventually(lambda: chain.engine_streams == 0,
                             what="the engine stream ending")
            writer.close()
    finally:
        tracemalloc.stop()


async def test_a_large_write_to_a_stopped_reader_is_bounded_by_the_idle_rule(
        redis_server: Any) -> None:
    """One 7 MB delta written into an empty socket buffer fills it and then waits for the
    client: that wait is bounded by the model's idle rule too (it once was not, and the stream
    stayed open as long as the client held the connection)."""
    from promptline.devtools.fake_openai import FakeOpenAI

    async with FakeOpenAI(models=("big",)) as upstream:
        upstream.push(reply="y" * 7_000_000, tokens=1)  # one 7 MB delta: one write
        config = make_config(redis_url=redis_server.url, models=[{
            "name": "big", "provider": "openai", "base_url": upstream.base_url,
            "context_window": 1_000_000, "stream": {"coalesce_ms": 0},
            "timeouts": {"first_token": "10s", "idle": "1s", "total": "60s"}}])
        async with running_chain(config) as chain:
            _reader, writer = await asyncio.open_connection("127.0.0.1", chain.edge.port)
            body = json.dumps({"model": "big", "max_tokens": 100,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            writer.write(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer dev-key\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            try:  # ...and never read a byte of the answer
                await eventually(lambda: upstream.completed == 1, within=10,
                                 what="the provider's whole reply sent")
                await eventually(lambda: chain.edge_streams == 0, within=10,
                                 what="the edge's stream ended by the idle rule")
            finally:
                writer.transport.abort()


class _FillsTheClientThenFails(prompt_pb2_grpc.PromptServiceServicer):
    """A prompt service (real gRPC) that streams deltas until the edge's buffer to a client
    that reads nothing is just under its high-water mark, then fails the stream: the error
    event is the write that must wait for the client."""

    def __init__(self) -> None:
        self.edge_request: web.Request | None = None

    async def StreamChat(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield prompt_pb2.StreamChatResponse(start=prompt_pb2.ChatStart(request_id="x",
                                                                       model="fast"))
        for n in itertools.count(1):
            await asyncio.sleep(0.01)
            assert self.edge_request is not None and self.edge_request.transport is not None
            transport = self.edge_request.transport
            room = transport.get_write_buffer_limits()[1] - transport.get_write_buffer_size()
            if room < 64_100:
                yield prompt_pb2.StreamChatResponse(delta=common_pb2.Delta(
                    text="y" * max(1, room - 100), tokens=1, id=n))
                await asyncio.sleep(0.3)
                yield prompt_pb2.StreamChatResponse(error=PromptlineError(
                    ErrorCode.UPSTREAM_ERROR, "the provider failed",
                    stage=Stage.MID_STREAM).to_pb())
                return
            yield prompt_pb2.StreamChatResponse(delta=common_pb2.Delta(
                text="x" * 64_000, tokens=1, id=n))


async def test_an_error_event_for_a_stopped_reader_ends_the_connection() -> None:
    """The stream fails while the client reads nothing and the edge's buffer is all but full:
    the error event's write waits the idle rule, then the connection is aborted (it stayed
    open, the waiting write's timeout escaping the relay)."""
    prompt = _FillsTheClientThenFails()
    server = grpc.aio.server()
    prompt_pb2_grpc.add_PromptServiceServicer_to_server(prompt, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    @web.middleware
    async def seen(request: web.Request, handler: Any) -> web.StreamResponse:
        prompt.edge_request = request
        return await handler(request)

    config = make_config(models=[{"name": "fast", "provider": "simulated", "timeouts": {
        "first_token": "5s", "idle": "1s", "total": "60s"}}])
    channel = insecure_channel(f"127.0.0.1:{port}")
    app = build_app(config, channel)
    app.middlewares.append(seen)
    runner = EdgeRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(runner.addresses[0][:2])
        body = b'{"model":"fast","messages":[{"role":"user","content":"hi"}]}'
        client.sendall(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                       b"dev-key\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await eventually(lambda: prompt.edge_request is not None
                         and (prompt.edge_request.transport is None
                              or prompt.edge_request.transport.is_closing()),
                         within=30, what="the edge aborting the connection")
        client.settimeout(10)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            # What the kernel holds, then the end (the abort): no hang. On a box slow enough
            # that the error event still fit, the stream instead ends whole, with its last chunk.
            while chunk := client.recv(1 << 20):
                received += chunk
                if received.endswith(b"0\r\n\r\n"):
                    break
    finally:
        client.close()
        await runner.cleanup()
        await channel.close()
        await server.stop(0)

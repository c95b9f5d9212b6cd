"""The HTTP edge: authenticates, validates, and relays a PromptService stream to the client as SSE.

Response headers are held until the prompt service's `start` frame (admission) arrives, capped at
`edge.header_hold`; an error before that is a real HTTP status with a JSON body, an error after it
is an SSE `error` event. A client that goes away cancels the handler (aiohttp handler
cancellation), which cancels the gRPC call and so the whole chain down to the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from promptline.auth import Authenticator
from promptline.config import Config
from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.grpc_server import insecure_channel
from promptline.ratelimit import rejection_limits
from promptline.streams import read_frames
from promptline.v1 import prompt_pb2, prompt_pb2_grpc
from services.edge_http import sse
from services.edge_http.chat_request import (
    PAYLOAD_TOO_LARGE_STATUS,
    parse_chat_request,
    read_body,
)

log = logging.getLogger("promptline.edge_http")

ORIGIN = "edge_http"
PROMPT_SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
READY_TIMEOUT = 1.0
# Slack between the gRPC reader and the socket writer: enough that a write does not stall the
# next read, small enough that a slow client pushes back through gRPC flow control instead of
# having the edge buffer a whole reply in memory.
FRAME_QUEUE_SIZE = 8
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Lifecycle:
    """Mutable process state shared with handlers (app keys are frozen once the app starts)."""

    draining: bool = False


CONFIG_KEY = web.AppKey("promptline_config", Config)
CHANNEL_KEY = web.AppKey("prompt_channel", grpc.aio.Channel)
STUB_KEY = web.AppKey("prompt_stub", prompt_pb2_grpc.PromptServiceStub)
AUTH_KEY = web.AppKey("authenticator", Authenticator)
LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)


def build_app(config: Config, channel: grpc.aio.Channel) -> web.Application:
    """The edge application; the caller owns `channel` (one per process) and closes it."""
    app = web.Application(middlewares=[json_errors])
    app[CONFIG_KEY] = config
    app[CHANNEL_KEY] = channel
    app[STUB_KEY] = prompt_pb2_grpc.PromptServiceStub(channel)
    app[AUTH_KEY] = Authenticator(config.tenants)
    app[LIFECYCLE_KEY] = Lifecycle()
    app.router.add_post("/v1/chat/stream", chat_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@dataclass
class EdgeServer:
    """A running edge: its bound port, the application, and the way to stop it."""

    app: web.Application
    runner: web.AppRunner
    channel: grpc.aio.Channel
    port: int
    host: str = "127.0.0.1"
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Graceful shutdown: report not-ready, stop accepting, let streams drain for up to
        `shutdown_grace` (then cancel them, which cancels their gRPC calls), close the channel."""
        if self._stopped:
            return
        self._stopped = True
        self.app[LIFECYCLE_KEY].draining = True
        try:
            await self.runner.cleanup()
        finally:
            await self.channel.close()


async def start_edge(config: Config, host: str = "127.0.0.1", port: int = 0) -> EdgeServer:
    """Create the process's prompt channel, build the app and serve it on host:port (0 = any)."""
    channel = insecure_channel(config.prompt_target)
    app = build_app(config, channel)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client disconnect must cancel the model work
        shutdown_timeout=config.shutdown_grace,
        access_log=None,
    )
    started = False
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        started = True
    finally:
        if not started:  # a port in use, or cancelled: leave nothing half-open behind
            await runner.cleanup()
            await channel.close()
    bound = runner.addresses[0][1]
    log.info("edge listening", extra={"host": host, "port": bound,
                                      "prompt_target": config.prompt_target})
    return EdgeServer(app=app, runner=runner, channel=channel, port=bound, host=host)


# --- errors ------------------------------------------------------------------------------------


def error_response(err: PromptlineError, request_id: str, *, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP error body `{"error": {...}}` with the table's status (or `status`)."""
    err.request_id = err.request_id or request_id
    all_headers = {**err.http_headers(), **(headers or {})}
    if request_id:
        all_headers["X-Request-Id"] = request_id
    return web.json_response({"error": err.to_dict()}, status=status or err.http_status,
                             headers=all_headers)


def _code_for_http_status(status: int) -> ErrorCode:
    if status == 401:
        return ErrorCode.UNAUTHENTICATED
    if status == 403:
        return ErrorCode.PERMISSION_DENIED
    if status == 404:
        return ErrorCode.NOT_FOUND
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_REQUEST


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Routing errors and unexpected exceptions as the JSON error shape, never HTML or a trace."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        rid = request_id_from(request.headers.get("X-Request-Id"))
        if exc.status < 400:
            raise
        code = _code_for_http_status(exc.status)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"method {request.method} is not allowed here (allowed: {allowed})"
        elif exc.status == 404:
            message = "no such endpoint"
        elif code is ErrorCode.INTERNAL:
            message = "internal error"
        else:
            message = exc.reason
        passthrough = {k: v for k, v in exc.headers.items()
                       if k.lower() in ("allow", "retry-after")}
        err = PromptlineError(code, message, stage=Stage.CONNECT, origin=ORIGIN)
        return error_response(err, rid, status=exc.status, headers=passthrough)
    except Exception:
        rid = request_id_from(request.headers.get("X-Request-Id"))
        log.exception("unhandled error", extra={"request_id": rid, "path": request.path})
        return error_response(internal_error(rid, Stage.CONNECT), rid)


# --- probes ------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining, and the prompt service answers its gRPC health check."""
    if request.app[LIFECYCLE_KEY].draining:
        return web.json_response({"status": "unavailable", "reason": "shutting down"}, status=503)
    stub = health_pb2_grpc.HealthStub(request.app[CHANNEL_KEY])
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=PROMPT_SERVICE_NAME),
                                 timeout=READY_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        reason = f"prompt service health check failed: {exc.code().name}"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        reason = f"prompt service is {status_name}"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    return web.json_response({"status": "ready"})


# --- the chat stream ---------------------------------------------------------------------------


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when it is a safe token, else a fresh uuid4 hex."""
    if header and _SAFE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


async def chat_stream(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/stream: auth, body, then relay the prompt service's stream as SSE."""
    app = request.app
    config = app[CONFIG_KEY]
    rid = request_id_from(request.headers.get("X-Request-Id"))
    authorization = request.headers.get("Authorization", "")
    # Auth first: an unauthenticated caller gets no body parsing and no downstream call.
    try:
        app[AUTH_KEY].tenant_for_header(authorization)
    except PromptlineError as err:
        return error_response(err.at(Stage.CONNECT, origin=ORIGIN), rid)
    try:
        body = await read_body(request.content.iter_any(), config.edge.max_body_bytes,
                               request.content_length)
    except PromptlineError as err:
        return error_response(err.at(Stage.CONNECT, origin=ORIGIN), rid,
                              status=PAYLOAD_TOO_LARGE_STATUS)
    try:
        chat = parse_chat_request(body)
    except PromptlineError as err:
        return error_response(err.at(Stage.CONNECT, origin=ORIGIN), rid)
    chat.request_id = rid

    call = app[STUB_KEY].StreamChat(
        chat,
        metadata=(("authorization", authorization), ("x-request-id", rid)),
        timeout=config.edge.request_timeout,
    )
    relay = SseRelay(request, rid, model=chat.model, heartbeat=config.edge.heartbeat)
    return await relay.run(call, header_hold=config.edge.header_hold)


class SseRelay:
    """Relays one StreamChat call to one HTTP client; the single writer of the response.

    A reader task drains the gRPC stream into a small queue, so waiting for frames with a timeout
    (header hold, heartbeats) never cancels a pending gRPC read. Heartbeats are written by the
    same loop when the wait for the next frame times out, so no two tasks write the response.
    """

    def __init__(self, request: web.Request, request_id: str, *, model: str,
                 heartbeat: float) -> None:
        self._request = request
        self._config = request.app[CONFIG_KEY]
        self._rid = request_id
        self._model = model
        self._heartbeat = heartbeat
        self._response: web.StreamResponse | None = None
        self._call: Any = None
        self._started = False
        self._deltas = 0
        self._last_write = 0.0
        self.outcome = "unfinished"

    async def run(self, call: Any, *, header_hold: float) -> web.StreamResponse:
        began = time.monotonic()
        self._call = call
        queue: asyncio.Queue[Any] = asyncio.Queue(FRAME_QUEUE_SIZE)
        reader = asyncio.create_task(_read_into(call, queue, self._rid),
                                     name=f"edge-read-{self._rid}")
        try:
            return await self._relay(queue, header_hold)
        except ConnectionResetError:
            # The client went away while we wrote; aiohttp copes with the half-written response.
            self.outcome = "client_disconnected"
            assert self._response is not None  # only writes raise this, and they follow prepare
            return self._response
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        finally:
            call.cancel()  # stop the chain now, whatever the reader task is doing
            await cancel_and_wait(reader)
            log.info("chat stream ended", extra={
                "request_id": self._rid, "model": self._model, "outcome": self.outcome,
                "deltas": self._deltas, "duration_ms": round((time.monotonic() - began) * 1000),
            })

    async def _relay(self, queue: asyncio.Queue[Any], header_hold: float) -> web.StreamResponse:
        try:
            frame = await self._first_frame(queue, header_hold)
            # The prompt service sends its quota headers as initial metadata at admission.
            await self._open(await self._ratelimit_headers() if frame else {})
            if frame is not None:
                await self._write_frame(frame)
            while frame is None or frame.WhichOneof("frame") != "done":
                frame = await self._next_frame(queue)
                await self._write_frame(frame)
            self.outcome = "done"
        except PromptlineError as err:
            return await self._fail(err)
        except ConnectionResetError:
            raise
        except Exception:
            log.exception("chat stream failed", extra={"request_id": self._rid})
            return await self._fail(internal_error(self._rid, self._stage()))
        assert self._response is not None
        await self._response.write_eof()
        return self._response

    async def _first_frame(self, queue: asyncio.Queue[Any], hold: float) -> Any | None:
        """The first frame, or None once `hold` passed (headers are then committed anyway)."""
        try:
            return await asyncio.wait_for(_get(queue), timeout=hold)
        except TimeoutError:
            return None

    async def _next_frame(self, queue: asyncio.Queue[Any]) -> Any:
        """The next frame, writing a heartbeat whenever nothing was written for a while."""
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_write
            try:
                return await asyncio.wait_for(_get(queue), timeout=max(0.0, self._heartbeat - idle))
            except TimeoutError:
                await self._write(sse.HEARTBEAT)

    async def _ratelimit_headers(self) -> dict[str, str]:
        """`x-ratelimit-*` headers the prompt service sent as initial metadata at admission."""
        try:
            metadata = await self._call.initial_metadata()
        except (grpc.RpcError, asyncio.InvalidStateError):
            return {}
        return {k: v for k, v in (metadata or ()) if k.startswith("x-ratelimit-")
                and isinstance(v, str)}

    async def _open(self, extra_headers: dict[str, str]) -> None:
        response = web.StreamResponse(status=200, headers={
            **extra_headers,
            "Content-Type": sse.CONTENT_TYPE,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx would otherwise buffer the whole stream
            "X-Request-Id": self._rid,
        })
        self._response = response
        await response.prepare(self._request)
        self._last_write = asyncio.get_running_loop().time()

    async def _write(self, data: bytes) -> None:
        assert self._response is not None
        await self._response.write(data)
        self._last_write = asyncio.get_running_loop().time()

    async def _write_frame(self, frame: Any) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "start":
            if not self._started:
                await self._write_start(frame.start)
        elif kind == "delta":
            if not self._started:  # a downstream that skipped `start`: the client still gets one
                await self._write_start(prompt_pb2.ChatStart(request_id=self._rid,
                                                             model=self._model))
            self._deltas += 1
            await self._write(sse.encode_event("delta", {"text": frame.delta.text},
                                               event_id=self._deltas))
        elif kind == "done":
            if not self._started:
                await self._write_start(prompt_pb2.ChatStart(request_id=self._rid,
                                                             model=self._model))
            await self._write(sse.encode_event("done", _done_data(frame.done)))
        else:
            log.warning("unknown frame kind ignored",
                        extra={"request_id": self._rid, "kind": kind})

    async def _write_start(self, start: prompt_pb2.ChatStart) -> None:
        self._started = True
        await self._write(sse.encode_event("start", _start_data(start, self._rid, self._model)))

    async def _fail(self, err: PromptlineError) -> web.StreamResponse:
        err.at(self._stage(), request_id=self._rid, origin=ORIGIN)
        self.outcome = f"error:{err.code.value}"
        if self._response is None:
            headers = rejection_limits(self._config, err).headers() if err.quota_subject else {}
            return error_response(err, self._rid, headers=headers)
        await self._write(sse.encode_event("error", {"error": err.to_dict()}))
        await self._response.write_eof()
        return self._response

    def _stage(self) -> Stage:
        return Stage.MID_STREAM if self._deltas else Stage.FIRST_PACKET


def _start_data(start: prompt_pb2.ChatStart, request_id: str, model: str) -> dict[str, Any]:
    data: dict[str, Any] = {"request_id": start.request_id or request_id,
                            "model": start.model or model}
    if start.conversation_id:
        data["conversation_id"] = start.conversation_id
    if start.prompt_id:
        data["prompt_id"] = start.prompt_id
        data["prompt_version"] = start.prompt_version
    if start.prompt_tokens:
        data["prompt_tokens"] = start.prompt_tokens
    return data


def _done_data(done: Any) -> dict[str, Any]:
    usage = done.usage
    data: dict[str, Any] = {
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens},
    }
    if done.model:
        data["model"] = done.model
    return data


async def _get(queue: asyncio.Queue[Any]) -> Any:
    item = await queue.get()
    if isinstance(item, PromptlineError):
        raise item
    return item


async def _read_into(call: Any, queue: asyncio.Queue[Any], request_id: str) -> None:
    """Reader task: frames into `queue`, ending with the terminal frame or a PromptlineError."""
    try:
        async with contextlib.aclosing(read_frames(call)) as frames:
            async for frame in frames:
                await queue.put(frame)
    except PromptlineError as err:
        await queue.put(err)
    except Exception:
        log.exception("reading the prompt stream failed", extra={"request_id": request_id})
        await queue.put(internal_error(request_id))


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it finished; our own cancellation still propagates."""
    task.cancel()
    await asyncio.wait({task})  # unlike `await task`, never raises the task's CancelledError
    if not task.cancelled() and task.exception() is not None:
        log.debug("task ended with an error", exc_info=task.exception())

"""The HTTP edge: authenticates, validates, and relays a PromptService stream to the client as SSE.

Routes: `POST /v1/chat/stream` (here), `POST /v1/chat/completions` and `GET /v1/models`
(`openai_api.py`), the chat page `GET /` (`chat_page.py`), `/healthz`, `/readyz`. The streaming
rules live in `relay.StreamRelay`, shared by both streaming endpoints.

Response headers are held until the prompt service's `start` frame (admission) arrives, capped at
`edge.header_hold`; an error before that is a real HTTP status with a JSON body, an error after it
is an SSE `error` event. A client that goes away cancels the handler (aiohttp handler
cancellation), which cancels the gRPC call and so the whole chain down to the provider.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind

from promptline.config import Config
from promptline.config_reload import LiveConfig
from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.grpc_server import insecure_channel
from promptline.metrics import metrics_handler
from promptline.tracing import client_interceptors, tracer
from promptline.v1 import prompt_pb2, prompt_pb2_grpc
from services.edge_http import chat_page, openai_api, prompts_api
from services.edge_http.chat_request import (
    PAYLOAD_TOO_LARGE_STATUS,
    parse_chat_request,
    read_body,
)
from services.edge_http.context import (
    CHANNEL_KEY,
    LIFECYCLE_KEY,
    LIVE_CONFIG_KEY,
    STUB_KEY,
    Lifecycle,
    authenticator,
    current_config,
    request_id_from,
)
from services.edge_http.relay import (
    ORIGIN,
    ErrorBody,
    SseEncoder,
    StreamRelay,
    error_response,
    sse_error_body,
)

log = logging.getLogger("promptline.edge_http")

PROMPT_SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
READY_TIMEOUT = 1.0
__all__ = ["ORIGIN", "EdgeServer", "Lifecycle", "build_app", "error_response",
           "request_id_from", "start_edge"]


def build_app(config: Config, channel: grpc.aio.Channel, *,
              live: LiveConfig | None = None) -> web.Application:
    """The edge application; the caller owns `channel` (one per process) and closes it."""
    app = web.Application(middlewares=[traced, json_errors])
    app[LIVE_CONFIG_KEY] = live or LiveConfig(config, "edge_http")
    app[CHANNEL_KEY] = channel
    app[STUB_KEY] = prompt_pb2_grpc.PromptServiceStub(channel)
    app[LIFECYCLE_KEY] = Lifecycle()
    app.router.add_post("/v1/chat/stream", chat_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    openai_api.add_routes(app)
    chat_page.add_routes(app)
    prompts_api.add_routes(app)
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


async def start_edge(config: Config, host: str = "127.0.0.1", port: int = 0, *,
                     live: LiveConfig | None = None) -> EdgeServer:
    """Create the process's prompt channel, build the app and serve it on host:port (0 = any)."""
    channel = insecure_channel(config.prompt_target, interceptors=client_interceptors())
    app = build_app(config, channel, live=live)
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


def _code_for_http_status(status: int) -> ErrorCode:
    if status == 401:
        return ErrorCode.UNAUTHENTICATED
    if status == 403:
        return ErrorCode.PERMISSION_DENIED
    if status == 404:
        return ErrorCode.NOT_FOUND
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_REQUEST


@web.middleware
async def traced(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A SERVER span per request that continues an incoming W3C `traceparent`; the gRPC client
    interceptor carries it on to the prompt service."""
    with tracer.start_as_current_span(
        f"{request.method} {request.path}", context=extract(request.headers),
        kind=SpanKind.SERVER, attributes={"http.request.method": request.method,
                                          "url.path": request.path},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if rid := response.headers.get("X-Request-Id"):
            span.set_attribute("promptline.request_id", rid)
        return response


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
        return error_response(err, rid, status=exc.status, headers=passthrough,
                              body=_error_body_for(request.path))
    except Exception:
        rid = request_id_from(request.headers.get("X-Request-Id"))
        log.exception("unhandled error", extra={"request_id": rid, "path": request.path})
        return error_response(internal_error(rid, Stage.CONNECT), rid,
                              body=_error_body_for(request.path))


def _error_body_for(path: str) -> ErrorBody:
    """OpenAI's error shape on the OpenAI-compatible paths, the native one elsewhere."""
    return openai_api.error_body if openai_api.is_openai_path(path) else sse_error_body


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


async def chat_stream(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/stream: auth, body, then relay the prompt service's stream as SSE."""
    app = request.app
    config = current_config(app)
    rid = request_id_from(request.headers.get("X-Request-Id"))
    authorization = request.headers.get("Authorization", "")
    # Auth first: an unauthenticated caller gets no body parsing and no downstream call.
    try:
        authenticator(app).tenant_for_header(authorization)
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
    del body  # the protobuf is the copy the stream keeps; a long prompt is not held twice

    call = app[STUB_KEY].StreamChat(
        chat,
        metadata=(("authorization", authorization), ("x-request-id", rid)),
        timeout=config.edge.request_timeout,
    )
    relay = StreamRelay(request, config, rid, model=chat.model,
                        encoder=SseEncoder(rid, chat.model))
    return await relay.run(call, header_hold=config.edge.header_hold)


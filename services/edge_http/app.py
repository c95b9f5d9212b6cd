"""The HTTP edge: authenticates, validates, and relays a PromptService stream to the client as SSE.

Routes: `POST /v1/chat/stream` (here), its resume and cancel (`resume_api.py`),
`POST /v1/chat/completions` and `GET /v1/models` (`openai_api.py`), prompts and conversations
(`prompts_api.py`), the chat page `GET /`
(`chat_page.py`), `/healthz`, `/readyz`, `/metrics`, and `GET /openapi.json`, which describes them
all (`openapi.py`). The streaming rules live in `relay.StreamRelay`, shared by both streaming
endpoints.

Response headers are held until the prompt service's `start` frame (the model's first chunk)
arrives, capped at `edge.header_hold`; an error before that is a real HTTP status with a JSON
body, an error after it is an SSE `error` event. A client that goes away cancels the handler
(aiohttp handler cancellation), which cancels the gRPC call and so the whole chain down to the
provider; a native SSE stream is `resumable`, so the prompt service may first keep it going for
`resume.grace` for a client that reconnects (docs/resume.md).
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

from promptline.channels import insecure_channel
from promptline.config import Config
from promptline.config_reload import LiveConfig
from promptline.grpc_server import REDIS_HEALTH_NAME
from promptline.metrics_server import metrics_handler
from promptline.tracing import client_interceptors, tracer
from promptline.v1 import prompt_pb2, prompt_pb2_grpc
from services.edge_http import chat_page, openai_api, openapi, prompts_api, resume_api
from services.edge_http.chat_request import cache_bypass, parse_chat_request, read_request_body
from services.edge_http.context import (
    CHANNEL_KEY,
    LIFECYCLE_KEY,
    LIVE_CONFIG_KEY,
    STUB_KEY,
    Caller,
    Lifecycle,
    authenticated,
)
from services.edge_http.http_errors import ORIGIN, EdgeRunner, error_response, json_errors
from services.edge_http.relay import SseEncoder, StreamRelay

log = logging.getLogger("promptline.edge_http")

PROMPT_SERVICE_NAME = prompt_pb2.DESCRIPTOR.services_by_name["PromptService"].full_name
READY_TIMEOUT = 1.0
__all__ = ["ORIGIN", "EdgeServer", "Lifecycle", "build_app", "error_response", "start_edge"]


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
    resume_api.add_routes(app)
    openai_api.add_routes(app)
    chat_page.add_routes(app)
    prompts_api.add_routes(app)
    openapi.add_routes(app)
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
    runner = EdgeRunner(
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


# --- tracing ---------------------------------------------------------------------------------


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


# --- probes ------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining, and the prompt service answers its gRPC health check. The body
    also says whether that prompt service reaches Redis, without failing the probe for it: every
    replica shares the one Redis (see services/prompt/redis_watch.py)."""
    if request.app[LIFECYCLE_KEY].draining:
        return web.json_response({"status": "unavailable", "reason": "shutting down"}, status=503)
    stub = health_pb2_grpc.HealthStub(request.app[CHANNEL_KEY])
    try:
        status = await _health(stub, PROMPT_SERVICE_NAME)
    except grpc.aio.AioRpcError as exc:
        reason = f"prompt service health check failed: {exc.code().name}"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    if status != health_pb2.HealthCheckResponse.SERVING:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        reason = f"prompt service is {status_name}"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    try:
        redis_ok = await _health(stub, REDIS_HEALTH_NAME) == health_pb2.HealthCheckResponse.SERVING
        redis = "ok" if redis_ok else "unreachable"
    except grpc.aio.AioRpcError:
        redis = "unknown"
    return web.json_response({"status": "ready", "redis": redis})


async def _health(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    # types-grpcio-health-checking declares HealthStub without its methods.
    reply: health_pb2.HealthCheckResponse = await stub.Check(  # type: ignore[attr-defined]
        health_pb2.HealthCheckRequest(service=service), timeout=READY_TIMEOUT)
    return reply.status


# --- the chat stream ---------------------------------------------------------------------------


@authenticated
async def chat_stream(request: web.Request, caller: Caller) -> web.StreamResponse:
    """POST /v1/chat/stream: the body, then relay the prompt service's stream as SSE."""
    config = caller.config
    chat = parse_chat_request(await read_request_body(request, config.edge.max_body_bytes))
    chat.request_id = caller.request_id
    chat.no_cache = cache_bypass(request.headers.getall("Cache-Control", ()))
    # A dropped SSE connection is not a Stop: the client may resume (resume_api.py).
    chat.resumable = True
    call = request.app[STUB_KEY].StreamChat(chat, metadata=caller.metadata,
                                            timeout=config.edge.request_timeout)
    relay = StreamRelay(request, config, caller.request_id, model=chat.model,
                        encoder=SseEncoder(caller.request_id, chat.model))
    return await relay.run(call, header_hold=config.edge.header_hold)

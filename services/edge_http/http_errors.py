"""Every HTTP error the edge answers, whoever raised it, as the JSON error object.

Three sources, one shape (`{"error": {code, stage, message, retryable, request_id}}`, OpenAI's
shape on the OpenAI-compatible paths) and one counter (`promptline_errors_total{edge_http}`):
- handlers, through `error_response`;
- routing errors and unexpected exceptions, through the `json_errors` middleware;
- requests aiohttp's own HTTP parser rejects before any handler runs (a bad method, invalid header
  bytes, a line over the limit, ...), and an `Expect` we refuse, through `EdgeRunner`.
None of them shows the implementation: no traceback, no repr of the offending bytes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.metrics import ERRORS
from promptline.rules import request_id_from

log = logging.getLogger("promptline.edge_http")

ORIGIN = "edge_http"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
OPENAI_PATHS = frozenset({CHAT_COMPLETIONS_PATH, MODELS_PATH})

ErrorBody = Callable[[PromptlineError], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
"""What a low-level `Server` calls (the application's, for the requests its factory makes)."""


def native_error_body(err: PromptlineError) -> dict[str, Any]:
    """The native HTTP error body `{"error": {...}}`."""
    return {"error": err.to_dict()}


def openai_error_body(err: PromptlineError) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {message, type, code, param, ...our fields}}`."""
    return {"error": err.to_openai_dict()}


def error_body_for(path: str) -> ErrorBody:
    """OpenAI's error shape on the OpenAI-compatible paths, the native one elsewhere."""
    return openai_error_body if path in OPENAI_PATHS else native_error_body


def count_error(err: PromptlineError) -> None:
    """One more error answered by the edge, by code and stage, whichever hop produced it."""
    ERRORS.labels(ORIGIN, err.code.value, (err.stage or Stage.CONNECT).value).inc()


def error_response(err: PromptlineError, request_id: str, *, status: int | None = None,
                   headers: dict[str, str] | None = None,
                   body: ErrorBody = native_error_body) -> web.Response:
    """An HTTP error: the table's status (or `status`), Retry-After, and `body(err)` as JSON."""
    err.request_id = err.request_id or request_id
    err.stage = err.stage or Stage.CONNECT
    err.origin = err.origin or ORIGIN
    count_error(err)
    all_headers = {**err.http_headers(), **(headers or {})}
    if request_id:
        all_headers["X-Request-Id"] = request_id
    return web.json_response(body(err), status=status or err.http_status, headers=all_headers)


def _code_for_http_status(status: int) -> ErrorCode:
    if status == 401:
        return ErrorCode.UNAUTHENTICATED
    if status == 403:
        return ErrorCode.PERMISSION_DENIED
    if status == 404:
        return ErrorCode.NOT_FOUND
    if status == 503:
        return ErrorCode.UNAVAILABLE
    if status == 504:
        return ErrorCode.DEADLINE_EXCEEDED
    return ErrorCode.INTERNAL if status >= 500 else ErrorCode.INVALID_REQUEST


def _http_exception_response(request: web.BaseRequest, exc: web.HTTPException,
                             request_id: str) -> web.Response:
    code = _code_for_http_status(exc.status)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"method {request.method} is not allowed here (allowed: {allowed})"
    elif exc.status == 404:
        message = "no such endpoint"
    elif isinstance(exc, web.HTTPExpectationFailed):
        message = "unsupported Expect header (only 100-continue is)"
    elif code is ErrorCode.INTERNAL:
        message = "internal error"
    else:
        message = exc.reason
    passthrough = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    err = PromptlineError(code, message, stage=Stage.CONNECT, origin=ORIGIN)
    return error_response(err, request_id, status=exc.status, headers=passthrough,
                          body=error_body_for(request.path))


def _request_id(request: web.BaseRequest) -> str:
    return request_id_from(request.headers.get("X-Request-Id"))


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing errors and unexpected exceptions as the JSON error shape, never HTML or a trace."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_exception_response(request, exc, _request_id(request))
    except Exception:
        rid = _request_id(request)
        log.exception("unhandled error", extra={"request_id": rid, "path": request.path})
        return error_response(internal_error(rid, Stage.CONNECT), rid,
                              body=error_body_for(request.path))


# --- below the application: what aiohttp's protocol answers itself ------------------------------

# What a client may be told about a request the parser rejected; never the bytes themselves.
_PARSER_MESSAGES = {
    "BadHttpMethod": "malformed HTTP request: invalid method",
    "BadStatusLine": "malformed HTTP request: invalid request line",
    "LineTooLong": "malformed HTTP request: request line or header too long",
    "InvalidHeader": "malformed HTTP request: invalid header",
    "InvalidURLError": "malformed HTTP request: invalid URL",
    "TransferEncodingError": "malformed HTTP request: invalid chunked body",
    "ContentLengthError": "malformed HTTP request: body shorter than its Content-Length",
}


def parser_error(exc: BaseException | None, status: int) -> PromptlineError:
    """The safe error for a request that never reached a handler."""
    if status == 504:
        return PromptlineError(ErrorCode.DEADLINE_EXCEEDED, "the request ran out of time",
                               stage=Stage.CONNECT, origin=ORIGIN)
    if status >= 500:
        return internal_error(stage=Stage.CONNECT)
    message = next((text for cls in type(exc).__mro__
                    if (text := _PARSER_MESSAGES.get(cls.__name__))),
                   "malformed HTTP request")
    if "too many headers" in str(exc).lower():
        message = "malformed HTTP request: too many headers"
    return PromptlineError(ErrorCode.INVALID_REQUEST, message, stage=Stage.CONNECT, origin=ORIGIN)


class _JsonErrorsProtocol(RequestHandler):
    """aiohttp's connection handler, answering its own errors in the JSON error shape."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request", exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp: a response is half-sent already
            raise ConnectionError("response already started, cannot send the error")
        err = parser_error(exc, status)
        rid = uuid.uuid4().hex  # the headers were not parsed: no X-Request-Id to trust
        response = error_response(err, rid, status=status, body=error_body_for(request.path))
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A broken request body was answered 400 already; aiohttp meets it again while it
        # discards the rest of the body: the client's fault, not an error of ours.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            self.log_debug(*args, **kw)
            return
        super().log_exception(*args, **kw)


class _JsonErrorsServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsProtocol(self, loop=self._loop, **self._kwargs)


def _refuse_unknown_expect(handle: ServerHandler) -> ServerHandler:
    """Answer an `Expect` other than 100-continue before the application sees it.

    aiohttp's own Expect handling runs outside the middlewares, answers text/plain, echoes the
    header, and fails with a 500 on a value that is not UTF-8.
    """

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            return _http_exception_response(request, web.HTTPExpectationFailed(),
                                            _request_id(request))
        return await handle(request)

    return handler


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections answer their own errors as JSON: parser rejections (see
    `_JsonErrorsProtocol`) and a refused `Expect`."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        return _JsonErrorsServer(_refuse_unknown_expect(server.request_handler),
                                 request_factory=server.request_factory,
                                 handler_cancellation=server.handler_cancellation,
                                 loop=server._loop, **server._kwargs)

"""Resuming and stopping a native SSE stream (docs/resume.md).

    GET  /v1/chat/stream/{request_id}          the stream again: its `start`, the deltas after
                                               `Last-Event-ID` (or `?last_event_id=`), the rest
    POST /v1/chat/stream/{request_id}/cancel   an explicit Stop -> {"request_id", "cancelled"}

Both call the prompt service (`PromptService.ResumeChat`, `CancelChat`) over the process's prompt
channel, so a stream started on one edge replica resumes or stops on any other. A resumed stream
is relayed by the same `StreamRelay` and `SseEncoder` as `POST /v1/chat/stream`: headers held
until its `start`, an error before that as a real HTTP status, heartbeats, and a client that goes
away cancels the ResumeChat call (never the stream it reads: that one has its own grace).

Once the path's id is valid, it is the request id of the answer (`X-Request-Id`, error bodies,
the `x-request-id` sent to the prompt service), so logs tie a resume to the stream it resumes.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from promptline.errors import PromptlineError, Stage
from promptline.rules import check_request_id, invalid
from promptline.v1 import prompt_pb2
from services.edge_http.context import STUB_KEY, Caller, authenticated
from services.edge_http.http_errors import error_response
from services.edge_http.relay import SseEncoder, StreamRelay

RESUME_PATH = "/v1/chat/stream/{request_id}"
CANCEL_PATH = "/v1/chat/stream/{request_id}/cancel"
LAST_EVENT_ID = "Last-Event-ID"
"""The standard SSE reconnection header: the last `id:` the client has."""
LAST_EVENT_ID_PARAM = "last_event_id"
"""The same as a query parameter, for clients that cannot set headers; the header wins."""
MAX_EVENT_ID = 2**32 - 1  # `ResumeChatRequest.after_id` is a uint32
CANCEL_TIMEOUT = 10.0  # seconds; a cancel is a Redis round trip or two on the prompt service


def add_routes(app: web.Application) -> None:
    """Register the resume and cancel endpoints on the edge application."""
    app.router.add_get(RESUME_PATH, resume_stream)
    app.router.add_post(CANCEL_PATH, cancel_stream)


def stream_id(request: web.Request) -> str:
    """The path's request id, under the rule every request id follows."""
    return check_request_id(request.match_info["request_id"])


def after_id(request: web.Request) -> int:
    """The last delta id the client has: the `Last-Event-ID` header, else `?last_event_id=`,
    else 0 (from the first delta). Anything but one integer 0..2^32-1 is INVALID_REQUEST."""
    headers = request.headers.getall(LAST_EVENT_ID, [])
    if headers:
        if len(headers) > 1:
            raise invalid(f"the {LAST_EVENT_ID} header is given more than once")
        return event_id(headers[0], f"the {LAST_EVENT_ID} header")
    params = request.query.getall(LAST_EVENT_ID_PARAM, [])
    if not params:
        return 0
    if len(params) > 1:
        raise invalid(f"query parameter {LAST_EVENT_ID_PARAM} is given more than once")
    return event_id(params[0], f"query parameter {LAST_EVENT_ID_PARAM}")


def event_id(raw: str, name: str) -> int:
    """An SSE delta id written in ASCII digits (`isdigit` alone admits '²'; a 10-digit cap keeps
    `int()` cheap), 0..2^32-1, or INVALID_REQUEST naming `name`."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 10 and int(raw) <= MAX_EVENT_ID:
        return int(raw)
    raise invalid(f"{name} must be a delta id, an integer from 0 to {MAX_EVENT_ID}, "
                  f"got {raw[:40]!r}")


def _metadata(caller: Caller, request_id: str) -> tuple[tuple[str, str], ...]:
    """The caller's `authorization`, and the stream's id as `x-request-id`."""
    return (*((k, v) for k, v in caller.metadata if k != "x-request-id"),
            ("x-request-id", request_id))


@authenticated
async def resume_stream(request: web.Request, caller: Caller) -> web.StreamResponse:
    """GET /v1/chat/stream/{request_id}: the stream's frames after `Last-Event-ID`, then its live
    rest, as the native SSE wire."""
    rid = stream_id(request)
    try:
        resume = prompt_pb2.ResumeChatRequest(request_id=rid, after_id=after_id(request))
    except PromptlineError as err:
        return error_response(err, rid)
    config = caller.config
    call = request.app[STUB_KEY].ResumeChat(resume, metadata=_metadata(caller, rid),
                                            timeout=config.edge.request_timeout)
    # The model is the start frame's: the relay learns it there.
    relay = StreamRelay(request, config, rid, model="", encoder=SseEncoder(rid, ""),
                        endpoint="chat_resume")
    return await relay.run(call, header_hold=config.edge.header_hold)


@authenticated
async def cancel_stream(request: web.Request, caller: Caller) -> web.StreamResponse:
    """POST /v1/chat/stream/{request_id}/cancel: stop the stream now, on whichever replica runs
    it; `cancelled` is false when it had already ended."""
    rid = stream_id(request)
    try:
        reply = await request.app[STUB_KEY].CancelChat(
            prompt_pb2.CancelChatRequest(request_id=rid), metadata=_metadata(caller, rid),
            timeout=CANCEL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return error_response(PromptlineError.from_rpc_error(exc, stage=Stage.CONNECT), rid)
    return web.json_response({"request_id": rid, "cancelled": reply.cancelled},
                             headers={"X-Request-Id": rid})

"""HTTP endpoints of the PromptAdmin gRPC service: prompts, conversations, usage, feedback.

    POST   /v1/prompts/{id}/versions           create a version (admin keys)        -> 201
    GET    /v1/prompts/{id}/versions           list versions, newest first (?limit=&before=)
    GET    /v1/prompts/{id}/versions/{n}       one version
    GET    /v1/prompts/{id}/labels/{label}     the version a label points at
    PUT    /v1/prompts/{id}/labels/{label}     move a label: {"version": n}    (admin keys)
    GET    /v1/conversations/{id}              the caller's conversation history
    DELETE /v1/conversations/{id}              delete it                           -> 204
    GET    /v1/usage?from=&to=&group_by=&tenant=   the tenant's usage (tenant=: admin keys)
    POST   /v1/feedback                        feedback on a request -> 201 (200: replaced one)
    GET    /v1/prompts/{id}/stats?from=&to=    per-version stats of a prompt

The edge authenticates the Bearer key first (401 without touching anything else), parses the
JSON body, then calls PromptAdmin over the process's prompt channel, forwarding `authorization`;
the prompt service checks admin rights, validates and owns the data. Errors are the usual
`{"error": {...}}` body with the table's HTTP status (`http_errors.error_response`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web

from promptline.errors import PromptlineError, Stage
from promptline.response_format import ResponseFormat
from promptline.rules import USAGE_GROUPS, invalid, is_model_name
from promptline.stubs import PromptAdminClient
from promptline.v1 import prompt_admin_pb2, prompt_admin_pb2_grpc
from services.edge_http.chat_request import (
    bool_field,
    decode_json_object,
    json_kind,
    number_field,
    read_request_body,
    response_format,
    string_field,
)
from services.edge_http.context import CHANNEL_KEY, Caller, authenticated, current_config

ADMIN_TIMEOUT = 10.0  # seconds; each call is a few Redis round trips
USAGE_PATH = "/v1/usage"
USAGE_PARAMS = ("from", "to", "group_by", "tenant")
FEEDBACK_PATH = "/v1/feedback"
STATS_PATH = "/v1/prompts/{prompt_id}/stats"
STATS_PARAMS = ("from", "to")
_UINT32_MAX = 2**32 - 1
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Register the prompt and conversation endpoints on the edge application."""
    app.router.add_post("/v1/prompts/{prompt_id}/versions", _admin(create_version))
    app.router.add_get("/v1/prompts/{prompt_id}/versions", _admin(list_versions))
    app.router.add_get("/v1/prompts/{prompt_id}/versions/{version}", _admin(get_version))
    app.router.add_get("/v1/prompts/{prompt_id}/labels/{label}", _admin(get_label))
    app.router.add_put("/v1/prompts/{prompt_id}/labels/{label}", _admin(set_label))
    app.router.add_get("/v1/conversations/{conversation_id}", _admin(get_conversation))
    app.router.add_delete("/v1/conversations/{conversation_id}", _admin(delete_conversation))
    app.router.add_get(USAGE_PATH, _admin(get_usage))
    app.router.add_post(FEEDBACK_PATH, _admin(submit_feedback))
    app.router.add_get(STATS_PATH, _admin(get_prompt_stats))


Call = Callable[[PromptAdminClient, web.Request, tuple[tuple[str, str], ...]],
                Awaitable[web.StreamResponse]]


def _admin(call: Call) -> Handler:
    """The authenticated preamble, then the PromptAdmin call; its gRPC failure is re-raised as
    the PromptlineError it carries (the preamble answers it)."""

    @authenticated
    async def handler(request: web.Request, caller: Caller) -> web.StreamResponse:
        stub: PromptAdminClient = prompt_admin_pb2_grpc.PromptAdminStub(request.app[CHANNEL_KEY])
        try:
            response = await call(stub, request, caller.metadata)
        except grpc.aio.AioRpcError as exc:
            raise PromptlineError.from_rpc_error(exc, stage=Stage.CONNECT) from None
        response.headers["X-Request-Id"] = caller.request_id
        return response

    handler.__name__ = call.__name__
    handler.__doc__ = call.__doc__
    return handler


# --- prompts -----------------------------------------------------------------------------------


async def create_version(stub: PromptAdminClient, request: web.Request,
                         metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """POST /v1/prompts/{id}/versions: {"template", "variables"?, "model"?, "parameters"?:
    {"max_tokens", "temperature"}, "message"?, "author"?, "response_format"?,
    "json_validate"?}."""
    data = await _json_body(request)
    parameters = _object(data.get("parameters", {}), "parameters")
    pb = prompt_admin_pb2.CreatePromptVersionRequest(
        prompt_id=request.match_info["prompt_id"],
        template=string_field(data.get("template"), "template", required=True),
        variables=_str_list(data.get("variables", []), "variables"),
        model=string_field(data.get("model", ""), "model", allow_empty=True),
        message=string_field(data.get("message", ""), "message", allow_empty=True),
        author=string_field(data.get("author", ""), "author", allow_empty=True),
    )
    for name in parameters:
        if name not in ("max_tokens", "temperature"):
            raise invalid(f"parameters.{name} is not supported (use max_tokens, temperature)")
    if parameters.get("max_tokens") is not None:
        pb.max_tokens = _uint(parameters["max_tokens"], "parameters.max_tokens")
    temperature = parameters.get("temperature")
    if temperature is not None:
        pb.temperature = number_field(temperature, "parameters.temperature")
    if data.get("response_format") is not None:
        pb.response_format.CopyFrom(response_format(data["response_format"]))
    if data.get("json_validate") is not None:
        pb.json_validate = bool_field(data["json_validate"], "json_validate")
    version = await stub.CreatePromptVersion(pb, metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(version_json(version), status=201)


async def list_versions(stub: PromptAdminClient, request: web.Request,
                        metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/versions?limit=50&before=N."""
    page = await stub.ListPromptVersions(prompt_admin_pb2.ListPromptVersionsRequest(
        prompt_id=request.match_info["prompt_id"],
        page_size=_query_uint(request, "limit"),
        before_version=_query_uint(request, "before"),
    ), metadata=metadata, timeout=ADMIN_TIMEOUT)
    body: dict[str, Any] = {
        "prompt_id": page.prompt_id,
        "latest_version": page.latest_version,
        "labels": dict(sorted(page.labels.items())),
        "versions": [version_json(v) for v in page.versions],
    }
    if page.next_before_version:
        body["next_before"] = page.next_before_version
    return web.json_response(body)


async def get_version(stub: PromptAdminClient, request: web.Request,
                      metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/versions/{n}."""
    raw = request.match_info["version"]
    number = _positive_uint32(raw)
    if number is None:
        raise invalid(f"version must be a version number (1 or more), got {raw!r}")
    version = await stub.GetPromptVersion(prompt_admin_pb2.GetPromptVersionRequest(
        prompt_id=request.match_info["prompt_id"], version=number),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(version_json(version))


async def get_label(stub: PromptAdminClient, request: web.Request,
                    metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/labels/{label}: the version the label points at."""
    version = await stub.GetPromptVersion(prompt_admin_pb2.GetPromptVersionRequest(
        prompt_id=request.match_info["prompt_id"], label=request.match_info["label"]),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(version_json(version))


async def set_label(stub: PromptAdminClient, request: web.Request,
                    metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """PUT /v1/prompts/{id}/labels/{label} with {"version": n}."""
    data = await _json_body(request)
    if data.get("version") is None:
        raise invalid("version is required")
    moved = await stub.SetPromptLabel(prompt_admin_pb2.SetPromptLabelRequest(
        prompt_id=request.match_info["prompt_id"], label=request.match_info["label"],
        version=_uint(data["version"], "version")), metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response({"prompt_id": moved.prompt_id, "label": moved.label,
                              "version": moved.version,
                              "previous_version": moved.previous_version or None})


def version_json(version: prompt_admin_pb2.PromptVersion) -> dict[str, Any]:
    """A prompt version as the HTTP API shows it."""
    parameters: dict[str, Any] = {}
    if version.HasField("max_tokens"):
        parameters["max_tokens"] = version.max_tokens
    if version.HasField("temperature"):
        parameters["temperature"] = round(version.temperature, 6)  # float32 on the wire
    return {
        "prompt_id": version.prompt_id,
        "version": version.version,
        "template": version.template,
        "variables": list(version.variables),
        "model": version.model or None,
        "parameters": parameters,
        "message": version.message,
        "author": version.author,
        "created_at_ms": version.created_at_ms,
        "labels": list(version.labels),
        # OpenAI's shape, as a chat request would send it
        "response_format": (ResponseFormat.trusted(version.response_format).to_openai()
                            if version.HasField("response_format") else None),
        "json_validate": version.json_validate,
    }


# --- conversations -----------------------------------------------------------------------------


async def get_conversation(stub: PromptAdminClient, request: web.Request,
                           metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/conversations/{id}: the caller's own history, oldest first."""
    conversation = await stub.GetConversation(prompt_admin_pb2.GetConversationRequest(
        conversation_id=request.match_info["conversation_id"]),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response({
        "conversation_id": conversation.conversation_id,
        "expires_in_ms": conversation.expires_in_ms,
        "messages": [{"role": t.role, "content": t.content, "partial": t.partial,
                      "created_at_ms": t.created_at_ms, "request_id": t.request_id}
                     for t in conversation.turns],
    })


async def delete_conversation(stub: PromptAdminClient, request: web.Request,
                              metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """DELETE /v1/conversations/{id}: 204 when deleted, 404 when there was none."""
    await stub.DeleteConversation(prompt_admin_pb2.DeleteConversationRequest(
        conversation_id=request.match_info["conversation_id"]),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.Response(status=204)


# --- usage -------------------------------------------------------------------------------------


async def get_usage(stub: PromptAdminClient, request: web.Request,
                    metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/usage?from=&to=&group_by=model|day|api_key|user&tenant=: requests, errors,
    tokens and cost of the caller's tenant (another's with `tenant`: admin keys), by hour-aligned
    UTC range; `from` defaults to the start of the day, `to` to now."""
    _check_query(request, USAGE_PARAMS)
    group_by = request.query.get("group_by", "model")
    if group_by not in USAGE_GROUPS:
        raise invalid(f"query parameter group_by must be one of {', '.join(USAGE_GROUPS)}, "
                      f"got {group_by[:40]!r}")
    tenant = request.query.get("tenant", "")
    if "tenant" in request.query and not is_model_name(tenant):
        raise invalid(f"query parameter tenant must be a tenant name, got {tenant[:40]!r}")
    report = await stub.GetUsage(prompt_admin_pb2.GetUsageRequest(
        from_ms=_query_time(request, "from"), to_ms=_query_time(request, "to"),
        group_by=group_by, tenant=tenant), metadata=metadata, timeout=ADMIN_TIMEOUT)
    empty_is_none = report.group_by == "user"  # requests that named no end user
    return web.json_response({
        "object": "usage",
        "tenant": report.tenant,
        "from": _iso(report.from_ms),
        "to": _iso(report.to_ms),
        "group_by": report.group_by,
        "data": [{"key": (row.key or None) if empty_is_none else row.key, **_usage_row(row)}
                 for row in report.rows],
        "total": _usage_row(report.total),
    })


def _check_query(request: web.Request, allowed: tuple[str, ...]) -> None:
    """INVALID_REQUEST naming an unknown or repeated query parameter."""
    for name in request.query:
        if name not in allowed:
            raise invalid(f"unknown query parameter {name[:40]!r} (allowed: "
                          f"{', '.join(allowed)})")
        if len(request.query.getall(name)) > 1:
            raise invalid(f"query parameter {name} given more than once")


def _usage_row(row: prompt_admin_pb2.UsageRow) -> dict[str, Any]:
    return {"requests": row.requests, "errors": row.errors, "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "cost_usd": row.cost_usd or "0"}


def _query_time(request: web.Request, name: str) -> int:
    """An ISO 8601 date (`2025-01-14`) or date-time (UTC unless it has an offset) as ms since
    the epoch; 0 when absent (the prompt service's default)."""
    raw = request.query.get(name)
    if raw is None:
        return 0
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid(f"query parameter {name} must be an ISO 8601 date or date-time "
                      f"(2025-01-14 or 2025-01-14T10:00:00Z), got {raw[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    millis = int(moment.timestamp() * 1000)
    if millis <= 0:
        raise invalid(f"query parameter {name} must be after 1970-01-01, got {raw[:40]!r}")
    return millis


def _iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- feedback and prompt stats ----------------------------------------------------------------


async def submit_feedback(stub: PromptAdminClient, request: web.Request,
                          metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """POST /v1/feedback: {"request_id", "score": 1 | -1 | 0..1, "comment"?}, on a request of
    the caller's tenant; 201, or 200 when it replaced an earlier feedback."""
    data = await _json_body(request)
    if data.get("score") is None:
        raise invalid("score is required")
    pb = prompt_admin_pb2.SubmitFeedbackRequest(
        request_id=string_field(data.get("request_id"), "request_id", required=True),
        score=number_field(data["score"], "score"))
    if data.get("comment") is not None:
        pb.comment = string_field(data["comment"], "comment", allow_empty=True)
    feedback = await stub.SubmitFeedback(pb, metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(feedback_json(feedback), status=200 if feedback.replaced else 201)


def feedback_json(feedback: prompt_admin_pb2.Feedback) -> dict[str, Any]:
    """Stored feedback and the request it is about, as the HTTP API shows them."""
    record = feedback.request
    return {
        "object": "feedback",
        "request_id": feedback.request_id,
        "score": int(feedback.score) if feedback.score.is_integer() else feedback.score,
        "comment": feedback.comment or None,
        "created_at_ms": feedback.created_at_ms,
        "replaced": feedback.replaced,
        "request": {
            "prompt_id": record.prompt_id or None,
            "prompt_version": record.prompt_version or None,
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "first_token_ms": (record.first_token_ms if record.HasField("first_token_ms")
                               else None),
            "duration_ms": record.duration_ms,
            "outcome": record.outcome,
            "ended_at_ms": record.ended_at_ms,
        },
    }


async def get_prompt_stats(stub: PromptAdminClient, request: web.Request,
                           metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/stats?from=&to=: per version, requests, errors by code, first-token
    p50/p95, tokens and feedback, over an hour-aligned UTC range (defaults as for usage)."""
    _check_query(request, STATS_PARAMS)
    stats = await stub.GetPromptStats(prompt_admin_pb2.GetPromptStatsRequest(
        prompt_id=request.match_info["prompt_id"], from_ms=_query_time(request, "from"),
        to_ms=_query_time(request, "to")), metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response({
        "object": "prompt_stats",
        "prompt_id": stats.prompt_id,
        "from": _iso(stats.from_ms),
        "to": _iso(stats.to_ms),
        "versions": [{
            "version": v.version,
            "requests": v.requests,
            "errors": v.errors,
            "errors_by_code": dict(sorted(v.errors_by_code.items())),
            "cancelled": v.cancelled,
            "prompt_tokens": v.prompt_tokens,
            "completion_tokens": v.completion_tokens,
            "first_token_p50_ms": (v.first_token_p50_ms if v.HasField("first_token_p50_ms")
                                   else None),
            "first_token_p95_ms": (v.first_token_p95_ms if v.HasField("first_token_p95_ms")
                                   else None),
            "feedback_count": v.feedback_count,
            "feedback_mean": v.feedback_mean if v.HasField("feedback_mean") else None,
        } for v in stats.versions],
    })


# --- body and query readers (INVALID_REQUEST naming the field) ---------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    limit = current_config(request.app).edge.max_body_bytes
    return decode_json_object(await read_request_body(request, limit))


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{path} must be an object, got {json_kind(value)}")
    return value


def _str_list(value: Any, path: str) -> list[str]:
    if not isinstance(value, list):
        raise invalid(f"{path} must be a list of strings, got {json_kind(value)}")
    return [string_field(item, f"{path}[{i}]", allow_empty=True) for i, item in enumerate(value)]


def _uint(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{path} must be an integer, got {json_kind(value)}")
    if not 1 <= value <= _UINT32_MAX:
        raise invalid(f"{path} must be between 1 and {_UINT32_MAX}, got {value}")
    return value


def _query_uint(request: web.Request, name: str) -> int:
    raw = request.query.get(name)
    if raw is None:
        return 0
    value = _positive_uint32(raw)
    if value is None:
        raise invalid(f"query parameter {name} must be a positive integer, got {raw!r}")
    return value


def _positive_uint32(raw: str) -> int | None:
    """1..2^32-1 written in ASCII digits, else None. `isdigit()` alone admits '²' and other
    digits `int()` rejects, and `int()` of 4,301 digits raises: both were a 500."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
        return None
    value = int(raw)
    return value if 1 <= value <= _UINT32_MAX else None

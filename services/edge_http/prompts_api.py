"""HTTP endpoints of the PromptAdmin gRPC service: prompts, conversations, usage, feedback.

    POST   /v1/prompts/{id}/versions           create a version (admin keys)        -> 201
    GET    /v1/prompts/{id}/versions           list versions, newest first (?limit=&before=)
    GET    /v1/prompts/{id}/versions/{n}       one version
    GET    /v1/prompts/{id}/labels/{label}     the version a label points at
    PUT    /v1/prompts/{id}/labels/{label}     move a label: {"version": n} or {"split":
                                               {"3": 90, "4": 10}}, "require_eval"? (admin keys)
    POST   /v1/prompts/{id}/labels/{label}/rollback   restore its previous state (admin keys)
    POST   /v1/prompts/{id}/versions/{n}/evals store an eval run's summary (admin keys) -> 201
    GET    /v1/prompts/{id}/versions/{n}/evals a version's eval runs, newest first
    GET    /v1/prompts/{id}/policy             what a label move needs
    PUT    /v1/prompts/{id}/policy             {"require_eval", "min_pass_rate"?} (admin keys)
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

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web

from promptline.errors import PromptlineError, Stage
from promptline.response_format import ResponseFormat
from promptline.rules import USAGE_GROUPS, invalid, is_model_name, json_kind
from promptline.stubs import PromptAdminClient
from promptline.v1 import prompt_admin_pb2, prompt_admin_pb2_grpc
from services.edge_http.chat_request import (
    bool_field,
    decode_json_object,
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
ROLLBACK_PATH = "/v1/prompts/{prompt_id}/labels/{label}/rollback"
EVALS_PATH = "/v1/prompts/{prompt_id}/versions/{version}/evals"
POLICY_PATH = "/v1/prompts/{prompt_id}/policy"
EVAL_FIELDS = ("cases", "passed", "against_label", "against_version", "regressions",
               "first_token_p50_ms", "total_p50_ms", "prompt_tokens", "completion_tokens",
               "cost_usd", "judge_model", "cases_sha256", "author")
_UINT32_MAX = 2**32 - 1
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Register the prompt and conversation endpoints on the edge application."""
    app.router.add_post("/v1/prompts/{prompt_id}/versions", _admin(create_version))
    app.router.add_get("/v1/prompts/{prompt_id}/versions", _admin(list_versions))
    app.router.add_get("/v1/prompts/{prompt_id}/versions/{version}", _admin(get_version))
    app.router.add_get("/v1/prompts/{prompt_id}/labels/{label}", _admin(get_label))
    app.router.add_put("/v1/prompts/{prompt_id}/labels/{label}", _admin(set_label))
    app.router.add_post(ROLLBACK_PATH, _admin(rollback_label))
    app.router.add_post(EVALS_PATH, _admin(create_eval_run))
    app.router.add_get(EVALS_PATH, _admin(list_eval_runs))
    app.router.add_get(POLICY_PATH, _admin(get_policy))
    app.router.add_put(POLICY_PATH, _admin(set_policy))
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
    if page.splits:
        body["splits"] = {label: _split_json(split.weights)
                          for label, split in sorted(page.splits.items())}
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
    """PUT /v1/prompts/{id}/labels/{label} with {"version": n} or {"split": {"3": 90, "4": 10}}
    (weights adding up to 100), and "require_eval"?: true."""
    data = await _json_body(request)
    for name in data:
        if name not in ("version", "split", "require_eval"):
            raise invalid(f"{name[:40]} is not a field of a label move (use version or split, "
                          "and require_eval)")
    pb = prompt_admin_pb2.SetPromptLabelRequest(
        prompt_id=request.match_info["prompt_id"], label=request.match_info["label"])
    if (data.get("version") is None) == (data.get("split") is None):
        raise invalid("give either version or split")
    if data.get("version") is not None:
        pb.version = _uint(data["version"], "version")
    else:
        split = _object(data["split"], "split")
        for key, weight in split.items():
            version = _positive_uint32(key)
            if version is None:
                raise invalid(f"split keys must be version numbers (1 or more), got {key[:40]!r}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise invalid(f"split.{key} must be a positive integer weight, got "
                              f"{json_kind(weight) if not isinstance(weight, int) else weight}")
            pb.split[version] = min(weight, _UINT32_MAX)  # the prompt service says what is wrong
        if not pb.split:
            raise invalid("split must name at least one version")
    if data.get("require_eval") is not None:
        pb.require_eval = bool_field(data["require_eval"], "require_eval")
    moved = await stub.SetPromptLabel(pb, metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(_label_move(moved))


async def rollback_label(stub: PromptAdminClient, request: web.Request,
                         metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """POST /v1/prompts/{id}/labels/{label}/rollback: the label's state before its last move."""
    moved = await stub.SetPromptLabel(prompt_admin_pb2.SetPromptLabelRequest(
        prompt_id=request.match_info["prompt_id"], label=request.match_info["label"],
        rollback=True), metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(_label_move(moved))


def _label_move(moved: prompt_admin_pb2.SetPromptLabelResponse) -> dict[str, Any]:
    return {"prompt_id": moved.prompt_id, "label": moved.label,
            "version": moved.version or None, "split": _split_json(moved.split),
            "previous_version": moved.previous_version or None,
            "previous_split": _split_json(moved.previous_split) or None}


def _split_json(split: Mapping[int, int]) -> dict[str, int]:
    return {str(v): w for v, w in sorted(split.items())}


# --- eval runs and policy ----------------------------------------------------------------------


async def create_eval_run(stub: PromptAdminClient, request: web.Request,
                          metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """POST /v1/prompts/{id}/versions/{n}/evals: an eval run's summary (`EVAL_FIELDS`)."""
    data = await _json_body(request)
    run = prompt_admin_pb2.EvalRun()
    for name, value in data.items():
        if name not in EVAL_FIELDS:
            raise invalid(f"{name[:40]} is not a field of an eval run (use "
                          f"{', '.join(EVAL_FIELDS)})")
        if value is None:
            continue
        if name in ("against_label", "cost_usd", "judge_model", "cases_sha256", "author"):
            setattr(run, name, string_field(value, name, allow_empty=True))
        elif name in ("prompt_tokens", "completion_tokens", "first_token_p50_ms",
                      "total_p50_ms"):
            setattr(run, name, _count(value, name, 2**53))
        else:
            setattr(run, name, _count(value, name, _UINT32_MAX))
    if "cases" not in data or "passed" not in data:
        raise invalid("cases and passed are required")
    stored = await stub.CreateEvalRun(prompt_admin_pb2.CreateEvalRunRequest(
        prompt_id=request.match_info["prompt_id"], version=_path_version(request), run=run),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(eval_json(stored), status=201)


async def list_eval_runs(stub: PromptAdminClient, request: web.Request,
                         metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/versions/{n}/evals: the version's runs, newest first."""
    runs = await stub.ListEvalRuns(prompt_admin_pb2.ListEvalRunsRequest(
        prompt_id=request.match_info["prompt_id"], version=_path_version(request)),
        metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response({"object": "list", "prompt_id": runs.prompt_id,
                              "version": runs.version,
                              "data": [eval_json(r) for r in runs.runs]})


def eval_json(run: prompt_admin_pb2.EvalRun) -> dict[str, Any]:
    """An eval run as the HTTP API shows it."""
    return {
        "object": "eval_run", "eval_id": run.eval_id, "prompt_id": run.prompt_id,
        "version": run.version, "created_at_ms": run.created_at_ms, "cases": run.cases,
        "passed": run.passed, "pass_rate": run.pass_rate,
        "against_label": run.against_label or None,
        "against_version": run.against_version or None, "regressions": run.regressions,
        "first_token_p50_ms": (run.first_token_p50_ms if run.HasField("first_token_p50_ms")
                               else None),
        "total_p50_ms": run.total_p50_ms if run.HasField("total_p50_ms") else None,
        "prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
        "cost_usd": run.cost_usd or None, "judge_model": run.judge_model or None,
        "cases_sha256": run.cases_sha256 or None, "author": run.author,
    }


async def get_policy(stub: PromptAdminClient, request: web.Request,
                     metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """GET /v1/prompts/{id}/policy."""
    policy = await stub.GetPromptPolicy(prompt_admin_pb2.GetPromptPolicyRequest(
        prompt_id=request.match_info["prompt_id"]), metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(_policy_json(policy))


async def set_policy(stub: PromptAdminClient, request: web.Request,
                     metadata: tuple[tuple[str, str], ...]) -> web.Response:
    """PUT /v1/prompts/{id}/policy: {"require_eval": bool, "min_pass_rate"?: 0..1 (default 1)}."""
    data = await _json_body(request)
    for name in data:
        if name not in ("require_eval", "min_pass_rate"):
            raise invalid(f"{name[:40]} is not a field of a policy (use require_eval, "
                          "min_pass_rate)")
    if data.get("require_eval") is None:
        raise invalid("require_eval is required")
    pb = prompt_admin_pb2.PromptPolicy(
        prompt_id=request.match_info["prompt_id"],
        require_eval=bool_field(data["require_eval"], "require_eval"))
    if data.get("min_pass_rate") is not None:
        pb.min_pass_rate = number_field(data["min_pass_rate"], "min_pass_rate")
    policy = await stub.SetPromptPolicy(pb, metadata=metadata, timeout=ADMIN_TIMEOUT)
    return web.json_response(_policy_json(policy))


def _policy_json(policy: prompt_admin_pb2.PromptPolicy) -> dict[str, Any]:
    return {"object": "prompt_policy", "prompt_id": policy.prompt_id,
            "require_eval": policy.require_eval, "min_pass_rate": policy.min_pass_rate}


def _path_version(request: web.Request) -> int:
    raw = request.match_info["version"]
    number = _positive_uint32(raw)
    if number is None:
        raise invalid(f"version must be a version number (1 or more), got {raw[:40]!r}")
    return number


def _count(value: Any, path: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{path} must be an integer, got {json_kind(value)}")
    if not 0 <= value <= most:
        raise invalid(f"{path} must be between 0 and {most}, got {value}")
    return value


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
        # read by a label that splits: its weights (this version is its heaviest)
        "split": _split_json(version.split) or None,
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


LAST_YEAR = 9999
"""Times from this year on are refused: their answer's hour could fall past the calendar."""


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
    if millis <= 0 or moment.year >= LAST_YEAR:  # the answer rounds up to the hour after
        raise invalid(f"query parameter {name} must be after 1970-01-01 and before "
                      f"{LAST_YEAR}-01-01, got {raw[:40]!r}")
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

"""The edge's HTTP API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Built once at start-up, from the owners of each fact rather than copies of them: the error codes
and their HTTP statuses from `promptline.errors` (`ErrorCode`, `WIRE`), ids, roles and ranges from
`promptline.rules`, limits from the config's defaults (`EdgeConfig`, `PromptsConfig`), accepted
encodings from `chat_request`. The few rules only the prompt service holds (the edge never
imports another service) are repeated once below, each naming its owner; tests/test_openapi.py
fails when one drifts.

Request schemas say what the chain really accepts, so a fuzzer can be driven from them: `null`
where the edge takes it as "absent", `additionalProperties: false` only where unknown fields are
rejected (prompt `parameters`; everywhere else they are ignored). Response objects leave extra
properties open, since a new field is not a breaking change; the tests close them to catch an
undocumented one. Server-Sent Events follow the usual 3.1 convention: the `text/event-stream`
schema describes one event (`event`, `id`, `data`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from promptline.config import EdgeConfig, PromptsConfig
from promptline.errors import WIRE, ErrorCode, Stage
from promptline.response_format import (
    MAX_DESCRIPTION_CHARS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    SCHEMA_NAME,
)
from promptline.rules import (
    BOUNDARIES,
    MAX_COALESCE_MS,
    MAX_MIN_CHARS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    MODEL_NAME,
    ROLES,
    SAFE_ID,
    USAGE_GROUPS,
    USER_ID,
)
from services.edge_http import sse
from services.edge_http.chat_request import DECODED_ENCODINGS
from services.edge_http.http_errors import CHAT_COMPLETIONS_PATH, MODELS_PATH
from services.edge_http.openai_api import ROLE_ALIASES
from services.edge_http.prompts_api import (
    EVALS_PATH,
    FEEDBACK_PATH,
    POLICY_PATH,
    ROLLBACK_PATH,
    STATS_PATH,
    USAGE_PATH,
)
from services.edge_http.resume_api import (
    CANCEL_PATH,
    LAST_EVENT_ID,
    LAST_EVENT_ID_PARAM,
    MAX_EVENT_ID,
    RESUME_PATH,
)

OPENAPI_PATH = "/openapi.json"
CACHE_CONTROL = "public, max-age=300"  # a new release may change it: revalidate within minutes

Schema = dict[str, Any]

# --- rules the prompt service owns (not importable here; pinned by tests/test_openapi.py) ------

PROMPT_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # services/prompt/prompts.py PROMPT_ID
LABEL = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # services/prompt/prompts.py LABEL
MAX_MESSAGE_CHARS = 1000  # services/prompt/prompts.py
MAX_AUTHOR_CHARS = 200  # services/prompt/prompts.py
DEFAULT_PAGE_SIZE = 50  # services/prompt/prompts.py
MAX_PAGE_SIZE = 200  # services/prompt/prompts.py
MAX_SPLIT = 10  # services/prompt/prompts.py
VARIABLE_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"  # services/prompt/templates.py NAME
MAX_VARIABLES = 64  # services/prompt/templates.py
MAX_MESSAGES = 1000  # services/prompt/chat_plan.py
MAX_COMMENT_CHARS = 2000  # services/prompt/feedback.py

UINT32_MAX = 2**32 - 1  # what the protobuf fields behind versions and counts can carry

# --- which errors each kind of operation can answer -------------------------------------------

# A chat runs the whole chain, so any code; CANCELLED reaches a caller still waiting when a hop
# cancels its call (a hop shutting down), as nginx's 499.
CHAT_CODES = tuple(ErrorCode)
MODELS_CODES = (ErrorCode.UNAUTHENTICATED, ErrorCode.INTERNAL)
ADMIN_READ_CODES = (ErrorCode.UNAUTHENTICATED, ErrorCode.INVALID_REQUEST, ErrorCode.NOT_FOUND,
                    ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.CANCELLED,
                    ErrorCode.INTERNAL)
ADMIN_WRITE_CODES = (*ADMIN_READ_CODES, ErrorCode.PERMISSION_DENIED)
USAGE_CODES = ADMIN_WRITE_CODES  # PERMISSION_DENIED: `tenant` from a key of a non-admin tenant
# A resumed stream replays its own end, so any code; one that failed before its `start` is a
# status here too.
RESUME_CODES = CHAT_CODES
CANCEL_CODES = ADMIN_READ_CODES
FEEDBACK_CODES = ADMIN_READ_CODES


# --- schema helpers -----------------------------------------------------------------------------


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def obj(properties: dict[str, Schema], *required: str, **extra: Any) -> Schema:
    """An object schema; `required` names the properties that must be present."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {**schema, **extra}


def nullable(schema: Schema) -> Schema:
    """`schema` or null: the edge takes an explicit null as "absent"."""
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def anchored(pattern: str) -> str:
    """A full-match regex as JSON Schema wants it (its `pattern` is a search)."""
    return f"^(?:{pattern})$"


def integer(minimum: int, maximum: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum, **extra}
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def json_content(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


# --- components ---------------------------------------------------------------------------------

_EDGE = EdgeConfig()  # the defaults; an operator may change them, and the texts say which key
_SAFE_ID = string(pattern=anchored(SAFE_ID.pattern))
_OPENAI_TYPES = sorted({wire.openai_type for wire in WIRE.values()})
_TEMPERATURE = {"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE}
_MAX_TOKENS = integer(1, MAX_TOKENS)
_TOKENS = integer(0)
_USD = string(pattern=r"^(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$", examples=["0.0000036"],
              description="US dollars as an exact decimal string (a JSON number would be a "
                          "binary float): no exponent, no trailing zeros (docs/costs.md).")
_USER = {**string(pattern=anchored(USER_ID.pattern)), "description": (
    "The end user the request is for: counted in usage by user and held to the tenant's "
    "`user_budget` (docs/costs.md).")}
_DEPLOYMENT = string(description="The deployment of the model's pool that answered "
                                 "(docs/provider-pools.md).")
_SPLIT: Schema = {"type": "object", "propertyNames": {"pattern": "^[1-9][0-9]{0,9}$"},
                  "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 100},
                  "maxProperties": MAX_SPLIT,
                  "description": "Weights by version number, adding up to 100."}
_CACHED = {"type": "boolean", "const": True, "description": (
    "Present (true) only when the reply was replayed from the response cache (docs/cache.md): "
    "no provider call; `usage` is the stored reply's.")}
_FORMAT_FIELDS: dict[str, Schema] = {
    "response_format": nullable(ref("ResponseFormat")),
    "json_validate": nullable({"type": "boolean", "description": (
        "A Promptline extension: check the finished reply against `response_format`; a "
        "mismatch ends the stream with UPSTREAM_ERROR (docs/json-mode.md). True needs a JSON "
        "format.")}),
}
_SHAPE_FIELDS: dict[str, Schema] = {
    "coalesce_ms": nullable(integer(0, MAX_COALESCE_MS)),
    "min_chars": nullable(integer(0, MAX_MIN_CHARS)),
    "boundary": nullable(string(enum=list(BOUNDARIES))),
}


def _error_fields() -> dict[str, Schema]:
    """The error object's fields, shared by the native and the OpenAI shape."""
    return {
        "stage": ref("Stage"),
        "message": string(description="Safe to show a user; never holds secrets."),
        "retryable": {"type": "boolean", "description": "Whether the same request may succeed "
                                                        "later."},
        "retry_after_ms": integer(1, description="Present when the wait is known (quota windows,"
                                                 " a provider's 429)."),
        "request_id": {**_SAFE_ID, "description": "The id in logs and traces (`X-Request-Id`)."},
    }


def _error_schemas() -> dict[str, Schema]:
    statuses = ", ".join(f"{code} {wire.http_status}" for code, wire in WIRE.items())
    return {
        "ErrorCode": string(enum=[c.value for c in ErrorCode], description=(
            f"Stable error code. HTTP status when it comes before the stream: {statuses}.")),
        "Stage": string(enum=[s.value for s in Stage], description=(
            "`connect`: before any model work; `first_packet`: admission or the first frame; "
            "`mid_stream`: after tokens flowed.")),
        "Error": obj({"code": ref("ErrorCode"), **_error_fields()},
                     "code", "stage", "message", "retryable", "request_id"),
        "ErrorBody": obj({"error": ref("Error")}, "error",
                         description="Every native error: an HTTP error body, an SSE `error` "
                                     "event's data."),
        "OpenAIError": obj({
            "message": string(),
            "type": string(enum=_OPENAI_TYPES),
            "code": string(enum=[c.value.lower() for c in ErrorCode],
                           description="The Promptline code, lower case."),
            "param": {"type": "null"},
            **{k: v for k, v in _error_fields().items() if k != "message"},
        }, "message", "type", "code", "param", "stage", "retryable", "request_id"),
        "OpenAIErrorBody": obj({"error": ref("OpenAIError")}, "error",
                               description="OpenAI's error shape, with Promptline's fields."),
    }


def _request_schemas() -> dict[str, Schema]:
    model_or_prompt = [{"required": ["model"], "properties": {"model": string()}},
                       {"required": ["prompt"], "properties": {"prompt": {"type": "object"}}}]
    return {
        "ChatMessage": obj({"role": string(enum=list(ROLES)), "content": string()},
                           "role", "content"),
        "PromptRef": obj({
            "id": string(pattern=anchored(PROMPT_ID)),
            "version": nullable(integer(1, UINT32_MAX)),
            "label": nullable(string(pattern=anchored(LABEL))),
            "variables": nullable({"type": "object", "propertyNames": {"minLength": 1},
                                   "additionalProperties": string()}),
        }, "id",
            # A null counts as absent, so only two non-null values conflict.
            **{"not": {"required": ["version", "label"],
                       "properties": {"version": {"type": "integer"},
                                      "label": {"type": "string"}}}},
            description="A managed prompt: `version` or `label` (neither: the latest)."),
        "ChatStreamRequest": obj({
            "model": nullable(string(minLength=1, examples=["sim"])),
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                         "items": ref("ChatMessage")},
            "max_tokens": nullable(_MAX_TOKENS),
            "temperature": nullable(_TEMPERATURE),
            "conversation_id": nullable(_SAFE_ID),
            "prompt": nullable(ref("PromptRef")),
            "stream_options": nullable(ref("StreamShape")),
            "user": nullable(_USER),
            **_FORMAT_FIELDS,
        }, "messages", anyOf=model_or_prompt,
            description="`model` is required unless `prompt` names a version with a default "
                        "model. Unknown fields are ignored."),
        "StreamShape": obj(_SHAPE_FIELDS, description=(
            "Chunk shaping of the reply, overriding the model's `stream` config field by field: "
            "the first text is never held; after it, text is held at most `coalesce_ms` (0: "
            "off), sent earlier once `min_chars` are held, cut after the last `boundary`; the "
            "terminal frame flushes what is held.")),
        "TextPart": obj({"type": string(const="text"), "text": string()}, "type", "text"),
        "OpenAIMessage": obj({
            "role": string(enum=[*ROLES, *ROLE_ALIASES]),
            "content": {"anyOf": [string(), {"type": "array", "items": ref("TextPart")}]},
            "tool_calls": {"enum": [None, False, 0, "", [], {}],
                           "description": "Tool calling is not supported: only an empty value."},
        }, "role", "content", description="`developer` counts as `system`."),
        "ChatCompletionRequest": obj({
            "model": string(minLength=1, examples=["sim"]),
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                         "items": ref("OpenAIMessage")},
            "max_completion_tokens": nullable(_MAX_TOKENS),
            "max_tokens": nullable({**_MAX_TOKENS, "description": "If both are given, they must "
                                                                  "be equal."}),
            "temperature": nullable(_TEMPERATURE),
            "stream": nullable({"type": "boolean"}),
            "stream_options": nullable(obj({
                "include_usage": nullable({"type": "boolean"}),
                **_SHAPE_FIELDS,
            }, description="`include_usage` is OpenAI's; the chunk-shaping fields are a "
                           "Promptline extension (`StreamShape`).")),
            "n": nullable(integer(1, 1)),
            "conversation_id": nullable({**_SAFE_ID, "description": "A Promptline extension."}),
            "user": nullable(_USER),
            **_FORMAT_FIELDS,
        }, "model", "messages",
            **{"if": {"required": ["stream_options"],
                      "properties": {"stream_options": {"type": "object"}}},
               "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}},
            description="OpenAI's chat-completions body. `stream_options` only with `stream: "
                        "true`; other fields (`top_p`, ...) are ignored."),
        "CreatePromptVersionRequest": obj({
            "template": string(pattern=r"\S", description=(
                f"`{{{{name}}}}` placeholders only; at most `prompts.max_template_bytes` "
                f"(default {PromptsConfig().max_template_bytes}) bytes of UTF-8.")),
            "variables": {"type": "array", "maxItems": MAX_VARIABLES, "uniqueItems": True,
                          "items": string(pattern=anchored(VARIABLE_NAME)),
                          "description": "Must match the placeholders; empty: the template's."},
            "model": string(pattern=f"^(?:{MODEL_NAME})?$", description="Default model."),
            "parameters": obj({"max_tokens": nullable(_MAX_TOKENS),
                               "temperature": nullable(_TEMPERATURE)},
                              additionalProperties=False),
            "message": string(maxLength=MAX_MESSAGE_CHARS, description="Commit message."),
            "author": string(maxLength=MAX_AUTHOR_CHARS, description="Default: the tenant."),
            **_FORMAT_FIELDS,
        }, "template"),
        "SetPromptLabelRequest": {**obj({
            "version": integer(1, UINT32_MAX, description="One version (a split of 100)."),
            "split": {**_SPLIT, "minProperties": 1, "description": (
                "Weights by version number: positive integers adding up to 100; a "
                "conversation (else an end user, else a request) keeps its version.")},
            "require_eval": {"type": "boolean", "description": (
                "Refuse unless each version new to the label has a passing eval run.")},
        }, additionalProperties=False), "oneOf": [{"required": ["version"]},
                                                   {"required": ["split"]}]},
        "EvalRunRequest": obj({
            "cases": integer(1, 1_000_000), "passed": integer(0, 1_000_000),
            "against_label": nullable(string(pattern=anchored(LABEL))),
            "against_version": nullable(integer(0, UINT32_MAX)),
            "regressions": integer(0, 1_000_000),
            "first_token_p50_ms": nullable(integer(0, 2**53)),
            "total_p50_ms": nullable(integer(0, 2**53)),
            "prompt_tokens": integer(0, 2**53), "completion_tokens": integer(0, 2**53),
            "cost_usd": nullable(string(pattern="^[0-9]{1,12}([.][0-9]{1,12})?$")),
            "judge_model": nullable(string()),
            "cases_sha256": nullable(string(pattern="^[0-9a-f]{64}$")),
            "author": nullable(string(maxLength=MAX_AUTHOR_CHARS)),
        }, "cases", "passed", additionalProperties=False,
            description="`passed` and `regressions` at most `cases`."),
        "PromptPolicyRequest": obj({
            "require_eval": {"type": "boolean"},
            "min_pass_rate": {"type": "number", "minimum": 0, "maximum": 1,
                              "description": "Default 1: every case."},
        }, "require_eval", additionalProperties=False),
        "ResponseFormat": {"oneOf": [
            obj({"type": string(enum=["text", "json_object"])}, "type"),
            obj({"type": string(const="json_schema"), "json_schema": obj({
                "name": string(pattern=anchored(SCHEMA_NAME.pattern)),
                "description": nullable(string(maxLength=MAX_DESCRIPTION_CHARS)),
                "schema": {"type": "object", "description": (
                    f"A JSON Schema (draft 2020-12): at most {MAX_SCHEMA_BYTES} bytes of JSON, "
                    f"nested at most {MAX_SCHEMA_DEPTH} deep, `$ref`s inside it only.")},
                "strict": nullable({"type": "boolean"}),
            }, "name", "schema")}, "type", "json_schema"),
        ], "description": "OpenAI's `response_format` (docs/json-mode.md): `text` (the "
                          "default), `json_object` or `json_schema`."},
        "FeedbackRequest": obj({
            "request_id": {**_SAFE_ID, "description": "The request's id (its `start`'s "
                                                      "`request_id`, `X-Request-Id`)."},
            "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1},
                                {"type": "number", "const": -1}],
                      "description": "1 (thumbs up), -1 (thumbs down) or a number from 0 to "
                                     "1, kept to three decimals."},
            "comment": nullable(string(maxLength=MAX_COMMENT_CHARS)),
        }, "request_id", "score", description="Unknown fields are ignored."),
    }


def _response_schemas() -> dict[str, Schema]:
    sse_id = string(pattern="^[1-9][0-9]*$", description=(
        "The delta's id in its stream, from 1 (merged deltas: the last one's): the "
        "`Last-Event-ID` to resume after (docs/resume.md)."))
    events = {"start": "StartEvent", "delta": "DeltaEvent", "done": "DoneEvent",
              "error": "ErrorEvent"}
    totals = {"requests": _TOKENS, "errors": _TOKENS, "prompt_tokens": _TOKENS,
              "completion_tokens": _TOKENS, "cost_usd": _USD}
    counted = "`requests`: streams admitted; `errors`: those that ended with an error."
    return {
        "Usage": obj({"prompt_tokens": _TOKENS, "completion_tokens": _TOKENS,
                      "total_tokens": _TOKENS,
                      "cost_usd": {**_USD, "description": "What the stream cost at the model's "
                                                          "price; " + _USD["description"]}},
                     "prompt_tokens", "completion_tokens", "total_tokens"),
        "UsageTotals": obj(totals, *totals, description=counted),
        "UsageRow": obj({"key": nullable(string(description=(
            "A model, a UTC day (YYYY-MM-DD), an API key's id (`key-` and 12 hex digits of its "
            "sha256) or an end user; null: requests that named no user."))), **totals},
            "key", *totals, description=counted),
        "UsageReport": obj({
            "object": string(const="usage"),
            "tenant": string(),
            "from": string(format="date-time", description="Hour-aligned, inclusive."),
            "to": string(format="date-time", description="Hour-aligned, exclusive."),
            "group_by": string(enum=list(USAGE_GROUPS)),
            "data": {"type": "array", "items": ref("UsageRow"),
                     "description": "One row per group, sorted by key."},
            "total": ref("UsageTotals"),
        }, "object", "tenant", "from", "to", "group_by", "data", "total"),
        "StartData": obj({"request_id": _SAFE_ID, "model": string(),
                          "conversation_id": _SAFE_ID, "prompt_id": string(),
                          "prompt_version": integer(1), "prompt_tokens": integer(1),
                          "deployment": _DEPLOYMENT},
                         "request_id", "model"),
        "DeltaData": obj({"text": string()}, "text"),
        "DoneData": obj({"finish_reason": string(examples=["stop", "length"]),
                         "usage": ref("Usage"),
                         "model": string(description="The model that answered (a fallback's "
                                                     "name if one did)."),
                         "deployment": _DEPLOYMENT, "cached": _CACHED,
                         "prompt_id": string(),
                         "prompt_version": integer(1, description=(
                             "The version that answered (a split label's pick)."))},
                        "finish_reason", "usage"),
        "StartEvent": obj({"event": string(const="start"), "data": ref("StartData")},
                          "event", "data", description="Once, first: the request was admitted."),
        "DeltaEvent": obj({"event": string(const="delta"), "id": sse_id,
                           "data": ref("DeltaData")}, "event", "id", "data",
                          description="Text; deltas that queued up leave as one."),
        "DoneEvent": obj({"event": string(const="done"), "data": ref("DoneData")},
                         "event", "data", description="Terminal: the reply is complete."),
        "ErrorEvent": obj({"event": string(const="error"), "data": ref("ErrorBody")},
                          "event", "data", description="Terminal, instead of `done`."),
        "ChatStreamEvent": {
            "oneOf": [ref(name) for name in events.values()],
            "discriminator": {"propertyName": "event",
                              "mapping": {k: ref(v)["$ref"] for k, v in events.items()}},
        },
        "ChatCompletion": obj({
            "id": string(pattern="^chatcmpl-"),
            "object": string(const="chat.completion"),
            "created": integer(0),
            "model": string(),
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": obj({
                "index": integer(0, 0),
                "message": obj({"role": string(const="assistant"), "content": string()},
                               "role", "content"),
                "logprobs": {"type": "null"},
                "finish_reason": string(),
            }, "index", "message", "logprobs", "finish_reason")},
            "usage": ref("Usage"),
            "cached": _CACHED,
        }, "id", "object", "created", "model", "choices", "usage"),
        "ChatCompletionChunk": obj({
            "id": string(pattern="^chatcmpl-"),
            "object": string(const="chat.completion.chunk"),
            "created": integer(0),
            "model": string(),
            "choices": {"type": "array", "maxItems": 1, "items": obj({
                "index": integer(0, 0),
                "delta": obj({"role": string(const="assistant"), "content": string()}),
                "logprobs": {"type": "null"},
                "finish_reason": nullable(string()),
            }, "index", "delta", "logprobs", "finish_reason")},
            "usage": nullable(ref("Usage")),
            "cached": _CACHED,
        }, "id", "object", "created", "model", "choices",
            description="With `include_usage`, every chunk has `usage` (null but in the last, "
                        "whose `choices` is empty). `cached` only on the chunk with the "
                        "`finish_reason`."),
        "ChatCompletionStreamEvent": obj({"data": {"oneOf": [
            ref("ChatCompletionChunk"), ref("OpenAIErrorBody"), string(const="[DONE]")]}},
            "data", description="`data:` lines only; an error is followed by `[DONE]`."),
        "ModelList": obj({"object": string(const="list"), "data": {"type": "array", "items": obj(
            {"id": string(), "object": string(const="model"), "created": integer(0),
             "owned_by": string()}, "id", "object", "created", "owned_by")}},
            "object", "data"),
        "PromptVersion": obj({
            "prompt_id": string(), "version": integer(1), "template": string(),
            "variables": {"type": "array", "items": string()},
            "model": nullable(string()),
            "parameters": obj({"max_tokens": _MAX_TOKENS, "temperature": _TEMPERATURE}),
            "message": string(), "author": string(), "created_at_ms": integer(0),
            "labels": {"type": "array", "items": string(),
                       "description": "Labels pointing here when it was read."},
            "response_format": nullable(ref("ResponseFormat")),
            "json_validate": {"type": "boolean"},
            "split": nullable({**_SPLIT, "description": (
                "Read by a label that splits: its weights (this version is the heaviest).")}),
        }, "prompt_id", "version", "template", "variables", "model", "parameters", "message",
            "author", "created_at_ms", "labels"),
        "PromptVersionList": obj({
            "prompt_id": string(), "latest_version": integer(1),
            "labels": {"type": "object", "additionalProperties": integer(1)},
            "versions": {"type": "array", "items": ref("PromptVersion"),
                         "description": "Newest first."},
            "next_before": integer(1, description="`before` for the next page, if any."),
            "splits": {"type": "object", "additionalProperties": _SPLIT,
                       "description": "The labels that split, with their weights."},
        }, "prompt_id", "latest_version", "labels", "versions"),
        "PromptLabelMove": obj({"prompt_id": string(), "label": string(),
                                "version": nullable(integer(1, description=(
                                    "null when the label splits."))),
                                "split": _SPLIT,
                                "previous_version": nullable(integer(1)),
                                "previous_split": nullable(_SPLIT)},
                               "prompt_id", "label", "version", "split", "previous_version",
                               "previous_split"),
        "EvalRun": obj({
            "object": string(const="eval_run"), "eval_id": string(), "prompt_id": string(),
            "version": integer(1), "created_at_ms": integer(0), "cases": integer(1),
            "passed": integer(0), "pass_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "against_label": nullable(string()), "against_version": nullable(integer(1)),
            "regressions": integer(0), "first_token_p50_ms": nullable(integer(0)),
            "total_p50_ms": nullable(integer(0)), "prompt_tokens": integer(0),
            "completion_tokens": integer(0), "cost_usd": nullable(string()),
            "judge_model": nullable(string()), "cases_sha256": nullable(string()),
            "author": string(),
        }, "object", "eval_id", "prompt_id", "version", "created_at_ms", "cases", "passed",
            "pass_rate", "regressions"),
        "EvalRunList": obj({"object": string(const="list"), "prompt_id": string(),
                            "version": integer(1),
                            "data": {"type": "array", "items": ref("EvalRun"),
                                     "description": "Newest first."}},
                           "object", "prompt_id", "version", "data"),
        "PromptPolicy": obj({"object": string(const="prompt_policy"), "prompt_id": string(),
                             "require_eval": {"type": "boolean"},
                             "min_pass_rate": {"type": "number", "minimum": 0, "maximum": 1}},
                            "object", "prompt_id", "require_eval", "min_pass_rate"),
        "Conversation": obj({
            "conversation_id": string(), "expires_in_ms": integer(0),
            "messages": {"type": "array", "description": "Oldest first.", "items": obj({
                "role": string(enum=list(ROLES)), "content": string(),
                "partial": {"type": "boolean", "description": "The reply was cut."},
                "created_at_ms": integer(0), "request_id": string(),
            }, "role", "content", "partial", "created_at_ms", "request_id")},
        }, "conversation_id", "expires_in_ms", "messages"),
        "Feedback": obj({
            "object": string(const="feedback"),
            "request_id": _SAFE_ID,
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "comment": nullable(string()),
            "created_at_ms": integer(0),
            "replaced": {"type": "boolean", "description": "It replaced an earlier feedback "
                                                           "on the same request."},
            "request": obj({
                "prompt_id": nullable(string()), "prompt_version": nullable(integer(1)),
                "model": string(description="The model that answered."),
                "prompt_tokens": _TOKENS, "completion_tokens": _TOKENS,
                "first_token_ms": nullable(integer(0, description=(
                    "From the request reaching the prompt service to its first text; null: "
                    "none was sent."))),
                "duration_ms": integer(0),
                "outcome": string(description="`done`, `cancelled` or the error code."),
                "ended_at_ms": integer(0),
            }, "prompt_id", "prompt_version", "model", "prompt_tokens", "completion_tokens",
                "first_token_ms", "duration_ms", "outcome", "ended_at_ms",
                description="The record the request left when it ended."),
        }, "object", "request_id", "score", "comment", "created_at_ms", "replaced", "request"),
        "PromptStats": obj({
            "object": string(const="prompt_stats"),
            "prompt_id": string(),
            "from": string(format="date-time", description="Hour-aligned, inclusive."),
            "to": string(format="date-time", description="Hour-aligned, exclusive."),
            "versions": {"type": "array", "description": "Versions with requests in the "
                                                         "range, by number.", "items": obj({
                "version": integer(1),
                "requests": _TOKENS, "errors": _TOKENS,
                "errors_by_code": {"type": "object", "propertyNames": ref("ErrorCode"),
                                   "additionalProperties": integer(1)},
                "cancelled": _TOKENS, "prompt_tokens": _TOKENS, "completion_tokens": _TOKENS,
                "first_token_p50_ms": nullable(integer(0)),
                "first_token_p95_ms": nullable(integer(0)),
                "feedback_count": _TOKENS,
                "feedback_mean": nullable({"type": "number", "minimum": -1, "maximum": 1}),
            }, "version", "requests", "errors", "errors_by_code", "cancelled", "prompt_tokens",
                "completion_tokens", "first_token_p50_ms", "first_token_p95_ms",
                "feedback_count", "feedback_mean")},
        }, "object", "prompt_id", "from", "to", "versions"),
        "CancelResult": obj({
            "request_id": _SAFE_ID,
            "cancelled": {"type": "boolean", "description": (
                "true: the stream was stopped now; false: it had already ended.")},
        }, "request_id", "cancelled"),
        "Health": obj({"status": string(const="ok")}, "status"),
        "Ready": obj({"status": string(const="ready"),
                      "redis": string(enum=["ok", "unreachable", "unknown"], description=(
                          "Whether the prompt service reaches Redis; not a reason to fail."))},
                     "status", "redis"),
        "NotReady": obj({"status": string(const="unavailable"), "reason": string()},
                        "status", "reason"),
    }


def _headers() -> dict[str, Schema]:
    def header(description: str, schema: Schema) -> Schema:
        return {"description": description, "schema": schema}

    limits = {
        f"x-ratelimit-{what}-{unit}": header(text.format(unit=unit), schema)
        for unit in ("requests", "tokens")
        for what, text, schema in (
            ("limit", "The tenant's {unit} per minute.", integer(0)),
            ("remaining", "{unit} left in the window.", integer(0)),
            ("reset", "Until the window is empty again.", string(pattern="^[0-9]+s$")))
    }
    return {
        "X-Request-Id": {**header("The request's id, as in logs, traces and error bodies.",
                                  _SAFE_ID), "required": True},
        "Retry-After": header("Seconds to wait, when known (BUDGET_EXCEEDED: until the budget's "
                              "period resets).", integer(1)),
        "X-Promptline-Deployment": header(
            "The deployment of the model's pool that answered (docs/provider-pools.md).",
            string(minLength=1)),
        "x-promptline-cache": header(
            "For a model with a response cache (docs/cache.md): `hit` (replayed, no provider "
            "call) or `miss` (a fresh reply; also with `Cache-Control: no-cache`).",
            string(enum=["hit", "miss"])),
        **limits,
    }


# --- responses and operations -------------------------------------------------------------------


def _rid_header() -> dict[str, Schema]:
    return {"X-Request-Id": ref("X-Request-Id", "headers")}


def _ratelimit_headers() -> dict[str, Schema]:
    return {name: ref(name, "headers") for name in _headers() if name.startswith("x-ratelimit-")}


def phrase(status: int) -> str:
    # 499 (client closed request) is nginx's; the standard library does not know it.
    return "Client Closed Request" if status == 499 else HTTPStatus(status).phrase


def error_response(status: int, codes: Iterable[ErrorCode], *, openai: bool,
                   why: str = "") -> Schema:
    """One error status: which codes it carries, in the path's error shape."""
    listed = list(codes)
    headers = _rid_header()
    if any(WIRE[code].retryable for code in listed):
        headers["Retry-After"] = ref("Retry-After", "headers")
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        headers.update(_ratelimit_headers())
    text = ", ".join(f"`{code}`" for code in listed) + (f": {why}" if why else "")
    return {"description": f"{phrase(status)}: {text}", "headers": headers,
            "content": json_content(ref("OpenAIErrorBody" if openai else "ErrorBody"))}


def error_responses(codes: Iterable[ErrorCode], *, openai: bool = False,
                    body: bool = False) -> dict[str, Schema]:
    """Every error status of an operation: the table's (`WIRE`) for its codes, plus the body's."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(WIRE[code].http_status, []).append(code)
    out = {str(status): error_response(status, listed, openai=openai)
           for status, listed in by_status.items()}
    if body:
        encodings = ", ".join(sorted(DECODED_ENCODINGS))
        out["413"] = error_response(413, [ErrorCode.INVALID_REQUEST], openai=openai, why=(
            f"the body is larger than `edge.max_body_bytes` (default {_EDGE.max_body_bytes})"))
        out["415"] = error_response(415, [ErrorCode.INVALID_REQUEST], openai=openai, why=(
            f"a Content-Encoding other than {encodings}"))
    return dict(sorted(out.items()))


def ok(description: str, content: Schema | None = None, *, status: int = 200,
       headers: dict[str, Schema] | None = None) -> dict[str, Schema]:
    response: Schema = {"description": description}
    if headers:
        response["headers"] = headers
    if content:
        response["content"] = content
    return {str(status): response}


def request_body(schema: str, example: Any = None) -> Schema:
    encodings = ", ".join(sorted(DECODED_ENCODINGS))
    media: Schema = {"schema": ref(schema)}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}, "description": (
        f"JSON, at most `edge.max_body_bytes` (default {_EDGE.max_body_bytes}) bytes; "
        f"Content-Encoding may be {encodings}.")}


def api_operation(operation_id: str, tag: str, summary: str, responses: dict[str, Schema],
                  *, parameters: Iterable[str] = (), body: Schema | None = None,
                  description: str = "") -> Schema:
    """An authenticated API operation (the document's default security applies)."""
    op: Schema = {"operationId": operation_id, "tags": [tag], "summary": summary,
                  "parameters": [ref(p, "parameters") for p in (*parameters, "XRequestId")],
                  "responses": responses}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = body
    return op


def public_operation(operation_id: str, summary: str, responses: dict[str, Schema],
                     *, description: str = "") -> Schema:
    """An operation without authentication (probes, the page, this document)."""
    op: Schema = {"operationId": operation_id, "tags": ["operations"], "summary": summary,
                  "security": [], "responses": responses}
    if description:
        op["description"] = description
    return op


def _parameters() -> dict[str, Schema]:
    def path(name: str, schema: Schema, description: str) -> Schema:
        return {"name": name, "in": "path", "required": True, "schema": schema,
                "description": description}

    return {
        "CacheControl": {"name": "Cache-Control", "in": "header", "required": False,
                         "schema": string(examples=["no-cache"]), "description": (
                             "`no-cache` among its directives: the response cache is not read "
                             "(a fresh reply, which may be stored); other directives are "
                             "ignored (docs/cache.md).")},
        "XRequestId": {"name": "X-Request-Id", "in": "header", "required": False,
                       "schema": string(), "description": (
                           "Used as the request's id when it is 1-128 letters, digits and "
                           "`. _ : -`; otherwise a new id is made (never an error).")},
        "PromptId": path("prompt_id", string(pattern=anchored(PROMPT_ID)), "The prompt's id."),
        "Version": path("version", integer(1, UINT32_MAX), "A version number."),
        "Label": path("label", string(pattern=anchored(LABEL)), "A label such as `prod`."),
        "ConversationId": path("conversation_id", _SAFE_ID, "The conversation's id."),
        "RequestId": path("request_id", _SAFE_ID, "The stream's request id (its `start`'s "
                                                  "`request_id`, `X-Request-Id`)."),
        "LastEventId": {"name": LAST_EVENT_ID, "in": "header", "required": False,
                        "schema": string(pattern="^[0-9]{1,10}$", examples=["12"]),
                        "description": (
                            f"The last delta `id:` the client has, 0 to {MAX_EVENT_ID}; the "
                            f"stream goes on after it. Wins over `{LAST_EVENT_ID_PARAM}`. "
                            "Absent (and no query parameter): from the first delta.")},
        "LastEventIdQuery": {"name": LAST_EVENT_ID_PARAM, "in": "query", "required": False,
                             "schema": integer(0, MAX_EVENT_ID),
                             "description": f"`{LAST_EVENT_ID}`, for clients that cannot set "
                                            "headers."},
        "From": {"name": "from", "in": "query", "required": False, "schema": string(
            examples=["2025-01-14", "2025-01-14T10:00:00Z"]), "description": (
                "ISO 8601 date or date-time (UTC unless it has an offset), rounded down to the "
                "hour; default: the start of the current UTC day.")},
        "To": {"name": "to", "in": "query", "required": False, "schema": string(),
               "description": "Like `from`, exclusive, rounded up to the hour; default: now. "
                              "At most `usage.retention` after `from`."},
        "StatsTo": {"name": "to", "in": "query", "required": False, "schema": string(),
                    "description": "Like `from`, exclusive, rounded up to the hour; default: "
                                   "now. At most `feedback.retention` after `from`."},
        "GroupBy": {"name": "group_by", "in": "query", "required": False,
                    "schema": string(enum=list(USAGE_GROUPS), default="model"),
                    "description": "How rows are grouped (`day`: UTC days)."},
        "Tenant": {"name": "tenant", "in": "query", "required": False,
                   "schema": string(pattern=anchored(MODEL_NAME)),
                   "description": "Another tenant's usage: keys of an admin tenant only."},
        "Limit": {"name": "limit", "in": "query", "required": False,
                  "schema": integer(1, MAX_PAGE_SIZE, default=DEFAULT_PAGE_SIZE),
                  "description": "Versions per page."},
        "Before": {"name": "before", "in": "query", "required": False,
                   "schema": integer(1, UINT32_MAX),
                   "description": "Only versions older than this one (`next_before`)."},
    }


def _chat_paths() -> dict[str, Schema]:
    example = {"model": "sim", "messages": [{"role": "user", "content": "Hi"}]}
    stream_headers = {**_rid_header(), **_ratelimit_headers(),
                      "X-Promptline-Deployment": ref("X-Promptline-Deployment", "headers"),
                      "x-promptline-cache": ref("x-promptline-cache", "headers")}
    hold = (f"Headers wait for admission or the first token, at most `edge.header_hold` "
            f"(default {_EDGE.header_hold:g} s): an error before that is a real HTTP status, "
            f"after it an in-stream error, then the stream closes. An SSE comment "
            f"(`{sse.HEARTBEAT.decode().strip()}`) follows `edge.heartbeat` (default "
            f"{_EDGE.heartbeat:g} s) of silence.")
    return {
        "/v1/chat/stream": {"post": api_operation(
            "chatStream", "chat", "Stream a chat reply as Server-Sent Events",
            {**ok("`start`, `delta`s, then `done` or `error`. After a dropped connection, "
                  "`GET /v1/chat/stream/{request_id}` resumes it after the last delta `id`.",
                  {sse.CONTENT_TYPE: {"schema": ref("ChatStreamEvent")}}, headers=stream_headers),
             **error_responses(CHAT_CODES, body=True)},
            body=request_body("ChatStreamRequest", example), description=hold,
            parameters=["CacheControl"])},
        CHAT_COMPLETIONS_PATH: {"post": api_operation(
            "createChatCompletion", "openai", "OpenAI-compatible chat completion",
            {**ok("`stream: true`: `data:` chunk lines, then `data: [DONE]`; otherwise one "
                  "`chat.completion`, sent when the reply is complete (so any error is a "
                  "status).", {
                      "application/json": {"schema": ref("ChatCompletion")},
                      sse.CONTENT_TYPE: {"schema": ref("ChatCompletionStreamEvent")}},
                  headers=stream_headers),
             **error_responses(CHAT_CODES, openai=True, body=True)},
            body=request_body("ChatCompletionRequest", example), description=hold,
            parameters=["CacheControl"])},
        RESUME_PATH: {"get": api_operation(
            "resumeChatStream", "chat", "Resume a stream after a dropped connection",
            {**ok("The stream's `start`, then its deltas after `Last-Event-ID`, then the live "
                  "rest up to `done` or `error` (a stream that ended is replayed to its end).",
                  {sse.CONTENT_TYPE: {"schema": ref("ChatStreamEvent")}},
                  headers={**_rid_header(),
                           "X-Promptline-Deployment": ref("X-Promptline-Deployment",
                                                          "headers")}),
             **error_responses(RESUME_CODES)},
            parameters=["RequestId", "LastEventId", "LastEventIdQuery"], description=(
                "A stream of the key's tenant, journaled for `resume.ttl` (docs/resume.md). "
                "404 for an unknown, expired or another tenant's id; 503 when the journal "
                "(Redis) is unreachable; 400 for a `Last-Event-ID` that is not a delta id. "
                "Leaving it never stops the stream. " + hold))},
        CANCEL_PATH: {"post": api_operation(
            "cancelChatStream", "chat", "Stop a stream now (an explicit Stop)",
            {**ok("Whether it was stopped.", json_content(ref("CancelResult")),
                  headers=_rid_header()),
             **error_responses(CANCEL_CODES)},
            parameters=["RequestId"], description=(
                "Cancels the stream down to the provider at once, on whichever replica runs "
                "it; its readers get an `error` event `CANCELLED`. A dropped connection is not "
                "a Stop: it leaves the stream `resume.grace` for a reconnect. 404 for an "
                "unknown, expired or another tenant's id. A body is ignored."))},
        MODELS_PATH: {"get": api_operation(
            "listModels", "openai", "The models this key's tenant may use",
            {**ok("OpenAI's model list.", json_content(ref("ModelList")),
                  headers=_rid_header()),
             **error_responses(MODELS_CODES, openai=True)})},
    }


def _admin_paths() -> dict[str, Schema]:
    def answer(schema: str, description: str, status: int = 200) -> dict[str, Schema]:
        return ok(description, json_content(ref(schema)), status=status, headers=_rid_header())

    version = ("PromptId", "Version")
    label = ("PromptId", "Label")
    writes = "Needs a key of a tenant with `admin: true`."
    return {
        "/v1/prompts/{prompt_id}/versions": {
            "post": api_operation(
                "createPromptVersion", "prompts", "Create the prompt's next version",
                {**answer("PromptVersion", "The new, immutable version.", 201),
                 **error_responses(ADMIN_WRITE_CODES, body=True)},
                parameters=["PromptId"], body=request_body("CreatePromptVersionRequest", {
                    "template": "You are helping {{name}}.", "message": "first version"}),
                description=writes),
            "get": api_operation(
                "listPromptVersions", "prompts", "List the prompt's versions, newest first",
                {**answer("PromptVersionList", "A page of versions and every label."),
                 **error_responses(ADMIN_READ_CODES)},
                parameters=["PromptId", "Limit", "Before"]),
        },
        "/v1/prompts/{prompt_id}/versions/{version}": {"get": api_operation(
            "getPromptVersion", "prompts", "One version",
            {**answer("PromptVersion", "The version."), **error_responses(ADMIN_READ_CODES)},
            parameters=version)},
        "/v1/prompts/{prompt_id}/labels/{label}": {
            "get": api_operation(
                "getPromptLabel", "prompts", "The version a label points at",
                {**answer("PromptVersion", "The version."),
                 **error_responses(ADMIN_READ_CODES)},
                parameters=label),
            "put": api_operation(
                "setPromptLabel", "prompts",
                "Point a label at a version or split it between versions",
                {**answer("PromptLabelMove", "Where the label points now, and before."),
                 **error_responses(ADMIN_WRITE_CODES, body=True)},
                parameters=label, body=request_body("SetPromptLabelRequest", {"version": 1}),
                description=writes + " An unknown `version` is 404; an unknown version in a "
                "`split`, bad weights, or a version without the passing eval run the prompt's "
                "policy (or `require_eval`) asks for is 400 (docs/prompt-lifecycle.md)."),
        },
        ROLLBACK_PATH: {"post": api_operation(
            "rollbackPromptLabel", "prompts", "Restore a label's state before its last move",
            {**answer("PromptLabelMove", "Where the label points now, and before."),
             **error_responses(ADMIN_WRITE_CODES)},
            parameters=label, description=writes + " A second rollback rolls forward again; "
            "400 when the label has no previous state. Not gated by the eval policy.")},
        EVALS_PATH: {
            "post": api_operation(
                "createEvalRun", "prompts", "Store an eval run's summary on a version",
                {**answer("EvalRun", "The stored run.", 201),
                 **error_responses(ADMIN_WRITE_CODES, body=True)},
                parameters=version, body=request_body("EvalRunRequest",
                                                      {"cases": 20, "passed": 19}),
                description=writes + " `promptline prompts eval` posts its run here."),
            "get": api_operation(
                "listEvalRuns", "prompts", "A version's eval runs, newest first",
                {**answer("EvalRunList", "The last 100 runs at most."),
                 **error_responses(ADMIN_READ_CODES)}, parameters=version),
        },
        POLICY_PATH: {
            "get": api_operation(
                "getPromptPolicy", "prompts", "What a label move of the prompt needs",
                {**answer("PromptPolicy", "The policy (defaults when none was set)."),
                 **error_responses(ADMIN_READ_CODES)}, parameters=["PromptId"]),
            "put": api_operation(
                "setPromptPolicy", "prompts", "Replace the prompt's policy",
                {**answer("PromptPolicy", "The policy now."),
                 **error_responses(ADMIN_WRITE_CODES, body=True)},
                parameters=["PromptId"], body=request_body("PromptPolicyRequest",
                                                           {"require_eval": True,
                                                            "min_pass_rate": 0.9}),
                description=writes),
        },
        USAGE_PATH: {"get": api_operation(
            "getUsage", "usage", "Requests, tokens and cost of the key's tenant",
            {**answer("UsageReport", "Sums of the hours in the range, by group."),
             **error_responses(USAGE_CODES)},
            parameters=["From", "To", "GroupBy", "Tenant"],
            description="From hourly records kept `usage.retention` (docs/costs.md); an unknown "
                        "or repeated query parameter is a 400 naming it.")},
        FEEDBACK_PATH: {"post": api_operation(
            "submitFeedback", "feedback", "Feedback on a request of the key's tenant",
            {**answer("Feedback", "Stored; the request's record joined.", 201),
             **answer("Feedback", "Stored, replacing an earlier feedback on the request."),
             **error_responses(FEEDBACK_CODES, body=True)},
            body=request_body("FeedbackRequest", {"request_id": "3b3c0f6e", "score": 1}),
            description="Within `feedback.retention` of the request's end "
                        "(docs/prompt-lifecycle.md). 404 for an unknown, expired or another "
                        "tenant's request id.")},
        STATS_PATH: {"get": api_operation(
            "getPromptStats", "feedback", "Per-version stats of a prompt",
            {**answer("PromptStats", "Sums of the hours in the range, per version."),
             **error_responses(ADMIN_READ_CODES)},
            parameters=["PromptId", "From", "StatsTo"],
            description="From hourly buckets kept `feedback.retention`; first-token "
                        "percentiles are estimated within histogram buckets. An unknown or "
                        "repeated query parameter is a 400 naming it.")},
        "/v1/conversations/{conversation_id}": {
            "get": api_operation(
                "getConversation", "conversations", "The caller's conversation history",
                {**answer("Conversation", "The stored messages, oldest first."),
                 **error_responses(ADMIN_READ_CODES)},
                parameters=["ConversationId"]),
            "delete": api_operation(
                "deleteConversation", "conversations", "Delete a conversation",
                {**ok("Deleted.", status=204, headers=_rid_header()),
                 **error_responses(ADMIN_READ_CODES)},
                parameters=["ConversationId"]),
        },
    }


def _public_paths() -> dict[str, Schema]:
    # aiohttp's static handler answers a missing file itself, after the middlewares.
    not_found = {"description": "No such file (an empty body, not the error object)."}
    return {
        "/": {"get": public_operation("chatPage", "The browser chat page",
                                      ok("HTML.", {"text/html": {}}))},
        "/static/{filename}": {"get": {
            **public_operation("staticFile", "The chat page's scripts and styles", {
                **ok("The file.", {"*/*": {}}), "404": not_found}),
            "parameters": [{"name": "filename", "in": "path", "required": True,
                            "schema": string()}]}},
        "/healthz": {"get": public_operation("healthz", "Liveness: the process serves HTTP",
                                             ok("Alive.", json_content(ref("Health"))))},
        "/readyz": {"get": public_operation(
            "readyz", "Readiness: not draining, and the prompt service answers", {
                **ok("Ready.", json_content(ref("Ready"))),
                "503": {"description": "Not ready (shutting down, or no prompt service).",
                        "content": json_content(ref("NotReady"))}})},
        "/metrics": {"get": public_operation(
            "metrics", "Prometheus metrics",
            ok("The text exposition format.", {CONTENT_TYPE_LATEST: {"schema": string()}}))},
        OPENAPI_PATH: {"get": public_operation(
            "openapi", "This document", {
                **ok("OpenAPI 3.1.", json_content({"type": "object"}), headers={
                    "ETag": {"schema": string()}, "Cache-Control": {"schema": string()}}),
                "304": {"description": "Not modified (`If-None-Match`)."}})},
    }


def _version() -> str:
    try:
        return package_version("promptline")
    except PackageNotFoundError:  # run from a checkout that was never installed: still serve
        return "0.0.0"


def build_document() -> Schema:
    """The whole OpenAPI 3.1 document (a plain, JSON-serializable dict)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Promptline edge",
            "version": _version(),
            "summary": "Streaming LLM chat over Server-Sent Events, OpenAI-compatible "
                       "completions, prompts and conversations.",
            "description": (
                "Every API call authenticates with `Authorization: Bearer <key>`, checked before "
                "anything else. Errors are `{\"error\": {...}}` with the HTTP status of the code "
                "(`ErrorCode`); on the OpenAI-compatible paths in OpenAI's shape."),
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "tags": [{"name": name, "description": text} for name, text in (
            ("chat", "The native streaming endpoint."),
            ("openai", "OpenAI-compatible: the official clients work with base_url .../v1."),
            ("prompts", "Versioned prompt templates and their labels."),
            ("conversations", "Conversation memory."),
            ("usage", "Requests, tokens and cost, for budgets and billing."),
            ("feedback", "Feedback on requests, and per-version stats of prompts."),
            ("operations", "Probes, metrics, the chat page and this document."))],
        "security": [{"bearerAuth": []}],
        "paths": {**_chat_paths(), **_admin_paths(), **_public_paths()},
        "components": {
            "schemas": {**_error_schemas(), **_request_schemas(), **_response_schemas()},
            "parameters": _parameters(),
            "headers": _headers(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "An API key of `tenants[].api_keys` (visible ASCII)."}},
        },
    }


# --- the route -----------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    """Register `GET /openapi.json`; the document is built and serialized once, here."""
    body = json.dumps(build_document(), ensure_ascii=False, separators=(",", ":")).encode()
    etag = hashlib.sha256(body).hexdigest()[:32]
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": f'"{etag}"'}

    async def openapi_json(request: web.Request) -> web.Response:
        """GET /openapi.json: this edge's OpenAPI 3.1 document."""
        if any(tag.value in (etag, "*") for tag in request.if_none_match or ()):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    app.router.add_get(OPENAPI_PATH, openapi_json)

"""The request rules more than one module applies, each written once.

The edge checks a request's JSON shape and types; what the values mean (roles, ranges, ids, the
choice of a prompt version or label) is checked by the prompt service with these functions, so a
gRPC caller and an HTTP caller get the same answer. Each failure is INVALID_REQUEST at `connect`,
with a message naming the field.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.v1 import common_pb2

SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""Request and conversation ids: safe in logs, Redis keys, headers and gRPC metadata."""
USER_ID = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")
"""An end user's id (OpenAI's `user`): a safe id, e-mail addresses included; it becomes part of
Redis keys and usage rows, never of a metric label."""
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"
"""A configured model's name (and so what a request or a prompt version may name)."""
ROLES = ("system", "user", "assistant")
USAGE_GROUPS = ("model", "day", "api_key", "user")
"""How a usage report may group its rows (`GET /v1/usage?group_by=`, `PromptAdmin.GetUsage`)."""
MAX_TOKENS = 1_000_000
"""The most a request may ask for; the model's context window usually says less."""
MAX_TEMPERATURE = 2.0
MAX_COALESCE_MS = 1000
"""Chunk shaping's longest hold: a second of held text is where streaming stops feeling live."""
MAX_MIN_CHARS = 65536
BOUNDARIES = ("none", "word", "line")


def invalid(message: str) -> PromptlineError:
    """An INVALID_REQUEST at stage `connect`: the request never reached any model work."""
    return PromptlineError(ErrorCode.INVALID_REQUEST, message, stage=Stage.CONNECT)


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when it is a safe token, else a fresh uuid4 hex."""
    if header and SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def json_kind(value: Any) -> str:
    """JSON's name for a value's type, for messages a client can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check_request_id(value: str) -> str:
    """A request id named by a caller (resume, cancel): a safe id, else INVALID_REQUEST."""
    return _safe_id(value, "request_id")


def check_conversation_id(value: str) -> str:
    return _safe_id(value, "conversation_id")


def _safe_id(value: str, name: str) -> str:
    if not SAFE_ID.fullmatch(value):
        raise invalid(f"{name} must be 1-128 characters of letters, digits and . _ : -")
    return value


def check_user(value: str, path: str = "user") -> str:
    if not USER_ID.fullmatch(value):
        raise invalid(f"{path} must be 1-128 characters of letters, digits and . _ : @ + -")
    return value


def is_model_name(value: str) -> bool:
    return re.fullmatch(MODEL_NAME, value) is not None


def check_role(role: str, path: str) -> None:
    if role not in ROLES:
        raise invalid(f"{path} must be one of {', '.join(ROLES)}")


def check_max_tokens(value: int, path: str = "max_tokens") -> None:
    if not 1 <= value <= MAX_TOKENS:
        raise invalid(f"{path} must be between 1 and {MAX_TOKENS}, got {value}")


def check_temperature(value: float, path: str = "temperature") -> None:
    if not 0 <= value <= MAX_TEMPERATURE:
        raise invalid(f"{path} must be between 0 and {MAX_TEMPERATURE:g}, got {value:g}")


def check_version_or_label(version: int, label: str) -> None:
    if version and label:
        raise invalid("prompt takes either version or label, not both")


def check_stream_shape(shape: common_pb2.StreamShape, path: str = "stream_options") -> None:
    """A request's chunk shaping; a field not set keeps the model's."""
    if shape.coalesce_ms > MAX_COALESCE_MS:
        raise invalid(f"{path}.coalesce_ms must be between 0 and {MAX_COALESCE_MS}, "
                      f"got {shape.coalesce_ms}")
    if shape.min_chars > MAX_MIN_CHARS:
        raise invalid(f"{path}.min_chars must be between 0 and {MAX_MIN_CHARS}, "
                      f"got {shape.min_chars}")
    if shape.boundary and shape.boundary not in BOUNDARIES:
        raise invalid(f"{path}.boundary must be one of {', '.join(BOUNDARIES)}")

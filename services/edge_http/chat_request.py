"""The `POST /v1/chat/stream` body: read with a size cap, decoded, checked, turned into protobuf.

The edge checks the JSON's shape and types (and what the wire types need: integers that fit,
strings protobuf can carry); what the values mean (roles, ranges, ids, whether a model or a prompt
exists) is the prompt service's business (`promptline.rules`), so gRPC callers get the same
answers. Every rejection is a `PromptlineError(INVALID_REQUEST)` at stage `connect` whose message
names the offending field or JSON position.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterable, Iterable
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http_exceptions import HttpProcessingError

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.rules import check_max_tokens, invalid, json_kind
from promptline.v1 import common_pb2, prompt_pb2

# Content-Encodings aiohttp decodes as the body arrives; any other would reach us as raw bytes.
DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate", *(["br"] if HAS_BROTLI else []),
                               *(["zstd"] if HAS_ZSTD else [])})
# Python refuses to convert longer digit strings (sys.get_int_max_str_digits()).
MAX_INT_DIGITS = 4300

_UINT32_MAX = 2**32 - 1


class BodyError(PromptlineError):
    """An INVALID_REQUEST about the body's bytes, with its own HTTP status (400, 413 or 415)."""

    __slots__ = ("_status",)

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message, stage=Stage.CONNECT)
        self._status = status

    @property
    def http_status(self) -> int:
        return self._status


async def read_request_body(request: web.Request, limit: int) -> bytes:
    """The request's body, decoded from its Content-Encoding, at most `limit` bytes of it."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in DECODED_ENCODINGS:
        supported = ", ".join(sorted(DECODED_ENCODINGS))
        raise BodyError(f"Content-Encoding {encoding[:40]!r} is not supported (use one of "
                        f"{supported})", 415)
    try:
        return await read_body(request.content.iter_any(), limit, request.content_length)
    except (HttpProcessingError, web.RequestPayloadError):  # from the parser, as bytes arrive
        if encoding != "identity":
            raise BodyError(f"body is not valid {encoding} (Content-Encoding: {encoding})"
                            ) from None
        raise BodyError("body does not match its framing (Content-Length or chunked)") from None


async def read_body(content: AsyncIterable[bytes], limit: int,
                    content_length: int | None = None) -> bytes:
    """Read at most `limit` bytes; a larger body raises BodyError (HTTP 413).

    A declared Content-Length over the limit is refused before reading anything; a chunked (or
    compressed) body is counted as it arrives, so an endless upload is cut off at the limit.
    """
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in content:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PromptlineError:
    return BodyError(f"request body is larger than {limit} bytes", 413)


def parse_chat_request(body: bytes) -> prompt_pb2.StreamChatRequest:
    """Decode and validate a chat body; the request id is left for the caller to set."""
    return chat_request_from(decode_json_object(body))


def decode_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else is INVALID_REQUEST naming what was wrong."""
    data = _decode_json(body)
    if not isinstance(data, dict):
        raise invalid(f"body must be a JSON object, got {json_kind(data)}")
    return data


def chat_request_from(data: dict[str, Any]) -> prompt_pb2.StreamChatRequest:
    """Validate a decoded chat body (the native shape) and build the protobuf request."""
    request = prompt_pb2.StreamChatRequest(
        # With a managed prompt the model may come from the prompt version's default.
        model=("" if data.get("model") is None and data.get("prompt") is not None
               else string_field(data.get("model"), "model", required=True)),
        messages=_messages(data.get("messages")),
    )
    max_tokens = data.get("max_tokens")
    if max_tokens is not None:
        # The wire cannot carry an explicit 0 (it means the model's default): the range here.
        request.max_tokens = _int(max_tokens, "max_tokens", 0, _UINT32_MAX)
        check_max_tokens(request.max_tokens)
    temperature = data.get("temperature")
    if temperature is not None:
        request.temperature = _temperature(temperature)
    conversation_id = data.get("conversation_id")
    if conversation_id is not None:
        request.conversation_id = string_field(conversation_id, "conversation_id")
    user = data.get("user")
    if user is not None:
        request.user = string_field(user, "user")
    prompt = data.get("prompt")
    if prompt is not None:
        request.prompt.CopyFrom(_prompt_ref(prompt))
    shape = data.get("stream_options")
    if shape is not None:
        request.stream_shape.CopyFrom(stream_shape(shape))
    fmt = data.get("response_format")
    if fmt is not None:
        request.response_format.CopyFrom(response_format(fmt))
    if data.get("json_validate") is not None:
        request.json_validate = bool_field(data["json_validate"], "json_validate")
    return request


def response_format(value: Any, path: str = "response_format") -> common_pb2.ResponseFormat:
    """OpenAI's `response_format` (`{"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}`), its JSON types checked; the schema travels as JSON text. What
    the values mean (types, names, a valid schema, sizes) is `promptline.response_format`'s."""
    if not isinstance(value, dict):
        raise invalid(f"{path} must be an object, got {json_kind(value)}")
    fmt = common_pb2.ResponseFormat(type=string_field(value.get("type"), f"{path}.type",
                                                      required=True))
    spec = value.get("json_schema")
    if spec is None:
        return fmt
    path = f"{path}.json_schema"
    if not isinstance(spec, dict):
        raise invalid(f"{path} must be an object, got {json_kind(spec)}")
    for name in ("name", "description"):
        if spec.get(name) is not None:
            setattr(fmt, name, string_field(spec[name], f"{path}.{name}", allow_empty=True))
    if spec.get("strict") is not None:
        fmt.strict = bool_field(spec["strict"], f"{path}.strict")
    schema = spec.get("schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise invalid(f"{path}.schema must be a JSON Schema object, got {json_kind(schema)}")
        try:
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        except RecursionError:
            raise invalid(f"{path}.schema is nested too deeply") from None
        fmt.schema = string_field(text, f"{path}.schema")
    return fmt


def bool_field(value: Any, path: str) -> bool:
    """A JSON boolean, or INVALID_REQUEST."""
    if not isinstance(value, bool):
        raise invalid(f"{path} must be a boolean, got {json_kind(value)}")
    return value


def cache_bypass(cache_control: Iterable[str]) -> bool:
    """Whether the request's `Cache-Control` header values hold `no-cache` (any case, among other
    directives): the response cache's lookup is then skipped (docs/cache.md)."""
    return any(directive.split("=", 1)[0].strip().lower() == "no-cache"
               for value in cache_control for directive in value.split(","))


def stream_shape(value: Any, path: str = "stream_options") -> common_pb2.StreamShape:
    """Chunk shaping asked for by the request: `coalesce_ms`, `min_chars`, `boundary` (each
    optional); the ranges are the prompt service's (`rules.check_stream_shape`)."""
    if not isinstance(value, dict):
        raise invalid(f"{path} must be an object, got {json_kind(value)}")
    shape = common_pb2.StreamShape()
    for name in ("coalesce_ms", "min_chars"):
        if value.get(name) is not None:
            setattr(shape, name, _int(value[name], f"{path}.{name}", 0, _UINT32_MAX))
    if value.get("boundary") is not None:
        shape.boundary = string_field(value["boundary"], f"{path}.boundary")
    return shape


def _decode_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("body is not valid UTF-8") from None
    if not text.strip():
        raise invalid("body is empty (expected a JSON object)")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        # A 1 MiB body of `[[[[...` would otherwise surface as an internal error.
        raise invalid("body is not valid JSON: nested too deeply") from None


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise invalid(f"body is not valid JSON: an integer has more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _reject_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON; Python accepts them by default.
    raise invalid(f"body is not valid JSON: {name} is not a JSON value")


def _messages(value: Any) -> list[common_pb2.ChatMessage]:
    if value is None:
        raise invalid("messages is required")
    if not isinstance(value, list):
        raise invalid(f"messages must be a list, got {json_kind(value)}")
    if not value:
        raise invalid("messages must not be empty")
    out = []
    for i, item in enumerate(value):
        path = f"messages[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{path} must be an object, got {json_kind(item)}")
        role = string_field(item.get("role"), f"{path}.role", required=True)
        content = string_field(item.get("content"), f"{path}.content", required=True,
                               allow_empty=True)
        out.append(common_pb2.ChatMessage(role=role, content=content))
    return out


def _prompt_ref(value: Any) -> prompt_pb2.PromptRef:
    if not isinstance(value, dict):
        raise invalid(f"prompt must be an object, got {json_kind(value)}")
    ref = prompt_pb2.PromptRef(id=string_field(value.get("id"), "prompt.id", required=True))
    version, label = value.get("version"), value.get("label")
    if version is not None:
        ref.version = _int(version, "prompt.version", 1, _UINT32_MAX)
    if label is not None:
        ref.label = string_field(label, "prompt.label")
    variables = value.get("variables")
    if variables is not None:
        if not isinstance(variables, dict):
            raise invalid(f"prompt.variables must be an object, got {json_kind(variables)}")
        for name, text in variables.items():
            ref.variables[string_field(name, "prompt.variables key")] = string_field(
                text, f"prompt.variables.{name}", allow_empty=True
            )
    return ref


def string_field(value: Any, path: str, *, required: bool = False,
                 allow_empty: bool = False) -> str:
    """A JSON string field, validated (type, emptiness, encodable as UTF-8), or INVALID_REQUEST."""
    if value is None and required:
        raise invalid(f"{path} is required")
    if not isinstance(value, str):
        raise invalid(f"{path} must be a string, got {json_kind(value)}")
    if not value and not allow_empty:
        raise invalid(f"{path} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON `\ud800` escapes decode to lone surrogates, which protobuf cannot serialize.
        raise invalid(f"{path} contains an invalid Unicode escape (lone surrogate)") from None
    return value


def _int(value: Any, path: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{path} must be an integer, got {json_kind(value)}")
    if not minimum <= value <= maximum:
        raise invalid(f"{path} must be between {minimum} and {maximum}, got {value}")
    return value


def _temperature(value: Any) -> float:
    number = number_field(value, "temperature")
    if not math.isfinite(number):
        raise invalid(f"temperature must be a number, got {json_kind(value)}")
    return number


def number_field(value: Any, path: str) -> float:
    """A JSON number as a float, or INVALID_REQUEST (an integer past a float's range too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{path} must be a number, got {json_kind(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer literal of more than 308 digits
        raise invalid(f"{path} is out of range") from None

"""The one table from what an OpenAI-compatible provider did to `PromptlineError`.

The provider speaks HTTP itself (aiohttp, no SDK), so the table is keyed by what it saw: the
status of an error reply (and, for a rejected request, the provider's error code or message),
an in-stream `error` event, or the exception that ended connecting or reading.

Messages are safe to show a user: they never carry the API key, request headers or raw provider
bodies, only, where it helps the caller, a short sanitized provider message. `stage` is left
unset: the engine stamps it.

What happened                                 -> code, retryable
HTTP 429                                      -> UPSTREAM_RATE_LIMITED, yes; retry_after_ms from
                                                 `retry-after-ms` or `retry-after` (s or date)
HTTP 401, 403                                 -> UPSTREAM_ERROR, no: our provider credentials
                                                 were rejected, not the caller's fault
HTTP 400, 413, 422                            -> CONTEXT_TOO_LONG when the provider says so
                                                 (error code or message), else INVALID_REQUEST; no
HTTP 404                                      -> UPSTREAM_ERROR, no ("model not found ...")
HTTP 408, 409, 5xx                            -> UPSTREAM_ERROR, yes
any other status (other 4xx)                  -> UPSTREAM_ERROR, no
TimeoutError (connecting or reading)          -> UPSTREAM_ERROR, yes
aiohttp.ClientError (refused, reset, DNS ...) -> UNAVAILABLE, yes ("... is unreachable" before
                                                 the response, "... was lost" after it)
an in-stream `error` event                    -> UPSTREAM_ERROR, yes (the engine retries only
                                                 before the first token)
json.JSONDecodeError, UnicodeDecodeError,     -> UPSTREAM_ERROR, yes
  MalformedStreamError (a malformed stream)
a stream ending without a finish_reason       -> UPSTREAM_ERROR, yes
any other ValueError (a bug of ours)          -> INTERNAL ("internal error"), no
asyncio.CancelledError                        -> not mapped: it propagates to whoever cancelled
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp

from promptline.errors import ErrorCode, PromptlineError

ORIGIN = "llm_engine"

# Longest provider text we pass on, after sanitizing.
MAX_PROVIDER_MESSAGE = 200
# A provider asking for more than this is treated as asking for this (protects the caller's UI).
MAX_RETRY_AFTER_MS = 3_600_000

CREDENTIALS_REJECTED = (
    "the model provider rejected the gateway's credentials (a configuration problem on our "
    "side, not in your request)"
)
MODEL_NOT_FOUND = "model not found at the provider"
UNREACHABLE = "the model provider is unreachable"
CONNECTION_LOST = "the connection to the model provider was lost"
TIMED_OUT = "the model provider timed out"
RATE_LIMITED = "the model provider is rate limiting requests"
CONTEXT_TOO_LONG = "the conversation is too long for the model's context window"
INVALID_REQUEST = "the model provider rejected the request"
PROVIDER_FAILED = "the model provider failed"
STREAM_FAILED = "the model provider reported an error during the stream"
BAD_RESPONSE = "the model provider sent a response we could not read"
ENDED_EARLY = "the model provider ended the stream before the reply was finished"
INTERNAL = "internal error"


class MalformedStreamError(ValueError):
    """The provider's event stream cannot be parsed (e.g. a line beyond the size limit)."""


@dataclass(frozen=True, slots=True)
class Row:
    """What one kind of failure becomes."""

    code: ErrorCode
    retryable: bool
    message: str
    detail: bool = False  # append the provider's own message, sanitized
    with_status: bool = False  # append "(HTTP nnn)"
    retry_after: bool = False  # retry_after_ms from the reply's headers


_REJECTED = Row(ErrorCode.INVALID_REQUEST, False, INVALID_REQUEST, detail=True)
_CONTEXT = Row(ErrorCode.CONTEXT_TOO_LONG, False, CONTEXT_TOO_LONG, detail=True)
# No detail: the provider's text often echoes (part of) the key.
_CREDENTIALS = Row(ErrorCode.UPSTREAM_ERROR, False, CREDENTIALS_REJECTED)
_FAILED = Row(ErrorCode.UPSTREAM_ERROR, True, PROVIDER_FAILED, with_status=True)
_MALFORMED = Row(ErrorCode.UPSTREAM_ERROR, True, BAD_RESPONSE)
_TIMED_OUT = Row(ErrorCode.UPSTREAM_ERROR, True, TIMED_OUT)

# --- the table -------------------------------------------------------------------------------

# An error reply instead of a stream, by HTTP status.
BY_STATUS: Mapping[int, Row] = {
    400: _REJECTED, 413: _REJECTED, 422: _REJECTED,
    401: _CREDENTIALS, 403: _CREDENTIALS,
    404: Row(ErrorCode.UPSTREAM_ERROR, False, MODEL_NOT_FOUND),
    408: _FAILED, 409: _FAILED,
    429: Row(ErrorCode.UPSTREAM_RATE_LIMITED, True, RATE_LIMITED, retry_after=True),
}
SERVER_ERROR = _FAILED  # a 5xx without a row of its own
OTHER_STATUS = Row(ErrorCode.UPSTREAM_ERROR, False, PROVIDER_FAILED, with_status=True)

# A rejected request (a `_REJECTED` status) is CONTEXT_TOO_LONG when the provider's error code
# says so, or, for servers that send no such code (vLLM, Ollama), its message.
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length",
                           "context_window_exceeded"})
CONTEXT_TEXT = re.compile(
    r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long|"
    r"input is too long|reduce the length of the messages",
    re.IGNORECASE,
)

# The exceptions the table maps (anything else is a bug and propagates as it is), by type, first
# match wins: (type, row while connecting, row once the response has started).
CAUGHT = (TimeoutError, aiohttp.ClientError, ValueError)
BY_EXCEPTION: tuple[tuple[type[Exception], Row, Row], ...] = (
    (TimeoutError, _TIMED_OUT, _TIMED_OUT),  # before ClientError: aiohttp's timeouts are both
    (aiohttp.ClientError, Row(ErrorCode.UNAVAILABLE, True, UNREACHABLE),
     Row(ErrorCode.UNAVAILABLE, True, CONNECTION_LOST)),
    (json.JSONDecodeError, _MALFORMED, _MALFORMED),
    (UnicodeDecodeError, _MALFORMED, _MALFORMED),
    (MalformedStreamError, _MALFORMED, _MALFORMED),
)
OTHER_EXCEPTION = Row(ErrorCode.INTERNAL, False, INTERNAL)

IN_STREAM_ERROR = Row(ErrorCode.UPSTREAM_ERROR, True, STREAM_FAILED, detail=True)
TRUNCATED = Row(ErrorCode.UPSTREAM_ERROR, True, ENDED_EARLY)  # a clean end without a finish

# --- mapping ---------------------------------------------------------------------------------


def error_for(row: Row, *, status: int = 0, provider_message: str = "",
              headers: Mapping[str, str] | None = None) -> PromptlineError:
    """The PromptlineError of one row, with what the row asks to add."""
    message = row.message
    if row.with_status:
        message += f" (HTTP {status})"
    if row.detail and (detail := sanitize_provider_message(provider_message)):
        message += f": {detail}"
    retry_after_ms = parse_retry_after_ms(headers) if row.retry_after else 0
    return PromptlineError(row.code, message, retryable=row.retryable,
                           retry_after_ms=retry_after_ms, origin=ORIGIN)


def status_error(status: int, headers: Mapping[str, str], body: bytes) -> PromptlineError:
    """An error reply (status >= 300) with its (possibly cut) body."""
    row = BY_STATUS.get(status) or (SERVER_ERROR if status >= 500 else OTHER_STATUS)
    code, message = _provider_error(_json_error(body))
    if row is _REJECTED and (code in CONTEXT_CODES or CONTEXT_TEXT.search(message)):
        row = _CONTEXT
    return error_for(row, status=status, provider_message=message, headers=headers)


def stream_error(error: object) -> PromptlineError:
    """An in-stream `{"error": ...}` event (its value)."""
    return error_for(IN_STREAM_ERROR, provider_message=_provider_error(error)[1])


def exception_error(exc: Exception, *, in_stream: bool) -> PromptlineError:
    """One of `CAUGHT`, raised while connecting or (`in_stream`) reading the response."""
    for exc_type, connecting, reading in BY_EXCEPTION:
        if isinstance(exc, exc_type):
            return error_for(reading if in_stream else connecting)
    return error_for(OTHER_EXCEPTION)


# --- helpers ---------------------------------------------------------------------------------

# Things that look like secrets: provider keys, bearer tokens, long opaque strings.
_SECRETS = re.compile(
    r"\b(?:sk|pk|rk|key|api[_-]?key)[-_][A-Za-z0-9_\-*.]{4,}|"
    r"\bBearer\s+\S+|"
    r"\b[A-Za-z0-9_\-]{32,}\b",
    re.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")


def sanitize_provider_message(text: object, limit: int = MAX_PROVIDER_MESSAGE) -> str:
    """A short, single-line provider message with anything key-like redacted."""
    if not isinstance(text, str):
        return ""
    text = _SECRETS.sub("[redacted]", text)
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _json_error(body: bytes) -> object:
    """The `error` of a JSON error body (OpenAI's shape), the body itself if bare (vLLM's)."""
    try:
        parsed = json.loads(body.decode("utf-8", errors="replace"))
    except ValueError:
        return None  # an HTML page or plain text: never shown
    return parsed.get("error", parsed) if isinstance(parsed, dict) else None


def _provider_error(error: object) -> tuple[str, str]:
    """(code, message) of a provider's error object, or of a bare message string."""
    if isinstance(error, str):
        return "", error
    if not isinstance(error, dict):
        return "", ""
    code, message = error.get("code"), error.get("message")
    # vLLM sends the HTTP status as an int code.
    return (str(code).lower() if code is not None else "",
            message if isinstance(message, str) else "")


def parse_retry_after_ms(headers: Mapping[str, str] | None, now: float | None = None) -> int:
    """`retry-after-ms` (milliseconds), else `retry-after` (seconds or an HTTP-date); 0 if none."""
    if not headers:
        return 0
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return min(MAX_RETRY_AFTER_MS, math.ceil(value))
    raw = headers.get("retry-after")
    if not raw:
        return 0
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return 0
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds) or seconds < 0:
        return 0
    return min(MAX_RETRY_AFTER_MS, math.ceil(seconds * 1000))


__all__ = [
    "BY_EXCEPTION",
    "BY_STATUS",
    "CAUGHT",
    "CONTEXT_CODES",
    "ORIGIN",
    "TRUNCATED",
    "MalformedStreamError",
    "Row",
    "error_for",
    "exception_error",
    "parse_retry_after_ms",
    "sanitize_provider_message",
    "status_error",
    "stream_error",
]

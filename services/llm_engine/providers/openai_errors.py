"""The one table from the `openai` SDK's exceptions to `PromptlineError`.

The provider raises these types itself (it sends requests on aiohttp, not through the SDK), so
the same table serves both.

Rows are checked in order (most specific class first). Messages are safe to show a user: they
never carry the API key, request headers or raw provider bodies, only, where it helps the caller,
a short sanitized provider message. `stage` is left unset: the engine stamps it.

SDK exception (status)                        -> code, retryable
RateLimitError (429)                          -> UPSTREAM_RATE_LIMITED, yes; retry_after_ms from
                                                 `retry-after-ms` or `retry-after` (s or date)
AuthenticationError (401), PermissionDenied   -> UPSTREAM_ERROR, no: our provider credentials
  (403)                                          were rejected, not the caller's fault
BadRequestError (400), UnprocessableEntity    -> CONTEXT_TOO_LONG when the provider says so,
  (422), 413                                     else INVALID_REQUEST; no
NotFoundError (404)                           -> UPSTREAM_ERROR, no ("model not found ...")
ConflictError (409), 408, InternalServerError -> UPSTREAM_ERROR, yes
  (5xx)
any other APIStatusError (other 4xx)          -> UPSTREAM_ERROR, no
APITimeoutError                               -> UPSTREAM_ERROR, yes
APIConnectionError                            -> UNAVAILABLE, yes ("... is unreachable")
APIResponseValidationError                    -> UPSTREAM_ERROR, no
APIError (an in-stream `error` event)         -> UPSTREAM_ERROR, yes (the engine retries only
                                                 before the first token)
json.JSONDecodeError, UnicodeDecodeError,     -> UPSTREAM_ERROR, yes
  MalformedStreamError (a malformed stream)
asyncio.CancelledError                        -> CANCELLED, no
PromptlineError                               -> itself
anything else (plain OpenAIError included)    -> INTERNAL ("internal error"), no
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import openai

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
CANCELLED = "the request was cancelled"
INTERNAL = "internal error"

_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length",
                            "context_window_exceeded"})
_CONTEXT_TEXT = re.compile(
    r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long|"
    r"input is too long|reduce the length of the messages",
    re.IGNORECASE,
)
# Things that look like secrets: provider keys, bearer tokens, long opaque strings.
_SECRETS = re.compile(
    r"\b(?:sk|pk|rk|key|api[_-]?key)[-_][A-Za-z0-9_\-*.]{4,}|"
    r"\bBearer\s+\S+|"
    r"\b[A-Za-z0-9_\-]{32,}\b",
    re.IGNORECASE,
)


class MalformedStreamError(ValueError):
    """The provider's event stream cannot be parsed (e.g. a line beyond the size limit)."""


_STATUS_PREFIX = re.compile(r"^Error code: \d{3}\s*-\s*")
_WHITESPACE = re.compile(r"\s+")


def _error(code: ErrorCode, message: str, *, retryable: bool, retry_after_ms: int = 0
           ) -> PromptlineError:
    return PromptlineError(code, message, retryable=retryable, retry_after_ms=retry_after_ms,
                           origin=ORIGIN)


# --- helpers ---------------------------------------------------------------------------------


def sanitize_provider_message(text: object, limit: int = MAX_PROVIDER_MESSAGE) -> str:
    """A short, single-line provider message with anything key-like redacted."""
    if not isinstance(text, str):
        return ""
    text = _STATUS_PREFIX.sub("", text.strip())
    text = _SECRETS.sub("[redacted]", text)
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _provider_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return sanitize_provider_message(inner["message"])
        if isinstance(inner, str):
            return sanitize_provider_message(inner)
    return sanitize_provider_message(exc.message)


def _with_detail(base: str, exc: openai.APIError) -> str:
    detail = _provider_message(exc)
    return f"{base}: {detail}" if detail else base


def _status(exc: openai.APIStatusError) -> int:
    status = getattr(exc, "status_code", 0)
    return status if isinstance(status, int) else 0


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
        if when is None:
            return 0
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds) or seconds < 0:
        return 0
    return min(MAX_RETRY_AFTER_MS, math.ceil(seconds * 1000))


def _headers(exc: openai.APIStatusError) -> Mapping[str, str] | None:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None)


def is_context_length_error(exc: openai.APIError) -> bool:
    """Whether the provider says the prompt does not fit the model's context window."""
    code = (exc.code or "").lower()
    if code in _CONTEXT_CODES:
        return True
    body = exc.body
    inner = body.get("error", body) if isinstance(body, Mapping) else None
    if isinstance(inner, Mapping) and str(inner.get("code") or "").lower() in _CONTEXT_CODES:
        return True
    message = _provider_message(exc) or (exc.message or "")
    return bool(_CONTEXT_TEXT.search(message))


# --- rows ------------------------------------------------------------------------------------


def _rate_limited(exc: Any) -> PromptlineError:
    retry_ms = parse_retry_after_ms(_headers(exc))
    return _error(ErrorCode.UPSTREAM_RATE_LIMITED, RATE_LIMITED, retryable=True,
                  retry_after_ms=retry_ms)


def _credentials(_exc: Any) -> PromptlineError:
    # The provider's text often echoes (part of) the key: never pass it on.
    return _error(ErrorCode.UPSTREAM_ERROR, CREDENTIALS_REJECTED, retryable=False)


def _bad_request(exc: Any) -> PromptlineError:
    if is_context_length_error(exc):
        return _error(ErrorCode.CONTEXT_TOO_LONG, _with_detail(CONTEXT_TOO_LONG, exc),
                      retryable=False)
    return _error(ErrorCode.INVALID_REQUEST, _with_detail(INVALID_REQUEST, exc), retryable=False)


def _not_found(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.UPSTREAM_ERROR, MODEL_NOT_FOUND, retryable=False)


def _provider_failed(exc: Any) -> PromptlineError:
    status = _status(exc)
    message = f"{PROVIDER_FAILED} (HTTP {status})" if status else PROVIDER_FAILED
    return _error(ErrorCode.UPSTREAM_ERROR, message, retryable=True)


def _other_status(exc: Any) -> PromptlineError:
    """An APIStatusError the SDK did not give a subclass (408, 413, other 4xx, odd 5xx)."""
    status = _status(exc)
    if status == 429:
        return _rate_limited(exc)
    if status in (401, 403):
        return _credentials(exc)
    if status == 404:
        return _not_found(exc)
    if status in (400, 413, 422):
        return _bad_request(exc)
    if status >= 500 or status in (408, 409):
        return _provider_failed(exc)
    return _error(ErrorCode.UPSTREAM_ERROR, f"{PROVIDER_FAILED} (HTTP {status})",
                  retryable=False)


def _timed_out(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.UPSTREAM_ERROR, TIMED_OUT, retryable=True)


def _unreachable(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.UNAVAILABLE, UNREACHABLE, retryable=True)


def _bad_response(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.UPSTREAM_ERROR, BAD_RESPONSE, retryable=False)


def _malformed_stream(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.UPSTREAM_ERROR, BAD_RESPONSE, retryable=True)


def _in_stream(exc: Any) -> PromptlineError:
    return _error(ErrorCode.UPSTREAM_ERROR, _with_detail(STREAM_FAILED, exc), retryable=True)


def _cancelled(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.CANCELLED, CANCELLED, retryable=False)


def _internal(_exc: Any) -> PromptlineError:
    return _error(ErrorCode.INTERNAL, INTERNAL, retryable=False)


# The table. Order matters: subclasses before their bases.
OPENAI_ERROR_TABLE: tuple[tuple[type[BaseException], Callable[[Any], PromptlineError]], ...] = (
    (openai.RateLimitError, _rate_limited),
    (openai.AuthenticationError, _credentials),
    (openai.PermissionDeniedError, _credentials),
    (openai.BadRequestError, _bad_request),
    (openai.UnprocessableEntityError, _bad_request),
    (openai.NotFoundError, _not_found),
    (openai.ConflictError, _provider_failed),
    (openai.InternalServerError, _provider_failed),
    (openai.APIStatusError, _other_status),
    (openai.APITimeoutError, _timed_out),
    (openai.APIConnectionError, _unreachable),
    (openai.APIResponseValidationError, _bad_response),
    (openai.APIError, _in_stream),
    (json.JSONDecodeError, _malformed_stream),
    (UnicodeDecodeError, _malformed_stream),
    (MalformedStreamError, _malformed_stream),
    (asyncio.CancelledError, _cancelled),
)


def map_openai_error(exc: BaseException, *, in_stream: bool = False) -> PromptlineError:
    """The PromptlineError for an exception raised by the `openai` SDK (or around it).

    `in_stream`: raised while reading an open stream (after the response headers); only the
    wording of a lost connection changes (same code: UNAVAILABLE).
    """
    if isinstance(exc, PromptlineError):
        return exc
    if (in_stream and isinstance(exc, openai.APIConnectionError)
            and not isinstance(exc, openai.APITimeoutError)):
        return _error(ErrorCode.UNAVAILABLE, CONNECTION_LOST, retryable=True)
    for exc_type, build in OPENAI_ERROR_TABLE:
        if isinstance(exc, exc_type):
            return build(exc)
    return _internal(exc)


__all__ = [
    "OPENAI_ERROR_TABLE",
    "ORIGIN",
    "MalformedStreamError",
    "is_context_length_error",
    "map_openai_error",
    "parse_retry_after_ms",
    "sanitize_provider_message",
]

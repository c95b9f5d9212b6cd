"""The one Promptline error type and its single mapping to every wire.

`PromptlineError` carries code/stage/retryable/message (+ retry hint and request id). This module
is the only place that maps it to a gRPC status with rich details, an error frame, an HTTP status,
an SSE/HTTP JSON body and the OpenAI error shape, and back from a gRPC failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from promptline.v1 import common_pb2

ERROR_DOMAIN = "promptline.dev"


class ErrorCode(enum.StrEnum):
    """Stable error codes of the external contract; never renamed."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_REQUEST = "INVALID_REQUEST"
    NOT_FOUND = "NOT_FOUND"
    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
    QPM_EXCEEDED = "QPM_EXCEEDED"
    TPM_EXCEEDED = "TPM_EXCEEDED"
    MODERATION_BLOCKED = "MODERATION_BLOCKED"
    FIRST_TOKEN_TIMEOUT = "FIRST_TOKEN_TIMEOUT"
    STREAM_TIMEOUT = "STREAM_TIMEOUT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UPSTREAM_RATE_LIMITED = "UPSTREAM_RATE_LIMITED"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"


class Stage(enum.StrEnum):
    """Where in a stream's life an error happened."""

    CONNECT = "connect"
    FIRST_PACKET = "first_packet"
    MID_STREAM = "mid_stream"


@dataclass(frozen=True, slots=True)
class _Wire:
    grpc_status: grpc.StatusCode
    http_status: int
    retryable: bool
    openai_type: str


S = grpc.StatusCode
# The contract's error table. HTTP 499 for CANCELLED is nginx's "client closed request".
WIRE: dict[ErrorCode, _Wire] = {
    ErrorCode.UNAUTHENTICATED: _Wire(S.UNAUTHENTICATED, 401, False, "authentication_error"),
    ErrorCode.PERMISSION_DENIED: _Wire(S.PERMISSION_DENIED, 403, False, "permission_error"),
    ErrorCode.INVALID_REQUEST: _Wire(S.INVALID_ARGUMENT, 400, False, "invalid_request_error"),
    ErrorCode.CONTEXT_TOO_LONG: _Wire(S.INVALID_ARGUMENT, 400, False, "invalid_request_error"),
    ErrorCode.NOT_FOUND: _Wire(S.NOT_FOUND, 404, False, "not_found_error"),
    ErrorCode.QPM_EXCEEDED: _Wire(S.RESOURCE_EXHAUSTED, 429, True, "rate_limit_error"),
    ErrorCode.TPM_EXCEEDED: _Wire(S.RESOURCE_EXHAUSTED, 429, True, "rate_limit_error"),
    ErrorCode.MODERATION_BLOCKED: _Wire(S.FAILED_PRECONDITION, 400, False, "content_filter"),
    ErrorCode.FIRST_TOKEN_TIMEOUT: _Wire(S.DEADLINE_EXCEEDED, 504, True, "timeout_error"),
    ErrorCode.STREAM_TIMEOUT: _Wire(S.DEADLINE_EXCEEDED, 504, False, "timeout_error"),
    ErrorCode.DEADLINE_EXCEEDED: _Wire(S.DEADLINE_EXCEEDED, 504, False, "timeout_error"),
    ErrorCode.UPSTREAM_RATE_LIMITED: _Wire(S.RESOURCE_EXHAUSTED, 429, True, "rate_limit_error"),
    # OpenAI's own type for a used-up balance: its SDKs and clients treat it the same.
    ErrorCode.BUDGET_EXCEEDED: _Wire(S.RESOURCE_EXHAUSTED, 429, True, "insufficient_quota"),
    ErrorCode.UPSTREAM_ERROR: _Wire(S.UNAVAILABLE, 502, True, "api_error"),
    ErrorCode.UNAVAILABLE: _Wire(S.UNAVAILABLE, 503, True, "service_unavailable"),
    ErrorCode.CANCELLED: _Wire(S.CANCELLED, 499, False, "cancelled"),
    ErrorCode.INTERNAL: _Wire(S.INTERNAL, 500, False, "server_error"),
}

_SAFE_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INTERNAL: "internal error",
    ErrorCode.UNAVAILABLE: "a service in the chain is unavailable",
    ErrorCode.CANCELLED: "the request was cancelled",
    ErrorCode.DEADLINE_EXCEEDED: "the request ran out of time",
}

# Used when a gRPC call fails without a Promptline error frame or rich details (a crashed hop,
# a proxy, the transport itself).
_FROM_GRPC_STATUS: dict[grpc.StatusCode, ErrorCode] = {
    S.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
    S.PERMISSION_DENIED: ErrorCode.PERMISSION_DENIED,
    S.INVALID_ARGUMENT: ErrorCode.INVALID_REQUEST,
    S.NOT_FOUND: ErrorCode.NOT_FOUND,
    # RESOURCE_EXHAUSTED is absent on purpose: every Promptline rejection carries its details,
    # so a bare one is the transport's own limit (a message or trailer too large): INTERNAL.
    S.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    S.UNAVAILABLE: ErrorCode.UNAVAILABLE,
    S.CANCELLED: ErrorCode.CANCELLED,
}


class PromptlineError(Exception):
    """A failure with a stable code; the only exception type that crosses module boundaries."""

    __slots__ = ("code", "message", "origin", "quota_subject", "request_id", "retry_after_ms",
                 "retryable", "stage")

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        stage: Stage | None = None,
        retryable: bool | None = None,
        retry_after_ms: int = 0,
        request_id: str = "",
        origin: str = "",
        quota_subject: str = "",
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.stage = stage
        self.retryable = WIRE[self.code].retryable if retryable is None else retryable
        self.retry_after_ms = max(0, int(retry_after_ms))
        self.request_id = request_id
        self.origin = origin
        self.quota_subject = quota_subject

    def __repr__(self) -> str:
        return f"PromptlineError({self.code}, stage={self.stage}, {self.message!r})"

    def at(self, stage: Stage, *, request_id: str = "", origin: str = "") -> PromptlineError:
        """Fill in stage, request id and origin where the raiser did not know them."""
        self.stage = self.stage or stage
        self.request_id = self.request_id or request_id
        self.origin = self.origin or origin
        return self

    @property
    def wire(self) -> _Wire:
        return WIRE[self.code]

    @property
    def http_status(self) -> int:
        return self.wire.http_status

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.wire.grpc_status

    # --- protobuf frame -------------------------------------------------------------------

    def to_pb(self) -> common_pb2.Error:
        return common_pb2.Error(
            code=f"ERROR_CODE_{self.code.value}",  # enum labels: the constructor looks them up
            stage=f"STAGE_{(self.stage or Stage.CONNECT).value.upper()}",
            message=self.message,
            retryable=self.retryable,
            retry_after_ms=self.retry_after_ms,
            request_id=self.request_id,
            origin=self.origin,
            quota_subject=self.quota_subject,
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.Error) -> PromptlineError:
        """The error a frame carries; a code or stage this side does not know (a newer hop's,
        during a rolling upgrade) reads as INTERNAL / no stage, with the rest kept."""
        name = _enum_name(common_pb2.ErrorCode, pb.code).removeprefix("ERROR_CODE_")
        code = ErrorCode(name) if name in ErrorCode.__members__ else ErrorCode.INTERNAL
        stage_name = _enum_name(common_pb2.Stage, pb.stage).removeprefix("STAGE_").lower()
        stage = Stage(stage_name) if stage_name in Stage._value2member_map_ else None
        return cls(
            code,
            pb.message,
            stage=stage,
            retryable=pb.retryable,
            retry_after_ms=pb.retry_after_ms,
            request_id=pb.request_id,
            origin=pb.origin,
            quota_subject=pb.quota_subject,
        )

    # --- gRPC status with rich details ----------------------------------------------------

    def to_grpc_status(self) -> grpc.Status:
        """`grpc.Status` carrying `google.rpc.Status`: ErrorInfo, plus RetryInfo/QuotaFailure."""
        info = error_details_pb2.ErrorInfo(
            reason=self.code.value,
            domain=ERROR_DOMAIN,
            metadata={
                "stage": (self.stage or Stage.CONNECT).value,
                "retryable": "true" if self.retryable else "false",
                "request_id": self.request_id,
                "origin": self.origin,
            },
        )
        status = status_pb2.Status(
            code=getattr(code_pb2, self.grpc_status.name), message=_status_message(self.message)
        )
        status.details.add().Pack(info)
        if self.retry_after_ms:
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(
                    seconds=self.retry_after_ms // 1000,
                    nanos=(self.retry_after_ms % 1000) * 1_000_000,
                )
            )
            status.details.add().Pack(retry)
        if self.quota_subject:
            quota = error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=self.quota_subject, description=self.message
                    )
                ]
            )
            status.details.add().Pack(quota)
        return rpc_status.to_status(status)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, *, stage: Stage | None = None) -> PromptlineError:
        """Rebuild the error from a failed call: rich details first, bare status code otherwise."""
        status = None
        try:
            # The stub wants a grpc.Call; it reads only code(), details() and trailing_metadata(),
            # which every RpcError raised by a call (AioRpcError included) has.
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except Exception:
            status = None  # details unreadable: fall back to the status code
        if status is not None:
            built = cls._from_status_details(status)
            if built is not None:
                return built
        code_enum = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        code = _FROM_GRPC_STATUS.get(code_enum, ErrorCode.INTERNAL)
        # Transport-level texts can carry addresses and stack fragments: never in a message.
        message = _SAFE_MESSAGES.get(code) or code.value.lower().replace("_", " ")
        return cls(code, message, stage=stage)

    @classmethod
    def _from_status_details(cls, status: status_pb2.Status) -> PromptlineError | None:
        info: error_details_pb2.ErrorInfo | None = None
        retry_ms = 0
        subject = ""
        for any_pb in status.details:
            if _holds(any_pb, error_details_pb2.ErrorInfo):
                info = error_details_pb2.ErrorInfo()
                any_pb.Unpack(info)
            elif _holds(any_pb, error_details_pb2.RetryInfo):
                retry = error_details_pb2.RetryInfo()
                any_pb.Unpack(retry)
                retry_ms = retry.retry_delay.seconds * 1000 + retry.retry_delay.nanos // 1_000_000
            elif _holds(any_pb, error_details_pb2.QuotaFailure):
                quota = error_details_pb2.QuotaFailure()
                any_pb.Unpack(quota)
                subject = quota.violations[0].subject if quota.violations else ""
        if info is None or info.domain != ERROR_DOMAIN or info.reason not in ErrorCode.__members__:
            return None
        meta = info.metadata
        stage = meta.get("stage", "")
        return cls(
            ErrorCode(info.reason),
            status.message,
            stage=Stage(stage) if stage in Stage._value2member_map_ else None,
            retryable=meta.get("retryable") == "true",
            retry_after_ms=retry_ms,
            request_id=meta.get("request_id", ""),
            origin=meta.get("origin", ""),
            quota_subject=subject,
        )

    # --- HTTP / SSE / OpenAI --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The contract's error object, for SSE `error` events and HTTP error bodies."""
        body: dict[str, Any] = {
            "code": self.code.value,
            "stage": (self.stage or Stage.CONNECT).value,
            "message": self.message,
            "retryable": self.retryable,
            "request_id": self.request_id,
        }
        if self.retry_after_ms:
            body["retry_after_ms"] = self.retry_after_ms
        return body

    def to_openai_dict(self) -> dict[str, Any]:
        """OpenAI's error shape (`type`, `code`, `message`, `param`), plus our fields."""
        body = self.to_dict()
        body["type"] = self.wire.openai_type
        body["code"] = self.code.value.lower()
        body["param"] = None
        return body

    def http_headers(self) -> dict[str, str]:
        """Headers that go with the HTTP status: Retry-After (whole seconds, rounded up)."""
        if not self.retry_after_ms:
            return {}
        return {"Retry-After": str(max(1, -(-self.retry_after_ms // 1000)))}


# A status travels in the trailers (grpc-message percent-encoded, the details in base64), which
# gRPC caps at 8 KiB (16 KiB hard): a message echoing a long input (a 10 kB model name) would
# replace the status with a bare RESOURCE_EXHAUSTED. The error frame keeps the whole message.
STATUS_MESSAGE_BYTES = 1024


def _status_message(text: str) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= STATUS_MESSAGE_BYTES:
        return text
    return raw[:STATUS_MESSAGE_BYTES].decode("utf-8", "ignore") + "..."


def _holds(any_pb: any_pb2.Any, message_type: type[message.Message]) -> bool:
    """Whether `any_pb` packs a `message_type`."""
    # types-protobuf types DESCRIPTOR as `Descriptor | upb Descriptor` but `Any.Is` as taking only
    # the first; the runtime's descriptors are the upb ones.
    return any_pb.Is(message_type.DESCRIPTOR)  # type: ignore[arg-type]


def internal_error(request_id: str = "", stage: Stage | None = None) -> PromptlineError:
    """The safe stand-in for an unexpected exception: never leaks its text."""
    return PromptlineError(
        ErrorCode.INTERNAL, _SAFE_MESSAGES[ErrorCode.INTERNAL], stage=stage, request_id=request_id
    )


def _enum_name(enum: Any, number: int) -> str:
    """The label of `number` in a protobuf enum; "" for a number it does not define."""
    try:
        return str(enum.Name(number))
    except ValueError:
        return ""


__all__ = [
    "ERROR_DOMAIN",
    "WIRE",
    "ErrorCode",
    "PromptlineError",
    "Stage",
    "internal_error",
]


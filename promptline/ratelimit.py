"""`x-ratelimit-*` headers: the tenant's quota state as OpenAI-style response headers.

The prompt service computes them and sends them as gRPC metadata (initial at admission, trailing
with a quota rejection); the edge copies them onto the HTTP response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from promptline.config import Config
from promptline.errors import PromptlineError


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """The tenant's own limits after admission, for `x-ratelimit-*` headers (None: unlimited).

    Model budgets are shared by all tenants, so they are deliberately not exposed here.
    `reset_*_s` is the time until the sliding window is back to empty (with no new traffic).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI-style `x-ratelimit-*` headers for the limits that apply."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests or 0)
            out["x-ratelimit-reset-requests"] = f"{math.ceil(self.reset_requests_s or 0)}s"
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens or 0)
            out["x-ratelimit-reset-tokens"] = f"{math.ceil(self.reset_tokens_s or 0)}s"
        return out


def parse_quota_subject(subject: str) -> tuple[str, str, str]:
    """`tenant:dev:tpm` -> ("tenant", "dev", "tpm"); names may themselves hold colons."""
    scope, _, rest = subject.partition(":")
    name, _, kind = rest.rpartition(":")
    return scope, name, kind


def rejection_limits(config: Config, err: PromptlineError) -> RateLimitInfo:
    """`x-ratelimit-*` values for a tenant quota rejection (remaining 0, reset at the retry hint).

    Model budgets are shared by all tenants, so their rejections carry only Retry-After.
    """
    scope, name, kind = parse_quota_subject(err.quota_subject)
    tenant = next((t for t in config.tenants if t.name == name), None)
    limit = None
    if scope == "tenant" and tenant is not None and kind in ("qpm", "tpm"):
        limit = getattr(tenant.quotas, kind)
    if limit is None:
        return RateLimitInfo()
    reset = err.retry_after_ms / 1000
    if kind == "qpm":
        return RateLimitInfo(limit_requests=limit, remaining_requests=0, reset_requests_s=reset)
    return RateLimitInfo(limit_tokens=limit, remaining_tokens=0, reset_tokens_s=reset)

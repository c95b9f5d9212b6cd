"""API-key authentication shared by the edge (Bearer header) and the prompt service (metadata).

Keys are compared as sha256 digests with `hmac.compare_digest` against every configured key, so
neither the comparison time nor an early exit reveals how much of a key matched.
"""

from __future__ import annotations

import hmac

from promptline.config import TenantConfig, key_digest
from promptline.errors import ErrorCode, PromptlineError, Stage


class Authenticator:
    """Maps a presented API key to its tenant."""

    def __init__(self, tenants: tuple[TenantConfig, ...]) -> None:
        self._entries = [(digest, tenant) for tenant in tenants for digest in tenant.key_digests]

    def tenant_for_header(self, header: str | None) -> TenantConfig:
        """Authenticate an `Authorization: Bearer <key>` value; raises UNAUTHENTICATED."""
        if not header:
            raise _unauthenticated("missing Authorization header (expected 'Bearer <api key>')")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthenticated("malformed Authorization header (expected 'Bearer <api key>')")
        return self.tenant_for_key(key.strip())

    def tenant_for_key(self, key: str) -> TenantConfig:
        presented = key_digest(key)
        found: TenantConfig | None = None
        for digest, tenant in self._entries:  # no early exit: constant work per request
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise _unauthenticated("invalid API key")
        return found


def _unauthenticated(message: str) -> PromptlineError:
    return PromptlineError(ErrorCode.UNAUTHENTICATED, message, stage=Stage.CONNECT)

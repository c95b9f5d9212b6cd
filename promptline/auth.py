"""API-key authentication shared by the edge (Bearer header) and the prompt service (metadata).

Keys are compared as sha256 digests with `hmac.compare_digest` against every configured key, so
neither the comparison time nor an early exit reveals how much of a key matched.
"""

from __future__ import annotations

import hmac
import re

from promptline.config import TenantConfig, key_digest
from promptline.errors import ErrorCode, PromptlineError, Stage

# `Bearer`, blanks, then the key as visible ASCII: what every HTTP proxy and gRPC metadata carry.
_BEARER = re.compile(r"[ \t]*([Bb][Ee][Aa][Rr][Ee][Rr])[ \t]+([\x21-\x7e]+)[ \t]*")


def bearer_key(header: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` value; anything else is UNAUTHENTICATED."""
    if not header:
        raise _unauthenticated("missing Authorization header (expected 'Bearer <api key>')")
    match = _BEARER.fullmatch(header)
    if match is None:
        raise _unauthenticated("malformed Authorization header (expected 'Bearer <api key>')")
    return match.group(2)


def bearer_header(key: str) -> str:
    """The canonical header value for `key`: what a hop forwards, whatever spacing came in."""
    return f"Bearer {key}"


class Authenticator:
    """Maps a presented API key to its tenant."""

    def __init__(self, tenants: tuple[TenantConfig, ...]) -> None:
        self._entries = [(digest, tenant) for tenant in tenants for digest in tenant.key_digests]

    def tenant_for_header(self, header: str | None) -> TenantConfig:
        """Authenticate an `Authorization: Bearer <key>` value; raises UNAUTHENTICATED."""
        return self.tenant_for_key(bearer_key(header))

    def identify(self, header: str | None) -> tuple[TenantConfig, str]:
        """`tenant_for_header`, and the key's id (`key_id`) for budgets and usage."""
        key = bearer_key(header)
        return self.tenant_for_key(key), key_id(key_digest(key))

    def tenant_for_key(self, key: str) -> TenantConfig:
        presented = key_digest(key)
        found: TenantConfig | None = None
        for digest, tenant in self._entries:  # no early exit: constant work per request
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise _unauthenticated("invalid API key")
        return found


def key_id(digest: bytes) -> str:
    """An API key's name in usage reports and budget keys: `key-` and the first 12 hex digits
    of its sha256 (what `sha256:` configs hold), never the key."""
    return f"key-{digest.hex()[:12]}"


def _unauthenticated(message: str) -> PromptlineError:
    return PromptlineError(ErrorCode.UNAUTHENTICATED, message, stage=Stage.CONNECT)

"""Identifier rules shared by every hop, each written once."""

from __future__ import annotations

import re
import uuid

SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""Request and conversation ids: safe in logs, Redis keys, headers and gRPC metadata."""


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when it is a safe token, else a fresh uuid4 hex."""
    if header and SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex

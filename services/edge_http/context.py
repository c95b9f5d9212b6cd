"""What every edge handler shares: typed application keys, process state, the request id rule.

Kept apart from `app.py` so endpoint modules (`openai_api.py`, ...) can import it while
`build_app` imports them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import grpc
from aiohttp import web

from promptline.auth import Authenticator
from promptline.config import Config
from promptline.config_reload import LiveConfig
from promptline.v1 import prompt_pb2_grpc

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Lifecycle:
    """Mutable process state shared with handlers (app keys are frozen once the app starts)."""

    draining: bool = False


LIVE_CONFIG_KEY = web.AppKey("promptline_live_config", LiveConfig)
CHANNEL_KEY = web.AppKey("prompt_channel", grpc.aio.Channel)
STUB_KEY = web.AppKey("prompt_stub", prompt_pb2_grpc.PromptServiceStub)
LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)


def current_config(app: web.Application) -> Config:
    """The config new requests use (it changes on a live reload; a request keeps its copy)."""
    return app[LIVE_CONFIG_KEY].current


def authenticator(app: web.Application) -> Authenticator:
    """The Authenticator for the current config's tenants and keys."""
    return app[LIVE_CONFIG_KEY].derived("auth", lambda c: Authenticator(c.tenants))


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when it is a safe token, else a fresh uuid4 hex."""
    if header and _SAFE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex

"""What every edge handler shares: typed application keys, process state, the authenticated
preamble (`authenticated`).

Kept apart from `app.py` so endpoint modules (`openai_api.py`, ...) can import it while
`build_app` imports them.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from promptline.auth import Authenticator, bearer_header, bearer_key
from promptline.config import Config, TenantConfig
from promptline.config_reload import LiveConfig
from promptline.errors import PromptlineError
from promptline.rules import request_id_from
from promptline.stubs import PromptServiceClient
from services.edge_http.chat_request import BodyError
from services.edge_http.http_errors import error_body_for, error_response

__all__ = ["CHANNEL_KEY", "LIFECYCLE_KEY", "LIVE_CONFIG_KEY", "STUB_KEY", "Caller", "Lifecycle",
           "authenticated", "authenticator", "current_config", "request_id_from"]


@dataclass
class Lifecycle:
    """Mutable process state shared with handlers (app keys are frozen once the app starts)."""

    draining: bool = False


LIVE_CONFIG_KEY = web.AppKey("promptline_live_config", LiveConfig)
CHANNEL_KEY = web.AppKey("prompt_channel", grpc.aio.Channel)
STUB_KEY = web.AppKey[PromptServiceClient]("prompt_stub")
LIFECYCLE_KEY = web.AppKey("lifecycle", Lifecycle)


def current_config(app: web.Application) -> Config:
    """The config new requests use (it changes on a live reload; a request keeps its copy)."""
    return app[LIVE_CONFIG_KEY].current


def authenticator(app: web.Application) -> Authenticator:
    """The Authenticator for the current config's tenants and keys."""
    return app[LIVE_CONFIG_KEY].derived("auth", lambda c: Authenticator(c.tenants))


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: who asks, under which id and config, and what to forward."""

    request_id: str
    tenant: TenantConfig
    config: Config
    metadata: tuple[tuple[str, str], ...]
    """For every downstream call: the canonical `authorization` and the `x-request-id`."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CallerHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


def authenticated(handler: CallerHandler) -> Handler:
    """The preamble of every API handler: request id, then the API key (before the body is read,
    so an unauthenticated caller costs nothing), then `handler`; a PromptlineError it raises
    before answering becomes the HTTP error response, in the path's error shape."""

    @functools.wraps(handler)
    async def preamble(request: web.Request) -> web.StreamResponse:
        rid = request_id_from(request.headers.get("X-Request-Id"))
        try:
            key = bearer_key(request.headers.get("Authorization"))
            tenant = authenticator(request.app).tenant_for_key(key)
            caller = Caller(rid, tenant, current_config(request.app),
                            (("authorization", bearer_header(key)), ("x-request-id", rid)))
            return await handler(request, caller)
        except PromptlineError as err:
            response = error_response(err, rid, body=error_body_for(request.path))
            if isinstance(err, BodyError):
                response.force_close()  # the rest of a broken or oversized body is not read
            return response

    return preamble

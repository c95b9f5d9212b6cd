"""Property-based fuzzing of the edge's HTTP surface: never a 5xx, every 4xx the error body.

Bodies are generated from the request schemas and then mutated (values of every JSON type in
every field, integers of every size up to past Python's 4300-digit limit, strings with every code
point including lone surrogates, byte-level damage), headers carry every byte, and admin paths
every code point. Requests go over raw sockets so that nothing a client library would refuse is
left out. The seed is fixed (`derandomize`), so a failure reproduces; a few thousand examples run
in seconds against one real chain. The strategies, the raw sender and the property live in
`promptline.devtools.http_fuzz`, shared with the fuzz drill (`make drills`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptline.devtools.http_fuzz import (
    admin_requests,
    chat_bodies,
    check,
    damaged,
    exchange,
    extra_headers,
    header_bytes,
)
from tests.chain import Chain, running_chain
from tests.conftest import make_config

FUZZ = settings(max_examples=700, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
AUTH = b"Bearer dev-key"  # an admin tenant, so admin endpoints get past authorization too


@pytest.fixture(scope="module")
async def chain(redis_server: Any) -> AsyncIterator[Chain]:
    config = make_config({"edge": {"heartbeat": "15s", "header_hold": "3s",
                                   "max_body_bytes": 65536}}, redis_url=redis_server.url)
    async with running_chain(config) as running:
        yield running


def with_auth(headers: list[tuple[bytes, bytes]], auth: bool) -> list[tuple[bytes, bytes]]:
    return ([(b"Authorization", AUTH)] if auth else []) + headers


def port(chain: Chain) -> int:
    assert chain.edge is not None
    return int(chain.edge.port)


# --- the properties ------------------------------------------------------------------------------


@FUZZ
@given(path=st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions"]),
       body=damaged(chat_bodies), auth=st.sampled_from([True, True, True, False]),
       headers=st.lists(st.tuples(st.sampled_from([b"Content-Type", b"X-Request-Id", b"Accept"]),
                                  header_bytes), max_size=2))
async def test_chat_bodies(chain: Chain, path: bytes, body: bytes, auth: bool,
                           headers: list[tuple[bytes, bytes]]) -> None:
    check(await exchange(port(chain), b"POST", path, body, with_auth(headers, auth)))


@FUZZ
@given(path=st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions", b"/v1/models",
                             b"/v1/prompts/p/versions", b"/healthz", b"/", b"/nope"]),
       method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
       headers=extra_headers, body=st.binary(max_size=64), auth=st.booleans())
async def test_headers_with_every_byte(chain: Chain, path: bytes, method: bytes,
                                       headers: list[tuple[bytes, bytes]], body: bytes,
                                       auth: bool) -> None:
    check(await exchange(port(chain), method, path, body, with_auth(headers, auth)))


@FUZZ
@given(request=admin_requests())
async def test_admin_endpoints(chain: Chain, request: tuple[bytes, bytes, bytes]) -> None:
    method, path, body = request
    check(await exchange(port(chain), method, path, body, [(b"Authorization", AUTH)]))

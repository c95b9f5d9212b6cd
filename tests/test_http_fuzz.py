"""Property-based fuzzing of the edge's HTTP surface: never a 5xx, every 4xx the error body.

Bodies are generated from the request schemas and then mutated (values of every JSON type in
every field, integers of every size up to past Python's 4300-digit limit, strings with every code
point including lone surrogates, byte-level damage), headers carry every byte, and admin paths
every code point. Requests go over raw sockets so that nothing a client library would refuse is
left out. The seed is fixed (`derandomize`), so a failure reproduces; a few thousand examples run
in seconds against one real chain.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --- JSON with every kind of value, serialized by hand (huge integers, lone surrogates) ---------


@dataclass(frozen=True)
class Digits:
    """An integer literal written as is: Python cannot str() one of more than 4300 digits."""

    text: str


def dumps(value: Any) -> str:
    if isinstance(value, Digits):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: lone surrogates become \ud800 escapes


huge_ints = st.builds(lambda sign, n, d: Digits(sign + d * n), st.sampled_from(["", "-"]),
                      st.sampled_from([19, 20, 309, 4300, 4301, 6000]),
                      st.sampled_from(["9", "1"]))
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = (st.none() | st.booleans() | st.integers() | huge_ints
           | st.floats(allow_nan=False, allow_infinity=False) | any_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(good, good, json_values)


roles = st.sampled_from(["user", "system", "assistant", "developer", "tool", "function", "",
                         "USER"])
message = st.fixed_dictionaries(
    {"role": maybe(roles), "content": maybe(any_text | st.lists(st.fixed_dictionaries(
        {"type": maybe(st.just("text")), "text": maybe(any_text)}), max_size=3))},
    optional={"tool_calls": json_values, "name": any_text})
prompt_ref = st.fixed_dictionaries({}, optional={
    "id": maybe(st.sampled_from(["greeting", "x" * 200, ""])),
    "version": maybe(st.integers(-1, 2**33)), "label": maybe(st.sampled_from(["prod", ""])),
    "variables": maybe(st.dictionaries(any_text, maybe(any_text), max_size=3))})
chat_fields = {
    "model": maybe(st.sampled_from(["sim", "", "unknown-model"])),
    "messages": maybe(st.lists(maybe(message), max_size=3)),
}
chat_optional = {
    "max_tokens": maybe(st.integers(-5, 2**40) | huge_ints),
    "max_completion_tokens": maybe(st.integers(-5, 2**40)),
    "temperature": maybe(st.floats(-1, 3) | huge_ints),
    "conversation_id": maybe(any_text), "prompt": maybe(prompt_ref),
    "stream": maybe(st.booleans()), "n": maybe(st.integers(0, 3)), "user": json_values,
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": json_values})),
}
valid_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["sim", "unknown-model"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                 "content": any_text}), min_size=1, max_size=3)},
    optional={"max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2),
              "conversation_id": st.sampled_from(["c-1", "conv.2"]),
              "stream": st.booleans(), "user": any_text})


@st.composite
def one_field_off(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one field replaced by anything: reaches the checks behind the edge's."""
    body = draw(valid_chat)
    key = draw(st.sampled_from(sorted({*chat_fields, *chat_optional})))
    body[key] = draw(chat_optional[key] if key in chat_optional else chat_fields[key])
    return body


chat_bodies = st.one_of(valid_chat, one_field_off(),
                        st.fixed_dictionaries(chat_fields, optional=chat_optional))
version_bodies = st.fixed_dictionaries(
    {"template": maybe(any_text)},
    optional={"variables": maybe(st.lists(maybe(any_text), max_size=3)),
              "model": maybe(st.sampled_from(["sim", "", "a/b:c"])), "message": json_values,
              "author": json_values, "parameters": maybe(st.fixed_dictionaries({}, optional={
                  "max_tokens": maybe(st.integers()), "temperature": maybe(st.floats()),
                  "top_p": json_values}))})
label_bodies = st.fixed_dictionaries({}, optional={"version": maybe(st.integers(-2, 2**33))})


@st.composite
def damaged(draw: st.DrawFn, bodies: st.SearchStrategy[Any]) -> bytes:
    """A body as JSON text, then maybe damaged byte by byte (truncated, spliced, flipped)."""
    raw = dumps(draw(st.one_of(bodies, bodies, bodies, json_values))).encode("utf-8",
                                                                          "surrogatepass")
    how = draw(st.sampled_from(["none", "none", "truncate", "insert", "flip"]))
    if raw and how == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif raw and how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return raw


header_bytes = st.binary(max_size=60)
extra_headers = st.lists(st.tuples(
    st.sampled_from([b"Authorization", b"X-Request-Id", b"Content-Type", b"Content-Encoding",
                     b"Accept", b"Expect", b"Transfer-Encoding", b"X-Fuzz", b"Traceparent"]),
    header_bytes), max_size=3)


# --- a raw HTTP/1.1 exchange ---------------------------------------------------------------------


async def exchange(chain: Chain, method: bytes, path: bytes, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on its own connection; the first response's status, headers and body."""
    assert chain.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.edge.port)
    try:
        lines = [method + b" " + path + b" HTTP/1.1", b"Connection: close", b"Host: edge",
                 *(name + b": " + value for name, value in headers),
                 b"Content-Length: " + str(len(body)).encode()]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head[:-4].split(b"\r\n")
            status = int(status_line.split()[1])
            got = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(b":") for line in header_lines)}
            if b"content-length" in got:
                content = await reader.readexactly(int(got[b"content-length"]))
            else:  # chunked (a stream): read it to its end, which also proves it ends
                content = b""
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    content += (await reader.readexactly(size + 2))[:-2]
        return status, got, content
    finally:
        writer.close()


def check(status: int, headers: dict[bytes, bytes], body: bytes) -> None:
    """The property: never a 5xx; every 4xx is the JSON error object with a code and an id."""
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert headers.get(b"content-type", b"").startswith(b"application/json"), (status, body)
        err = json.loads(body)["error"]
        assert err["code"] and err["request_id"] and isinstance(err["message"], str), err
        assert "Traceback" not in err["message"]


def with_auth(headers: list[tuple[bytes, bytes]], auth: bool) -> list[tuple[bytes, bytes]]:
    return ([(b"Authorization", AUTH)] if auth else []) + headers


# --- the properties ------------------------------------------------------------------------------


@FUZZ
@given(path=st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions"]),
       body=damaged(chat_bodies), auth=st.sampled_from([True, True, True, False]),
       headers=st.lists(st.tuples(st.sampled_from([b"Content-Type", b"X-Request-Id", b"Accept"]),
                                  header_bytes), max_size=2))
async def test_chat_bodies(chain: Chain, path: bytes, body: bytes, auth: bool,
                           headers: list[tuple[bytes, bytes]]) -> None:
    check(*await exchange(chain, b"POST", path, body, with_auth(headers, auth)))


@FUZZ
@given(path=st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions", b"/v1/models",
                             b"/v1/prompts/p/versions", b"/healthz", b"/", b"/nope"]),
       method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
       headers=extra_headers, body=st.binary(max_size=64), auth=st.booleans())
async def test_headers_with_every_byte(chain: Chain, path: bytes, method: bytes,
                                       headers: list[tuple[bytes, bytes]], body: bytes,
                                       auth: bool) -> None:
    check(*await exchange(chain, method, path, body, with_auth(headers, auth)))


def quoted(text: str) -> bytes:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="").encode()


@FUZZ
@given(route=st.sampled_from(["create", "list", "get", "label_get", "label_put", "conv_get",
                              "conv_delete"]),
       prompt_id=st.one_of(st.sampled_from(["greeting", "a.b-c"]), any_text),
       other=st.one_of(st.sampled_from(["1", "prod", "0", "99999999999"]), any_text),
       query=st.lists(st.tuples(st.sampled_from(["limit", "before", "x"]), any_text), max_size=2),
       version_body=damaged(version_bodies), label_body=damaged(label_bodies))
async def test_admin_endpoints(chain: Chain, route: str, prompt_id: str, other: str,
                               query: list[tuple[str, str]], version_body: bytes,
                               label_body: bytes) -> None:
    pid, arg = quoted(prompt_id) or b"x", quoted(other) or b"x"
    qs = "&".join(f"{k}={urllib.parse.quote(v.encode('utf-8', 'surrogatepass'))}"
                  for k, v in query).encode()
    method, path, body = {
        "create": (b"POST", b"/v1/prompts/" + pid + b"/versions", version_body),
        "list": (b"GET", b"/v1/prompts/" + pid + b"/versions?" + qs, b""),
        "get": (b"GET", b"/v1/prompts/" + pid + b"/versions/" + arg, b""),
        "label_get": (b"GET", b"/v1/prompts/" + pid + b"/labels/" + arg, b""),
        "label_put": (b"PUT", b"/v1/prompts/" + pid + b"/labels/" + arg, label_body),
        "conv_get": (b"GET", b"/v1/conversations/" + pid, b""),
        "conv_delete": (b"DELETE", b"/v1/conversations/" + pid, b""),
    }[route]
    check(*await exchange(chain, method, path, body, [(b"Authorization", AUTH)]))

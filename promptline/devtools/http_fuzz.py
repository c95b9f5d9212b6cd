"""Hypothesis strategies for malformed HTTP requests, a raw HTTP/1.1 client, and the property every
edge answer must have (dev tooling: never imported by a service).

Shared by tests/test_http_fuzz.py (a few thousand examples against an in-process chain) and the
fuzz drill (`promptline.devtools.drills.fuzz_drill`, tens of thousands against a deployment).

- JSON of every kind, serialized by hand: integers of every size up to past Python's 4300-digit
  limit, strings with every code point including lone surrogates; bodies shaped like each
  endpoint's, with values of every JSON type in every field, then damaged byte by byte.
- What a client library refuses to send: header values with every byte, odd methods and paths,
  wrong and duplicated Content-Lengths, broken chunking, bare LFs, deeply nested and huge bodies,
  invalid UTF-8, NULs, broken compression (`framing_requests`, `big_bodies`, `PARSER_CASES`).
- `exchange`/`send_raw` send bytes on their own connection and read the one answer, streams to
  their end; `problem` is the property: no 5xx, every 4xx the JSON error object, no stream that
  ends in an INTERNAL error.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

# --- JSON with every kind of value, serialized by hand (huge integers, lone surrogates) -----------


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


def encode(value: Any) -> bytes:
    """`dumps(value)` as the bytes on the wire."""
    return dumps(value).encode("utf-8", "surrogatepass")


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


# --- request bodies, endpoint by endpoint ---------------------------------------------------------

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
label_bodies = st.fixed_dictionaries({}, optional={
    "version": maybe(st.integers(-2, 2**33)),
    "split": maybe(st.dictionaries(st.one_of(st.sampled_from(["1", "2", "0", "x"]), any_text),
                                   st.one_of(st.integers(-2, 2**33), json_values), max_size=3)),
    "require_eval": maybe(st.one_of(st.booleans(), json_values))})
eval_bodies = st.fixed_dictionaries({}, optional={
    "cases": maybe(st.integers(-2, 2**33)), "passed": maybe(st.integers(-2, 2**33)),
    "regressions": maybe(st.integers(-2, 2**33)), "cost_usd": maybe(any_text),
    "against_label": maybe(any_text), "cases_sha256": maybe(any_text)})
policy_bodies = st.fixed_dictionaries({}, optional={
    "require_eval": maybe(st.one_of(st.booleans(), json_values)),
    "min_pass_rate": maybe(st.one_of(st.floats(allow_nan=False), json_values))})


@st.composite
def damaged(draw: st.DrawFn, bodies: st.SearchStrategy[Any]) -> bytes:
    """A body as JSON text, then maybe damaged byte by byte (truncated, spliced, flipped)."""
    raw = encode(draw(st.one_of(bodies, bodies, bodies, json_values)))
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


# --- headers and paths ----------------------------------------------------------------------------

header_bytes = st.binary(max_size=60)
extra_headers = st.lists(st.tuples(
    st.sampled_from([b"Authorization", b"X-Request-Id", b"Content-Type", b"Content-Encoding",
                     b"Accept", b"Expect", b"Transfer-Encoding", b"X-Fuzz", b"Traceparent"]),
    header_bytes), max_size=3)


def quoted(text: str) -> bytes:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="").encode()


ADMIN_ROUTES = ("create", "list", "get", "label_get", "label_put", "rollback", "eval_post",
                "eval_get", "policy_get", "policy_put", "conv_get", "conv_delete")


@st.composite
def admin_requests(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """(method, path, body) of a prompt or conversation endpoint, with ids, versions, labels and
    query values of every code point, and damaged bodies."""
    route = draw(st.sampled_from(ADMIN_ROUTES))
    pid = quoted(draw(st.one_of(st.sampled_from(["greeting", "a.b-c"]), any_text))) or b"x"
    arg = quoted(draw(st.one_of(st.sampled_from(["1", "prod", "0", "99999999999"]),
                                any_text))) or b"x"
    query = draw(st.lists(st.tuples(st.sampled_from(["limit", "before", "x"]), any_text),
                          max_size=2))
    qs = "&".join(f"{k}={urllib.parse.quote(v.encode('utf-8', 'surrogatepass'))}"
                  for k, v in query).encode()
    if route == "create":
        return b"POST", b"/v1/prompts/" + pid + b"/versions", draw(damaged(version_bodies))
    if route == "label_put":
        return b"PUT", b"/v1/prompts/" + pid + b"/labels/" + arg, draw(damaged(label_bodies))
    if route == "eval_post":
        return (b"POST", b"/v1/prompts/" + pid + b"/versions/" + arg + b"/evals",
                draw(damaged(eval_bodies)))
    if route == "policy_put":
        return b"PUT", b"/v1/prompts/" + pid + b"/policy", draw(damaged(policy_bodies))
    return {
        "list": (b"GET", b"/v1/prompts/" + pid + b"/versions?" + qs, b""),
        "get": (b"GET", b"/v1/prompts/" + pid + b"/versions/" + arg, b""),
        "label_get": (b"GET", b"/v1/prompts/" + pid + b"/labels/" + arg, b""),
        "rollback": (b"POST", b"/v1/prompts/" + pid + b"/labels/" + arg + b"/rollback", b""),
        "eval_get": (b"GET", b"/v1/prompts/" + pid + b"/versions/" + arg + b"/evals", b""),
        "policy_get": (b"GET", b"/v1/prompts/" + pid + b"/policy", b""),
        "conv_get": (b"GET", b"/v1/conversations/" + pid, b""),
        "conv_delete": (b"DELETE", b"/v1/conversations/" + pid, b""),
    }[route]


# Every route of the edge, as a concrete path (tests/test_openapi.py pins the list of routes).
ENDPOINT_PATHS = (b"/v1/chat/stream", b"/v1/chat/stream/r-1", b"/v1/chat/stream/r-1/cancel",
                  b"/v1/chat/completions", b"/v1/models",
                  b"/v1/prompts/p/versions", b"/v1/prompts/p/versions/1",
                  b"/v1/prompts/p/labels/prod", b"/v1/prompts/p/stats", b"/v1/feedback",
                  b"/v1/prompts/p/labels/prod/rollback", b"/v1/prompts/p/versions/1/evals",
                  b"/v1/prompts/p/policy",
                  b"/v1/usage", b"/v1/conversations/c-1", b"/",
                  b"/static/chat.js", b"/healthz", b"/readyz", b"/metrics", b"/openapi.json")
METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD")
_TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
odd_methods = st.one_of(
    st.sampled_from(METHODS), st.sampled_from(METHODS),
    st.sampled_from([b"TRACE", b"CONNECT", b"QUERY", b"PROPFIND", b"get", b"Post", b"M" * 100,
                     b"GET\x00", b"G\xc3\x89T", b"\x16\x03\x01", b""]),
    st.text(_TCHAR, min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=12))
_PATH_SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "%", "%zz", "%00", "%2F", "%2e%2e", "%C0%AF", "%ff",
                     "?", "#", ";a=b", "x" * 300]),
    any_text.map(lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1")))
odd_paths = st.one_of(
    st.sampled_from(ENDPOINT_PATHS),
    st.sampled_from([b"*", b"//v1//chat/stream", b"/v1/chat/stream/", b"/V1/CHAT/STREAM",
                     b"/v1/chat/%73tream", b"http://edge/v1/models", b"https://[::1/x",
                     b"/v1/models#frag", b"/v1/models?" + b"a=" * 2000, b"/" + b"a" * 8100,
                     b"/static/../../etc/passwd", b"/static/%2e%2e/%2e%2e/etc/passwd",
                     b"/static/", b"/static/%00", b"/v1/prompts//versions", b"v1/models",
                     b"/\xff\xfe", b"/v1/prompts/\xc3\x28/versions", b"/\x00", b"/a\tb"]),
    st.builds(lambda base, segments: base + b"/" + b"/".join(
        s.encode("latin-1") for s in segments),
        st.sampled_from([b"", b"/v1/prompts", b"/v1/conversations", b"/static", b"/v1/chat"]),
        st.lists(_PATH_SEGMENTS, min_size=1, max_size=4)),
    st.binary(min_size=1, max_size=40))
_VERSIONS = st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9",
                                                  b"HTTP/1.10", b"HTTP/1", b"http/1.1",
                                                  b"HTTP/1.1 x", b"", b"HTTP/\xff"])
FRAMINGS = ("exact", "exact", "exact", "longer", "shorter", "negative", "not a number",
            "plus sign", "leading zeros", "spaces", "duplicate", "duplicate same", "huge",
            "chunked", "chunked", "chunked bad size", "chunked unterminated", "chunked and length",
            "chunked twice", "gzip chunked", "none")


@dataclass
class RawRequest:
    """Bytes to send on a fresh connection, and how: `half_close` ends the client's side after
    them (a body shorter than declared then reaches its end instead of waiting forever)."""

    data: bytes
    method: bytes = b""
    target: bytes = b""
    half_close: bool = False
    label: str = ""
    """What produced it (for the report)."""
    meta: dict[str, Any] = field(default_factory=dict)


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes, *, content_length: bool = True, close: bool = True,
                  version: bytes = b"HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
    """One HTTP/1.1 request as bytes: request line, Host, the headers as given, the body."""
    lines = [method + b" " + target + b" " + version, b"Host: edge",
             *([b"Connection: close"] if close else []),
             *(name + b": " + value for name, value in headers),
             *([b"Content-Length: " + str(len(body)).encode()] if content_length else [])]
    return eol.join(lines) + eol + eol + body


def _chunked(body: bytes, pieces: int) -> bytes:
    step = max(1, len(body) // max(1, pieces))
    out = b"".join(b"%x\r\n" % len(body[i:i + step]) + body[i:i + step] + b"\r\n"
                   for i in range(0, len(body), step))
    return out + b"0\r\n\r\n"


@st.composite
def framing_requests(draw: st.DrawFn, auth: bytes) -> RawRequest:
    """A request broken where HTTP/1.1 frames it: the method, the target, the version, the
    header block (bare LFs, folded lines, no colon, no Host) and the body's length or chunks."""
    method = draw(odd_methods)
    target = draw(odd_paths)
    version = draw(_VERSIONS)
    body = draw(st.one_of(damaged(chat_bodies), st.binary(max_size=40)))
    headers = [(b"Authorization", auth)] if draw(st.integers(0, 3)) else []
    headers += draw(extra_headers)
    odd = draw(st.sampled_from(["", "", "", "folded", "no colon", "empty name",
                                "space before colon", "nul in value", "cr in value", "many",
                                "long value"]))
    lines = [name + b": " + value for name, value in headers]
    lines += {
        "": [], "folded": [b"X-Folded: a", b" b"], "no colon": [b"X-NoColon"],
        "empty name": [b": x"], "space before colon": [b"X-Sp : 1"],
        "nul in value": [b"X-Nul: a\x00b"], "cr in value": [b"X-Cr: a\rb"],
        "many": [b"X-H%d: 1" % i for i in range(draw(st.sampled_from([50, 99, 101])))],
        "long value": [b"X-Long: " + b"v" * draw(st.sampled_from([4000, 8190, 8191, 9000]))],
    }[odd]
    eol = b"\r\n" if draw(st.integers(0, 7)) else b"\n"
    framing = draw(st.sampled_from(FRAMINGS))
    length = {"exact": str(len(body)).encode(), "longer": str(len(body) + 10).encode(),
              "shorter": str(max(0, len(body) - 3)).encode(), "negative": b"-1",
              "not a number": b"abc", "plus sign": b"+%d" % len(body),
              "leading zeros": b"000%d" % len(body), "spaces": b" %d " % len(body),
              "huge": b"9" * 30}.get(framing)
    half_close = framing in ("longer", "chunked unterminated")
    if length is not None:
        lines.append(b"Content-Length: " + length)
    elif framing.startswith("duplicate"):
        extra = 0 if framing.endswith("same") else 1
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + extra)]
    elif framing.startswith("chunked") or framing == "gzip chunked":
        coding = {"chunked twice": b"chunked, chunked", "gzip chunked": b"gzip, chunked"
                  }.get(framing, b"chunked")
        lines.append(b"Transfer-Encoding: " + coding)
        if framing == "chunked and length":
            lines.append(b"Content-Length: %d" % len(body))
        chunked = _chunked(body, draw(st.integers(1, 4)))
        if framing == "chunked bad size":
            chunked = draw(st.sampled_from([b"zz", b"-1", b"1;" + b"x" * 9000, b"ffffffffffffffff",
                                            b"0x10", b" 5"])) + b"\r\n" + body + b"\r\n0\r\n\r\n"
        elif framing == "chunked unterminated":
            chunked = chunked[:-5]
        body = chunked
    data = eol.join([method + b" " + target + (b" " + version if version else b""),
                     *([b"Host: edge"] if draw(st.integers(0, 7)) else []),
                     b"Connection: close", *lines]) + eol + eol + body
    return RawRequest(data, method, target, half_close, "framing", {"framing": framing})


# --- big, deep and badly encoded bodies -----------------------------------------------------------

CHAT_PREFIX = b'{"model":"sim","messages":[{"role":"user","content":"hi"}]'
_BOMB: dict[str, bytes] = {}


def _bomb(limit: int) -> bytes:
    """A small gzip body that inflates past `limit` (made once per limit)."""
    key = str(limit)
    if key not in _BOMB:
        _BOMB[key] = gzip.compress(CHAT_PREFIX + b" " * (limit * 2) + b"}", 9)
    return _BOMB[key]


@st.composite
def big_bodies(draw: st.DrawFn, limit: int) -> tuple[bytes, list[tuple[bytes, bytes]], str]:
    """(body, extra headers, kind): deep nesting, sizes around `limit` (edge.max_body_bytes),
    strings far past their field's limit, many keys, long numbers, invalid UTF-8, NULs,
    byte-order marks, other charsets, and compressed bodies (valid, broken, a bomb past the
    limit)."""
    kind = draw(st.sampled_from([
        "deep arrays", "deep objects", "deep in a field", "unbalanced", "at the limit",
        "over the limit", "long content", "many keys", "many messages", "long number",
        "long float", "invalid utf-8", "nul bytes", "nul escapes", "bom", "utf-16", "gzip",
        "gzip broken", "gzip bomb", "deflate", "deflate raw", "double encoding",
        "encoding case", "long string", "long string"]))
    depth = draw(st.sampled_from([64, 999, 1000, 1001, 5000, 100_000, max(1, limit // 2 - 64)]))
    headers: list[tuple[bytes, bytes]] = []
    size = draw(st.sampled_from([limit - 1, limit, limit + 1, limit * 2]))
    if kind == "deep arrays":
        body = b"[" * depth + b"]" * depth
    elif kind == "deep objects":
        body = b'{"a":' * depth + b"1" + b"}" * depth
    elif kind == "deep in a field":
        name = draw(st.sampled_from([b"temperature", b"model", b"messages", b"prompt",
                                     b"conversation_id", b"user"]))
        body = CHAT_PREFIX + b',"' + name + b'":' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "unbalanced":
        body = b"[" * depth
    elif kind in ("at the limit", "over the limit"):
        n = (limit if kind == "at the limit" else size) - len(CHAT_PREFIX) - 1
        body = CHAT_PREFIX + b" " * max(0, n) + b"}"
    elif kind == "long content":
        n = draw(st.sampled_from([10_000, 100_000, limit // 2]))
        body = (b'{"model":"sim","max_tokens":1,"messages":[{"role":"user","content":"'
                + b"a " * (n // 2) + b'"}]}')
    elif kind == "long string":  # ids, names and roles far past their limits
        text = draw(st.sampled_from(["x", "\u00e9", "\U0001f600", "%"])) * draw(
            st.sampled_from([129, 1025, 8_000, 20_000, 70_000]))
        value = json.dumps(text).encode()
        body = draw(st.sampled_from([
            b'{"model":' + value + b',"messages":[{"role":"user","content":"hi"}]}',
            CHAT_PREFIX + b',"conversation_id":' + value + b"}",
            CHAT_PREFIX + b',"prompt":{"id":' + value + b"}}",
            CHAT_PREFIX + b',"prompt":{"id":"p","label":' + value + b"}}",
            CHAT_PREFIX + b',"prompt":{"id":"p","variables":{' + value + b':"v"}}}',
            b'{"model":"sim","messages":[{"role":' + value + b',"content":"hi"}]}',
            b'{"template":' + value + b',"model":' + value + b',"author":' + value + b"}"]))
    elif kind == "many keys":
        n = draw(st.sampled_from([1000, 50_000]))
        body = CHAT_PREFIX + b"".join(b',"k%d":%d' % (i, i) for i in range(n)) + b"}"
    elif kind == "many messages":
        n = draw(st.sampled_from([999, 1000, 1001, 20_000]))
        body = (b'{"model":"sim","max_tokens":1,"messages":['
                + b",".join([b'{"role":"user","content":"x"}'] * n) + b"]}")
    elif kind == "long number":
        digits = b"9" * draw(st.sampled_from([4300, 4301, 100_000]))
        name = draw(st.sampled_from([b"max_tokens", b"temperature", b"x"]))
        sign = draw(st.sampled_from([b"", b"-"]))
        body = CHAT_PREFIX + b',"' + name + b'":' + sign + digits + b"}"
    elif kind == "long float":
        body = CHAT_PREFIX + b',"temperature":' + draw(st.sampled_from(
            [b"1e400", b"-1e400", b"1e-400", b"0." + b"0" * 5000 + b"1", b"1.0", b"-0",
             b"1E+2", b"NaN", b"Infinity"])) + b"}"
    elif kind == "invalid utf-8":
        bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82",
                                    b"\xf4\x90\x80\x80", b"\x80"]))
        at = draw(st.sampled_from(["model", "content", "key", "outside"]))
        body = {"model": b'{"model":"s' + bad + b'im","messages":[{"role":"user","content":"hi"}]}',
                "content": b'{"model":"sim","messages":[{"role":"user","content":"' + bad
                           + b'"}]}',
                "key": CHAT_PREFIX + b',"' + bad + b'":1}',
                "outside": CHAT_PREFIX + b"}" + bad}[at]
    elif kind == "nul bytes":
        body = draw(st.sampled_from([b"\x00", CHAT_PREFIX + b"}\x00", b"\x00" + CHAT_PREFIX + b"}",
                                     b'{"model":"si\x00m","messages":[]}']))
    elif kind == "nul escapes":
        at = draw(st.sampled_from(["model", "content", "role", "conversation_id", "prompt"]))
        esc = "\\u0000"
        body = {"model": f'{{"model":"{esc}","messages":[{{"role":"user","content":"hi"}}]}}',
                "content": f'{{"model":"sim","messages":[{{"role":"user","content":"a{esc}"}}]}}',
                "role": f'{{"model":"sim","messages":[{{"role":"user{esc}","content":"hi"}}]}}',
                "conversation_id": (CHAT_PREFIX.decode() + f',"conversation_id":"c{esc}"}}'),
                "prompt": (CHAT_PREFIX.decode() + f',"prompt":{{"id":"p{esc}",'
                           f'"variables":{{"{esc}":"{esc}"}}}}}}')}[at].encode()
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + CHAT_PREFIX + b"}"
    elif kind == "utf-16":
        body = (CHAT_PREFIX + b"}").decode().encode(draw(st.sampled_from(["utf-16",
                                                                           "utf-32"])))
        headers.append((b"Content-Type", b"application/json; charset=utf-16"))
    elif kind in ("gzip", "gzip broken", "gzip bomb"):
        headers.append((b"Content-Encoding", b"gzip"))
        body = (gzip.compress(CHAT_PREFIX + b',"max_tokens":1}') if kind != "gzip bomb"
                else _bomb(limit))
        if kind == "gzip broken":
            body = body[:draw(st.integers(0, len(body) - 1))]
    elif kind in ("deflate", "deflate raw"):
        headers.append((b"Content-Encoding", b"deflate"))
        packer = zlib.compressobj(wbits=15 if kind == "deflate" else -15)
        body = packer.compress(CHAT_PREFIX + b',"max_tokens":1}') + packer.flush()
    elif kind == "double encoding":
        headers.append((b"Content-Encoding", draw(st.sampled_from(
            [b"gzip, gzip", b"gzip,identity", b"identity, gzip", b"br", b"zstd", b"x-gzip",
             b"compress", b"*"]))))
        body = gzip.compress(gzip.compress(CHAT_PREFIX + b"}"))
    else:  # encoding case
        headers.append((b"Content-Encoding", draw(st.sampled_from(
            [b"GZIP", b" gzip ", b"Identity", b"", b"\xff", b"gzip\x00"]))))
        body = CHAT_PREFIX + b"}"
    return body, headers, kind


# Requests aiohttp's HTTP parser rejects before any handler runs (tests/test_http_parser_errors.py
# expects each to be answered 400 INVALID_REQUEST, "malformed HTTP request..." in the JSON body).
PARSER_CASES = {
    "bad method token": b"GE\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid header bytes": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad\x00: 1\r\n\r\n",
    "header name with a space": b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
    "duplicated Content-Length": (b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    "request line over the limit": b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over the limit": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "too many headers": (b"GET / HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n"),
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    "bad chunk size": (b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                       b"\r\nAuthorization: Bearer dev-key\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
}


# --- a raw HTTP/1.1 exchange ----------------------------------------------------------------------


@dataclass
class Answer:
    """The first final response to a request: status, headers (lower-case names), body."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


class NoAnswer(Exception):
    """The connection closed before a complete response arrived."""


async def send_raw(host: str, port: int, data: bytes, *, within: float = 20.0,
                   head: bool = False, half_close: bool = False) -> Answer:
    """Send `data` on a fresh connection; read the first final response, a chunked one (a
    stream) to its end, which also proves it ends. TimeoutError after `within` s, NoAnswer when
    the server closes first. `head`: a response to HEAD, which has no body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(within):
            writer.write(data)
            if half_close and writer.can_write_eof():
                writer.write_eof()
            try:
                await writer.drain()
            except ConnectionError:
                pass  # the server answered (and closed) before reading it all: read the answer
            try:
                return await _read_answer(reader, head)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError) as exc:
                raise NoAnswer(f"{type(exc).__name__}: {exc}"[:200]) from None
    finally:
        writer.close()


async def _read_answer(reader: asyncio.StreamReader, head: bool) -> Answer:
    while True:
        block = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = block[:-4].split(b"\r\n")
        status = int(status_line.split()[1])
        if status >= 200 or status == 101:
            break  # 1xx (100 Continue) precede the real answer
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(b":") for line in header_lines)}
    if head or status in (204, 304):
        return Answer(status, headers, b"")
    if b"content-length" in headers:
        return Answer(status, headers, await reader.readexactly(int(headers[b"content-length"])))
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        content = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
            content += (await reader.readexactly(size + 2))[:-2]
        return Answer(status, headers, content)
    return Answer(status, headers, await reader.read())  # Connection: close


async def exchange(port: int, method: bytes, path: bytes, body: bytes,
                   headers: list[tuple[bytes, bytes]], *, host: str = "127.0.0.1",
                   within: float = 20.0) -> Answer:
    """One request (Content-Length: the body's) on its own connection; its first response."""
    return await send_raw(host, port, request_bytes(method, path, headers, body),
                          within=within, head=method == b"HEAD")


# --- the property ---------------------------------------------------------------------------------

FORBIDDEN_CODES = ("INTERNAL", "UNKNOWN")


def problem(answer: Answer, *, bodyless_ok: bool = False) -> str | None:
    """What is wrong with an answer, or None: a 5xx; a 4xx that is not the JSON error object
    (code, request id, a message without a traceback), unless `bodyless_ok` (a HEAD, or a status
    the API description documents without a body); a stream that ends in an INTERNAL error."""
    status, headers, body = answer.status, answer.headers, answer.body
    if status >= 500:
        return f"HTTP {status}"
    if status >= 400:
        if bodyless_ok and not body:
            return None
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            return f"HTTP {status} without a JSON body"
        try:
            err = json.loads(body)["error"]
            ok = (isinstance(err, dict) and err.get("code") and err.get("request_id")
                  and isinstance(err.get("message"), str))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return f"HTTP {status} without the error object"
        if "Traceback" in err["message"]:
            return f"HTTP {status}: a traceback in the message"
        return None
    if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        return _stream_problem(body)
    return None


def _stream_problem(body: bytes) -> str | None:
    """An SSE body (native or OpenAI's): it ends with a terminal event, never an INTERNAL one."""
    datas = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
    events = [line[6:].strip() for line in body.split(b"\n") if line.startswith(b"event:")]
    for data in datas:
        if b'"error"' in data:
            try:
                code = str(json.loads(data)["error"].get("code", "")).upper()
            except (ValueError, KeyError, TypeError, AttributeError):
                return "a stream error event that is not the error object"
            if code in FORBIDDEN_CODES:
                return f"a stream that ended in {code}"
    terminal = (events and events[-1] in (b"done", b"error")) or (datas and datas[-1] == b"[DONE]")
    return None if terminal else "a stream without a terminal event"


def check(answer: Answer) -> None:
    """`problem` as an assertion (for tests)."""
    found = problem(answer)
    assert found is None, (found, answer.status, answer.body[:300])

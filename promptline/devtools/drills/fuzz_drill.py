"""The fuzz drill: tens of thousands of malformed requests to every HTTP endpoint and every gRPC
method of a real deployment; never a 5xx, never INTERNAL or UNKNOWN, every rejection typed.

HTTP, over raw sockets (`promptline.devtools.http_fuzz`), so nothing a client library refuses is
left out:
- `schema-coverage`, `schema-positive`, `schema-negative`: Schemathesis driven by the edge's own
  `GET /openapi.json`: its coverage phase (every boundary, missing field, wrong type and
  unexpected method, deterministic), then Hypothesis-generated cases that match each operation's
  schemas and cases that break them. A schema-valid request the edge rejects with a 4xx is fine
  (JSON Schema's `integer` takes 1.0, Python's `$` matches before a final newline, ...); a 5xx or
  a 4xx without the error object is not.
- `chat-bodies`, `admin`, `headers`: chat and admin bodies with values of every JSON type in
  every field, damaged byte by byte; ids of every code point in paths; header values of every
  byte, on every route and method.
- `framing`, `big-bodies`, `parser-cases`: odd methods, targets and versions, wrong, duplicated
  and huge Content-Lengths, broken chunking, bare LFs, folded and nameless headers, deeply nested
  and huge JSON, invalid UTF-8, NULs, byte-order marks, broken and bomb compression.

gRPC, raw bytes through a generic call (no serializer), with `authorization` so a request that
decodes goes past the auth check: bytes that are not valid protobuf (garbage, truncated, bad
varints, lengths past the end, invalid wire types, field 0, unmatched groups, invalid UTF-8 in a
string field, garbage in a message field), valid protobuf with the wrong wire type in a declared
field, and well-typed messages with extreme values, to PromptService/StreamChat, every
PromptAdmin method and LlmEngine/Generate. A rejection must be a typed status (not INTERNAL or
UNKNOWN) with `google.rpc.Status` details naming a Promptline code, and on a stream an error frame
first.

Everything comes from Hypothesis with fixed seeds (from `SEED`, one per chunk of a campaign), so
a run sends the same requests again. The report shows the first failing requests as bytes, each
with its campaign, seed and position: `_seeded(campaign, strategy)(chunk, size)[n]` makes it again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from promptline.devtools import http_fuzz as hf
from promptline.devtools.drills.faults import fault
from promptline.devtools.drills.harness import API_KEY, TENANT, Env, Result

if TYPE_CHECKING:
    import grpc
    from google.protobuf.descriptor import Descriptor, FieldDescriptor

SEED = 20_240_611
AUTH = f"Bearer {API_KEY}".encode()
MAX_BODY = 256 * 1024  # edge.max_body_bytes here: the big bodies reach past it cheaply
HTTP_TIMEOUT = 20.0  # an answer (a stream to its end) within this, or the edge hung
GRPC_TIMEOUT = 10.0
CHUNK = 250  # examples per Hypothesis run: campaigns interleave, each chunk its own seed
SCHEMA_CHUNK = 20  # Schemathesis cases are slow to make (10-50 ms each)
WORKERS = 32
SHOWN = (2, 8)  # failing examples in the report: per problem, in all

# gRPC payload kinds: meant not to decode (most do not), valid protobuf with the wrong wire type
# in a declared field (it decodes: the field becomes an unknown one), and well-typed messages.
# The report counts what each really is to a parser: undecodable, wrong types, well-typed.
UNDECODABLE = ("garbage", "truncated", "bad varint", "length past end", "invalid wire type",
               "field zero", "open group", "invalid utf-8", "garbage submessage")
KINDS = (*UNDECODABLE, *UNDECODABLE, "wrong wire type", "wrong wire type", "typed")


# --- the report -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What was sent and seen, and the first failing examples of each problem."""

    http_by_endpoint: Counter[str] = field(default_factory=Counter)
    http_by_campaign: Counter[str] = field(default_factory=Counter)
    http_statuses: Counter[str] = field(default_factory=Counter)
    http_2xx_by_campaign: Counter[str] = field(default_factory=Counter)
    grpc_by_method: dict[str, Counter[str]] = field(default_factory=dict)
    grpc_statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, what: str, example: dict[str, Any]) -> None:
        self.failures[what] += 1
        if self.failures[what] <= SHOWN[0] and len(self.examples) < SHOWN[1]:
            self.examples.append({"problem": what, **example})


def _shown(data: bytes, limit: int = 400) -> str:
    """Bytes as a Python literal, cut to `limit` characters (the length says how much more)."""
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"


# --- HTTP: which endpoint a request is for --------------------------------------------------------


@dataclass
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    bodyless: frozenset[int]
    """Error statuses the API description documents without a body (a missing static file)."""


def _routes(document: dict[str, Any]) -> list[Route]:
    routes = []
    for template, item in document["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
        for method, op in item.items():
            if method == "parameters":
                continue
            bodyless = frozenset(int(s) for s, r in op["responses"].items()
                                 if s.isdigit() and int(s) >= 400 and "content" not in r)
            routes.append(Route(method.upper(), template, pattern, bodyless))
    return routes


def _endpoint(routes: list[Route], method: bytes, target: bytes) -> tuple[str, Route | None]:
    """The documented operation a request line names, else what it is instead."""
    try:
        if target.startswith((b"http://", b"https://")):
            target = urllib.parse.urlsplit(target).path or b"/"
        path = urllib.parse.unquote_to_bytes(target.split(b"?")[0].split(b"#")[0])
        text, verb = path.decode("utf-8"), method.decode("ascii")
    except ValueError:  # UnicodeDecodeError too
        return "(malformed request line)", None
    same_path = [r for r in routes if r.pattern.match(text)]
    for route in same_path:
        if verb == route.method or (verb == "HEAD" and route.method == "GET"):
            return f"{route.method} {route.template}", route
    if same_path:
        return f"{same_path[0].template} (another method)", None
    return "(no such route)", None


# --- HTTP campaigns -------------------------------------------------------------------------------


def _chat_request() -> st.SearchStrategy[hf.RawRequest]:
    @st.composite
    def build(draw: st.DrawFn) -> hf.RawRequest:
        path = draw(st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions"]))
        headers = [(b"Authorization", AUTH)] if draw(st.integers(0, 7)) else []
        headers += draw(st.lists(st.tuples(st.sampled_from(
            [b"Content-Type", b"X-Request-Id", b"Accept", b"Content-Encoding"]),
            hf.header_bytes), max_size=2))
        body = draw(hf.damaged(hf.chat_bodies))
        return _raw(b"POST", path, headers, body, "chat-bodies")
    return build()


def _admin_request() -> st.SearchStrategy[hf.RawRequest]:
    return hf.admin_requests().map(lambda r: _raw(r[0], r[1], [(b"Authorization", AUTH)], r[2],
                                                  "admin"))


def _header_request() -> st.SearchStrategy[hf.RawRequest]:
    @st.composite
    def build(draw: st.DrawFn) -> hf.RawRequest:
        method = draw(st.sampled_from(hf.METHODS))
        path = draw(st.sampled_from(hf.ENDPOINT_PATHS))
        headers = [(b"Authorization", AUTH)] if draw(st.booleans()) else []
        headers += draw(hf.extra_headers)
        return _raw(method, path, headers, draw(st.binary(max_size=64)), "headers")
    return build()


def _big_request() -> st.SearchStrategy[hf.RawRequest]:
    @st.composite
    def build(draw: st.DrawFn) -> hf.RawRequest:
        path = draw(st.sampled_from([b"/v1/chat/stream", b"/v1/chat/completions",
                                     b"/v1/prompts/fuzz-big/versions"]))
        body, headers, kind = draw(hf.big_bodies(MAX_BODY))
        request = _raw(b"POST", path, [(b"Authorization", AUTH), *headers], body, "big-bodies")
        request.meta["kind"] = kind
        return request
    return build()


def _raw(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
         label: str) -> hf.RawRequest:
    return hf.RawRequest(hf.request_bytes(method, target, headers, body), method, target,
                         label=label)


class SchemaCases:
    """Schemathesis on the edge's OpenAPI document: its cases as raw requests with the drill's
    key (the security scheme's generated tokens would all be 401s)."""

    def __init__(self, document: dict[str, Any]) -> None:
        import schemathesis
        from schemathesis.core.result import Ok

        self.schema = schemathesis.openapi.from_dict(document)
        self.operations = [r.ok() for r in self.schema.get_all_operations() if isinstance(r, Ok)]

    def coverage(self, per_operation: int | None) -> list[hf.RawRequest]:
        from schemathesis import GenerationMode

        out: list[hf.RawRequest] = []
        for op in self.operations:
            cases = self.schema.iter_coverage_cases(
                op, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                generation_config=self.schema.config.generation_for(operation=op,
                                                                    phase="coverage"))
            for n, case in enumerate(cases):
                if per_operation is not None and n >= per_operation:
                    break
                request = self.raw(case, "schema-coverage")
                request.meta["example"] = f"schema-coverage #{len(out)}"
                out.append(request)
        return out

    def strategy(self, negative: bool) -> st.SearchStrategy[hf.RawRequest]:
        from schemathesis import GenerationMode

        mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE
        label = "schema-negative" if negative else "schema-positive"
        return st.one_of([op.as_strategy(generation_mode=mode) for op in self.operations]).map(
            lambda case: self.raw(case, label))

    @staticmethod
    def raw(case: Any, label: str) -> hf.RawRequest:
        kwargs = case.as_transport_kwargs(base_url="http://edge")
        split = urllib.parse.urlsplit(kwargs["url"])
        target = split.path or "/"
        params = kwargs.get("params") or {}
        if params or split.query:
            target += "?" + "&".join(q for q in (split.query, urllib.parse.urlencode(
                params, doseq=True)) if q)
        if "json" in kwargs:
            body = json.dumps(kwargs["json"]).encode()
        elif isinstance(kwargs.get("data"), bytes | str):
            data = kwargs["data"]
            body = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
        else:
            body = b""
        skip = {"user-agent", "accept-encoding", "connection", "authorization",
                "x-schemathesis-testcaseid", "content-length", "host"}
        headers = [(b"Authorization", AUTH)] + [
            (str(k).encode("utf-8", "surrogatepass"), str(v).encode("utf-8", "surrogatepass"))
            for k, v in (kwargs.get("headers") or {}).items() if str(k).lower() not in skip]
        method = str(kwargs["method"]).upper().encode()
        request = _raw(method, target.encode("utf-8", "surrogatepass"), headers, body, label)
        request.meta["operation"] = case.operation.label
        return request


# --- gRPC: raw protobuf wire bytes ----------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: two's complement, ten bytes
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _wire_of(f: FieldDescriptor) -> int:
    t = f.type
    if t in (f.TYPE_STRING, f.TYPE_BYTES, f.TYPE_MESSAGE):
        return 2
    if t in (f.TYPE_DOUBLE, f.TYPE_FIXED64, f.TYPE_SFIXED64):
        return 1
    if t in (f.TYPE_FLOAT, f.TYPE_FIXED32, f.TYPE_SFIXED32):
        return 5
    return 3 if t == f.TYPE_GROUP else 0


_text = st.one_of(st.sampled_from(["", "sim", "user", "system", "prod", "c-1", "x" * 70_000,
                                   "\x00", "a\x00b", "{{name}}", "forbidden-word"]),
                  st.text(st.characters(codec="utf-8"), max_size=40))


@st.composite
def _value(draw: st.DrawFn, f: FieldDescriptor, depth: int) -> bytes:
    """A well-typed record for field `f`: any value its type can carry."""
    key = _key(f.number, _wire_of(f))
    t = f.type
    if t == f.TYPE_STRING:
        raw = draw(_text).encode()
        return key + _varint(len(raw)) + raw
    if t == f.TYPE_BYTES:
        raw = draw(st.binary(max_size=40))
        return key + _varint(len(raw)) + raw
    if t == f.TYPE_MESSAGE:
        assert f.message_type is not None
        raw = draw(_typed(f.message_type, depth + 1)) if depth < 3 else b""
        return key + _varint(len(raw)) + raw
    wire = _wire_of(f)
    if wire == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return key + draw(st.one_of(st.binary(min_size=4, max_size=4), st.sampled_from(
            [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"])))  # NaN, +-inf
    return key + _varint(draw(st.one_of(st.integers(-(2**63), 2**64 - 1),
                                        st.sampled_from([0, 1, 2**32 - 1, 2**32, -1]))))


@st.composite
def _typed(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> bytes:
    """A valid message: a few of its fields, repeated ones (and plain ones, last wins) any
    number of times."""
    fields = list(desc.fields)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=6)) if fields else []
    return b"".join([draw(_value(f, depth)) for f in chosen])


@st.composite
def grpc_payloads(draw: st.DrawFn, desc: Descriptor) -> tuple[str, bytes]:
    """(kind, bytes) of one request message for `desc`: see KINDS."""
    kind = draw(st.sampled_from(KINDS))
    fields = list(desc.fields)
    f = draw(st.sampled_from(fields))
    strings = [x for x in fields if x.type == x.TYPE_STRING] or fields
    messages = [x for x in fields if x.type == x.TYPE_MESSAGE]
    typed = draw(_typed(desc))
    if kind == "garbage":
        return kind, draw(st.binary(min_size=1, max_size=80))
    if kind == "truncated":
        whole = typed + draw(_value(f, 0))
        return kind, whole[:draw(st.integers(0, max(0, len(whole) - 1)))]
    if kind == "bad varint":
        return kind, typed + _key(f.number, 0) + b"\xff" * draw(st.integers(10, 12))
    if kind == "length past end":
        return kind, typed + _key(f.number, 2) + _varint(draw(st.integers(5, 2**31))) + b"ab"
    if kind == "invalid wire type":
        return kind, typed + _key(f.number, draw(st.sampled_from([6, 7]))) + b"\x01"
    if kind == "field zero":
        return kind, typed + _key(0, draw(st.sampled_from([0, 2]))) + b"\x00"
    if kind == "open group":
        return kind, typed + _key(f.number, draw(st.sampled_from([3, 4])))
    if kind == "invalid utf-8":
        s = draw(st.sampled_from(strings))
        bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"a\xe2\x82",
                                    b"\xf4\x90\x80\x80"]))
        return kind, typed + _key(s.number, 2) + _varint(len(bad)) + bad
    if kind == "garbage submessage" and messages:
        m = draw(st.sampled_from(messages))
        junk = draw(st.sampled_from([b"\xff", b"\x0a\x05ab", b"\x08", b"\x0f\x01",
                                     b"\x0a\x01\xff"]))
        return kind, typed + _key(m.number, 2) + _varint(len(junk)) + junk
    if kind in ("wrong wire type", "garbage submessage"):
        wire = draw(st.sampled_from([w for w in (0, 1, 2, 5) if w != _wire_of(f)]))
        payload = {0: _varint(draw(st.integers(0, 2**64 - 1))), 1: b"\x01" * 8,
                   2: _varint(3) + b"abc", 5: b"\x01" * 4}[wire]
        return "wrong wire type", typed + _key(f.number, wire) + payload
    return "typed", typed


@dataclass
class GrpcMethod:
    name: str
    """Service/Method, for the report."""
    path: str
    target: str
    streaming: bool
    request: Any
    response: Any
    """The messages' classes."""


def _grpc_methods(prompt: str, engine: str) -> list[GrpcMethod]:
    from google.protobuf import message_factory

    from promptline.v1 import llm_engine_pb2, prompt_admin_pb2, prompt_pb2

    out = []
    for module, service, target in ((prompt_pb2, "PromptService", prompt),
                                    (prompt_admin_pb2, "PromptAdmin", prompt),
                                    (llm_engine_pb2, "LlmEngine", engine)):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            out.append(GrpcMethod(
                f"{service}/{method.name}", f"/{desc.full_name}/{method.name}", target,
                method.server_streaming, message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type)))
    return out


@dataclass
class GrpcRequest:
    method: GrpcMethod
    kind: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


# --- generating: Hypothesis runs with fixed seeds, chunk by chunk ---------------------------------


Item = hf.RawRequest | GrpcRequest


def _examples(strategy: st.SearchStrategy[Any], count: int, chunk_seed: int) -> list[Any]:
    """`count` examples of `strategy`, the same ones for the same seed (fewer when the strategy
    has fewer)."""
    out: list[Any] = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @seed(chunk_seed)
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out


@dataclass
class Campaign:
    name: str
    total: int
    make: Callable[[int, int], list[Any]]
    """(chunk index, size) -> the chunk's items."""
    chunk: int = CHUNK

    def chunks(self) -> Iterator[tuple[str, Callable[[], list[Any]]]]:
        for index, start in enumerate(range(0, self.total, self.chunk)):
            size = min(self.chunk, self.total - start)
            yield self.name, functools.partial(self.make, index, size)


def _seeded(name: str, strategy: Callable[[], st.SearchStrategy[Any]]
            ) -> Callable[[int, int], list[Any]]:
    """Chunk `index` of campaign `name`: `_examples(strategy(), size, seed)`, each item marked
    with its seed and position, which regenerate it."""
    offset = sum(name.encode()) * 1000

    def make(index: int, size: int) -> list[Any]:
        chunk_seed = SEED + offset + index
        items = _examples(strategy(), size, chunk_seed)
        for n, item in enumerate(items):
            item.meta["example"] = f"{name}: seed {chunk_seed}, #{n} of {size}"
        return items
    return make


def _interleaved(campaigns: list[Campaign]) -> Iterator[tuple[str, Callable[[], list[Any]]]]:
    """Chunks round-robin over the campaigns, so every kind of load runs all along."""
    iterators = [c.chunks() for c in campaigns]
    while iterators:
        for it in list(iterators):
            chunk = next(it, None)
            if chunk is None:
                iterators.remove(it)
            else:
                yield chunk


# --- sending and checking -------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, edge_port: int, routes: list[Route], tally: Tally) -> None:
        self.edge_port = edge_port
        self.routes = routes
        self.tally = tally
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def send(self, item: Item) -> None:
        if isinstance(item, GrpcRequest):
            await self.grpc(item)
        else:
            await self.http(item)

    async def http(self, request: hf.RawRequest) -> None:
        endpoint, route = _endpoint(self.routes, request.method, request.target)
        t = self.tally
        t.http_by_endpoint[endpoint] += 1
        t.http_by_campaign[request.label] += 1
        found: str | None
        answer = None
        try:
            answer = await hf.send_raw("127.0.0.1", self.edge_port, request.data,
                                       within=HTTP_TIMEOUT, head=request.method == b"HEAD",
                                       half_close=request.half_close)
        except TimeoutError:
            found = f"no answer within {HTTP_TIMEOUT:g} s"
        except hf.NoAnswer:
            # A client that ends its side mid-body has left: like any disconnect, it cancels the
            # handler, and nobody is there to read an answer.
            found = None if request.half_close else "the connection closed without an answer"
        except OSError as exc:
            found = f"connection failed ({type(exc).__name__})"
        if answer is not None:
            t.http_statuses[str(answer.status)] += 1
            if 200 <= answer.status < 300:
                t.http_2xx_by_campaign[request.label] += 1
            bodyless = request.method == b"HEAD" or (
                route is not None and answer.status in route.bodyless)
            found = hf.problem(answer, bodyless_ok=bodyless)
        else:
            t.http_statuses["closed after the client's EOF" if found is None
                            else "no answer"] += 1
        if found is not None:
            example: dict[str, Any] = {"campaign": request.label, "endpoint": endpoint,
                                       "request": _shown(request.data), **request.meta}
            if answer is not None:
                example["answer"] = f"{answer.status} {_shown(answer.body, 300)}"
            t.fail(f"HTTP: {found}", example)

    async def grpc(self, request: GrpcRequest) -> None:
        import grpc

        method = request.method
        counts = self.tally.grpc_by_method.setdefault(method.name, Counter())
        counts["sent"] += 1
        try:
            method.request.FromString(request.data)
            counts["well-typed" if request.kind == "typed" else "wrong types"] += 1
        except Exception:  # DecodeError, as the server's parser will find
            counts["undecodable"] += 1
        channel = self.channels.get(method.target)
        if channel is None:
            channel = self.channels[method.target] = grpc.aio.insecure_channel(method.target)
        metadata = (("authorization", AUTH.decode()),)
        frames: list[bytes] = []
        code, trailing = grpc.StatusCode.OK, None
        try:
            # No serializers: the bytes go out as they are, frames come back as bytes.
            if method.streaming:
                streams: Any = channel.unary_stream(method.path)
                stream = streams(request.data, metadata=metadata, timeout=GRPC_TIMEOUT)
                async for frame in stream:
                    frames.append(frame)
                trailing = await stream.trailing_metadata()
            else:
                unary: Any = channel.unary_unary(method.path)
                await unary(request.data, metadata=metadata, timeout=GRPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code, trailing = exc.code(), exc.trailing_metadata()
        self.tally.grpc_statuses[code.name] += 1
        found = _grpc_problem(method, code, trailing, frames)
        if found is not None:
            self.tally.fail(f"gRPC: {found}", {
                "method": method.name, "kind": request.kind, "status": code.name,
                "request": _shown(request.data), **request.meta})

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


def _grpc_problem(method: GrpcMethod, code: grpc.StatusCode, trailing: Any,
                  frames: list[bytes]) -> str | None:
    """What is wrong with a call's end, or None: INTERNAL or UNKNOWN; a failure without rich
    details naming a Promptline code; a stream without its error frame (or, when it succeeded,
    without its `done` frame)."""
    import grpc
    from google.rpc import error_details_pb2, status_pb2

    from promptline.errors import ERROR_DOMAIN, ErrorCode, PromptlineError

    if code.name in hf.FORBIDDEN_CODES:
        return f"status {code.name}"
    last = None
    if frames and method.streaming:
        try:
            last = method.response.FromString(frames[-1])
        except Exception:
            return "a frame that does not decode"
    if code == grpc.StatusCode.OK:
        if method.streaming and (last is None or last.WhichOneof("frame") != "done"):
            return "a stream that ended OK without a done frame"
        return None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not frames:
        deadline_note = f" (no answer within {GRPC_TIMEOUT:g} s?)"
    else:
        deadline_note = ""
    details = dict(trailing or ()).get("grpc-status-details-bin")
    reason = ""
    if isinstance(details, bytes):
        for any_pb in status_pb2.Status.FromString(details).details:
            info = error_details_pb2.ErrorInfo()
            if any_pb.Unpack(info) and info.domain == ERROR_DOMAIN:
                reason = info.reason
    if reason not in ErrorCode.__members__:
        return f"{code.name} without error details{deadline_note}"
    if method.streaming and "error" in method.response.DESCRIPTOR.fields_by_name:
        if (last is None or last.WhichOneof("frame") != "error"
                or PromptlineError.from_pb(last.error).code.value != reason):
            return f"{code.name} without its error frame"
    return None


# --- the drill ------------------------------------------------------------------------------------


def _config(env: Env) -> dict[str, Any]:
    # A Redis database of its own: thousands of fuzzed prompt versions and conversations stay
    # out of the other drills' way. Quotas off: a 429 would stop a request before the checks.
    url = env.redis.url
    if url.endswith("/0"):
        url = url[:-1] + "9"
    return env.config(
        redis_url=url,
        tenants=[{"name": TENANT, "api_keys": [API_KEY], "admin": True}],
        edge={"max_body_bytes": MAX_BODY},
    )


def _grpc_requests(method: GrpcMethod) -> st.SearchStrategy[GrpcRequest]:
    return grpc_payloads(method.request.DESCRIPTOR).map(
        lambda payload: GrpcRequest(method, payload[0], payload[1]))


def _campaigns(env: Env, schema: SchemaCases, grpc_methods: list[GrpcMethod]
               ) -> list[Campaign]:
    n = env.scale.n
    per_method = n(1300, 40)
    campaigns = [
        Campaign("schema-positive", n(2000, 40),
                 _seeded("schema-positive", lambda: schema.strategy(False)), SCHEMA_CHUNK),
        Campaign("schema-negative", n(1000, 40),
                 _seeded("schema-negative", lambda: schema.strategy(True)), SCHEMA_CHUNK),
        Campaign("chat-bodies", n(3000, 160), _seeded("chat-bodies", _chat_request)),
        Campaign("admin", n(1800, 80), _seeded("admin", _admin_request)),
        Campaign("headers", n(1500, 60), _seeded("headers", _header_request)),
        Campaign("framing", n(1500, 80),
                 _seeded("framing", functools.partial(hf.framing_requests, AUTH))),
        Campaign("big-bodies", n(400, 20), _seeded("big-bodies", _big_request), 50),
    ]
    for method in grpc_methods:
        strategy = functools.partial(_grpc_requests, method)
        campaigns.append(Campaign(method.name, per_method, _seeded(method.name, strategy)))
    return campaigns


async def fuzz(env: Env) -> Result:
    http_floor, grpc_floor = env.scale.n(10_000, 400), env.scale.n(1000, 25)
    result = Result(
        "fuzz",
        f"Hypothesis (seed {SEED}) and Schemathesis on GET /openapi.json: >= {http_floor:,} "
        f"malformed HTTP requests over raw sockets to every endpoint (schema positive, negative "
        f"and coverage cases; wrong types in every field; huge, deep, invalid UTF-8 and NUL "
        f"bodies; bad headers, lengths, chunking, methods and paths), >= {grpc_floor:,} "
        "undecodable or wrongly typed messages to every gRPC method (StreamChat, every "
        "PromptAdmin method, Generate)",
        "no 5xx; every 4xx the JSON error object with its code; no INTERNAL or UNKNOWN status; "
        "every gRPC rejection a typed status with Promptline error details (and, on a stream, "
        "its error frame); every request answered; no 429")
    tally = Tally()
    async with env.deployment(_config(env)) as d:
        from services.edge_http.openapi import build_document

        document = build_document()
        routes = _routes(document)
        schema = await asyncio.to_thread(SchemaCases, document)
        methods = _grpc_methods(d.replica("prompt").address, d.replica("llm_engine").address)
        fuzzer = Fuzzer(int(d.edge_url.rsplit(":", 1)[1]), routes, tally)
        queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=4 * CHUNK)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                try:
                    await fuzzer.send(item)
                except Exception as exc:  # the drill's own bug: a failed row, not a hang
                    tally.fail(f"the drill could not send a request ({type(exc).__name__})",
                               {"error": str(exc)[:300], **item.meta})

        workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
        spent: dict[str, float] = {}
        try:
            fixed: list[Item] = [hf.RawRequest(data, *_request_line(data), label="parser-cases",
                                               meta={"example": name})
                                 for name, data in hf.PARSER_CASES.items()]
            t0 = time.monotonic()
            fixed += await asyncio.to_thread(schema.coverage, 6 if env.scale.smoke else None)
            spent["schema-coverage"] = time.monotonic() - t0
            for item in fixed:
                await queue.put(item)
            for name, chunk in _interleaved(_campaigns(env, schema, methods)):
                t0 = time.monotonic()
                items = await asyncio.to_thread(chunk)
                spent[name] = spent.get(name, 0.0) + time.monotonic() - t0
                for item in items:
                    await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await fuzzer.close()
        alive = all(r.alive for r in d.all())
    _report(result, tally, (http_floor, env.scale.n(50, 1), grpc_floor), methods, routes, alive)
    result.observed["generating_s"] = {k: round(v, 1) for k, v in spent.items()}
    return result


def _request_line(data: bytes) -> tuple[bytes, bytes]:
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    return (parts[0], parts[1]) if len(parts) > 1 else (parts[0], b"")


def _report(result: Result, t: Tally, floors: tuple[int, int, int], methods: list[GrpcMethod],
            routes: list[Route], alive: bool) -> None:
    http_floor, per_op, grpc_floor = floors
    http_sent = sum(t.http_by_endpoint.values())
    result.observed = {
        "seed": SEED,
        "http_sent": http_sent,
        "http_by_endpoint": dict(t.http_by_endpoint.most_common()),
        "http_statuses": dict(sorted(t.http_statuses.items())),
        "http_by_campaign": dict(t.http_by_campaign),
        "http_2xx_by_campaign": dict(t.http_2xx_by_campaign),
        "grpc_sent": sum(c["sent"] for c in t.grpc_by_method.values()),
        "grpc_by_method": {k: dict(v) for k, v in t.grpc_by_method.items()},
        "grpc_statuses": dict(t.grpc_statuses.most_common()),
        "failures": dict(t.failures),
        "failing_examples": t.examples,
    }
    def first(prefix: str) -> str:
        shown = next((e for e in t.examples if e["problem"].startswith(prefix)), None)
        return f" (first: {json.dumps(shown, ensure_ascii=False)[:300]})" if shown else ""

    fivexx = sum(v for k, v in t.http_statuses.items() if k[0] == "5")
    result.expect(fivexx == 0, f"{fivexx} HTTP 5xx answers{first('HTTP: HTTP 5')}")
    for what, count in t.failures.items():
        if not what.startswith("HTTP: HTTP 5"):
            result.expect(False, f"{count} x {what}{first(what)}")
    result.expect(alive, "a service process died")
    result.expect(http_sent >= http_floor, f"only {http_sent} HTTP requests (< {http_floor})")
    missing = [f"{r.method} {r.template}" for r in routes
               if t.http_by_endpoint[f"{r.method} {r.template}"] < per_op]
    result.expect(not missing, f"endpoints with fewer than {per_op} requests: {missing}")
    for m in methods:
        counts = t.grpc_by_method.get(m.name, Counter())
        malformed = counts["undecodable"] + counts["wrong types"]
        result.expect(malformed >= grpc_floor,
                      f"{m.name}: only {malformed} undecodable messages (< {grpc_floor})")
    result.expect(t.http_statuses["429"] == 0,
                  f"{t.http_statuses['429']} answers were 429 (quotas are off here: a wrong "
                  "code, or a quota masking coverage)")
    result.expect(t.http_2xx_by_campaign["schema-positive"] > 0,
                  "no schema-valid request got a 2xx: the fuzzer never got past validation")


# --- planted fault (tests/test_drills.py): it must fail the drill ---------------------------------


@fault("edge-500-on-temperature", "services.edge_http")
def _temperature_crash() -> None:
    """A chat body with a valid `temperature` raises in the edge: an unexpected exception,
    answered 500 INTERNAL. (Any temperature: the smoke run's few examples stopped meeting a
    narrower trigger, "above 1", once the API grew.)"""
    from services.edge_http import chat_request

    original = chat_request._temperature

    def crashes(value: Any) -> float:
        checked = original(value)
        if checked >= 0:
            raise ZeroDivisionError("planted")
        return checked

    chat_request._temperature = crashes


DRILLS = {"fuzz": fuzz}

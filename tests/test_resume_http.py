"""Resumable streams over HTTP (docs/resume.md): `GET /v1/chat/stream/{id}` with `Last-Event-ID`
and `POST /v1/chat/stream/{id}/cancel`, against the real chain (real Redis, real gRPC servers,
real HTTP): a drop at every position and the text put together, tenants, an explicit Stop during
the grace, two edges, bad input, and Redis down.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptline.client import Finished, PromptlineClient, TextDelta
from promptline.config import Config
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.devtools.http_fuzz import any_text, check, exchange, header_bytes, quoted
from promptline.devtools.sse_client import Event, SseStream, without_comments
from promptline.errors import ErrorCode, PromptlineError
from promptline.v1 import common_pb2, prompt_pb2
from services.edge_http.app import start_edge
from services.edge_http.relay import SseEncoder, StreamRelay
from tests.chain import Chain, running_chain
from tests.conftest import make_config
from tests.eventually import eventually

AUTH = {"Authorization": "Bearer dev-key"}
OTHER = {"Authorization": "Bearer other-key"}
REPLY = " ".join(f"word{i}" for i in range(40))
GRACE = "5s"
MODELS = [
    # 40 tokens at 100/s after 300 ms: a drop lands before the start, or among the deltas.
    {"name": "steady", "provider": "simulated",
     "simulated": {"ttft_ms": 300, "tokens_per_second": 100, "reply": REPLY},
     "stream": {"coalesce_ms": 0}},
    # 20 s of ticks: only a Stop (or the grace) ends it within a test.
    {"name": "endless", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 20, "reply": "tick " * 400},
     "stream": {"coalesce_ms": 0}},
]


def resume_config(redis_url: str, **overrides: Any) -> Config:
    return make_config({"resume": {"ttl": "1m", "grace": GRACE}, **overrides},
                       redis_url=redis_url, models=MODELS)


@pytest.fixture(scope="module")
async def chain(redis_server: Any) -> AsyncIterator[Chain]:
    async with running_chain(resume_config(redis_server.url)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def unique(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def body(model: str = "steady") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}]}


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")


def delta_ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events if e.event == "delta" and e.id is not None]


async def read_events(stream: SseStream, until: int | None = None) -> list[Event]:
    """Events (no comments) until the end, or until `until` of them were read."""
    out: list[Event] = []
    while until is None or len(out) < until:
        event = await stream.next()
        if event is None:
            break
        if event.event != ":comment":
            out.append(event)
    return out


async def resume(http: aiohttp.ClientSession, base: str, rid: str, *, after: int | None = None,
                 key: dict[str, str] = AUTH, query: bool = False) -> list[Event]:
    """The resumed stream to its end (a 200 is asserted)."""
    headers = dict(key)
    params = {}
    if after is not None:
        if query:
            params["last_event_id"] = str(after)
        else:
            headers["Last-Event-ID"] = str(after)
    async with http.get(f"{base}/v1/chat/stream/{rid}", headers=headers, params=params) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-Id"] == rid
        return without_comments(await SseStream(resp).rest())


async def undisturbed(http: aiohttp.ClientSession, base: str, model: str = "steady") -> str:
    async with http.post(f"{base}/v1/chat/stream", json=body(model), headers=AUTH) as resp:
        events = without_comments(await SseStream(resp).rest())
    assert events[-1].event == "done"
    return text_of(events)


async def drop_before_start(port: int, rid: str) -> None:
    """Send the POST on a raw socket and drop it while the edge still holds the headers."""
    import json

    payload = json.dumps(body()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer dev-key\r\n"
                 b"Content-Type: application/json\r\nX-Request-Id: " + rid.encode() +
                 b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    with contextlib.suppress(TimeoutError):  # well inside the 300 ms before the first token
        early = await asyncio.wait_for(reader.read(1), 0.1)
        raise AssertionError(f"the edge answered before the start: {early!r}")
    writer.transport.abort()


# --- the SSE id rule ----------------------------------------------------------------------------


async def test_sse_ids_are_the_prompt_services_delta_ids(chain: Chain,
                                                         http: aiohttp.ClientSession) -> None:
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(), headers=AUTH) as resp:
        events = without_comments(await SseStream(resp).rest())
    ids = delta_ids(events)
    assert ids == list(range(1, len(ids) + 1))  # a reader this fast gets every delta alone
    assert ids[-1] == events[-1].data["usage"]["completion_tokens"]  # a token per delta here


async def test_merged_deltas_carry_the_last_ones_id(chain: Chain) -> None:
    """Deltas that queued up for a slow client leave as one event with the last delta's id."""
    config = chain.config
    relay = StreamRelay(None, config, "merge", model="steady",  # type: ignore[arg-type]
                        encoder=SseEncoder("merge", "steady"))
    try:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for n, text in ((4, "a"), (5, "b"), (6, "c")):
            queue.put_nowait(prompt_pb2.StreamChatResponse(
                delta=common_pb2.Delta(text=text, tokens=1, id=n)))
        queue.put_nowait(prompt_pb2.StreamChatResponse(done=common_pb2.Done()))
        merged = await relay._next_frame(queue)
        assert (merged.delta.text, merged.delta.tokens, merged.delta.id) == ("abc", 3, 6)
        assert (await relay._next_frame(queue)).WhichOneof("frame") == "done"
    finally:
        relay.life.finish()


# --- a drop at every position -------------------------------------------------------------------


@pytest.mark.parametrize("position", ["before_start", "after_start", "mid_deltas", "after_done"])
async def test_resume_after_a_drop_at_every_position(chain: Chain, http: aiohttp.ClientSession,
                                                     position: str) -> None:
    whole = await undisturbed(http, chain.base_url)
    assert whole == REPLY
    rid = unique(position)
    received: list[Event] = []
    if position == "before_start":
        assert chain.edge is not None
        await drop_before_start(chain.edge.port, rid)
    else:
        reads = {"after_start": 1, "mid_deltas": 6, "after_done": None}[position]
        async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(),
                             headers={**AUTH, "X-Request-Id": rid}) as resp:
            assert resp.status == 200, await resp.text()
            received = await read_events(SseStream(resp), reads)
            resp.close()  # the connection drops here: not a Stop
    after = max(delta_ids(received), default=0)
    # The query form once, the header otherwise; no id at all when nothing was received.
    resumed = await resume(http, chain.base_url, rid, after=after or None,
                           query=position == "mid_deltas")
    assert resumed[0].event == "start" and resumed[0].data["request_id"] == rid
    assert resumed[0].data["model"] == "steady"
    assert resumed[-1].event == "done", resumed[-1]
    ids = delta_ids(resumed)
    assert ids == sorted(set(ids)) and all(n > after for n in ids)
    assert text_of(received) + text_of(resumed) == whole
    if position == "after_done":
        assert ids == [] and received[-1].event == "done"


async def test_resume_from_zero_replays_everything(chain: Chain,
                                                   http: aiohttp.ClientSession) -> None:
    rid = unique("zero")
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(),
                         headers={**AUTH, "X-Request-Id": rid}) as resp:
        first = without_comments(await SseStream(resp).rest())
    again = await resume(http, chain.base_url, rid, after=0)
    assert [(e.event, e.id, e.data) for e in again[1:]] == [
        (e.event, e.id, e.data) for e in first[1:]]
    # An id past the last delta: the start, then the end.
    assert [e.event for e in await resume(http, chain.base_url, rid, after=2**32 - 1)] == [
        "start", "done"]


async def test_leaving_a_resume_does_not_stop_the_stream(chain: Chain,
                                                         http: aiohttp.ClientSession) -> None:
    rid = unique("leave")
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body("endless"),
                         headers={**AUTH, "X-Request-Id": rid}) as resp:
        await read_events(SseStream(resp), 3)
        resp.close()
    try:
        for _ in range(2):  # each reader leaves after a delta; the stream goes on for the next
            async with http.get(f"{chain.base_url}/v1/chat/stream/{rid}",
                                headers={**AUTH, "Last-Event-ID": "1"}) as resp:
                events = await read_events(SseStream(resp), 3)
                assert [e.event for e in events] == ["start", "delta", "delta"]
                resp.close()
        await eventually(lambda: chain.edge_streams == 0, within=5,
                         what="the edge's resume streams ended with their readers")
        async with http.get(f"{chain.base_url}/v1/chat/stream/{rid}",
                            headers={**AUTH, "Last-Event-ID": "4"}) as resp:
            events = await read_events(SseStream(resp), 2)
            assert events[1].event == "delta" and int(events[1].id or 0) == 5
    finally:
        async with http.post(f"{chain.base_url}/v1/chat/stream/{rid}/cancel",
                             headers=AUTH) as resp:
            assert resp.status == 200


# --- tenants, Stop ------------------------------------------------------------------------------


async def test_another_tenants_id_is_not_found(chain: Chain, http: aiohttp.ClientSession) -> None:
    rid = unique("mine")
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body("endless"),
                         headers={**AUTH, "X-Request-Id": rid}) as resp:
        stream = SseStream(resp)
        await read_events(stream, 2)
        for method, path in (("GET", rid), ("POST", f"{rid}/cancel")):
            async with http.request(method, f"{chain.base_url}/v1/chat/stream/{path}",
                                    headers={**OTHER, "Last-Event-ID": "0"}) as other:
                assert other.status == 404 and other.content_type == "application/json"
                error = (await other.json())["error"]
                assert error["code"] == "NOT_FOUND" and "tick" not in error["message"]
        # The owner's stream did not notice.
        assert (await read_events(stream, 1))[0].event == "delta"
        async with http.post(f"{chain.base_url}/v1/chat/stream/{rid}/cancel",
                             headers=AUTH) as resp_cancel:
            assert resp_cancel.status == 200
        rest = await read_events(stream)
    assert rest[-1].event == "error" and rest[-1].data["error"]["code"] == "CANCELLED"


async def test_cancel_during_the_grace_stops_the_chain(chain: Chain,
                                                       http: aiohttp.ClientSession) -> None:
    rid = unique("stop")
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body("endless"),
                         headers={**AUTH, "X-Request-Id": rid}) as resp:
        received = await read_events(SseStream(resp), 3)
        resp.close()  # dropped: the generation goes on for the grace
    await asyncio.sleep(0.3)
    assert chain.engine_streams >= 1  # still generating for a reader that may come back
    async with http.post(f"{chain.base_url}/v1/chat/stream/{rid}/cancel", headers=AUTH) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"] == rid
        assert await resp.json() == {"request_id": rid, "cancelled": True}
    await eventually(lambda: chain.engine_streams == 0, within=2,
                     what="the engine stream cancelled by the explicit Stop, not the grace")
    resumed = await resume(http, chain.base_url, rid, after=max(delta_ids(received)))
    assert resumed[0].event == "start"
    assert resumed[-1].event == "error" and resumed[-1].data["error"]["code"] == "CANCELLED"
    async with http.post(f"{chain.base_url}/v1/chat/stream/{rid}/cancel", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"request_id": rid, "cancelled": False}


# --- two edges ----------------------------------------------------------------------------------


async def test_resume_on_another_edge(chain: Chain, http: aiohttp.ClientSession) -> None:
    whole = await undisturbed(http, chain.base_url)
    other_edge = await start_edge(chain.config)
    try:
        rid = unique("two-edges")
        async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(),
                             headers={**AUTH, "X-Request-Id": rid}) as resp:
            received = await read_events(SseStream(resp), 5)
            resp.close()
        after = max(delta_ids(received))
        resumed = await resume(http, other_edge.url, rid, after=after)
        assert resumed[-1].event == "done"
        assert text_of(received) + text_of(resumed) == whole
        # And a Stop on the other edge reaches a stream the first one runs.
        rid = unique("two-edges-stop")
        async with http.post(f"{chain.base_url}/v1/chat/stream", json=body("endless"),
                             headers={**AUTH, "X-Request-Id": rid}) as resp:
            stream = SseStream(resp)
            await read_events(stream, 2)
            async with http.post(f"{other_edge.url}/v1/chat/stream/{rid}/cancel",
                                 headers=AUTH) as cancel:
                assert cancel.status == 200 and (await cancel.json())["cancelled"] is True
            rest = await read_events(stream)
        assert rest[-1].event == "error" and rest[-1].data["error"]["code"] == "CANCELLED"
    finally:
        await other_edge.stop()


# --- bad input ----------------------------------------------------------------------------------

BAD_IDS = ["-1", "abc", "4294967296", "99999999999", "1.5", "+1", "0x1", "1e3",
           "\u0661", "\u00b2", ""]  # an Arabic-Indic one, a superscript two: digits to isdigit


@pytest.mark.parametrize("value", BAD_IDS)
async def test_a_bad_last_event_id_is_400_naming_it(chain: Chain, http: aiohttp.ClientSession,
                                                    value: str) -> None:
    rid = unique("bad")
    url = f"{chain.base_url}/v1/chat/stream/{rid}"
    async with http.get(url, headers={**AUTH, "Last-Event-ID": value}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "INVALID_REQUEST" and "Last-Event-ID" in error["message"]
        assert error["request_id"] == rid == resp.headers["X-Request-Id"]
    async with http.get(url, headers=AUTH, params={"last_event_id": value}) as resp:
        assert resp.status == 400
        assert "last_event_id" in (await resp.json())["error"]["message"]
    # The header wins: a good header with a bad query parameter is a good request, and a
    # bad header with a good query parameter is not.
    async with http.get(url, headers={**AUTH, "Last-Event-ID": value},
                        params={"last_event_id": "3"}) as resp:
        assert resp.status == 400


async def test_the_header_wins_over_the_query(chain: Chain, http: aiohttp.ClientSession) -> None:
    rid = unique("wins")
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(),
                         headers={**AUTH, "X-Request-Id": rid}) as resp:
        last = delta_ids(await SseStream(resp).rest())[-1]
    async with http.get(f"{chain.base_url}/v1/chat/stream/{rid}",
                        headers={**AUTH, "Last-Event-ID": str(last - 2)},
                        params={"last_event_id": "nonsense"}) as resp:
        assert resp.status == 200
        events = without_comments(await SseStream(resp).rest())
    assert delta_ids(events) == [last - 1, last]
    for twice in ({"params": [("last_event_id", "1"), ("last_event_id", "2")]},
                  {"headers": [("Last-Event-ID", "1"), ("Last-Event-ID", "2")]}):
        headers = [*AUTH.items(), *twice.get("headers", [])]
        async with http.get(f"{chain.base_url}/v1/chat/stream/{rid}", headers=headers,
                            params=twice.get("params")) as resp:
            assert resp.status == 400
            assert "more than once" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("POST", "/cancel")])
async def test_bad_request_ids_and_keys(chain: Chain, http: aiohttp.ClientSession, method: str,
                                        suffix: str) -> None:
    for rid in ("r" * 129, "a%20b", "caf%C3%A9"):
        async with http.request(method, f"{chain.base_url}/v1/chat/stream/{rid}{suffix}",
                                headers=AUTH) as resp:
            assert resp.status == 400
            assert "request_id" in (await resp.json())["error"]["message"]
    async with http.request(method, f"{chain.base_url}/v1/chat/stream/r-1{suffix}",
                            headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
    async with http.request(method, f"{chain.base_url}/v1/chat/stream/no-such-stream{suffix}",
                            headers=AUTH) as resp:
        assert resp.status == 404


FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(rid=st.one_of(st.sampled_from(["r-1", "x" * 128, ""]), any_text),
       header=st.one_of(st.none(), header_bytes), query=st.one_of(st.none(), any_text),
       cancel=st.booleans())
async def test_fuzzed_ids_are_never_a_server_error(chain: Chain, rid: str, header: bytes | None,
                                                   query: str | None, cancel: bool) -> None:
    assert chain.edge is not None
    path = b"/v1/chat/stream/" + (quoted(rid) or b"x") + (b"/cancel" if cancel else b"")
    if query is not None:
        path += b"?last_event_id=" + quoted(query)
    headers = [(b"Authorization", b"Bearer dev-key")]
    if header is not None:
        headers.append((b"Last-Event-ID", header))
    check(await exchange(chain.edge.port, b"POST" if cancel else b"GET", path, b"", headers))


# --- the Python client ----------------------------------------------------------------------------


async def test_the_python_client_resumes_and_stops(chain: Chain) -> None:
    target = chain.config.prompt_target
    rid, endless = unique("client"), unique("client-stop")
    async with PromptlineClient(target, "dev-key") as client:
        got: list[TextDelta] = []
        async with contextlib.aclosing(client.stream_chat(
                "steady", [("user", "Hi")], request_id=rid, resumable=True)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    got.append(event)
                    if len(got) == 4:
                        break  # a dropped caller, not a Stop: the stream goes on
        assert [d.id for d in got] == [1, 2, 3, 4]
        rest = [e async for e in client.resume_chat(rid, after_id=4)]
        assert isinstance(rest[-1], Finished)
        text = "".join(d.text for d in got + [e for e in rest if isinstance(e, TextDelta)])
        assert text == REPLY
        async with contextlib.aclosing(client.stream_chat(
                "endless", [("user", "Hi")], request_id=endless, resumable=True)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    break
        assert await client.cancel_chat(endless) is True
        with pytest.raises(PromptlineError) as caught:  # its reader sees the Stop: it ended
            async for _ in client.resume_chat(endless):
                pass
        assert caught.value.code is ErrorCode.CANCELLED
        assert await client.cancel_chat(endless) is False
        with pytest.raises(PromptlineError) as caught:
            await client.cancel_chat(unique("none"))
        assert caught.value.code is ErrorCode.NOT_FOUND


# --- Redis down -----------------------------------------------------------------------------------


async def test_redis_down_resume_is_503_and_streaming_still_works(
        http: aiohttp.ClientSession) -> None:
    server = EmbeddedRedis().start()  # our own: this test stops it
    try:
        config = resume_config(server.url, quota_policy={"on_redis_error": "fail_open",
                                                         "redis_timeout": "200ms"})
        async with running_chain(config) as chain:
            rid = unique("before")
            async with http.post(f"{chain.base_url}/v1/chat/stream", json=body(),
                                 headers={**AUTH, "X-Request-Id": rid}) as resp:
                await SseStream(resp).rest()
            assert (await resume(http, chain.base_url, rid, after=3))[-1].event == "done"
            server.stop()
            assert await undisturbed(http, chain.base_url) == REPLY  # streaming still works
            for stream_id in (rid, unique("after")):
                async with http.get(f"{chain.base_url}/v1/chat/stream/{stream_id}",
                                    headers={**AUTH, "Last-Event-ID": "1"}) as resp:
                    assert resp.status == 503, await resp.text()
                    error = (await resp.json())["error"]
                assert error["code"] == "UNAVAILABLE" and "journal" in error["message"]
    finally:
        server.stop()

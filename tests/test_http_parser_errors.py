"""Requests the HTTP layer itself rejects, sent as raw bytes: each answer is the JSON error object.

aiohttp's parser answers these before any handler runs (text/plain by default, some with a repr of
the offending bytes); the edge must answer them like every other error: a 4xx, the error body with
a code and a request id, counted in `promptline_errors_total`, nothing of the implementation.
Also request-level cases that used to be answered 500 (each now a specific 4xx).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest

from promptline.devtools.http_fuzz import PARSER_CASES  # shared with the fuzz drill
from promptline.metrics import ERRORS
from tests.chain import Chain, chain_fixture

CHAT = b'{"model":"sim","messages":[{"role":"user","content":"hi"}]}'


chain = chain_fixture()


async def raw_request(chain: Chain, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a fresh connection; the status, headers and body of the one answer."""
    assert chain.edge is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.edge.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return status, headers, body
    finally:
        writer.close()


def request(method: bytes = b"POST", path: bytes = b"/v1/chat/stream", *,
            headers: tuple[bytes, ...] = (b"Authorization: Bearer dev-key",),
            body: bytes = CHAT) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: edge", *headers,
             b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error_of(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The error object, after checking what every edge error must carry."""
    assert 400 <= status < 500, (status, body[:200])
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert err["code"] and err["request_id"] and err["message"]
    assert "b'" not in err["message"] and "Traceback" not in err["message"]
    return err


def edge_errors(code: str) -> float:
    return sum(sample.value for metric in ERRORS.collect() for sample in metric.samples
               if sample.name.endswith("_total") and sample.labels["service"] == "edge_http"
               and sample.labels["code"] == code)


@pytest.mark.parametrize("case", sorted(PARSER_CASES))
async def test_parser_rejections_are_json_errors(chain: Chain, case: str) -> None:
    before = edge_errors("INVALID_REQUEST")
    status, headers, body = await raw_request(chain, PARSER_CASES[case])
    err = error_of(status, headers, body)
    assert err["code"] == "INVALID_REQUEST" and err["stage"] == "connect"
    assert err["message"].startswith(("malformed HTTP request", "body does not match"))
    assert edge_errors("INVALID_REQUEST") == before + 1


async def test_unknown_expect_is_a_json_417(chain: Chain) -> None:
    status, headers, body = await raw_request(chain, request(headers=(
        b"Authorization: Bearer dev-key", b"Expect: 200-maybe")))
    assert status == 417
    assert error_of(status, headers, body)["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(("header", "message"), [
    (b"Authorization: Bearer \xff\xfedev-key", "malformed Authorization header"),
    (b"Authorization: Bearer dev\xc3\xa9key", "malformed Authorization header"),
    (b"Authorization: Bearer dev-key junk", "malformed Authorization header"),
    (b"Authorization: Basic ZGV2OmtleQ==", "malformed Authorization header"),
    (b"Authorization: Bearer ", "malformed Authorization header"),
])
async def test_malformed_credentials_are_401(chain: Chain, header: bytes, message: str) -> None:
    before = edge_errors("UNAUTHENTICATED")
    status, headers, body = await raw_request(chain, request(headers=(header,)))
    assert status == 401
    err = error_of(status, headers, body)
    assert err["code"] == "UNAUTHENTICATED" and message in err["message"]
    assert edge_errors("UNAUTHENTICATED") == before + 1  # the public /metrics sees floods


async def test_tab_after_bearer_is_accepted_and_forwarded_canonically(chain: Chain) -> None:
    # Forwarding the raw value made gRPC reject the metadata: 500 at first_packet.
    status, _, body = await raw_request(chain, request(
        path=b"/v1/chat/completions", headers=(b"Authorization: Bearer\t dev-key",)))
    assert status == 200, body[:300]
    assert json.loads(body)["choices"][0]["message"]["content"]


async def test_wrong_keys_move_the_public_error_counter(chain: Chain) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{chain.base_url}/v1/chat/stream"
        before = edge_errors("UNAUTHENTICATED")
        for _ in range(2):
            async with http.post(url, data=CHAT, headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401
        async with http.get(f"{chain.base_url}/metrics") as r:
            text = await r.text()
    assert edge_errors("UNAUTHENTICATED") == before + 2
    assert 'promptline_errors_total{code="UNAUTHENTICATED",service="edge_http",stage="connect"}' \
        in text


@pytest.mark.parametrize("path", [b"/v1/chat/stream", b"/v1/chat/completions"])
@pytest.mark.parametrize(("name", "headers", "body", "status", "message"), [
    ("role is a list", (), b'{"model":"sim","messages":[{"role":["user"],"content":"hi"}]}',
     400, "messages[0].role must be a string"),
    ("role is an object", (), b'{"model":"sim","messages":[{"role":{"a":1},"content":"hi"}]}',
     400, "messages[0].role must be a string"),
    ("a 5000-digit integer", (), b'{"model":"sim","max_tokens":' + b"9" * 5000 + b',"messages":'
     b'[{"role":"user","content":"hi"}]}', 400, "more than 4300 digits"),
    ("gzip that is not gzip", (b"Content-Encoding: gzip",), CHAT, 400, "body is not valid gzip"),
    ("an unknown encoding", (b"Content-Encoding: snappy",), CHAT, 415, "is not supported"),
])
async def test_bad_requests_that_were_500(chain: Chain, path: bytes, name: str,
                                          headers: tuple[bytes, ...], body: bytes, status: int,
                                          message: str) -> None:
    got, response_headers, response = await raw_request(chain, request(
        path=path, headers=(b"Authorization: Bearer dev-key", *headers), body=body))
    assert got == status, response[:300]
    err = error_of(got, response_headers, response)
    assert err["code"].upper() == "INVALID_REQUEST" and message in err["message"], err


async def test_real_gzip_bodies_are_decoded(chain: Chain) -> None:
    status, _, body = await raw_request(chain, request(
        path=b"/v1/chat/completions", body=gzip.compress(CHAT),
        headers=(b"Authorization: Bearer dev-key", b"Content-Encoding: gzip")))
    assert status == 200, body[:300]

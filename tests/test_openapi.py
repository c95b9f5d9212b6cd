"""`GET /openapi.json`: a valid OpenAPI 3.1 document that describes every route, and is true.

Real HTTP against the real chain: each response (status, documented headers, body, each SSE
event's data) is validated against the document's schema for its operation and status. Response
objects are validated closed (`additionalProperties: false` wherever the document leaves them
open), so a field the edge sends without describing it fails here too.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from promptline.devtools.embedded_redis import free_port
from promptline.devtools.sse_client import collect, without_comments
from promptline.errors import WIRE, ErrorCode
from promptline.rules import SAFE_ID
from services.edge_http import openapi
from services.edge_http.app import start_edge
from tests.chain import Chain, running_chain
from tests.conftest import make_config

DOC_URI = "urn:promptline:openapi"
FAST = {"ttft_ms": 0, "tokens_per_second": 0}
MAX_BODY = 2048  # the edge's smallest allowed cap keeps the 413 cases cheap
TENANTS = [
    {"name": "dev", "api_keys": ["dev-key"], "admin": True},
    {"name": "other", "api_keys": ["other-key"]},
    {"name": "limited", "api_keys": ["limited-key"], "models": ["sim"]},
    {"name": "qpm-a", "api_keys": ["qpm-a-key"], "quotas": {"qpm": 1}},
    {"name": "qpm-b", "api_keys": ["qpm-b-key"], "quotas": {"qpm": 1}},
]
MODELS = [
    {"name": "stall0", "provider": "simulated",
     "simulated": {**FAST, "stall_after_tokens": 0},
     "timeouts": {"first_token": "300ms", "idle": "10s", "total": "30s"}},
    {"name": "fail0", "provider": "simulated", "simulated": {**FAST, "fail_after_tokens": 0}},
    {"name": "fail3", "provider": "simulated",
     "simulated": {**FAST, "fail_after_tokens": 3, "reply": "one two three four five six"}},
    {"name": "down", "provider": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
    {"name": "cached", "provider": "simulated", "simulated": FAST, "cache": {"ttl": "1h"}},
]
HI = [{"role": "user", "content": "Hi"}]

STREAM = "/v1/chat/stream"
COMPLETIONS = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
VERSIONS = "/v1/prompts/{prompt_id}/versions"
VERSION = "/v1/prompts/{prompt_id}/versions/{version}"
LABEL = "/v1/prompts/{prompt_id}/labels/{label}"
CONVERSATION = "/v1/conversations/{conversation_id}"
RESUME = "/v1/chat/stream/{request_id}"
CANCEL = "/v1/chat/stream/{request_id}/cancel"
FEEDBACK = "/v1/feedback"
STATS = "/v1/prompts/{prompt_id}/stats"


# --- the document as a validator ----------------------------------------------------------------


def _rebase_refs(node: Any) -> Any:
    """Local `#/...` refs made absolute, so a schema taken out of the document still resolves."""
    if isinstance(node, dict):
        return {k: (DOC_URI + v if k == "$ref" and v.startswith("#") else _rebase_refs(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase_refs(v) for v in node]
    return node


def _closed(node: Any) -> Any:
    """Every object schema that lists its properties, with no others allowed."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


class Contract:
    """Looks up an operation's documented responses and validates instances against them."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._doc = _rebase_refs(document)
        self._strict = _rebase_refs(_closed(document))
        self._registries = {
            strict: Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))
            for strict, doc in ((False, self._doc), (True, self._strict))}

    def _resolve(self, node: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        """Follow OpenAPI-level `$ref`s (responses, headers), which JSON Schema does not see."""
        while "$ref" in node:
            target = doc
            for part in node["$ref"].removeprefix(DOC_URI + "#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def validate(self, schema: dict[str, Any], instance: Any, *, strict: bool = True) -> None:
        Draft202012Validator(schema, registry=self._registries[strict]).validate(instance)

    def operation(self, method: str, template: str, *, strict: bool = True) -> dict[str, Any]:
        doc = self._strict if strict else self._doc
        return doc["paths"][template][method.lower()]

    def response(self, method: str, template: str, status: int) -> dict[str, Any]:
        responses = self.operation(method, template)["responses"]
        assert str(status) in responses, (
            f"{method} {template} answered {status}, which the document does not list "
            f"({sorted(responses)})")
        return self._resolve(responses[str(status)], self._strict)

    def request_schema(self, method: str, template: str) -> dict[str, Any]:
        body = self.operation(method, template, strict=False)["requestBody"]
        return body["content"]["application/json"]["schema"]

    def check_headers(self, response: dict[str, Any], headers: Any) -> None:
        for name, header in response.get("headers", {}).items():
            header = self._resolve(header, self._strict)
            value = headers.get(name)
            if value is None:
                assert not header.get("required"), f"header {name} is missing"
                continue
            schema = self._resolve(header["schema"], self._strict)
            self.validate(schema, int(value) if schema.get("type") == "integer" else value)


def _media(response: dict[str, Any], content_type: str) -> dict[str, Any]:
    documented = {key.split(";")[0].strip(): media
                  for key, media in response.get("content", {}).items()}
    assert content_type in documented or "*/*" in documented, (
        f"Content-Type {content_type} is not documented ({sorted(documented)})")
    return documented[content_type if content_type in documented else "*/*"]


async def checked(contract: Contract, resp: aiohttp.ClientResponse, method: str,
                  template: str) -> Any:
    """Validate a response against the document; returns its JSON body, SSE events or text."""
    response = contract.response(method, template, resp.status)
    contract.check_headers(response, resp.headers)
    if "content" not in response:
        assert await resp.read() == b""
        return None
    media = _media(response, resp.content_type)
    schema = media.get("schema")
    if resp.content_type == "text/event-stream":
        events = without_comments(await collect(resp))
        for event in events:
            if event.event == "message":  # no `event:` line: OpenAI's wire is `data:` only
                item: dict[str, Any] = {"data": event.data}
            else:
                item = {"event": event.event, "data": event.data}
                if event.id is not None:
                    item["id"] = event.id
            contract.validate(schema, item)
        return events
    if resp.content_type == "application/json":
        body = await resp.json()
        if schema is not None:
            contract.validate(schema, body)
        return body
    return await resp.text()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def chain(redis_server: Any) -> AsyncIterator[Chain]:
    config = make_config({"tenants": TENANTS,
                          "edge": {"heartbeat": "15s", "header_hold": "3s",
                                   "max_body_bytes": MAX_BODY}},
                         redis_url=redis_server.url, models=MODELS)
    async with running_chain(config) as running:
        yield running


@pytest.fixture(scope="module")
async def document(chain: Chain) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(chain.base_url + openapi.OPENAPI_PATH) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return await resp.json()


@pytest.fixture(scope="module")
def contract(document: dict[str, Any]) -> Contract:
    return Contract(document)


def call(http: aiohttp.ClientSession, chain: Chain, method: str, template: str, *,
         key: str | None = "dev-key", headers: dict[str, str] | None = None,
         **kw: Any) -> Any:
    """One request to `template` with its path parameters filled from `kw`'s `path` mapping."""
    path = template.format(**kw.pop("path", {}))
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return http.request(method, chain.base_url + path, headers={**auth, **(headers or {})}, **kw)


async def create_prompt(http: aiohttp.ClientSession, chain: Chain, contract: Contract,
                        prompt_id: str, template: str = "You help {{name}}.") -> dict[str, Any]:
    body = {"template": template, "variables": ["name"], "model": "sim",
            "parameters": {"max_tokens": 50, "temperature": 0.5}, "message": "first",
            "author": "tests"}
    contract.validate(contract.request_schema("POST", VERSIONS), body, strict=False)
    async with call(http, chain, "POST", VERSIONS, json=body,
                    path={"prompt_id": prompt_id}) as resp:
        assert resp.status == 201, await resp.text()
        return await checked(contract, resp, "POST", VERSIONS)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the document itself -------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate_openapi(document)
    assert document["openapi"].startswith("3.1.")
    assert document == json.loads(json.dumps(openapi.build_document()))


async def test_document_is_public_and_cacheable(chain: Chain,
                                                http: aiohttp.ClientSession) -> None:
    async with http.get(chain.base_url + openapi.OPENAPI_PATH) as resp:
        assert resp.status == 200
        etag = resp.headers["ETag"]
        assert resp.headers["Cache-Control"] == openapi.CACHE_CONTROL
    async with http.get(chain.base_url + openapi.OPENAPI_PATH,
                        headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304 and await resp.read() == b""
        assert resp.headers["ETag"] == etag


def test_every_route_is_described(chain: Chain, document: dict[str, Any]) -> None:
    assert chain.edge is not None
    routes = set()
    for resource in chain.edge.app.router.resources():
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path += "/{filename}"
        # aiohttp adds HEAD beside each GET; it answers the GET's headers without a body.
        routes |= {(route.method.lower(), path) for route in resource if route.method != "HEAD"}
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method != "parameters"}
    assert routes == described


def test_error_codes_and_statuses_come_from_the_error_table(contract: Contract) -> None:
    schemas = contract.document["components"]["schemas"]
    assert schemas["ErrorCode"]["enum"] == [code.value for code in ErrorCode]
    assert schemas["OpenAIError"]["properties"]["code"]["enum"] == [
        code.value.lower() for code in ErrorCode]
    assert set(schemas["OpenAIError"]["properties"]["type"]["enum"]) == {
        wire.openai_type for wire in WIRE.values()}
    # The contract's statuses before the headers, on both streaming endpoints.
    for template in (STREAM, COMPLETIONS):
        responses = contract.operation("POST", template)["responses"]
        for status in (400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504):
            assert str(status) in responses, (template, status)
        codes = {code for code, wire in WIRE.items() if wire.http_status == 429}
        assert all(f"`{code}`" in responses["429"]["description"] for code in codes)
        assert "Retry-After" in responses["429"]["headers"]
    # Every authenticated operation can answer 401; the public ones need no key.
    for item in contract.document["paths"].values():
        for op in item.values():
            assert ("401" in op["responses"]) == (op.get("security") != [])


def test_prompt_service_rules_match_their_owners() -> None:
    """The rules the edge may not import, repeated in openapi.py, against their owners."""
    from services.prompt import chat_plan, feedback, prompts, templates

    assert openapi.MAX_COMMENT_CHARS == feedback.MAX_COMMENT_CHARS
    assert openapi.PROMPT_ID == prompts.PROMPT_ID.pattern
    assert openapi.LABEL == prompts.LABEL.pattern
    assert openapi.MAX_MESSAGE_CHARS == prompts.MAX_MESSAGE_CHARS
    assert openapi.MAX_AUTHOR_CHARS == prompts.MAX_AUTHOR_CHARS
    assert openapi.DEFAULT_PAGE_SIZE == prompts.DEFAULT_PAGE_SIZE
    assert openapi.MAX_PAGE_SIZE == prompts.MAX_PAGE_SIZE
    assert openapi.MAX_SPLIT == prompts.MAX_SPLIT
    assert openapi.VARIABLE_NAME == templates.NAME.pattern
    assert openapi.MAX_VARIABLES == templates.MAX_VARIABLES
    assert openapi.MAX_MESSAGES == chat_plan.MAX_MESSAGES


def test_patterns_accept_what_their_owners_accept(contract: Contract) -> None:
    """An anchored JSON Schema pattern (a search) against the owner's `fullmatch`."""
    from services.prompt import prompts, templates

    schemas = contract.document["components"]["schemas"]
    pairs = [(schemas["PromptRef"]["properties"]["id"]["pattern"], prompts.PROMPT_ID),
             (contract.document["components"]["parameters"]["Label"]["schema"]["pattern"],
              prompts.LABEL),
             (schemas["ChatStreamRequest"]["properties"]["conversation_id"]["pattern"], SAFE_ID),
             (schemas["CreatePromptVersionRequest"]["properties"]["variables"]["items"][
                 "pattern"], templates.NAME)]
    samples = ["greeter", "g" * 64, "g" * 65, "g" * 128, "g" * 129, "-x", "_x", "a b", "", "a:b",
               "x.y_z-1", "ümlaut"]
    for pattern, owner in pairs:
        for value in samples:
            assert bool(re.search(pattern, value)) is bool(owner.fullmatch(value)), (
                pattern, value)


# --- successful responses ------------------------------------------------------------------------


async def test_chat_stream_events(chain: Chain, http: aiohttp.ClientSession,
                                  contract: Contract) -> None:
    prompt_id = unique("greeter")
    await create_prompt(http, chain, contract, prompt_id)
    body = {"messages": HI, "max_tokens": 40, "temperature": 0.2,
            "conversation_id": unique("conv"),
            "prompt": {"id": prompt_id, "version": 1, "variables": {"name": "Ada"}}}
    contract.validate(contract.request_schema("POST", STREAM), body, strict=False)
    async with call(http, chain, "POST", STREAM, json=body) as resp:
        assert resp.status == 200, await resp.text()
        events = await checked(contract, resp, "POST", STREAM)
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert {"conversation_id", "prompt_id", "prompt_version"} <= set(events[0].data)


async def test_chat_stream_error_event(chain: Chain, http: aiohttp.ClientSession,
                                       contract: Contract) -> None:
    body = {"model": "fail3", "messages": HI}
    async with call(http, chain, "POST", STREAM, json=body) as resp:
        assert resp.status == 200, await resp.text()
        events = await checked(contract, resp, "POST", STREAM)
    assert [e.event for e in events][::len(events) - 1] == ["start", "error"]
    assert events[-1].data["error"]["stage"] == "mid_stream"


async def test_resume_and_cancel(chain: Chain, http: aiohttp.ClientSession,
                                 contract: Contract) -> None:
    """A finished stream resumed after its second delta (replayed to its end), then cancelled
    (already ended: `cancelled` false)."""
    rid = unique("resume")
    async with call(http, chain, "POST", STREAM, json={"model": "sim", "messages": HI},
                    headers={"X-Request-Id": rid}) as resp:
        whole = await checked(contract, resp, "POST", STREAM)
    async with call(http, chain, "GET", RESUME, path={"request_id": rid},
                    headers={"Last-Event-ID": "2"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-Id"] == rid
        events = await checked(contract, resp, "GET", RESUME)
    assert events[0].event == "start" and events[-1].event == "done"
    assert [e.id for e in events[1:-1]] == [e.id for e in whole[3:-1]]
    async with call(http, chain, "POST", CANCEL, path={"request_id": rid}) as resp:
        assert resp.status == 200, await resp.text()
        assert await checked(contract, resp, "POST", CANCEL) == {"request_id": rid,
                                                                 "cancelled": False}


async def test_chat_completion(chain: Chain, http: aiohttp.ClientSession,
                               contract: Contract) -> None:
    body = {"model": "sim", "messages": [{"role": "developer", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text",
                                                                       "text": "Hi"}]}],
            "max_completion_tokens": 30, "n": 1, "user": "ignored"}
    contract.validate(contract.request_schema("POST", COMPLETIONS), body, strict=False)
    async with call(http, chain, "POST", COMPLETIONS, json=body) as resp:
        assert resp.status == 200, await resp.text()
        completion = await checked(contract, resp, "POST", COMPLETIONS)
    assert completion["object"] == "chat.completion"


async def test_chat_completion_stream(chain: Chain, http: aiohttp.ClientSession,
                                      contract: Contract) -> None:
    body = {"model": "sim", "messages": HI, "stream": True,
            "stream_options": {"include_usage": True}}
    contract.validate(contract.request_schema("POST", COMPLETIONS), body, strict=False)
    async with call(http, chain, "POST", COMPLETIONS, json=body) as resp:
        assert resp.status == 200, await resp.text()
        events = await checked(contract, resp, "POST", COMPLETIONS)
    assert events[-1].data == "[DONE]"
    assert events[-2].data["choices"] == [] and events[-2].data["usage"]["total_tokens"] > 0


async def test_cached_replies(chain: Chain, http: aiohttp.ClientSession,
                              contract: Contract) -> None:
    """A response-cache hit on both endpoints: `x-promptline-cache` and `cached` documented."""
    messages = [{"role": "user", "content": unique("cache me")}]
    bodies = [(STREAM, {"model": "cached", "messages": messages}),
              (COMPLETIONS, {"model": "cached", "messages": messages}),
              (COMPLETIONS, {"model": "cached", "messages": messages, "stream": True})]
    async with call(http, chain, "POST", STREAM, json=bodies[0][1]) as resp:
        assert resp.headers["x-promptline-cache"] == "miss"
        await checked(contract, resp, "POST", STREAM)
    seen = []
    for path, body in bodies:
        for _ in range(50):  # the reply is stored right after `done`, off the caller's path
            async with call(http, chain, "POST", path, json=body) as resp:
                answer = await checked(contract, resp, "POST", path)
            if resp.headers["x-promptline-cache"] == "hit":
                break
        assert resp.headers["x-promptline-cache"] == "hit"
        seen.append(answer)
    assert seen[0][-1].data["cached"] is True
    assert seen[1]["cached"] is True
    assert [e.data.get("cached") for e in seen[2] if isinstance(e.data, dict)
            and e.data["choices"] and e.data["choices"][0]["finish_reason"]] == [True]
    async with call(http, chain, "POST", STREAM, json=bodies[0][1],
                    headers={"Cache-Control": "no-cache"}) as resp:
        assert resp.headers["x-promptline-cache"] == "miss"
        events = await checked(contract, resp, "POST", STREAM)
    assert "cached" not in events[-1].data


async def test_models(chain: Chain, http: aiohttp.ClientSession, contract: Contract) -> None:
    async with call(http, chain, "GET", MODELS_PATH) as resp:
        listed = await checked(contract, resp, "GET", MODELS_PATH)
    assert resp.status == 200 and "sim" in {m["id"] for m in listed["data"]}


async def test_prompt_versions_and_labels(chain: Chain, http: aiohttp.ClientSession,
                                          contract: Contract) -> None:
    prompt_id = unique("p")
    first = await create_prompt(http, chain, contract, prompt_id)
    await create_prompt(http, chain, contract, prompt_id, "Now greet {{name}}.")
    assert first["version"] == 1
    at = {"prompt_id": prompt_id}
    async with call(http, chain, "GET", VERSION, path={**at, "version": 1}) as resp:
        assert resp.status == 200
        assert (await checked(contract, resp, "GET", VERSION))["version"] == 1
    async with call(http, chain, "GET", VERSIONS, path=at, params={"limit": "1"}) as resp:
        assert resp.status == 200
        page = await checked(contract, resp, "GET", VERSIONS)
    assert page["next_before"] == 2 and page["latest_version"] == 2
    for version, previous in ((1, None), (2, 1)):
        body = {"version": version}
        contract.validate(contract.request_schema("PUT", LABEL), body, strict=False)
        async with call(http, chain, "PUT", LABEL, json=body,
                        path={**at, "label": "prod"}) as resp:
            assert resp.status == 200, await resp.text()
            moved = await checked(contract, resp, "PUT", LABEL)
        assert moved["previous_version"] == previous
    async with call(http, chain, "GET", LABEL, path={**at, "label": "prod"}) as resp:
        assert resp.status == 200
        assert (await checked(contract, resp, "GET", LABEL))["labels"] == ["prod"]
    async with call(http, chain, "GET", VERSIONS, path=at) as resp:
        page = await checked(contract, resp, "GET", VERSIONS)
    assert page["labels"] == {"prod": 2} and "next_before" not in page


async def test_response_format(chain: Chain, http: aiohttp.ClientSession,
                               contract: Contract) -> None:
    """JSON mode's fields (docs/json-mode.md) in the request schemas and in a prompt version."""
    fmt = {"type": "json_schema", "json_schema": {
        "name": "answer", "strict": True, "schema": {
            "type": "object", "properties": {"answer": {"type": "integer"}},
            "required": ["answer"], "additionalProperties": False}}}
    body = {"template": "Answer in JSON.", "response_format": fmt, "json_validate": True}
    contract.validate(contract.request_schema("POST", VERSIONS), body, strict=False)
    async with call(http, chain, "POST", VERSIONS, json=body,
                    path={"prompt_id": unique("json")}) as resp:
        assert resp.status == 201, await resp.text()
        version = await checked(contract, resp, "POST", VERSIONS)
    assert version["response_format"] == fmt and version["json_validate"] is True
    chat = {"model": "sim", "messages": HI, "response_format": {"type": "json_object"},
            "json_validate": True}
    contract.validate(contract.request_schema("POST", STREAM), chat, strict=False)
    async with call(http, chain, "POST", STREAM, json=chat) as resp:
        assert resp.status == 200, await resp.text()
        assert (await checked(contract, resp, "POST", STREAM))[-1].event == "done"
    completion = {**chat, "response_format": fmt}
    contract.validate(contract.request_schema("POST", COMPLETIONS), completion, strict=False)


async def test_conversation_get_and_delete(chain: Chain, http: aiohttp.ClientSession,
                                           contract: Contract) -> None:
    at = {"conversation_id": unique("conv")}
    body = {"model": "sim", "messages": HI, "conversation_id": at["conversation_id"]}
    async with call(http, chain, "POST", STREAM, json=body) as resp:
        await checked(contract, resp, "POST", STREAM)
    async with call(http, chain, "GET", CONVERSATION, path=at) as resp:
        assert resp.status == 200
        conversation = await checked(contract, resp, "GET", CONVERSATION)
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    async with call(http, chain, "DELETE", CONVERSATION, path=at) as resp:
        assert resp.status == 204
        await checked(contract, resp, "DELETE", CONVERSATION)
    for method in ("GET", "DELETE"):
        async with call(http, chain, method, CONVERSATION, path=at) as resp:
            assert resp.status == 404
            await checked(contract, resp, method, CONVERSATION)


async def test_feedback_and_prompt_stats(chain: Chain, http: aiohttp.ClientSession,
                                         contract: Contract) -> None:
    prompt_id = unique("fb")
    await create_prompt(http, chain, contract, prompt_id)
    body = {"messages": HI, "prompt": {"id": prompt_id, "variables": {"name": "Ada"}}}
    async with call(http, chain, "POST", STREAM, json=body) as resp:
        request_id = resp.headers["X-Request-Id"]
        await checked(contract, resp, "POST", STREAM)
    for score, status in ((1, 201), (0.75, 200)):  # the record is written after `done`
        answer = {"request_id": request_id, "score": score, "comment": "fine"}
        contract.validate(contract.request_schema("POST", FEEDBACK), answer, strict=False)
        for _ in range(100):
            async with call(http, chain, "POST", FEEDBACK, json=answer) as resp:
                if resp.status != 404:
                    assert resp.status == status, await resp.text()
                    stored = await checked(contract, resp, "POST", FEEDBACK)
                    break
            await asyncio.sleep(0.02)
        assert stored["score"] == score and stored["request"]["prompt_id"] == prompt_id
    async with call(http, chain, "GET", STATS, path={"prompt_id": prompt_id}) as resp:
        assert resp.status == 200
        report = await checked(contract, resp, "GET", STATS)
    (version,) = report["versions"]
    assert (version["requests"], version["feedback_count"]) == (1, 1)


@pytest.mark.parametrize("template", ["/", "/static/{filename}", "/healthz", "/readyz",
                                      "/metrics", openapi.OPENAPI_PATH])
async def test_public_endpoints(chain: Chain, http: aiohttp.ClientSession, contract: Contract,
                                template: str) -> None:
    async with call(http, chain, "GET", template, key=None,
                    path={"filename": "chat.js"}) as resp:
        assert resp.status == 200
        await checked(contract, resp, "GET", template)


async def test_static_file_not_found(chain: Chain, http: aiohttp.ClientSession,
                                     contract: Contract) -> None:
    template = "/static/{filename}"
    async with call(http, chain, "GET", template, key=None,
                    path={"filename": "no-such.js"}) as resp:
        assert resp.status == 404
        await checked(contract, resp, "GET", template)


async def test_readyz_without_a_prompt_service(chain: Chain, http: aiohttp.ClientSession,
                                               contract: Contract) -> None:
    config = make_config({"targets": {"prompt": f"127.0.0.1:{free_port()}"}})
    edge = await start_edge(config)
    try:
        async with http.get(f"{edge.url}/readyz") as resp:
            assert resp.status == 503
            await checked(contract, resp, "GET", "/readyz")
    finally:
        await edge.stop()


# --- error responses -----------------------------------------------------------------------------

BIG = {"model": "sim", "messages": [{"role": "user", "content": "a" * MAX_BODY}]}
ERRORS: dict[str, tuple[str, str, dict[str, Any], int, ErrorCode]] = {
    # name: (method, template, request keywords, status, code)
    "stream bad key": ("POST", STREAM, {"key": "nope", "json": BIG}, 401,
                       ErrorCode.UNAUTHENTICATED),
    "completions bad key": ("POST", COMPLETIONS, {"key": None, "json": BIG}, 401,
                            ErrorCode.UNAUTHENTICATED),
    "models bad key": ("GET", MODELS_PATH, {"key": "nope"}, 401, ErrorCode.UNAUTHENTICATED),
    "resume bad key": ("GET", RESUME, {"key": "nope", "path": {"request_id": "r-1"}}, 401,
                       ErrorCode.UNAUTHENTICATED),
    "cancel bad key": ("POST", CANCEL, {"key": None, "path": {"request_id": "r-1"}}, 401,
                       ErrorCode.UNAUTHENTICATED),
    "resume unknown id": ("GET", RESUME, {"path": {"request_id": "no-such-stream"}}, 404,
                          ErrorCode.NOT_FOUND),
    "cancel unknown id": ("POST", CANCEL, {"path": {"request_id": "no-such-stream"}}, 404,
                          ErrorCode.NOT_FOUND),
    "resume bad id": ("GET", RESUME, {"path": {"request_id": "r" * 129}}, 400,
                      ErrorCode.INVALID_REQUEST),
    "cancel bad id": ("POST", CANCEL, {"path": {"request_id": "r" * 129}}, 400,
                      ErrorCode.INVALID_REQUEST),
    "resume bad last event id": ("GET", RESUME, {"path": {"request_id": "r-1"},
                                                 "headers": {"Last-Event-ID": "-1"}}, 400,
                                 ErrorCode.INVALID_REQUEST),
    "prompts bad key": ("GET", VERSIONS, {"key": "nope", "path": {"prompt_id": "x"}}, 401,
                        ErrorCode.UNAUTHENTICATED),
    "stream bad body": ("POST", STREAM, {"json": {"model": "sim", "messages": "Hi"}}, 400,
                        ErrorCode.INVALID_REQUEST),
    "stream bad role": ("POST", STREAM, {"json": {"model": "sim", "messages": [
        {"role": "robot", "content": "Hi"}]}}, 400, ErrorCode.INVALID_REQUEST),
    "stream blocked input": ("POST", STREAM, {"json": {"model": "sim", "messages": [
        {"role": "user", "content": "say forbidden-word"}]}}, 400, ErrorCode.MODERATION_BLOCKED),
    "completions tool message": ("POST", COMPLETIONS, {"json": {"model": "sim", "messages": [
        {"role": "tool", "content": "x"}]}}, 400, ErrorCode.INVALID_REQUEST),
    "bad prompt id": ("GET", VERSIONS, {"path": {"prompt_id": "-x"}}, 400,
                      ErrorCode.INVALID_REQUEST),
    "bad version": ("GET", VERSION, {"path": {"prompt_id": "x", "version": "first"}}, 400,
                    ErrorCode.INVALID_REQUEST),
    "bad label body": ("PUT", LABEL, {"json": {}, "path": {"prompt_id": "x", "label": "prod"}},
                       400, ErrorCode.INVALID_REQUEST),
    "write without admin": ("POST", VERSIONS, {"key": "other-key", "json": {"template": "t"},
                                               "path": {"prompt_id": "x"}}, 403,
                            ErrorCode.PERMISSION_DENIED),
    "model not allowed": ("POST", STREAM, {"key": "limited-key", "json": {
        "model": "fail0", "messages": HI}}, 403, ErrorCode.PERMISSION_DENIED),
    "unknown prompt": ("GET", VERSIONS, {"path": {"prompt_id": "no-such-prompt"}}, 404,
                       ErrorCode.NOT_FOUND),
    "unknown label": ("GET", LABEL, {"path": {"prompt_id": "no-such-prompt", "label": "prod"}},
                      404, ErrorCode.NOT_FOUND),
    "unknown prompt in chat": ("POST", STREAM, {"json": {"messages": HI, "prompt": {
        "id": "no-such-prompt"}}}, 404, ErrorCode.NOT_FOUND),
    "unknown model": ("POST", COMPLETIONS, {"json": {"model": "gpt-x", "messages": HI}}, 404,
                      ErrorCode.NOT_FOUND),
    "feedback bad score": ("POST", FEEDBACK, {"json": {"request_id": "r-1", "score": 3}}, 400,
                           ErrorCode.INVALID_REQUEST),
    "feedback unknown request": ("POST", FEEDBACK, {"json": {"request_id": "no-such-request",
                                                             "score": 1}}, 404,
                                 ErrorCode.NOT_FOUND),
    "feedback big body": ("POST", FEEDBACK, {"json": {"request_id": "r-1", "score": 1,
                                                      "comment": "c" * MAX_BODY}}, 413,
                          ErrorCode.INVALID_REQUEST),
    "stats bad query": ("GET", STATS, {"path": {"prompt_id": "x"}, "params": {"from": "now"}},
                        400, ErrorCode.INVALID_REQUEST),
    "stats unknown prompt": ("GET", STATS, {"path": {"prompt_id": "no-such-prompt"}}, 404,
                             ErrorCode.NOT_FOUND),
    "stream big body": ("POST", STREAM, {"json": BIG}, 413, ErrorCode.INVALID_REQUEST),
    "completions big body": ("POST", COMPLETIONS, {"json": BIG}, 413, ErrorCode.INVALID_REQUEST),
    "prompt big body": ("POST", VERSIONS, {"json": {"template": "t" * MAX_BODY},
                                           "path": {"prompt_id": "x"}}, 413,
                        ErrorCode.INVALID_REQUEST),
    "stream bad encoding": ("POST", STREAM, {"data": gzip.compress(b"{}"), "headers": {
        "Content-Encoding": "snappy"}}, 415, ErrorCode.INVALID_REQUEST),
    "label bad encoding": ("PUT", LABEL, {"data": b"{}", "headers": {"Content-Encoding": "x"},
                                          "path": {"prompt_id": "x", "label": "prod"}}, 415,
                           ErrorCode.INVALID_REQUEST),
    "stream over quota": ("POST", STREAM, {"key": "qpm-a-key", "json": {
        "model": "sim", "messages": HI}}, 429, ErrorCode.QPM_EXCEEDED),
    "completions over quota": ("POST", COMPLETIONS, {"key": "qpm-b-key", "json": {
        "model": "sim", "messages": HI}}, 429, ErrorCode.QPM_EXCEEDED),
    "first token timeout": ("POST", STREAM, {"json": {"model": "stall0", "messages": HI}}, 504,
                            ErrorCode.FIRST_TOKEN_TIMEOUT),
    "upstream error": ("POST", STREAM, {"json": {"model": "fail0", "messages": HI}}, 502,
                       ErrorCode.UPSTREAM_ERROR),
    "provider down": ("POST", STREAM, {"json": {"model": "down", "messages": HI}}, 503,
                      ErrorCode.UNAVAILABLE),
    "completions provider down": ("POST", COMPLETIONS, {"json": {
        "model": "down", "messages": HI, "stream": True}}, 503, ErrorCode.UNAVAILABLE),
}


@pytest.mark.parametrize("name", list(ERRORS))
async def test_error_responses(name: str, chain: Chain, http: aiohttp.ClientSession,
                               contract: Contract) -> None:
    method, template, request, status, code = ERRORS[name]
    if status == 429:  # a quota of one request a minute: the first one uses it up
        async with call(http, chain, method, template, **copy.deepcopy(request)) as resp:
            await resp.read()
    async with call(http, chain, method, template, **copy.deepcopy(request)) as resp:
        assert resp.status == status, await resp.text()
        body = await checked(contract, resp, method, template)
        error = body["error"]
        if template in (COMPLETIONS, MODELS_PATH):
            assert error["code"] == code.value.lower() and error["type"] == (
                WIRE[code].openai_type)
        else:
            assert error["code"] == code.value
        assert error["request_id"] == resp.headers["X-Request-Id"]
        if status == 429:
            assert int(resp.headers["Retry-After"]) >= 1 and error["retry_after_ms"] > 0

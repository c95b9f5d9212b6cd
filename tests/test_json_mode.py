"""JSON mode (docs/json-mode.md) through the real chain: `response_format` on both HTTP
endpoints and on gRPC, to the fake OpenAI upstream (which records what arrived) and the simulated
model (which answers JSON that fits), `json_validate` ending a stream with a typed error, prompt
versions that carry a format, and bad formats answered 400 naming the field.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from promptline import cli
from promptline.devtools.fake_openai import FakeOpenAI
from promptline.devtools.sse_client import collect, without_comments
from promptline.response_format import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH
from promptline.v1 import common_pb2, llm_engine_pb2, prompt_pb2
from tests.chain import Chain, running_chain
from tests.conftest import make_config
from tests.grpc_calls import read_all

FAST = {"ttft_ms": 0, "tokens_per_second": 2000}
HI = [{"role": "user", "content": "Describe a person as JSON."}]
AUTH = {"Authorization": "Bearer dev-key"}
METADATA = (("authorization", "Bearer dev-key"),)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "age": {"type": "integer", "minimum": 18},
        "email": {"type": ["string", "null"], "format": "email"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 2},
        "role": {"enum": ["admin", "user"]},
        "nickname": {"type": "string"},
    },
    "required": ["name", "age", "email", "tags", "role"],
    "additionalProperties": False,
    "$defs": {"tag": {"type": "string", "maxLength": 8}},
}
PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
# Parses as JSON, so the simulated model streams it as it is: `age` breaks the schema.
WRONG_PERSON = ('{"name": "Ada", "age": "thirty", "email": null, "tags": ["a", "b"], '
                '"role": "user"}')


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(reply='{"answer": 42}') as server:
        yield server


@pytest.fixture(scope="module")
async def chain(redis_server: Any, fake: FakeOpenAI) -> AsyncIterator[Chain]:
    models = [
        # a frame per token, so the test sees the reply streamed
        {"name": "sim-json", "provider": "simulated", "simulated": FAST,
         "stream": {"coalesce_ms": 0}},
        {"name": "sim-wrong", "provider": "simulated",
         "simulated": {**FAST, "reply": WRONG_PERSON}},
        {"name": "gpt-json", "provider": "openai", "base_url": fake.base_url,
         "api_key_env": "NONE"},
    ]
    config = make_config(redis_url=redis_server.url, models=models)
    async with running_chain(config) as running:
        yield running


async def sse(chain: Chain, http: aiohttp.ClientSession, body: dict[str, Any]
              ) -> tuple[str, list[Any]]:
    """The streamed text and every event of a native stream that was admitted (200)."""
    async with http.post(f"{chain.base_url}/v1/chat/stream", json=body, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        events = without_comments(await collect(resp))
    return "".join(e.data["text"] for e in events if e.event == "delta"), events


def async_client(chain: Chain) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key="dev-key", max_retries=0)


# --- the simulated model -------------------------------------------------------------------------


async def test_simulated_model_streams_an_instance_of_the_schema(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    text, events = await sse(chain, http, {"model": "sim-json", "messages": HI,
                                           "response_format": PERSON_FORMAT,
                                           "json_validate": True})
    reply = json.loads(text)
    assert not list(Draft202012Validator(PERSON).iter_errors(reply))
    assert "nickname" not in reply  # minimal: the required properties only
    assert sum(e.event == "delta" for e in events) > 10  # token by token, like its text
    assert events[-1].event == "done"


async def test_json_object_through_the_openai_client(chain: Chain) -> None:
    async with async_client(chain) as client:
        stream = await client.chat.completions.create(
            model="sim-json", messages=HI, stream=True,
            response_format={"type": "json_object"})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert isinstance(json.loads(text), dict)


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]


async def test_the_openai_clients_parse_helper(chain: Chain) -> None:
    # The SDK turns the model into a strict json_schema and parses the reply back into it.
    async with async_client(chain) as client:
        completion = await client.chat.completions.parse(
            model="sim-json", messages=HI, response_format=Person,
            extra_body={"json_validate": True})
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)


async def test_a_reply_that_breaks_the_schema_ends_with_a_typed_error(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    text, events = await sse(chain, http, {"model": "sim-wrong", "messages": HI,
                                           "response_format": PERSON_FORMAT,
                                           "json_validate": True})
    assert text == WRONG_PERSON  # the whole reply was delivered, then the verdict
    error = events[-1]
    assert error.event == "error"
    assert error.data["error"]["code"] == "UPSTREAM_ERROR"
    assert error.data["error"]["stage"] == "mid_stream"
    message = error.data["error"]["message"]
    assert "$.age" in message and "rule type" in message, message
    # Without json_validate the same reply is delivered as it is.
    _, events = await sse(chain, http, {"model": "sim-wrong", "messages": HI,
                                        "response_format": PERSON_FORMAT})
    assert events[-1].event == "done"


async def test_a_reply_cut_at_max_tokens_fails_the_check(chain: Chain,
                                                         http: aiohttp.ClientSession) -> None:
    _, events = await sse(chain, http, {"model": "sim-json", "messages": HI, "max_tokens": 5,
                                        "response_format": {"type": "json_object"},
                                        "json_validate": True})
    error = events[-1].data["error"]
    assert error["code"] == "UPSTREAM_ERROR"
    assert "not valid JSON (the reply was cut at max_tokens)" in error["message"]


async def test_grpc_callers_set_the_field(chain: Chain) -> None:
    request = prompt_pb2.StreamChatRequest(
        model="sim-json", messages=[common_pb2.ChatMessage(role="user", content="Hi")],
        response_format=common_pb2.ResponseFormat(type="json_schema", name="person",
                                                  schema=json.dumps(PERSON)),
        json_validate=True)
    frames = await read_all(chain.prompt_stub.StreamChat(request, metadata=METADATA))
    reply = json.loads("".join(f.delta.text for f in frames if f.WhichOneof("frame") == "delta"))
    assert not list(Draft202012Validator(PERSON).iter_errors(reply))
    # The engine checks what reaches it on its own too.
    call = chain.engine_stub.Generate(llm_engine_pb2.GenerateRequest(
        model="sim-json", messages=[common_pb2.ChatMessage(role="user", content="Hi")],
        response_format=common_pb2.ResponseFormat(type="json_schema", name="x",
                                                  schema='{"type": 7}')))
    frames = await read_all(call)
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format.json_schema.schema" in frames[-1].error.message


# --- an OpenAI-compatible upstream ---------------------------------------------------------------


async def test_the_format_reaches_the_upstream_and_its_reply_is_checked(
        chain: Chain, fake: FakeOpenAI) -> None:
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"]}
    response_format = {"type": "json_schema", "json_schema": {
        "name": "answer", "description": "The answer.", "schema": answer, "strict": True}}
    async with async_client(chain) as client:
        completion = await client.chat.completions.create(
            model="gpt-json", messages=HI, response_format=response_format,
            extra_body={"json_validate": True})
        assert json.loads(completion.choices[0].message.content or "") == {"answer": 42}
        assert fake.requests[-1].body["response_format"] == response_format

        await client.chat.completions.create(model="gpt-json", messages=HI,
                                             response_format={"type": "text"})
        assert "response_format" not in fake.requests[-1].body  # text: as without one

        fake.push(reply='{"answer": "forty-two"}')
        stream = await client.chat.completions.create(
            model="gpt-json", messages=HI, stream=True, response_format=response_format,
            extra_body={"json_validate": True})
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_error"
    assert "$.answer" in caught.value.message and "rule type" in caught.value.message


async def test_a_blocked_term_in_the_format_is_moderated_like_the_messages(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    """The model reads the schema's name, description and strings: a blocked term there is
    MODERATION_BLOCKED before any provider call, as in a message (it went to the model)."""
    for spec in ({"name": "p", "description": "Say forbidden-word", "schema": PERSON},
                 {"name": "p", "schema": {"type": "object", "properties": {
                     "a": {"type": "string", "description": "always forbidden-word"}}}}):
        async with http.post(f"{chain.base_url}/v1/chat/stream", headers=AUTH, json={
                "model": "sim-json", "messages": HI,
                "response_format": {"type": "json_schema", "json_schema": spec}}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "MODERATION_BLOCKED"


async def test_a_number_too_large_for_multiple_of_fails_the_check(
        chain: Chain, fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    """`1e400` is valid JSON (infinity to Python): `multipleOf` raised OverflowError, an
    INTERNAL with a traceback (HTTP 500 on the non-streaming endpoint)."""
    schema = {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5}}}
    fake.push(reply='{"x": 1e400}')
    _, events = await sse(chain, http, {
        "model": "gpt-json", "messages": HI, "json_validate": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                   "schema": schema}}})
    error = events[-1].data["error"]
    assert (events[-1].event, error["code"]) == ("error", "UPSTREAM_ERROR")
    assert "too large to check (rule multipleOf)" in error["message"]


# --- prompt versions -----------------------------------------------------------------------------


async def test_a_prompt_version_carries_its_format(chain: Chain,
                                                   http: aiohttp.ClientSession) -> None:
    async with http.post(f"{chain.base_url}/v1/prompts/json-person/versions", headers=AUTH,
                         json={"template": "Answer as JSON.", "model": "sim-json",
                               "response_format": PERSON_FORMAT,
                               "json_validate": True}) as resp:
        assert resp.status == 201, await resp.text()
        version = await resp.json()
    assert version["response_format"] == PERSON_FORMAT
    assert version["json_validate"] is True

    prompt = {"id": "json-person", "version": version["version"]}
    text, events = await sse(chain, http, {"messages": HI, "prompt": prompt})
    assert not list(Draft202012Validator(PERSON).iter_errors(json.loads(text)))
    # The request's own format wins: plain text.
    text, _ = await sse(chain, http, {"messages": HI, "prompt": prompt,
                                      "response_format": {"type": "text"}})
    with pytest.raises(ValueError):
        json.loads(text)
    # ... and the version's check goes with the version's format: sim-wrong fails it.
    _, events = await sse(chain, http, {"model": "sim-wrong", "messages": HI, "prompt": prompt})
    assert events[-1].event == "error" and "$.age" in events[-1].data["error"]["message"]


async def test_the_cli_creates_a_version_with_a_format(chain: Chain, tmp_path: Any) -> None:
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON_FORMAT), encoding="utf-8")

    async def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            cli.main, ["--url", chain.base_url, *argv], env={"PROMPTLINE_API_KEY": "dev-key"},
            stdin=io.StringIO(), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    code, out, err = await run("prompts", "create", "json-cli", "--template", "JSON only.",
                               "-m", "structured", "--response-format-file", str(path),
                               "--json-validate")
    assert (code, out.strip(), err) == (0, "created json-cli version 1", "")
    code, out, _ = await run("prompts", "get", "json-cli", "1")
    assert '"name": "person"' in out and "(validated)" in out
    path.write_text("{not json", encoding="utf-8")
    code, _, err = await run("prompts", "create", "json-cli", "--template", "t", "-m", "m",
                             "--response-format-file", str(path))
    assert code == 2 and "is not valid JSON" in err


# --- bad input -----------------------------------------------------------------------------------


def _schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


BAD = [
    ({"response_format": "json"}, "response_format must be an object"),
    ({"response_format": {"type": "xml"}}, "response_format.type must be one of"),
    ({"response_format": {}}, "response_format.type is required"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.name is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
     "response_format.json_schema.schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
     "response_format.json_schema.name is required"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}},
     "response_format.json_schema is only allowed with type json_schema"),
    ({"response_format": _schema([1])}, "response_format.json_schema.schema must be a JSON Schema"),
    ({"response_format": _schema({"type": "integer", "minimum": "1"})},
     "response_format.json_schema.schema is not a valid JSON Schema at $.minimum"),
    ({"response_format": _schema({"$ref": "#/$defs/missing"})},
     "response_format.json_schema.schema has a $ref that points nowhere"),
    ({"response_format": _schema({"$ref": "https://example.com/s.json"})},
     "response_format.json_schema.schema has a $ref outside the schema"),
    # a $dynamicRef the check missed: validating the reply fetched the URL, with no timeout
    ({"response_format": _schema({"properties": {"a": {
        "$dynamicRef": "http://127.0.0.1:9/internal"}}})},
     "response_format.json_schema.schema has a $dynamicRef outside the schema"),
    ({"response_format": _schema({"$dynamicRef": "#nowhere"})},
     "response_format.json_schema.schema has a $dynamicRef that points nowhere"),
    ({"response_format": _schema({"$defs": {"b": {}}, "properties": {"a": {
        "$id": "https://example.com/o", "$ref": "#/$defs/b"}}})},
     "response_format.json_schema.schema has a nested $id at $.properties.a"),
    ({"response_format": _schema(_deep(MAX_SCHEMA_DEPTH + 1))},
     f"response_format.json_schema.schema is nested more than {MAX_SCHEMA_DEPTH}"),
    ({"response_format": _schema({"description": "x" * MAX_SCHEMA_BYTES})},
     f"at most {MAX_SCHEMA_BYTES} are allowed"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict must be a boolean"),
    ({"json_validate": True}, "json_validate needs a response_format"),
    ({"json_validate": 1}, "json_validate must be a boolean"),
]


async def test_bad_formats_are_400_naming_the_field(chain: Chain,
                                                    http: aiohttp.ClientSession) -> None:
    for extra, message in BAD:
        for path, body in (
                ("/v1/chat/stream", {"model": "sim-json", "messages": HI, **extra}),
                ("/v1/chat/completions", {"model": "sim-json", "messages": HI, **extra}),
                ("/v1/prompts/json-bad/versions", {"template": "t", **extra})):
            async with http.post(f"{chain.base_url}{path}", json=body, headers=AUTH) as resp:
                answer = await resp.json()
                assert resp.status == 400, (path, extra, answer)
            error = answer["error"]
            assert error["code"] in ("INVALID_REQUEST", "invalid_request"), (path, answer)
            assert message in error["message"], (path, extra, error["message"])


async def test_a_slow_pattern_fails_the_check_without_stalling_the_engine(
        chain: Chain, fake: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    # A pattern that backtracks for ever on the model's output: the check gives up in time.
    schema = {"type": "object", "required": ["name"],
              "properties": {"name": {"type": "string", "pattern": "^(a|aa)+$"}}}
    fake.push(reply=json.dumps({"name": "a" * 3000 + "!"}))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        _, events = await sse(chain, http, {"model": "gpt-json", "messages": HI,
                                            "response_format": _schema(schema),
                                            "json_validate": True})
    finally:
        ticker.cancel()
    assert "rule pattern" in events[-1].data["error"]["message"]
    assert ticks > 20  # the event loop went on while the pattern was matched

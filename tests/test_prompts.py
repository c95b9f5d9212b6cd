"""The prompt registry (real Redis), safe templates, the PromptAdmin service over gRPC and HTTP,
prompts in chat streams, and the `promptline prompts` CLI against a running chain."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from promptline import cli
from promptline.devtools.sse_client import collect
from promptline.errors import ErrorCode, PromptlineError
from promptline.tokens import count_messages
from promptline.v1 import common_pb2, prompt_admin_pb2, prompt_admin_pb2_grpc, prompt_pb2
from services.prompt.prompts import PromptDraft, PromptRegistry
from services.prompt.templates import declared_variables, placeholders, render
from tests.chain import running_chain
from tests.conftest import make_config

DEV = {"Authorization": "Bearer dev-key"}  # tenant dev: admin
OTHER = {"Authorization": "Bearer other-key"}  # tenant other: not admin
GREETER = "You are {{ persona }}. Greet {{name}} politely."


# --- templates -----------------------------------------------------------------------------------


def test_render_substitutes_every_placeholder():
    assert placeholders(GREETER) == ("persona", "name")
    out = render(GREETER, ("persona", "name"), {"persona": "a pirate", "name": "Ada"})
    assert out == "You are a pirate. Greet Ada politely."


def test_values_are_never_rendered_again():
    out = render("Hi {{name}}", ("name",), {"name": "{{name}} {{ secret }}"})
    assert out == "Hi {{name}} {{ secret }}"


@pytest.mark.parametrize(("values", "message"), [
    ({"persona": "x"}, "missing prompt variable 'name'"),
    ({"persona": "x", "name": "y", "extra": "z"}, "unknown prompt variable 'extra'"),
])
def test_missing_or_unknown_variable_is_invalid_naming_it(values, message):
    with pytest.raises(PromptlineError) as info:
        render(GREETER, ("persona", "name"), values)
    assert info.value.code is ErrorCode.INVALID_REQUEST and message in info.value.message


@pytest.mark.parametrize("template", [
    "{{ __import__('os').system('id') }}", "{{ a.b }}", "{{}}", "{{ 1 + 1 }}", "x {{ a b }}",
])
def test_expressions_are_rejected_not_executed(template):
    with pytest.raises(PromptlineError) as info:
        placeholders(template)
    assert "invalid placeholder" in info.value.message


def test_unclosed_braces_are_scanned_once():
    """64 KiB of `{` (or of `{{`) is text: each unclosed `{{` was searched to the end of the
    template, ~20 s on the event loop for every create and every chat on it."""
    started = time.process_time()
    for template in ("{" * 65_536, "{{" * 32_768, "{{a}} " + "{{" * 32_000):
        assert placeholders(template) in ((), ("a",))
    assert render("{{a}} " + "{{" * 32_000, ("a",), {"a": "x"}).startswith("x {{{{")
    assert time.process_time() - started < 5  # linear: milliseconds; the regex took ~20 s


def test_a_rendering_beyond_the_limit_is_refused_before_it_is_built():
    """One placeholder repeated 13,000 times, a 400-character value: 5.2 million characters
    (a 20 KB value made 260 MB and 12 GB of memory) is an INVALID_REQUEST naming the limit."""
    template = "{{a}}" * 13_000
    assert len(render(template, ("a",), {"a": "x" * 300})) == 3_900_000  # within the limit
    with pytest.raises(PromptlineError) as info:
        render(template, ("a",), {"a": "x" * 400})
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "5,200,000 characters" in info.value.message and "4,000,000" in info.value.message


def test_declared_variables_must_match_the_template():
    assert declared_variables(GREETER, []) == ("persona", "name")
    assert declared_variables(GREETER, ["name", "persona"]) == ("name", "persona")
    with pytest.raises(PromptlineError, match="uses variable 'persona', which is not declared"):
        declared_variables(GREETER, ["name"])
    with pytest.raises(PromptlineError, match="'mood' is declared but the template does not"):
        declared_variables(GREETER, ["name", "persona", "mood"])


# --- registry on real Redis ----------------------------------------------------------------------


@pytest.fixture
def registry(redis_client) -> PromptRegistry:
    return PromptRegistry(redis_client, max_template_bytes=1000)


def draft(template: str = GREETER, **kw: Any) -> PromptDraft:
    return PromptDraft(prompt_id=kw.pop("prompt_id", "greeter"), template=template, **kw)


async def test_versions_are_numbered_listed_and_immutable(registry):
    v1 = await registry.create("dev", draft(message="first", author="ana", model="sim",
                                            max_tokens=64, temperature=0.5))
    v2 = await registry.create("dev", draft("Hello {{name}}.", message="shorter"))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.author == "ana" and v2.author == "dev"  # default author: the tenant
    got = await registry.get("dev", "greeter", 1)
    assert (got.template, got.variables, got.model, got.max_tokens, got.temperature,
            got.message) == (GREETER, ("persona", "name"), "sim", 64, 0.5, "first")
    assert (await registry.get("dev", "greeter")).version == 2  # no version, no label: latest
    page = await registry.list("dev", "greeter")
    assert [v.version for v in page.versions] == [2, 1] and page.latest_version == 2
    # Nothing rewrites a version: a "change" is a new version, v1 stays as it was.
    await registry.create("dev", draft("Changed {{name}}."))
    assert (await registry.get("dev", "greeter", 1)).template == GREETER


async def test_concurrent_creates_get_distinct_numbers(registry):
    made = await asyncio.gather(*(registry.create("dev", draft(f"v{i} {{{{name}}}}"))
                                  for i in range(25)))
    assert sorted(v.version for v in made) == list(range(1, 26))
    for v in made:  # each number holds the template its creator sent
        assert (await registry.get("dev", "greeter", v.version)).template == v.template


async def test_paging(registry):
    for i in range(5):
        await registry.create("dev", draft(f"v{i + 1}"))
    first = await registry.list("dev", "greeter", page_size=2)
    assert [v.version for v in first.versions] == [5, 4] and first.next_before_version == 4
    second = await registry.list("dev", "greeter", page_size=2, before_version=4)
    assert [v.version for v in second.versions] == [3, 2]
    last = await registry.list("dev", "greeter", page_size=2, before_version=2)
    assert [v.version for v in last.versions] == [1] and last.next_before_version == 0


async def test_labels_move_and_roll_back(registry):
    for i in range(3):
        await registry.create("dev", draft(f"v{i + 1}"))
    assert await registry.set_label("dev", "greeter", "prod", 2) == 0
    assert await registry.set_label("dev", "greeter", "dev", 3) == 0
    assert (await registry.get("dev", "greeter", label="prod")).template == "v2"
    assert await registry.set_label("dev", "greeter", "prod", 3) == 2  # promote
    assert (await registry.get("dev", "greeter", label="prod")).version == 3
    assert await registry.set_label("dev", "greeter", "prod", 2) == 3  # roll back
    got = await registry.get("dev", "greeter", label="prod")
    assert (got.version, got.template, got.labels) == (2, "v2", ("prod",))
    page = await registry.list("dev", "greeter")
    assert page.labels == {"prod": 2, "dev": 3}
    assert {v.version: v.labels for v in page.versions} == {3: ("dev",), 2: ("prod",), 1: ()}


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: r.get("dev", "nope"), "unknown prompt 'nope'"),
    (lambda r: r.get("dev", "greeter", 9), "prompt 'greeter' has no version 9"),
    (lambda r: r.get("dev", "greeter", label="prod"), "prompt 'greeter' has no label 'prod'"),
    (lambda r: r.set_label("dev", "greeter", "prod", 9), "prompt 'greeter' has no version 9"),
    (lambda r: r.set_label("dev", "nope", "prod", 1), "unknown prompt 'nope'"),
    (lambda r: r.list("dev", "nope"), "unknown prompt 'nope'"),
    (lambda r: r.get("other", "greeter"), "unknown prompt 'greeter'"),  # another tenant
])
async def test_unknown_prompt_version_or_label_is_not_found(registry, call, message):
    await registry.create("dev", draft())
    with pytest.raises(PromptlineError) as info:
        await call(registry)
    assert info.value.code is ErrorCode.NOT_FOUND and info.value.message == message


@pytest.mark.parametrize(("kw", "message"), [
    ({"prompt_id": "bad id"}, "prompt id must be"),
    ({"prompt_id": "a|b"}, "prompt id must be"),
    ({"template": "  "}, "template must not be empty"),
    ({"template": "x" * 1001}, "template is 1001 bytes; at most 1000"),
    ({"template": "{{ a.b }}"}, "invalid placeholder"),
    ({"variables": ("name",)}, "'persona', which is not declared"),
    ({"temperature": 3.0}, "temperature must be between 0 and 2"),
    ({"message": "m" * 1001}, "message must be at most 1000"),
])
async def test_create_validates(registry, kw, message):
    kwargs = {"template": GREETER, **kw}
    with pytest.raises(PromptlineError) as info:
        await registry.create("dev", draft(**kwargs))
    assert info.value.code is ErrorCode.INVALID_REQUEST and message in info.value.message


async def test_label_names_are_validated(registry):
    await registry.create("dev", draft())
    with pytest.raises(PromptlineError, match="label must be"):
        await registry.set_label("dev", "greeter", "no spaces", 1)


# --- PromptAdmin over gRPC -----------------------------------------------------------------------


def _config(redis_url: str, **overrides: Any) -> Any:
    return make_config(overrides, redis_url=redis_url)


async def test_grpc_admin_rights_and_rich_errors(redis_client, redis_server):
    async with running_chain(_config(redis_server.url), with_edge=False) as chain:
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
        create = prompt_admin_pb2.CreatePromptVersionRequest(prompt_id="greeter",
                                                             template=GREETER, message="m")
        made = await admin.CreatePromptVersion(create, metadata=(("authorization",
                                                                  "Bearer dev-key"),))
        assert made.version == 1 and list(made.variables) == ["persona", "name"]
        # a non-admin key may not write ...
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.CreatePromptVersion(create, metadata=(("authorization",
                                                               "Bearer other-key"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = rpc_status.from_call(info.value)
        error_info = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(error_info)
        assert error_info.reason == "PERMISSION_DENIED" and error_info.domain == "promptline.dev"
        # ... and reads only its own tenant's prompts
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.GetPromptVersion(
                prompt_admin_pb2.GetPromptVersionRequest(prompt_id="greeter"),
                metadata=(("authorization", "Bearer other-key"),))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert PromptlineError.from_rpc_error(info.value).code is ErrorCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ListPromptVersions(
                prompt_admin_pb2.ListPromptVersionsRequest(prompt_id="greeter"),
                metadata=(("authorization", "Bearer wrong"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = await health_pb2_grpc.HealthStub(chain.prompt_channel).Check(
            health_pb2.HealthCheckRequest(service="promptline.v1.PromptAdmin"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- HTTP endpoints and chat streams with prompts ------------------------------------------------


async def _create(http: aiohttp.ClientSession, base: str, body: dict[str, Any],
                  prompt_id: str = "greeter", headers: dict[str, str] = DEV) -> Any:
    async with http.post(f"{base}/v1/prompts/{prompt_id}/versions", json=body,
                         headers=headers) as resp:
        return resp.status, await resp.json()


async def _chat(http: aiohttp.ClientSession, base: str, body: dict[str, Any],
                headers: dict[str, str] = DEV) -> tuple[int, Any]:
    async with http.post(f"{base}/v1/chat/stream", json=body, headers=headers) as resp:
        if resp.status != 200:
            return resp.status, await resp.json()
        return 200, await collect(resp)


def _chat_body(prompt: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": "Hi"}], "prompt": prompt,
            **kw}


async def test_http_prompt_lifecycle_and_label_rollback_in_chats(redis_client, redis_server):
    variables = {"persona": "a pirate", "name": "Ada"}
    async with running_chain(_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        status, v1 = await _create(http, base, {"template": GREETER, "message": "first",
                                                "author": "ana", "model": "sim",
                                                "parameters": {"max_tokens": 40}})
        assert status == 201 and v1["version"] == 1 and v1["author"] == "ana"
        assert v1["parameters"] == {"max_tokens": 40} and v1["variables"] == ["persona", "name"]
        status, v2 = await _create(http, base, {"template": "Be {{persona}}; greet {{name}}.",
                                                "message": "shorter"})
        assert status == 201 and v2["version"] == 2
        # non-admin key: 403; another tenant reads nothing: 404
        status, body = await _create(http, base, {"template": "x"}, headers=OTHER)
        assert status == 403 and body["error"]["code"] == "PERMISSION_DENIED"
        async with http.get(f"{base}/v1/prompts/greeter/versions", headers=OTHER) as resp:
            assert resp.status == 404
            assert "pirate" not in await resp.text()

        for label, version in (("dev", 2), ("prod", 1)):
            async with http.put(f"{base}/v1/prompts/greeter/labels/{label}",
                                json={"version": version}, headers=DEV) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["previous_version"] is None
        async with http.get(f"{base}/v1/prompts/greeter/versions", headers=OTHER) as resp:
            assert resp.status == 404
        async with http.get(f"{base}/v1/prompts/greeter/versions", headers=DEV) as resp:
            listing = await resp.json()
        assert [v["version"] for v in listing["versions"]] == [2, 1]
        assert listing["labels"] == {"dev": 2, "prod": 1}
        async with http.get(f"{base}/v1/prompts/greeter/versions/1", headers=DEV) as resp:
            assert (await resp.json())["template"] == GREETER

        # A chat on label prod renders v1: the start frame says so, and the prompt tokens are
        # those of the rendered system message plus the user message.
        status, events = await _chat(http, base, _chat_body(
            {"id": "greeter", "label": "prod", "variables": variables}))
        assert status == 200 and events[-1].event == "done"
        start = events[0].data
        assert (start["prompt_id"], start["prompt_version"]) == ("greeter", 1)
        rendered = "You are a pirate. Greet Ada politely."
        assert start["prompt_tokens"] == count_messages([("system", rendered), ("user", "Hi")])

        # promote dev's version to prod, then roll back
        async with http.put(f"{base}/v1/prompts/greeter/labels/prod", json={"version": 2},
                            headers=DEV) as resp:
            assert (await resp.json())["previous_version"] == 1
        _, events = await _chat(http, base, _chat_body(
            {"id": "greeter", "label": "prod", "variables": variables}))
        assert events[0].data["prompt_version"] == 2
        async with http.put(f"{base}/v1/prompts/greeter/labels/prod", json={"version": 1},
                            headers=DEV) as resp:
            assert (await resp.json())["previous_version"] == 2
        _, events = await _chat(http, base, _chat_body(
            {"id": "greeter", "label": "prod", "variables": variables}))
        assert events[0].data["prompt_version"] == 1

        # the version's default model applies when the request names none
        body = _chat_body({"id": "greeter", "version": 1, "variables": variables})
        del body["model"]
        status, events = await _chat(http, base, body)
        assert status == 200 and events[0].data["model"] == "sim"


@pytest.mark.parametrize(("prompt", "status", "code", "message"), [
    ({"id": "greeter", "variables": {"persona": "x"}}, 400, "INVALID_REQUEST",
     "missing prompt variable 'name'"),
    ({"id": "greeter", "variables": {"persona": "x", "name": "y", "mood": "z"}}, 400,
     "INVALID_REQUEST", "unknown prompt variable 'mood'"),
    ({"id": "nope"}, 404, "NOT_FOUND", "unknown prompt 'nope'"),
    ({"id": "greeter", "version": 7}, 404, "NOT_FOUND", "prompt 'greeter' has no version 7"),
    ({"id": "greeter", "label": "prod"}, 404, "NOT_FOUND", "prompt 'greeter' has no label 'prod'"),
])
async def test_chat_prompt_errors(redis_client, redis_server, prompt, status, code, message):
    async with running_chain(_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        assert (await _create(http, chain.base_url, {"template": GREETER}))[0] == 201
        got, body = await _chat(http, chain.base_url, _chat_body(prompt))
    assert got == status
    assert body["error"]["code"] == code and body["error"]["message"].startswith(message)
    assert body["error"]["stage"] == "connect"


async def test_grpc_chat_reports_prompt_in_start_frame(redis_client, redis_server):
    async with running_chain(_config(redis_server.url), with_edge=False) as chain:
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
        auth = (("authorization", "Bearer dev-key"),)
        await admin.CreatePromptVersion(prompt_admin_pb2.CreatePromptVersionRequest(
            prompt_id="plain", template="Be brief."), metadata=auth)
        request = prompt_pb2.StreamChatRequest(
            model="sim", messages=[common_pb2.ChatMessage(role="user", content="Hi")],
            prompt=prompt_pb2.PromptRef(id="plain"))
        frames = [f async for f in chain.prompt_stub.StreamChat(request, metadata=auth)]
    assert frames[0].start.prompt_id == "plain" and frames[0].start.prompt_version == 1
    assert frames[-1].HasField("done")


async def test_http_validation_of_admin_bodies(redis_client, redis_server):
    async with running_chain(_config(redis_server.url)) as chain, \
            aiohttp.ClientSession() as http:
        base = chain.base_url
        status, body = await _create(http, base, {"message": "no template"})
        assert status == 400 and body["error"]["message"] == "template is required"
        status, body = await _create(http, base, {"template": "x"}, prompt_id="bad%20id")
        assert status == 400 and "prompt id must be" in body["error"]["message"]
        async with http.put(f"{base}/v1/prompts/greeter/labels/prod", json={"version": "1"},
                            headers=DEV) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "version must be an integer, " \
                                                              "got string"
        async with http.get(f"{base}/v1/prompts/greeter/versions/abc", headers=DEV) as resp:
            assert resp.status == 400
        # digits int() rejects, and more digits than int() parses: 400, not 500
        for raw in ("\u00b2", "\u0663", "9" * 5000):
            for path in (f"versions/{raw}", f"versions?limit={raw}"):
                async with http.get(f"{base}/v1/prompts/greeter/{path}", headers=DEV) as resp:
                    assert resp.status == 400, (path[:40], await resp.text())
        async with http.get(f"{base}/v1/prompts/greeter/versions") as resp:
            assert resp.status == 401


# --- the CLI -------------------------------------------------------------------------------------


async def _cli(*argv: str, key: str = "dev-key", stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.main, list(argv), env={"PROMPTLINE_API_KEY": key},
                                   stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_cli_create_list_get_label(redis_client, redis_server, tmp_path):
    template = tmp_path / "greeter.txt"
    template.write_text(GREETER, encoding="utf-8")
    async with running_chain(_config(redis_server.url)) as chain:
        url = ("--url", chain.base_url)
        code, out, err = await _cli(*url, "prompts", "create", "greeter", "--template-file",
                                    str(template), "-m", "first version", "--author", "sre",
                                    "--model", "sim", "--max-tokens", "64")
        assert (code, out.strip(), err) == (0, "created greeter version 1", "")
        code, out, _ = await _cli(*url, "prompts", "create", "greeter", "--template-file", "-",
                                  "-m", "second", stdin="Hi {{name}}")
        assert out.strip() == "created greeter version 2"
        assert (await _cli(*url, "prompts", "label", "greeter", "prod", "2"))[1].strip() == \
            "greeter: prod -> version 2 (new label)"
        code, out, _ = await _cli(*url, "prompts", "label", "greeter", "prod", "1")
        assert out.strip() == "greeter: prod -> version 1 (was 2)"  # rollback
        code, out, _ = await _cli("prompts", "list", "greeter", *url)  # options after the verb
        lines = out.splitlines()
        assert lines[0].split() == ["VERSION", "LABELS", "MODEL", "AUTHOR", "CREATED", "MESSAGE"]
        assert lines[1].split()[:2] == ["2", "-"] and lines[2].split()[:4] == ["1", "prod", "sim",
                                                                             "sre"]
        code, out, _ = await _cli(*url, "--json", "prompts", "get", "greeter", "--label", "prod")
        data = json.loads(out)
        assert (data["version"], data["template"], data["parameters"]) == (
            1, GREETER, {"max_tokens": 64})
        code, out, _ = await _cli(*url, "prompts", "get", "greeter", "2")
        assert "version:    2" in out and out.rstrip().endswith("Hi {{name}}")
        # errors: the server's code and message on stderr, exit 1
        code, out, err = await _cli(*url, "prompts", "get", "greeter", "9")
        assert code == 1 and out == ""
        assert "NOT_FOUND: prompt 'greeter' has no version 9 (HTTP 404)" in err
        code, _, err = await _cli(*url, "prompts", "create", "greeter", "--template", "x",
                                  "-m", "m", key="other-key")
        assert code == 1 and "PERMISSION_DENIED" in err
    code, _, err = await _cli("--url", chain.base_url, "prompts", "list", "greeter")
    assert code == 2 and "cannot reach" in err  # the chain is gone
    code, _, err = await _cli("prompts", "list", "greeter", key="")
    assert code == 2 and "no API key" in err

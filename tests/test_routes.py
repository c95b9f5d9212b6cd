"""Routes (virtual model names) through the real chain: by prompt size, by tenant, route to route,
a prompt version's default, conversation history in the size, permissions, per-model quotas, the
OpenAI endpoint and `GET /v1/models`, live reload, and the config errors that name the key."""

from __future__ import annotations

import copy
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
import yaml

from promptline.config import ConfigError, load_config, parse_config
from promptline.config_docs import config_schema
from promptline.devtools.sse_client import collect
from promptline.tokens import count_messages
from promptline.v1 import common_pb2, prompt_pb2
from services.edge_http.context import LIVE_CONFIG_KEY
from services.prompt import chat_plan
from services.prompt.chat_plan import plan_chat
from services.prompt.routes import find_route, resolve
from tests.chain import Chain, chain_fixture, running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.grpc_calls import read_all

LIMIT = 50
"""`auto`'s size rule: prompts of at most this many tokens go to `small`."""
SMALL_REPLY = "A short answer from the small model."
LARGE_REPLY = "A considered answer from the large model."
MODELS: list[dict[str, Any]] = [
    {"name": "small", "provider": "simulated", "context_window": 512,
     "simulated": {"ttft_ms": 0, "tokens_per_second": 0, "reply": SMALL_REPLY}},
    {"name": "large", "provider": "simulated",
     "simulated": {"ttft_ms": 0, "tokens_per_second": 0, "reply": LARGE_REPLY}},
]
TENANTS: list[dict[str, Any]] = [
    *BASE_CONFIG["tenants"],
    {"name": "acme", "api_keys": ["acme-key"]},
    {"name": "limited", "api_keys": ["limited-key"], "models": ["auto"]},
]
ROUTES: list[dict[str, Any]] = [
    {"name": "auto", "rules": [
        {"tenants": ["acme"], "model": "large"},  # pinned
        {"max_prompt_tokens": LIMIT, "model": "small"},
        {"model": "large"},
    ]},
    {"name": "chat", "rules": [{"model": "auto"}]},  # a route naming a route
]
SHORT = "Hi"
LONG = "word " * 60
DEV = {"Authorization": "Bearer dev-key"}


def route_config(**overrides: Any) -> dict[str, Any]:
    """The raw config of this module's chain (with `overrides` of top-level keys)."""
    return {"tenants": TENANTS, "routes": ROUTES, **overrides}


chain = chain_fixture(route_config(), MODELS)


async def stream(chain: Chain, body: dict[str, Any], key: str = "dev-key"
                 ) -> tuple[int, Any]:
    """(status, SSE events) of POST /v1/chat/stream, or (status, error body)."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{chain.base_url}/v1/chat/stream", json=body,
            headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, (await collect(resp) if resp.status == 200 else await resp.json())


def chat_body(model: str | None, text: str, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], **kw}
    if model is not None:
        body["model"] = model
    return body


async def answered(chain: Chain, body: dict[str, Any], key: str = "dev-key") -> dict[str, Any]:
    """The start frame's data of a stream that must succeed, after checking which model's reply
    came back: the model the start frame names really answered."""
    status, events = await stream(chain, body, key)
    assert status == 200, events
    start, done = events[0], events[-1]
    assert start.event == "start" and done.event == "done", [e.event for e in events]
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == {"small": SMALL_REPLY, "large": LARGE_REPLY}[start.data["model"]]
    return dict(start.data)


# --- resolution through the chain ------------------------------------------------------------


async def test_prompt_size_picks_the_model(chain: Chain) -> None:
    assert count_messages([("user", SHORT)]) <= LIMIT < count_messages([("user", LONG)])
    short = await answered(chain, chat_body("auto", SHORT))
    assert short["model"] == "small"
    assert short["prompt_tokens"] == count_messages([("user", SHORT)])
    long = await answered(chain, chat_body("auto", LONG))
    assert long["model"] == "large"
    assert long["prompt_tokens"] == count_messages([("user", LONG)])


async def test_the_size_bound_is_inclusive(chain: Chain) -> None:
    config = chain.config
    auto = find_route(config, "auto")
    assert auto is not None
    assert resolve(config, auto, "dev", lambda: LIMIT).name == "small"
    assert resolve(config, auto, "dev", lambda: LIMIT + 1).name == "large"


async def test_a_pinned_tenant_gets_its_model_whatever_the_size(chain: Chain) -> None:
    start = await answered(chain, chat_body("auto", SHORT), key="acme-key")
    assert start["model"] == "large"

    def not_counted() -> int:
        raise AssertionError("a pinned tenant's prompt needs no size")

    auto = find_route(chain.config, "auto")
    assert auto is not None
    assert resolve(chain.config, auto, "acme", not_counted).name == "large"


async def test_a_route_may_name_a_route_over_grpc(chain: Chain) -> None:
    for text, model in ((SHORT, "small"), (LONG, "large")):
        call = chain.prompt_stub.StreamChat(
            prompt_pb2.StreamChatRequest(
                model="chat", messages=[common_pb2.ChatMessage(role="user", content=text)]),
            metadata=(("authorization", "Bearer dev-key"),), timeout=10)
        frames = await read_all(call)
        assert [f.WhichOneof("frame") for f in (frames[0], frames[-1])] == ["start", "done"]
        assert frames[0].start.model == model
        assert frames[-1].done.model in ("", model)  # set only when a fallback answered
    # `chat` is one rule naming `auto`: acme's pin applies through it
    start = await answered(chain, chat_body("chat", SHORT), key="acme-key")
    assert start["model"] == "large"


async def test_a_prompt_versions_default_model_may_be_a_route(chain: Chain) -> None:
    """The managed prompt counts in the size: a long template sends a short question to large."""
    async with aiohttp.ClientSession() as http:
        for name, template in (("terse", "Be terse."), ("verbose", "Explain fully. " * 20)):
            async with http.post(
                    f"{chain.base_url}/v1/prompts/routed-{name}/versions", headers=DEV,
                    json={"template": template, "model": "auto"}) as resp:
                assert resp.status == 201, await resp.json()
    terse = await answered(chain, chat_body(None, SHORT, prompt={"id": "routed-terse"}))
    verbose = await answered(chain, chat_body(None, SHORT, prompt={"id": "routed-verbose"}))
    assert (terse["model"], verbose["model"]) == ("small", "large")
    assert terse["prompt_version"] == verbose["prompt_version"] == 1


async def test_conversation_history_counts_in_the_size(chain: Chain) -> None:
    conversation = uuid.uuid4().hex
    first = "word " * 30
    second = "And then?"
    assert count_messages([("user", first)]) <= LIMIT < count_messages(
        [("user", first), ("assistant", SMALL_REPLY), ("user", second)])
    start = await answered(chain, chat_body("auto", first, conversation_id=conversation))
    assert start["model"] == "small"
    # the same short question, now after the stored exchange: the whole prompt is over the bound
    start = await answered(chain, chat_body("auto", second, conversation_id=conversation))
    assert start["model"] == "large"
    assert start["prompt_tokens"] == count_messages(
        [("user", first), ("assistant", SMALL_REPLY), ("user", second)])


async def test_the_end_of_stream_log_names_route_and_model(
        chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.prompt")

    def ended(request_id: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "promptline.prompt"
                and r.getMessage() == "stream ended"
                and getattr(r, "request_id", None) == request_id]

    routed = await answered(chain, chat_body("chat", LONG))
    direct = await answered(chain, chat_body("small", SHORT))
    await eventually(lambda: bool(ended(routed["request_id"]) and ended(direct["request_id"])),
                     what="the prompt service's end-of-stream lines")
    (line,) = ended(routed["request_id"])
    assert {k: vars(line).get(k) for k in ("route", "model", "outcome")} == {
        "route": "chat", "model": "large", "outcome": "done"}
    (line,) = ended(direct["request_id"])
    assert "route" not in vars(line) and vars(line)["model"] == "small"


# --- permissions -----------------------------------------------------------------------------


async def test_permission_is_on_the_name_the_request_sent(chain: Chain) -> None:
    """`limited` may use `auto` only: the route grants the models it picks, nothing else."""
    start = await answered(chain, chat_body("auto", LONG), key="limited-key")
    assert start["model"] == "large"
    for model in ("large", "small", "chat"):  # `chat` leads to `auto`, but is not granted
        status, body = await stream(chain, chat_body(model, SHORT), key="limited-key")
        assert status == 403 and body["error"]["code"] == "PERMISSION_DENIED", (model, body)
        assert repr(model) in body["error"]["message"]
    status, body = await stream(chain, chat_body("no-such-route", SHORT))
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"


async def test_model_quotas_are_those_of_the_model_picked(redis_client: Any,
                                                          redis_server: Any) -> None:
    models = copy.deepcopy(MODELS)
    models[0]["quotas"] = {"qpm": 1}  # small
    config = make_config(route_config(), redis_url=redis_server.url, models=models)
    async with running_chain(config) as running:
        assert (await answered(running, chat_body("auto", SHORT)))["model"] == "small"
        status, body = await stream(running, chat_body("auto", SHORT))
        assert status == 429 and body["error"]["code"] == "QPM_EXCEEDED"
        assert "model request quota" in body["error"]["message"]
        # the route itself has no quota: a long prompt goes to large, which has room
        assert (await answered(running, chat_body("auto", LONG)))["model"] == "large"


# --- the OpenAI-compatible endpoint ----------------------------------------------------------


async def test_openai_endpoint_takes_a_route_name(chain: Chain) -> None:
    async with openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key="dev-key",
                                  max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": SHORT}])
        assert completion.model == "small"
        assert completion.choices[0].message.content == SMALL_REPLY
        chunks = [c async for c in await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": LONG}], stream=True)]
        assert {c.model for c in chunks} == {"large"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            LARGE_REPLY)


async def test_models_list_has_the_routes_the_tenant_may_use(chain: Chain) -> None:
    async def listed(key: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{chain.base_url}/v1", api_key=key,
                                      max_retries=0) as client:
            return [m.id async for m in client.models.list()]

    assert await listed("dev-key") == ["sim", "small", "large", "auto", "chat"]
    assert await listed("limited-key") == ["auto"]


# --- live reload -----------------------------------------------------------------------------


async def test_a_reload_changes_routes_for_new_streams(redis_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    raw = {**copy.deepcopy(BASE_CONFIG), "redis_url": redis_server.url,
           "models": [*BASE_CONFIG["models"], *MODELS], **route_config()}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    async with running_chain(load_config(path, env={})) as running:
        holders = [running.prompt.live, running.engine.live, running.edge.app[LIVE_CONFIG_KEY]]
        assert (await answered(running, chat_body("auto", SHORT)))["model"] == "small"

        # `auto` now sends everything to large, and a new route appears
        raw["routes"] = [{"name": "auto", "rules": [{"model": "large"}]},
                         {"name": "fresh", "rules": [{"model": "small"}]}]
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert all(holder.reload() for holder in holders)
        assert (await answered(running, chat_body("auto", SHORT)))["model"] == "large"
        assert (await answered(running, chat_body("fresh", LONG)))["model"] == "small"

        # a route to an unknown model is refused; the running routes stay
        raw["routes"] = [{"name": "auto", "rules": [{"model": "gone"}]}]
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert not any(holder.reload() for holder in holders)
        assert (await answered(running, chat_body("auto", SHORT)))["model"] == "large"


# --- the plan counts once --------------------------------------------------------------------


async def test_size_and_fit_count_each_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[int] = []
    real = chat_plan.count_now

    def counting(message: common_pb2.ChatMessage) -> int:
        counted.append(id(message))
        return real(message)

    monkeypatch.setattr(chat_plan, "count_now", counting)
    config = make_config(route_config(), models=MODELS)
    tenant = config.tenants[0]
    messages = [common_pb2.ChatMessage(role="system", content="Be brief."),
                common_pb2.ChatMessage(role="user", content=LONG)]
    plan = await plan_chat(config, tenant, prompt_pb2.StreamChatRequest(
        model="auto", messages=messages))
    assert (plan.model.name, plan.route) == ("large", "auto")
    assert plan.prompt_tokens == count_messages([(m.role, m.content) for m in messages])
    assert sorted(counted) == sorted(id(m) for m in plan.messages)  # each one, once


# --- config errors name the key --------------------------------------------------------------


def routes_raw(routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE_CONFIG)
    raw["models"] = [*raw["models"], *copy.deepcopy(MODELS)]
    raw.update(routes=routes, **top)
    return raw


@pytest.mark.parametrize(("routes", "message"), [
    ([{"name": "auto", "rules": [{"model": "small"}]},
      {"name": "b", "rules": [{"max_prompt_tokens": 9, "model": "x"}, {"model": "small"}]}],
     r"^routes\[1\]\.rules\[0\]\.model: unknown model or route 'x'$"),
    ([{"name": "auto", "rules": [{"model": "small"}]}, {"name": "sim", "rules": [
        {"model": "small"}]}],
     r"^routes\[1\]\.name: clashes with model 'sim'$"),
    ([{"name": "auto", "rules": []}], r"^routes\[0\]\.rules: a route needs at least one rule$"),
    ([{"name": "auto"}], r"^routes\[0\]\.rules: required"),
    ([{"name": "auto", "rules": [{"max_prompt_tokens": 100, "model": "cheap"}, {"model": "large"}]},
      {"name": "cheap", "rules": [{"model": "mid"}]},
      {"name": "mid", "rules": [{"tenants": ["dev"], "model": "small"}, {"model": "auto"}]}],
     r"^routes\[0\]\.rules\[0\]\.model: cycle auto -> cheap -> mid -> auto$"),
    ([{"name": "loop", "rules": [{"model": "loop"}]}],
     r"^routes\[0\]\.rules\[0\]\.model: cycle loop -> loop$"),
    ([{"name": "auto", "rules": [{"max_prompt_tokens": 10, "model": "small"}]}],
     r"^routes\[0\]\.rules\[0\]: the last rule must have no condition"),
    ([{"name": "auto", "rules": [{"model": "small"}, {"model": "large"}]}],
     r"^routes\[0\]\.rules\[1\]: never used: rules\[0\] has no condition"),
    ([{"name": "auto", "rules": [{"tenants": ["ghost"], "model": "small"}, {"model": "small"}]}],
     r"^routes\[0\]\.rules\[0\]\.tenants\[0\]: unknown tenant 'ghost'$"),
    ([{"name": "auto", "rules": [{"tenants": [], "model": "small"}, {"model": "small"}]}],
     r"^routes\[0\]\.rules\[0\]\.tenants: list at least one tenant"),
    ([{"name": "auto", "rules": [{"max_prompt_tokens": 0, "model": "small"}, {"model": "small"}]}],
     r"^routes\[0\]\.rules\[0\]\.max_prompt_tokens: must be at least 1"),
    ([{"name": "auto", "rules": [{"model": "small"}]}, {"name": "auto", "rules": [
        {"model": "large"}]}],
     r"^routes: duplicate route name 'auto'$"),
    ([{"name": "auto", "rules": [{"model": "small", "size": 3}]}],
     r"^routes\[0\]\.rules\[0\]\.size: unknown key"),
])
def test_bad_routes_stop_start_up_naming_the_key(routes: list[dict[str, Any]],
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(routes_raw(routes), env={})


def test_tenants_may_be_granted_routes_but_not_unknown_names() -> None:
    routes = [{"name": "auto", "rules": [{"model": "small"}]}]
    tenants = [{"name": "dev", "api_keys": ["dev-key"], "models": ["auto"]}]
    config = parse_config(routes_raw(routes, tenants=tenants), env={})
    assert config.tenants[0].may_use("auto") and not config.tenants[0].may_use("small")
    tenants[0]["models"] = ["autp"]
    with pytest.raises(ConfigError, match=r"^tenants\[0\]\.models\[0\]: unknown model or route "
                                          r"'autp'$"):
        parse_config(routes_raw(routes, tenants=tenants), env={})


def test_the_schema_agrees_with_the_loader() -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    good = routes_raw(ROUTES, tenants=TENANTS)
    assert list(validator.iter_errors(good)) == []
    parse_config(good, env={})
    for bad in ({"name": "auto", "rules": [{"model": "small", "max_prompt_tokens": "many"}]},
                {"name": "auto", "rules": [{"model": "small", "tenants": "acme"}]},
                {"name": "auto", "rules": [{"model": "small"}], "extra": 1}):
        raw = routes_raw([bad])
        assert list(validator.iter_errors(raw)), bad
        with pytest.raises(ConfigError):
            parse_config(raw, env={})


def test_a_routes_idle_timeout_is_the_longest_of_its_models() -> None:
    """What the edge bounds a stalled client's write with, for a request naming a route."""
    config = make_config({"routes": [
        {"name": "inner", "rules": [{"model": "slow"}]},
        {"name": "outer", "rules": [{"max_prompt_tokens": 10, "model": "sim"},
                                    {"model": "inner"}]}]}, models=[
        {"name": "slow", "provider": "simulated", "timeouts": {"idle": "45s"}}])
    assert config.idle_timeout("sim") == 10.0
    assert config.idle_timeout("outer") == 45.0 and config.idle_timeout("inner") == 45.0
    assert config.idle_timeout("nothing") == 30.0  # the default

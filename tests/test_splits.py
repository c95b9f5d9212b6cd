"""Split labels (docs/prompt-lifecycle.md#split-labels): weights, sticky assignment by hashing,
the version that answered in `start`, `done` and the log line, rollback, bad input, and the
registry's scripts in every `redis_mode`.

The assignment is a pure function of (prompt id, label, sticky key), so ratios are measured on it
directly over 2,000 keys; the chain checks a smaller sample end to end against it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections import Counter
from typing import Any

import aiohttp
import pytest

from promptline import cli
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import connect_redis
from services.prompt.prompts import (
    MAX_SPLIT,
    PromptDraft,
    PromptRegistry,
    check_split,
    decode_split,
    encode_split,
    pick_version,
)
from tests.chain import Chain, chain_fixture
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually
from tests.test_redis_modes import Mode, mode  # noqa: F401  (the fixture)

FAST = {"ttft_ms": 0, "tokens_per_second": 0, "reply": "one two three"}
TENANTS = [*BASE_CONFIG["tenants"], {"name": "sp-b", "api_keys": ["sp-b-key"], "admin": True}]
AUTH = {"Authorization": "Bearer dev-key"}


def test_split_ratios_over_2000_conversations_are_within_3_percent() -> None:
    for weights in ({3: 90, 4: 10}, {1: 50, 2: 30, 7: 20}, {5: 1, 6: 99}):
        split = check_split(weights)
        counts = Counter(pick_version(split, "greeter", "prod", f"conv-{i}")
                         for i in range(2000))
        for version, weight in weights.items():
            assert abs(counts[version] / 2000 * 100 - weight) <= 3, (weights, counts)


def test_assignment_is_sticky_and_a_new_weight_moves_only_the_border() -> None:
    before, after = check_split({3: 90, 4: 10}), check_split({3: 80, 4: 20})
    keys = [f"c{i}" for i in range(500)]
    first = [pick_version(before, "p", "prod", k) for k in keys]
    assert first == [pick_version(before, "p", "prod", k) for k in keys]  # same every time
    moved = [(a, pick_version(after, "p", "prod", k)) for a, k in zip(first, keys, strict=True)]
    assert all(b == 4 for a, b in moved if a == 4)  # 4's keys stay on 4 as it grows
    # the label and the prompt are part of the hash: another label splits independently
    assert first != [pick_version(before, "p", "dev", k) for k in keys]


def test_split_encoding_keeps_single_versions_as_before() -> None:
    assert encode_split(((3, 100),)) == "3"
    assert decode_split(b"3") == ((3, 100),)
    assert decode_split(encode_split(((3, 90), (4, 10)))) == ((3, 90), (4, 10))


@pytest.mark.parametrize(("weights", "message"), [
    ({}, "split must name at least one version"),
    ({3: 90, 4: 20}, "split weights must add up to 100, got 110"),
    ({3: 100, 4: 0}, "split.4 must be a weight from 1 to 100, got 0"),
    ({0: 100}, "split keys must be version numbers (1 or more), got 0"),
    ({n: 1 for n in range(1, MAX_SPLIT + 2)}, f"split may name at most {MAX_SPLIT} versions"),
])
def test_bad_splits_name_the_field(weights: dict[int, int], message: str) -> None:
    with pytest.raises(PromptlineError) as caught:
        check_split(weights)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert message in caught.value.message


# --- through the chain ------------------------------------------------------------------------


chain = chain_fixture({"tenants": TENANTS},
                      [{"name": "fast", "provider": "simulated", "simulated": FAST}])


async def _prompt(chain: Chain, http: aiohttp.ClientSession, versions: int = 2) -> str:
    pid = f"split-{uuid.uuid4().hex[:10]}"
    for n in range(versions):
        async with http.post(f"{chain.base_url}/v1/prompts/{pid}/versions", headers=AUTH,
                             json={"template": f"You are version {n + 1}.", "model": "fast"}
                             ) as resp:
            assert resp.status == 201, await resp.text()
    return pid


async def _put(chain: Chain, http: aiohttp.ClientSession, pid: str, label: str,
               body: Any) -> tuple[int, dict[str, Any]]:
    async with http.put(f"{chain.base_url}/v1/prompts/{pid}/labels/{label}", headers=AUTH,
                        json=body) as resp:
        return resp.status, await resp.json()


async def _events(chain: Chain, http: aiohttp.ClientSession, body: dict[str, Any]
                  ) -> dict[str, dict[str, Any]]:
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=AUTH, json=body) as resp:
        assert resp.status == 200, await resp.text()
        events, kind = {}, ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events[kind] = json.loads(line[6:])
    return events


def _chat(pid: str, label: str = "prod", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}],
            "prompt": {"id": pid, "label": label}, **extra}


async def test_chats_follow_the_split_and_name_the_version(
        chain: Chain, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptline.prompt")
    pid = await _prompt(chain, http)
    status, moved = await _put(chain, http, pid, "prod", {"split": {"1": 70, "2": 30}})
    assert status == 200, moved
    assert moved == {"prompt_id": pid, "label": "prod", "version": None,
                     "split": {"1": 70, "2": 30}, "previous_version": None,
                     "previous_split": None}
    split = check_split({1: 70, 2: 30})
    conversations = [f"c-{uuid.uuid4().hex}" for _ in range(60)]
    answers = await asyncio.gather(*(_events(chain, http, _chat(pid, conversation_id=c))
                                     for c in conversations))
    seen = Counter()
    for conversation, events in zip(conversations, answers, strict=True):
        expected = pick_version(split, pid, "prod", conversation)
        assert events["start"]["prompt_version"] == expected
        assert (events["done"]["prompt_id"], events["done"]["prompt_version"]) == (pid, expected)
        seen[expected] += 1
    assert set(seen) == {1, 2}  # 60 conversations at 70/30: both serve

    # the end-of-stream log line names the version too
    rid = answers[0]["start"]["request_id"]

    def ended() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "stream ended"
                and r.name == "promptline.prompt" and getattr(r, "request_id", "") == rid]

    await eventually(lambda: bool(ended()), what="the end-of-stream line")
    assert vars(ended()[0])["prompt_version"] == answers[0]["start"]["prompt_version"]
    assert vars(ended()[0])["prompt_id"] == pid


async def test_a_conversation_keeps_its_version_across_turns(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = await _prompt(chain, http)
    assert (await _put(chain, http, pid, "prod", {"split": {"1": 50, "2": 50}}))[0] == 200
    split = check_split({1: 50, 2: 50})
    conversation = f"c-{uuid.uuid4().hex}"
    versions = set()
    for turn in range(3):
        events = await _events(chain, http, {
            **_chat(pid, conversation_id=conversation),
            "messages": [{"role": "user", "content": f"turn {turn}"}]})
        versions.add(events["done"]["prompt_version"])
    assert versions == {pick_version(split, pid, "prod", conversation)}
    # without a conversation the end user is the key
    users = [f"u-{n}" for n in range(8)]
    for user in users:
        first = await _events(chain, http, _chat(pid, user=user))
        again = await _events(chain, http, _chat(pid, user=user))
        assert first["done"]["prompt_version"] == again["done"]["prompt_version"] == \
            pick_version(split, pid, "prod", user)


async def test_rollback_restores_the_previous_state(chain: Chain,
                                                    http: aiohttp.ClientSession) -> None:
    pid = await _prompt(chain, http, versions=3)
    url = f"{chain.base_url}/v1/prompts/{pid}/labels/prod"
    async with http.post(url + "/rollback", headers=AUTH) as resp:
        assert resp.status == 404  # no such label yet
    assert (await _put(chain, http, pid, "prod", {"version": 1}))[0] == 200
    async with http.post(url + "/rollback", headers=AUTH) as resp:
        body = await resp.json()
        assert resp.status == 400 and "rollback" in body["error"]["message"], body
    status, moved = await _put(chain, http, pid, "prod", {"split": {"2": 90, "3": 10}})
    assert (status, moved["previous_version"], moved["previous_split"]) == (200, 1, {"1": 100})
    async with http.post(url + "/rollback", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"prompt_id": pid, "label": "prod", "version": 1,
                                     "split": {"1": 100}, "previous_version": None,
                                     "previous_split": {"2": 90, "3": 10}}
    async with http.get(url, headers=AUTH) as resp:
        assert (await resp.json())["version"] == 1
    async with http.post(url + "/rollback", headers=AUTH) as resp:  # forward again
        assert (await resp.json())["split"] == {"2": 90, "3": 10}
    async with http.get(url, headers=AUTH) as resp:  # a split label reads as its heaviest
        got = await resp.json()
        assert (got["version"], got["split"]) == (2, {"2": 90, "3": 10})
    async with http.get(f"{chain.base_url}/v1/prompts/{pid}/versions", headers=AUTH) as resp:
        listing = await resp.json()
        assert listing["labels"] == {"prod": 2}
        assert listing["splits"] == {"prod": {"2": 90, "3": 10}}
        assert {v["version"]: v["labels"] for v in listing["versions"]} == {
            3: ["prod"], 2: ["prod"], 1: []}


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"split": {"1": 50, "9": 50}}, 400, "split.9: prompt"),
    ({"split": {"1": 50, "2": 40}}, 400, "split weights must add up to 100, got 90"),
    ({"split": {"1": 100, "2": 0}}, 400, "split.2 must be a weight from 1 to 100, got 0"),
    ({"split": {"1": 110, "2": -10}}, 400, "split.2 must be a positive integer weight"),
    ({"split": {"1": 50.5, "2": 49.5}}, 400, "split.1 must be a positive integer weight"),
    ({"split": {"one": 100}}, 400, "split keys must be version numbers"),
    ({"split": {}}, 400, "split must name at least one version"),
    ({"split": [1, 2]}, 400, "split must be an object"),
    ({"version": 1, "split": {"1": 100}}, 400, "give either version or split"),
    ({}, 400, "give either version or split"),
    ({"version": 1, "weights": 3}, 400, "weights is not a field of a label move"),
    ({"version": 9}, 404, "has no version 9"),
])
async def test_bad_label_moves(chain: Chain, http: aiohttp.ClientSession, body: dict[str, Any],
                               status: int, message: str) -> None:
    pid = await _prompt(chain, http)
    got, answer = await _put(chain, http, pid, "prod", body)
    assert got == status, answer
    assert answer["error"]["code"] == ("INVALID_REQUEST" if status == 400 else "NOT_FOUND")
    assert message in answer["error"]["message"]


async def test_cli_sets_a_split_and_rolls_back(chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = await _prompt(chain, http)

    async def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(cli.main, ["--url", chain.base_url, *argv],
                                       env={"PROMPTLINE_API_KEY": "dev-key"},
                                       stdout=out, stderr=err)
        return code, out.getvalue().strip(), err.getvalue().strip()

    assert await run("prompts", "label", pid, "prod", "1") == (
        0, f"{pid}: prod -> version 1 (new label)", "")
    assert await run("prompts", "label", pid, "prod", "--split", "1=90,2=10") == (
        0, f"{pid}: prod -> 1=90% 2=10% (was 1)", "")
    assert await run("prompts", "label", pid, "prod", "--rollback") == (
        0, f"{pid}: prod -> version 1 (was 1=90% 2=10%)", "")
    code, _, err = await run("prompts", "label", pid, "prod", "--split", "1=90,2=20")
    assert (code, err) == (1, "promptline: INVALID_REQUEST: split weights must add up to 100, "
                              "got 110 (HTTP 400)")
    for bad in ("1:90", "1=\u00b2", "1=" + "9" * 5000):  # `²` passed isdigit, then int failed
        code, _, err = await run("prompts", "label", pid, "prod", "--split", bad)
        assert code == 2 and "VERSION=WEIGHT" in err and "Traceback" not in err


# --- the registry in every redis_mode ---------------------------------------------------------


async def test_split_moves_and_rollback_in_every_redis_mode(mode: Mode) -> None:  # noqa: F811
    config = make_config(mode.overrides)
    store = connect_redis(config)
    tenant, pid = f"sp-{uuid.uuid4().hex[:8]}", "greeter"
    try:
        registry = PromptRegistry(store.client)
        for n in range(3):
            await registry.create(tenant, PromptDraft(pid, f"version {n + 1}"))
        await registry.set_label(tenant, pid, "prod", 1)
        move = await registry.move_label(tenant, pid, "prod", check_split({2: 60, 3: 40}))
        assert (move.split, move.previous) == (((2, 60), (3, 40)), ((1, 100),))
        split = move.split
        for key in ("a", "b", "c", "d"):
            got = await registry.get(tenant, pid, label="prod", sticky=key)
            assert got.version == pick_version(split, pid, "prod", key)
            assert got.split == split
        with pytest.raises(PromptlineError, match=r"split\.7"):
            await registry.move_label(tenant, pid, "prod", check_split({2: 50, 7: 50}))
        back = await registry.rollback_label(tenant, pid, "prod")
        assert (back.split, back.previous) == (((1, 100),), split)
        assert (await registry.get(tenant, pid, label="prod", sticky="a")).version == 1
    finally:
        await store.close()

"""Request records, feedback and per-prompt stats through the real chain (prompt-lifecycle.md).

Each test uses tenants and prompt ids of its own: records and stats are kept per tenant in the
session's Redis. Records are written after the terminal frame, so a test waits for them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from promptline import cli
from promptline.devtools.embedded_redis import EmbeddedRedis
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import STORE_RETRY_S
from promptline.v1 import prompt_admin_pb2, prompt_admin_pb2_grpc
from services.prompt.feedback import VersionStats, record_key, stats_key
from services.prompt.usage import HOUR_MS
from tests.chain import Chain, chain_fixture, running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually

FAST = {"ttft_ms": 0, "tokens_per_second": 0, "reply": "one two three four five six seven"}
SLOW_TTFT_MS = 300
TENANTS = [
    *BASE_CONFIG["tenants"],
    *({"name": f"fb-{n}", "api_keys": [f"fb-{n}-key"], "admin": True} for n in "abcdefg"),
]
MODELS = [
    {"name": "fast", "provider": "simulated", "simulated": FAST},
    {"name": "slow", "provider": "simulated", "simulated": {**FAST, "ttft_ms": SLOW_TTFT_MS}},
    {"name": "fail3", "provider": "simulated", "simulated": {**FAST, "fail_after_tokens": 3}},
]
HI = [{"role": "user", "content": "Hi"}]


chain = chain_fixture({"tenants": TENANTS}, MODELS)



def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant}-key"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def stream(http: aiohttp.ClientSession, chain: Chain, tenant: str,
                 **body: Any) -> dict[str, Any]:
    """One native SSE stream: its events by name (the last of each), and `text`."""
    async with http.post(f"{chain.base_url}/v1/chat/stream", headers=auth(tenant),
                         json={"messages": HI, **body}) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    events: dict[str, Any] = {}
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events[fields["event"]] = json.loads(fields["data"])
    return events


async def create_prompt(http: aiohttp.ClientSession, chain: Chain, tenant: str, prompt_id: str,
                        model: str = "fast") -> int:
    async with http.post(f"{chain.base_url}/v1/prompts/{prompt_id}/versions",
                         headers=auth(tenant),
                         json={"template": "You are terse.", "model": model}) as resp:
        assert resp.status == 201, await resp.text()
        return int((await resp.json())["version"])


async def feedback(http: aiohttp.ClientSession, chain: Chain, tenant: str,
                   body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{chain.base_url}/v1/feedback", headers=auth(tenant),
                         json=body) as resp:
        return resp.status, await resp.json()


async def first_feedback(http: aiohttp.ClientSession, chain: Chain, tenant: str,
                         body: dict[str, Any]) -> dict[str, Any]:
    """Feedback on a stream that just ended: its record is written just after its last frame."""
    answer: tuple[int, dict[str, Any]] = (0, {})

    async def stored() -> bool:
        nonlocal answer
        answer = await feedback(http, chain, tenant, body)
        return answer[0] != 404

    await eventually(stored, what=f"the record of {body['request_id']}")
    status, data = answer
    assert status == 201, data
    return data


async def stats(http: aiohttp.ClientSession, chain: Chain, tenant: str, prompt_id: str,
                query: str = "") -> tuple[int, dict[str, Any]]:
    async with http.get(f"{chain.base_url}/v1/prompts/{prompt_id}/stats{query}",
                        headers=auth(tenant)) as resp:
        return resp.status, await resp.json()


async def stats_with(http: aiohttp.ClientSession, chain: Chain, tenant: str, prompt_id: str,
                     requests: int) -> dict[str, Any]:
    """The prompt's stats once `requests` streams were recorded."""
    report: dict[str, Any] = {}

    async def counted() -> bool:
        nonlocal report
        status, report = await stats(http, chain, tenant, prompt_id)
        assert status == 200, report
        return sum(v["requests"] for v in report["versions"]) == requests

    await eventually(counted, what=f"{requests} recorded streams")
    return report


def feedback_count(prompt: str, version: str, score: str) -> float:
    return REGISTRY.get_sample_value("promptline_feedback_total", {
        "prompt": prompt, "version": version, "score": score}) or 0


# --- records ---------------------------------------------------------------------------------


async def test_feedback_joins_the_request_record(chain: Chain, http: aiohttp.ClientSession,
                                                 redis_server: Any) -> None:
    pid = unique("join")
    await create_prompt(http, chain, "fb-a", pid)
    before = time.time() * 1000
    events = await stream(http, chain, "fb-a", prompt={"id": pid})
    rid, usage = events["start"]["request_id"], events["done"]["usage"]
    data = await first_feedback(http, chain, "fb-a",
                                {"request_id": rid, "score": 1, "comment": "spot on"})
    assert data["object"] == "feedback" and data["request_id"] == rid
    assert (data["score"], data["comment"], data["replaced"]) == (1, "spot on", False)
    record = data["request"]
    assert (record["prompt_id"], record["prompt_version"], record["model"]) == (pid, 1, "fast")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert record["outcome"] == "done"
    assert 0 <= record["first_token_ms"] <= record["duration_ms"] < 5000
    assert before <= record["ended_at_ms"] <= time.time() * 1000
    assert before <= data["created_at_ms"] <= time.time() * 1000
    assert feedback_count(pid, "1", "1") == 1
    day_ms = 86_400_000
    redis = aioredis.from_url(redis_server.url)
    try:  # both kept feedback.retention (30 days by default): the bucket from its hour's end
        assert 30 * day_ms - 60_000 < await redis.pttl(record_key("fb-a", rid)) <= 30 * day_ms
        bucket = await redis.pttl(stats_key("fb-a", pid, record["ended_at_ms"] // HOUR_MS))
        assert 30 * day_ms - 60_000 < bucket <= 30 * day_ms + HOUR_MS
    finally:
        await redis.aclose()

    # a request without a managed prompt has a record too; the metric's prompt is ""
    plain = await stream(http, chain, "fb-a", model="fail3")
    before_plain = feedback_count("", "", "0.3")
    data = await first_feedback(http, chain, "fb-a", {
        "request_id": plain["start"]["request_id"], "score": 0.25})
    assert data["score"] == 0.25 and data["comment"] is None
    record = data["request"]
    assert (record["prompt_id"], record["prompt_version"]) == (None, None)
    assert record["outcome"] == "UPSTREAM_ERROR" and record["completion_tokens"] == 3
    assert feedback_count("", "", "0.3") == before_plain + 1  # 0.25 rounds to one decimal


async def test_a_second_feedback_replaces_the_first_without_double_counting(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = unique("swap")
    await create_prompt(http, chain, "fb-b", pid)
    rid = (await stream(http, chain, "fb-b", prompt={"id": pid}))["start"]["request_id"]
    await first_feedback(http, chain, "fb-b", {"request_id": rid, "score": 1, "comment": "ok"})
    status, data = await feedback(http, chain, "fb-b", {"request_id": rid, "score": -1})
    assert status == 200 and data["replaced"] is True
    assert (data["score"], data["comment"]) == (-1, None)  # replaced whole, comment too
    status, data = await feedback(http, chain, "fb-b", {"request_id": rid, "score": 0.5})
    assert status == 200 and data["score"] == 0.5
    (version,) = (await stats_with(http, chain, "fb-b", pid, 1))["versions"]
    assert (version["feedback_count"], version["feedback_mean"]) == (1, 0.5)
    assert [feedback_count(pid, "1", s) for s in ("1", "-1", "0.5")] == [1, 1, 1]

    # concurrent replacements: each swap is one script, so the count stays 1
    scores = [0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1]
    answers = await asyncio.gather(*(feedback(http, chain, "fb-b", {"request_id": rid,
                                                                    "score": s})
                                     for s in scores))
    assert {status for status, _ in answers} == {200}
    (version,) = (await stats_with(http, chain, "fb-b", pid, 1))["versions"]
    assert version["feedback_count"] == 1 and version["feedback_mean"] in scores


# --- tenants and bad input -------------------------------------------------------------------


async def test_tenants_never_see_each_others_requests_or_stats(
        chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = unique("mine")
    await create_prompt(http, chain, "fb-c", pid)
    rid = (await stream(http, chain, "fb-c", prompt={"id": pid}))["start"]["request_id"]
    await stats_with(http, chain, "fb-c", pid, 1)
    status, body = await feedback(http, chain, "fb-d", {"request_id": rid, "score": 1})
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await stats(http, chain, "fb-d", pid)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    await create_prompt(http, chain, "fb-d", pid)  # the same id in the other tenant: its own
    status, body = await stats(http, chain, "fb-d", pid)
    assert status == 200 and body["versions"] == []
    status, body = await feedback(http, chain, "fb-c", {"request_id": "never-ran", "score": 1})
    assert status == 404 and "never-ran" in body["error"]["message"]
    # the owner's feedback still lands, counted once
    status, body = await feedback(http, chain, "fb-c", {"request_id": rid, "score": 1})
    assert status == 201
    (version,) = (await stats_with(http, chain, "fb-c", pid, 1))["versions"]
    assert version["feedback_count"] == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"score": 1}, "request_id"),
    ({"request_id": 7, "score": 1}, "request_id"),
    ({"request_id": "not an id", "score": 1}, "request_id"),
    ({"request_id": "r-1"}, "score"),
    ({"request_id": "r-1", "score": None}, "score"),
    ({"request_id": "r-1", "score": "1"}, "score"),
    ({"request_id": "r-1", "score": True}, "score"),
    ({"request_id": "r-1", "score": 2}, "score"),
    ({"request_id": "r-1", "score": -0.5}, "score"),
    ({"request_id": "r-1", "score": 10**400}, "score"),
    ({"request_id": "r-1", "score": 1, "comment": 5}, "comment"),
    ({"request_id": "r-1", "score": 1, "comment": "x" * 2001}, "comment"),
    ([], "body"),
])
async def test_bad_feedback_is_400_naming_the_field(chain: Chain, http: aiohttp.ClientSession,
                                                    body: Any, field: str) -> None:
    status, data = await feedback(http, chain, "fb-e", body)
    assert status == 400, data
    assert data["error"]["code"] == "INVALID_REQUEST"
    assert re.search(rf"(?<!\w){field}(?!\w)", data["error"]["message"]), data["error"]


@pytest.mark.parametrize(("query", "field"), [
    ("?from=yesterday", "from"),
    ("?from=2025-01-02&to=2025-01-01", "from"),
    ("?from=2020-01-01&to=2025-01-01", "feedback.retention"),
    ("?group_by=model", "group_by"),
    ("?to=1&to=2", "to"),
    ("?from=9999-12-31T20:00:00&to=9999-12-31T23:30:00", "from"),  # was a 500: year 10000
])
async def test_bad_stats_queries_are_400_naming_the_field(
        chain: Chain, http: aiohttp.ClientSession, query: str, field: str) -> None:
    pid = unique("q")
    await create_prompt(http, chain, "fb-e", pid)
    status, data = await stats(http, chain, "fb-e", pid, query)
    assert status == 400, data
    assert data["error"]["code"] == "INVALID_REQUEST" and field in data["error"]["message"]
    status, data = await stats(http, chain, "fb-e", "-bad-id")
    assert status == 400 and "prompt id" in data["error"]["message"]


# --- stats -----------------------------------------------------------------------------------


async def _cli(*argv: str, key: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.main, list(argv), env={"PROMPTLINE_API_KEY": key},
                                   stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_stats_per_version_match_the_streams_run(chain: Chain,
                                                       http: aiohttp.ClientSession) -> None:
    pid = unique("ab")  # tenant fb-f runs nothing else: its usage is these streams
    await create_prompt(http, chain, "fb-f", pid, model="fast")
    await create_prompt(http, chain, "fb-f", pid, model="slow")
    first = await asyncio.gather(*(stream(http, chain, "fb-f", prompt={"id": pid, "version": 1})
                                   for _ in range(3)))
    await asyncio.gather(*(stream(http, chain, "fb-f", prompt={"id": pid, "version": 2})
                           for _ in range(2)),
                         stream(http, chain, "fb-f", model="fail3",
                                prompt={"id": pid, "version": 2}))
    report = await stats_with(http, chain, "fb-f", pid, 6)
    for rid, score in ((first[0]["start"]["request_id"], 1), (first[1]["start"]["request_id"],
                                                             0)):
        await first_feedback(http, chain, "fb-f", {"request_id": rid, "score": score})
    _, report = await stats(http, chain, "fb-f", pid)
    one, two = report["versions"]
    assert (one["version"], one["requests"], one["errors"], one["errors_by_code"]) == (
        1, 3, 0, {})
    assert (two["version"], two["requests"], two["errors"], two["errors_by_code"]) == (
        2, 3, 1, {"UPSTREAM_ERROR": 1})
    assert one["prompt_tokens"] == sum(s["done"]["usage"]["prompt_tokens"] for s in first)
    assert one["completion_tokens"] == sum(s["done"]["usage"]["completion_tokens"]
                                           for s in first)
    async with http.get(f"{chain.base_url}/v1/usage", headers=auth("fb-f")) as resp:
        total = (await resp.json())["total"]  # settled by the same rule as the records
    assert one["prompt_tokens"] + two["prompt_tokens"] == total["prompt_tokens"]
    assert one["completion_tokens"] + two["completion_tokens"] == total["completion_tokens"]
    # version 1 is fast; two of version 2's three first tokens waited SLOW_TTFT_MS
    assert one["first_token_p50_ms"] <= one["first_token_p95_ms"] < SLOW_TTFT_MS
    assert SLOW_TTFT_MS <= two["first_token_p50_ms"] <= two["first_token_p95_ms"] < 1000
    assert (one["feedback_count"], one["feedback_mean"]) == (2, 0.5)
    assert (two["feedback_count"], two["feedback_mean"]) == (0, None)
    assert report["to"] > report["from"] and report["from"].endswith(":00:00Z")

    code, out, err = await _cli("prompts", "stats", pid, "--url", chain.base_url,
                                key="fb-f-key")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"prompt {pid}, ")
    assert lines[1].split() == ["VERSION", "REQUESTS", "ERRORS", "CANCELLED",
                                "FIRST_TOKEN_P50_MS", "FIRST_TOKEN_P95_MS", "PROMPT_TOKENS",
                                "COMPLETION_TOKENS", "FEEDBACK_COUNT", "FEEDBACK_MEAN",
                                "ERRORS_BY_CODE"]
    assert lines[2].split()[:4] == ["1", "3", "0", "0"] and lines[2].split()[-2:] == ["0.5",
                                                                                    "-"]
    assert lines[3].split()[:4] == ["2", "3", "1", "0"]
    assert lines[3].split()[-3:] == ["0", "-", "UPSTREAM_ERROR=1"]
    code, out, _ = await _cli("prompts", "stats", pid, "--url", chain.base_url, "--json",
                              key="fb-f-key")
    assert code == 0 and json.loads(out)["versions"] == report["versions"]
    code, _, err = await _cli("prompts", "stats", "no-such-prompt", "--url", chain.base_url,
                              key="fb-f-key")
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = await _cli("prompts", "stats", pid, "--url", chain.base_url, "--from",
                              "soon", key="fb-f-key")
    assert code == 1 and "INVALID_REQUEST: query parameter from" in err


async def test_feedback_and_stats_over_grpc(chain: Chain, http: aiohttp.ClientSession) -> None:
    pid = unique("grpc")
    await create_prompt(http, chain, "fb-g", pid)
    rid = (await stream(http, chain, "fb-g", prompt={"id": pid}))["start"]["request_id"]
    await stats_with(http, chain, "fb-g", pid, 1)
    admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
    key = (("authorization", "Bearer fb-g-key"),)
    stored = await admin.SubmitFeedback(prompt_admin_pb2.SubmitFeedbackRequest(
        request_id=rid, score=-1, comment="too long"), metadata=key, timeout=10)
    assert (stored.score, stored.replaced, stored.request.prompt_id) == (-1, False, pid)
    assert stored.request.HasField("first_token_ms")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SubmitFeedback(prompt_admin_pb2.SubmitFeedbackRequest(request_id=rid),
                                   metadata=key, timeout=10)
    err = PromptlineError.from_rpc_error(caught.value)
    assert err.code is ErrorCode.INVALID_REQUEST and err.message == "score is required"
    report = await admin.GetPromptStats(prompt_admin_pb2.GetPromptStatsRequest(prompt_id=pid),
                                        metadata=key, timeout=10)
    (version,) = report.versions
    assert (version.version, version.requests, version.feedback_count,
            version.feedback_mean) == (1, 1, 1, -1)
    assert report.to_ms % 3_600_000 == 0 and report.from_ms % 3_600_000 == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetPromptStats(prompt_admin_pb2.GetPromptStatsRequest(prompt_id=pid),
                                   metadata=(("authorization", "Bearer fb-a-key"),), timeout=10)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_percentiles_read_from_the_buckets() -> None:
    stats = VersionStats(1)
    assert stats.first_token_ms(0.5) is None
    for _ in range(9):
        stats.add(["h", "100"], 1)  # (75, 100]
    stats.add(["h", "inf"], 1)  # past the last bound
    assert stats.first_token_ms(0.5) == round(75 + 25 * 5 / 9)
    assert stats.first_token_ms(0.95) == 300_000
    stats.add(["e", "UPSTREAM_ERROR"], 2)
    stats.add(["n"], 10)
    stats.add(["unknown"], 3)  # a field a later version writes: ignored
    assert (stats.requests, stats.errors) == (10, 2)


# --- Redis down --------------------------------------------------------------------------------


async def test_streams_go_on_while_records_cannot_be_written(
        http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="promptline.feedback")
    server = EmbeddedRedis().start()
    config = make_config({"tenants": TENANTS,
                          "quota_policy": {"on_redis_error": "fail_open",
                                           "redis_timeout": "100ms"}},
                         redis_url=server.url, models=MODELS)

    def dropped() -> float:
        return REGISTRY.get_sample_value("promptline_redis_errors_total",
                                         {"operation": "request_record"}) or 0

    try:
        async with running_chain(config) as chain:
            server.stop()
            before = dropped()
            for _ in range(3):
                events = await stream(http, chain, "fb-a", model="fast")
                assert events["done"]["finish_reason"] == "stop"
            await eventually(lambda: dropped() >= before + 3, what="3 dropped records")
            warnings = [r.getMessage() for r in caplog.records
                        if r.name == "promptline.feedback"]
            assert sum("not written until it is back" in w for w in warnings) == 1

            server = EmbeddedRedis(port=server.port).start()  # back, empty
            await asyncio.sleep(STORE_RETRY_S)
            rid = (await stream(http, chain, "fb-a", model="fast"))["start"]["request_id"]
            await first_feedback(http, chain, "fb-a", {"request_id": rid, "score": 1})
            assert any("written again" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


# --- every redis_mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
async def test_records_feedback_and_stats_in_every_redis_mode(
        mode: str, request: pytest.FixtureRequest) -> None:
    """Both scripts touch a record and a stats hash: one slot (the tenant's) on a cluster too."""
    if mode == "cluster":
        overrides: dict[str, Any] = {"redis_mode": "cluster",
                                     "redis_url": request.getfixturevalue("redis_cluster").url}
    else:
        sentinel = request.getfixturevalue("redis_sentinel")
        overrides = {"redis_mode": "sentinel", "redis_sentinel": {
            "master": sentinel.master_name, "nodes": sentinel.sentinels}}
    tenant = unique("fb-mode")  # the shared topologies are never flushed
    config = make_config({**overrides, "tenants": [
        {"name": tenant, "api_keys": [f"{tenant}-key"], "admin": True}]}, models=MODELS)
    key = (("authorization", f"Bearer {tenant}-key"),)
    async with running_chain(config) as chain, aiohttp.ClientSession() as http:
        await create_prompt(http, chain, tenant, "greet")
        rid = (await stream(http, chain, tenant, prompt={"id": "greet"}))["start"]["request_id"]
        await first_feedback(http, chain, tenant, {"request_id": rid, "score": 0})
        admin = prompt_admin_pb2_grpc.PromptAdminStub(chain.prompt_channel)
        replaced = await admin.SubmitFeedback(prompt_admin_pb2.SubmitFeedbackRequest(
            request_id=rid, score=1), metadata=key, timeout=10)
        assert replaced.replaced and replaced.request.prompt_id == "greet"
        report = await admin.GetPromptStats(prompt_admin_pb2.GetPromptStatsRequest(
            prompt_id="greet"), metadata=key, timeout=10)
        (version,) = report.versions
        assert (version.requests, version.feedback_count, version.feedback_mean) == (1, 1, 1)

"""Tracing, metrics, logs and live config, observed from outside the running chain."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
from pathlib import Path

import aiohttp
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from promptline.config import load_config
from promptline.config_reload import LiveConfig
from promptline.devtools.sse_client import collect
from promptline.logs import JsonFormatter
from promptline.metrics import track_gc_pauses
from promptline.tracing import setup_tracing, tracing_enabled
from services.edge_http.context import LIVE_CONFIG_KEY
from tests.chain import running_chain
from tests.conftest import BASE_CONFIG, make_config
from tests.eventually import eventually

AUTH = {"Authorization": "Bearer dev-key"}
BODY = {"model": "sim", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process's tracer provider, exporting to memory (tracing is process-global)."""
    exporter = InMemorySpanExporter()
    provider = setup_tracing("tests", {}, processor=SimpleSpanProcessor(exporter))
    if provider is None:  # another module installed one first: attach to it
        current = trace.get_tracer_provider()
        assert isinstance(current, TracerProvider)
        current.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing_enabled()  # servers started from now on get the interceptors
    return exporter


def test_tracing_is_off_without_an_exporter():
    import promptline.tracing as tracing

    if tracing.tracing_enabled():
        pytest.skip("a tracer provider is already installed in this process")
    assert setup_tracing("tests", {}) is None
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def post(base_url: str, body: dict | None = None, headers: dict | None = None):
    async with aiohttp.ClientSession() as http, http.post(
            f"{base_url}/v1/chat/stream", json=body or BODY,
            headers={**AUTH, **(headers or {})}) as resp:
        return resp.status, resp.headers.copy(), (await collect(resp) if resp.status == 200
                                                 else await resp.json())


async def test_one_trace_from_edge_to_provider(spans, redis_client, redis_server):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with running_chain(make_config(redis_url=redis_server.url)) as chain:
        spans.clear()
        status, headers, events = await post(chain.base_url, headers={"traceparent": traceparent})
        assert status == 200 and events[-1].event == "done"
        rid = headers["X-Request-Id"]

        def ours() -> list:
            return [s for s in spans.get_finished_spans()
                    if format(s.context.trace_id, "032x") == trace_id]

        # the engine's spans end just after the last frame: wait for all six
        await eventually(lambda: len(ours()) >= 6, what="six spans of the trace")
    names = {s.name for s in ours()}
    ours = ours()
    assert "POST /v1/chat/stream" in names
    # a client and a server span for each gRPC hop
    assert [s.name for s in ours].count("/promptline.v1.PromptService/StreamChat") == 2
    assert [s.name for s in ours].count("/promptline.v1.LlmEngine/Generate") == 2
    assert "provider simulated" in names
    # all of them in the one trace the client started
    assert len({s.context.trace_id for s in ours}) == 1
    provider = next(s for s in ours if s.name == "provider simulated")
    assert provider.attributes["llm.model"] == "sim"
    assert provider.attributes["llm.completion_tokens"] > 0
    # measured from the provider call: at least the simulated model's own time to first token
    assert provider.attributes["llm.ttft_ms"] >= BASE_CONFIG["models"][0]["simulated"]["ttft_ms"]
    assert provider.attributes["promptline.request_id"] == rid
    edge = next(s for s in ours if s.name == "POST /v1/chat/stream")
    assert edge.attributes["promptline.request_id"] == rid
    assert edge.parent is not None and format(edge.parent.span_id, "016x") == "00f067aa0ba902b7"


async def test_metrics_follow_a_stream_an_error_and_a_rejection(redis_client, redis_server):
    tenants = [{"name": "dev", "api_keys": ["dev-key"], "quotas": {"qpm": 1}}]
    config = make_config({"tenants": tenants}, redis_url=redis_server.url)
    before_out = sample("promptline_tokens_total", tenant="dev", model="sim", direction="out")
    before_ttft = sample("promptline_time_to_first_token_seconds_count", service="edge_http",
                         model="sim")
    before_rejections = sample("promptline_quota_rejections_total", tenant="dev",
                               limit="tenant:qpm")
    before_errors = sample("promptline_errors_total", service="prompt", code="QPM_EXCEEDED",
                           stage="first_packet")
    before_missing = sample("promptline_errors_total", service="llm_engine", code="NOT_FOUND",
                            stage="connect")
    async with running_chain(config) as chain:
        status, _, events = await post(chain.base_url)
        assert status == 200
        status, _, body = await post(chain.base_url)
        assert status == 429 and body["error"]["code"] == "QPM_EXCEEDED"
        # the engine sees an unknown model only from a direct caller
        from promptline.v1 import common_pb2, llm_engine_pb2
        call = chain.engine_stub.Generate(llm_engine_pb2.GenerateRequest(
            model="nope", messages=[common_pb2.ChatMessage(role="user", content="x")]))
        with pytest.raises(Exception):  # noqa: B017 - the status is checked by the metric
            async for _ in call:
                pass
        async with aiohttp.ClientSession() as http, http.get(f"{chain.base_url}/metrics") as r:
            exposition = await r.text()
        engine_metrics = f"http://127.0.0.1:{chain.engine.metrics.port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(engine_metrics) as r:
            assert r.status == 200
            assert "promptline_provider_requests_total" in await r.text()
    usage = next(e for e in events if e.event == "done").data["usage"]
    assert sample("promptline_tokens_total", tenant="dev", model="sim", direction="out") == \
        before_out + usage["completion_tokens"]
    assert sample("promptline_time_to_first_token_seconds_count", service="edge_http",
                  model="sim") == before_ttft + 1
    assert sample("promptline_quota_rejections_total", tenant="dev", limit="tenant:qpm") == \
        before_rejections + 1
    assert sample("promptline_errors_total", service="prompt", code="QPM_EXCEEDED",
                  stage="first_packet") == before_errors + 1
    assert sample("promptline_errors_total", service="llm_engine", code="NOT_FOUND",
                  stage="connect") == before_missing + 1
    assert sample("promptline_active_streams", service="edge_http") == 0
    assert "promptline_time_to_first_token_seconds_bucket" in exposition
    assert 'promptline_stream_duration_seconds_count{model="sim",outcome="done"' in exposition


async def test_logs_hold_no_key_and_no_prompt_text(redis_client, redis_server, caplog):
    secret_prompt = "my-very-private-question-7f3a"
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        async with running_chain(make_config(redis_url=redis_server.url)) as chain:
            await post(chain.base_url, {**BODY, "messages": [
                {"role": "user", "content": secret_prompt}]})
            await post(chain.base_url, {**BODY, "messages": [
                {"role": "user", "content": secret_prompt + " forbidden-word"}]})
            await post(chain.base_url, headers={"Authorization": "Bearer wrong-secret-key"})
    finally:
        root.removeHandler(handler)
    text = buffer.getvalue()
    assert "request_id" in text  # the logs are there...
    for secret in (secret_prompt, "dev-key", "wrong-secret-key"):
        assert secret not in text  # ...but without keys or prompt text


def _write(path: Path, raw: dict) -> None:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")


async def test_config_change_applies_without_restart(redis_client, redis_server, tmp_path):
    path = tmp_path / "live.yaml"
    raw = {**BASE_CONFIG, "redis_url": redis_server.url,
           "moderation": {"blocked_terms": ["forbidden-word"]}}
    _write(path, raw)
    config = load_config(path, env={})
    async with running_chain(config) as chain:
        status, _, _ = await post(chain.base_url, {**BODY, "messages": [
            {"role": "user", "content": "tell me about bananas"}]})
        assert status == 200
        live = [chain.prompt.live, chain.engine.live, chain.edge.app[LIVE_CONFIG_KEY]]
        applied = sample("promptline_config_reloads_total", service="prompt", result="applied")

        # a valid change: a new blocked term and a new tenant key, picked up by every hop
        raw["moderation"] = {"blocked_terms": ["forbidden-word", "bananas"]}
        raw["tenants"] = [*raw["tenants"], {"name": "new", "api_keys": ["new-tenant-key"]}]
        _write(path, raw)
        for holder in live:
            holder.reload()
        status, _, body = await post(chain.base_url, {**BODY, "messages": [
            {"role": "user", "content": "tell me about bananas"}]})
        assert status == 400 and body["error"]["code"] == "MODERATION_BLOCKED"
        status, _, _ = await post(chain.base_url, headers={"Authorization":
                                                            "Bearer new-tenant-key"})
        assert status == 200
        assert sample("promptline_config_reloads_total", service="prompt",
                      result="applied") == applied + 1

        # an invalid file is refused and the running config stays
        rejected = sample("promptline_config_reloads_total", service="prompt", result="rejected")
        path.write_text("tenants: []\nmodels: nonsense\n", encoding="utf-8")
        assert chain.prompt.live.reload() is False
        assert sample("promptline_config_reloads_total", service="prompt",
                      result="rejected") == rejected + 1
        status, _, body = await post(chain.base_url, {**BODY, "messages": [
            {"role": "user", "content": "bananas again"}]})
        assert status == 400 and body["error"]["code"] == "MODERATION_BLOCKED"


@pytest.fixture
async def watched(tmp_path):
    """A config file at heartbeat 15s, watched every 50 ms: (its path, its content, the live)."""
    path = tmp_path / "watched.yaml"
    raw = {**BASE_CONFIG, "edge": {"heartbeat": "15s"}}
    _write(path, raw)
    live = LiveConfig(load_config(path, env={}), "test", env={})
    live.start(interval=0.05)
    try:
        yield path, raw, live
    finally:
        await live.stop()


async def test_file_watch_picks_up_a_change(watched):
    path, raw, live = watched
    _write(path, {**raw, "edge": {"heartbeat": "5s"}})
    await eventually(lambda: live.current.edge.heartbeat == 5.0, what="the reload")


async def test_a_file_the_loader_chokes_on_leaves_the_watch_running(watched):
    """Deeply nested YAML (a RecursionError in the parser) or a 400-digit number (an
    OverflowError) is a rejected reload: the watcher goes on and applies the next good file."""
    path, raw, live = watched
    for bad in ("a: " + "[" * 3000 + "]" * 3000 + "\n",
                yaml.safe_dump({**raw, "edge": {"heartbeat": 10**400}})):
        before = sample("promptline_config_reloads_total", service="test", result="rejected")
        path.write_text(bad)
        await eventually(lambda before=before: sample(
            "promptline_config_reloads_total", service="test", result="rejected") > before,
            what="the bad file rejected")
    _write(path, {**raw, "edge": {"heartbeat": "7s"}})
    await eventually(lambda: live.current.edge.heartbeat == 7.0, what="the next reload")


async def test_in_flight_stream_keeps_its_config(redis_client, redis_server, tmp_path):
    """A reload during a stream does not change that stream: it finishes under its old config."""
    path = tmp_path / "inflight.yaml"
    slow = {"name": "slowsim", "provider": "simulated",
            "simulated": {"ttft_ms": 0, "tokens_per_second": 40, "reply": "word " * 30}}
    raw = {**BASE_CONFIG, "redis_url": redis_server.url, "models": [*BASE_CONFIG["models"], slow]}
    _write(path, raw)
    config = load_config(path, env={})
    async with running_chain(config) as chain:
        task = asyncio.create_task(post(chain.base_url, {**BODY, "model": "slowsim"}))
        await eventually(lambda: chain.engine_streams == 1, what="the stream")
        # the new config would stall this model at once; the running stream must not notice
        stalled = {**slow, "simulated": {**slow["simulated"], "stall_after_tokens": 0}}
        _write(path, {**raw, "models": [*BASE_CONFIG["models"], stalled]})
        chain.engine.live.reload()
        status, _, events = await task
    assert status == 200 and events[-1].event == "done"
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == "word " * 30


def test_gc_pauses_are_timed_once_per_collection():
    def count() -> float:
        return REGISTRY.get_sample_value("promptline_gc_pause_seconds_count",
                                         {"service": "test", "generation": "2"}) or 0.0

    track_gc_pauses("test")
    track_gc_pauses("test")  # idempotent: one callback, one observation per collection
    before = count()
    gc.collect()
    assert count() == before + 1
    assert REGISTRY.get_sample_value("promptline_gc_pause_seconds_sum",
                                     {"service": "test", "generation": "2"}) > 0


async def test_a_stream_the_caller_got_done_for_counts_as_done_on_every_hop(redis_server):
    """The edge cancels its call once it has written `done`, possibly while the prompt service
    still settles the quota: that stream still counts (and logs) as done, not cancelled."""
    config = make_config({"tenants": [{"name": "dev", "api_keys": ["dev-key"],
                                       "quotas": {"qpm": 1000}}]}, redis_url=redis_server.url)

    def outcomes() -> dict[str, float]:
        return {f"{s} {o}": sample("promptline_stream_duration_seconds_count", service=s,
                                   model="sim", outcome=o)
                for s in ("prompt", "llm_engine") for o in ("done", "cancelled")}

    async with running_chain(config) as chain:
        before = outcomes()
        for _ in range(5):
            status, _, events = await post(chain.base_url)
            assert status == 200 and events[-1].event == "done"
        await eventually(lambda: sum(outcomes().values()) - sum(before.values()) >= 10,
                         what="every hop's stream ended")
        after = outcomes()
    for hop in ("prompt", "llm_engine"):
        assert after[f"{hop} done"] - before[f"{hop} done"] == 5, (before, after)
        assert after[f"{hop} cancelled"] == before[f"{hop} cancelled"], (before, after)


async def test_made_up_model_names_add_no_metric_series(redis_server):
    """Each unknown model name a caller sends is one 404, and one `(unknown)` observation on
    every hop it reached, not a histogram of its own per name and hop."""
    async with running_chain(make_config(redis_url=redis_server.url)) as chain:
        names = [f"made-up-{i}" for i in range(5)]
        for name in names:
            status, _, _ = await post(chain.base_url, {
                "model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert status == 404
    series = {tuple(sorted(s.labels.items())) for metric in REGISTRY.collect()
              for s in metric.samples if s.labels.get("model", "").startswith("made-up-")}
    assert series == set()
    assert sample("promptline_stream_duration_seconds_count", service="edge_http",
                  model="(unknown)", outcome="NOT_FOUND") >= len(names)

"""Prometheus metrics of every hop (served by `metrics_server`).

Names follow Prometheus conventions (`_seconds`, `_total`, base units); docs/operations.md lists
each. Tenant names appear only on the prompt service's metrics (an internal port), never on the
edge's public `/metrics`, so one tenant cannot read another's usage there. Label children are
resolved once per stream (`StreamTimer`), keeping per-token cost to one histogram observe.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Minute-level budgets: buckets reach well past a minute for TTFT and duration.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

TIME_TO_FIRST_TOKEN = Histogram(
    "promptline_time_to_first_token_seconds",
    "Time from a request reaching the hop to its first token (edge: first delta written; "
    "llm_engine: first token from the provider).",
    ["service", "model"], buckets=_LATENCY_BUCKETS)
INTER_TOKEN_GAP = Histogram(
    "promptline_inter_token_gap_seconds",
    "Gap between consecutive tokens from the provider, as seen by the llm_engine.",
    ["model"], buckets=_GAP_BUCKETS)
STREAM_DURATION = Histogram(
    "promptline_stream_duration_seconds",
    "Whole stream duration by hop and outcome (done, an error code, or cancelled).",
    ["service", "model", "outcome"], buckets=_LATENCY_BUCKETS)
TOKENS = Counter(
    "promptline_tokens_total",
    "Tokens by tenant and model; direction is 'in' (prompt) or 'out' (completion).",
    ["tenant", "model", "direction"])
COST = Counter(
    "promptline_cost_usd_total",
    "What streams cost in USD by tenant and model: real usage at the model's price.",
    ["tenant", "model"])
BUDGET_ALERTS = Counter(
    "promptline_budget_alerts_total",
    "Credit alerts raised (one per threshold and period over every replica) by tenant, budget "
    "(tenant, key or user) and threshold (a share of the budget).",
    ["tenant", "budget", "threshold"])
ALERT_WEBHOOK_FAILURES = Counter(
    "promptline_alert_webhook_failures_total",
    "Credit-alert webhook failures: an attempt that failed (timeout, connection, status) or an "
    "alert given up (gave_up after the last attempt, queue_full when the queue was full).",
    ["reason"])
ERRORS = Counter(
    "promptline_errors_total",
    "Error frames sent, by hop, code and stage.",
    ["service", "code", "stage"])
QUOTA_REJECTIONS = Counter(
    "promptline_quota_rejections_total",
    "Requests rejected by a quota, by tenant and limit (e.g. tenant:tpm, model:qpm).",
    ["tenant", "limit"])
ACTIVE_STREAMS = Gauge(
    "promptline_active_streams",
    "Streams in flight on this hop.",
    ["service"])
PROVIDER_REQUESTS = Counter(
    "promptline_provider_requests_total",
    "Provider calls by model, provider kind and outcome (ok or an error code).",
    ["model", "provider", "outcome"])
PROVIDER_FIRST_CHUNK = Histogram(
    "promptline_provider_first_chunk_seconds",
    "Provider latency: from the call to its first chunk.",
    ["model", "provider"], buckets=_LATENCY_BUCKETS)
DEPLOYMENT_HEALTHY = Gauge(
    "promptline_deployment_healthy",
    "1 while a deployment of a model's pool is in service as this llm_engine replica sees the "
    "shared breaker, 0 while it is ejected or being probed.",
    ["model", "deployment"])
DEPLOYMENT_REQUESTS = Counter(
    "promptline_deployment_requests_total",
    "Provider calls by model, deployment and outcome (ok, an error code, or cancelled).",
    ["model", "deployment", "outcome"])
REDIS_UP = Gauge(
    "promptline_redis_up",
    "1 while this prompt-service replica reaches Redis (a PING every second), else 0.")
QUOTA_DEGRADED = Gauge(
    "promptline_quota_degraded",
    "1 while this prompt-service replica enforces quotas in memory (Redis unreachable, "
    "quota_policy.on_redis_error: local), else 0.")
QUOTA_DEGRADED_ADMISSIONS = Counter(
    "promptline_quota_degraded_admissions_total",
    "Requests admitted by the in-memory quota share while Redis was unreachable.")
JOURNAL_LAG = Histogram(
    "promptline_journal_lag_seconds",
    "Resumable streams (docs/resume.md): from a frame's arrival in the journal's buffer to the "
    "Redis write that holds it (the caller never waits for it).",
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0))
CACHE_REQUESTS = Counter(
    "promptline_cache_requests_total",
    "Response-cache outcomes by model (docs/cache.md): hit, miss, bypass (Cache-Control: "
    "no-cache), store (a reply stored), skip (a finished reply not stored).",
    ["model", "result"])
FEEDBACK = Counter(
    "promptline_feedback_total",
    "Feedback accepted (a replacement counts again) by prompt (\"\" for a request without one), "
    "version and score: \"1\", \"-1\", or a 0..1 score rounded to one decimal.",
    ["prompt", "version", "score"])
REDIS_ERRORS = Counter(
    "promptline_redis_errors_total",
    "Redis errors and timeouts by operation (quota admit/settle, history, prompts, cache).",
    ["operation"])
CONFIG_RELOADS = Counter(
    "promptline_config_reloads_total",
    "Config reload attempts by result (applied, rejected, unchanged).",
    ["service", "result"])
GC_PAUSE = Histogram(
    "promptline_gc_pause_seconds",
    "Python garbage-collector pauses by generation, wall clock: every open stream on the "
    "process waits.",
    ["service", "generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))


def track_gc_pauses(service: str) -> None:
    """Time every collection of this process into `promptline_gc_pause_seconds` (idempotent)."""
    if any(getattr(cb, "_promptline", False) for cb in gc.callbacks):
        return
    children = [GC_PAUSE.labels(service, str(generation)) for generation in range(3)]
    began = 0.0

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            children[info["generation"]].observe(time.perf_counter() - began)

    on_gc._promptline = True  # type: ignore[attr-defined]
    gc.callbacks.append(on_gc)


class _EventLoopTasks(Collector):
    """`promptline_asyncio_tasks`: tasks alive on the service's event loop, read at scrape time
    (the scrape runs on that loop). Back to its baseline after a burst, or tasks leak."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("promptline_asyncio_tasks",
                                "Asyncio tasks alive on this process's event loop.",
                                value=len(asyncio.all_tasks(self._loop)))


def track_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Expose `promptline_asyncio_tasks` for `loop` (once per process)."""
    global _loop_tasks
    if _loop_tasks is None:
        _loop_tasks = _EventLoopTasks(loop)
        REGISTRY.register(_loop_tasks)


_loop_tasks: _EventLoopTasks | None = None


class StreamTimer:
    """Times one stream at one hop: TTFT on the first token, duration and outcome at the end."""

    __slots__ = ("_done", "_first", "model", "service", "started")

    def __init__(self, service: str, model: str) -> None:
        self.service = service
        self.model = model
        self.started = time.perf_counter()
        self._first = False
        self._done = False

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            TIME_TO_FIRST_TOKEN.labels(self.service, self.model).observe(
                time.perf_counter() - self.started)

    def finish(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            STREAM_DURATION.labels(self.service, self.model, outcome).observe(
                time.perf_counter() - self.started)

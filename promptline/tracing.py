"""OpenTelemetry across the chain: one trace per request, edge -> prompt -> engine -> provider.

`setup_tracing` installs the global tracer provider once per process. The exporter follows the
standard OTEL_* variables: OTLP over HTTP when `OTEL_TRACES_EXPORTER=otlp` or an
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set, `console` when asked. gRPC servers and channels
then get the `opentelemetry-instrumentation-grpc` interceptors explicitly (no global
monkey-patching), which propagate W3C `traceparent` through gRPC metadata.

With no exporter (the default) tracing is off: the interceptors wrap every streamed message, a
cost (docs/performance.md) worth paying only when the spans go somewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger("promptline.tracing")

tracer = trace.get_tracer("promptline")


_enabled = False


def setup_tracing(service: str, env: Mapping[str, str],
                  processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Install the process's tracer provider when spans have somewhere to go.

    Returns the provider, or None when tracing stays off (no exporter configured) or a provider
    was already installed (the first call wins).
    """
    global _enabled
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    chosen = processor or _exporter_from_env(env)
    if chosen is None:
        return None
    provider = TracerProvider(resource=Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or f"promptline-{service}"}))
    provider.add_span_processor(chosen)
    trace.set_tracer_provider(provider)
    _enabled = True
    return provider


def tracing_enabled() -> bool:
    return _enabled


def _exporter_from_env(env: Mapping[str, str]) -> SpanProcessor | None:
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    if exporter == "otlp" or (endpoint and exporter not in ("none",)):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        log.info("exporting traces over OTLP/HTTP", extra={"endpoint": endpoint or "default"})
        return BatchSpanProcessor(OTLPSpanExporter())  # reads the OTEL_EXPORTER_OTLP_* settings
    return None


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for every gRPC server: a SERVER span per RPC, streams included."""
    return [aio_server_interceptor()] if _enabled else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for every gRPC channel: a CLIENT span per call, `traceparent` injected."""
    return list(aio_client_interceptors()) if _enabled else []


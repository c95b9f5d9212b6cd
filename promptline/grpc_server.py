"""gRPC server factory shared by the prompt and llm_engine services.

Every server gets the standard health service and server reflection (v1 and v1alpha), binds the
given address (port 0 for tests) and reports the port it got. `stop()` runs the shutdown in
phases: mark NOT_SERVING so load balancers stop routing, stop accepting, then drain in-flight
streams for up to the grace period before cancelling what is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from promptline.malformed_requests import MalformedRequests
from promptline.reflection import enable_reflection

log = logging.getLogger("promptline.grpc")

REDIS_HEALTH_NAME = "promptline.redis"
"""The health status the prompt service keeps for its Redis (edge `/readyz` reports it)."""

# Keepalive pings keep long idle streams (minute-level first-token waits) alive through NATs and
# proxies, and detect dead peers so their streams are cancelled instead of leaking.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # Callers hold one long-lived channel, so a scaled-up replica would get no traffic: ask every
    # client to reconnect (and re-resolve) every few minutes. The grace lets running streams
    # finish first, so it must outlast the longest stream (edge.request_timeout, 10 min default).
    ("grpc.max_connection_age_ms", 5 * 60_000),
    ("grpc.max_connection_age_grace_ms", 15 * 60_000),
    # gRPC's default SO_REUSEPORT lets a second process bind the same port and silently take
    # half of the calls (a second `make run`): fail its start instead.
    ("grpc.so_reuseport", 0),
]


@dataclass
class RunningServer:
    """A started gRPC server and the port it is bound to."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]

    async def stop(self, grace: float) -> None:
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def start_grpc_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_full_names: Sequence[str],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Build, bind and start a server; `register` adds the service implementations."""
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        interceptors=[MalformedRequests(), *interceptors],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*service_full_names, health.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises here where older releases returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}: the port is taken, or the host is "
                      "no address of this machine")
    await server.start()
    for name in (*service_full_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC server listening", extra={"address": address, "port": port})
    return RunningServer(server, port, health_servicer, service_full_names)

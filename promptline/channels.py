"""The one gRPC channel each hop (and the Python client) holds to the next hop.

Kept apart from `grpc_server` so the client SDK imports no server code.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # With a `dns:///` target (a headless Service) calls are spread over every resolved replica.
    ("grpc.lb_policy_name", "round_robin"),
    # A restarted next hop is dialled again within a second: gRPC's default backoff grows from
    # 1 s towards 120 s while it is down. Meanwhile calls fail fast with UNAVAILABLE.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def insecure_channel(target: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
                     ) -> grpc.aio.Channel:
    """One long-lived channel per hop per process."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS,
                                     interceptors=list(interceptors) or None)

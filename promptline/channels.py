"""The one gRPC channel each hop (and the Python client) holds to the next hop.

Kept apart from `grpc_server` so the client SDK imports no server code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

# A chat stream whose replica is unreachable, or dies before answering, is tried once more, on
# another replica (round_robin picks the next one). gRPC commits a call at the first response
# headers, which each hop sends with its first frame (the engine: with `start`, after the first
# token), so nothing is retried once a frame went out: never mid-stream. Only the two chat
# streams: a unary admin write may already have been done.
RETRY_POLICY = {
    "maxAttempts": 2,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "promptline.v1.LlmEngine", "method": "Generate"},
             {"service": "promptline.v1.PromptService", "method": "StreamChat"}],
    "retryPolicy": RETRY_POLICY,
}]})

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
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # A request up to this size can be retried (gRPC keeps it until the call commits); a larger
    # one goes once. 256 KiB by default: a long prompt would never be retried.
    ("grpc.per_rpc_retry_buffer_size", 4 * 1024 * 1024),
]


def insecure_channel(target: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
                     ) -> grpc.aio.Channel:
    """One long-lived channel per hop per process."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS,
                                     interceptors=list(interceptors) or None)

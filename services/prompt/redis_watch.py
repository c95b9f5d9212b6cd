"""Whether this prompt service reaches Redis, said where operators look, without failing probes.

A task PINGs Redis every PROBE_INTERVAL (each bounded by `quota_policy.redis_timeout`) and
reports the result three ways: the gRPC health status of `promptline.redis` (the edge's
`/readyz` body shows it), the gauge `promptline_redis_up`, and one log line per change.

The services' own health (`promptline.v1.PromptService`, and "") stays SERVING meanwhile, on
purpose: every replica shares the one Redis, so taking replicas out of rotation on a Redis blip
would turn it into a full outage, while serving goes on with `quota_policy.on_redis_error`
deciding what admission does (reject fast, admit, or enforce a local share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health, health_pb2

from promptline.grpc_server import REDIS_HEALTH_NAME
from promptline.metrics import REDIS_UP
from promptline.redis_store import STORE_ERRORS, RedisStore, store_call

log = logging.getLogger("promptline.prompt")

PROBE_INTERVAL = 1.0
"""Seconds between PINGs: how soon an outage, and the end of one, shows."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RedisWatch:
    """The probe task; `stop()` cancels and awaits it."""

    def __init__(self, store: RedisStore, status: health.aio.HealthServicer,
                 timeout: float) -> None:
        self._store = store
        self._status = status
        self._timeout = timeout
        self.up: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RedisWatch:
        await self._probe()  # the status is known before the server takes requests
        self._task = asyncio.create_task(self._run(), name="redis-watch")
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            await self._probe()

    async def _probe(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                # store_call: the cluster client's "cannot be connected" is no RedisError,
                # and would end this probe (and a start) instead of reading as "down"
                await store_call(self._store.client.ping())
            up = True
        except STORE_ERRORS:
            up = False
        if up == self.up:
            return
        if self.up is not None or not up:
            log.warning("Redis is %s", "reachable again" if up else "unreachable")
        self.up = up
        REDIS_UP.set(1 if up else 0)
        await self._status.set(REDIS_HEALTH_NAME, _SERVING if up else _NOT_SERVING)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

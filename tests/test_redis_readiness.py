"""Readiness that tells the truth about Redis, without turning a Redis blip into an outage: the
prompt service keeps `promptline.redis` health and `promptline_redis_up`, the edge's /readyz
body reports it, and both services stay SERVING / ready meanwhile."""

from __future__ import annotations

import aiohttp
from prometheus_client import REGISTRY

from promptline.devtools.embedded_redis import EmbeddedRedis
from tests.chain import running_chain
from tests.conftest import make_config
from tests.eventually import eventually


def redis_up() -> float | None:
    return REGISTRY.get_sample_value("promptline_redis_up")


async def test_redis_going_away_and_coming_back_shows_in_readyz_and_metrics() -> None:
    server = EmbeddedRedis().start()  # our own: this test stops it
    try:
        config = make_config(redis_url=server.url)
        async with running_chain(config) as chain, aiohttp.ClientSession() as http:

            async def readyz() -> tuple[int, dict[str, str]]:
                async with http.get(f"{chain.base_url}/readyz") as resp:
                    return resp.status, await resp.json()

            assert await readyz() == (200, {"status": "ready", "redis": "ok"})
            assert redis_up() == 1
            server.stop()
            await eventually(lambda: redis_up() == 0, within=5, what="the probe noticing")
            assert await readyz() == (200, {"status": "ready", "redis": "unreachable"})
            server = EmbeddedRedis(port=server.port).start()
            await eventually(lambda: redis_up() == 1, within=5, what="Redis back")
            assert await readyz() == (200, {"status": "ready", "redis": "ok"})
    finally:
        server.stop()

"""`GET /metrics`: the edge's route, and the small HTTP server each gRPC service exposes it on."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from promptline.config import split_address


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics` in the Prometheus text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsServer:
    """A tiny aiohttp server with only `/metrics`, for the gRPC services."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def start(self, address: str) -> MetricsServer:
        host, port = split_address(address)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

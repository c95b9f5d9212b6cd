"""`python -m services.edge_http`: run the HTTP edge until SIGINT/SIGTERM, then drain and exit."""

from __future__ import annotations

from dataclasses import dataclass

from promptline.config import Config, split_address
from promptline.config_reload import LiveConfig
from promptline.service_main import run_service
from services.edge_http.app import EdgeServer, start_edge


@dataclass
class _Edge:
    """The edge as `run_service` stops it. aiohttp fixes the drain time when the runner is built
    (`config.shutdown_grace`, the same value `run_service` passes), so `grace` is already set."""

    server: EdgeServer

    async def stop(self, grace: float) -> None:
        await self.server.stop()


async def _start(config: Config, live: LiveConfig) -> _Edge:
    host, port = split_address(config.listen.edge_http)
    return _Edge(await start_edge(config, host, port, live=live))


if __name__ == "__main__":
    run_service("edge_http", _start)

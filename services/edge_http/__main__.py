"""`python -m services.edge_http`: run the HTTP edge until SIGINT/SIGTERM, then drain and exit."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from promptline.config import Config, ConfigError, load_config
from promptline.logs import setup_logging
from services.edge_http.app import start_edge

log = logging.getLogger("promptline.edge_http")


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) -> (host, port), as validated by the config loader."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(config: Config) -> None:
    """Serve until a stop signal, then shut down in phases (see `EdgeServer.stop`)."""
    host, port = split_address(config.listen.edge_http)
    server = await start_edge(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: draining streams", extra={"grace_s": config.shutdown_grace})
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    log.info("stopped")


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"edge_http: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging("edge_http", config.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # typically the port is already in use
        log.error("cannot start the edge", extra={"address": config.listen.edge_http,
                                                  "error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

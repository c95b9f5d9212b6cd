"""The process entry point shared by the three services: config, logging, signals, shutdown.

`run_service("prompt", start)` loads the config once (a ConfigError prints the key and the reason
and exits 2), sets up JSON logging, starts the service, waits for SIGINT/SIGTERM, then calls its
`stop(grace)`: stop accepting, drain in-flight streams up to `shutdown_grace`, close clients.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from promptline.config import Config, ConfigError, load_config
from promptline.logs import setup_logging


class Stoppable(Protocol):
    """What a started service hands back."""

    async def stop(self, grace: float) -> None: ...


def run_service(name: str, start: Callable[[Config], Awaitable[Stoppable]]) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"promptline {name}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(name, config.log_level)
    try:
        asyncio.run(_main(name, config, start))
    except KeyboardInterrupt:
        pass


async def _main(name: str, config: Config, start: Callable[[Config], Awaitable[Stoppable]]) -> None:
    log = logging.getLogger(f"promptline.{name}")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        service = await start(config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    log.info("started", extra={"config": config.source})
    await stop_requested.wait()
    log.info("stopping: draining streams", extra={"grace_s": config.shutdown_grace})
    await service.stop(config.shutdown_grace)
    log.info("stopped")

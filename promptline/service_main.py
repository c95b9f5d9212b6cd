"""The process entry point shared by the three services: config, logging, signals, shutdown.

`run_service("prompt", start)` loads the config once (a ConfigError prints the key and the reason
and exits 2), sets up JSON logging and tracing, starts the service with a live config (reloaded on
SIGHUP and when the file changes), waits for SIGINT/SIGTERM, then calls its `stop(grace)`: stop
accepting, drain in-flight streams up to `shutdown_grace`, close clients.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from promptline.config import Config, ConfigError, load_config
from promptline.config_reload import LiveConfig
from promptline.logs import setup_logging
from promptline.metrics import track_event_loop, track_gc_pauses
from promptline.tracing import setup_tracing


class Stoppable(Protocol):
    """What a started service hands back."""

    async def stop(self, grace: float) -> None: ...


Start = Callable[[Config, LiveConfig], Awaitable[Stoppable]]


def load_or_exit(name: str) -> Config:
    """The config from $PROMPTLINE_CONFIG (or the default); on error: the reason, exit 2."""
    try:
        return load_config()
    except ConfigError as exc:
        print(f"promptline {name}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_service(name: str, start: Start) -> None:
    """Run one service in the foreground until SIGINT/SIGTERM."""
    config = load_or_exit(name)
    setup_logging(name, config.log_level)
    setup_tracing(name, os.environ)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_main(name, config, start))
    except KeyboardInterrupt:
        pass


def _freeze_start_up_objects() -> None:
    """Take what start-up built (modules, protobuf descriptors, config) out of the collector.

    A full collection walks every tracked object: ~110k in the engine after its imports, a
    50-70 ms stall of every open stream, measured at C=200. Frozen, they are never walked again;
    the price is that a frozen object that later ends up in a garbage cycle (the first config,
    replaced by a reload) is never freed: once, and bounded by what start-up built.
    """
    gc.collect()
    gc.freeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: less CPU per streamed frame (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _main(name: str, config: Config, start: Start) -> None:
    log = logging.getLogger(f"promptline.{name}")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    live = LiveConfig(config, name)
    try:
        service = await start(config, live)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    live.start()
    _freeze_start_up_objects()
    track_gc_pauses(name)
    track_event_loop(loop)
    log.info("started", extra={"config": config.source})
    await stop_requested.wait()
    log.info("stopping: draining streams", extra={"grace_s": config.shutdown_grace})
    await live.stop()
    await service.stop(config.shutdown_grace)
    log.info("stopped")

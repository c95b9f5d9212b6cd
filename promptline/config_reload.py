"""Live config: the running services pick up a changed config file without a restart.

`LiveConfig.current` is the config new streams use; a stream keeps the object it started with,
so in-flight streams keep their settings. `reload()` runs on SIGHUP and when the watched file
changes (a Kubernetes ConfigMap update swaps a symlink, so the file's identity is compared, not
only its mtime). An invalid file is rejected with a log line and a metric, keeping the old config.
Addresses and the Redis keys need a restart; a change to them is applied to nothing and logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from promptline.config import Config, ConfigError, load_config
from promptline.metrics import CONFIG_RELOADS

log = logging.getLogger("promptline.config")
T = TypeVar("T")
_RESTART_ONLY = ("listen", "targets", "redis_url", "redis_mode", "redis_sentinel", "log_level",
                 "shutdown_grace")
"""Read once at start (servers, clients, logging, the drain's length)."""


class LiveConfig:
    """Holds the current config and objects derived from it (rebuilt once per new config)."""

    def __init__(self, config: Config, service: str, env: Mapping[str, str] | None = None,
                 path: str | None = None) -> None:
        self.current = config
        self._service = service
        self._env = dict(os.environ if env is None else env)
        self._path = path or (config.source if config.source != "<memory>" else None)
        self._derived: dict[str, tuple[Config, Any]] = {}
        self._identity = self._file_identity()
        self._watcher: asyncio.Task[None] | None = None

    def derived(self, name: str, build: Callable[[Config], T]) -> T:
        """`build(current)`, cached until the config changes (e.g. the Authenticator)."""
        config = self.current
        cached = self._derived.get(name)
        if cached is None or cached[0] is not config:
            cached = (config, build(config))
            self._derived[name] = cached
        return cached[1]

    def reload(self) -> bool:
        """Load the file again; apply it when valid. Returns whether a new config was applied."""
        if self._path is None:
            return False
        try:
            new = load_config(self._path, env=self._env)
        except ConfigError as exc:
            CONFIG_RELOADS.labels(self._service, "rejected").inc()
            log.error("config reload rejected; keeping the running config",
                      extra={"reason": str(exc)})
            return False
        except Exception as exc:  # a loader bug must not end the watch (nor a SIGHUP handler)
            CONFIG_RELOADS.labels(self._service, "rejected").inc()
            log.error("config reload failed; keeping the running config",
                      extra={"reason": type(exc).__name__})
            return False
        if new == self.current:
            CONFIG_RELOADS.labels(self._service, "unchanged").inc()
            return False
        for key in _RESTART_ONLY:
            if getattr(new, key) != getattr(self.current, key):
                log.warning("config key changed but needs a restart to apply", extra={"key": key})
        self.current = new
        CONFIG_RELOADS.labels(self._service, "applied").inc()
        log.info("config reloaded", extra={"config": self._path})
        return True

    def start(self, interval: float = 2.0) -> None:
        """Reload on SIGHUP and whenever the file changes (checked every `interval` seconds)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (NotImplementedError, RuntimeError):  # not the main thread: file watch only
            pass
        if self._path is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(interval), name="config-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            identity = self._file_identity()
            if identity != self._identity:
                self._identity = identity
                self.reload()

    def _file_identity(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = Path(self._path).stat()  # follows the ConfigMap's ..data symlink
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

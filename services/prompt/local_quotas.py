"""The quota scripts of `quotas.py`, run on this process's memory instead of Redis.

Used by `quota_policy.on_redis_error: local` while Redis is unreachable: each replica then
enforces its share (limit / `quota_policy.replicas`) with the same sliding-window counters, so
the limits hold approximately across the outage instead of failing closed (an outage) or open
(no limits). `admit` and `settle` return what the Lua scripts return, so the caller reads both
alike. Counters here start empty and are dropped when Redis is back: the shared budget then
counts again.
"""

from __future__ import annotations

import math


class LocalWindows:
    """Per-key `[window, current, previous]`, as the Redis hashes hold them."""

    def __init__(self) -> None:
        self._state: dict[str, list[int]] = {}

    def clear(self) -> None:
        self._state.clear()

    def _get(self, key: str, win: int) -> tuple[int, int, int, bool]:
        held = self._state.get(key)
        if held is None:
            return win, 0, 0, False
        w, c, p = held
        if w >= win:
            return w, c, p, True
        if w == win - 1:
            return win, 0, c, True
        return win, 0, 0, True

    def admit(self, keys: list[str], limits: list[int], costs: list[int], now: int,
              window_ms: int) -> list[int]:
        """`_ADMIT_LUA`: charge every key, or none and say which one and when to retry."""
        win, elapsed = now // window_ms, now % window_ms
        seen = []
        worst_i, worst_ms = 0, -1
        for i, (key, limit, cost) in enumerate(zip(keys, limits, costs, strict=True), start=1):
            w, c, p, _ = self._get(key, win)
            scaled = p * (window_ms - elapsed) + c * window_ms
            seen.append((w, c, p, scaled))
            if cost > limit:
                return [0, i, -1]
            if scaled + cost * window_ms > limit * window_ms:
                if c + cost <= limit:
                    wait = math.ceil(window_ms * (p - (limit - c - cost)) / p) - elapsed
                else:
                    wait = (window_ms - elapsed) + math.ceil(window_ms * (c - (limit - cost)) / c)
                wait = max(wait, 1)
                if wait > worst_ms:
                    worst_i, worst_ms = i, wait
        if worst_i:
            return [0, worst_i, worst_ms]
        out = [1, win, now]
        for key, cost, (w, c, p, scaled) in zip(keys, costs, seen, strict=True):
            self._state[key] = [w, c + cost, p]
            out += [math.ceil(scaled / window_ms) + cost, c + cost, p]
        return out

    def settle(self, keys: tuple[str, ...], now: int, window_ms: int, charged: int,
               delta: int) -> None:
        """`_SETTLE_LUA`: move the bucket `charged` by `delta` (clamped at 0)."""
        win = now // window_ms
        for key in keys:
            w, c, p, exists = self._get(key, win)
            if not exists and delta <= 0:
                continue
            if charged == w:
                c = max(0, c + delta)
            elif charged == w - 1:
                p = max(0, p + delta)
            elif delta > 0:
                c += delta
            self._state[key] = [w, c, p]

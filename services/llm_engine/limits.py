"""A deployment's provider limits, checked before each call: `max_concurrency` (streams at once
on this replica), `rpm` and `tpm` (over every replica, in one-minute windows).

`UsageWindow` holds the requests and tokens of the current and the previous minute: every
replica's as of the last sync (board.py pushes this replica's counts and reads the totals, at
most every second), plus this replica's own since. The last 60 s are estimated as the quotas do:
the current minute plus the part of the previous one still inside. Tokens are counted from usage
after each stream, so a burst can pass `tpm` by what is in flight; requests are counted as they
start. Between two syncs, the other replicas' requests are not seen: the cost of checking without
a Redis round trip per request (bounded by one second of their traffic).
"""

from __future__ import annotations

from promptline.config import DeploymentConfig

MINUTE = 60.0


class UsageWindow:
    """Requests and tokens sent to one deployment, by minute."""

    __slots__ = ("_current", "_minute", "_pending", "_previous")

    def __init__(self) -> None:
        self._minute = 0
        self._current = [0, 0]  # requests, tokens
        self._previous = [0, 0]
        self._pending: dict[int, list[int]] = {}
        """This replica's counts not yet pushed to Redis, by minute."""

    def add(self, now: float, requests: int = 0, tokens: int = 0) -> None:
        minute = self._roll(now)
        self._current[0] += requests
        self._current[1] += tokens
        pending = self._pending.setdefault(minute, [0, 0])
        pending[0] += requests
        pending[1] += tokens

    def estimate(self, now: float) -> tuple[float, float]:
        """Requests and tokens over the last 60 s."""
        self._roll(now)
        inside = 1 - (now % MINUTE) / MINUTE
        return (self._previous[0] * inside + self._current[0],
                self._previous[1] * inside + self._current[1])

    def take_pending(self) -> dict[int, list[int]]:
        """This replica's counts since the last push (the caller pushes them)."""
        pending, self._pending = self._pending, {}
        return pending

    def give_back(self, pending: dict[int, list[int]]) -> None:
        """A push that failed: its counts wait for the next one."""
        for minute, (requests, tokens) in pending.items():
            mine = self._pending.setdefault(minute, [0, 0])
            mine[0] += requests
            mine[1] += tokens

    def synced(self, minute: int, current: tuple[int, int], previous: tuple[int, int]) -> None:
        """Every replica's counts of `minute` and the one before, as Redis had them once this
        replica's pushed ones were in; what it counted since is added back."""
        self._roll(minute * MINUTE)
        if minute == self._minute:
            self._current = self._with_pending(minute, current)
            self._previous = self._with_pending(minute - 1, previous)
        elif minute == self._minute - 1:  # the minute turned during the sync
            self._previous = self._with_pending(minute, current)

    def _with_pending(self, minute: int, counts: tuple[int, int]) -> list[int]:
        pending = self._pending.get(minute, (0, 0))
        return [counts[0] + pending[0], counts[1] + pending[1]]

    def _roll(self, now: float) -> int:
        minute = int(now // MINUTE)
        if minute > self._minute:
            self._previous = self._current if minute == self._minute + 1 else [0, 0]
            self._current = [0, 0]
            self._minute = minute
            for old in [m for m in self._pending if m < minute - 1]:
                del self._pending[old]  # too old to count anywhere
        return self._minute


def wait_for_room(deployment: DeploymentConfig, in_flight: int, usage: UsageWindow,
                  now: float) -> float | None:
    """None when `deployment` may take one more call now; else roughly how many seconds until
    it may (0: unknown, a concurrency limit frees up when a stream ends)."""
    if deployment.max_concurrency and in_flight >= deployment.max_concurrency:
        return 0.0
    if deployment.rpm or deployment.tpm:
        requests, tokens = usage.estimate(now)
        if ((deployment.rpm and requests + 1 > deployment.rpm)
                or (deployment.tpm and tokens >= deployment.tpm)):
            return max(1.0, MINUTE - now % MINUTE)  # the window frees room gradually
    return None

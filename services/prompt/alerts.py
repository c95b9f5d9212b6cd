"""Credit alerts: a budget threshold crossed, told once per period over every replica.

Which replica tells is settled in Redis (`budgets.Ledger` claims each threshold with SET NX);
that replica's `AlertNotifier` then writes a WARNING log line, counts
`promptline_budget_alerts_total{tenant,budget,threshold}` and, with `alerts.webhook_url`, POSTs
the event as JSON. The POST is signed: `X-Promptline-Signature: sha256=<hex>`, the HMAC-SHA256
of the exact body bytes with the secret from the environment variable
`alerts.webhook_secret_env` (a receiver recomputes it and compares in constant time; the body's
`id` and `created_at` let it drop replays).

Delivery never touches a stream: `notify` only puts the event in a bounded queue; a few worker
tasks send it, each attempt bounded by `webhook_timeout`, retried with exponential backoff and
jitter up to `webhook_attempts` (a 4xx other than 408/429 is final: the receiver refused it).
Every failed attempt, and every alert given up or dropped because the queue was full, counts in
`promptline_alert_webhook_failures_total{reason}`. Neither the secret nor the URL (it may hold a
token) is ever logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp

from promptline.config import AlertsConfig
from promptline.metrics import ALERT_WEBHOOK_FAILURES, BUDGET_ALERTS

from .pricing import usd_text

log = logging.getLogger("promptline.alerts")

SIGNATURE_HEADER = "X-Promptline-Signature"
EVENT_TYPE = "budget.threshold_crossed"
QUEUE_SIZE = 1000
"""Alerts waiting for the webhook. One per threshold, budget and period makes this plenty; the
bound keeps a receiver that is down during a storm of per-user alerts from growing memory."""
WORKERS = 2
"""Deliveries at once: one hanging receiver does not hold up every other alert."""
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True, slots=True)
class Alert:
    """One threshold of one budget crossed in one period."""

    tenant: str
    budget: str
    """"tenant", "key" or "user"."""
    who: str
    """The API key's id or the end user's id; "" for the tenant's budget."""
    period: str
    period_start: datetime
    period_end: datetime
    threshold: float
    """The share of the budget crossed (0.8)."""
    budget_usd: Decimal
    spent_usd: Decimal
    """What the period's settled spend was when the threshold was crossed."""

    def event(self, event_id: str, created_at: datetime) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            "type": EVENT_TYPE,
            "id": event_id,
            "created_at": _iso(created_at),
            "tenant": self.tenant,
            "budget": self.budget,
            "subject": self.who,
            "period": self.period,
            "period_start": _iso(self.period_start),
            "period_end": _iso(self.period_end),
            "threshold": self.threshold,
            "budget_usd": usd_text(self.budget_usd),
            "spent_usd": usd_text(self.spent_usd),
        }


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AlertNotifier:
    """Tells each alert: log line, metric, webhook (queued). `settings` gives the current
    `alerts` config, so a reload applies to the next delivery."""

    def __init__(self, settings: Callable[[], AlertsConfig]) -> None:
        self._settings = settings
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def notify(self, alerts: Iterable[Alert]) -> None:
        """Tell `alerts`; never waits and never raises."""
        for alert in alerts:
            threshold = f"{alert.threshold:g}"
            BUDGET_ALERTS.labels(alert.tenant, alert.budget, threshold).inc()
            log.warning("budget alert: %s of the %s budget reached", threshold, alert.budget,
                        extra={"tenant": alert.tenant, "budget": alert.budget,
                               "subject": alert.who, "period": alert.period,
                               "period_start": _iso(alert.period_start),
                               "threshold": alert.threshold,
                               "budget_usd": usd_text(alert.budget_usd),
                               "spent_usd": usd_text(alert.spent_usd)})
            if not self._settings().webhook_url:
                continue
            body = json.dumps(alert.event(uuid.uuid4().hex, datetime.now(UTC)),
                              separators=(",", ":")).encode()
            try:
                self._queue.put_nowait(body)
            except asyncio.QueueFull:
                ALERT_WEBHOOK_FAILURES.labels("queue_full").inc()
                log.error("budget alert webhook queue full: alert dropped",
                          extra={"tenant": alert.tenant})
                continue
            self._ensure_workers()

    def _ensure_workers(self) -> None:
        """Workers run only while alerts wait: none idle for the life of the service."""
        if self._session is None:
            return  # not started, or stopped
        self._workers = [w for w in self._workers if not w.done()]
        while len(self._workers) < WORKERS:
            self._workers.append(asyncio.create_task(
                self._work(), name=f"alert-webhook-{len(self._workers)}"))

    async def start(self) -> AlertNotifier:
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        """Stop delivering; alerts still queued are dropped (and said so)."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        if not self._queue.empty():
            log.warning("stopping with %d budget alert(s) not delivered to the webhook",
                        self._queue.qsize())

    async def _work(self) -> None:
        while not self._queue.empty():
            await self._deliver(self._queue.get_nowait())

    async def _deliver(self, body: bytes) -> None:
        """One alert, with retries; the outcome is counted and logged, nothing raises."""
        settings = self._settings()
        assert self._session is not None  # workers run between start and stop
        for attempt in range(settings.webhook_attempts):
            if attempt:
                wait = min(MAX_BACKOFF_S, settings.webhook_backoff * 2 ** (attempt - 1))
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))  # jitter: no herd
                settings = self._settings()
            if not settings.webhook_url:
                return  # switched off by a reload
            if not settings.webhook_secret:
                ALERT_WEBHOOK_FAILURES.labels("gave_up").inc()
                log.error("budget alert webhook not sent: alerts.webhook_secret_env names no "
                          "secret in this service's environment")
                return
            reason = await self._attempt(settings, body)
            if reason is None:
                return
            ALERT_WEBHOOK_FAILURES.labels(reason).inc()
            if reason == "refused":
                break
        ALERT_WEBHOOK_FAILURES.labels("gave_up").inc()
        log.error("budget alert webhook failed; alert given up",
                  extra={"attempts": settings.webhook_attempts})

    async def _attempt(self, settings: AlertsConfig, body: bytes) -> str | None:
        """One POST; None when delivered, else why not (a metric label)."""
        assert self._session is not None and settings.webhook_url and settings.webhook_secret
        headers = {"Content-Type": "application/json", "User-Agent": "promptline-alerts",
                   SIGNATURE_HEADER: sign(settings.webhook_secret, body)}
        try:
            async with asyncio.timeout(settings.webhook_timeout):
                async with self._session.post(settings.webhook_url, data=body,
                                              headers=headers, allow_redirects=False) as reply:
                    status = reply.status
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError):
            return "connection"
        if status < 300:
            return None
        return "refused" if 400 <= status < 500 and status not in (408, 429) else "status"

"""One chat at the prompt service: its plan, its quota reservation, what reached the caller, and
its one end.

`finish(outcome)` runs exactly once, whatever ended the stream: it settles the reservation to
what the stream really used (`charge`), charges its cost (`cost`) to its budgets and usage
(`budgets.Ledger`, raising the credit alerts it claimed), and appends the exchange to the
conversation (the whole reply after `done`; a partial one when text reached the caller and the
stream then failed or was cancelled; nothing when no text did). Never raises: the caller has
its answer already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal

from promptline.config import Config, ModelConfig, TenantConfig
from promptline.errors import PromptlineError
from promptline.metrics import COST, TOKENS
from promptline.streams import CANCELLED, DONE
from promptline.v1 import common_pb2

from .alerts import AlertNotifier
from .budgets import Ledger
from .chat_plan import ChatPlan
from .history import ConversationStore, exchange
from .pricing import cost_of, to_pico, usd_text
from .quotas import Reservation
from .usage import UsageRecord

log = logging.getLogger("promptline.prompt")


def charge(usage: common_pb2.Usage | None, prompt_tokens: int,
           completion_tokens: int) -> tuple[int, int]:
    """The reconcile decision: (prompt, completion) tokens a stream is charged.

    The provider's usage when it reported one (a finished stream); otherwise what was relayed,
    plus the prompt once the model produced anything: an error or a cancel after tokens flowed
    pays for them, one before the first token (a timeout, a provider failure) pays nothing.
    """
    if usage is not None:
        return usage.prompt_tokens, usage.completion_tokens
    return (prompt_tokens if completion_tokens else 0), completion_tokens


@dataclass(slots=True)
class ChatSession:
    """What the prompt service knows of one StreamChat, filled in stage by stage."""

    request_id: str
    conversations: ConversationStore | None
    tenant: TenantConfig | None = None
    plan: ChatPlan | None = None
    reservation: Reservation | None = None
    delivered: bool = False
    """Text reached the caller."""
    completion_tokens: int = 0
    """Tokens the engine relayed (its own counts), for a stream that ends without usage."""
    usage: common_pb2.Usage | None = None
    """The provider's usage, from the `done` frame."""
    reply: list[str] | None = None
    """Text written to the caller; kept only with a conversation (a long reply costs memory)."""
    config: Config | None = None
    """The config the stream started with (the prices of a fallback model)."""
    ledger: Ledger | None = None
    """Where budgets and usage are settled; None: they are not (a session on its own)."""
    alerts: AlertNotifier | None = None
    key_id: str = ""
    """The caller's API key's id (`auth.key_id`), for key budgets and usage."""
    user: str = ""
    """The end user the request named, "" for none."""
    served: ModelConfig | None = None
    """The model the engine says serves the stream (a fallback's), once `start` came."""
    cached: bool = False
    """A response-cache hit: `usage` is the stored reply's, priced; no tokens were used."""
    first_text_at: float = 0.0
    """`time.perf_counter()` when text first reached the caller (0: none did): the request
    record's first-token time (`feedback.RequestRecord`)."""
    _settling: asyncio.Future[tuple[None, None]] | None = field(default=None, init=False)

    @property
    def finished(self) -> bool:
        """`finish` has begun (it may still be running)."""
        return self._settling is not None

    @property
    def keeps_history(self) -> bool:
        return (self.plan is not None and bool(self.plan.conversation_id)
                and self.conversations is not None)

    def delivered_text(self, text: str) -> None:
        if not self.delivered:
            self.first_text_at = time.perf_counter()
        self.delivered = True
        if self.reply is not None:
            self.reply.append(text)

    def serving(self, model: str) -> None:
        """The engine named the model that serves the stream (`start`, `done`): its price."""
        found = self.config.model(model) if self.config is not None and model else None
        self.served = found or self.served

    def account(self, usage: common_pb2.Usage) -> None:
        """The provider's usage at `done`, priced (`cost_usd`) unless a hop already did."""
        self.usage = usage
        if not usage.cost_usd:
            usage.cost_usd = usd_text(self.cost())

    def cost(self) -> Decimal:
        """What the stream costs: the `done` frame's `cost_usd` when it has one; else what
        `charge` charges, at the price of the model that served it."""
        model = self.served or (self.plan.model if self.plan is not None else None)
        if model is None:
            return Decimal(0)
        if self.usage is not None:
            return Decimal(self.usage.cost_usd) if self.usage.cost_usd \
                else cost_of(model.price, self.usage)
        assert self.plan is not None  # a model implies a plan
        used_in, used_out = charge(None, self.plan.prompt_tokens, self.completion_tokens)
        return cost_of(model.price, common_pb2.Usage(prompt_tokens=used_in,
                                                     completion_tokens=used_out))

    def finishing(self, outcome: str) -> asyncio.Future[tuple[None, None]]:
        """What settles the quota, budgets and usage and writes the history, once (the Redis
        calls at the same time); started here unless it already was."""
        if self._settling is None:
            self._settling = asyncio.gather(self._settle(outcome),
                                            self._remember(partial=outcome != DONE))
        return self._settling

    async def finish(self, outcome: str) -> None:
        """`finishing`, awaited. Shielded: the edge cancels its call as soon as it has `done`,
        which must not cut the settlement short (it goes on; `PromptServer.stop` waits)."""
        await asyncio.shield(self.finishing(outcome))

    async def _settle(self, outcome: str) -> None:
        if self.reservation is None or self.plan is None or self.tenant is None:
            return  # rejected before admission: nothing was reserved
        used_in, used_out = (0, 0) if self.cached else charge(
            self.usage, self.plan.prompt_tokens, self.completion_tokens)
        cost = self.cost()
        model = (self.served or self.plan.model).name
        if cost:
            COST.labels(self.tenant.name, model).inc(float(cost))
        settled = [self._spend(model, used_in, used_out, cost, error=outcome not in
                               (DONE, CANCELLED))]
        if not used_in and not used_out:
            settled.append(self.reservation.refund())
        else:
            TOKENS.labels(self.tenant.name, self.plan.model.name, "in").inc(used_in)
            TOKENS.labels(self.tenant.name, self.plan.model.name, "out").inc(used_out)
            settled.append(self.reservation.settle(used_in + used_out))
        await asyncio.gather(*settled)

    async def _spend(self, model: str, used_in: int, used_out: int, cost: Decimal, *,
                     error: bool) -> None:
        """Budgets and usage: one Redis call on the tenant's slot; then the alerts it claimed."""
        if self.ledger is None or self.reservation is None or self.tenant is None:
            return
        pico = to_pico(cost)
        alerts = await self.ledger.settle(
            self.tenant.name, self.reservation.hold, pico,
            UsageRecord(model, self.key_id, self.user, used_in, used_out, pico, error),
            self.request_id)
        if alerts and self.alerts is not None:
            self.alerts.notify(alerts)

    async def _remember(self, *, partial: bool) -> None:
        if not self.keeps_history or (partial and not self.delivered):
            return
        assert self.plan is not None and self.tenant is not None and self.conversations
        try:
            await self.conversations.append(
                self.tenant.name, self.plan.conversation_id,
                exchange(self.plan.new_turns, "".join(self.reply or ()), partial=partial,
                         request_id=self.request_id))
        except PromptlineError as err:
            log.error("conversation history not stored: %s", err.message,
                      extra={"request_id": self.request_id})

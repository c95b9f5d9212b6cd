"""One chat at the prompt service: its plan, its quota reservation, what reached the caller, and
its one end.

`finish(outcome)` runs exactly once, whatever ended the stream: it settles the reservation to
what the stream really used (`charge`) and appends the exchange to the conversation (the whole
reply after `done`; a partial one when text reached the caller and the stream then failed or was
cancelled; nothing when no text did). Never raises: the caller has its answer already.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from promptline.config import TenantConfig
from promptline.errors import PromptlineError
from promptline.metrics import TOKENS
from promptline.streams import DONE
from promptline.v1 import common_pb2

from .chat_plan import ChatPlan
from .history import ConversationStore, exchange
from .quotas import Reservation

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
    finished: bool = field(default=False, init=False)

    @property
    def keeps_history(self) -> bool:
        return (self.plan is not None and bool(self.plan.conversation_id)
                and self.conversations is not None)

    def delivered_text(self, text: str) -> None:
        self.delivered = True
        if self.reply is not None:
            self.reply.append(text)

    async def finish(self, outcome: str) -> None:
        """Settle the quota and write the history, once; both Redis calls at the same time."""
        if self.finished:
            return
        self.finished = True
        await asyncio.gather(self._settle(), self._remember(partial=outcome != DONE))

    async def _settle(self) -> None:
        if self.reservation is None or self.plan is None or self.tenant is None:
            return  # rejected before admission: nothing was reserved
        used_in, used_out = charge(self.usage, self.plan.prompt_tokens, self.completion_tokens)
        if not used_in and not used_out:
            await self.reservation.refund()
            return
        TOKENS.labels(self.tenant.name, self.plan.model.name, "in").inc(used_in)
        TOKENS.labels(self.tenant.name, self.plan.model.name, "out").inc(used_out)
        await self.reservation.settle(used_in + used_out)

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

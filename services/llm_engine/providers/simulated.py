"""The built-in simulated model: real tokenization, real timing, and fault knobs for drills.

Streams `reply` (or a built-in paragraph) one tiktoken token at a time at `tokens_per_second`
after `ttft_ms`. `fail_after_tokens: N` makes it fail with UPSTREAM_ERROR after N tokens (0: the
request is refused before any token); `stall_after_tokens: N` makes it go silent after N tokens
until it is cancelled, which is what idle and first-token timeout drills need. Asked for JSON
(`response_format`), it streams JSON that fits, the same way (`json_reply`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from functools import lru_cache

from promptline.config import SimulatedSettings
from promptline.errors import ErrorCode, PromptlineError
from promptline.tokens import count_messages_off_loop, get_tokenizer

from .base import Chunk, GenerationRequest, Usage
from .json_reply import json_reply

BUILTIN_REPLY = (
    "Promptline streams this reply from its simulated model so you can watch tokens arrive one "
    "by one. Every hop in the chain, from the edge gateway through the prompt service to the "
    "engine, relays each piece as soon as it exists, and any failure along the way arrives as an "
    "explicit, typed error frame instead of a silently truncated answer. Press Stop at any moment "
    "and the whole chain is cancelled, down to the model."
)


@lru_cache(maxsize=64)
def _pieces(text: str) -> tuple[str, ...]:
    return tuple(get_tokenizer().pieces(text))


class SimulatedProvider:
    """A provider that needs no network; behaviour comes from `SimulatedSettings`."""

    kind = "simulated"

    def __init__(self, settings: SimulatedSettings) -> None:
        self.settings = settings

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        s = self.settings
        fmt = request.response_format
        pieces = _pieces(json_reply(fmt, s.reply, BUILTIN_REPLY) if fmt and fmt.is_json
                         else s.reply if s.reply is not None else BUILTIN_REPLY)
        if s.ttft_ms:
            await asyncio.sleep(s.ttft_ms / 1000)
        loop = asyncio.get_running_loop()
        # Pace against absolute times so per-token sleep overhead does not slow the stream down.
        interval = 1.0 / s.tokens_per_second if s.tokens_per_second else 0.0
        started = loop.time()
        sent = 0
        finish = "stop"
        # The pace never holds text past the reply's last token: the end goes out on time.
        ends_at = started + (min(len(pieces), request.max_tokens) - 1) * interval
        for piece in pieces:
            if sent >= request.max_tokens:
                finish = "length"
                break
            if s.fail_after_tokens is not None and sent >= s.fail_after_tokens:
                raise PromptlineError(ErrorCode.UPSTREAM_ERROR,
                                      "the simulated provider failed (fail_after_tokens drill)",
                                      origin="llm_engine")
            if s.stall_after_tokens is not None and sent >= s.stall_after_tokens:
                await asyncio.Event().wait()  # silent until cancelled: the idle-timeout drill
            if interval and sent:
                delay = started + sent * interval - loop.time()
                if delay > 0:
                    if request.pace is not None:  # tokens due by then go out in one burst
                        now = loop.time()
                        delay = max(delay, min(request.pace.wait(now), ends_at - now))
                    await asyncio.sleep(delay)
                    if request.pace is not None:
                        request.pace.read(loop.time())
            yield Chunk(text=piece, tokens=1)
            sent += 1
        # Counted at the end, as a real model reports usage: a long prompt costs no time to the
        # first token here (tiktoken takes ~2 ms for 64 KB).
        prompt_tokens = await count_messages_off_loop(request.messages)
        yield Chunk(finish_reason=finish, usage=Usage(prompt_tokens, sent))

    async def close(self) -> None:
        return None

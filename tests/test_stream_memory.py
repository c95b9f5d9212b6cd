"""An open stream holds its prompt, and its reply, no more than the chain must.

gRPC keeps each hop's request for the whole call (grpc.aio holds the received bytes), so the
prompt service's and the engine's received copies are the floor. On top of them the chain used
to hold the edge's raw body, the prompt service's plan (protobuf messages and Python strings)
and the engine's Python copy of the messages for the whole stream: 5 copies of a long prompt in
Python objects (tracemalloc does not see protobuf's own memory), 2 of them gRPC's.
And the prompt service kept every delta it sent, for a conversation to store, even when there
was none. Measured with tracemalloc as the difference between the same streams with a long and a
short prompt (or reply), so per-stream overhead that does not grow with them cancels out.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest

from promptline.devtools.sse_client import events
from tests.chain import Chain, running_chain
from tests.conftest import make_config

AUTH = {"Authorization": "Bearer dev-key", "Content-Type": "application/json"}
PROMPT_BYTES = 64 * 1024
REPLY_TOKENS = 400
STREAMS = 8


@pytest.fixture
async def chain(redis_server) -> AsyncIterator[Chain]:
    # Streams stop after N tokens and stay open, silent, until the caller leaves. No blocked
    # terms: the output filter would hold the last words back.
    # One token per word; paced so that most tokens leave the engine in deltas of their own.
    hold = {"ttft_ms": 0, "tokens_per_second": 500, "reply": " word" * REPLY_TOKENS + " end"}
    timeouts = {"first_token": "30s", "idle": "60s", "total": "5m"}
    config = make_config({"moderation": {"blocked_terms": []}}, redis_url=redis_server.url,
                         models=[
        {"name": "one", "provider": "simulated", "context_window": 200_000, "timeouts": timeouts,
         "simulated": {**hold, "stall_after_tokens": 1}},
        {"name": "many", "provider": "simulated", "context_window": 200_000,
         "timeouts": timeouts, "simulated": {**hold, "stall_after_tokens": REPLY_TOKENS}},
    ])
    async with running_chain(config) as running:
        yield running


async def held_per_stream(chain: Chain, model: str, content: str, tokens: int) -> float:
    """Python memory allocated and still held per open stream once `tokens` arrived, in bytes."""
    url = f"{chain.base_url}/v1/chat/stream"
    body = json.dumps({"model": model, "max_tokens": 1000,
                       "messages": [{"role": "user", "content": content}]})
    async with aiohttp.ClientSession() as http:

        async def open_stream() -> aiohttp.ClientResponse:
            resp = await http.post(url, data=body.encode(), headers=AUTH)
            assert resp.status == 200
            words = 0
            async for event in events(resp):
                if event.event == "delta":
                    words += event.data["text"].count(" word")
                    if words >= tokens:
                        return resp
            raise AssertionError(f"the stream ended after {words} of {tokens} tokens")

        (await open_stream()).close()  # first-call caches and pools are not per stream
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            streams = await asyncio.gather(*(open_stream() for _ in range(STREAMS)))
            held = (tracemalloc.get_traced_memory()[0] - before) / STREAMS
        finally:
            tracemalloc.stop()
        for resp in streams:
            resp.close()
    return held


async def test_an_open_stream_holds_its_prompt_only_where_grpc_does(chain):
    long = " ".join(f"word{i % 997}" for i in range(PROMPT_BYTES // 8))[:PROMPT_BYTES]
    copies = (await held_per_stream(chain, "one", long, 1)
              - await held_per_stream(chain, "one", "hi", 1)) / PROMPT_BYTES
    # The floor is 2 (the prompt service's and the engine's received bytes); it was 5.1.
    assert copies < 2.5, f"an open stream holds {copies:.2f} copies of its prompt"


async def test_a_reply_without_a_conversation_is_not_kept(chain):
    await held_per_stream(chain, "many", "hi", REPLY_TOKENS)  # one-time growth (buffers, caches)
    per_token = (await held_per_stream(chain, "many", "hi", REPLY_TOKENS)
                 - await held_per_stream(chain, "one", "hi", 1)) / REPLY_TOKENS
    # 38 bytes per token when every delta was kept (a str plus its list slot, fewer when deltas
    # coalesce); ~2 without.
    assert per_token < 20, f"an open stream holds {per_token:.0f} bytes per token sent"

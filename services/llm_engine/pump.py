"""Reads a provider stream in its own task so the gRPC writer can coalesce what piled up.

When the caller keeps up, every chunk goes out at once on its own (the reader yields to the
writer whenever the writer is idle, so no token waits). When the caller falls behind (gRPC flow
control, a busy process), the chunks that arrived meanwhile leave as one frame: fewer frames,
less work per token on every hop behind this one. Timeouts watch the reader, i.e. the provider's
own timing, so a caller that is merely slow is never mistaken for an idle model; one that stops
reading fills the bounded buffer (MAX_PENDING_CHARS), the reader stops, and the idle and total
timeouts then run as for a silent model. One pause is deliberate: once the first text went out,
reading waits FIRST_TEXT_LEAD, so that token crosses the hops behind this one before the rest of
a burst competes with it for the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from .providers.base import Chunk, ReadPacer
from .timeouts import StreamClock, Watchdog

MAX_HOLD = 0.002
"""Longest time the reader keeps the event loop while chunks are already buffered (seconds)."""
FIRST_TEXT_WAIT = 0.005
"""Longest pause in reading while the first text frame goes out (seconds). The watchdog sees no
token meanwhile, so this stays far below any idle timeout."""
FIRST_TEXT_LEAD = 0.0015
"""Pause in reading after the first text went out (seconds): the head start it gets through the
hops behind this one, which otherwise spend the same CPU on the chunks after it."""
MAX_PENDING_CHARS = 64 * 1024
"""Most text held for a writer that cannot send (characters). Past it the reader stops reading,
so the provider's socket fills and TCP pushes back on the provider: a slow caller costs each
stream a bounded amount here, as gRPC flow control bounds it on the hops behind."""
MAX_PENDING_CHUNKS = 4096
"""The same bound in chunks, for providers that send many chunks without text."""


class ChunkPump:
    """One provider stream, read ahead by a task; `take()` returns what accumulated."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None], clock: StreamClock,
                 pace: ReadPacer | None = None) -> None:
        self._chunks = chunks
        self._pace = pace
        self._pending: list[Chunk] = []
        self._pending_chars = 0
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        """Set by `take()`: the writer emptied the buffer (the reader waits for it when full)."""
        self._ended = False
        self._text_taken = False
        self._text_sent = asyncio.Event()
        """Set once the writer has sent the first text (it came back for more)."""
        self._lead_given = False
        self._yielded_at = 0.0
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._read())
        self._watchdog = Watchdog(clock, self._task)

    async def _read(self) -> None:
        try:
            with self._watchdog:  # a deadline that passes ends the read with its typed error
                while True:
                    try:
                        chunk = await anext(self._chunks)
                    except StopAsyncIteration:
                        break
                    if chunk.text:
                        self._watchdog.on_token()
                    idle_writer = not self._pending
                    self._pending.append(chunk)
                    self._pending_chars += len(chunk.text)
                    self._ready.set()
                    await self._make_way(chunk, idle_writer)
        except Exception as exc:  # handed to the writer, which raises it in its own task
            self._error = exc
        finally:
            self._ended = True
            self._ready.set()
            await self._chunks.aclose()

    async def _make_way(self, chunk: Chunk, idle_writer: bool) -> None:
        """The yield policy: when reading stops so the writer can run.

        Reading buffered chunks never suspends, so without this the reader would keep the loop
        until the socket drained. It waits for the writer when the buffer is full (backpressure);
        never within a paced burst (chunk shaping: the burst is one frame, and the writer runs
        when the provider waits for its next read); once, after the first text, for
        FIRST_TEXT_LEAD (that token's head start through the hops behind); and otherwise hands
        over when the writer waits, after every chunk until the first text went out, then at
        least every MAX_HOLD.
        """
        loop = asyncio.get_running_loop()
        if self._pending_chars >= MAX_PENDING_CHARS or len(self._pending) >= MAX_PENDING_CHUNKS:
            self._drained.clear()
            await self._drained.wait()
        elif self._pace is not None and self._pace.active:
            return  # a paced burst is read whole: the writer runs when the provider waits
        elif chunk.text and not self._lead_given and not self._text_sent.is_set():
            self._lead_given = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_TEXT_WAIT):
                    await self._text_sent.wait()
            await asyncio.sleep(FIRST_TEXT_LEAD)
        elif (idle_writer or not self._text_sent.is_set()
              or loop.time() - self._yielded_at >= MAX_HOLD):
            await asyncio.sleep(0)
        else:
            return
        self._yielded_at = loop.time()

    async def take(self, within: float | None = None) -> list[Chunk] | None:
        """The chunks that arrived since the last call; [] once the stream ended cleanly; None
        when `within` seconds passed with nothing new (chunk shaping's timer)."""
        # Called again by the writer: what it took last time has been sent.
        if self._text_taken:
            self._text_sent.set()
        if within is None:
            await self._ready.wait()
        elif not self._ready.is_set():
            try:
                async with asyncio.timeout(within):
                    await self._ready.wait()
            except TimeoutError:
                return None
        batch, self._pending = self._pending, []
        self._pending_chars = 0
        self._drained.set()
        if not self._text_taken:
            self._text_taken = any(chunk.text for chunk in batch)
            if self._text_taken and self._pace is not None:
                # the first text is out: the rest is read at the pace
                self._pace.start(asyncio.get_running_loop().time())
        if not self._ended:
            self._ready.clear()
        if not batch and self._error is not None:
            raise self._error
        return batch

    async def aclose(self) -> None:
        """Stop reading and close the provider stream (idempotent)."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait({self._task})

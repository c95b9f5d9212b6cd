"""The engine's ChunkPump: the first text goes out before the reader reads on, and a slow writer
is still never mistaken for an idle model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from promptline.config import Timeouts
from services.llm_engine import pump as pump_module
from services.llm_engine.providers.base import Chunk
from services.llm_engine.pump import ChunkPump
from services.llm_engine.timeouts import StreamClock
from tests.eventually import eventually


class Provider:
    """A provider stream that counts how far it has been read."""

    def __init__(self, texts: list[str], gap: float = 0.0) -> None:
        self.texts = texts
        self.gap = gap
        self.pulled = 0
        self.pulled_at: list[float] = []
        """Loop time of each read, in order."""

    async def chunks(self) -> AsyncIterator[Chunk]:
        for text in self.texts:
            if self.gap:
                await asyncio.sleep(self.gap)
            self._pull()
            yield Chunk(text=text)
        self._pull()
        yield Chunk(finish_reason="stop")

    def _pull(self) -> None:
        self.pulled += 1
        self.pulled_at.append(asyncio.get_running_loop().time())


def clock(idle: float = 5.0) -> StreamClock:
    return StreamClock.start(Timeouts(first_token=5.0, idle=idle, total=30.0), None)


async def drain(pump: ChunkPump) -> list[str]:
    texts = []
    while batch := await pump.take():
        texts += [c.text for c in batch if c.text]
    return texts


async def test_reader_waits_for_the_first_text_to_go_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pump_module, "FIRST_TEXT_WAIT", 30.0)  # only the writer releases it
    provider = Provider(["", "a", "b", "c"])  # a burst: everything is readable at once
    pump = ChunkPump(provider.chunks(), clock())
    try:
        taken: list[str] = []
        while "a" not in taken:  # the empty role chunk may come on its own first
            taken += [c.text for c in await pump.take()]
        for _ in range(50):
            await asyncio.sleep(0)
        assert provider.pulled == 2, "read past the first text before it was sent"
        assert await drain(pump) == ["b", "c"]  # the next take() says "sent": it reads on
        assert provider.pulled == 5
    finally:
        await pump.aclose()


async def test_the_rest_of_a_burst_waits_a_short_lead_after_the_first_text(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pump_module, "FIRST_TEXT_LEAD", 0.2)
    provider = Provider(["a", "b", "c"])  # a burst: everything is readable at once
    pump = ChunkPump(provider.chunks(), clock())
    try:
        assert [c.text for c in await pump.take()] == ["a"]
        loop = asyncio.get_running_loop()
        sent = loop.time()
        rest = asyncio.ensure_future(pump.take())  # "a" went out: the reader holds back
        assert [c.text for c in await rest] + await drain(pump) == ["b", "c"]  # nothing lost
        assert provider.pulled_at[1] - sent >= 0.15, "read on during the lead"
        assert loop.time() - sent >= 0.15, "the rest of the burst did not wait for the lead"
    finally:
        await pump.aclose()


async def test_the_pause_is_bounded_when_the_writer_is_slow(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pump_module, "FIRST_TEXT_WAIT", 0.01)
    provider = Provider(["a", "b", "c", "d"])
    pump = ChunkPump(provider.chunks(), clock())
    try:
        assert [c.text for c in await pump.take()] == ["a"]
        # The writer is still sending "a"; the reader goes on after the short pause.
        await eventually(lambda: provider.pulled == 5, within=2, what="the reader going on")
        assert provider.pulled == 5
        assert await drain(pump) == ["b", "c", "d"]
    finally:
        await pump.aclose()


async def test_a_slow_writer_is_not_an_idle_model():
    # Tokens every 50 ms against a 300 ms idle timeout; the writer takes 1 s over the first one.
    provider = Provider(["a", "b", "c", "d", "e", "f"], gap=0.05)
    pump = ChunkPump(provider.chunks(), clock(idle=0.3))
    try:
        assert [c.text for c in await pump.take()] == ["a"]
        await asyncio.sleep(1.0)
        assert await drain(pump) == ["b", "c", "d", "e", "f"]
    finally:
        await pump.aclose()

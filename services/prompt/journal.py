"""The stream journal: each resumable stream's frames in a Redis Stream, for ResumeChat.

Keys, per tenant and request (the hash tag is the request, so a stream's keys share a slot and
streams spread over a cluster's shards):

    pl:resume:<tenant>:{<rid>}          the Redis Stream; each entry holds `o`: its writer's
                                        token, and `f`: a batch of serialized StreamChatResponse
                                        frames, each prefixed by its length (a varint), or `h`: a
                                        heartbeat. A stream's first write deletes what an
                                        earlier stream with the same request id left (a reused
                                        X-Request-Id: the newest stream is the one resumed, and
                                        an old stop mark does not stop it); readers follow the
                                        first entry's writer, so a stream still running under
                                        the old id never mixes into the new one's
    pl:resume:<tenant>:{<rid>}:stop     CancelChat's mark, for a stream run by another replica
    pl:resume:<tenant>:{<rid>}:reader   a resuming reader's presence (renewed while it reads)

The tenant is in every key, so another tenant's request id names nothing.

Writing never delays a frame: `Writer.append` only buffers the bytes; one flusher per process
writes every buffer at most `FLUSH_S` after its first frame, in one pipeline (an XADD with
MAXLEN per stream; PEXPIRE to `resume.ttl` on its first and last write and every half ttl), and
with it checks each stream's stop mark every `STOP_CHECK_S`. A
stream with nothing to write gets a heartbeat entry every `HEARTBEAT_S`, so a reader can tell a
slow model from a replica that died. A failed write drops that batch (counted and logged once per
outage); the stream itself goes on.

Reading (`read`): the whole stream (XRANGE), then XREAD BLOCK from its last entry until the
terminal frame; no entry for `GONE_S` means the writer is gone (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.metrics import JOURNAL_LAG, REDIS_ERRORS
from promptline.redis_store import STORE_ERRORS, RedisClient, StoreOutage, store_call
from promptline.v1 import prompt_pb2

log = logging.getLogger("promptline.journal")

FLUSH_S = 0.01
"""Longest a frame waits in its buffer before the flusher writes it: all streams' frames of that
time go in one pipeline (a shorter wait costs the prompt service more CPU per token)."""
OPEN_S = 0.2
"""A stream with no frame yet is written (a heartbeat) this long after it began; a reader that
finds nothing waits as long for it (`FIND_S`), so even a drop before `start` can be resumed."""
FIND_S = OPEN_S + 0.2
STOP_CHECK_S = 0.2
"""How often a stream's stop mark is read (with its writes, or alone when it writes nothing): a
Stop that reaches another replica than the stream's takes this long at most."""
HEARTBEAT_S = 2.0
"""A stream with nothing to write gets a heartbeat entry this often."""
GONE_S = 10.0
"""A reader that sees no entry (frame or heartbeat) this long gives up: the writer is gone."""
READER_TTL_S = 3.0
READER_RENEW_S = 1.0
BLOCK_MS = 500
"""XREAD BLOCK per wait: under redis_store.SOCKET_TIMEOUT, so a wait is never a socket timeout."""
MAX_ENTRIES = 100_000
"""XADD MAXLEN ~: far above any stream's batches (5 minutes flushed every 10 ms: 30,000)."""
READ_TIMEOUT_S = 5.0
"""Longest a reader waits on one Redis call that is not a blocking read."""
TERMINAL = frozenset({"done", "error"})


def journal_key(tenant: str, request_id: str) -> str:
    return f"pl:resume:{tenant}:{{{request_id}}}"


def encode(frames: list[bytes]) -> bytes:
    """Frames as one entry: each prefixed by its length as a varint."""
    out = bytearray()
    for frame in frames:
        n = len(frame)
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        out += frame
    return bytes(out)


def decode(data: bytes) -> list[prompt_pb2.StreamChatResponse]:
    frames = []
    i = 0
    while i < len(data):
        n = shift = 0
        while True:
            byte = data[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        frames.append(prompt_pb2.StreamChatResponse.FromString(data[i:i + n]))
        i += n
    return frames


@dataclass(eq=False)
class Writer:
    """One stream's side of the journal."""

    key: str
    ttl_ms: int
    on_stop: Callable[[], object]
    poke: Callable[[], None]
    """Wakes the flusher."""
    """Called (once) when a CancelChat on another replica marked the stream to stop."""
    token: bytes = field(default_factory=lambda: uuid.uuid4().hex[:12].encode())
    buffer: list[bytes] = field(default_factory=list)
    since: float = 0.0
    """When the oldest buffered frame came."""
    fresh: bool = True
    """Nothing written yet: the first write opens the stream (a heartbeat after OPEN_S if no
    frame came by then)."""
    opened: float = field(default_factory=time.monotonic)
    expire_due: float = 0.0
    dead: bool = False
    """No more writes: the stream ended (or Redis failed at its end)."""
    closing: bool = False
    last_write: float = 0.0
    last_stop_check: float = 0.0
    stopped: bool = False

    def append(self, frame: prompt_pb2.StreamChatResponse) -> None:
        if not self.dead:
            self.buffer.append(frame.SerializeToString())
            if len(self.buffer) == 1:
                self.since = time.monotonic()
                self.poke()

    def heartbeat_due(self, now: float) -> bool:
        if self.buffer:
            return False
        return now - self.opened >= OPEN_S if self.fresh else now - self.last_write >= HEARTBEAT_S


class Journal:
    """The journal of one prompt replica: its writers and the flusher that serves them."""

    def __init__(self, redis: RedisClient, timeout: float) -> None:
        self._redis = redis
        self._timeout = timeout
        self._writers: set[Writer] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._outage = StoreOutage(
            log, "Redis unavailable (%s): stream journal batches dropped until it is back "
                 "(resume answers 503 meanwhile)", "stream journal writes resumed")

    def open(self, tenant: str, request_id: str, ttl: float, on_stop: Callable[[], object]
             ) -> Writer:
        """A writer for a new stream; its first flush opens it (see `Writer.fresh`)."""
        writer = Writer(journal_key(tenant, request_id), max(1, round(ttl * 1000)), on_stop,
                        self.poke, last_stop_check=time.monotonic())
        self._writers.add(writer)
        self.poke()
        return writer

    def close(self, writer: Writer) -> None:
        """The stream ended: what is buffered is written, then the writer is dropped."""
        writer.closing = True
        self.poke()

    def poke(self) -> None:
        """Something to write: the flusher runs within FLUSH_S."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="journal-flush")
        self._wake.set()

    async def drain(self, within: float) -> None:
        """Wait (bounded) until everything buffered was written: at shutdown."""
        if self._flusher is not None and not self._flusher.done():
            try:
                async with asyncio.timeout(within):
                    await asyncio.shield(self._flusher)
            except TimeoutError:
                self._flusher.cancel()

    async def _flush_loop(self) -> None:
        # Runs while any writer is open; a process with no open stream has no task of this.
        while self._writers:
            await asyncio.sleep(FLUSH_S)
            self._wake.clear()
            await self._flush(time.monotonic())
            if self._writers and not any(w.buffer or w.closing for w in self._writers):
                # Nothing buffered: wake at the next frame, or for stop checks and heartbeats.
                try:
                    async with asyncio.timeout(STOP_CHECK_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _flush(self, now: float) -> None:
        writers = [w for w in self._writers if not w.dead and (
            w.buffer or w.closing or w.heartbeat_due(now)
            or now - w.last_stop_check >= STOP_CHECK_S)]
        for w in [w for w in self._writers if w.dead]:
            self._writers.discard(w)
        if not writers:
            return
        if self._outage.skipping():  # Redis failed just now: no storm of doomed writes
            self._drop(writers)
            return
        try:
            async with asyncio.timeout(self._timeout * 4):
                await self._write(writers, now)
            self._outage.answered()
        except STORE_ERRORS as exc:
            REDIS_ERRORS.labels("journal").inc()
            self._outage.failed(exc)
            self._drop(writers)
        for w in writers:
            if w.closing and not w.buffer:
                w.dead = True

    @staticmethod
    def _drop(writers: list[Writer]) -> None:
        """What could not be written is lost (the streams go on); ended streams are done."""
        for w in writers:
            w.buffer.clear()
            if w.closing:
                w.dead = True

    async def _write(self, writers: list[Writer], now: float) -> None:
        if not writers:
            return
        pipe = self._redis.pipeline(transaction=False)
        checks: list[tuple[int, Writer]] = []  # (the EXISTS reply's index, its writer)
        waited: list[float] = []
        queued = 0
        for w in writers:
            if w.buffer or w.heartbeat_due(now):
                entry: dict[Any, Any] = {"o": w.token, **({"f": encode(w.buffer)} if w.buffer
                                                          else {"h": b"1"})}
                if w.fresh:  # the id is this stream's now (one slot: the id is the hash tag)
                    pipe.delete(w.key, w.key + ":stop")
                    queued += 1
                pipe.xadd(w.key, entry, maxlen=MAX_ENTRIES, approximate=True)
                queued += 1
                if w.fresh or w.closing or now >= w.expire_due:
                    pipe.pexpire(w.key, w.ttl_ms)
                    queued += 1
                    w.expire_due = now + w.ttl_ms / 2000
                if w.buffer:
                    waited.append(w.since)
                w.buffer.clear()
                w.fresh = False
                w.last_write = now
            elif w.closing and not w.fresh:  # its last frame went earlier: kept ttl from its end
                pipe.pexpire(w.key, w.ttl_ms)
                queued += 1
            if not w.closing and now - w.last_stop_check >= STOP_CHECK_S:
                pipe.exists(w.key + ":stop")
                checks.append((queued, w))
                queued += 1
                w.last_stop_check = now
        results = await store_call(pipe.execute())
        written = time.monotonic()
        for since in waited:
            JOURNAL_LAG.observe(written - since)
        for index, w in checks:
            if results[index] and not w.stopped:
                w.stopped = True
                w.on_stop()

    async def mark_stop(self, tenant: str, request_id: str) -> bool | None:
        """CancelChat for a stream another replica runs: True when it was marked to stop, False
        when it had already ended, None when there is no such stream."""
        key = journal_key(tenant, request_id)
        last = await self._find(key, lambda: self._redis.xrevrange(key, count=1))
        if not last:
            return None
        if _ends(last[0][1]):
            return False
        async with asyncio.timeout(READ_TIMEOUT_S):
            await store_call(self._redis.set(key + ":stop", "1", px=round(HEARTBEAT_S * 5000)))
        return True

    async def _find(self, key: str, read: Callable[[], Any]) -> Any:
        """`read()` of a stream's entries; when there are none, read again for FIND_S: a stream
        that began just now is written within OPEN_S."""
        began = time.monotonic()
        while True:
            async with asyncio.timeout(READ_TIMEOUT_S):
                entries = await store_call(read())
            if entries or time.monotonic() - began >= FIND_S:
                return entries
            await asyncio.sleep(0.1)

    async def reader_present(self, writer: Writer) -> bool:
        """A resuming reader is attached somewhere (a detached stream's grace)."""
        async with asyncio.timeout(self._timeout * 4):
            return bool(await store_call(self._redis.exists(writer.key + ":reader")))

    async def read(self, tenant: str, request_id: str, after_id: int
                   ) -> AsyncGenerator[prompt_pb2.StreamChatResponse, None]:
        """The stream's start, its deltas after `after_id`, then the live rest to its terminal
        frame. NOT_FOUND when there is no such stream of `tenant`; UNAVAILABLE when Redis
        fails or the writer stopped writing without an end."""
        key = journal_key(tenant, request_id)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                # Present first: a detached stream's grace must not run out while this reads.
                await store_call(self._redis.set(key + ":reader", "1",
                                                 px=round(READER_TTL_S * 1000)))
            renewed = time.monotonic()
            entries: Any = await self._find(key, lambda: self._redis.xrange(key))
            if not entries:
                raise PromptlineError(ErrorCode.NOT_FOUND,
                                      f"no stream {request_id} to resume (unknown, expired or "
                                      "not resumable)", stage=Stage.CONNECT)
            last_id, seen = entries[-1][0], time.monotonic()
            owner = entries[0][1].get(b"o")
            started = False
            numbered = 0  # the last delta id read: the journal must hold every one after it
            while True:
                for _, fields in entries:
                    if fields.get(b"o") != owner:
                        continue  # a later stream that reused the request id
                    for frame in decode(fields.get(b"f", b"")):
                        kind = frame.WhichOneof("frame")
                        if kind == "start":
                            started = True
                        elif kind == "delta":
                            if not started or frame.delta.id != numbered + 1:
                                raise lost_frames(request_id)
                            numbered = frame.delta.id
                            if frame.delta.id <= after_id:
                                continue
                        yield frame
                        if kind in TERMINAL:
                            return
                now = time.monotonic()
                if now - renewed >= READER_RENEW_S:
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        await store_call(self._redis.set(key + ":reader", "1",
                                                         px=round(READER_TTL_S * 1000)))
                    renewed = now
                async with asyncio.timeout(READ_TIMEOUT_S):
                    got: Any = await store_call(self._redis.xread({key: last_id}, count=1000,
                                                                  block=BLOCK_MS))
                entries = got[0][1] if got else []
                if entries:
                    last_id, seen = entries[-1][0], time.monotonic()
                elif time.monotonic() - seen > GONE_S:
                    raise PromptlineError(
                        ErrorCode.UNAVAILABLE, "the stream stopped without an end (the replica "
                        "running it is gone); ask again", stage=Stage.MID_STREAM)
        except STORE_ERRORS as exc:
            raise unavailable(exc) from None


def lost_frames(request_id: str) -> PromptlineError:
    """A write of this stream's journal failed (Redis was away a moment): replaying across the
    hole would hand the client a reply with text missing, ended by `done` as if whole."""
    return PromptlineError(
        ErrorCode.UNAVAILABLE, f"part of stream {request_id} was not journaled (Redis was "
        "unavailable for a moment), so it cannot be resumed whole; ask again",
        stage=Stage.MID_STREAM)


def unavailable(exc: BaseException) -> PromptlineError:
    log.warning("stream journal read failed (%s)", type(exc).__name__)
    return PromptlineError(ErrorCode.UNAVAILABLE, "resume needs the stream journal in Redis, "
                           "which is unreachable; try again shortly", stage=Stage.CONNECT)


def _ends(fields: Any) -> bool:
    frames = decode(fields.get(b"f", b""))
    return bool(frames) and frames[-1].WhichOneof("frame") in TERMINAL

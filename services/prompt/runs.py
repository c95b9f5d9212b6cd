"""Resumable streams at the prompt service: a stream that may outlive its caller (docs/resume.md).

A `StreamChat` with `resumable` runs its frames in a task of its own (`Run`); the handler relays
them through a small bounded queue, so a reader that stops still pushes back to the provider.
Every frame is numbered (`Delta.id`) and journaled (`journal.py`). When the caller goes away
(the edge cancels its call: the client dropped), the run detaches: with a grace > 0 it goes on,
journaled, while a reader is attached somewhere (a ResumeChat on any replica renews a presence
key) and for `grace` after the last one left; then it is cancelled down to the provider. With a
grace of 0 a dropped caller cancels it at once, as before. A Stop (CancelChat) cancels it at
once, whichever replica it reaches (directly here, through the journal's stop mark elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from promptline.config import ResumeConfig
from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import STORE_ERRORS
from promptline.streams import Context, StreamLife, error_frame
from promptline.v1 import prompt_pb2

from .journal import Journal, Writer

log = logging.getLogger("promptline.prompt")

QUEUE_SIZE = 8
"""Frames between the run and its caller: slack, not a buffer (the caller's flow control must
still reach the provider)."""
GRACE_CHECK_S = 0.25
"""How often a detached run looks for a resuming reader."""
Frame = prompt_pb2.StreamChatResponse
TERMINAL = frozenset({"done", "error"})


async def numbered(frames: AsyncIterator[Frame]) -> AsyncGenerator[Frame, None]:
    """`frames` with each delta's `id` set: its number in the stream, from 1 (the SSE `id:`)."""
    n = 0
    async for frame in frames:
        if frame.WhichOneof("frame") == "delta":
            n += 1
            frame.delta.id = n
        yield frame


class RunContext:
    """The handler's gRPC context as the run sees it: forwarded while the caller is attached,
    ignored after (a detached run has nobody to send metadata or a status to)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.attached = True
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    async def send_initial_metadata(self, metadata: Any) -> None:
        if self.attached:
            with contextlib.suppress(Exception):  # the caller left meanwhile: nobody to tell
                await self._context.send_initial_metadata(metadata)

    def set_code(self, code: Any) -> None:
        if self.attached:
            self._context.set_code(code)

    def set_details(self, details: str) -> None:
        if self.attached:
            self._context.set_details(details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        if self.attached:
            self._context.set_trailing_metadata(metadata)


class Run:
    """One resumable stream's generation."""

    def __init__(self, request_id: str, life: StreamLife, context: RunContext,
                 journal: Journal | None, settings: ResumeConfig) -> None:
        self.request_id = request_id
        self.tenant = ""
        self._life = life
        self._context = context
        self._journal = journal
        self._settings = settings
        """The top-level `resume` until `bind` knows the model's and tenant's."""
        self._writer: Writer | None = None
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._why = ""

    @property
    def attached(self) -> bool:
        return self._context.attached

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None, "start() first"
        return self._task

    def start(self, frames: AsyncGenerator[Frame, None]) -> None:
        self._task = asyncio.create_task(self._run(frames), name=f"run-{self.request_id}")

    def bind(self, tenant: str, settings: ResumeConfig) -> None:
        """The stream's tenant and `resume` settings are known (after its plan): the journal
        opens, if its ttl is not 0."""
        self.tenant, self._settings = tenant, settings
        if self._journal is not None and settings.ttl > 0:
            self._writer = self._journal.open(tenant, self.request_id, settings.ttl,
                                              lambda: self.cancel("stopped by the caller"))
        if not self.attached:
            self._detached()

    async def frames(self) -> AsyncIterator[Frame]:
        """The frames for the attached caller, up to the terminal one."""
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame
            if frame.WhichOneof("frame") in TERMINAL:
                return

    def detach(self) -> None:
        """The caller went away (not a Stop): go on for the grace, or end now."""
        if not self.attached:
            return
        self._context.attached = False
        while not self._queue.empty():  # unblock the run: nobody reads these
            self._queue.get_nowait()
        self._detached()

    def _detached(self) -> None:
        if self.task.done():
            return
        if self._settings.grace <= 0 or (self._journal is not None and self._writer is None
                                         and self.tenant):
            self.cancel("the caller went away")  # nobody could resume it
        elif self._watch is None:
            self._watch = asyncio.create_task(self._watch_grace(), name="run-grace")

    def cancel(self, why: str) -> bool:
        """Stop the stream at once (a Stop, or the grace ran out); False when it had ended or
        was being stopped already."""
        if self._task is None or self._task.done() or self._why:
            return False
        self._why = why
        self._task.cancel()
        return True

    async def wait(self) -> None:
        for task in (self._task, self._watch):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self, frames: AsyncGenerator[Frame, None]) -> None:
        try:
            async with contextlib.aclosing(frames) as stream:
                async for frame in numbered(stream):
                    if self._writer is not None:
                        self._writer.append(frame)
                    if self.attached:
                        await self._queue.put(frame)
        except asyncio.CancelledError:
            # The chain below was cancelled (aclosing ran). Whoever reads gets a typed end.
            err = PromptlineError(ErrorCode.CANCELLED, self._why or "the stream was cancelled")
            err.at(self._life.stage, request_id=self.request_id, origin="prompt")
            end = error_frame(self._context, err, Frame)  # type: ignore[arg-type]
            if self._writer is not None:
                self._writer.append(end)
            if self.attached:
                if self._queue.full():
                    self._queue.get_nowait()
                self._queue.put_nowait(end)
            log.info("stream cancelled", extra={"request_id": self.request_id,
                                                "reason": self._why or "cancelled"})
        finally:
            if self._writer is not None and self._journal is not None:
                self._journal.close(self._writer)
            if self.attached and not self._queue.full():
                self._queue.put_nowait(None)
            if self._watch is not None and self._watch is not asyncio.current_task():
                self._watch.cancel()

    async def _watch_grace(self) -> None:
        """While detached: cancel once no reader was seen for `grace`."""
        grace = self._settings.grace
        seen = time.monotonic()
        while not self.task.done():
            await asyncio.sleep(min(GRACE_CHECK_S, grace))
            try:
                if self._journal is not None and self._writer is not None \
                        and await self._journal.reader_present(self._writer):
                    seen = time.monotonic()
                    continue
            except STORE_ERRORS:
                pass  # no way to know of a reader: the grace runs on
            if time.monotonic() - seen >= grace:
                log.info("no reader came back within the resume grace",
                         extra={"request_id": self.request_id, "grace_s": grace})
                self.cancel("no reader came back within the resume grace")
                return


class Runs:
    """The runs of one prompt replica, for CancelChat and shutdown."""

    def __init__(self) -> None:
        self._runs: dict[str, list[Run]] = {}
        """Request id -> its runs, oldest first: callers choose request ids, so two tenants, or
        a client retrying, may run streams under one id at once."""

    def add(self, run: Run) -> None:
        self._runs.setdefault(run.request_id, []).append(run)
        run.task.add_done_callback(lambda _: self._forget(run))

    def _forget(self, run: Run) -> None:
        runs = self._runs.get(run.request_id, [])
        if run in runs:
            runs.remove(run)
        if not runs:
            self._runs.pop(run.request_id, None)

    def find(self, tenant: str, request_id: str) -> Run | None:
        """The tenant's newest run under `request_id` (the one a resume reads)."""
        return next((run for run in reversed(self._runs.get(request_id, ()))
                     if run.tenant == tenant), None)

    async def stop(self, within: float) -> None:
        """Shutdown: every run still going (detached ones included) is cancelled."""
        runs = [run for same_id in self._runs.values() for run in same_id]
        for run in runs:
            run.cancel("the prompt service is shutting down")
        if runs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await asyncio.gather(*(run.wait() for run in runs))

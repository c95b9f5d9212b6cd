"""Relaying one StreamChat call to one HTTP client, independent of the wire format.

`StreamRelay` owns the rules every streaming endpoint shares: hold the response headers until the
prompt service's `start` frame (capped), an error before that as a real HTTP status with a JSON
body, heartbeats while idle, a single writer, and on any exit (done, error, client gone, handler
cancelled) the gRPC call is cancelled, which cancels the chain down to the provider (or, for a
`resumable` stream, leaves it to the prompt service's resume grace: docs/resume.md). The same
relay carries a `ResumeChat` call (`GET /v1/chat/stream/{id}`), whose frames are StreamChat's.

What goes on the wire is an `Encoder`'s business: `SseEncoder` for `POST /v1/chat/stream`,
`services.edge_http.openai_api.ChunkEncoder` for `POST /v1/chat/completions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from typing import Any, Final, Protocol

import grpc
from aiohttp import web

from promptline.config import Config
from promptline.errors import ErrorCode, PromptlineError, Stage, internal_error
from promptline.streams import CANCELLED, DONE, StreamLife, read_frames
from promptline.stubs import ChatCall, ResumeCall
from promptline.v1 import common_pb2, prompt_pb2
from services.edge_http import sse
from services.edge_http.http_errors import ORIGIN, error_response, native_error_body

log = logging.getLogger("promptline.edge_http")

# Slack between the gRPC reader and the socket writer: enough that a write does not stall the
# next read, small enough that a slow client pushes back through gRPC flow control instead of
# having the edge buffer a whole reply in memory.
FRAME_QUEUE_SIZE = 8
DEPLOYMENT_HEADER = "X-Promptline-Deployment"
"""The deployment of the model's pool that answered (also in the native `start` and `done`)."""
CACHE_HEADER = "x-promptline-cache"
"""`hit` or `miss`, for a model with a response cache: the prompt service's initial metadata
(services/prompt/cache.py HEADER), passed on like the quota headers."""
MAX_MERGED_CHARS = 32 * 1024
"""Deltas that queued up for a slow client are merged up to this much text: an SSE line stays
well within what clients read in one line (aiohttp: 512 KiB)."""


class _Marker(enum.Enum):
    HEARTBEAT = "heartbeat"


_HEARTBEAT: Final = _Marker.HEARTBEAT
"""Queued by a stream's heartbeat timer: nothing was written for `edge.heartbeat`."""
Frame = prompt_pb2.StreamChatResponse
Queued = Frame | PromptlineError | _Marker
"""What the reader task and the heartbeat timer put in the writer's queue."""
FrameCall = ChatCall | ResumeCall
"""A call whose frames a relay carries: StreamChat, or ResumeChat (the same frames)."""

async def ratelimit_headers(call: grpc.aio.Call, *, rejected: bool = False) -> dict[str, str]:
    """`x-ratelimit-*` headers (and `x-promptline-cache`) as the prompt service sent them:
    initial metadata at admission, trailing metadata with a quota rejection (`rejected`). Never
    rebuilt from the edge's own config, which may differ from the prompt service's after a
    reload."""
    try:
        metadata = await (call.trailing_metadata() if rejected else call.initial_metadata())
    except (grpc.RpcError, asyncio.InvalidStateError):
        return {}
    return {k: v for k, v in (metadata or ()) if k.startswith(("x-ratelimit-", CACHE_HEADER))
            and isinstance(v, str)}


class Encoder(Protocol):
    """Turns stream events into bytes for one wire format; one instance per request."""

    content_type: str
    heartbeat: bytes
    """Written after `edge.heartbeat` of silence; must be ignored by the client's parser."""

    def start(self, start: prompt_pb2.ChatStart) -> bytes:
        """The first bytes of the body (once, before any delta)."""

    def delta(self, text: str, seq: int) -> bytes:
        """One piece of text; `seq` is its delta id (the prompt service's `Delta.id`, from 1;
        for merged deltas the last one's), the SSE `id:` a client resumes after."""

    def done(self, done: common_pb2.Done) -> bytes:
        """The successful end of the stream (everything up to the last byte)."""

    def error(self, err: PromptlineError) -> bytes:
        """The failed end of a stream whose headers were already sent."""

    def error_body(self, err: PromptlineError) -> dict[str, Any]:
        """The JSON body of an HTTP error, sent when the headers were not committed yet."""


class SseEncoder:
    """The native SSE wire: `start`, `delta` (with `id:`), `done` / `error` events."""

    content_type = sse.CONTENT_TYPE
    heartbeat = sse.HEARTBEAT

    def __init__(self, request_id: str, model: str) -> None:
        self._rid = request_id
        self._model = model

    def start(self, start: prompt_pb2.ChatStart) -> bytes:
        return sse.encode_event("start", start_data(start, self._rid, self._model))

    def delta(self, text: str, seq: int) -> bytes:
        return sse.encode_event("delta", {"text": text}, event_id=seq)

    def done(self, done: common_pb2.Done) -> bytes:
        return sse.encode_event("done", done_data(done))

    def error(self, err: PromptlineError) -> bytes:
        return sse.encode_event("error", {"error": err.to_dict()})

    def error_body(self, err: PromptlineError) -> dict[str, Any]:
        return native_error_body(err)


class StreamRelay:
    """Relays one StreamChat call to one HTTP client; the single writer of the response.

    A reader task drains the gRPC stream into a small queue, so waiting for frames with a timeout
    (the header hold) never cancels a pending gRPC read. Heartbeats: one timer per stream queues
    a marker when nothing was written for `edge.heartbeat`, and the writer writes the comment,
    so no two tasks write the response and no frame pays for a timeout of its own.
    """

    def __init__(self, request: web.Request, config: Config, request_id: str, *, model: str,
                 encoder: Encoder, endpoint: str = "chat_stream") -> None:
        self._request = request
        self._config = config
        self._rid = request_id
        self._model = model
        self._encoder = encoder
        self._heartbeat = config.edge.heartbeat
        self._stall_limit = config.idle_timeout(model)  # a route: its models' longest
        """Longest a write may wait for a client that stopped reading: the model's idle rule."""
        self._response: web.StreamResponse | None = None
        self._call: FrameCall | None = None
        self._stash: Frame | PromptlineError | None = None
        """A frame (or the error) taken from the queue while merging deltas."""
        self._started = False
        self._deltas = 0
        """Delta events written: the SSE id of a delta the prompt service did not number."""
        self._last_write = 0.0
        self._beat: asyncio.TimerHandle | None = None
        self.life = StreamLife(ORIGIN, model, request_id, logger=log,
                               label=config.model_label(model))
        self.life.fields["endpoint"] = endpoint

    async def run(self, call: FrameCall, *, header_hold: float) -> web.StreamResponse:
        self._call = call
        queue: asyncio.Queue[Queued] = asyncio.Queue(FRAME_QUEUE_SIZE)
        reader = asyncio.create_task(_read_into(call, queue, self._rid),
                                     name=f"edge-read-{self._rid}")
        try:
            return await self._relay(queue, header_hold)
        except ConnectionResetError:
            # The client went away while we wrote; aiohttp copes with the half-written response.
            self.life.outcome = "client_disconnected"
            assert self._response is not None  # only writes raise this, and they follow prepare
            return self._response
        except asyncio.CancelledError:
            self.life.outcome = CANCELLED
            raise
        finally:
            call.cancel()  # stop the chain now, whatever the reader task is doing
            if self._beat is not None:
                self._beat.cancel()
            try:
                await cancel_and_wait(reader)
            finally:  # a second cancel (client gone while we clean up) must not skip this
                self.life.fields["deltas"] = self._deltas
                self.life.finish()

    async def _relay(self, queue: asyncio.Queue[Queued], header_hold: float) -> web.StreamResponse:
        assert self._call is not None  # set by `run`
        try:
            frame = await self._first_frame(queue, header_hold)
            # The prompt service sends its quota headers as initial metadata at admission.
            headers = await ratelimit_headers(self._call) if frame else {}
            if frame is not None and frame.WhichOneof("frame") == "start" \
                    and frame.start.deployment:  # the OpenAI wire has no field for it
                headers[DEPLOYMENT_HEADER] = frame.start.deployment
            await self._open(headers)
            self._arm_heartbeat(queue)
            if frame is not None:
                await self._write_frame(frame)
            while frame is None or frame.WhichOneof("frame") != "done":
                frame = await self._next_frame(queue)
                await self._write_frame(frame)
            self.life.outcome = DONE
        except PromptlineError as err:
            return await self._fail(err)
        except ConnectionResetError:
            raise
        except Exception:
            log.exception("chat stream failed", extra={"request_id": self._rid})
            return await self._fail(internal_error(self._rid, self.life.stage))
        assert self._response is not None
        await self._response.write_eof()
        return self._response

    async def _first_frame(self, queue: asyncio.Queue[Queued], hold: float) -> Frame | None:
        """The first frame, or None once `hold` passed (headers are then committed anyway)."""
        try:
            async with asyncio.timeout(hold):  # not wait_for: no extra task per request
                item = await queue.get()
        except TimeoutError:
            return None
        assert item is not _HEARTBEAT  # the heartbeat timer is armed after the first frame
        return _unwrap(item)

    async def _next_frame(self, queue: asyncio.Queue[Queued]) -> Frame:
        """The next frame; deltas that queued up while the client was slow leave as one."""
        if self._stash is not None:
            frame, self._stash = self._stash, None
            return _unwrap(frame)
        frame = await self._wait_frame(queue)
        if frame.WhichOneof("frame") != "delta" or queue.empty():
            return frame
        texts, tokens, last_id = [frame.delta.text], frame.delta.tokens, frame.delta.id
        size = len(texts[0])
        while not queue.empty() and size < MAX_MERGED_CHARS:
            following = queue.get_nowait()
            if following is _HEARTBEAT:
                continue  # text is about to be written: no heartbeat needed
            if isinstance(following, PromptlineError) or following.WhichOneof("frame") != "delta":
                self._stash = following  # kept for the next call, in order
                break
            texts.append(following.delta.text)
            size += len(following.delta.text)
            tokens += following.delta.tokens
            last_id = following.delta.id
        # The last merged delta's id: a client that resumes after it has all of this text.
        return prompt_pb2.StreamChatResponse(
            delta=common_pb2.Delta(text="".join(texts), tokens=tokens, id=last_id))

    async def _wait_frame(self, queue: asyncio.Queue[Queued]) -> Frame:
        """The next queued frame; a heartbeat for each marker the timer queued meanwhile."""
        while True:
            item = queue.get_nowait() if not queue.empty() else await queue.get()
            if item is not _HEARTBEAT:
                return _unwrap(item)
            if asyncio.get_running_loop().time() - self._last_write >= self._heartbeat:
                await self._write(self._encoder.heartbeat)

    def _arm_heartbeat(self, queue: asyncio.Queue[Queued]) -> None:
        loop = asyncio.get_running_loop()
        self._beat = loop.call_at(self._last_write + self._heartbeat, self._heartbeat_due, queue)

    def _heartbeat_due(self, queue: asyncio.Queue[Queued]) -> None:
        # A write since the timer was armed moved the deadline: sleep until the new one. A full
        # queue means the writer has frames to write anyway.
        loop = asyncio.get_running_loop()
        due = self._last_write + self._heartbeat
        if loop.time() >= due:
            if not queue.full():
                queue.put_nowait(_HEARTBEAT)
            due = loop.time() + self._heartbeat
        self._beat = loop.call_at(due, self._heartbeat_due, queue)

    async def _open(self, extra_headers: dict[str, str]) -> None:
        response = web.StreamResponse(status=200, headers={
            **extra_headers,
            "Content-Type": self._encoder.content_type,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx would otherwise buffer the whole stream
            "X-Request-Id": self._rid,
        })
        self._response = response
        await response.prepare(self._request)
        self._last_write = asyncio.get_running_loop().time()

    async def _write(self, data: bytes) -> None:
        await self._send(data, last=False)
        self._last_write = asyncio.get_running_loop().time()

    async def _write_last(self, data: bytes) -> None:
        """The final event and the end of the body in one write."""
        await self._send(data, last=True)

    async def _send(self, data: bytes, *, last: bool) -> None:
        response = self._response
        assert response is not None
        write = response.write_eof(data) if last else response.write(data)
        transport = self._request.transport
        if transport is None or (transport.get_write_buffer_size() + len(data)
                                 <= transport.get_write_buffer_limits()[1]):
            await write  # it fits under the high-water mark: it cannot wait for the client
            return
        # The client may be behind, so this write may wait for it (the socket pushes back, gRPC
        # flow control carries that down to the provider), but not longer than the idle rule
        # allows. A large write into an empty buffer waits too: it is checked the same way.
        try:
            async with asyncio.timeout(self._stall_limit):
                await write
        except TimeoutError:
            raise ClientStalled(self._stall_limit) from None

    async def _write_frame(self, frame: Frame) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "start":
            if not self._started:
                await self._write_start(frame.start)
        elif kind == "delta":
            await self._ensure_started()
            self.life.text_delivered()
            self._deltas += 1
            # The prompt service's id, which a resume continues after; a downstream that does
            # not number its deltas (0) gets the edge's count, as before ids existed.
            await self._write(self._encoder.delta(frame.delta.text,
                                                  frame.delta.id or self._deltas))
        elif kind == "done":
            await self._ensure_started()
            await self._write_last(self._encoder.done(frame.done))
        else:
            log.warning("unknown frame kind ignored",
                        extra={"request_id": self._rid, "kind": kind})

    async def _ensure_started(self) -> None:
        """A downstream that skipped `start`: the client still gets one."""
        if not self._started:
            await self._write_start(prompt_pb2.ChatStart(request_id=self._rid, model=self._model))

    async def _write_start(self, start: prompt_pb2.ChatStart) -> None:
        self._started = True
        if not self._model and start.model:  # a resumed stream learns its model here
            self._model = start.model
            self._stall_limit = self._config.idle_timeout(start.model)
            self.life.fields["model"] = start.model
        await self._write(self._encoder.start(start))

    async def _fail(self, err: PromptlineError) -> web.StreamResponse:
        # Before the headers, error_response answers (and counts) it as an HTTP error.
        self.life.failed(err, count=self._response is not None)
        if isinstance(err, ClientStalled):
            return self._abort_stalled()
        if self._response is None:
            assert self._call is not None  # set by `run`
            headers = await ratelimit_headers(self._call, rejected=bool(err.quota_subject))
            return error_response(err, self._rid, headers=headers,
                                  body=self._encoder.error_body)
        try:
            await self._write_last(self._encoder.error(err))
        except ClientStalled:  # the error event cannot reach a client that stopped reading
            return self._abort_stalled()
        return self._response

    def _abort_stalled(self) -> web.StreamResponse:
        log.info("client stopped reading; stream ended", extra={
            "request_id": self._rid, "stall_limit_s": self._stall_limit})
        if self._request.transport is not None:
            self._request.transport.abort()  # nothing more can reach that client
        assert self._response is not None
        return self._response


class ClientStalled(PromptlineError):
    """The client read nothing for the stall limit while a write waited for it."""

    def __init__(self, limit: float) -> None:
        super().__init__(ErrorCode.STREAM_TIMEOUT,
                         f"the client read nothing for {limit:g} s", stage=Stage.MID_STREAM)


def start_data(start: prompt_pb2.ChatStart, request_id: str, model: str) -> dict[str, Any]:
    """The SSE `start` event's data."""
    data: dict[str, Any] = {"request_id": start.request_id or request_id,
                            "model": start.model or model}
    if start.conversation_id:
        data["conversation_id"] = start.conversation_id
    if start.prompt_id:
        data["prompt_id"] = start.prompt_id
        data["prompt_version"] = start.prompt_version
    if start.prompt_tokens:
        data["prompt_tokens"] = start.prompt_tokens
    if start.deployment:
        data["deployment"] = start.deployment
    return data


def usage_data(usage: common_pb2.Usage) -> dict[str, Any]:
    """Token accounting as JSON (the same fields on every wire), with `cost_usd` as the exact
    decimal string the prompt service priced it at (a JSON number would be a binary float)."""
    data: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.total_tokens}
    if usage.cost_usd:
        data["cost_usd"] = usage.cost_usd
    return data


def done_data(done: common_pb2.Done) -> dict[str, Any]:
    """The SSE `done` event's data."""
    data: dict[str, Any] = {"finish_reason": done.finish_reason, "usage": usage_data(done.usage)}
    if done.model:
        data["model"] = done.model
    if done.deployment:
        data["deployment"] = done.deployment
    if done.cached:
        data["cached"] = True
    if done.prompt_id:
        data["prompt_id"] = done.prompt_id
        data["prompt_version"] = done.prompt_version
    return data


def _unwrap(item: Frame | PromptlineError) -> Frame:
    if isinstance(item, PromptlineError):
        raise item
    return item


async def _read_into(call: FrameCall, queue: asyncio.Queue[Queued], request_id: str) -> None:
    """Reader task: frames into `queue`, ending with the terminal frame or a PromptlineError."""
    try:
        async with contextlib.aclosing(
                read_frames(call, end_first=False)) as frames:  # done before the quota settles
            async for frame in frames:
                await queue.put(frame)
    except PromptlineError as err:
        await queue.put(err)
    except Exception:
        log.exception("reading the prompt stream failed", extra={"request_id": request_id})
        await queue.put(internal_error(request_id))


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it finished; our own cancellation still propagates."""
    task.cancel()
    await asyncio.wait({task})  # unlike `await task`, never raises the task's CancelledError
    if not task.cancelled() and task.exception() is not None:
        log.debug("task ended with an error", exc_info=task.exception())

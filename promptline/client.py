"""A small typed async client for `PromptService` (StreamChat, and ResumeChat and CancelChat for
resumable streams), for internal Python callers.

    async with PromptlineClient("127.0.0.1:50051", api_key="dev-key") as client:
        async for event in client.stream_chat("sim", [{"role": "user", "content": "Hi"}]):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)

Events are `Started`, then `TextDelta`s, then one `Finished` (with usage). Every failure, from
a bad key to a mid-stream provider error or the deadline, raises `PromptlineError` with `code`,
`stage`, `retryable`, `retry_after_ms` and `request_id`. Protobuf stays inside this module.
Leaving the loop early cancels the call (and so the chain down to the provider) as soon as the
iterator is closed: immediately with `contextlib.aclosing`, otherwise when it is collected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from promptline.channels import insecure_channel
from promptline.errors import ErrorCode, PromptlineError
from promptline.rules import invalid
from promptline.streams import read_frames
from promptline.stubs import ChatCall, PromptServiceClient, ResumeCall
from promptline.v1 import common_pb2, prompt_pb2, prompt_pb2_grpc

DEFAULT_TIMEOUT = 600.0
"""Seconds a whole stream may take unless `timeout` says otherwise (the gRPC deadline)."""
MAX_DELTA_ID = 2**32 - 1
"""The largest delta id (a uint32 on the wire)."""
CANCEL_TIMEOUT = 10.0
"""Seconds a `cancel_chat` may take: a Redis round trip or two on the prompt service."""


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message (a mapping with "role" and "content", or a (role, content) tuple, will
    do as well)."""

    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """A managed prompt to render as the system message."""

    id: str
    version: int | None = None
    """A fixed version; None with no label means the latest."""
    label: str | None = None
    """A label to resolve, e.g. "prod"."""
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one stream."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Started:
    """The request was admitted and the model accepted it."""

    request_id: str
    model: str
    conversation_id: str = ""
    prompt_id: str = ""
    prompt_version: int = 0
    prompt_tokens: int = 0
    deployment: str = ""
    """The deployment of the model's pool that serves the request."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the reply, in order."""

    text: str
    tokens: int = 0
    id: int = 0
    """The delta's number in its stream, from 1: `resume_chat`'s `after_id` (docs/resume.md)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The reply is complete."""

    finish_reason: str
    """"stop" or "length" (max_tokens reached)."""
    usage: Usage
    model: str = ""
    """The model that produced the reply (may be a fallback)."""
    deployment: str = ""
    """The deployment of that model's pool that produced it."""
    cached: bool = False
    """Replayed from the prompt service's response cache (docs/cache.md): no provider call."""


ChatEvent = Started | TextDelta | Finished
MessageLike = Message | Mapping[str, str] | tuple[str, str]


class PromptlineClient:
    """Owns one gRPC channel to a PromptService; use as `async with`.

    `target` is `host:port`; `api_key` goes out as `authorization: Bearer <key>` metadata on every
    call; `timeout` is the default whole-stream deadline in seconds.
    """

    def __init__(self, target: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._target = target
        self._api_key = api_key
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: PromptServiceClient | None = None

    async def __aenter__(self) -> PromptlineClient:
        self._channel = insecure_channel(self._target)
        self._stub = prompt_pb2_grpc.PromptServiceStub(self._channel)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still in flight are cancelled."""
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        conversation_id: str | None = None,
        prompt: Prompt | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, sent to the server
        metadata: Sequence[tuple[str, str]] = (),
        no_cache: bool = False,
        resumable: bool = False,
    ) -> AsyncIterator[ChatEvent]:
        """Stream one chat reply: `Started`, `TextDelta`*, `Finished`; failures raise.

        `timeout` (seconds) overrides the client's deadline for this call; `metadata` is sent
        with the call in addition to the authorization (e.g. `("x-request-id", ...)`);
        `no_cache` skips the response cache's lookup (HTTP's `Cache-Control: no-cache`);
        `resumable` makes leaving early a dropped connection rather than a Stop: the stream
        goes on for the resume grace, for `resume_chat` (docs/resume.md).
        Raises `PromptlineError`; the call is cancelled whenever the iterator ends early.
        """
        if self._stub is None:
            raise RuntimeError("use the client as `async with PromptlineClient(...)`")
        request = _request(model, messages, max_tokens=max_tokens, temperature=temperature,
                           conversation_id=conversation_id, prompt=prompt, request_id=request_id)
        request.no_cache = no_cache
        request.resumable = resumable
        call = self._stub.StreamChat(request, metadata=self._metadata(metadata),
                                     timeout=self._timeout if timeout is None else timeout)
        async with contextlib.aclosing(_events(call)) as events:  # closed with this one
            async for event in events:
                yield event

    async def resume_chat(
        self,
        request_id: str,
        after_id: int = 0,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, sent to the server
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[ChatEvent]:
        """A stream of this key's tenant again (docs/resume.md): its `Started`, the deltas whose
        `id` is above `after_id`, then the live rest to `Finished`; failures raise (NOT_FOUND:
        unknown or expired). Leaving early never stops the stream."""
        if self._stub is None:
            raise RuntimeError("use the client as `async with PromptlineClient(...)`")
        if not 0 <= after_id <= MAX_DELTA_ID:
            raise invalid(f"after_id must be a delta id from 0 to {MAX_DELTA_ID}, got {after_id}")
        call = self._stub.ResumeChat(
            prompt_pb2.ResumeChatRequest(request_id=request_id, after_id=after_id),
            metadata=self._metadata(metadata),
            timeout=self._timeout if timeout is None else timeout)
        async with contextlib.aclosing(_events(call)) as events:  # closed with this one
            async for event in events:
                yield event

    async def cancel_chat(self, request_id: str, *,
                          metadata: Sequence[tuple[str, str]] = ()) -> bool:
        """Stop a stream of this key's tenant at once, on whichever replica runs it: an
        explicit Stop. False when it had already ended; raises NOT_FOUND when there is none."""
        if self._stub is None:
            raise RuntimeError("use the client as `async with PromptlineClient(...)`")
        try:
            reply = await self._stub.CancelChat(
                prompt_pb2.CancelChatRequest(request_id=request_id),
                metadata=self._metadata(metadata), timeout=CANCEL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise PromptlineError.from_rpc_error(exc) from None
        return reply.cancelled

    def _metadata(self, extra: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._api_key}"), *extra)


async def _events(call: ChatCall | ResumeCall) -> AsyncGenerator[ChatEvent, None]:
    """A call's frames as events; the call is cancelled whenever the iterator ends."""
    try:
        async with contextlib.aclosing(read_frames(call)) as frames:
            async for frame in frames:
                event = _event(frame)
                if event is not None:
                    yield event
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the consumer's own task was cancelled: that goes through
        # grpc.aio cancels calls in flight when their channel closes: a failure, not a cancel
        raise PromptlineError(ErrorCode.CANCELLED, "the client was closed while the stream was "
                              "open") from None
    finally:
        call.cancel()  # consumer stopped early, or the stream failed: end the call now


def _request(model: str, messages: Sequence[MessageLike], *, max_tokens: int | None,
             temperature: float | None, conversation_id: str | None, prompt: Prompt | None,
             request_id: str | None) -> prompt_pb2.StreamChatRequest:
    request = prompt_pb2.StreamChatRequest(
        model=model,
        messages=[_message(m) for m in messages],
        max_tokens=max_tokens or 0,
        conversation_id=conversation_id or "",
        request_id=request_id or "",
    )
    if temperature is not None:
        request.temperature = temperature
    if prompt is not None:
        request.prompt.CopyFrom(prompt_pb2.PromptRef(
            id=prompt.id, version=prompt.version or 0, label=prompt.label or "",
            variables=dict(prompt.variables)))
    return request


def _message(message: MessageLike) -> common_pb2.ChatMessage:
    if isinstance(message, Message):
        return common_pb2.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, tuple):
        role, content = message
        return common_pb2.ChatMessage(role=role, content=content)
    return common_pb2.ChatMessage(role=message["role"], content=message["content"])


def _event(frame: prompt_pb2.StreamChatResponse) -> ChatEvent | None:
    kind = frame.WhichOneof("frame")
    if kind == "delta":
        return TextDelta(frame.delta.text, frame.delta.tokens, frame.delta.id)
    if kind == "start":
        s = frame.start
        return Started(s.request_id, s.model, s.conversation_id, s.prompt_id, s.prompt_version,
                       s.prompt_tokens, s.deployment)
    if kind == "done":
        d = frame.done
        usage = Usage(d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.total_tokens)
        return Finished(d.finish_reason, usage, d.model, d.deployment, d.cached)
    return None  # a frame kind newer than this client: skipped


__all__ = [
    "ChatEvent",
    "Finished",
    "Message",
    "Prompt",
    "PromptlineClient",
    "PromptlineError",
    "Started",
    "TextDelta",
    "Usage",
]

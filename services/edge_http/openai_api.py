"""The OpenAI-compatible API: `POST /v1/chat/completions` (stream and not) and `GET /v1/models`.

Same auth, quotas, timeouts, moderation and cancellation as `POST /v1/chat/stream`: the request
becomes the same `StreamChatRequest` and the same `StreamRelay` carries it, with `ChunkEncoder`
writing OpenAI's `chat.completion.chunk` lines instead of native SSE events. Errors keep OpenAI's
shape so the official clients raise instead of returning a truncated answer: before the stream a
real HTTP status with `{"error": {message, type, code, ...}}`, after it `data: {"error": ...}`
then `data: [DONE]`. A non-streaming request is the same stream aggregated into one
`chat.completion`; nothing is sent before it ends, so any error is a real HTTP status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from promptline.errors import PromptlineError
from promptline.rules import invalid, json_kind
from promptline.streams import DONE, StreamLife, read_frames
from promptline.stubs import ChatCall
from promptline.v1 import common_pb2, prompt_pb2
from services.edge_http import sse
from services.edge_http.chat_request import (
    bool_field,
    cache_bypass,
    chat_request_from,
    decode_json_object,
    read_request_body,
)
from services.edge_http.context import STUB_KEY, Caller, authenticated
from services.edge_http.http_errors import (
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    ORIGIN,
    error_response,
    openai_error_body,
)
from services.edge_http.relay import (
    DEPLOYMENT_HEADER,
    StreamRelay,
    ratelimit_headers,
    usage_data,
)

log = logging.getLogger("promptline.edge_http")

DONE_LINE = b"data: [DONE]\n\n"
# Roles OpenAI clients send that map onto ours; tool calling is not supported.
ROLE_ALIASES = {"developer": "system"}
_UNSUPPORTED_ROLES = frozenset({"tool", "function"})


def add_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes on the edge application."""
    app.router.add_post(CHAT_COMPLETIONS_PATH, chat_completions)
    app.router.add_get(MODELS_PATH, list_models)


def completion_id(request_id: str) -> str:
    """OpenAI-style response id, tied to the request id that appears in logs and traces."""
    return f"chatcmpl-{request_id}"


# --- request -------------------------------------------------------------------------------------


SHAPING_OPTIONS = ("coalesce_ms", "min_chars", "boundary")
"""`stream_options` fields beside OpenAI's `include_usage`: chunk shaping, as on /v1/chat/stream."""


@dataclass(frozen=True, slots=True)
class CompletionOptions:
    """The parts of an OpenAI request that shape the response rather than the generation."""

    stream: bool = False
    include_usage: bool = False
    """`stream_options.include_usage`: a last chunk with `usage` and no choices."""


def parse_completion_request(body: bytes) -> tuple[prompt_pb2.StreamChatRequest, CompletionOptions]:
    """Validate an OpenAI chat-completions body; `user` names the end user (usage, budgets);
    unknown fields (`top_p`, ...) are ignored.

    Content may be a string or an array of `{"type": "text", "text": ...}` parts; `developer`
    messages are system messages. Tool messages, non-text parts and `n` > 1 are rejected with a
    message naming the field.
    """
    data = decode_json_object(body)
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise invalid(f"n must be 1 (one choice per request is supported), got {n!r}")
    stream = data.get("stream") is not None and bool_field(data["stream"], "stream")
    include_usage = False
    stream_options = data.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise invalid("stream_options is only allowed when stream is true")
        if not isinstance(stream_options, dict):
            raise invalid(f"stream_options must be an object, got {json_kind(stream_options)}")
        include_usage = stream_options.get("include_usage") is not None and bool_field(
            stream_options["include_usage"], "stream_options.include_usage")

    native: dict[str, Any] = {"model": data.get("model"),
                              "messages": _messages(data.get("messages"))}
    max_tokens = _max_tokens(data)
    if max_tokens is not None:
        native["max_tokens"] = max_tokens
    # conversation_id and json_validate: Promptline extensions
    for key in ("temperature", "conversation_id", "user", "response_format", "json_validate"):
        if data.get(key) is not None:
            native[key] = data[key]
    if stream_options is not None:  # chunk shaping rides along: a Promptline extension
        shaping = {k: v for k, v in stream_options.items() if k in SHAPING_OPTIONS}
        if shaping:
            native["stream_options"] = shaping
    return chat_request_from(native), CompletionOptions(stream, include_usage)


def _max_tokens(data: dict[str, Any]) -> Any:
    new, old = data.get("max_completion_tokens"), data.get("max_tokens")
    if new is not None and old is not None and new != old:
        raise invalid("give max_completion_tokens or max_tokens, not both")
    return new if new is not None else old


def _messages(value: Any) -> Any:
    """OpenAI messages in the native shape; type errors are left to the native validation."""
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            out.append(item)
            continue
        role = item.get("role")
        if isinstance(role, str):  # a list or an object is left for the native type check
            if role in _UNSUPPORTED_ROLES or item.get("tool_calls"):
                raise invalid(f"messages[{i}]: tool calling is not supported")
            role = ROLE_ALIASES.get(role, role)
        content = item.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _text_parts(parts: list[Any], path: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise invalid(f"{path}[{j}] must be an object, got {json_kind(part)}")
        if part.get("type") != "text":
            raise invalid(f"{path}[{j}].type must be 'text' (only text content is supported), "
                          f"got {part.get('type')!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{path}[{j}].text must be a string, got {json_kind(text)}")
        texts.append(text)
    return "\n".join(texts)


# --- streaming wire ------------------------------------------------------------------------------


class ChunkEncoder:
    """OpenAI's streaming wire: `data: {chat.completion.chunk}` lines, then `data: [DONE]`.

    The first chunk carries the assistant role, the last one the finish reason; with
    `include_usage` every chunk has `"usage": null` and one more chunk with empty `choices`
    carries the usage. Heartbeats are SSE comments, which SSE parsers (the SDK's included) skip.
    """

    content_type = sse.CONTENT_TYPE
    heartbeat = sse.HEARTBEAT

    def __init__(self, request_id: str, model: str, *, include_usage: bool = False,
                 created: int | None = None) -> None:
        self._id = completion_id(request_id)
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created

    def start(self, start: prompt_pb2.ChatStart) -> bytes:
        self._model = start.model or self._model
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, text: str, seq: int) -> bytes:
        return self._chunk({"content": text})

    def done(self, done: common_pb2.Done) -> bytes:
        self._model = done.model or self._model
        out = self._chunk({}, finish_reason=done.finish_reason or "stop", cached=done.cached)
        if self._include_usage:
            out += _data(self._envelope([], usage=usage_data(done.usage)))
        return out + DONE_LINE

    def error(self, err: PromptlineError) -> bytes:
        return _data(openai_error_body(err)) + DONE_LINE

    def error_body(self, err: PromptlineError) -> dict[str, Any]:
        return openai_error_body(err)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
               cached: bool = False) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = self._envelope([choice])
        if cached:  # a Promptline extension, only on a replayed reply's last chunk
            chunk["cached"] = True
        return _data(chunk)

    def _envelope(self, choices: list[dict[str, Any]], *,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": self._id, "object": "chat.completion.chunk",
                                 "created": self._created, "model": self._model,
                                 "choices": choices}
        if self._include_usage:
            chunk["usage"] = usage
        return chunk


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# --- handlers ------------------------------------------------------------------------------------


@authenticated
async def chat_completions(request: web.Request, caller: Caller) -> web.StreamResponse:
    """POST /v1/chat/completions: the body, then a chunk stream or one aggregated completion."""
    config = caller.config
    rid = caller.request_id
    chat, options = parse_completion_request(
        await read_request_body(request, config.edge.max_body_bytes))
    chat.request_id = rid
    chat.no_cache = cache_bypass(request.headers.getall("Cache-Control", ()))
    call = request.app[STUB_KEY].StreamChat(chat, metadata=caller.metadata,
                                            timeout=config.edge.request_timeout)
    if not options.stream:
        return await _complete(request, call, caller, chat.model)
    encoder = ChunkEncoder(rid, chat.model, include_usage=options.include_usage)
    relay = StreamRelay(request, config, rid, model=chat.model, encoder=encoder,
                        endpoint="chat_completions")
    return await relay.run(call, header_hold=config.edge.header_hold)


async def _complete(request: web.Request, call: ChatCall, caller: Caller, model: str
                    ) -> web.Response:
    """Aggregate the whole stream into one `chat.completion`; an error at any point is HTTP.

    A client that disconnects cancels this handler, and `read_frames` cancels the call.
    """
    rid = caller.request_id
    life = StreamLife(ORIGIN, model, rid, logger=log, label=caller.config.model_label(model))
    life.fields["endpoint"] = "chat_completions"
    texts: list[str] = []
    done: common_pb2.Done | None = None
    try:
        async with contextlib.aclosing(
                read_frames(call, end_first=False)) as frames:  # done before the quota settles
            async for frame in frames:
                kind = frame.WhichOneof("frame")
                if kind == "start":
                    model = frame.start.model or model
                elif kind == "delta":
                    life.text_delivered()
                    texts.append(frame.delta.text)
                elif kind == "done":
                    done = frame.done
        life.outcome = DONE
    except PromptlineError as err:
        life.failed(err, count=False)  # error_response counts it
        headers = await ratelimit_headers(call, rejected=bool(err.quota_subject))
        return error_response(err, rid, headers=headers,
                              body=openai_error_body)
    finally:
        life.fields["deltas"] = len(texts)
        life.finish()
    assert done is not None  # read_frames ends with `done` or raises
    completion = {
        "id": completion_id(rid),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": done.model or model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(texts)},
            "logprobs": None,
            "finish_reason": done.finish_reason or "stop",
        }],
        "usage": usage_data(done.usage),
    }
    if done.cached:  # a Promptline extension: replayed from the response cache
        completion["cached"] = True
    headers = {**await ratelimit_headers(call), "X-Request-Id": rid}
    if done.deployment:
        headers[DEPLOYMENT_HEADER] = done.deployment
    return web.json_response(completion, headers=headers)


@authenticated
async def list_models(request: web.Request, caller: Caller) -> web.Response:
    """GET /v1/models: the configured models and routes this caller's tenant may use, in OpenAI's
    shape (a route is a name a client may send as `model`, so pickers list it too)."""
    config = caller.config
    models = [
        {"id": name, "object": "model", "created": 0, "owned_by": "promptline"}
        for name in (*(m.name for m in config.models), *(r.name for r in config.routes))
        if caller.tenant.may_use(name)
    ]
    return web.json_response({"object": "list", "data": models},
                             headers={"X-Request-Id": caller.request_id})

"""Request bytes that do not decode become a typed INVALID_REQUEST, not gRPC's bare INTERNAL.

grpc.aio parses the request before any handler runs; a message that is not valid protobuf, or
holds invalid UTF-8 in a string field, would otherwise end the call with INTERNAL ("Exception
deserializing request"). This interceptor parses leniently and answers such a call the way every
other bad request is answered: an error frame (streams) and INVALID_ARGUMENT with rich details.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import descriptor_pool, message, message_factory

from promptline.errors import ErrorCode, PromptlineError, Stage
from promptline.streams import Context, ErrorFrameType, abort_unary, error_frame

# Every RPC's handler passes through: their messages are not known here. (Strings: grpc's
# classes are generic in its stubs only.)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# grpc's stubs type a handler's behaviours as the sync server's; grpc.aio runs coroutines and
# async generators.
UnaryBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
StreamBehavior: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"


class _Malformed:
    """Stands in for a request whose bytes did not parse."""


def _malformed_error() -> PromptlineError:
    return PromptlineError(
        ErrorCode.INVALID_REQUEST,
        "the request message could not be decoded (not valid protobuf, or invalid UTF-8 in a "
        "string field)", stage=Stage.CONNECT)


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError and kin: reported to the caller as INVALID_REQUEST
            return _Malformed()
    return deserialize


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Wraps unary-request handlers (all of Promptline's) with a lenient deserializer."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = _lenient(handler.request_deserializer)
        if handler.response_streaming:
            frame_type = _response_class(handler_call_details.method)
            behavior = cast(StreamBehavior, handler.unary_stream)

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    make_frame: ErrorFrameType[message.Message | None] = frame_type or _NoFrame
                    frame = error_frame(context, _malformed_error(), make_frame)
                    if frame_type is not None:
                        yield frame
                    return
                async for response in behavior(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=parse,
                response_serializer=handler.response_serializer)

        unary = cast(UnaryBehavior, handler.unary_unary)

        async def unary_unary(request: Any, context: Context) -> Any:
            if isinstance(request, _Malformed):
                await abort_unary(context, _malformed_error())
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=parse,
            response_serializer=handler.response_serializer)


def _response_class(method: str) -> ErrorFrameType[message.Message] | None:
    """The stream message of a Promptline RPC (one with an `error` frame), else None."""
    try:
        service, name = method.strip("/").rsplit("/", 1)
        descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except (KeyError, ValueError):
        return None
    if "error" not in descriptor.output_type.fields_by_name:
        return None  # e.g. grpc.health.v1.Health/Watch: the status alone tells
    # A message class with an `error` field: `cls(error=...)` is its error frame (the stub of
    # `Message` declares no constructor).
    return cast(ErrorFrameType[message.Message],
                message_factory.GetMessageClass(descriptor.output_type))


def _NoFrame(**_: Any) -> None:
    """For streams without an error frame: only the status is set."""
    return None

"""The gRPC half of the front: a message-size limit before tritonserver 2.51's gRPC sees a message.

Why it exists: tritonserver 2.51 has no flag for gRPC's maximum message size. It takes messages
of up to 2 GB and copies every input into the python-backend stubs' shared memory before any
model code can refuse it, so one client can make the server's memory grow by gigabytes per
request. The launcher therefore runs this proxy on the public gRPC port, in the front's process
and event loop (adrenaline_py/serving/front.py), with tritonserver's own gRPC on loopback on an
internal port.

A message larger than ``max_message_bytes`` ends its call with RESOURCE_EXHAUSTED ("Received
message larger than max ...") from gRPC itself, before the proxy reads it. Everything else is
forwarded as bytes, never parsed: every method of any service (``inference.GRPCInferenceService``,
``grpc.health.v1.Health``) is proxied, the request metadata is forwarded (the API key's
``triton-grpc-protocol-*`` header included), upstream errors come back with their status code,
details and trailing metadata, and a client's cancel or deadline reaches tritonserver.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

import grpc

log = logging.getLogger("adrenaline.front")

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # gRPC's own default; a prompt is far smaller

# Streaming methods by their full name; every other method is unary (one message each way).
_STREAM_STREAM = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer",
                            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"})
_UNARY_STREAM = frozenset({"/grpc.health.v1.Health/Watch"})
# Metadata that describes the client's connection or call, not the request: gRPC sets it anew.
_NOT_FORWARDED = frozenset({"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding",
                            "grpc-timeout", "accept-encoding"})
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() or ()
                 if not k.startswith(":") and k not in _NOT_FORWARDED)


class GrpcProxy(grpc.GenericRpcHandler):
    """Forwards every call to ``upstream`` (host:port) as bytes."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.channel = grpc.aio.insecure_channel(upstream, options=_UNLIMITED)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        # partial, not a lambda: grpc.aio tells coroutine and async-generator handlers apart by inspecting them
        method = details.method
        if method in _STREAM_STREAM:
            return grpc.stream_stream_rpc_method_handler(functools.partial(self._stream, method))
        if method in _UNARY_STREAM:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._unary_stream, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        call = self.channel.unary_unary(method)(request, metadata=_metadata(context),
                                                timeout=context.time_remaining())
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            await _abort_with(context, e)
        finally:
            call.cancel()  # a no-op once the call ended; ends it when this handler was cancelled

    async def _unary_stream(self, method: str, request: bytes,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self.channel.unary_stream(method)(request, metadata=_metadata(context),
                                                 timeout=context.time_remaining())
        async for response in _relay(call, context):
            yield response

    async def _stream(self, method: str, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self.channel.stream_stream(method)(metadata=_metadata(context), timeout=context.time_remaining())

        async def forward_requests() -> None:
            try:
                async for request in requests:
                    await call.write(request)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                # the upstream call ended first (its error reaches the client through the responses),
                # or the client's stream failed (its call is being cancelled)
                log.debug("grpc front: stream %s stopped forwarding requests: %s", method, e)

        pump = asyncio.create_task(forward_requests())
        try:
            async for response in _relay(call, context):
                yield response
        finally:
            pump.cancel()

    async def close(self) -> None:
        await self.channel.close()


async def _relay(call, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """The upstream call's responses, then its status; the call ends with the client's (cancel, exit)."""
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as e:
        await _abort_with(context, e)
    finally:
        call.cancel()  # the client cancelled or left: tritonserver's call ends too


async def _abort_with(context: grpc.aio.ServicerContext, error: grpc.aio.AioRpcError) -> None:
    """End the client's call with the upstream call's status (abort raises)."""
    code = error.code()
    if code == grpc.StatusCode.CANCELLED and context.cancelled():
        return  # the client cancelled: nobody is left to tell
    await context.abort(code, error.details() or "", error.trailing_metadata() or ())


async def start_grpc_front(host: str, port: int, upstream: str,
                           max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.aio.Server, GrpcProxy]:
    """Listen on host:port and forward to ``upstream``; raises OSError when the port cannot be bound."""
    proxy = GrpcProxy(upstream)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((proxy,))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises where older versions returned 0
        bound, why = 0, e
    else:
        why = None
    if bound == 0:
        await proxy.close()
        raise OSError(f"cannot listen on {address} for gRPC{f': {why}' if why else ''}")
    await server.start()
    return server, proxy

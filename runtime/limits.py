"""Bounds on what one client can make the server hold, besides admission (server.py).

  request size         --max_request_bytes, gRPC's max_receive_message_length: a bigger
                       message is refused by gRPC itself with RESOURCE_EXHAUSTED before
                       it is parsed. It also bounds what the size of a message alone
                       cannot: the number of chat messages and their characters. The
                       OpenAI HTTP API refuses a bigger body with 413, unread.
  streams/connection   --max_streams_per_connection Generate/GenerateUnary calls in
                       flight on one connection (HTTP/2 transport, told apart by
                       context.peer(): "ipv4:10.0.0.7:53122"); one more is refused at
                       once with RESOURCE_EXHAUSTED. HTTP/2's own
                       SETTINGS_MAX_CONCURRENT_STREAMS would not do: clients queue calls
                       past it silently, so the caller never learns why it waits. (The
                       HTTP API speaks HTTP/1.1: one request at a time per connection.)
  per request          stop strings, request id: see `request_problem`. The context
                       (prompt + max_tokens <= max_model_len) and logprobs (<= the
                       engine's num_top_logprobs) are checked in server.make_request
                       and Orchestrator.validate.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable

import grpc

# The orchestrator searches every new piece of text for each stop string and holds back
# the last (longest stop - 1) characters of the stream until they cannot start a stop:
# the count bounds the per-token work on the engine thread, shared by every request,
# and the length bounds how far the stream lags. 16 is four times what the OpenAI API
# allows; 256 characters is longer than any stop marker in use (chat templates' end
# markers are under 32).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# Every response of a stream carries the request id back: a long one multiplies the
# bytes sent per token. 256 holds any UUID or trace id.
MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 256  # a tenant's prefix-cache salt
# Streams HTTP/2 allows per connection, beyond --max_streams_per_connection: room for
# the short calls (Abort, Tokenize, GetModelInfo, health) a client makes while its
# generation streams are at the cap, so those are not queued behind them.
TRANSPORT_STREAMS_HEADROOM = 32


def request_problem(request_id: str, cache_salt: str, stop) -> tuple[str, str] | None:
    """What in a request exceeds the caps above: (the field at fault, a message for the
    client), or None. Both front ends (gRPC, the OpenAI HTTP API) ask it."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return "request_id", f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        return "cache_salt", f"cache_salt has {len(cache_salt)} characters; at most {MAX_CACHE_SALT_CHARS}"
    if len(stop) > MAX_STOP_STRINGS:
        return "stop", f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}"
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        return "stop", f"a stop string has {longest} characters; at most {MAX_STOP_STRING_CHARS}"
    return None


class StreamsPerConnection(grpc.aio.ServerInterceptor):
    """Counts the calls of `methods` (full paths, "/pkg.Service/Method") in flight per
    connection and refuses one beyond `limit` with RESOURCE_EXHAUSTED; `on_refuse`
    counts the refusals. Counting and checking run on the event loop with no await
    between them, so concurrent calls cannot both take the last place."""

    def __init__(self, limit: int, methods: Iterable[str], on_refuse: Callable[[], None] = lambda: None):
        self.limit = limit
        self.methods = frozenset(methods)
        self.on_refuse = on_refuse
        self.in_flight: dict[str, int] = {}  # peer -> calls of `methods` in flight

    def _enter(self, peer: str) -> bool:
        n = self.in_flight.get(peer, 0)
        if n >= self.limit:
            return False
        self.in_flight[peer] = n + 1
        return True

    def _exit(self, peer: str) -> None:
        n = self.in_flight[peer] - 1
        if n:
            self.in_flight[peer] = n
        else:
            del self.in_flight[peer]  # closed connections leave nothing behind

    async def _refuse(self, context) -> None:
        self.on_refuse()
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this connection has {self.in_flight.get(context.peer(), 0)} generation calls in flight, the "
            f"server's max_streams_per_connection={self.limit}; wait for one to finish or use another connection",
        )

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler
        kinds = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request, context):
                peer = context.peer()
                if not self._enter(peer):
                    await self._refuse(context)
                try:
                    return await behavior(request, context)
                finally:
                    self._exit(peer)

            return grpc.unary_unary_rpc_method_handler(unary, **kinds)
        if handler.unary_stream:
            behavior = handler.unary_stream

            async def stream(request, context):
                peer = context.peer()
                if not self._enter(peer):
                    await self._refuse(context)
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        # aclosing: a call that ends early closes the handler's generator
                        # now (its `finally` aborts the request), not when it is collected.
                        async with contextlib.aclosing(result) as responses:
                            async for response in responses:
                                yield response
                    else:  # a handler that writes with context.write
                        await result
                finally:
                    self._exit(peer)

            return grpc.unary_stream_rpc_method_handler(stream, **kinds)
        raise TypeError(f"{handler_call_details.method}: only unary requests can be counted per connection")

"""Message classes and gRPC glue of the xlserve.v1.Generation service.

The classes come from the checked-in descriptor (see runtime/proto/__init__.py): the
file is added to protobuf's default pool, where server reflection finds it, and each
message class is built from its descriptor. `GenerationStub` works on a sync
(`grpc.insecure_channel`) or an asyncio (`grpc.aio.insecure_channel`) channel alike;
`add_generation_servicer` registers a servicer's methods, which receive the request as
raw bytes (`REQUEST_TYPES` says which message each one parses) so that a malformed
request, such as invalid UTF-8 in a string field, can be answered with
INVALID_ARGUMENT instead of the INTERNAL that a failing deserializer gives.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, message_factory

from runtime.proto.generation_descriptor import SERIALIZED

PACKAGE = "xlserve.v1"
SERVICE_NAME = f"{PACKAGE}.Generation"

_pool = descriptor_pool.Default()
try:
    _pool.FindFileByName("xlserve/v1/generation.proto")
except KeyError:
    _pool.AddSerializedFile(SERIALIZED)
FILE = _pool.FindFileByName("xlserve/v1/generation.proto")


def _message(name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ChatMessage = _message("ChatMessage")
Chat = _message("Chat")
TokenIds = _message("TokenIds")
SamplingParams = _message("SamplingParams")
GenerateRequest = _message("GenerateRequest")
TopLogprob = _message("TopLogprob")
TokenLogprobs = _message("TokenLogprobs")
Usage = _message("Usage")
Timings = _message("Timings")
GenerateResponse = _message("GenerateResponse")
TokenizeRequest = _message("TokenizeRequest")
TokenizeResponse = _message("TokenizeResponse")
DetokenizeRequest = _message("DetokenizeRequest")
DetokenizeResponse = _message("DetokenizeResponse")
GetModelInfoRequest = _message("GetModelInfoRequest")
ModelConfig = _message("ModelConfig")
Capacity = _message("Capacity")
Load = _message("Load")
ModelInfo = _message("ModelInfo")
AbortRequest = _message("AbortRequest")
AbortResponse = _message("AbortResponse")


class FinishReason:
    """The FinishReason enum's numbers, and their names as the orchestrator spells them."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    BY_NAME = {"stop": STOP, "length": LENGTH, "abort": ABORT}
    NAMES = {v: k for k, v in BY_NAME.items()}


# method name -> (request class, response class, server-streaming)
METHODS = {
    "Generate": (GenerateRequest, GenerateResponse, True),
    "GenerateUnary": (GenerateRequest, GenerateResponse, False),
    "Tokenize": (TokenizeRequest, TokenizeResponse, False),
    "Detokenize": (DetokenizeRequest, DetokenizeResponse, False),
    "GetModelInfo": (GetModelInfoRequest, ModelInfo, False),
    "Abort": (AbortRequest, AbortResponse, False),
}
REQUEST_TYPES = {name: req for name, (req, _, _) in METHODS.items()}


def method_path(name: str) -> str:
    return f"/{SERVICE_NAME}/{name}"


class GenerationStub:
    """Client callables, one per method, on a sync or an asyncio channel."""

    def __init__(self, channel):
        for name, (req, resp, streaming) in METHODS.items():
            make = channel.unary_stream if streaming else channel.unary_unary
            setattr(self, name, make(
                method_path(name), request_serializer=req.SerializeToString, response_deserializer=resp.FromString
            ))


def add_generation_servicer(servicer, server) -> None:
    """Registers `servicer`'s methods (named as in METHODS) on a grpc or grpc.aio server.
    Each method gets the serialized request (bytes) and returns or yields messages."""
    handlers = {}
    for name, (_, resp, streaming) in METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=None,
                              response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: skips the generic lookup
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

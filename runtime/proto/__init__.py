"""xlserve's gRPC API: xlserve/v1/generation.proto and what Python builds from it.

`runtime.proto.generation` holds the message classes and the client/server glue.
They are built at import from a serialized FileDescriptorProto checked in as
`generation_descriptor.py` (written by `python -m runtime.proto.build` with
grpcio-tools), not from protoc's generated `_pb2.py` modules: generated code asserts
that the protobuf and grpcio runtimes are at least as new as the protoc that wrote it,
while a descriptor is plain wire data that every protobuf runtime reads (4.25 on: the floor in pyproject.toml).
"""

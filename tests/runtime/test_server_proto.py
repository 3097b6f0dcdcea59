"""The checked-in descriptor matches generation.proto, and the classes built from it."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2

from runtime.proto import generation as pb
from runtime.proto.generation_descriptor import SERIALIZED


def test_descriptor_is_in_sync_with_the_proto():
    pytest.importorskip("grpc_tools")
    from runtime.proto.build import compile_descriptor

    want = descriptor_pb2.FileDescriptorProto.FromString(compile_descriptor())
    have = descriptor_pb2.FileDescriptorProto.FromString(SERIALIZED)
    assert want == have, "generation_descriptor.py is stale: run python -m runtime.proto.build"


def test_classes_and_service():
    service = pb.FILE.services_by_name["Generation"]
    assert service.full_name == pb.SERVICE_NAME
    for method in service.methods:
        req, resp, streaming = pb.METHODS[method.name]
        assert method.input_type is req.DESCRIPTOR and method.output_type is resp.DESCRIPTOR
        assert method.server_streaming == streaming and not method.client_streaming
    assert set(pb.METHODS) == {m.name for m in service.methods}
    enum = pb.FILE.enum_types_by_name["FinishReason"]
    assert {v.name: v.number for v in enum.values} == {
        "FINISH_REASON_UNSPECIFIED": 0, "FINISH_REASON_STOP": pb.FinishReason.STOP,
        "FINISH_REASON_LENGTH": pb.FinishReason.LENGTH, "FINISH_REASON_ABORT": pb.FinishReason.ABORT,
    }
    # proto3 optional: unset and set-to-default are told apart (the server's defaults)
    r = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingParams(temperature=0.0))
    r2 = pb.GenerateRequest.FromString(r.SerializeToString())
    assert r2.sampling.HasField("temperature") and not r2.sampling.HasField("top_p")
    assert r2.WhichOneof("input") == "token_ids" and list(r2.token_ids.ids) == [1, 2]

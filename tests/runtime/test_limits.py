"""What one client can make the server hold (runtime/limits.py, server._build_request):
request size, context, logprobs, stop strings, request ids, and generation calls per
connection, each refused with its status code and the numbers, before admission.

The tiny engine of test_server.py: context 128, num_top_logprobs 3.
"""

from __future__ import annotations

import grpc
import pytest

from runtime.bench_serving import num_connections
from runtime.client import Client
from runtime.limits import MAX_REQUEST_ID_CHARS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from runtime.proto import generation as pb
from runtime.server import ServerConfig
from tests.runtime.server_harness import ECFG, collect, metric, serve, wait_for

Code = grpc.StatusCode
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels to one target otherwise share one


def _refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_request_size_is_capped_by_grpc(engine, tokenizer):
    with serve(engine, tokenizer, ServerConfig(max_request_bytes=16 * 1024)) as h:
        assert h.info().capacity.max_request_bytes == 16 * 1024
        code, details = _refused(lambda: h.client.generate_unary("word " * 4000, max_tokens=1))  # 20 kB
        assert code == Code.RESOURCE_EXHAUSTED and "larger than max" in details and "16384" in details
        # Chat messages: bounded by the same bytes, however many.
        chat = [{"role": "user", "content": "hi"}] * 3000
        code, _ = _refused(lambda: h.client.generate_unary(messages=chat, max_tokens=1))
        assert code == Code.RESOURCE_EXHAUSTED
        code, _ = _refused(lambda: h.client.tokenize(messages=chat))
        assert code == Code.RESOURCE_EXHAUSTED
        # Under the cap, the request goes through to the usual checks.
        out = h.client.generate_unary("word " * 20, max_tokens=2, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 2
    with pytest.raises(ValueError, match="max_request_bytes=100 must be in"):
        ServerConfig(max_request_bytes=100)


def test_context_logprobs_stop_and_absurd_values_are_invalid_argument(engine, tokenizer):
    limit = ECFG.max_model_len
    with serve(engine, tokenizer) as h:
        def details(**kw) -> str:
            code, text = _refused(lambda: h.client.generate_unary(**kw))
            assert code == Code.INVALID_ARGUMENT, (kw, code, text)
            return text

        # prompt + max_tokens over the context: every number, and what to ask instead.
        text = details(token_ids=[5] * 100, max_tokens=29)
        assert f"prompt (100 tokens) + max_tokens (29) = 129 exceeds the context of {limit} tokens" in text
        assert "ask for at most 28 tokens" in text
        text = details(token_ids=[5] * 100, max_tokens=2**31 - 1)
        assert f"= {100 + 2**31 - 1} exceeds the context of {limit}" in text
        # A prompt that fills the context alone.
        text = details(token_ids=[5] * limit)
        assert f"the prompt has {limit} tokens; the context holds {limit}" in text
        assert "128 tokens" in details(token_ids=[5] * limit, max_tokens=1)
        # The largest that fits: the prompt, and one generated token.
        assert len(h.client.generate_unary(token_ids=[5] * (limit - 1), temperature=0.0).token_ids) == 1

        assert "num_top_logprobs=3" in details(prompt="hi", logprobs=4)
        assert "logprobs=-1 is out of range" in details(prompt="hi", logprobs=-1)
        assert "logprobs=1000000" in details(prompt="hi", logprobs=10**6)
        assert "max_tokens=-5 must be at least 1" in details(prompt="hi", max_tokens=-5)
        assert "top_k=-1" in details(prompt="hi", top_k=-1)
        assert "seed" in details(prompt="hi", seed=2**64 - 1)

        text = details(prompt="hi", stop=["x"] * (MAX_STOP_STRINGS + 1))
        assert f"{MAX_STOP_STRINGS + 1} stop strings; at most {MAX_STOP_STRINGS}" in text
        text = details(prompt="hi", stop=["ok", "y" * (MAX_STOP_STRING_CHARS + 1)])
        assert f"{MAX_STOP_STRING_CHARS + 1} characters; at most {MAX_STOP_STRING_CHARS}" in text
        text = details(prompt="hi", request_id="r" * (MAX_REQUEST_ID_CHARS + 1))
        assert f"request_id has {MAX_REQUEST_ID_CHARS + 1} characters; at most {MAX_REQUEST_ID_CHARS}" in text
        # Every cap, met exactly, is allowed.
        stops = [f"{i:02d}" + "z" * (MAX_STOP_STRING_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
        out = h.client.generate_unary(prompt="hi", max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=3,
                                      stop=stops, request_id="r" * MAX_REQUEST_ID_CHARS)
        assert len(out.token_ids) == 3 and len(out.top_logprobs[0].top) == 3
        assert out.request_id == "r" * MAX_REQUEST_ID_CHARS
        assert metric(h, "xlserve_requests_rejected_total", code="INVALID_ARGUMENT") == 13
        assert h.info().load.num_in_flight == 0


def test_generation_calls_per_connection_are_capped(engine, tokenizer):
    config = ServerConfig(max_streams_per_connection=3)
    long = dict(token_ids=[7, 8, 9], max_tokens=100, temperature=0.0, ignore_eos=True)
    with serve(engine, tokenizer, config, slow=True) as h:
        assert h.info().capacity.max_streams_per_connection == 3
        streams = [h.client.generate(**long, request_id=f"s{i}") for i in range(3)]
        for s in streams:
            next(s)  # each is in flight
        with Client(h.target) as same:  # another channel, the same connection
            code, text = _refused(lambda: same.generate_unary(**long))
            assert code == Code.RESOURCE_EXHAUSTED
            assert "this connection has 3 generation calls in flight" in text
            assert "max_streams_per_connection=3" in text
            code, _ = _refused(lambda: collect(h.client.generate(**long)))
            assert code == Code.RESOURCE_EXHAUSTED
            # Short calls on the full connection go on; so do other connections.
            assert h.client.tokenize("hi") == tokenizer.encode("hi")
            assert h.client.health() == "SERVING" and h.info().load.num_in_flight == 3
        with Client(h.target, options=OWN_CONNECTION) as other:
            assert len(other.generate_unary(token_ids=[5], max_tokens=2, ignore_eos=True).token_ids) == 2
        assert metric(h, "xlserve_requests_rejected_total", code="RESOURCE_EXHAUSTED") == 2
        # A place frees when a call ends (here, cancelled), and the next one is admitted.
        streams[0].cancel()
        wait_for(lambda: sum(h.server.streams_per_connection.in_flight.values()) == 2)
        assert collect(h.client.generate(token_ids=[5], max_tokens=2, ignore_eos=True))["finals"] == 1
        h.client.abort("s1")
        for s in streams[1:]:
            assert collect(s)["finals"] == 1
        wait_for(lambda: h.server.num_in_flight == 0)
        assert h.server.streams_per_connection.in_flight == {}
    with pytest.raises(ValueError, match="max_streams_per_connection=0 must be >= 1"):
        ServerConfig(max_streams_per_connection=0)


def test_bench_serving_spreads_over_enough_connections():
    assert num_connections(200, None, 64) == 4
    assert num_connections(200, 16, 64) == 1 and num_connections(64, None, 64) == 1
    assert num_connections(65, None, 64) == 2
    assert num_connections(10, None, 0) == 1  # a server that reports no cap
    assert pb.Capacity(max_streams_per_connection=5).max_streams_per_connection == 5


def test_text_that_cannot_fit_is_refused_before_tokenizing(engine, tokenizer):
    """Tokenizing runs on the event loop: megabytes of text are refused by their length."""
    limit = ECFG.max_model_len * tokenizer.max_token_chars * 4
    with serve(engine, tokenizer) as h:
        for call in (lambda: h.client.generate_unary("a" * (limit + 1), max_tokens=1),
                     lambda: h.client.tokenize("a" * (limit + 1))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(limit) in e.value.details()
        assert len(h.client.tokenize("a" * 100)) > 0

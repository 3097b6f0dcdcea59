"""The gRPC server in-process on a free port, through the real gRPC clients.

One tiny random model (the SmolLM2 tokenizer's vocabulary, so text paths run for real;
float32 so batched and alone compute the same numbers) and one warmed engine serve
every test; each test starts its own GenerationServer over it. The KV cache is small
(40 pages of 8 tokens for 8 slots of up to 128 tokens), so concurrent streams are
preempted and recomputed. Tests that need requests to stay in flight slow the loop
with an orchestrator whose step sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.client import AsyncClient, build_request
from runtime.metrics import ServerMetrics
from runtime.orchestrator import Orchestrator
from runtime.proto import generation as pb
from runtime.server import GenerationServer, ServerConfig
from tests.runtime.server_harness import (
    ECFG, NUM_PAGES, Harness, acollect, collect, metric, serve, wait_for,
)

Code = grpc.StatusCode


# --- readiness, health, reflection, model info ---------------------------------------


def test_health_not_serving_until_warm_then_reflection_and_info(engine, tokenizer):
    release = threading.Event()

    def load():
        release.wait(60)
        return engine, tokenizer

    with serve(engine, tokenizer, load=load, wait=False) as h:
        health = health_pb2_grpc.HealthStub(h.client.channel)
        for service in ("", pb.SERVICE_NAME):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            collect(h.client.generate("hello", max_tokens=2))
        assert e.value.code() == Code.UNAVAILABLE and "loading" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            h.info()
        assert e.value.code() == Code.UNAVAILABLE
        release.set()
        h.client.wait_until_serving(60)
        assert h.client.health(pb.SERVICE_NAME) == "SERVING"

        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        db = ProtoReflectionDescriptorDatabase(h.client.channel)
        assert {pb.SERVICE_NAME, "grpc.health.v1.Health"} <= set(db.get_services())
        file = db.FindFileContainingSymbol(pb.SERVICE_NAME)
        assert file.name == "xlserve/v1/generation.proto"
        assert [m.name for m in file.service[0].method] == list(pb.METHODS)

        info = h.info()
        assert info.model == "tiny" and info.has_tokenizer and info.has_chat_template
        assert info.config.vocab_size == tokenizer.vocab_size and info.config.family == "llama"
        assert info.max_model_len == ECFG.max_model_len
        assert info.capacity.max_num_seqs == 8 and info.capacity.num_pages == NUM_PAGES
        assert info.capacity.page_size == 8 and info.capacity.max_queue == 128
        assert list(info.eos_token_ids) == sorted(set(tokenizer.eos_ids) | {2})
        assert info.special_tokens["eos_token"] == tokenizer.eos_ids[0]
        assert info.load.num_pages_free == NUM_PAGES and info.load.num_running == 0
        assert info.load.num_compiles_since_ready == 0


# --- many streams == alone -----------------------------------------------------------


def mixed_requests(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """Greedy and seeded requests with every sampling knob, text and token-id input."""
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "which"]
    reqs = []
    for i in range(n):
        sampling = [
            dict(temperature=0.0),
            dict(temperature=0.9, seed=100 + i),
            dict(temperature=1.2, seed=200 + i, logprobs=2),
            dict(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, seed=300 + i),
        ][i % 4]
        max_tokens = int(rng.integers(8, 48))
        # top-k/p and min-p sort the vocabulary of every slot in each step they run (slow
        # on CPU): a few short ones.
        if i % 16 == 6:
            sampling.update(top_p=0.8, min_p=0.05)
            max_tokens = 6
        elif i % 16 == 13:
            sampling.update(top_k=20)
            max_tokens = 6
        if i % 3 == 0:
            text = " ".join(rng.choice(words, int(rng.integers(3, 30))))
            req = dict(prompt=text)
        else:
            req = dict(token_ids=rng.integers(3, 2000, int(rng.integers(1, 60))).tolist())
        if i % 8 == 5:
            req["stop"] = ["e", "th"]  # stops early, mid-token most likely
        reqs.append(dict(req, request_id=f"r{i}", max_tokens=max_tokens, ignore_eos=i % 2 == 0, **sampling))
    return reqs


def test_64_concurrent_streams_equal_each_alone(engine, tokenizer):
    reqs = mixed_requests(64, tokenizer)
    with serve(engine, tokenizer) as h:
        alone = {r["request_id"]: collect(h.client.generate(**r)) for r in reqs}
        assert h.info().load.num_preemptions == 0  # one request always fits

        async def together():
            async with AsyncClient(h.target) as c:
                order = np.random.default_rng(1).permutation(len(reqs))
                outs = await asyncio.gather(*(acollect(c.generate(**reqs[i])) for i in order))
                return {reqs[i]["request_id"]: out for i, out in zip(order, outs)}

        batched = asyncio.run(together())
        info = h.info()
        assert info.load.num_preemptions > 0, "the test meant to run under KV-page pressure"
        assert info.load.num_pages_used == 0 and info.load.num_in_flight == 0
        assert info.load.num_compiles_since_ready == 0
        assert metric(h, "xlserve_compilations_total") == 0
        assert metric(h, "xlserve_preemptions_total") == info.load.num_preemptions
    for r in reqs:
        a, b = alone[r["request_id"]], batched[r["request_id"]]
        assert a["finals"] == 1 and b["finals"] == 1
        assert b["ids"] == a["ids"], r
        assert b["text"] == a["text"] and b["reason"] == a["reason"]
        assert b["usage"].completion_tokens == len(b["ids"])
        if r.get("logprobs") is not None:
            np.testing.assert_allclose(b["logprobs"], a["logprobs"], rtol=1e-4, atol=1e-4)
        if "stop" not in r and r["ignore_eos"]:
            assert a["reason"] == "length" and len(a["ids"]) == r["max_tokens"]
    # The text streamed in pieces is the text the ids add to the prompt's (incremental
    # detokenization; special tokens skipped).
    for r in reqs:
        a = alone[r["request_id"]]
        if "stop" not in r:
            prompt = r["token_ids"] if "token_ids" in r else tokenizer.encode(r["prompt"])
            whole = tokenizer.decode(prompt + a["ids"], skip_special_tokens=True)
            assert a["text"] == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)):], r


def test_unary_equals_stream_and_fields(engine, tokenizer):
    with serve(engine, tokenizer) as h:
        kw = dict(prompt="Hello world", max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
        s = collect(h.client.generate(**kw))
        u = h.client.generate_unary(**kw)
        assert list(u.token_ids) == s["ids"] and u.text == s["text"]
        assert pb.FinishReason.NAMES[u.finish_reason] == "length" == s["reason"]
        assert len(u.logprobs) == 12 and len(u.top_logprobs) == 12 and len(u.top_logprobs[0].top) == 3
        # the greedy token is the most likely one
        assert [step.top[0].token_id for step in u.top_logprobs] == list(u.token_ids)
        ids = tokenizer.encode("Hello world")
        assert u.usage.prompt_tokens == len(ids) and u.usage.completion_tokens == 12 and u.usage.cached_tokens == 0
        t = u.timings
        assert 0 <= t.queue_s <= t.ttft_s <= t.e2e_s and t.decode_s <= t.e2e_s
        assert u.request_id  # made by the server
        # token ids in == the same text in; no logprobs unless asked
        v = h.client.generate_unary(token_ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True)
        assert list(v.token_ids) == s["ids"] and not v.logprobs
        # chat input renders the model's template
        chat = [{"role": "user", "content": "Hi"}]
        c = h.client.generate_unary(messages=chat, max_tokens=3, temperature=0.0, ignore_eos=True)
        want = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
        assert c.usage.prompt_tokens == len(want)
        assert h.client.tokenize(messages=chat) == want
        assert h.client.tokenize("Hello world") == ids
        assert h.client.detokenize(ids, skip_special_tokens=True) == "Hello world"
        # unset max_tokens: up to the end of the context
        full = h.client.generate_unary(token_ids=[5] * 100, temperature=0.0, ignore_eos=True)
        assert len(full.token_ids) == 28 and pb.FinishReason.NAMES[full.finish_reason] == "length"


# --- cancellation, deadline, Abort ---------------------------------------------------


def test_cancel_deadline_and_abort_free_slots_and_pages(engine, tokenizer):
    long = dict(token_ids=list(range(10, 20)), max_tokens=110, temperature=0.0, ignore_eos=True)
    keep = dict(token_ids=list(range(30, 45)), max_tokens=90, temperature=0.8, seed=7, ignore_eos=True)
    with serve(engine, tokenizer, slow=True) as h:
        want = collect(h.client.generate(**keep, request_id="ref"))
        results = {}

        def run(name, **kw):
            try:
                results[name] = collect(h.client.generate(**kw))
            except grpc.RpcError as e:
                results[name] = e.code()

        keeper = threading.Thread(target=run, args=("keep",), kwargs=dict(keep, request_id="keep"))
        deadline = threading.Thread(target=run, args=("deadline",), kwargs=dict(long, request_id="d", timeout=1.0))
        keeper.start()
        deadline.start()
        # Cancelled by the client mid-stream.
        cancelled = h.client.generate(**long, request_id="c")
        next(cancelled), next(cancelled)
        # Aborted by name mid-stream: the stream ends with ABORT, once.
        aborted = h.client.generate(**long, request_id="a")
        first = next(aborted)
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(**long, request_id="a")  # the id is in use
        assert e.value.code() == Code.ALREADY_EXISTS
        wait_for(lambda: h.info().load.num_running == 4)
        cancelled.cancel()
        h.client.abort("a")
        rest = collect(aborted)
        assert rest["finals"] == 1 and rest["reason"] == "abort"
        assert rest["usage"].completion_tokens == len(first.token_ids) + len(rest["ids"]) < 110
        with pytest.raises(grpc.RpcError) as e:
            h.client.abort("a")  # finished now
        assert e.value.code() == Code.NOT_FOUND and "'a'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            h.client.abort("never-was")
        assert e.value.code() == Code.NOT_FOUND
        # Cancelled and aborted requests are gone within a step; the others run on.
        wait_for(lambda: h.info().load.num_running == 2, timeout=2.0)
        assert metric(h, "xlserve_requests_aborted_total", reason="cancelled") == 1
        assert metric(h, "xlserve_requests_aborted_total", reason="abort_rpc") == 1
        deadline.join(30)
        assert results["deadline"] == Code.DEADLINE_EXCEEDED
        wait_for(lambda: h.info().load.num_running <= 1, timeout=2.0)
        assert metric(h, "xlserve_requests_aborted_total", reason="deadline") == 1
        info = h.info()
        if info.load.num_running == 1:  # the keeper, alone: its pages only
            assert info.load.num_pages_used <= -(-(15 + 90) // 8)
            assert metric(h, "xlserve_num_requests_running") <= 1
        keeper.join(30)
        assert results["keep"]["ids"] == want["ids"] and results["keep"]["finals"] == 1
        wait_for(lambda: h.info().load.num_in_flight == 0)
        info = h.info()
        assert info.load.num_pages_used == 0 and info.load.num_pages_free == NUM_PAGES
        assert metric(h, "xlserve_kv_pages_used") == 0
        assert metric(h, "xlserve_requests_finished_total", finish_reason="abort") == 3


# --- overload ------------------------------------------------------------------------


def test_overload_is_refused_at_once_and_nothing_is_lost(engine, tokenizer):
    config = ServerConfig(max_queue=2)  # 8 slots + 2 waiting
    with serve(engine, tokenizer, config, slow=True) as h:

        async def burst():
            async with AsyncClient(h.target) as c:
                async def one(i):
                    t = time.monotonic()
                    try:
                        res = await acollect(c.generate(token_ids=[5 + i, 6, 7], max_tokens=40, temperature=0.0,
                                                        ignore_eos=True, request_id=f"o{i}"))
                        return i, res, time.monotonic() - t
                    except grpc.aio.AioRpcError as e:
                        return i, e, time.monotonic() - t
                return await asyncio.gather(*(one(i) for i in range(16)))

        outcomes = asyncio.run(burst())
        ok = [(i, r) for i, r, _ in outcomes if isinstance(r, dict)]
        refused = [(r, dt) for _, r, dt in outcomes if not isinstance(r, dict)]
        assert len(ok) == 10 and len(refused) == 6
        for err, dt in refused:
            assert err.code() == Code.RESOURCE_EXHAUSTED and "max_queue=2" in err.details()
            assert dt < 1.0  # at once, not after the queue moved
        for i, r in ok:
            assert r["finals"] == 1 and r["reason"] == "length" and len(r["ids"]) == 40
        assert metric(h, "xlserve_requests_rejected_total", code="RESOURCE_EXHAUSTED") == 6
        assert metric(h, "xlserve_requests_finished_total", finish_reason="length") == 10
        assert h.info().load.num_in_flight == 0

    budget = ServerConfig(max_pending_tokens=100)
    with serve(engine, tokenizer, budget, slow=True) as h:
        first = h.client.generate(token_ids=[5] * 10, max_tokens=50, temperature=0.0, ignore_eos=True)
        next(first)
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[6] * 10, max_tokens=50)
        assert e.value.code() == Code.RESOURCE_EXHAUSTED and "token budget" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[6] * 10, max_tokens=95)
        assert e.value.code() == Code.INVALID_ARGUMENT and "whole budget" in e.value.details()
        assert collect(first)["reason"] == "length"
        assert len(h.client.generate_unary(token_ids=[6] * 10, max_tokens=50, ignore_eos=True).token_ids) == 50


# --- bad input ---------------------------------------------------------------------------

BAD = [
    (dict(prompt="hi", temperature=-1.0), Code.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="hi", top_p=0.0), Code.INVALID_ARGUMENT, "top_p"),
    (dict(prompt="hi", top_k=-2), Code.INVALID_ARGUMENT, "top_k"),
    (dict(prompt="hi", min_p=1.5), Code.INVALID_ARGUMENT, "min_p"),
    (dict(prompt="hi", repetition_penalty=0.0), Code.INVALID_ARGUMENT, "repetition_penalty"),
    (dict(prompt="hi", presence_penalty=3.0), Code.INVALID_ARGUMENT, "presence_penalty"),
    (dict(prompt="hi", temperature=float("nan")), Code.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="hi", seed=2**63), Code.INVALID_ARGUMENT, "seed"),
    (dict(prompt="hi", logprobs=5), Code.INVALID_ARGUMENT, "num_top_logprobs"),
    (dict(prompt="hi", max_tokens=0), Code.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", stop=[""]), Code.INVALID_ARGUMENT, "stop string is empty"),
    (dict(prompt=""), Code.INVALID_ARGUMENT, "empty"),
    (dict(token_ids=[]), Code.INVALID_ARGUMENT, "empty"),
    (dict(messages=[]), Code.INVALID_ARGUMENT, "no messages"),
    (dict(token_ids=[5] * 100, max_tokens=29), Code.INVALID_ARGUMENT, "exceeds the context"),
    (dict(token_ids=[5] * 128), Code.INVALID_ARGUMENT, "context holds"),
    (dict(token_ids=[5, 10**6]), Code.INVALID_ARGUMENT, "out of range"),
    (dict(token_ids=[5, -1]), Code.INVALID_ARGUMENT, "out of range"),
    (dict(token_ids=[5], stop_token_ids=[-3]), Code.INVALID_ARGUMENT, "stop_token_ids"),
]


def test_bad_inputs_get_their_code_and_the_server_keeps_serving(engine, tokenizer):
    with serve(engine, tokenizer) as h:
        for kwargs, code, text in BAD:
            for method in (lambda **kw: collect(h.client.generate(**kw)), h.client.generate_unary):
                with pytest.raises(grpc.RpcError) as e:
                    method(**kwargs)
                assert e.value.code() == code and text in e.value.details(), (kwargs, e.value.details())
        # No input at all, and invalid UTF-8 in a string field (a raw request: the
        # Python client cannot build one).
        raw = h.client.channel.unary_unary(pb.method_path("GenerateUnary"), request_serializer=None,
                                           response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            raw(pb.GenerateRequest().SerializeToString())
        assert e.value.code() == Code.INVALID_ARGUMENT and "no input" in e.value.details()
        bad_utf8 = build_request("h\xe9llo").SerializeToString().replace("h\xe9llo".encode(), b"h\xe9llo")
        with pytest.raises(grpc.RpcError) as e:
            raw(bad_utf8)
        assert e.value.code() == Code.INVALID_ARGUMENT and "UTF-8" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            h.client.detokenize([10**7])
        assert e.value.code() == Code.INVALID_ARGUMENT and "out of range" in e.value.details()
        assert metric(h, "xlserve_requests_rejected_total", code="INVALID_ARGUMENT") == 2 * len(BAD) + 3
        out = h.client.generate_unary("still serving", max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 3
        assert h.info().load.num_in_flight == 0


class FaultyOrchestrator(Orchestrator):
    """Stand-ins for real faults: adding a prompt that starts with 13 raises, and so
    does the next step after a prompt that starts with 99 is added."""

    fail_next_step = False

    def add_request(self, request):
        if request.prompt_ids[0] == 13:
            raise RuntimeError("injected fault in add_request")
        super().add_request(request)
        if request.prompt_ids[0] == 99:
            self.fail_next_step = True

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected fault in step")
        return super().step()


def test_internal_fault_fails_only_that_request(engine, tokenizer):
    with serve(engine, tokenizer, factory=FaultyOrchestrator) as h:
        good = h.client.generate(token_ids=[14, 15], max_tokens=20, temperature=0.0, ignore_eos=True)
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[13, 15], max_tokens=5)
        assert e.value.code() == Code.INTERNAL and "injected" in e.value.details()
        assert collect(good)["reason"] == "length"
        assert metric(h, "xlserve_requests_failed_total") == 1
        # A step that fails fails the requests in flight; the server serves on.
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[99, 16], max_tokens=5)
        assert e.value.code() == Code.INTERNAL and "engine step failed" in e.value.details()
        assert metric(h, "xlserve_requests_failed_total") == 2
        out = h.client.generate_unary(token_ids=[14, 16], max_tokens=5, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 5
        assert h.client.health() == "SERVING"
        assert h.info().load.num_pages_used == 0


# --- drain -----------------------------------------------------------------------------


def test_drain_finishes_in_flight_and_refuses_new(engine, tokenizer):
    with serve(engine, tokenizer, slow=True) as h:
        streams = [h.client.generate(token_ids=[20 + i, 21], max_tokens=30, temperature=0.0, ignore_eos=True)
                   for i in range(3)]
        for s in streams:
            next(s)
        drained = h.submit(h.server.drain(timeout_s=30))
        wait_for(lambda: h.client.health() == "NOT_SERVING", timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[5], max_tokens=2)
        assert e.value.code() == Code.UNAVAILABLE and "draining" in e.value.details()
        for s in streams:
            rest = collect(s)
            assert rest["finals"] == 1 and rest["reason"] == "length" and rest["usage"].completion_tokens == 30
        drained.result(30)
        assert metric(h, "xlserve_ready") == 0

    with serve(engine, tokenizer, slow=True) as h:
        stream = h.client.generate(token_ids=[20, 21], max_tokens=110, temperature=0.0, ignore_eos=True)
        next(stream)
        drained = h.submit(h.server.drain(timeout_s=0.2))
        rest = collect(stream)
        assert rest["finals"] == 1 and rest["reason"] == "abort"
        drained.result(30)
        assert metric(h, "xlserve_requests_aborted_total", reason="drain") == 1


# --- metrics over HTTP ----------------------------------------------------------------


def test_metrics_endpoint(engine, tokenizer, tmp_path):
    step_log = tmp_path / "steps.jsonl"
    metrics = ServerMetrics(step_log=str(step_log))
    gc.unfreeze()  # an earlier server in this process froze the heap: the server must do it again
    port = metrics.serve(0, addr="127.0.0.1")
    server = GenerationServer(lambda: (engine, tokenizer), ServerConfig(), metrics=metrics)
    h = Harness(server)
    try:
        h.call(server.wait_ready(60))
        # After warm-up the engine thread moved the heap out of the collector's reach
        # (runtime.startup.freeze_heap), collecting first: one full collection timed.
        assert gc.get_freeze_count() > 0
        out = h.client.generate_unary(token_ids=[5, 6, 7], max_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 6
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        h.close()
    # The first output may carry two tokens (the prefill's and the first decode step's,
    # read in one step): the inter-token latencies are those of the later outputs.
    assert ("xlserve_inter_token_latency_seconds_count 5.0" in body
            or "xlserve_inter_token_latency_seconds_count 4.0" in body)
    for name in ("xlserve_time_to_first_token_seconds_count 1.0",
                 "xlserve_e2e_request_latency_seconds_count 1.0", "xlserve_request_queue_time_seconds_count 1.0",
                 "xlserve_prompt_tokens_total 3.0", "xlserve_generation_tokens_total 6.0",
                 "xlserve_num_requests_running 0.0", "xlserve_num_requests_waiting 0.0", "xlserve_kv_pages_used 0.0",
                 f"xlserve_kv_pages_total {float(NUM_PAGES)}", "xlserve_preemptions_total 0.0",
                 'xlserve_requests_aborted_total{reason="cancelled"} 0.0', "xlserve_requests_failed_total 0.0",
                 "xlserve_compilations_total 0.0", 'xlserve_engine_step_seconds_count{kind="prefill+decode"} 1.0',
                 "xlserve_engine_step_prefill_tokens_sum 3.0", 'xlserve_gc_pause_seconds_count{generation="2"}'):
        assert name in body, name
    # The step log (closed with the server): one line per step, the prompt's prefill first
    # (the completed prompt decodes in the same step), then decode steps; every token leaves
    # in some step.
    steps = [json.loads(line) for line in step_log.read_text().splitlines()]
    assert steps[0]["kind"] == "prefill+decode" and steps[0]["prefill_tokens"] == 3 and steps[0]["decode_seqs"] == 1
    assert {s["kind"] for s in steps[1:]} == {"decode"}
    assert all(s["decode_seqs"] == 1 and s["decode_rows"] >= 1 and s["prefill_tokens"] == 0 for s in steps[1:])
    assert sum(s["tokens_out"] for s in steps) == 6
    assert [s["t_ms"] for s in steps] == sorted(s["t_ms"] for s in steps) and all(s["ms"] > 0 for s in steps)
    assert all(s["gc_ms"] >= 0 for s in steps)
    # The step's phases split its host time (each rounded to 1 us): every step after the
    # first read the previous one's results.
    phases = ("schedule_ms", "dispatch_ms", "wait_ms", "process_ms")
    assert all(min(s[p] for p in phases) >= 0 and sum(s[p] for p in phases) <= s["ms"] + 0.01 for s in steps)
    assert all(s["wait_ms"] > 0 for s in steps[1:]) and all(s["dispatch_ms"] > 0 for s in steps)
    assert f'xlserve_engine_step_seconds_count{{kind="decode"}} {float(len(steps) - 1)}' in body


def test_checkpoint_sampling_defaults_fill_unset_fields(engine, tokenizer):
    """generation_config.json defaults (Engine.sampling_defaults) apply to the fields a
    request leaves unset, never over the ones it sets; GetModelInfo reports them."""
    engine.sampling_defaults = {"temperature": 0.0, "top_p": 0.5}
    try:
        with serve(engine, tokenizer) as h:
            assert dict(h.info().sampling_defaults) == {"temperature": 0.0, "top_p": 0.5}
            unset = h.server._build_request(build_request(token_ids=[5, 6], max_tokens=2)).sampling
            assert unset.temperature == 0.0 and unset.top_p == 0.5 and unset.top_k == 0
            given = h.server._build_request(build_request(token_ids=[5, 6], max_tokens=2, temperature=0.7)).sampling
            assert given.temperature == 0.7 and given.top_p == 0.5
            greedy = h.client.generate_unary(token_ids=[5, 6], max_tokens=6, ignore_eos=True)
            explicit = h.client.generate_unary(token_ids=[5, 6], max_tokens=6, ignore_eos=True, temperature=0.0)
            assert list(greedy.token_ids) == list(explicit.token_ids)
    finally:
        engine.sampling_defaults = {}


def test_step_trace_writes_a_summary(engine, tokenizer, tmp_path):
    """--profile_dir / --profile_steps (runtime.profile.StepTrace): steps 1-2 after warm-up
    are traced and summarized; serving goes on (all tokens arrive). On CPU the summary
    says the trace has no device events."""
    from runtime.profile import StepTrace

    trace = StepTrace(str(tmp_path / "prof"), 1, 2)
    server = GenerationServer(lambda: (engine, tokenizer), ServerConfig(), step_trace=trace)
    h = Harness(server)
    try:
        h.call(server.wait_ready(60))
        out = h.client.generate_unary(token_ids=[5, 6, 7], max_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 6
    finally:
        h.close()
    assert trace.done
    summary = (tmp_path / "prof" / "summary.txt").read_text()
    assert summary.startswith("steps 1-2\n")
    with pytest.raises(ValueError, match="start=0 count=0"):
        StepTrace(str(tmp_path), 0, 0)


def test_prefix_caching_through_the_server(engine, tokenizer):
    """With prefix caching on, a chat request resending the same system prompt reuses
    its pages: Usage.cached_tokens counts them, the text is that of the first (uncached)
    request, and another cache_salt shares nothing; GetModelInfo says caching is on."""
    import dataclasses

    plain_ecfg = engine.ecfg
    engine.ecfg = dataclasses.replace(plain_ecfg, enable_prefix_caching=True)  # host-side only on this engine
    system = ("You are a careful assistant for a small bakery. Answer in one short sentence, politely, "
              "and never invent prices or opening hours.")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Do you sell rye bread?"}]
    try:
        with serve(engine, tokenizer) as h:
            assert h.info().capacity.prefix_caching
            first = h.client.generate_unary(messages=messages, max_tokens=8, temperature=0.0)
            again = h.client.generate_unary(messages=messages, max_tokens=8, temperature=0.0)
            other = h.client.generate_unary(messages=messages, max_tokens=8, temperature=0.0, cache_salt="tenant-b")
            bad = None
            try:
                h.client.generate_unary(messages=messages, max_tokens=2, cache_salt="x" * 257)
            except grpc.RpcError as e:
                bad = e
    finally:
        engine.ecfg = plain_ecfg
    prompt_tokens = first.usage.prompt_tokens
    assert first.usage.cached_tokens == 0 and other.usage.cached_tokens == 0
    # Whole pages, short of the last prompt token (it runs for the first logits).
    assert again.usage.cached_tokens == (prompt_tokens - 1) // ECFG.page_size * ECFG.page_size > 0
    assert again.text == first.text == other.text and list(again.token_ids) == list(first.token_ids)
    assert bad is not None and bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in bad.details()

"""One request's fault never fails the others: injected faults on each path.

Paths: turning a request's tokens into text (the incremental detokenizer), stop strings,
a broken chat template, the server's per-output callback, and the engine's compiled
calls (at dispatch and when their results are read). Each fault ends its own request
(INTERNAL over gRPC, an error output in the orchestrator) while the others finish with
the tokens they get alone, every page comes back and the server keeps SERVING. Only
engine calls that keep failing take the engine for broken.
"""

from __future__ import annotations

import copy

import grpc
import numpy as np
import pytest

import runtime.orchestrator as orchestrator_module
from runtime.detokenize import IncrementalDetokenizer
from runtime.engine_thread import EngineLoop
from runtime.orchestrator import Orchestrator, Request
from runtime.sampling import SamplingParams
from tests.runtime.server_harness import collect, metric, serve, wait_for

Code = grpc.StatusCode
GREEDY = SamplingParams(temperature=0.0)
MARK = 13  # prompts that start with this id get the injected fault


class FaultyDetokenizer(IncrementalDetokenizer):
    """Raises on the third generated token of a prompt that starts with MARK."""

    def __init__(self, tokenizer, prompt_ids=(), **kwargs):
        super().__init__(tokenizer, prompt_ids, **kwargs)
        self._faulty = list(prompt_ids)[:1] == [MARK]
        self._pushed = 0

    def push(self, token_id):
        self._pushed += 1
        if self._faulty and self._pushed == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return super().push(token_id)


class StopStringFault(Orchestrator):
    """Stop-string matching raises for requests whose stop strings include "boom"."""

    def _truncate_at_stop_string(self, track):
        if "boom" in track.request.stop:
            raise RuntimeError("injected stop-string fault")
        return super()._truncate_at_stop_string(track)


class FlakyEngine:
    """The engine, whose decode calls raise while `fail_decodes` > 0 (at dispatch, or,
    with `at_read`, when the host reads the results: a call that failed on the device)."""

    def __init__(self, engine, fail_decodes=0, at_read=False):
        self._engine = engine
        self.fail_decodes = fail_decodes
        self.at_read = at_read

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def decode(self, page_table, mode="filter"):
        if self.fail_decodes <= 0:
            return self._engine.decode(page_table, mode=mode)
        self.fail_decodes -= 1
        if not self.at_read:
            raise RuntimeError("injected fault in the decode call")
        out = self._engine.decode(page_table, mode=mode)
        return {**out, "tokens": _FailsOnRead()}


class _FailsOnRead:
    def copy_to_host_async(self):
        pass

    def __array__(self, *args, **kwargs):
        raise RuntimeError("injected device fault surfacing at read")


def run(orc, requests, *, results=None):
    """Adds `requests`, steps until no work is left; every request's ids, finish reason
    and error (also of requests added before)."""
    for r in requests:
        orc.add_request(r)
    results = {} if results is None else results
    while orc.has_work():
        record(results, orc.step())
    assert orc.allocator.num_used == 0, "pages did not come back"
    return results


def record(results, outputs):
    for out in outputs:
        res = results.setdefault(out.request_id, dict(ids=[], error=None, reason=None))
        res["ids"] += out.token_ids
        if out.finished:
            res.update(reason=out.finish_reason, error=out.error)


def alone(engine, tokenizer, request):
    return run(Orchestrator(engine, tokenizer), [request])[request.request_id]


def _req(rid, prompt, n=8, **kw):
    return Request(request_id=rid, prompt_ids=prompt, sampling=GREEDY, max_tokens=n, ignore_eos=True, **kw)


def test_detokenizer_fault_fails_that_request_alone(engine, tokenizer, monkeypatch):
    monkeypatch.setattr(orchestrator_module, "IncrementalDetokenizer", FaultyDetokenizer)
    good = [_req("a", [20, 21, 22]), _req("c", [40, 41], n=12)]
    expected = {r.request_id: alone(engine, tokenizer, r)["ids"] for r in good}
    res = run(Orchestrator(engine, tokenizer), [good[0], _req("bad", [MARK, 30, 31]), good[1]])
    assert res["bad"]["reason"] == "error" and "injected detokenizer fault" in res["bad"]["error"]
    for r in good:
        assert res[r.request_id]["reason"] == "length" and res[r.request_id]["ids"] == expected[r.request_id]


def test_stop_string_fault_fails_that_request_alone(engine, tokenizer):
    good = _req("a", [20, 21, 22], stop=("zzzz",))
    expected = alone(engine, tokenizer, good)["ids"]
    res = run(StopStringFault(engine, tokenizer), [good, _req("bad", [30, 31], stop=("boom",))])
    assert res["bad"]["reason"] == "error" and "stop-string fault" in res["bad"]["error"]
    assert res["a"]["reason"] == "length" and res["a"]["ids"] == expected


@pytest.mark.parametrize("at_read", [False, True], ids=["at_dispatch", "at_read"])
def test_failed_engine_call_fails_only_its_requests(engine, tokenizer, at_read):
    flaky = FlakyEngine(engine, fail_decodes=1, at_read=at_read)
    orc = Orchestrator(flaky, tokenizer)
    for r in (_req("a", [20, 21]), _req("b", [30, 31])):
        orc.add_request(r)
    results = {}
    while flaky.fail_decodes:  # until the failing decode call has been made
        record(results, orc.step())
    late = _req("late", [40, 41, 42])  # arrives after the failing call: not part of it
    res = run(orc, [late], results=results)
    assert {rid for rid, r in res.items() if r["reason"] == "error"} == {"a", "b"}
    assert all("injected" in res[rid]["error"] for rid in ("a", "b"))
    assert res["late"]["reason"] == "length" and res["late"]["ids"] == alone(engine, tokenizer, late)["ids"]
    assert orc.consecutive_call_failures == 0  # the later calls worked


# --- through the server ---------------------------------------------------------------


def test_server_request_faults_fail_alone(engine, tokenizer, monkeypatch):
    monkeypatch.setattr(orchestrator_module, "IncrementalDetokenizer", FaultyDetokenizer)
    on_output = EngineLoop._on_output

    def raising_callback(self, out, now, events):  # the server's per-output callback
        if out.request_id == "callback-fault":
            raise RuntimeError("injected callback fault")
        return on_output(self, out, now, events)

    monkeypatch.setattr(EngineLoop, "_on_output", raising_callback)
    with serve(engine, tokenizer, slow=True) as h:
        good = h.client.generate(token_ids=[20, 21], max_tokens=30, temperature=0.0, ignore_eos=True)
        next(good)  # running while the faults happen
        faults = [
            (dict(token_ids=[MARK, 5, 6]), "injected detokenizer fault"),
            (dict(token_ids=[7, 8], stop=["x"], request_id="callback-fault"), "injected callback fault"),
        ]
        for kwargs, text in faults:
            with pytest.raises(grpc.RpcError) as e:
                h.client.generate_unary(max_tokens=5, temperature=0.0, ignore_eos=True, **kwargs)
            assert e.value.code() == Code.INTERNAL and text in e.value.details()
        rest = collect(good)
        assert rest["finals"] == 1 and rest["reason"] == "length" and rest["usage"].completion_tokens == 30
        assert metric(h, "xlserve_requests_failed_total") == 2
        assert h.client.health() == "SERVING"
        wait_for(lambda: h.info().load.num_pages_used == 0)


def test_server_broken_chat_template_is_internal_for_that_request(engine, tokenizer):
    broken = copy.copy(tokenizer)
    broken._chat_template = "{{ messages | length // 0 }}"
    with serve(engine, broken) as h:
        for call in (lambda: h.client.generate_unary(messages=[{"role": "user", "content": "hi"}], max_tokens=2),
                     lambda: h.client.tokenize(messages=[{"role": "user", "content": "hi"}])):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == Code.INTERNAL and "chat template" in e.value.details()
        assert metric(h, "xlserve_requests_rejected_total", code="INTERNAL") == 2
        out = h.client.generate_unary("plain text still works", max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 3 and h.client.health() == "SERVING"


def test_server_engine_call_faults(engine, tokenizer):
    flaky = {}

    def factory(engine, tok):
        flaky["engine"] = FlakyEngine(engine)
        return Orchestrator(flaky["engine"], tok)

    with serve(engine, tokenizer, factory=factory) as h:
        flaky["engine"].fail_decodes = 1
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary(token_ids=[20, 21], max_tokens=5, temperature=0.0)
        assert e.value.code() == Code.INTERNAL and "decode call failed" in e.value.details()
        out = h.client.generate_unary(token_ids=[20, 21], max_tokens=5, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 5 and h.client.health() == "SERVING"
        wait_for(lambda: h.info().load.num_pages_used == 0)
        # Calls that keep failing: the engine is broken, the server stops serving.
        flaky["engine"].fail_decodes = 10**6
        # (3 failed calls in a row suffice; up to 6 requests, because once, on a loaded 2-core
        # machine running the suite on two processes, 3 left the server SERVING: cause unknown.)
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as e:
                h.client.generate_unary(token_ids=[20, 21], max_tokens=5, temperature=0.0)
            if e.value.code() == Code.UNAVAILABLE or h.client.health() == "NOT_SERVING":
                break
        wait_for(lambda: h.client.health() == "NOT_SERVING", timeout=30.0)
        assert "engine calls failed in a row" in repr(h.server.fatal)
        flaky["engine"].fail_decodes = 0
    assert np.all(np.asarray(engine.slots.lengths) == 0)

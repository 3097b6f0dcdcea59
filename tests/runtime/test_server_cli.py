"""runtime.serve, runtime.client and runtime.bench_serving as a user runs them.

The server serves `--checkpoint=preset:tiny-llama` (random weights, no tokenizer: token
ids in, no text out), which starts in seconds. SIGTERM drains it: in-flight requests
finish, the exit code is 0.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from runtime.bench_serving import (
    Result, arrival_gaps, full_batch_decode_throughput, parse_slos, sample_lengths, summarize,
)
from runtime.client import Client
from tests.runtime.server_harness import serve_subprocess

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}


def _run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=timeout)


@pytest.fixture
def server():
    with serve_subprocess(
        "--checkpoint=preset:tiny-llama", "--port=0", "--metrics_port=0", "--max_model_len=256",
        "--prefill_lengths=16,64", "--max_num_seqs=4", "--decode_batch_sizes=4", "--dtype=float32", "--page_size=8",
        "--max_queue=8", "--enable_prefix_caching", "--gil_switch_interval_ms=0.5",
        env=ENV, cwd=ROOT, wait_serving=False, timeout=120,
    ) as srv:
        yield srv.proc, {"port": srv.port, "metrics": srv.metrics_port}, srv.lines


def test_serve_client_bench_and_sigterm_drain(server):
    proc, ports, lines = server
    target = f"localhost:{ports['port']}"
    with Client(target) as client:
        client.wait_until_serving(180)
        info = client.model_info()
        assert not info.has_tokenizer and info.model == "preset:tiny-llama (random weights)"
        with pytest.raises(grpc.RpcError) as e:
            client.generate_unary("text needs a tokenizer", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "token_ids" in e.value.details()

        p = _run("runtime.client", f"--target={target}", "--token_ids=1,2,3", "--max_tokens=5", "--ignore_eos")
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.split()) == 5
        assert "finish_reason=length" in p.stderr and "completion_tokens=5" in p.stderr
        p = _run("runtime.client", f"--target={target}", "--token_ids=1,2,3", "--max_tokens=1000")
        assert p.returncode == 1 and "INVALID_ARGUMENT" in p.stderr and "context" in p.stderr

        p = _run("runtime.bench_serving", f"--target={target}", "--num_prompts=12", "--input_len=20",
                 "--output_len=10", "--range_ratio=0.5", "--request_rate=100", "--max_concurrency=6",
                 "--slo=ttft:10000,tpot:10000", f"--json_out={Path('/tmp') / f'bench-{os.getpid()}.json'}")
        assert p.returncode == 0, p.stderr
        assert "Successful requests:" in p.stdout and "Request goodput (req/s):" in p.stdout
        summary = json.loads((Path("/tmp") / f"bench-{os.getpid()}.json").read_text())
        assert summary["completed"] == 12 and summary["failed"] == 0
        assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])
        per = summary["requests"]  # each request, in the order sent
        assert len(per) == 12 and per[0]["sent_s"] == 0 and all(a["sent_s"] <= b["sent_s"] for a, b in zip(per, per[1:]))
        assert all(r["ttft_ms"] > 0 and r["output_len"] >= 1 and r["error"] is None for r in per)
        assert sum(r["output_len"] for r in per) == summary["total_output_tokens"]
        assert statistics.median(r["ttft_ms"] for r in per) == pytest.approx(summary["ttft_ms"]["median"], abs=0.01)
        p = _run("runtime.bench_serving", f"--target={target}", "--num_prompts=6", "--dataset=sharegpt")
        assert p.returncode == 0 and "Successful requests:                    6" in p.stdout, p.stdout + p.stderr
        # Shared system prompts (--enable_prefix_caching on this server): one at a time,
        # so every request after the first of its prefix finds the prefix's 4 full pages
        # (and the first of prefix 0 the 2 its warm-up request, 16 tokens of it, left).
        out = Path("/tmp") / f"bench-prefix-{os.getpid()}.json"
        p = _run("runtime.bench_serving", f"--target={target}", "--dataset=prefix", "--num_prefixes=2",
                 "--prefix_len=33", "--input_len=6", "--output_len=3", "--num_prompts=6", "--max_concurrency=1",
                 f"--json_out={out}")
        assert p.returncode == 0 and "Prompt tokens from the prefix cache:" in p.stdout, p.stdout + p.stderr
        summary = json.loads(out.read_text())
        assert summary["prefix_caching"] and summary["total_input_tokens"] == 6 * 39
        assert summary["cached_token_share"] == pytest.approx((16 + 4 * 32) / (6 * 39))
        # Two conversations of 3 turns (10-token messages, 5-token answers): prompts of 10,
        # 25 and 40 tokens; each turn finds the full pages of the history whose KV the
        # previous turn wrote (its answer but the last token): 0, 8 and 24 tokens, and
        # conversation 0's first turn the page its warm-up request (the same 10 tokens) left.
        p = _run("runtime.bench_serving", f"--target={target}", "--dataset=multiturn", "--num_turns=3",
                 "--num_prompts=6", "--input_len=10", "--output_len=5", f"--json_out={out}")
        assert p.returncode == 0, p.stdout + p.stderr
        summary = json.loads(out.read_text())
        assert summary["completed"] == 6 and summary["total_input_tokens"] == 2 * (10 + 25 + 40)
        assert summary["cached_token_share"] == pytest.approx((8 + 2 * (8 + 24)) / 150)
        # The same conversations with a salt per request (the uncached baseline): nothing
        # shared, also in a second run of the same prompts (the salts are new each run).
        for _ in range(2):
            p = _run("runtime.bench_serving", f"--target={target}", "--dataset=multiturn", "--num_turns=3",
                     "--num_prompts=6", "--input_len=10", "--output_len=5", "--cache_salt=unique", f"--json_out={out}")
            assert p.returncode == 0, p.stdout + p.stderr
            summary = json.loads(out.read_text())
            assert summary["completed"] == 6 and summary["cache_salt"] == "unique"
            assert summary["cached_token_share"] == 0 and "Prompt tokens from the prefix cache:" not in p.stdout

        body = urllib.request.urlopen(f"http://localhost:{ports['metrics']}/metrics", timeout=5).read().decode()
        assert "xlserve_requests_finished_total" in body and "xlserve_ready 1.0" in body
        # The start-up breakdown: logged at SERVING and exported per phase.
        startup = next(line for line in lines if "xlserve: start-up: " in line)
        for phase in ("devices", "weights", "engine", "warm-up"):
            assert f" {phase} " in startup, startup
            assert f'xlserve_startup_seconds{{phase="{phase}"}}' in body
        assert "programs: " in startup and "GB/s" in startup and "after the process started" in startup
        assert 'xlserve_startup_seconds{phase="total"}' in body and "xlserve_startup_weight_bytes" in body

        # SIGTERM while a stream runs: it finishes, then the server exits 0.
        stream = client.generate(token_ids=[1, 2, 3], max_tokens=250, temperature=0.0, ignore_eos=True)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].finish_reason == 2  # LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 250
    assert proc.wait(60) == 0, "".join(lines)
    assert any("draining" in line for line in lines) and any("stopped" in line for line in lines)


def test_serve_flag_errors_exit_2():
    p = _run("runtime.serve", "--checkpoint=preset:no-such-model", "--port=0")
    assert p.returncode == 2 and "no-such-model" in p.stderr and "not a preset" in p.stderr
    p = _run("runtime.serve", "--checkpoint=/no/such/checkpoint", "--port=0")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ") and "/no/such" in p.stderr
    assert "Traceback" not in p.stderr
    p = _run("runtime.serve", "--port=0")
    assert p.returncode == 2 and "--checkpoint is required" in p.stderr
    p = _run("runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0", "--step_log=/no/such/dir/steps.jsonl")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --step_log=/no/such/dir")
    assert "Traceback" not in p.stderr
    p = _run("runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0", "--profile_dir=/tmp/x", "--profile_steps=5")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --profile_steps=5: want START,COUNT")
    p = _run("runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0", "--gil_switch_interval_ms=0")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "error: --gil_switch_interval_ms=0.0 must be in (0, 1000]"
    p = _run("runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0", "--startup=progressive", "--aot_dir=/tmp/x")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --startup=progressive")
    p = _run("runtime.bench_serving", "--slo=ttfb:10")
    assert p.returncode == 2 and "ttft, tpot, e2el" in p.stderr


def test_bench_serving_definitions():
    """TTFT, TPOT (excluding the first token), ITL, E2EL, throughput and goodput as
    vLLM's benchmark defines them, on hand-made timings."""
    a = Result(prompt_len=10, success=True, output_len=5, ttft=0.1, e2el=0.5, itl=[0.1, 0.1, 0.1, 0.1])
    b = Result(prompt_len=20, success=True, output_len=1, ttft=0.3, e2el=0.3)
    c = Result(prompt_len=7, success=False, error="RESOURCE_EXHAUSTED")
    s = summarize([a, b, c], duration=2.0, slos=parse_slos(["ttft:200", "tpot:150"]))
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 6
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 18.0
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; b has no TPOT
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0) and s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["itl_ms"]["p99"] == pytest.approx(100.0) and s["e2el_ms"]["mean"] == pytest.approx(400.0)
    assert s["request_goodput"] == 0.5  # a meets both SLOs; b's TTFT is 300 ms
    assert s["full_batch_decode_throughput"] is None  # b has a single response: no decode window

    # Decode with every stream active: from the last first token (t=2) to the first last
    # token (t=5); responses at t <= 2 or after 5 are outside, one at t=5 is inside.
    x = Result(prompt_len=1, success=True, output_len=9, arrivals=[(1.0, 1), (2.0, 2), (3.0, 2), (5.0, 2), (6.0, 2)])
    y = Result(prompt_len=1, success=True, output_len=5, arrivals=[(2.0, 1), (4.0, 1), (5.0, 3)])
    assert full_batch_decode_throughput([x, y]) == pytest.approx((2 + 2 + 1 + 3) / 3.0)
    z = Result(prompt_len=1, success=True, output_len=2, arrivals=[(5.5, 1), (7.0, 1)])  # starts after x.. y end
    assert full_batch_decode_throughput([x, y, z]) is None
    assert summarize([x, y], duration=6.0, slos={})["full_batch_decode_throughput"] == pytest.approx(8 / 3)
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = sample_lengths(1000, rng, dataset="sharegpt", input_len=0, output_len=0, range_ratio=0, max_model_len=512)
    assert all(1 <= i and 1 <= o and i + o <= 512 for i, o in pairs)
    pairs = sample_lengths(100, rng, dataset="fixed", input_len=100, output_len=10, range_ratio=0.5, max_model_len=512)
    assert all(50 <= i <= 150 and 5 <= o <= 15 for i, o in pairs)
    gaps = arrival_gaps(20000, 10.0, 1.0, rng)
    assert abs(np.mean(gaps) - 0.1) < 0.005 and arrival_gaps(3, float("inf"), 1.0, rng) == [0.0] * 3

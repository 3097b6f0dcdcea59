"""Padded vocabularies: the model's embedding table is larger than its tokenizer.

Qwen2/2.5/3 ship 151,936 embedding rows for ~151,665 tokens, and many fine-tunes pad to a
multiple of 64 or 128; the model can sample a padding row. Such an id is a valid token:
it is returned with its logprob and adds no text (transformers' decode drops it too).
Here a tiny Qwen3 (vocabulary 512) is saved with a byte-level BPE tokenizer of 360
tokens trained in the test with transformers' own classes; greedy float32 tokens and
chosen-token logprobs through runtime.generate (jsonl) and through the gRPC server must
equal transformers' over runs that emit padding ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import grpc
import numpy as np
import pytest

from runtime.config import EngineConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MODEL_VOCAB = 512
TOKENIZER_VOCAB = 360
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Hello world! Ünïcödé façade naïve café, 你好，世界。",
    "def f(x):\n    return x * 2\n",
] * 50
PROMPTS = ["Paris is the capital of", "The quick brown fox", "Hello world!", "def f(x):"]
MAX_TOKENS = 24
# Both sides compute in float32 over a 64-wide model with different op orders (fused
# attention, XLA vs torch matmuls): logits agree to ~1e-5, so logprobs of magnitude
# up to ~20 agree to well within 2e-4.
LOGPROB_ATOL = 2e-4


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A tiny Qwen3 with a 512-row embedding and a 360-token tokenizer, converted."""
    from checkpoints.converter import convert

    if not hasattr(transformers.Qwen2Tokenizer(), "train_new_from_iterator"):
        pytest.skip("this transformers cannot train a Qwen2Tokenizer")
    hf_dir = tmp_path_factory.mktemp("qwen3-padded")
    tok = transformers.Qwen2Tokenizer().train_new_from_iterator(CORPUS, vocab_size=TOKENIZER_VOCAB)
    assert len(tok) == TOKENIZER_VOCAB
    tok.save_pretrained(hf_dir)
    config = transformers.Qwen3Config(
        vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # a peaked distribution: no near-ties between the two runtimes
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    model.save_pretrained(hf_dir)
    ckpt = tmp_path_factory.mktemp("ckpt") / "qwen3-padded"
    convert(hf_dir, ckpt, "float32")
    refs = [_hf_greedy(model, tok, prompt) for prompt in PROMPTS]
    emitted = [t for r in refs for t in r.ids]
    # The point of the test: the reference run must sample padding rows.
    assert any(t >= TOKENIZER_VOCAB for t in emitted), "the reference run emits no padding ids"
    return types.SimpleNamespace(hf_dir=hf_dir, ckpt=ckpt, tok=tok, model=model, refs=refs)


def _hf_greedy(model, tok, prompt: str):
    """transformers' greedy continuation: ids, chosen-token logprobs and decoded text."""
    ids = tok(prompt)["input_ids"]
    out, logprobs, margins = [], [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([ids + out])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            t = int(torch.argmax(logits))
            out.append(t)
            logprobs.append(float(lp[t]))
    assert min(margins) > 1e-3, "near-tie in the reference: the comparison would be ill-posed"
    return types.SimpleNamespace(prompt=prompt, prompt_ids=ids, ids=out, logprobs=logprobs,
                                 text=tok.decode(out, skip_special_tokens=True))


def _assert_matches(ref, ids, logprobs, text):
    assert list(ids) == ref.ids, ref.prompt
    np.testing.assert_allclose(logprobs, ref.logprobs, atol=LOGPROB_ATOL, rtol=0)
    assert text == ref.text, ref.prompt


def test_our_tokenizer_matches_and_decodes_padding_ids_to_nothing(padded):
    from runtime.detokenize import IncrementalDetokenizer
    from runtime.tokenizer import load_tokenizer

    ours = load_tokenizer(padded.ckpt)
    assert ours.vocab_size == TOKENIZER_VOCAB
    for ref in padded.refs:
        assert ours.encode(ref.prompt) == ref.prompt_ids
        assert ours.decode(ref.ids, skip_special_tokens=True) == ref.text
        # Incremental detokenization around padding ids gives the same text.
        detok = IncrementalDetokenizer(ours, ref.prompt_ids)
        assert "".join(detok.push(t) for t in ref.ids) + detok.flush() == ref.text
    mixed = [400, 262, 511, 352, 360]
    assert ours.decode(mixed) == padded.tok.decode(mixed) == padded.tok.decode([262, 352])


COMMON = ("--max_model_len=64", "--prefill_lengths=16,32", "--max_num_seqs=4", "--decode_batch_sizes=4", "--dtype=float32")


def test_generate_jsonl_matches_transformers(padded):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
    args = [f"--checkpoint={padded.ckpt}", *(f"--prompt={p}" for p in PROMPTS), f"--max_tokens={MAX_TOKENS}",
            "--ignore_eos", "--logprobs=0", "--format=jsonl", *COMMON]
    p = subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == len(PROMPTS)
    for ref, row in zip(padded.refs, rows):
        assert row["prompt"] == ref.prompt and row["finish_reason"] == "length"
        _assert_matches(ref, row["token_ids"], row["logprobs"], row["text"])


@pytest.fixture(scope="module")
def served(padded):
    from runtime.startup import load_engine
    from tests.runtime.server_harness import serve

    ecfg = EngineConfig(max_num_seqs=4, max_model_len=64, page_size=8, prefill_lengths=(16, 32),
                        prefill_batch_sizes=(1, 4), cache_dtype="float32", decode_batch_sizes=(4,))
    engine, tokenizer = load_engine(str(padded.ckpt), ecfg, dtype="float32")
    engine.warmup()
    with serve(engine, tokenizer) as h:
        yield h


def test_grpc_matches_transformers_and_stops_around_padding_ids(padded, served):
    from tests.runtime.server_harness import collect

    h = served
    streams = [h.client.generate(ref.prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
               for ref in padded.refs]  # concurrently: batched == alone
    for ref, call in zip(padded.refs, streams):
        res = collect(call)
        assert res["finals"] == 1 and res["reason"] == "length"
        _assert_matches(ref, res["ids"], res["logprobs"], res["text"])

    ref = next(r for r in padded.refs if any(t >= TOKENIZER_VOCAB for t in r.ids))
    pad = next(t for t in ref.ids if t >= TOKENIZER_VOCAB)
    # A padding id as a stop token: generation ends on it, and it is part of the output.
    res = collect(h.client.generate(ref.prompt, max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[pad]))
    k = ref.ids.index(pad) + 1
    assert res["reason"] == "stop" and res["ids"] == ref.ids[:k]
    assert res["text"] == padded.tok.decode(ref.ids[:k], skip_special_tokens=True)
    # A stop string found in text that padding ids interleave: the text ends before it.
    words = [w for w in ref.text.split(" ") if w.strip()]
    if words:
        stop = words[-1][:3]
        cut = ref.text.index(stop)
        res = collect(h.client.generate(ref.prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                        stop=[stop]))
        assert res["reason"] == "stop" and res["text"] == ref.text[:cut]

    # Client-supplied ids: padding rows are valid input; ids past the model's vocabulary are not.
    assert h.client.detokenize([pad, *ref.ids]) == padded.tok.decode([pad, *ref.ids])
    out = h.client.generate_unary(token_ids=[pad, *ref.prompt_ids], max_tokens=2, temperature=0.0)
    assert len(out.token_ids) >= 1
    for call in (lambda: h.client.detokenize([MODEL_VOCAB]),
                 lambda: h.client.generate_unary(token_ids=[MODEL_VOCAB], max_tokens=1)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(MODEL_VOCAB) in e.value.details()
    info = h.info()
    assert info.config.vocab_size == MODEL_VOCAB and info.load.num_pages_used == 0
    assert h.client.health() == "SERVING"

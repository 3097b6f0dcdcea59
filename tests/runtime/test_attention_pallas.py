"""The engine with --attention=pallas (the GPU kernels, in Pallas' interpreter on CPU)
gives the tokens of --attention=reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.models.transformer import Transformer
from runtime.orchestrator import Orchestrator, Request
from runtime.sampling import SamplingParams
from tests.pallas_kernels.conftest import reuse_thread_programs  # noqa: F401 -- a fixture (Mosaic GPU interpreter speed-up)

pytest.importorskip("pallas_kernels.paged_attention.gpu")
pytest.importorskip("pallas_kernels.flash_attention.gpu")


def _tiny(model_type: str, dtype=jnp.float32, **extra):
    hf = dict(model_type=model_type, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512, **extra)
    cfg = ModelConfig.from_hf(hf)
    model = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # Peaked distributions (no near-ties between greedy candidates).
    state = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 and x.shape[0] != cfg.vocab_size else x, state)
    return nnx.merge(graphdef, state)


def _run(model, attention: str, requests, cache_dtype="float32"):
    ecfg = EngineConfig(max_num_seqs=3, max_model_len=96, page_size=16, prefill_lengths=(16, 32),
                        prefill_batch_sizes=(1, 2), cache_dtype=cache_dtype, attention=attention, decode_batch_sizes=(3,))
    orc = Orchestrator(Engine(model, ecfg, num_pages=24), None)
    for r in requests:
        orc.add_request(r)
    got = {r.request_id: dict(ids=[], lp=[]) for r in requests}
    while orc.has_work():
        for out in orc.step():
            got[out.request_id]["ids"] += out.token_ids
            got[out.request_id]["lp"] += out.logprobs
    assert orc.allocator.num_free == orc.allocator.num_pages
    return got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}),
    ("gemma3_text", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                         attn_logit_softcapping=30.0)),
])
def test_pallas_engine_matches_reference(model_type, extra, dtype):
    """bfloat16 is the path the engine serves with: on a Hopper GPU its prefill runs the
    Mosaic GPU flash kernel (float32 calls go to the Triton kernel)."""
    model = _tiny(model_type, dtype=jnp.dtype(dtype), **extra)
    rng = np.random.default_rng(0)
    # Prompt lengths: 1, a page boundary, and one longer than the largest prefill length
    # (chunked: exercises the continuation variant).
    requests = [
        Request(str(i), rng.integers(1, 256, n).tolist(), SamplingParams(temperature=0.0), max_tokens=12,
                ignore_eos=True)
        for i, n in enumerate([1, 16, 45])
    ]
    ref, pal = _run(model, "reference", requests, dtype), _run(model, "pallas", requests, dtype)
    for r in requests:
        a, b = ref[r.request_id], pal[r.request_id]
        if dtype == "float32" and jax.default_backend() != "gpu":
            # Only summation order differs.
            assert b["ids"] == a["ids"], r.request_id
            np.testing.assert_allclose(b["lp"], a["lp"], rtol=1e-4, atol=1e-4)
            continue
        # bfloat16: the two paths round different intermediates (the kernels round P
        # before P @ V, the reference its scores' matmul output), which the 20x
        # weights amplify: logprobs differ by up to ~0.1 (measured 0.095 on CPU,
        # 0.076 on an H200, 2026-11-21). float32 on a GPU: the Triton kernels' float32
        # dots run on TF32 tensor cores (10-bit mantissa): measured up to 0.0088 on the
        # H200.
        # A near-tie may then resolve either way. Each run's token is its argmax: where
        # the runs first disagree both picks must be (near-)maximal in both, so their
        # logprobs agree within the same tolerance, like every step before.
        atol = 0.25 if dtype == "bfloat16" else 0.03
        n = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), len(a["ids"]))
        np.testing.assert_allclose(b["lp"][: n + 1], a["lp"][: n + 1], atol=atol, err_msg=r.request_id)

@pytest.mark.parametrize("model_type, extra, fused", [
    ("llama", {}, True),
    ("qwen3", {}, False),  # q/k norms sit between the projection and the rotation
])
def test_decode_fuses_rope_and_cache_write(model_type, extra, fused):
    """With --attention=pallas a decode step rotates q/k and writes the cache in one
    kernel (pallas_kernels/rope_kv) wherever the kernel's conditions hold."""
    model = _tiny(model_type, **extra)
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, page_size=16, prefill_lengths=(16,), attention="pallas",
                        decode_batch_sizes=(2,))
    engine = Engine(model, ecfg, num_pages=8)
    text = engine._decode[(2, "greedy")].lower(engine.param_leaves, engine.cache, engine.slots,
                                               engine.io).as_text(debug_info=True)
    assert ("qkv_rope_kv" in text) == fused
    assert ("qkv_rope_kv" not in engine._prefill[True].lower(
        engine.param_leaves, engine.cache, engine.slots,
        *_prefill_args(ecfg)).as_text(debug_info=True))  # prefill keeps the jnp path


def test_small_decode_calls_fuse_residual_add_and_norm():
    """Decode calls below CUBLAS_DECODE_ROWS run each residual add with the norm after it
    as one kernel (pallas_kernels/add_rmsnorm); the 64-row bucket (cuBLAS adds the
    residual in its GEMM epilogue), prefill and the reference path keep XLA's."""
    from runtime.models.transformer import CUBLAS_DECODE_ROWS

    model = _tiny("llama")

    def decode_text(attention, rows):
        ecfg = EngineConfig(max_num_seqs=rows, max_model_len=64, page_size=16, prefill_lengths=(16,),
                            attention=attention, decode_batch_sizes=(rows,))
        engine = Engine(model, ecfg, num_pages=8)
        text = engine._decode[(rows, "greedy")].lower(engine.param_leaves, engine.cache, engine.slots,
                                                      engine.io).as_text(debug_info=True)
        return engine, text

    engine, text = decode_text("pallas", 2)
    # 2 layers x 2 norms + the final norm, one kernel each (the scope names each call site).
    assert text.count("add_rmsnorm_kernel") >= 5
    assert "add_rmsnorm_kernel" not in engine._prefill[True].lower(
        engine.param_leaves, engine.cache, engine.slots, *_prefill_args(engine.ecfg)).as_text(debug_info=True)
    assert "add_rmsnorm_kernel" not in decode_text("pallas", CUBLAS_DECODE_ROWS)[1]
    assert "add_rmsnorm_kernel" not in decode_text("reference", 2)[1]


def _prefill_args(ecfg):
    from runtime.engine import pack_prefill
    from runtime.sampling import SlotSampling

    z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return pack_prefill(tokens=z(1, 16), starts=z(1), lens=z(1), page_table=z(1, ecfg.max_pages_per_seq),
                        slot_ids=z(1), is_last=np.zeros(1, bool), sampling=SlotSampling.pack([None], [0]),
                        stop_ids=z(1, 16), remaining=z(1))


def _serve_with_late_arrivals(model, ecfg, first, late, num_pages):
    """Greedy tokens per request: `first` alone, then `late` added at step 2 (while
    `first` decodes), and the number of mixed calls the engine made. Every request must
    finish without an error."""
    orc = Orchestrator(Engine(model, ecfg, num_pages=num_pages), None)
    mixed, calls = orc.engine.mixed, []
    orc.engine.mixed = lambda *a, **k: calls.append(1) or mixed(*a, **k)
    orc.add_request(first)
    got = {r.request_id: [] for r in (first, *late)}
    steps = 0
    while orc.has_work():
        if steps == 2:
            for r in late:
                orc.add_request(r)
        for out in orc.step():
            assert out.error is None, out.error
            got[out.request_id] += out.token_ids
        steps += 1
    return got, len(calls)


def _greedy(name, rng, n, max_tokens):
    return Request(name, rng.integers(1, 256, n).tolist(), SamplingParams(temperature=0.0), max_tokens=max_tokens,
                   ignore_eos=True)


def test_budget_split_prompts_get_the_continuation_program():
    """Prompts that fit the largest prefill length are still split while others decode
    (--max_num_batched_tokens), so the Pallas engine must compile the continuation
    variant too (an H200 server without it failed every prompt that arrived mid-decode:
    KeyError on the missing program). Tokens equal those of an unbudgeted run."""
    from runtime.engine import prefill_variants

    model = _tiny("llama")
    rng = np.random.default_rng(7)
    a, b = _greedy("a", rng, 5, 20), _greedy("b", rng, 40, 4)
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, page_size=16, prefill_lengths=(16, 64),
                        attention="pallas", decode_batch_sizes=(2,))
    split_cfg, whole_cfg = (dataclasses.replace(ecfg, max_num_batched_tokens=n) for n in (20, 4096))
    assert prefill_variants(split_cfg) == (True, False) and prefill_variants(whole_cfg) == (True,)
    split, mixed = _serve_with_late_arrivals(model, split_cfg, a, [b], num_pages=12)
    assert split == _serve_with_late_arrivals(model, whole_cfg, a, [b], num_pages=12)[0] and len(split["b"]) == 4
    # "b"'s chunks beside "a"'s decode ran as mixed calls (a fresh one, then continuations
    # through the kernels); as separate calls the tokens are the same.
    assert mixed == 3
    separate_cfg = dataclasses.replace(split_cfg, mixed_calls=False)
    assert (split, 0) == _serve_with_late_arrivals(model, separate_cfg, a, [b], num_pages=12)


def test_prompts_sharing_a_step_budget_get_the_continuation_program():
    """Two prompts admitted together share the step's budget: the second may be cut even
    though each alone fits it, so the continuation program must exist whenever the budget
    is short of a full call of the longest prompts beside every slot's decode tokens."""
    from runtime.engine import prefill_variants

    model = _tiny("llama")
    rng = np.random.default_rng(8)
    a, late = _greedy("a", rng, 5, 12), [_greedy(r, rng, 60, 3) for r in "bc"]
    ecfg = EngineConfig(max_num_seqs=3, max_model_len=64, page_size=16, prefill_lengths=(16, 64),
                        prefill_batch_sizes=(1, 2), attention="pallas", decode_batch_sizes=(3,))
    # 100 tokens: "b" takes 60, "c" gets the 16-token bucket of the 39 left, then continues.
    split_cfg, whole_cfg = (dataclasses.replace(ecfg, max_num_batched_tokens=n) for n in (100, 4096))
    assert prefill_variants(split_cfg) == (True, False) and prefill_variants(whole_cfg) == (True,)
    split, _ = _serve_with_late_arrivals(model, split_cfg, a, late, num_pages=16)
    assert split == _serve_with_late_arrivals(model, whole_cfg, a, late, num_pages=16)[0] and len(split["c"]) == 3


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


@pytest.mark.skipif(not _on_hopper(), reason="the engine's programs with the Mosaic GPU kernels inside: compiled on "
                    "Hopper only (the CPU interpreter's kernel threads deadlock inside a whole-model program on 2 cores)")
def test_paged_prefill_kernel_in_the_engine(monkeypatch):
    """The Hopper path for continued chunks (layers.PAGED_PREFILL_KERNEL:
    flash_attention/gpu_mosaic.paged_prefill): a budget-split prompt, whose chunks run
    beside another request's decode steps (mixed calls), gives the tokens of the same
    prompt prefilled whole."""
    from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic
    from runtime.models import layers

    calls = []
    monkeypatch.setattr(layers, "PAGED_PREFILL_KERNEL", True)
    real_paged_prefill = flash_mosaic.paged_prefill
    monkeypatch.setattr(flash_mosaic, "paged_prefill", lambda *a, **k: calls.append(1) or real_paged_prefill(*a, **k))
    model = _tiny("llama", dtype=jnp.bfloat16)
    rng = np.random.default_rng(7)
    a, b = _greedy("a", rng, 5, 12), _greedy("b", rng, 40, 4)
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, page_size=16, prefill_lengths=(16, 64),
                        attention="pallas", decode_batch_sizes=(2,), cache_dtype="bfloat16")
    split_cfg, whole_cfg = (dataclasses.replace(ecfg, max_num_batched_tokens=n) for n in (20, 4096))
    split, mixed = _serve_with_late_arrivals(model, split_cfg, a, [b], num_pages=12)
    assert calls, "no continued chunk went through paged_prefill"
    assert mixed == 3 and len(split["b"]) == 4
    assert split == _serve_with_late_arrivals(model, whole_cfg, a, [b], num_pages=12)[0]


@pytest.mark.usefixtures("reuse_thread_programs")
def test_attention_routes_continued_chunks_to_paged_prefill(monkeypatch):
    """layers.attention with PAGED_PREFILL_KERNEL on a Hopper dispatch (here the kernel in
    the Mosaic GPU interpreter, called outside any other program): a continued chunk
    (rows starting at 0, 21 and 40, one of them padding) goes to paged_prefill with the
    rows' starts and chunk lengths, and equals the paged reference."""
    from pallas_kernels import dispatch
    from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic
    from pallas_kernels.paged_attention import reference as paged_ref
    from runtime.models import layers

    real_module_name, calls = dispatch.module_name, []
    monkeypatch.setattr(dispatch, "module_name", lambda kernel, impl: (
        "gpu_mosaic" if kernel == "flash_attention" and dispatch.resolve(impl) == "gpu" else real_module_name(kernel, impl)))
    monkeypatch.setattr(layers, "PAGED_PREFILL_KERNEL", True)
    real = flash_mosaic.paged_prefill
    monkeypatch.setattr(flash_mosaic, "paged_prefill", lambda *a, **k: calls.append(a[4:6]) or real(*a, **k))
    rng = np.random.default_rng(0)
    B, T, N, K, H, S, MP = 3, 32, 4, 2, 64, 16, 6
    starts, lens = np.array([0, 21, 40]), np.array([32, 9, 0])  # the last row: padding
    kv_lens = np.where(lens > 0, starts + lens, 0)
    P = B * MP
    table = rng.permutation(P).reshape(B, MP).astype(np.int32)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((P, S, K, H)), jnp.bfloat16) for _ in "kv")
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16)
    positions = jnp.asarray(starts[:, None] + np.arange(T)[None], jnp.int32)
    args = (q, None, None, k_pages, v_pages, jnp.asarray(table), positions, jnp.asarray(kv_lens, jnp.int32))
    kw = dict(scale=H**-0.5, window=None, softcap=None)
    out = layers.attention(*args, **kw, impl="pallas", fresh=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(calls[0][0]), starts)
    np.testing.assert_array_equal(np.asarray(calls[0][1]), lens)
    ref = paged_ref.paged_attention(q.astype(jnp.float32), k_pages.astype(jnp.float32), v_pages.astype(jnp.float32),
                                    jnp.asarray(table), positions, jnp.asarray(kv_lens, jnp.int32), **kw)
    valid = np.arange(T)[None, :] < lens[:, None]
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[valid], np.asarray(ref)[valid], atol=1.5e-2, rtol=1e-2)
    # Off (XLSERVE_PAGED_PREFILL=0): the paged reference, not the kernel.
    monkeypatch.setattr(layers, "PAGED_PREFILL_KERNEL", False)
    layers.attention(*args, **kw, impl="pallas", fresh=False)
    assert len(calls) == 1

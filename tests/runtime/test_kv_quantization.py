"""Quantized KV caches (--cache_dtype=int8 | float8_e4m3fn; runtime/kv_cache.py,
pallas_kernels/quantized_kv.py): rows against numpy, page writes (values and scales at the
right page, offset and kv head; padding dropped), the paged reference over quantized
pages against the same over their dequantized values, the engine against a float32 cache,
prefix caching and preemption on quantized pages, and the capacity they buy."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.paged_attention import reference as paged_reference
from runtime.config import ConfigError, EngineConfig
from runtime.engine import Engine
from runtime.kv_cache import (
    KVCache, QuantizedPages, dequantize, dequantize_pages, quantize, write_kv, zeros_pages,
)
from runtime.orchestrator import Orchestrator, Request
from runtime.presets import preset_config
from runtime.random_weights import random_model
from runtime.sampling import SamplingParams
from runtime.startup import plan_capacity

DTYPES = ["int8", "float8_e4m3fn"]


def _numpy_rows(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(quantized values, scale) per row of x [..., H], written independently in numpy."""
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / {"int8": 127.0, "float8_e4m3fn": 448.0}[dtype], 1.0).astype(np.float32)
    y = (x / scale).astype(np.float32)
    q = np.clip(np.round(y), -127, 127).astype(np.int8) if dtype == "int8" else y.astype(ml_dtypes.float8_e4m3fn)
    return q, scale[..., 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [8, 64, 128])
def test_rows_match_numpy(dtype, H):
    x = np.random.default_rng(H).standard_normal((3, 5, 2, H)).astype(np.float32) * np.float32(4.0)
    x[0, 0, 0] = 0.0  # a row of zeros: scale 1, values 0
    x[1, 2, 1, 3] = 1e4  # one large value: the rest of its row rounds to few steps
    values, scales = quantize(jnp.asarray(x), dtype)
    assert values.shape == (3, 5, 2, H) and values.dtype == dtype
    assert scales.shape == (3, 5, 2) and scales.dtype == jnp.float32
    q, scale = _numpy_rows(x, dtype)
    got_scale = np.asarray(scales)
    # XLA may divide by 127 as a multiply by its reciprocal: the scale within an ulp, and
    # a value on a rounding boundary one step off (rare; bounded below).
    np.testing.assert_allclose(got_scale, scale, rtol=3e-7)
    assert got_scale[0, 0, 0] == 1.0
    got_q = np.asarray(values).astype(np.float32)
    step = 1.0 if dtype == "int8" else np.abs(q.astype(np.float32)) / 8 + 2.0**-9
    off = got_q != q.astype(np.float32)
    assert off.mean() <= 0.01 and np.all(np.abs(got_q - q.astype(np.float32)) <= step), off.mean()
    back = np.asarray(dequantize(values, scales, jnp.float32))
    np.testing.assert_allclose(back, got_q * got_scale[..., None], rtol=1e-6)
    # Rounding error: half a step of the row's scale (int8), 2^-4 of the value (e4m3's
    # 3-bit mantissa) or half its smallest step (subnormals).
    bound = 0.5 * scale[..., None] if dtype == "int8" else np.maximum(np.abs(x) / 16, scale[..., None] * 2.0**-10)
    assert np.all(np.abs(back - x) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_reference_reads_quantized_pages_as_their_values(dtype):
    """Over quantized pages the paged reference gives exactly what it gives over float
    pages holding the dequantized rows (it dequantizes after its gather); write_kv drops
    padding tokens on quantized pages too."""
    rng = np.random.default_rng(0)
    B, T, N, K, H, P, S = 2, 5, 4, 2, 16, 6, 4
    k_new, v_new = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    table = jnp.asarray([[0, 1, 2], [3, 4, 5]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_lens = jnp.asarray([5, 3], jnp.int32)  # row 1: its last two tokens are padding
    zeros = zeros_pages((P, S, K, H), dtype)
    assert isinstance(zeros, QuantizedPages) and zeros.scales.shape == (P, K, S) and np.all(np.asarray(zeros.scales) == 1)
    kq, vq = write_kv(zeros, zeros, k_new, v_new, table, positions, kv_lens)
    kf, vf = (dequantize_pages(p, jnp.float32) for p in (kq, vq))
    # The written rows are the tokens' quantized rows, each scale at [page, kv head,
    # offset]; padding left its rows (values 0, scale 1) as they were.
    want_q, want_s = quantize(k_new, dtype)  # [B, T, K, H], [B, T, K]
    for b, t in [(0, 0), (0, 3), (0, 4), (1, 0), (1, 2)]:
        page, off = int(table[b, t // S]), t % S
        np.testing.assert_array_equal(np.asarray(kq.values[page, off]).astype(np.float32),
                                      np.asarray(want_q[b, t]).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(kq.scales[page, :, off]), np.asarray(want_s[b, t]))
    np.testing.assert_array_equal(np.asarray(kf[0, :4]), np.asarray(dequantize(want_q[0, :4], want_s[0, :4],
                                                                               jnp.float32)))
    assert not np.any(np.asarray(kf[3, 3:])) and not np.any(np.asarray(kf[4]))
    assert np.all(np.asarray(kq.scales[3, :, 3:]) == 1) and np.all(np.asarray(kq.scales[4:]) == 1)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    kw = dict(scale=0.25, window=None, softcap=None)
    got = paged_reference.paged_attention(q, kq, vq, table, positions, kv_lens, **kw)
    want = paged_reference.paged_attention(q, kf, vf, table, positions, kv_lens, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


ECFG = EngineConfig(max_num_seqs=3, max_model_len=128, page_size=8, prefill_lengths=(16, 64), decode_batch_sizes=(3,),
                    attention="reference", num_top_logprobs=2, cache_dtype="float32")
PROMPTS = [np.random.default_rng(i).integers(1, 200, n).tolist() for i, n in enumerate((30, 45, 17))]
_MODELS = {}


def _run(cache_dtype, *, num_pages=40, caching=False, rounds=(PROMPTS,), attention="reference"):
    """Greedy tokens and logprobs of each prompt (12 tokens each), rounds one after
    another on one orchestrator; returns ({id: (tokens, logprobs)}, orchestrator)."""
    if "m" not in _MODELS:
        _MODELS["m"] = random_model(preset_config("tiny-llama"), "float32", None)
    ecfg = dataclasses.replace(ECFG, cache_dtype=cache_dtype, enable_prefix_caching=caching, attention=attention)
    orc = Orchestrator(Engine(_MODELS["m"], ecfg, num_pages=num_pages), None)
    got = {}
    for r, prompts in enumerate(rounds):
        for i, p in enumerate(prompts):
            rid = f"{r}.{i}"
            got[rid] = ([], [])
            orc.add_request(Request(rid, p, SamplingParams(temperature=0.0, logprobs=2), max_tokens=12,
                                    ignore_eos=True))
        while orc.has_work():
            for out in orc.step():
                got[out.request_id][0].extend(out.token_ids)
                got[out.request_id][1].extend(out.logprobs)
        orc.allocator.check_conserved()
    return got, orc


@pytest.fixture(scope="module")
def float_run():
    return _run("float32")[0]


@pytest.mark.parametrize("dtype,atol,agreement", [
    # int8 rows: each value within half a step (1/254 of its row's largest); measured on
    # this model: every token equal, logprobs within 7e-4.
    ("int8", 5e-3, 1.0),
    # e4m3 rows: 3 mantissa bits, ~16x coarser; measured: 78% of tokens equal (a random
    # tiny model has many near-ties), logprobs within 0.094. A wrong scale or row layout
    # moves logprobs by whole units.
    ("float8_e4m3fn", 0.3, 0.6),
])
def test_engine_with_a_quantized_cache_tracks_the_float_cache(float_run, dtype, atol, agreement):
    got, orc = _run(dtype)
    page = orc.engine.cache.k[0]
    assert isinstance(page, QuantizedPages) and page.values.dtype == dtype and page.scales.dtype == jnp.float32
    assert page.shape[-1] == orc.engine.cfg.head_dim and page.scales.shape == (40, orc.engine.cfg.num_kv_heads, 8)
    same = [a == b for rid in float_run for a, b in zip(float_run[rid][0], got[rid][0])]
    assert np.mean(same) >= agreement
    # Logprobs compared while the tokens agree (after a different token the texts differ).
    for rid in float_run:
        n = next((i for i, (a, b) in enumerate(zip(float_run[rid][0], got[rid][0])) if a != b), 12)
        np.testing.assert_allclose(got[rid][1][:n], float_run[rid][1][:n], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_decode_kernel_reads_quantized_pages_in_the_engine(dtype):
    """--attention=pallas: decode steps through the paged kernel over QuantizedPages (here
    the GPU kernel interpreted; tests/pallas_kernels check it and the TPU kernel against
    the reference), the first token from the flash kernel over the prompt's unquantized
    k/v. Against the reference engine on the same quantized cache: the same tokens, and
    logprobs within what reading the prompt's keys unquantized moves them (measured:
    int8 7.9e-4, e4m3 1.8e-3; bounds 4x and 6x that). Decode alone agrees to float32
    rounding (the kernel scales scores where the reference scales keys)."""
    ref, _ = _run(dtype)
    got, orc = _run(dtype, attention="pallas")
    orc.allocator.check_conserved()
    for rid in ref:
        assert got[rid][0] == ref[rid][0], (rid, ref[rid][0], got[rid][0])
        np.testing.assert_allclose(got[rid][1], ref[rid][1], atol=3e-3 if dtype == "int8" else 1e-2)


def test_prefix_caching_and_preemption_on_quantized_pages():
    """The second round's prompts extend the first's (cached pages mapped, the rest
    prefilled); with 9 pages of 8 tokens for three prompts the scheduler preempts and
    recomputes. Same tokens as the run with neither, logprobs within float32 rounding."""
    second = [p + [7, 8, 9] for p in PROMPTS]
    plain, _ = _run("int8", rounds=(PROMPTS, second))
    cached, orc = _run("int8", caching=True, rounds=(PROMPTS, second))
    assert orc.allocator.num_cached > 0
    tight, orc_tight = _run("int8", num_pages=9, rounds=(PROMPTS, second))
    assert orc_tight.scheduler.num_preemptions > 0
    for got in (cached, tight):
        for rid in plain:
            assert got[rid][0] == plain[rid][0], rid
            np.testing.assert_allclose(got[rid][1], plain[rid][1], atol=1e-4)


def test_a_quantized_cache_holds_about_twice_the_tokens():
    """Llama-3.1-8B's rows: 128 one-byte values + a 4-byte scale against 128 x 2 bytes; the planner gives the cache that many more pages in the same memory."""
    cfg = preset_config("llama3.1-8b")
    bf16 = KVCache.bytes_per_token(cfg, jnp.bfloat16)
    assert KVCache.bytes_per_token(cfg, jnp.int8) == KVCache.bytes_per_token(cfg, "float8_e4m3fn") == bf16 * 132 // 256
    ecfg = EngineConfig(max_model_len=8192, max_num_seqs=64)
    params = 16 << 30
    pages = {dt: plan_capacity(cfg, dataclasses.replace(ecfg, cache_dtype=dt), params, limit_bytes=140 << 30).num_pages
             for dt in ("bfloat16", "int8")}
    assert 1.9 < pages["int8"] / pages["bfloat16"] < 1.95
    with pytest.raises(ConfigError, match="cache_dtype='int4'"):
        EngineConfig(cache_dtype="int4")


def test_aot_abstract_cache_has_the_quantized_rows():
    from runtime import aot
    from sharding.mesh import MeshConfig, make_mesh

    cfg = preset_config("tiny-llama")
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, prefill_lengths=(16,), decode_batch_sizes=(2,),
                        cache_dtype="int8", attention="reference")
    engine = aot.abstract_engine(cfg, ecfg, make_mesh(MeshConfig(tensor=1)), num_pages=8)
    page = engine.cache.k[0]
    assert page.values.dtype == jnp.int8 and page.shape == (8, ecfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    assert page.scales.dtype == jnp.float32 and page.scales.shape == (8, cfg.num_kv_heads, ecfg.page_size)
    step = aot.compile_step(engine, "decode", (2, "filter"))
    assert step.memory.argument > 0

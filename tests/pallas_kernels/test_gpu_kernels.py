"""The Pallas GPU (Triton) attention kernels agree with their references.

On a machine without a GPU the kernels run in interpret mode (the kernel body
evaluated by XLA on CPU, program by program), and their Triton lowering is checked
by exporting for CUDA; on a GPU the same sweeps run the compiled kernels.

Interpret mode is slow (a second or two per compiled case), so the default sweep
covers every value of every factor (dtype, head ratio, head_dim, page/block size,
window, softcap, split-K) in a hand-picked set of combinations, each with all the
edge lengths in one batch; `-m slow` runs the full cross product (~5 minutes).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.flash_attention import reference as flash_ref
from pallas_kernels.paged_attention import gpu as paged_gpu
from pallas_kernels.paged_attention import reference as paged_ref
from pallas_kernels.quantized_kv import QuantizedPages, dequantize_pages, quantize
from tests.utils import paged_decode_case

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

# Tolerances. f32: kernel and reference both accumulate in f32 and differ only in
# summation order and the online-softmax rescaling (a few ulp of f32 on outputs of
# magnitude ~1). bf16: the reference casts the normalized probabilities to bf16
# before P @ V, the kernel casts the unnormalized running ones, so each probability
# rounds differently (2^-8 relative), and the output itself is rounded to bf16 (one
# ulp is 2^-8 relative; outputs are weighted means of N(0, 1) values, |o| <~ 3).
# Measured: at most 0.008 absolute, about half an ulp at |o| ~ 3.
TOL = {jnp.float32: {"atol": 2e-5, "rtol": 2e-5}, jnp.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}
# Stale data in every KV slot that no visible key owns (freed pages, the tail of a
# sequence's last page, padding positions): if the kernel let any of it into a score
# or a weighted sum, the output would move by orders of magnitude more than TOL.
STALE = 1e4


def _scale(H):
    return H**-0.5


def _reference(fn, *args, **kw):
    # XLA's default f32 matmul on GPU is TF32; the reference must be the exact one.
    with jax.default_matmul_precision("highest"):
        return fn(*args, **kw)


def _assert_matches(out, ref, valid, dtype):
    """Every element against the reference; rows of padding queries exactly zero."""
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all(), "non-finite output (an unwritten row reads as NaN in interpret mode)"
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    assert (out[~valid] == 0).all(), "padding queries must output exactly zero"


def _only_when_selected(request):
    """The full sweeps take ~5 minutes in interpret mode: run them only with -m slow."""
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("full sweep: select with -m slow")


# ---------------------------------------------------------------- paged decode


def _paged_case(rng, **kw):
    return paged_decode_case(rng, stale=STALE, **kw)


def _check_paged(*, dtype, G, H, S, window, softcap, num_splits, seed=0):
    args, valid = _paged_case(np.random.default_rng(seed), dtype=dtype, G=G, H=H, S=S)
    kw = {"scale": _scale(H), "window": window, "softcap": softcap}
    if num_splits is None:  # the public entry point, default tuning
        out = paged_gpu.paged_attention(*args, **kw, interpret=INTERPRET)
    else:
        out = paged_gpu.paged_attention_tuned(*args, **kw, interpret=INTERPRET, num_splits=num_splits)
    ref = _reference(paged_ref.paged_attention, *args, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _assert_matches(out, ref, valid, dtype)


F32, BF16 = jnp.float32, jnp.bfloat16
# (dtype, G, H, page size, window, softcap, num_splits): every value of every factor,
# G=3 for a non-power-of-two group (SmolLM2: 9 q / 3 kv heads), window 5 < S and
# 40 > S (sliding across page boundaries), splits > 1 for flash-decoding.
PAGED_CASES = [
    (F32, 1, 64, 16, None, None, 1),
    (F32, 4, 128, 32, 5, None, 1),
    (F32, 8, 256, 16, None, 30.0, 3),
    (F32, 3, 64, 32, 40, 30.0, 2),
    (F32, 4, 64, 16, None, None, None),
    (BF16, 8, 64, 32, None, None, 1),
    (BF16, 1, 128, 16, 40, 30.0, 2),
    (BF16, 4, 256, 32, 5, None, 4),
    (BF16, 4, 128, 16, None, 30.0, None),
]


@pytest.mark.parametrize("dtype,G,H,S,window,softcap,num_splits", PAGED_CASES)
def test_paged_decode_matches_reference(dtype, G, H, S, window, softcap, num_splits):
    _check_paged(dtype=dtype, G=G, H=H, S=S, window=window, softcap=softcap, num_splits=num_splits)


@pytest.mark.parametrize("cache_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype,G,H,S,window,softcap,num_splits", [
    (F32, 4, 128, 16, None, None, 1),
    (BF16, 3, 64, 32, 40, 30.0, 2),
    (BF16, 8, 128, 16, 5, None, None),
])
def test_paged_decode_reads_quantized_pages(cache_dtype, dtype, G, H, S, window, softcap, num_splits):
    """QuantizedPages (values [P, S, K, H], scales [P, K, S]) against the reference in
    float32 over their dequantized values, cast to q's dtype: the kernel's values are
    exact in q's dtype and it scales scores and probabilities instead (f32: ulps; bf16:
    its p rounded to bf16, TOL). Stale rows (no visible key) get NaN scales: a kernel
    that let one into a score or a weighted sum would output NaN."""
    args, valid = _paged_case(np.random.default_rng(7), dtype=F32, G=G, H=H, S=S)
    q, kf, vf, *rest = args

    def pages(x):
        values, scales = quantize(x, cache_dtype)  # [P, S, K, H], [P, S, K]
        scales = jnp.where(jnp.all(x == STALE, axis=-1), jnp.nan, scales)
        return QuantizedPages(values, jnp.swapaxes(scales, 1, 2))

    k_pages, v_pages = pages(kf), pages(vf)
    q = q.astype(dtype)
    kw = {"scale": _scale(H), "window": window, "softcap": softcap}
    if num_splits is None:
        out = paged_gpu.paged_attention(q, k_pages, v_pages, *rest, **kw, interpret=INTERPRET)
    else:
        out = paged_gpu.paged_attention_tuned(q, k_pages, v_pages, *rest, **kw, interpret=INTERPRET,
                                              num_splits=num_splits)
    deq = lambda p: jnp.nan_to_num(dequantize_pages(p, F32), nan=0.0)  # noqa: E731
    ref = _reference(paged_ref.paged_attention, q.astype(F32), deq(k_pages), deq(v_pages), *rest, **kw).astype(dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    _assert_matches(out, ref, valid, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,G,H,S,window,softcap,num_splits",
    list(itertools.product([F32, BF16], [1, 4, 8], [64, 128, 256], [16, 32], [None, 5], [None, 30.0], [1, 3])),
)
def test_paged_decode_matches_reference_full_sweep(request, dtype, G, H, S, window, softcap, num_splits):
    _only_when_selected(request)
    _check_paged(dtype=dtype, G=G, H=H, S=S, window=window, softcap=softcap, num_splits=num_splits)


def test_paged_decode_ignores_garbage_table_slots():
    """Table slots past a sequence's last page may hold any id (even out of range)."""
    args, valid = _paged_case(np.random.default_rng(1), dtype=F32, G=4, H=64, S=16)
    q, kp, vp, table, pos, lens = args
    slot = np.arange(table.shape[1])[None, :]
    used = -(-np.asarray(lens)[:, None] // 16)
    garbage = jnp.where(slot >= used, 10_000, table)  # no such page
    kw = {"scale": 0.125, "window": None, "softcap": None}
    out = paged_gpu.paged_attention(q, kp, vp, garbage, pos, lens, **kw, interpret=INTERPRET)
    ref = _reference(paged_ref.paged_attention, *args, **kw)
    _assert_matches(out, ref, valid, F32)


def test_paged_decode_rejects_prefill_chunks():
    q = jnp.zeros((1, 2, 4, 64))
    pages = jnp.zeros((2, 16, 1, 64))
    with pytest.raises(AssertionError, match="decode"):
        paged_gpu.paged_attention(
            q, pages, pages, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1,), jnp.int32), scale=1.0, interpret=True,
        )


def test_split_count_fills_the_gpu_only_when_needed():
    assert paged_gpu.default_num_splits(batch=64, kv_heads=8, max_keys=32768) == 1
    assert paged_gpu.default_num_splits(batch=1, kv_heads=8, max_keys=32768) > 8
    assert paged_gpu.default_num_splits(batch=1, kv_heads=8, max_keys=64) == 1  # too short to split


def test_latency_bound_calls_split_to_one_program_per_sm():
    """One or two sequences: ~128 programs, down to one key block (64 keys) per split;
    from 17 (sequence, kv head) pairs, ~264 programs of >= 4 blocks each."""
    assert paged_gpu.default_num_splits(batch=1, kv_heads=8, max_keys=2048) == 16
    assert paged_gpu.default_num_splits(batch=1, kv_heads=8, max_keys=640) == 10  # one block per split
    assert paged_gpu.default_num_splits(batch=2, kv_heads=8, max_keys=2048) == 8
    assert paged_gpu.default_num_splits(batch=1, kv_heads=1, max_keys=32768) == 128
    assert paged_gpu.default_num_splits(batch=4, kv_heads=8, max_keys=2048) == 8  # 32 blocks // 4
    assert paged_gpu.default_num_splits(batch=4, kv_heads=8, max_keys=4352) == 9  # cdiv(264, 32)


# ---------------------------------------------------------------- flash prefill


def _check_flash(*, dtype, G, H, block_q, block_k, window, softcap, T=40, K=2, seed=0):
    """Rows of lengths 1, block-1, block, block+1 and T (T not a block multiple)."""
    rng = np.random.default_rng(seed)
    bq = block_q or flash_gpu.default_blocks(H)[0]
    lengths = np.array([1, bq - 1, bq, bq + 1, T], np.int32)
    B = len(lengths)
    t = np.arange(T)
    valid_bt = t[None, :] < lengths[:, None]
    # Keys and values of padding positions are STALE: they must never be read.
    k = np.where(valid_bt[..., None, None], rng.standard_normal((B, T, K, H)), STALE)
    v = np.where(valid_bt[..., None, None], rng.standard_normal((B, T, K, H)), STALE)
    q = rng.standard_normal((B, T, K * G, H))
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))
    kw = {"scale": _scale(H), "window": window, "softcap": softcap}
    if block_q is None:
        out = flash_gpu.flash_attention(*args, **kw, interpret=INTERPRET)
    else:
        out = flash_gpu.flash_attention_tuned(*args, **kw, interpret=INTERPRET, block_q=block_q, block_k=block_k)
    ref = _reference(flash_ref.flash_attention, *args, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    valid = np.broadcast_to(valid_bt[:, :, None, None], out.shape)
    _assert_matches(out, ref, valid, dtype)


# (dtype, G, H, block_q, block_k, window, softcap, T); block None: the public entry
# point with its default 64-wide blocks (T = 80 then, to have length block+1 < T).
FLASH_CASES = [
    (F32, 1, 64, 16, 16, None, None, 40),
    (F32, 4, 128, 16, 32, 5, None, 40),
    (F32, 8, 256, 32, 16, None, 30.0, 40),
    (F32, 4, 64, None, None, 20, 30.0, 80),
    (BF16, 8, 64, 16, 16, 20, None, 40),
    (BF16, 1, 128, 32, 16, None, 30.0, 40),
    (BF16, 4, 256, 16, 32, 5, 30.0, 40),
    (BF16, 4, 128, None, None, None, None, 80),
]


@pytest.mark.parametrize("dtype,G,H,block_q,block_k,window,softcap,T", FLASH_CASES)
def test_flash_matches_reference(dtype, G, H, block_q, block_k, window, softcap, T):
    _check_flash(dtype=dtype, G=G, H=H, block_q=block_q, block_k=block_k, window=window, softcap=softcap, T=T)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,G,H,window,softcap",
    list(itertools.product([F32, BF16], [1, 4, 8], [64, 128, 256], [None, 5], [None, 30.0])),
)
def test_flash_matches_reference_full_sweep(request, dtype, G, H, window, softcap):
    _only_when_selected(request)
    _check_flash(dtype=dtype, G=G, H=H, block_q=16, block_k=16, window=window, softcap=softcap)


# ---------------------------------------------------------------- harness checks


def test_interpret_mode_poisons_unwritten_outputs():
    """The sweeps rely on it: an output row a kernel forgets to write is NaN here."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(
        writes_nothing, out_shape=jax.ShapeDtypeStruct((16, 64), jnp.float32), interpret=True,
    )(jnp.zeros((16, 64)))
    assert np.isnan(np.asarray(out)).all()


def _export_for_cuda(fn, *shapes):
    """Lowers through Pallas' Triton lowering to a CUDA module, without a GPU."""
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*shapes)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("G", [1, 3, 8])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_kernels_lower_to_triton(dtype, G, H):
    """Catches what interpret mode cannot: ops without a Triton lowering, non-power-of-2
    tiles. (PTX compilation and shared-memory limits need the GPU itself.)"""
    sds = jax.ShapeDtypeStruct
    B, K, T, S, MP, P = 3, 2, 72, 16, 5, 20
    for window, softcap in [(None, None), (8, 30.0)]:
        flash = functools.partial(flash_gpu.flash_attention, scale=0.1, window=window, softcap=softcap)
        _export_for_cuda(flash, sds((B, T, K * G, H), dtype), sds((B, T, K, H), dtype), sds((B, T, K, H), dtype),
                         sds((B,), jnp.int32))
        for splits in (1, 4):
            paged = functools.partial(paged_gpu.paged_attention_tuned, scale=0.1, window=window, softcap=softcap,
                                      num_splits=splits)
            _export_for_cuda(paged, sds((B, 1, K * G, H), dtype), sds((P, S, K, H), dtype), sds((P, S, K, H), dtype),
                             sds((B, MP), jnp.int32), sds((B, 1), jnp.int32), sds((B,), jnp.int32))


@pytest.mark.parametrize("cache_dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_quantized_paged_decode_lowers_to_triton(cache_dtype, dtype):
    """QuantizedPages through the Triton lowering: int8 / e4m3 loads, the casts to q's
    dtype and the scale rows gathered through the page table."""
    sds = jax.ShapeDtypeStruct
    B, K, G, H, S, MP, P = 3, 2, 4, 128, 16, 5, 20
    pages = QuantizedPages(sds((P, S, K, H), cache_dtype), sds((P, K, S), jnp.float32))
    for splits in (1, 4):
        paged = functools.partial(paged_gpu.paged_attention_tuned, scale=0.1, num_splits=splits)
        _export_for_cuda(paged, sds((B, 1, K * G, H), dtype), pages, pages, sds((B, MP), jnp.int32),
                         sds((B, 1), jnp.int32), sds((B,), jnp.int32))


def test_float32_queries_over_a_bfloat16_cache():
    """A float32 model over a bfloat16 KV cache (EngineConfig.cache_dtype's default): the
    scores in float32, as the reference's einsum promotes them. Triton's dot takes
    operands of one dtype, and the lowering of q [f32] . k [bf16] failed on the H200 ("a
    and b must have the same element type"); interpret mode (jnp) promotes, so the
    lowering for CUDA is checked too."""
    args, valid = _paged_case(np.random.default_rng(4), dtype=F32, G=4, H=64, S=16)
    q, kp, vp, *rest = args
    kp, vp = kp.astype(BF16), vp.astype(BF16)
    kw = {"scale": _scale(64), "window": None, "softcap": None}
    out = paged_gpu.paged_attention(q, kp, vp, *rest, **kw, interpret=INTERPRET)
    ref = paged_ref.paged_attention(q, kp, vp, *rest, **kw)
    assert out.dtype == ref.dtype == F32
    _assert_matches(out, ref, valid, BF16)  # p is rounded to the cache's bfloat16 in both
    if INTERPRET:
        sds = jax.ShapeDtypeStruct
        for splits in (1, 4):
            paged = functools.partial(paged_gpu.paged_attention_tuned, **kw, num_splits=splits)
            _export_for_cuda(paged, *(sds(a.shape, a.dtype) for a in (q, kp, vp, *rest)))

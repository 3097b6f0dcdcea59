"""TPU Pallas kernels against their references, without a TPU.

1. The kernels run in the Mosaic TPU interpreter (race detection on, uninitialised
   memory reads as NaN, out-of-bounds reads raise) and must match reference.py.
2. With libtpu installed, the real TPU compiler compiles both kernels at production
   shapes for v5e and v6e (compile-only topologies; no TPU needed). Without libtpu the
   test skips and says so.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import reference as flash_ref
from pallas_kernels.flash_attention import tpu as flash_tpu
from pallas_kernels.paged_attention import reference as paged_ref
from pallas_kernels.paged_attention import tpu as paged_tpu
from pallas_kernels.quantized_kv import QuantizedPages, dequantize_pages, quantize

INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")

# f32: kernel and reference compute the same float32 products; only the summation
# order differs (online softmax over blocks vs. one pass), a few ulps on O(1) outputs.
# bf16: both round p to bf16 before the PV matmul, but the kernel's p is normalised by
# the running max of its block while the reference's is by the global max, so the two
# roundings differ by up to one bf16 ulp (2^-8 relative) per term; the output is then
# rounded to bf16 (another 2^-8). 2e-2 absolute on O(1) outputs bounds both.
TOL = {jnp.float32: {"atol": 2e-5, "rtol": 2e-5}, jnp.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _races_found() -> bool:
    # The interpreter records races in module state instead of raising.
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    return ipc.races is not None and ipc.races.races_found


def _interpret(fn, *args, **kwargs):
    with pltpu.force_tpu_interpret_mode(INTERPRET):
        out = jax.jit(lambda *a: fn(*a, **kwargs))(*args)
        out = jax.block_until_ready(out)
    assert not _races_found(), "the TPU interpreter detected a data race"
    return out


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **TOL[dtype])


def _only_with_slow_selected(request):
    # The full cross-product takes tens of minutes in the interpreter; the default run
    # keeps the reduced sweep, which still covers every value of every axis.
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("extended interpreter sweep; select with -m slow")


# ---------------------------------------------------------------------------------
# Paged attention (decode)

def _cdiv(a, b):
    return -(-int(a) // b)


def _paged_case(dtype, ratio, head_dim, page_size, kv_lens, num_kv_heads=2, max_pages=4, seed=0):
    """Random pages shared by the batch in a shuffled order, extra pages of garbage
    (NaN) that no sequence owns within its length: touching them would poison the
    output."""
    rng = np.random.default_rng(seed)
    B, K, H, S = len(kv_lens), num_kv_heads, head_dim, page_size
    N = K * ratio
    P = B * max_pages + 2
    q = rng.standard_normal((B, 1, N, H))
    k_pages = rng.standard_normal((P, S, K, H))
    v_pages = rng.standard_normal((P, S, K, H))
    perm = rng.permutation(P)
    page_table = perm[: B * max_pages].reshape(B, max_pages)
    kv_lens = np.asarray(kv_lens, np.int32)
    for b in range(B):  # pages at or past the length belong to someone else: NaN them
        for slot in range(_cdiv(kv_lens[b], S), max_pages):
            k_pages[page_table[b, slot]] = np.nan
            v_pages[page_table[b, slot]] = np.nan
    for p in perm[B * max_pages:]:
        k_pages[p] = np.nan
        v_pages[p] = np.nan
    q_positions = np.maximum(kv_lens - 1, 0)[:, None]  # decode: the newest token
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(page_table, jnp.int32),
            jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_lens))


def _paged_reference(q, k_pages, v_pages, page_table, q_positions, kv_lens, **kw):
    # The reference gathers whole page rows, NaN pages included, and masks afterwards;
    # NaN * 0 in its PV einsum would leak. Zero the NaN pages for the reference only.
    k_pages = jnp.nan_to_num(k_pages, nan=0.0)
    v_pages = jnp.nan_to_num(v_pages, nan=0.0)
    return paged_ref.paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, **kw)


def _lengths(S, max_pages):
    # 1, S-1, S, S+1 and the maximum, plus a padding row (position >= length).
    return [1, S - 1, S, S + 1, S * max_pages]


PAGED_SWEEP = [
    # (dtype, q/kv head ratio, head_dim, page_size, window, softcap)
    (jnp.float32, 1, 64, 16, None, None),
    (jnp.float32, 4, 128, 32, 5, None),
    (jnp.float32, 8, 256, 16, None, 30.0),
    (jnp.float32, 4, 64, 32, 20, 30.0),
    (jnp.bfloat16, 1, 128, 32, None, 30.0),
    (jnp.bfloat16, 4, 256, 16, 5, None),
    (jnp.bfloat16, 8, 64, 16, 20, None),
    (jnp.bfloat16, 8, 128, 32, None, None),
]
PAGED_SLOW = [c for c in itertools.product([jnp.float32, jnp.bfloat16], [1, 4, 8], [64, 128, 256], [16, 32],
                                           [None, 5], [None, 30.0]) if c not in PAGED_SWEEP]


def _check_paged(dtype, ratio, head_dim, page_size, window, softcap, pages_per_step, num_kv_heads=2):
    max_pages = 4
    args = _paged_case(dtype, ratio, head_dim, page_size, _lengths(page_size, max_pages), max_pages=max_pages,
                       num_kv_heads=num_kv_heads)
    kw = {"scale": head_dim ** -0.5, "window": window, "softcap": softcap}
    out = _interpret(paged_tpu._paged_attention, *args, pages_per_step=pages_per_step, **kw)
    _close(out, _paged_reference(*args, **kw), dtype)


@pytest.mark.parametrize("dtype,ratio,head_dim,page_size,window,softcap", PAGED_SWEEP)
def test_paged_matches_reference(dtype, ratio, head_dim, page_size, window, softcap):
    # 2 pages per step: exercises both several pages in a step and several steps.
    _check_paged(dtype, ratio, head_dim, page_size, window, softcap, pages_per_step=2)


@pytest.mark.parametrize("dtype,ratio,head_dim,window", [(jnp.float32, 4, 128, None), (jnp.bfloat16, 8, 128, 5)])
def test_paged_one_kv_head_matches_reference(dtype, ratio, head_dim, window):
    """One kv head (a device's share under tensor parallelism): the kernel reads the
    pages as [P, S, H] blocks, not [P, S, 1, H] (paged_attention/tpu.py says why)."""
    _check_paged(dtype, ratio, head_dim, 16, window, None, pages_per_step=2, num_kv_heads=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,ratio,head_dim,page_size,window,softcap", PAGED_SLOW)
def test_paged_matches_reference_full_sweep(request, dtype, ratio, head_dim, page_size, window, softcap):
    _only_with_slow_selected(request)
    _check_paged(dtype, ratio, head_dim, page_size, window, softcap, pages_per_step=3)


def test_paged_public_wrapper_and_padding_queries():
    """The public signature (default pages per step) and queries at p >= kv_len, at
    p < kv_len - 1 and with kv_len == 0."""
    dtype, S = jnp.float32, 16
    q, k_pages, v_pages, page_table, _, _ = _paged_case(dtype, 4, 128, S, [S + 3, 2 * S, S, 5])
    kv_lens = jnp.asarray([S + 3, 2 * S, S, 0], jnp.int32)
    q_positions = jnp.asarray([[S + 3], [S // 2], [S - 1], [0]], jnp.int32)  # padding, mid, last, empty
    kw = {"scale": 0.1, "window": None, "softcap": None}
    args = (q, k_pages, v_pages, page_table, q_positions, kv_lens)
    out = _interpret(paged_tpu.paged_attention, *args, **kw)
    _close(out, _paged_reference(*args, **kw), dtype)
    assert not np.any(np.asarray(out[0])) and not np.any(np.asarray(out[3]))


def quantize_case_pages(pages, cache_dtype):
    """Float pages [P, S, K, H] (NaN rows: pages nobody may read) -> QuantizedPages with
    NaN scales on those rows, so a kernel touching them poisons its output."""
    values, scales = quantize(jnp.nan_to_num(pages, nan=0.0), cache_dtype)  # [P, S, K, H], [P, S, K]
    scales = jnp.where(jnp.isnan(pages).any(-1), jnp.nan, scales)
    return QuantizedPages(values, jnp.swapaxes(scales, 1, 2))  # scales [P, K, S]


def _nan_past_lengths(pages, page_table, q_positions, kv_lens):
    """NaN scales for the rows of each sequence's last page past its length (a masked
    key's scale may be anything: the kernel must keep it out of every sum)."""
    scales = np.array(pages.scales)  # [P, K, S]
    S = scales.shape[-1]
    for b, n in enumerate(np.asarray(kv_lens)):
        if n % S:
            scales[int(page_table[b, n // S]), :, n % S:] = np.nan
    return QuantizedPages(pages.values, jnp.asarray(scales))


def quantized_reference(q, k_pages, v_pages, *rest, **kw):
    """The paged reference in float32 over the pages' dequantized values (NaN pages
    zeroed), cast to q's dtype: what a kernel that dequantizes exactly computes."""
    clean = lambda p: jnp.nan_to_num(dequantize_pages(p, jnp.float32), nan=0.0)  # noqa: E731
    out = paged_ref.paged_attention(q.astype(jnp.float32), clean(k_pages), clean(v_pages), *rest, **kw)
    return out.astype(q.dtype)


@pytest.mark.parametrize("cache_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype,ratio,head_dim,page_size,window,softcap,num_kv_heads", [
    (jnp.float32, 4, 128, 16, None, None, 2),
    (jnp.bfloat16, 8, 128, 32, 5, 30.0, 2),
    (jnp.bfloat16, 4, 64, 16, None, None, 1),  # one kv head: [P, S, H] blocks, (1, S) scales
])
def test_paged_reads_quantized_pages(cache_dtype, dtype, ratio, head_dim, page_size, window, softcap, num_kv_heads):
    """QuantizedPages (values and [P, K, S] scales) against the reference over their
    dequantized values. f32 queries: the kernel scales scores instead of keys (a few ulps);
    bf16: the bf16 tolerance above (the kernel's values are exact in bf16, its p rounded)."""
    max_pages = 4
    q, kf, vf, *rest = _paged_case(jnp.float32, ratio, head_dim, page_size, _lengths(page_size, max_pages),
                                   max_pages=max_pages, num_kv_heads=num_kv_heads)
    k_pages, v_pages = (_nan_past_lengths(quantize_case_pages(p, cache_dtype), *rest) for p in (kf, vf))
    kw = {"scale": head_dim ** -0.5, "window": window, "softcap": softcap}
    q = q.astype(dtype)
    out = _interpret(paged_tpu._paged_attention, q, k_pages, v_pages, *rest, pages_per_step=2, **kw)
    _close(out, quantized_reference(q, k_pages, v_pages, *rest, **kw), dtype)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_paged_quantized_default_steps(num_kv_heads):
    """The public wrapper's default steps (256 tokens: each step reads its 256 lanes of
    the gathered scales) over sequences of 1, 300 and 512 tokens in 32-page tables."""
    S, max_pages = 16, 32
    q, kf, vf, *rest = _paged_case(jnp.float32, 4, 128, S, [1, 300, 512], max_pages=max_pages,
                                   num_kv_heads=num_kv_heads)
    k_pages, v_pages = (quantize_case_pages(p, "int8") for p in (kf, vf))
    kw = {"scale": 128 ** -0.5, "window": None, "softcap": None}
    q = q.astype(jnp.bfloat16)
    out = _interpret(paged_tpu.paged_attention, q, k_pages, v_pages, *rest, **kw)
    _close(out, quantized_reference(q, k_pages, v_pages, *rest, **kw), jnp.bfloat16)


def test_paged_rejects_prefill():
    args = _paged_case(jnp.float32, 1, 64, 16, [3])
    q = jnp.concatenate([args[0]] * 2, axis=1)  # T = 2
    with pytest.raises(AssertionError, match="T == 1"):
        paged_tpu.paged_attention(q, *args[1:], scale=1.0)


# ---------------------------------------------------------------------------------
# Flash attention (prefill)

BLOCK = 16  # small blocks so that T = 4 blocks in the interpreter


def _flash_case(dtype, ratio, head_dim, T, lengths, num_kv_heads=2, seed=0):
    rng = np.random.default_rng(seed)
    B, K, H = len(lengths), num_kv_heads, head_dim
    N = K * ratio
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, T, K, H))
    v = rng.standard_normal((B, T, K, H))
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(lengths, jnp.int32)


FLASH_SWEEP = [
    # (dtype, q/kv head ratio, head_dim, window, softcap)
    (jnp.float32, 1, 64, None, None),
    (jnp.float32, 4, 128, 5, None),
    (jnp.float32, 8, 256, None, 30.0),
    (jnp.float32, 4, 64, 20, 30.0),
    (jnp.bfloat16, 1, 128, None, 30.0),
    (jnp.bfloat16, 4, 256, 5, None),
    (jnp.bfloat16, 8, 64, 20, None),
    (jnp.bfloat16, 8, 128, None, None),
]
FLASH_SLOW = [c for c in itertools.product([jnp.float32, jnp.bfloat16], [1, 4, 8], [64, 128, 256],
                                           [None, 5], [None, 30.0]) if c not in FLASH_SWEEP]


def _check_flash(dtype, ratio, head_dim, window, softcap, T=4 * BLOCK):
    lengths = [1, BLOCK - 1, BLOCK, BLOCK + 1, T]
    args = _flash_case(dtype, ratio, head_dim, T, lengths)
    kw = {"scale": head_dim ** -0.5, "window": window, "softcap": softcap}
    out = _interpret(flash_tpu._flash_attention, *args, block_q=BLOCK, block_k=BLOCK, **kw)
    _close(out, flash_ref.flash_attention(*args, **kw), dtype)


@pytest.mark.parametrize("dtype,ratio,head_dim,window,softcap", FLASH_SWEEP)
def test_flash_matches_reference(dtype, ratio, head_dim, window, softcap):
    _check_flash(dtype, ratio, head_dim, window, softcap)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,ratio,head_dim,window,softcap", FLASH_SLOW)
def test_flash_matches_reference_full_sweep(request, dtype, ratio, head_dim, window, softcap):
    _only_with_slow_selected(request)
    _check_flash(dtype, ratio, head_dim, window, softcap)


def test_flash_public_wrapper_pads_T():
    """The public signature with T not a multiple of the default block (padded inside)."""
    dtype, T = jnp.float32, 20
    args = _flash_case(dtype, 2, 64, T, [20, 7, 0])
    kw = {"scale": 0.125, "window": None, "softcap": None}
    out = _interpret(flash_tpu.flash_attention, *args, **kw)
    _close(out, flash_ref.flash_attention(*args, **kw), dtype)


# ---------------------------------------------------------------------------------
# Real TPU compiler, compile only

def _tpu_devices(topology):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*', the version jax 0.10.2 pins)")
    # Compile-only use: other processes (tests in parallel) may hold libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("window,softcap", [(None, None), (1024, 30.0)])
def test_tpu_compile_production_shapes(topology, window, softcap):
    """32 query heads, 8 kv heads, head_dim 128, 4k context, bf16."""
    devices = _tpu_devices(topology)
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    B, N, K, H, T, S = 8, 32, 8, 128, 4096, 16
    MP = T // S
    P = B * MP
    bf16, i32 = jnp.bfloat16, jnp.int32
    kw = {"scale": H ** -0.5, "window": window, "softcap": softcap}

    paged = jax.jit(lambda *a: paged_tpu.paged_attention(*a, **kw))
    compiled = paged.lower(sds((B, 1, N, H), bf16), sds((P, S, K, H), bf16), sds((P, S, K, H), bf16),
                           sds((B, MP), i32), sds((B, 1), i32), sds((B,), i32)).compile()
    assert "paged_attention_decode" in compiled.as_text()
    # The kernel reads the pages where they are: a relayout of the [P, S, K, H] pages
    # (e.g. merging K into the lanes) would be a copy of each the size of the cache.
    page_bytes = P * S * K * H * 2
    assert compiled.memory_analysis().temp_size_in_bytes < page_bytes // 8, compiled.memory_analysis()

    # Quantized pages: int8 values in the same tiles, [P, K, S] float32 scales read as
    # (K, S) blocks; no relayout either (S = 64: pages of 64 or more for a quantized
    # cache on TPU, pallas_kernels/quantized_kv.py), for 8 kv heads and for one.
    for k_heads, cache_dtype in ((K, jnp.int8), (1, jnp.int8), (K, jnp.float8_e4m3fn)):
        S8 = 64
        P8 = B * (T // S8)
        pages = QuantizedPages(sds((P8, S8, k_heads, H), cache_dtype), sds((P8, k_heads, S8), jnp.float32))
        compiled = paged.lower(sds((B, 1, N // K * k_heads, H), bf16), pages, pages, sds((B, T // S8), i32),
                               sds((B, 1), i32), sds((B,), i32)).compile()
        assert "paged_attention_decode" in compiled.as_text()
        assert compiled.memory_analysis().temp_size_in_bytes < P8 * S8 * k_heads * H // 8, compiled.memory_analysis()

    flash = jax.jit(lambda *a: flash_tpu.flash_attention(*a, **kw))
    compiled = flash.lower(sds((1, T, N, H), bf16), sds((1, T, K, H), bf16), sds((1, T, K, H), bf16),
                           sds((1,), i32)).compile()
    assert "flash_attention_causal" in compiled.as_text()

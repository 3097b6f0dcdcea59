"""The Mosaic GPU flash kernel over a cached prefix in pages
(pallas_kernels/flash_attention/gpu_mosaic.py: paged_prefill) agrees with the paged
reference (pallas_kernels/paged_attention/reference.py with T > 1), which the engine
ran for every prefill chunk that continues earlier context.

Off a GPU the kernel runs in the Mosaic GPU interpreter (test_gpu_mosaic_flash.py says
what it checks and what it cannot) and its lowering is checked by exporting for CUDA;
on an H100/H200 the same cases run compiled. Each case scatters the rows' pages over a
pool whose other pages (and every token past a row's keys) hold a huge value, so a key
read from the wrong page, or past the row's length, moves the output by far more than
the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.flash_attention import gpu_mosaic
from pallas_kernels.paged_attention import reference as paged_ref

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
# As test_gpu_mosaic_flash.py: the float32 reference of the same rounded inputs; the
# kernel rounds P and the output to the input dtype (bf16: 8 bits, a few 2^-9 of |o|).
TOL = {BF16: {"atol": 1.5e-2, "rtol": 1e-2}, F16: {"atol": 3e-3, "rtol": 2e-3}}
STALE = 1e4

pytestmark = pytest.mark.usefixtures("reuse_thread_programs")


def _on_hopper() -> bool:
    return ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


needs_kernel = pytest.mark.skipif(ON_GPU and not _on_hopper(), reason="Mosaic GPU kernel needs sm90 (Hopper)")


def _case(rng, *, dtype, G, H, K, S, T, starts, lengths, MP):
    """Rows with `starts[b]` cached tokens and a chunk of `lengths[b]` (padded to T);
    the keys of [0, start + length) live in scattered pages, everything else is STALE."""
    starts, lengths = np.asarray(starts, np.int32), np.asarray(lengths, np.int32)
    B = len(starts)
    assert ((starts + lengths) <= MP * S).all()
    P = B * MP + 3
    perm = rng.permutation(P)
    table = perm[: B * MP].reshape(B, MP).astype(np.int32)
    k_pages = np.full((P, S, K, H), STALE, np.float32)
    v_pages = np.full((P, S, K, H), STALE, np.float32)
    for b in range(B):
        n = starts[b] + lengths[b]
        for s in range(n):
            k_pages[table[b, s // S], s % S] = rng.standard_normal((K, H))
            v_pages[table[b, s // S], s % S] = rng.standard_normal((K, H))
    q = rng.standard_normal((B, T, K * G, H))
    valid = np.arange(T)[None, :] < lengths[:, None]
    positions = starts[:, None] + np.arange(T, dtype=np.int32)[None, :]
    kv_lens = np.where(lengths > 0, starts + lengths, 0).astype(np.int32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(table)), jnp.asarray(positions), \
        jnp.asarray(kv_lens), jnp.asarray(starts), jnp.asarray(lengths), valid


def _check(*, dtype=BF16, G=2, H=64, K=2, S=16, T=128, starts=(0, 37, 200), lengths=(1, 128, 91), MP=24,
           window=None, softcap=None, seed=0, **knobs):
    (q, k_pages, v_pages, table), positions, kv_lens, starts, lengths, valid = _case(
        np.random.default_rng(seed), dtype=dtype, G=G, H=H, K=K, S=S, T=T, starts=starts, lengths=lengths, MP=MP)
    kw = {"scale": H**-0.5, "window": window, "softcap": softcap}
    assert gpu_mosaic.supports_paged(q, k_pages, window, softcap)
    out = gpu_mosaic.paged_prefill(q, k_pages, v_pages, table, starts, lengths, **kw, interpret=INTERPRET, **knobs)
    with jax.default_matmul_precision("highest"):
        ref = paged_ref.paged_attention(q.astype(F32), k_pages.astype(F32), v_pages.astype(F32), table, positions,
                                        kv_lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(F32))
    assert np.isfinite(out).all(), "non-finite output (an unwritten row reads as NaN in interpret mode)"
    np.testing.assert_allclose(out[valid], np.asarray(ref)[valid], **TOL[dtype])
    assert (out[~valid] == 0).all(), "padding queries must output exactly zero"


# (dtype, G, H, K, S, T, starts, lengths, window, softcap, knobs). S = 16 < 128-key
# blocks: 8 TMA copies per block (one per page); S = 128 / 256: one copy per block, two
# blocks per page at 256. Starts 0 (a fresh row through the paged path), inside a page,
# on a block edge (128, 256), long (300+); lengths 1, the whole chunk, a ragged tail;
# T = 200 pads to two 128-row tiles. Window 5 and 100 (inside a block, across blocks),
# softcap 30 (Gemma).
CASES = [
    (BF16, 2, 64, 2, 16, 128, (0, 37, 200), (1, 128, 91), None, None, {}),
    (BF16, 4, 128, 2, 16, 200, (128, 5), (200, 133), None, None, {}),
    (F16, 1, 64, 4, 128, 128, (256, 0, 301), (77, 128, 128), 100, None, {}),
    (BF16, 3, 64, 2, 256, 128, (300, 17), (128, 64), 5, 30.0, {}),
    (BF16, 2, 64, 2, 32, 128, (64, 3), (128, 100), None, None, {"block_kv": 64, "stages": 3}),
]


@needs_kernel
@pytest.mark.parametrize("dtype,G,H,K,S,T,starts,lengths,window,softcap,knobs", CASES)
def test_paged_prefill_matches_reference(dtype, G, H, K, S, T, starts, lengths, window, softcap, knobs):
    MP = -(-max(s + n for s, n in zip(starts, lengths)) // S) + 1
    _check(dtype=dtype, G=G, H=H, K=K, S=S, T=T, starts=starts, lengths=lengths, MP=MP, window=window,
           softcap=softcap, **knobs)


@needs_kernel
def test_paged_prefill_ignores_table_slots_past_the_keys():
    """Table slots past a row's keys may name any page (freed, another row's, out of
    range): the kernel never lets them into the output."""
    rng = np.random.default_rng(3)
    (q, k_pages, v_pages, table), positions, kv_lens, starts, lengths, valid = _case(
        rng, dtype=BF16, G=2, H=64, K=2, S=16, T=128, starts=(40, 0), lengths=(60, 9), MP=16)
    used = -(-np.asarray(kv_lens)[:, None] // 16)
    junk = jnp.asarray(np.where(np.arange(16)[None] >= used, 10**6, np.asarray(table)).astype(np.int32))
    kw = {"scale": 0.125, "window": None, "softcap": None}
    a = gpu_mosaic.paged_prefill(q, k_pages, v_pages, table, starts, lengths, **kw, interpret=INTERPRET)
    b = gpu_mosaic.paged_prefill(q, k_pages, v_pages, junk, starts, lengths, **kw, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(a.astype(F32))[valid], np.asarray(b.astype(F32))[valid])


def test_supports_paged():
    q = jnp.zeros((1, 64, 8, 128), BF16)
    for S, ok in ((16, True), (8, True), (128, True), (256, True), (4, False), (24, False)):
        assert gpu_mosaic.supports_paged(q, jnp.zeros((4, S, 2, 128), BF16)) == ok, S
    assert not gpu_mosaic.supports_paged(q.astype(F32), jnp.zeros((4, 16, 2, 128), F32))
    assert not gpu_mosaic.supports_paged(jnp.zeros((1, 64, 8, 96), BF16), jnp.zeros((4, 16, 2, 96), BF16))
    with pytest.raises(ValueError, match="supports_paged"):
        gpu_mosaic.paged_prefill(q, jnp.zeros((4, 24, 2, 128), BF16), jnp.zeros((4, 24, 2, 128), BF16),
                                 jnp.zeros((1, 4), jnp.int32), jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32),
                                 scale=1.0)


@pytest.mark.parametrize("S,H", [(16, 128), (256, 128), (16, 256)])
def test_paged_prefill_lowers_for_hopper(S, H):
    """The real (non-interpreted) code path through Mosaic GPU's lowering, exported for
    CUDA without a GPU: wgmma operands, the strided page copies, shared memory."""
    q = jax.ShapeDtypeStruct((2, 256, 32, H), BF16)
    pages = jax.ShapeDtypeStruct((64, S, 8, H), BF16)
    ints = jax.ShapeDtypeStruct((2,), jnp.int32)
    table = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    fn = jax.jit(lambda *a: gpu_mosaic.paged_prefill(*a, scale=H**-0.5))
    exported = export.export(fn, platforms=["cuda"])(q, pages, pages, table, ints, ints)
    assert "mosaic_gpu" in exported.mlir_module()

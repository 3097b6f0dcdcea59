"""Our Mosaic GPU paged decode kernel (pallas_kernels/paged_attention/gpu_mosaic.py)
agrees with reference.py.

Off a GPU the kernel runs in Pallas' Mosaic GPU interpreter (warpgroups as CPU
threads, simulated TMA and mbarriers with strict phase checks, NaN-poisoned memory),
and its Mosaic GPU lowering is checked by exporting for CUDA; on an H100/H200 the same
cases run compiled. Each case is one decode batch with kv lengths 1, S-1, S, S+1 and
the maximum, a query earlier than its last key and a padding query, pages scattered,
every slot no visible key owns (and every table slot past a sequence's pages) holding
someone else's data or a huge value (tests/utils.py: paged_decode_case).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.paged_attention import gpu as paged_gpu
from pallas_kernels.paged_attention import gpu_mosaic
from pallas_kernels.paged_attention import reference as paged_ref
from tests.utils import paged_decode_case

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
# Against the float32 reference of the same (rounded) inputs. The kernel rounds P
# (probabilities relative to the running max, <= 1) to the input dtype before P @ V
# and rounds the output: bf16 keeps 8 bits, so each rounding is <= 2^-9 relative and
# the output (a weighted mean of N(0, 1) values, |o| <~ 3) moves by a few 2^-9;
# measured <= 0.016 at |o| ~ 2-3 with splits (the split outputs are float32, the
# combined one is rounded once). f16 keeps 11 bits: 8x finer.
TOL = {BF16: {"atol": 2e-2, "rtol": 1e-2}, F16: {"atol": 3e-3, "rtol": 2e-3}}
STALE = 1e4  # any of it in a score or a weighted sum would move the output by >> TOL

pytestmark = pytest.mark.usefixtures("reuse_thread_programs")


def _on_hopper() -> bool:
    return ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


needs_kernel = pytest.mark.skipif(ON_GPU and not _on_hopper(), reason="Mosaic GPU kernel needs sm90 (Hopper)")


def _only_when_selected(request):
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("full sweep: select with -m slow")


def _check(*, dtype, G, H, S, K, window, softcap, MP=4, seed=0, table_fill=None, interpret=None, **knobs):
    args, valid = paged_decode_case(np.random.default_rng(seed), dtype=dtype, G=G, H=H, S=S, K=K, MP=MP, stale=STALE)
    if table_fill is not None:  # ids in table slots past each sequence's pages
        table, lens = np.asarray(args[3]), np.asarray(args[5])
        used = -(-lens[:, None] // S)
        args = (*args[:3], jnp.asarray(np.where(np.arange(table.shape[1])[None] >= used, table_fill, table)),
                *args[4:])
    kw = {"scale": H**-0.5, "window": window, "softcap": softcap}
    assert gpu_mosaic.supports(args[0], args[1], window, softcap)
    interpret = INTERPRET if interpret is None else interpret
    if knobs:
        out = gpu_mosaic.paged_attention_tuned(*args, **kw, interpret=interpret, **knobs)
    else:
        out = gpu_mosaic.paged_attention(*args, **kw, interpret=interpret)
    with jax.default_matmul_precision("highest"):
        ref = paged_ref.paged_attention(*(x.astype(F32) if x.dtype == dtype else x for x in args), **kw)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    out = np.asarray(out.astype(F32))
    assert np.isfinite(out).all(), "non-finite output (an unwritten row reads as NaN in interpret mode)"
    np.testing.assert_allclose(out, np.asarray(ref), **TOL[dtype])
    assert (out[~valid] == 0).all(), "padding queries must output exactly zero"


# (dtype, G, H, S, K, window, softcap, knobs). A block is 128 rows (token, kv head):
# K = 8 gives 16 tokens per block, so S = 16 is one page per block and S = 64 four
# blocks per page; K = 2 gives 64 tokens, so S = 16 / 32 take 4 / 2 pages per block
# (TMA copies into one slot, table slots past the length read as page 0). G = 3: a
# group that is not a power of two; G = 16 with K = 8: 128 query heads, two compute
# warpgroups; window 5 < S and 40 > S; splits > 1 combine float32 partials.
CASES = [
    (BF16, 4, 128, 16, 8, None, None, {}),
    (BF16, 4, 128, 64, 8, 40, 30.0, {"num_splits": 3}),
    (F16, 1, 64, 16, 2, 5, None, {}),
    (BF16, 3, 64, 32, 2, None, 30.0, {"num_splits": 2}),
    (BF16, 8, 256, 16, 1, 40, None, {}),  # Gemma-3 1B shape: one kv head, head_dim 256
    (BF16, 16, 128, 16, 8, None, None, {"num_splits": 1}),
    (F16, 4, 128, 16, 4, None, None, {"block_rows": 64, "stages": 4, "num_splits": 2}),
]


@needs_kernel
@pytest.mark.parametrize("dtype,G,H,S,K,window,softcap,knobs", CASES)
def test_mosaic_paged_matches_reference(dtype, G, H, S, K, window, softcap, knobs):
    _check(dtype=dtype, G=G, H=H, S=S, K=K, window=window, softcap=softcap, **knobs)


@needs_kernel
def test_mosaic_paged_ignores_out_of_range_table_slots():
    """Table slots past a sequence's last page may hold any id, even one past the pool
    (the engine's free slots): with blocks spanning pages the kernel must not copy them."""
    _check(dtype=BF16, G=4, H=64, S=16, K=2, window=None, softcap=None, table_fill=10_000)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,G,H,S,K,window,softcap,splits",
    list(itertools.product([BF16, F16], [1, 4], [64, 128], [16, 64], [2, 8], [None, 5], [None, 30.0], [1, 3])),
)
def test_mosaic_paged_full_sweep(request, dtype, G, H, S, K, window, softcap, splits):
    _only_when_selected(request)
    _check(dtype=dtype, G=G, H=H, S=S, K=K, window=window, softcap=softcap, num_splits=splits)


@pytest.mark.skipif(ON_GPU, reason="interpreter only")
def test_mosaic_paged_has_no_races():
    """The interpreter's race detector over shared memory and TMA: multi-page blocks,
    a window, splits."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic

    params = flash_mosaic.InterpretGPUParams(detect_races=True)
    _check(dtype=BF16, G=2, H=64, S=16, K=2, window=40, softcap=None, interpret=params, num_splits=2)
    assert not interpret_pallas_call.get_races().races_found


# ---------------------------------------------------------------- geometry, fallback


def test_block_geometry():
    """(tokens per block, TMA copies per block) for the page layouts we serve."""
    c128, c64 = gpu_mosaic.Config(block_rows=128), gpu_mosaic.Config(block_rows=64)
    assert gpu_mosaic._geometry(16, 8, c128) == (16, 1)  # Llama-3 8B, page 16: one page per block
    assert gpu_mosaic._geometry(64, 8, c128) == (16, 1)  # a block is a quarter page
    assert gpu_mosaic._geometry(16, 2, c128) == (64, 4)
    assert gpu_mosaic._geometry(16, 1, c64) == (64, 4)
    assert gpu_mosaic._geometry(4, 1, c64) is None  # 4-row pages: not a whole 8-row smem tile
    assert gpu_mosaic._geometry(16, 3, c128) is None  # kv heads not a power of two


def test_supports_and_fallback():
    def arrays(dtype, H=128, N=32, K=8, S=16):
        return jnp.zeros((2, 1, N, H), dtype), jnp.zeros((4, S, K, H), dtype)

    assert gpu_mosaic.supports(*arrays(BF16))
    assert gpu_mosaic.supports(*arrays(F16, H=256, N=8, K=1))
    assert gpu_mosaic.supports(*arrays(BF16, N=128))
    assert not gpu_mosaic.supports(*arrays(F32))  # wgmma has no plain f32
    assert not gpu_mosaic.supports(*arrays(BF16, H=96))
    assert not gpu_mosaic.supports(*arrays(BF16, N=256))  # more than two warpgroups of rows
    assert not gpu_mosaic.supports(*arrays(BF16, N=24, K=3))
    assert not gpu_mosaic.supports(jnp.zeros((2, 2, 32, 128), BF16), arrays(BF16)[1])  # not decode

    args, _ = paged_decode_case(np.random.default_rng(1), dtype=F32, G=2, H=64, S=16)
    kw = {"scale": 0.125, "window": 7, "softcap": 30.0}
    out = gpu_mosaic.paged_attention(*args, **kw, interpret=INTERPRET)
    want = paged_gpu.paged_attention(*args, **kw, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_split_count_fills_the_sms():
    assert gpu_mosaic.default_num_splits(32, blocks=256, sms=132) == 4  # 128 CTAs
    assert gpu_mosaic.default_num_splits(1, blocks=2048, sms=132) == 132
    assert gpu_mosaic.default_num_splits(1, blocks=8, sms=132) == 2  # >= 4 blocks per split
    assert gpu_mosaic.default_num_splits(200, blocks=256, sms=132) == 1


@needs_kernel
def test_one_short_sequence_runs_the_triton_kernel(monkeypatch):
    """Batch 1 over a table of <= 2048 tokens runs the Triton kernel (quicker there on the
    H200: gpu_mosaic._LATENCY_BOUND_TOKENS); a wider table or explicit knobs keep this
    kernel, as does a second sequence. Every path gives the reference's result."""
    assert gpu_mosaic.latency_bound(1, 2048) and not gpu_mosaic.latency_bound(1, 2064)
    assert not gpu_mosaic.latency_bound(2, 64)
    args, _ = paged_decode_case(np.random.default_rng(3), dtype=BF16, G=4, H=128, S=16, K=8, MP=4)
    q, k, v, table, pos, lens = args
    one = (q[4:5], k, v, table[4:5], pos[4:5], lens[4:5])  # kv_len 64: the whole table
    wide = (*one[:3], jnp.pad(one[3], ((0, 0), (0, 125))), *one[4:])  # 129 pages: 2064 tokens
    calls = []
    real = paged_gpu.paged_attention
    monkeypatch.setattr(paged_gpu, "paged_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    kw = {"scale": 128**-0.5, "interpret": INTERPRET}
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(paged_ref.paged_attention(*(x.astype(F32) if x.dtype == BF16 else x for x in one),
                                                   scale=kw["scale"]))
    for call, triton in [(one, True), (wide, False)]:
        out = gpu_mosaic.paged_attention_tuned(*call, **kw)
        np.testing.assert_allclose(np.asarray(out.astype(F32)), ref, **TOL[BF16])
        assert calls == [(1, 1, 32, 128)], (triton, calls)
    gpu_mosaic.paged_attention_tuned(*one, num_splits=2, **kw)
    assert len(calls) == 1


def test_shared_memory_budget():
    limit = 227 * 1024
    for H, wgs in itertools.product(gpu_mosaic.HEAD_DIMS, (1, 2)):
        config = gpu_mosaic.default_config(H, wgs)
        assert gpu_mosaic.smem_bytes(H, 2, config, wgs) <= limit, (H, wgs, config)
    assert gpu_mosaic.default_config(128) == gpu_mosaic.Config(block_rows=128, stages=2)
    args, _ = paged_decode_case(np.random.default_rng(0), dtype=BF16, G=4, H=256, S=16, K=1)
    with pytest.raises(ValueError, match="shared memory"):
        gpu_mosaic.paged_attention_tuned(*args, scale=0.1, block_rows=128, stages=4)


# ---------------------------------------------------------------- compile checks


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("H,N,K,S", [(128, 32, 8, 16), (128, 32, 8, 64), (64, 8, 2, 16), (256, 4, 1, 16),
                                     (128, 128, 8, 16)])
def test_kernel_lowers_for_hopper(dtype, H, N, K, S):
    """The real Mosaic GPU lowering (wgmma operands, layouts, stores to global memory,
    the shared-memory check) by exporting for CUDA on CPU; PTX and register allocation
    need the GPU itself."""
    sds = jax.ShapeDtypeStruct
    B, P, MP = 3, 40, 8
    shapes = (sds((B, 1, N, H), dtype), sds((P, S, K, H), dtype), sds((P, S, K, H), dtype), sds((B, MP), jnp.int32),
              sds((B, 1), jnp.int32), sds((B,), jnp.int32))
    for kw in ({"num_splits": 1}, {"num_splits": 3, "window": 40, "softcap": 30.0}):
        fn = functools.partial(gpu_mosaic.paged_attention_tuned, scale=0.1, **kw)
        module = export.export(jax.jit(fn), platforms=["cuda"])(*shapes).mlir_module()
        assert "mosaic_gpu" in module

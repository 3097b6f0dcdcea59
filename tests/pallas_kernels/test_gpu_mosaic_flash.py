"""Our Mosaic GPU flash attention (pallas_kernels/flash_attention/gpu_mosaic.py) agrees
with reference.py.

Off a GPU the kernel runs in Pallas' Mosaic GPU interpreter: its three warpgroups are
CPU threads, shared memory, TMA copies and mbarriers are simulated (a thread waiting
for a barrier phase the barrier has already passed, or a phase nobody observed, is an
error), and buffers start as NaN, so an output row the kernel never writes fails the
finite check. Its Mosaic GPU lowering (wgmma, layouts, shared-memory budget) is checked
by exporting for CUDA, which needs no GPU. On an H100 the same sweeps run compiled.

The interpreter compiles its per-thread program once per grid point and thread (~3 s
each on 2 cores); the `reuse_thread_programs` fixture (conftest.py) compiles it once per
thread for the whole kernel instead, which makes it ~30x faster and changes nothing
else. The default run covers every factor (dtype, head ratio G, head_dim, T at tile
edges, lengths 1 / < T / == T, window, softcap, the tuning knobs) in hand-picked
combinations (~1.5 minutes); `-m slow` runs the cross products (128 cases, ~22 minutes).
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.flash_attention import gpu_mosaic
from pallas_kernels.flash_attention import reference as flash_ref

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32

# Tolerances against the float32 reference on the same (rounded) inputs, i.e. the
# exact attention of what the kernel reads. The kernel rounds twice: P (each
# probability, <= 1, relative to the running max) to the input dtype before P @ V,
# and the output. bf16 keeps 8 bits: each rounding is <= 2^-9 relative, so the output
# (a weighted mean of N(0, 1) values, |o| <~ 3) moves by <= 2^-9 |o| from its own
# rounding plus a few 2^-9 |v| from P's; measured up to 0.0094 absolute at |o| ~ 1.7.
# f16 keeps 11 bits (8x finer): measured up to 0.0011.
TOL = {BF16: {"atol": 1e-2, "rtol": 1e-2}, F16: {"atol": 2e-3, "rtol": 2e-3}}
# Keys and values of padding positions: if the kernel let one into a score or a
# weighted sum, the output would move by orders of magnitude more than TOL.
STALE = 1e4


def _on_hopper() -> bool:
    return ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


needs_kernel = pytest.mark.skipif(ON_GPU and not _on_hopper(), reason="Mosaic GPU kernel needs sm90 (Hopper)")
# The Mosaic GPU interpreter compiles once per thread, not per grid point (conftest.py).
pytestmark = pytest.mark.usefixtures("reuse_thread_programs")


def _only_when_selected(request):
    """The cross products take ~22 minutes in the interpreter: run them only with -m slow."""
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("full sweep: select with -m slow")


def _case(rng, *, dtype, G, H, T, lengths, K=2):
    lengths = np.asarray(lengths, np.int32)
    B = len(lengths)
    valid_bt = np.arange(T)[None, :] < lengths[:, None]
    k = np.where(valid_bt[..., None, None], rng.standard_normal((B, T, K, H)), STALE)
    v = np.where(valid_bt[..., None, None], rng.standard_normal((B, T, K, H)), STALE)
    q = rng.standard_normal((B, T, K * G, H))
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))
    return args, np.broadcast_to(valid_bt[:, :, None, None], (B, T, K * G, H))


def _reference(q, k, v, lengths, **kw):
    # The exact attention of the kernel's inputs: the same values in float32.
    with jax.default_matmul_precision("highest"):
        return flash_ref.flash_attention(q.astype(F32), k.astype(F32), v.astype(F32), lengths, **kw)


def _check(*, dtype, G, H, T, lengths, window, softcap, K=2, seed=0, interpret=None, **knobs):
    assert all(0 <= n <= T for n in lengths)
    args, valid = _case(np.random.default_rng(seed), dtype=dtype, G=G, H=H, T=T, lengths=lengths, K=K)
    kw = {"scale": H**-0.5, "window": window, "softcap": softcap}
    assert gpu_mosaic.supports(args[0], args[1], window, softcap)
    interpret = INTERPRET if interpret is None else interpret
    if knobs:
        out = gpu_mosaic.flash_attention_tuned(*args, **kw, interpret=interpret, **knobs)
    else:
        out = gpu_mosaic.flash_attention(*args, **kw, interpret=interpret)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    out = np.asarray(out.astype(F32))
    ref = np.asarray(_reference(*args, **kw))
    assert np.isfinite(out).all(), "non-finite output (an unwritten row reads as NaN in interpret mode)"
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    assert (out[~valid] == 0).all(), "padding queries must output exactly zero"


# (dtype, G, H, T, lengths, window, softcap, knobs): every value of every factor. The
# 128-row tile holds two 64-row warpgroups: T = 17 leaves the second one all padding,
# T = 129 / 257 / 300 cross tiles (and are padded to 256 / 384), window 5 gives the
# two warpgroups of a tile different first key blocks, window 40 / 70 / 100 cut key
# blocks in the middle, block_kv = 64 puts the diagonal of warpgroup 0 one block before
# warpgroup 1's (a skip step).
CASES = [
    (BF16, 1, 64, 1, [1], None, None, {}),
    (BF16, 4, 64, 16, [0, 1, 16], None, None, {}),  # an engine prefill batch: a padding row (length 0)
    (F16, 4, 64, 17, [1, 15, 16, 17], None, 30.0, {}),
    (BF16, 8, 128, 129, [1, 65, 128, 129], 40, None, {}),
    (F16, 1, 128, 300, [1, 127, 200, 300], 100, 30.0, {}),
    (BF16, 4, 64, 300, [129, 256, 300], 5, None, {}),
    (BF16, 2, 256, 200, [1, 64, 65, 200], 70, 50.0, {}),
    (F16, 4, 128, 257, [1, 200, 257], None, None, {"block_kv": 64, "stages": 3}),
]


@needs_kernel
@pytest.mark.parametrize("dtype,G,H,T,lengths,window,softcap,knobs", CASES)
def test_mosaic_flash_matches_reference(dtype, G, H, T, lengths, window, softcap, knobs):
    _check(dtype=dtype, G=G, H=H, T=T, lengths=lengths, window=window, softcap=softcap, **knobs)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,G,H,window,softcap",
    list(itertools.product([BF16, F16], [1, 4, 8], [64, 128], [None, 40], [None, 30.0])),
)
def test_mosaic_flash_full_sweep(request, dtype, G, H, window, softcap):
    _only_when_selected(request)
    _check(dtype=dtype, G=G, H=H, T=300, lengths=[1, 127, 128, 129, 300], window=window, softcap=softcap)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize(
    "T,H,window,softcap",
    list(itertools.product([1, 15, 16, 17, 64, 65, 127, 128, 129, 300], [64, 128], [None, 7], [None, 30.0])),
)
def test_mosaic_flash_edge_lengths_sweep(request, T, H, window, softcap):
    _only_when_selected(request)
    lengths = sorted({1, max(1, T // 2), max(1, T - 1), T})
    _check(dtype=BF16, G=4, H=H, T=T, lengths=lengths, window=window, softcap=softcap)


@pytest.mark.skipif(ON_GPU, reason="interpreter only")
def test_mosaic_flash_has_no_races():
    """The interpreter's happens-before race detector over shared memory and TMA, on
    a case with skip steps, a window edge and a length edge."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    params = gpu_mosaic.InterpretGPUParams(detect_races=True)
    _check(dtype=BF16, G=2, H=64, T=300, lengths=[129, 300], window=70, softcap=None, K=1, interpret=params,
           block_kv=64)
    assert not interpret_pallas_call.get_races().races_found


# ---------------------------------------------------------------- block ranges


@pytest.mark.parametrize("block_kv", [64, 128])
@pytest.mark.parametrize("window", [None, 1, 5, 64, 100, 1000])
def test_key_block_ranges_are_exact(block_kv, window):
    """For every warpgroup position and row length: [first, last) holds exactly the
    key blocks with a key visible to one of the 64 queries (none when the queries are
    all padding), and [mid_lo, mid_hi) exactly those visible to all of them."""
    bq, T = 64, 512
    q0s = np.arange(0, T, bq)
    for length in (0, 1, 63, 64, 65, 127, 128, 200, 383, 384, 512):
        for q0 in q0s:
            r = gpu_mosaic._key_range(jnp.int32(q0), jnp.int32(length), block_q=bq, block_kv=block_kv, window=window)
            first, mid_lo, mid_hi, last = (int(x) for x in (r.first, r.mid_lo, r.mid_hi, r.last))
            t = np.arange(q0, q0 + bq)[:, None]
            s = np.arange(T)[None, :]
            vis = (s <= t) & (s < length)
            if window is not None:
                vis &= s > t - window
            blocks = vis.reshape(bq, T // block_kv, block_kv)
            some = np.flatnonzero(blocks.any(axis=(0, 2)))
            assert first <= mid_lo <= mid_hi <= last, (q0, length, r)
            if q0 >= length:
                assert first == last, (q0, length, r)
                continue
            assert (first, last) == (some[0], some[-1] + 1), (q0, length, first, last, some)
            every = np.flatnonzero(blocks.all(axis=(0, 2)))
            assert list(range(mid_lo, mid_hi)) == list(every), (q0, length, mid_lo, mid_hi, every)


# ---------------------------------------------------------------- fallback and shapes


def test_supports():
    def arrays(dtype, H, N=8, K=2):
        return jnp.zeros((1, 16, N, H), dtype), jnp.zeros((1, 16, K, H), dtype)

    for dtype, H in itertools.product([BF16, F16], gpu_mosaic.HEAD_DIMS):
        assert gpu_mosaic.supports(*arrays(dtype, H))
        assert gpu_mosaic.supports(*arrays(dtype, H), window=5, softcap=30.0)
    assert not gpu_mosaic.supports(*arrays(F32, 128))  # wgmma has no plain f32
    assert not gpu_mosaic.supports(*arrays(BF16, 32))
    assert not gpu_mosaic.supports(*arrays(BF16, 96))
    assert not gpu_mosaic.supports(*arrays(BF16, 512))
    assert not gpu_mosaic.supports(arrays(BF16, 64)[0], arrays(F16, 64)[1])


def test_unsupported_calls_run_the_triton_kernel():
    rng = np.random.default_rng(3)
    args, _ = _case(rng, dtype=F32, G=2, H=32, T=20, lengths=[1, 20])
    kw = {"scale": 0.2, "window": 6, "softcap": 30.0}
    out = gpu_mosaic.flash_attention(*args, **kw, interpret=INTERPRET)
    want = flash_gpu.flash_attention(*args, **kw, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_shared_memory_budget():
    """The defaults fit Hopper's 227 KiB with the numbers of the module docstring; a
    config that does not is refused before lowering."""
    limit = 227 * 1024
    overhead = 11 * 8 + 2048  # 11 mbarriers at 2 stages, Mosaic's reduction scratch
    assert gpu_mosaic.smem_bytes(64, 2, gpu_mosaic.default_config(64)) == 81920 + overhead
    assert gpu_mosaic.smem_bytes(128, 2, gpu_mosaic.default_config(128)) == 163840 + overhead
    assert gpu_mosaic.smem_bytes(256, 2, gpu_mosaic.default_config(256)) == 196608 + overhead
    assert gpu_mosaic.smem_bytes(128, 2, gpu_mosaic.Config(stages=3)) <= limit  # bench's sweep variant
    args, _ = _case(np.random.default_rng(0), dtype=BF16, G=1, H=256, T=16, lengths=[16])
    with pytest.raises(ValueError, match="shared memory"):
        gpu_mosaic.flash_attention_tuned(*args, scale=0.1, stages=3)


# ---------------------------------------------------------------- compile checks


def test_module_imports_without_a_gpu():
    """Nothing at import time needs CUDA or initializes a backend (the bundled Mosaic
    kernel asserts on CUDA versions when called; this module never asks)."""
    code = (
        "import jax\n"
        "from jax._src import xla_bridge\n"
        "from pallas_kernels.flash_attention import gpu_mosaic\n"
        "assert not getattr(xla_bridge, '_backends', {}), 'a backend was initialized at import'\n"
        "print(gpu_mosaic.default_config(128))\n"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Config(" in done.stdout


def _export_for_cuda(fn, *shapes):
    """Runs Pallas' Mosaic GPU lowering (and its shared-memory check) without a GPU."""
    return export.export(jax.jit(fn), platforms=["cuda"])(*shapes)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("H", gpu_mosaic.HEAD_DIMS)
@pytest.mark.parametrize("G", [1, 4])
def test_kernel_lowers_for_hopper(dtype, H, G):
    """Catches what interpret mode cannot: the wgmma operands (K^T through the swizzled
    layout, P from registers into a pre-initialized accumulator), layout casts, ops
    without a Mosaic GPU lowering, and the shared-memory limit. (PTX compilation and
    register allocation need the GPU itself.)"""
    sds = jax.ShapeDtypeStruct
    B, K, T = 2, 2, 200
    shapes = (sds((B, T, K * G, H), dtype), sds((B, T, K, H), dtype), sds((B, T, K, H), dtype), sds((B,), jnp.int32))
    variants = [{"window": None, "softcap": None}, {"window": 40, "softcap": 30.0}]
    if H == 128:  # the benchmark's sweep
        variants += [{"window": None, "softcap": None, "block_kv": 64}, {"window": None, "softcap": None, "stages": 3}]
    for kw in variants:
        fn = functools.partial(gpu_mosaic.flash_attention_tuned, scale=0.1, **kw)
        exported = _export_for_cuda(fn, *shapes)
        assert "mosaic_gpu" in exported.mlir_module()


def test_dispatch_runs_the_mosaic_kernels_on_hopper_only(monkeypatch):
    """impl="gpu": the Mosaic GPU kernels on sm90 (measured faster: prefill 1.07-1.18x
    cuDNN, decode ~1.6x our Triton kernel; pallas_kernels/BENCHMARKS.md), the Triton
    kernels elsewhere and in interpret mode."""
    from pallas_kernels import dispatch
    from pallas_kernels.paged_attention import gpu as paged_gpu
    from pallas_kernels.paged_attention import gpu_mosaic as paged_mosaic

    for kernel in ("flash_attention", "paged_attention"):
        assert dispatch.module_name(kernel, "gpu") == ("gpu_mosaic" if _on_hopper() else "gpu")
        assert dispatch.module_name(kernel, "reference") == "reference"
    monkeypatch.setattr(dispatch, "on_hopper", lambda: True)
    for kernel, want in (("flash_attention", gpu_mosaic.flash_attention),
                         ("paged_attention", paged_mosaic.paged_attention)):
        assert dispatch.module_name(kernel, "gpu") == "gpu_mosaic"
        fn = dispatch.load(kernel, "gpu")  # a partial(interpret=True) off a GPU
        assert getattr(fn, "func", fn) is want
    monkeypatch.setattr(dispatch, "on_hopper", lambda: False)
    for kernel, want in (("flash_attention", flash_gpu.flash_attention), ("paged_attention", paged_gpu.paged_attention)):
        fn = dispatch.load(kernel, "gpu")
        assert getattr(fn, "func", fn) is want


def test_layers_share_one_lowered_kernel():
    """The entry points are jax.jit: a model's per-layer calls lower to one kernel
    module instead of one copy per call (unwrapped, each Mosaic GPU call embedded ~0.5 MB
    and ~0.3 s of lowering; an 8B engine compiled minutes longer on the H100)."""
    from pallas_kernels.flash_attention import tpu as flash_tpu
    from pallas_kernels.paged_attention import gpu as paged_gpu
    from pallas_kernels.paged_attention import gpu_mosaic as paged_mosaic
    from pallas_kernels.paged_attention import tpu as paged_tpu

    for fn in (gpu_mosaic.flash_attention, flash_gpu.flash_attention, flash_tpu.flash_attention,
               paged_gpu.paged_attention, paged_mosaic.paged_attention, paged_tpu.paged_attention):
        assert hasattr(fn, "lower"), f"{fn.__module__}.{fn.__name__} is not jitted"

    sds = jax.ShapeDtypeStruct
    B, T, K, G, H = 1, 128, 2, 2, 64
    shapes = (sds((B, T, K * G, H), BF16), sds((B, T, K, H), BF16), sds((B, T, K, H), BF16), sds((B,), jnp.int32))

    def three_layers(q, k, v, lengths):
        for _ in range(3):
            q = gpu_mosaic.flash_attention(q, k, v, lengths, scale=0.1)
        return q

    module = _export_for_cuda(three_layers, *shapes).mlir_module()
    assert module.count("stablehlo.custom_call") == 1

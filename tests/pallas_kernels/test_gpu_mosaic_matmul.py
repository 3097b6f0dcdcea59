"""The Mosaic GPU skinny matmul (pallas_kernels/quantized_matmul/gpu_mosaic.py) against
its reference, for bf16, int8 and e4m3 weights.

Off a GPU the kernel runs in Pallas' Mosaic GPU interpreter (warpgroups as CPU threads,
simulated TMA and mbarriers with strict phase checks, uninitialized shared memory
NaN-poisoned: the x tile's rows past M hold NaN, so a row mix-up or an unwritten output
shows), and its Mosaic GPU lowering is checked by exporting for CUDA at Llama-3.1-8B's
projection shapes; on an H100/H200 the same cases run compiled.

Tolerance: kernel and reference take the same bf16 values (a quantized weight's values
convert to bf16 exactly) and sum float32 products; only the order of the sums differs
(tiles of block_k, split-K partials), a few float32 ulps of the sum's magnitude. The
bf16 output rounds once (2^-8 relative), so a value may land one bf16 ulp away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.quantized_matmul import gpu_mosaic as gm
from runtime.quantization import quantize

BF16 = jnp.bfloat16
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

pytestmark = [
    pytest.mark.usefixtures("reuse_thread_programs"),
    pytest.mark.skipif(ON_GPU and not gm.runs_here(), reason="Mosaic GPU kernel needs sm90 (Hopper)"),
]


def _case(M, D, N, mode, seed):
    """x [M, D] bf16 and w [D, N]: bf16, or quantized per output channel as the runtime
    does (scale [N]); column 3 all zeros."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, D)), BF16)
    w = rng.standard_normal((D, N)) * 0.05
    w[:, 3] = 0.0
    if mode == "bf16":
        return x, jnp.asarray(w, BF16), None
    q, scale = quantize(jnp.asarray(w, jnp.float32), (0,), mode)
    return x, q, scale


def _check(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype == BF16
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("M,D,N,knobs", [
    (1, 256, 128, {}),                                         # batch 1, default config
    (7, 512, 192, {"block_n": 64, "num_splits": 3}),           # rows padded to 8; 8 steps over 3 splits
    (13, 320, 256, {"num_splits": 2, "stages": 2}),            # 5 steps, a ring shorter than the steps
    (64, 128, 128, {"block_k": 128}),                          # a full wgmma tile, one step
    (33, 256, 256, {"block_n": 256, "block_k": 64, "stages": 3}),
])
def test_matches_reference(mode, M, D, N, knobs):
    x, w, scale = _case(M, D, N, mode, seed=M + D + N)
    out = gm.matmul_tuned(x, w, scale, interpret=INTERPRET, **knobs)
    _check(out, gm.reference(x, w, scale))
    assert np.all(np.asarray(out[:, 3], np.float32) == 0)  # the zero column


def test_default_config_call():
    x, w, scale = _case(2, 512, 128, "int8", seed=1)
    _check(gm.matmul(x, w, scale, interpret=INTERPRET), gm.reference(x, w, scale))


def test_reference_is_the_projection_the_model_runs():
    """The reference equals runtime.models.layers.project over the same 2-D weight."""
    from runtime.models.layers import project

    for mode in ("bf16", "int8"):
        x, w, scale = _case(5, 256, 128, mode, seed=2)
        want = project("MD,DN->MN", x, w, scale)
        np.testing.assert_allclose(np.asarray(gm.reference(x, w, scale), np.float32), np.asarray(want, np.float32),
                                   rtol=2 ** -7, atol=0)


def test_default_configs_fit_and_tile():
    """Llama-3.1-8B's projections at decode batches: every default config tiles the
    shape, fits shared memory, keeps at most one CTA per SM, and keeps >= 96 KiB of
    loads in flight per CTA."""
    for D, N in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        for M in (1, 8, 64):
            for wdtype in (BF16, jnp.int8, jnp.float8_e4m3fn):
                c = gm.default_config(M, D, N, wdtype, sms=132)
                assert D % c.block_k == 0 and N % c.block_n == 0, c
                assert gm.smem_bytes(M, wdtype, c) <= gm._SMEM_LIMIT, c
                ctas = N // c.block_n * c.num_splits
                assert ctas <= 132 or c.num_splits == 1, (D, N, M, c)
                per_step = 64 * c.block_k * 2 + c.block_k * c.block_n * jnp.dtype(wdtype).itemsize
                assert c.stages * per_step >= 96 * 1024, c


def test_unsupported_calls_are_refused():
    x, w, scale = _case(2, 256, 128, "int8", seed=3)
    assert gm.supports(x, w, scale)
    assert not gm.supports(x[:, :100], w[:100], scale)  # D not a multiple of 64
    assert not gm.supports(x, w[:, :100], scale[:100])  # N
    assert not gm.supports(x.astype(jnp.float32), w, scale)
    assert not gm.supports(x, w, None)  # a quantized weight without its scales
    assert not gm.supports(x, w.astype(BF16), scale)  # scales for a bf16 weight
    assert not gm.supports(jnp.zeros((65, 256), BF16), w, scale)  # more rows than one wgmma tile
    with pytest.raises(ValueError, match="unsupported"):
        gm.matmul_tuned(x, w, scale[:64], interpret=INTERPRET)


@pytest.mark.parametrize("wdtype", [BF16, jnp.int8, jnp.float8_e4m3fn])
def test_lowers_for_cuda_at_llama_shapes(wdtype):
    """Llama-3.1-8B's fused projections at batch 1, 8 and 64 through the real Mosaic GPU
    lowering (what the interpreter cannot check: layouts, swizzles, the e4m3 convert)."""
    sds = jax.ShapeDtypeStruct
    for D, N in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        for M in (1, 8, 64):
            scale = (sds((N,), jnp.float32),) if wdtype != BF16 else ()
            module = export.export(jax.jit(functools.partial(gm.matmul_tuned)), platforms=["cuda"])(
                sds((M, D), BF16), sds((D, N), wdtype), *scale).mlir_module()
            assert "mosaic_gpu" in module


def test_model_projections_run_the_kernel(monkeypatch):
    """runtime.models.layers.project with DENSE_MATMUL="interpret" ("kernel" on a GPU) runs the kernel on the
    model's own einsums (fused q/k/v, output, down: [batch..., contracted...] views) and
    gives XLA's result; an einsum that is no such view (unfused k with w [K, H, D]) stays
    with XLA."""
    from runtime.models import layers

    rng = np.random.default_rng(4)
    B, T, D, K, J, H, F = 3, 1, 128, 2, 4, 64, 192
    cases = [
        ("BTD,DKJH->BTKJH", (B, T, D), (D, K, J, H)),
        ("BTNH,NHD->BTD", (B, T, K * J, H), (K * J, H, D)),
        ("BTF,FD->BTD", (B, T, F), (F, D)),
        ("BTD,KHD->BTKH", (B, T, D), (K, H, D)),
    ]
    calls = []
    real = gm.matmul
    monkeypatch.setattr(gm, "matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    for spec, xs, ws in cases:
        x = jnp.asarray(rng.standard_normal(xs), BF16)
        w = jnp.asarray(rng.standard_normal(ws) * 0.05, BF16)
        monkeypatch.setattr(layers, "DENSE_MATMUL", "xla")
        want = layers.project(spec, x, w)
        monkeypatch.setattr(layers, "DENSE_MATMUL", "interpret" if INTERPRET else "kernel")
        got = layers.project(spec, x, w)
        assert got.shape == want.shape and got.dtype == want.dtype
        _check(got, want)
    assert calls == [(D, K * J * H), (K * J * H, D), (F, D)]


def test_dense_matmul_modes():
    """The kernel runs only when asked for: "kernel" on Hopper, "interpret" anywhere;
    "xla" (the default, runtime/BENCHMARKS.md session 17) never."""
    from runtime.models import layers

    assert layers.DENSE_MATMUL == "xla"
    assert layers.dense_matmul_path("xla", True) == "xla"
    assert layers.dense_matmul_path("kernel", True) == "kernel"
    assert layers.dense_matmul_path("kernel", False) == "xla"
    assert layers.dense_matmul_path("interpret", False) == "kernel"
    with pytest.raises(ValueError, match="dense matmul mode"):
        layers.dense_matmul_path("auto", True)

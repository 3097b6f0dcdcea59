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
    """The kernel runs where asked for: "kernel" on Hopper, "interpret" anywhere, "xla"
    never; "auto" (the default) only the gated form, only on Hopper, only from
    GATED_MIN_ROWS rows (runtime/BENCHMARKS.md sessions 17 and 19)."""
    from runtime.models import layers

    assert layers.DENSE_MATMUL == "auto" and layers.GATED_MIN_ROWS == 64
    assert layers.dense_matmul_path("auto", True, gated=True, rows=64) == "kernel"
    assert layers.dense_matmul_path("auto", True, gated=True, rows=63) == "xla"
    assert layers.dense_matmul_path("auto", True, gated=True) == "xla"  # rows unknown
    assert layers.dense_matmul_path("auto", False, gated=True, rows=64) == "xla"
    assert layers.dense_matmul_path("auto", True, rows=64) == "xla"  # plain projections: XLA
    assert layers.dense_matmul_path("xla", True) == "xla"
    assert layers.dense_matmul_path("kernel", True) == "kernel"
    assert layers.dense_matmul_path("kernel", False) == "xla"
    # "gated": the MLP's gated first half only, on Hopper.
    assert layers.dense_matmul_path("gated", True) == "xla"
    assert layers.dense_matmul_path("gated", True, gated=True) == "kernel"
    assert layers.dense_matmul_path("gated", False, gated=True) == "xla"
    assert layers.dense_matmul_path("kernel", True, gated=True) == "kernel"
    assert layers.dense_matmul_path("xla", True, gated=True) == "xla"
    assert layers.dense_matmul_path("interpret", False) == "kernel"
    with pytest.raises(ValueError, match="dense matmul mode"):
        layers.dense_matmul_path("fast", True)


# --- the gated form: act(x @ gate) * (x @ up) for the MLP's fused gate | up weight -----
# Tolerance: the same float32 sums as `gated_reference` (the order within block_k tiles
# differs), the activation in float32 from exp2 where the reference uses jax.nn's (a few
# float32 ulps), one bf16 rounding: as _check.


@pytest.mark.parametrize("activation", gm.ACTIVATIONS)
@pytest.mark.parametrize("M,D,F,knobs", [
    (1, 256, 128, {}),                                     # batch 1, default config
    (5, 256, 192, {"block_n": 64, "stages": 2}),           # rows padded to 8; 3 column blocks; a ring of 2
    (64, 384, 128, {"block_n": 128, "block_k": 128}),      # a full wgmma tile, 3 steps
    (20, 128, 256, {"block_n": 256, "block_k": 64}),
])
def test_gated_matches_reference(activation, M, D, F, knobs):
    rng = np.random.default_rng(M + D + F)
    x = jnp.asarray(rng.standard_normal((M, D)), BF16)
    w = rng.standard_normal((D, 2 * F)) * 0.05
    w[:, 3] = 0.0  # a gate column of zeros: act(0) * up = 0
    w = jnp.asarray(w, BF16)
    out = gm.gated_matmul_tuned(x, w, activation=activation, interpret=INTERPRET, **knobs)
    ref = gm.gated_reference(x, w, activation)
    _check(out, ref)
    assert not np.asarray(out, np.float32)[:, 3].any()


def test_gated_configs_and_refusals():
    """Gated calls run unsplit in one wave where the columns allow, their rings in shared
    memory; other calls are refused with the reason."""
    for M, D, F in ((1, 4096, 14336), (64, 4096, 14336), (64, 1152, 6912), (8, 2048, 8192)):
        config = gm.gated_default_config(M, D, F)
        assert config.num_splits == 1 and F % config.block_n == 0 and D % config.block_k == 0
        assert gm.smem_bytes(M, BF16, config, gated=True) <= gm._SMEM_LIMIT, (M, D, F, config)
    assert gm.gated_default_config(64, 4096, 14336, sms=132).block_n == 128  # 112 CTAs
    x = jnp.zeros((4, 128), BF16)
    assert not gm.gated_supports(x, jnp.zeros((128, 256), BF16), "relu")
    assert not gm.gated_supports(x, jnp.zeros((128, 256), jnp.int8), "silu")
    assert not gm.gated_supports(x, jnp.zeros((128, 192), BF16), "silu")  # F = 96: no tile
    assert not gm.gated_supports(jnp.zeros((65, 128), BF16), jnp.zeros((128, 256), BF16), "silu")
    assert gm.gated_supports(x, jnp.zeros((128, 256), BF16), "silu")
    with pytest.raises(ValueError, match="unsplit"):
        gm.gated_matmul_tuned(x, jnp.zeros((128, 256), BF16), interpret=INTERPRET, num_splits=2)


def test_gated_lowers_for_cuda():
    """The gated kernel through the real Mosaic GPU lowering: Llama-3.1-8B's MLP (silu) and
    a Gemma-3-1B-like one (gelu_tanh) at batch 1, 8 and 64."""
    sds = jax.ShapeDtypeStruct
    for D, F, activation in ((4096, 14336, "silu"), (1152, 6912, "gelu_tanh")):
        for M in (1, 8, 64):
            module = export.export(jax.jit(functools.partial(gm.gated_matmul_tuned, activation=activation)),
                                   platforms=["cuda"])(sds((M, D), BF16), sds((D, 2 * F), BF16)).mlir_module()
            assert "mosaic_gpu" in module


@pytest.mark.parametrize("activation", gm.ACTIVATIONS)
def test_model_mlp_runs_the_gated_kernel(monkeypatch, activation):
    """runtime.models.layers.MLP with fused gate | up and DENSE_MATMUL="interpret" ("kernel"
    on a GPU) runs the gated kernel and then the down projection, and matches XLA's path
    within bf16 rounding: XLA rounds gate and up, then their product, the kernel the product
    only, and the down projection sums 192 such terms (measured on CPU: at most 0.6% of the
    largest output; bound 2%)."""
    import dataclasses

    from flax import nnx

    from runtime.models import layers
    from runtime.presets import preset_config

    cfg = dataclasses.replace(preset_config("tiny-llama"), embed_dim=128, ffw_dim=192, activation=activation)
    mlp = layers.MLP(cfg, dtype=BF16, rngs=nnx.Rngs(0))
    mlp.fuse(lambda axes, shape: None, "gpu")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1, 128)), BF16)
    calls = []
    real = gm.gated_matmul
    monkeypatch.setattr(gm, "gated_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    monkeypatch.setattr(layers, "DENSE_MATMUL", "xla")
    want = np.asarray(mlp(x), np.float32)
    assert not calls
    monkeypatch.setattr(layers, "DENSE_MATMUL", "interpret" if INTERPRET else "kernel")
    got = np.asarray(mlp(x), np.float32)
    assert calls == [(128, 2 * 192)]
    np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2e-2 * np.abs(want).max())


def test_auto_runs_the_gated_kernel_from_64_rows(monkeypatch):
    """DENSE_MATMUL "auto" (the default) on Hopper: the MLP's gate/up runs the gated kernel
    in a call of 64 rows (a batch-64 decode step) and XLA in one of 8; on other devices XLA
    always. On CPU, Hopper is pretended and the kernel interpreted; the result matches XLA's
    path within the bound of test_model_mlp_runs_the_gated_kernel."""
    import dataclasses

    from flax import nnx

    from pallas_kernels import dispatch
    from runtime.models import layers
    from runtime.presets import preset_config

    cfg = dataclasses.replace(preset_config("tiny-llama"), embed_dim=128, ffw_dim=192)
    mlp = layers.MLP(cfg, dtype=BF16, rngs=nnx.Rngs(0))
    mlp.fuse(lambda axes, shape: None, "gpu")
    calls = []
    real = gm.gated_matmul
    monkeypatch.setattr(gm, "gated_matmul", lambda x, w, **k: calls.append(x.shape) or real(
        x, w, **{**k, "interpret": INTERPRET}))
    assert layers.DENSE_MATMUL == "auto"
    rng = np.random.default_rng(2)
    real_hopper = dispatch.on_hopper()
    for hopper in (False, True) if real_hopper or not ON_GPU else (False,):
        monkeypatch.setattr(dispatch, "on_hopper", lambda hopper=hopper: hopper)
        for batch in (8, 64):
            calls.clear()
            x = jnp.asarray(rng.standard_normal((batch, 1, 128)), BF16)
            got = np.asarray(mlp(x), np.float32)
            assert calls == ([(batch, 128)] if hopper and batch == 64 else [])
            monkeypatch.setattr(layers, "DENSE_MATMUL", "xla")
            want = np.asarray(mlp(x), np.float32)
            monkeypatch.setattr(layers, "DENSE_MATMUL", "auto")
            np.testing.assert_allclose(got, want, rtol=2 ** -6, atol=2e-2 * np.abs(want).max())

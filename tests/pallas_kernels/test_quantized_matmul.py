"""The weight-only quantized matmul kernel (pallas_kernels/quantized_matmul/gpu.py)
against its reference, interpreted on CPU (compiled on a GPU), and lowered for CUDA through Triton.

Tolerance: kernel and reference convert the same quantized values to x's dtype exactly
and sum float32 products; only the order of the sums differs (tiles of block_k, split-K
partials), a few float32 ulps of the sum's magnitude; the bfloat16 output then rounds
once (2^-8 relative), so a bf16 result may land one bf16 ulp away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.quantized_matmul import gpu, reference
from runtime.quantization import quantize

F32, BF16 = jnp.float32, jnp.bfloat16
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU  # compiled through Triton where a GPU is


def _case(M, D, N, dtype, mode, seed=0):
    """x [M, D] and a weight [D, N] quantized per output channel as the runtime does."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, D)), dtype)
    w = jnp.asarray(rng.standard_normal((D, N)) * 0.05, F32)
    w = w.at[:, 3].set(0.0)  # a channel of zeros: scale 1, q 0
    q, scale = quantize(w, (0,), mode)
    return x, q, scale


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    if dtype == F32:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:  # one bf16 ulp of the value (2^-8 relative) plus the f32 sums' order
        np.testing.assert_allclose(out, ref, rtol=2 ** -7, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("M,D,N,knobs", [
    (1, 512, 256, {}),                                     # batch-1 GEMV, default tiles
    (1, 1024, 128, {"num_splits": 4}),                     # split-K partials summed outside
    (3, 256, 192, {"block_n": 64}),                        # N not a multiple of 128
    (16, 512, 128, {"block_k": 64, "num_splits": 2}),
    (17, 256, 128, {}),                                    # one row past a 16-row tile
    (64, 128, 256, {}),
    (130, 256, 128, {}),                                   # prefill tiles, rows padded to 192
    (96, 256, 256, {"block_m": 32, "block_n": 64, "block_k": 128}),
])
def test_matches_reference(mode, dtype, M, D, N, knobs):
    x, q, scale = _case(M, D, N, dtype, mode, seed=M + D + N)
    fn = gpu.quantized_matmul_tuned if knobs else gpu.quantized_matmul
    out = fn(x, q, scale, interpret=INTERPRET, **knobs)
    _check(out, reference.quantized_matmul(x, q, scale), dtype)
    assert np.all(np.asarray(out[:, 3], np.float32) == 0)  # the zero channel


def test_reference_is_the_projection_the_model_runs():
    """The reference equals runtime.models.layers.project over the same 2-D weight."""
    from runtime.models.layers import project

    x, q, scale = _case(5, 256, 128, BF16, "int8")
    np.testing.assert_array_equal(np.asarray(reference.quantized_matmul(x, q, scale), np.float32),
                                  np.asarray(project("MD,DN->MN", x, q, scale), np.float32))


def test_default_tiles():
    """Decode: one 16-row tile, split-K until ~264 programs (each >= 4 steps of D);
    prefill: 64-row tiles, no split."""
    c = gpu.default_config(1, 4096, 4096)  # Llama-3.1-8B's attention output, batch 1
    assert (c.block_m, c.block_n, c.block_k) == (16, 128, 128) and c.num_splits == 8
    assert 4096 // 128 * c.num_splits <= 264
    assert gpu.default_config(1, 4096, 28672).num_splits == 1  # gate/up: 224 programs already
    assert gpu.default_config(1, 14336, 4096).num_splits == 8
    assert gpu.default_config(8, 4096, 6144).block_m == 16 and gpu.default_config(33, 4096, 6144).block_m == 64
    assert gpu.default_config(512, 4096, 6144) == gpu.Config(64, 128, 64, 1)


def test_unsupported_shapes_are_refused():
    x, q, scale = _case(2, 256, 128, BF16, "int8")
    assert gpu.supports(x, q, scale)
    assert not gpu.supports(x[:, :100], q[:100], scale)  # D not a multiple of 64
    assert not gpu.supports(x, q[:, :100], scale[:100])  # N
    assert not gpu.supports(x.astype(jnp.float16), q, scale)
    assert not gpu.supports(x, q.astype(BF16), scale)  # not quantized
    assert not gpu.supports(x, q, scale[:64])


def _export_for_cuda(fn, *shapes):
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton_call])(*shapes)


@pytest.mark.parametrize("qdtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_lowers_to_triton_at_llama_shapes(qdtype, dtype):
    """Llama-3.1-8B's fused projections (q/k/v 4096 -> 6144, output 4096 -> 4096, gate/up
    4096 -> 28672, down 14336 -> 4096) at batch 1, 64 and a 512-token prefill, through
    Triton's lowering (what interpret mode cannot check)."""
    sds = jax.ShapeDtypeStruct
    for D, N in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        for M in (1, 64, 512):
            fn = functools.partial(gpu.quantized_matmul_tuned)
            _export_for_cuda(fn, sds((M, D), dtype), sds((D, N), qdtype), sds((N,), F32))

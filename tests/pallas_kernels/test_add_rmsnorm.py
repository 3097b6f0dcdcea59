"""The fused residual add + RMSNorm kernel (pallas_kernels/add_rmsnorm/gpu.py) agrees with
its reference, and the model's deferred-add layer form with the plain one.

Off a GPU the kernel runs in Pallas' interpreter and its Triton lowering is checked by
exporting for CUDA; on a GPU the same cases run compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.add_rmsnorm import gpu, reference

INTERPRET = jax.default_backend() != "gpu"


def _case(rng, shape, dtype, w_dtype=None, with_h=True):
    x = jnp.asarray(rng.normal(size=shape) * 3, dtype)
    h = jnp.asarray(rng.normal(size=shape), dtype) if with_h else None
    w = jnp.asarray(rng.normal(size=shape[-1:]) * 0.5 + 1, w_dtype or dtype)
    return x, h, w


@pytest.mark.parametrize("shape,dtype,plus_one,with_h", [
    ((1, 1, 4096), jnp.bfloat16, False, True),  # Llama-3 8B, batch-1 decode
    ((8, 1, 2048), jnp.bfloat16, False, True),  # Llama-3.2 1B, bucket 8
    ((3, 1, 1024), jnp.float32, False, True),  # float32 model, odd row count
    ((5, 1, 512), jnp.float16, True, True),  # Gemma-style (1 + w)
    ((2, 1, 8192), jnp.bfloat16, False, False),  # the first layer: no add; 70B width
    ((1, 1, 16), jnp.bfloat16, True, False),  # the smallest width
    ((2, 3, 256), jnp.bfloat16, False, True),  # T > 1 rows
])
def test_kernel_matches_reference(shape, dtype, plus_one, with_h):
    x, h, w = _case(np.random.default_rng(shape[-1] + shape[0]), shape, dtype, with_h=with_h)
    want = reference.add_rmsnorm(x, h, w, eps=1e-5, plus_one=plus_one)
    got = gpu.add_rmsnorm(x, h, w, eps=1e-5, plus_one=plus_one, interpret=INTERPRET)
    # s = x + h: one float32 add rounded once, as XLA computes it: exact. y: the same
    # float32 statistics summed in another order, then rounded to the output dtype: at
    # most one rounding step of it (bf16 2^-8 relative, f16 2^-11, f32 ~1e-6).
    tol = {jnp.float32: 2e-6, jnp.float16: 1e-3, jnp.bfloat16: 8e-3}[dtype]
    for name, w_, g in zip(("s", "y"), want, got):
        assert g.shape == w_.shape and g.dtype == w_.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w_, np.float32),
                                   rtol=tol, atol=tol if name == "y" else 0, err_msg=name)
    if with_h:
        np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(x + h, np.float32))


def test_weight_dtype_promotes_like_the_model():
    """Llama style multiplies w by the normalized row in the promoted dtype: a float32
    weight on bfloat16 activations gives float32 (what RMSNorm returns)."""
    x, h, w = _case(np.random.default_rng(3), (2, 1, 128), jnp.bfloat16, w_dtype=jnp.float32)
    want = reference.add_rmsnorm(x, h, w, eps=1e-6, plus_one=False)
    got = gpu.add_rmsnorm(x, h, w, eps=1e-6, plus_one=False, interpret=INTERPRET)
    assert got[1].dtype == want[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("D", [4095, 640, 8, 32768])
def test_unsupported_widths_run_the_reference(D):
    """Widths a single Triton vector cannot hold (not a power of two, too small or too
    large: Gemma's 640) take the jnp path and still give the right values (up to one
    bfloat16 rounding: under jit XLA may keep x + h in float32 for the statistics,
    --xla_allow_excess_precision)."""
    x, h, w = _case(np.random.default_rng(D), (2, 1, D), jnp.bfloat16)
    assert not gpu.supports(x, w)
    want = reference.add_rmsnorm(x, h, w, eps=1e-6, plus_one=True)
    got = gpu.add_rmsnorm(x, h, w, eps=1e-6, plus_one=True, interpret=INTERPRET)
    for w_, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w_, np.float32), rtol=8e-3, atol=8e-3)


def test_reference_is_the_models_norm():
    from runtime.models.layers import RMSNorm

    for plus_one in (False, True):
        norm = RMSNorm(64, "embed", eps=1e-6, plus_one=plus_one, dtype=jnp.bfloat16, rngs=None)
        norm.scale[...] = jnp.linspace(-1, 2, 64).astype(jnp.bfloat16)
        x, h, _ = _case(np.random.default_rng(4), (3, 2, 64), jnp.bfloat16)
        s, y = norm.add(x, h)
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(x + h, np.float32))
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(norm(x + h), np.float32))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="compiled for real on a GPU above")
def test_triton_lowering_exports_for_cuda():
    """The kernel lowers through Pallas' Triton path (what a GPU compiles), with and without the add."""
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    x, h, w = _case(np.random.default_rng(5), (1, 1, 4096), jnp.bfloat16)
    for args in ((x, h, w), (x, None, w)):
        fn = jax.jit(lambda *a: gpu.add_rmsnorm(*a, eps=1e-5, plus_one=False))
        text = export.export(fn, platforms=["cuda"], disabled_checks=[triton_call])(*args).mlir_module()
        assert text.count("__gpu$xla.gpu.triton") == 1

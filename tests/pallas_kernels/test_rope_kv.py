"""The fused rotary-embedding + paged cache write kernel (pallas_kernels/rope_kv/gpu.py)
agrees with its reference, and the reference with the model's unfused path.

Off a GPU the kernel runs in Pallas' interpreter and its Triton lowering is checked by
exporting for CUDA; on a GPU the same cases run compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.rope_kv import gpu, reference
from runtime.kv_cache import write_kv
from runtime.models.layers import apply_rope

INTERPRET = jax.default_backend() != "gpu"


def _case(rng, B, K, G, H, P, S, dtype, cache_dtype=None):
    qkv = jnp.asarray(rng.normal(size=(B, K, G + 2, H)), dtype)
    ang = rng.uniform(0, 2 * np.pi, size=(B, H // 2))
    cos, sin = jnp.asarray(np.cos(ang), dtype), jnp.asarray(np.sin(ang), dtype)
    # Distinct rows, one padding row (-1), the pool's first and last rows when they fit.
    rows = rng.permutation(P * S)[:B]
    rows[0] = P * S - 1
    if B > 1:
        rows[1] = -1
    if B > 2:
        rows[2] = 0
    pages = [jnp.asarray(rng.normal(size=(P, S, K, H)) * 100, cache_dtype or dtype) for _ in "kv"]
    return qkv, cos, sin, jnp.asarray(rows, jnp.int32), *pages


@pytest.mark.parametrize("B,K,G,H,P,S,dtype", [
    (1, 8, 4, 128, 5, 16, jnp.bfloat16),  # Llama-3 8B heads, batch 1
    (4, 2, 3, 64, 6, 4, jnp.bfloat16),  # G = 3: q rows not a power of two
    (3, 1, 8, 256, 4, 8, jnp.bfloat16),  # MQA, head_dim 256
    (5, 4, 1, 32, 3, 16, jnp.float32),  # MHA (G = 1), float32
    (2, 3, 2, 64, 2, 16, jnp.float16),  # 3 kv heads
])
def test_kernel_matches_reference(B, K, G, H, P, S, dtype):
    args = _case(np.random.default_rng(B * 100 + H), B, K, G, H, P, S, dtype)
    want = reference.rope_kv_write(*args)
    got = gpu.rope_kv_write(*args, interpret=INTERPRET)
    # Both rotate in float32 and round once: equal up to float32 reassociation (one
    # rounding step of the output dtype at most).
    tol = {jnp.float32: 1e-6, jnp.float16: 1e-3, jnp.bfloat16: 8e-3}[dtype]
    for name, w, g in zip(("q", "k_pages", "v_pages"), want, got):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol,
                                   err_msg=name)


def test_padding_rows_write_nothing_and_other_rows_stay():
    qkv, cos, sin, slot, k_pages, v_pages = _case(np.random.default_rng(1), 3, 2, 2, 64, 4, 4, jnp.bfloat16)
    slot = jnp.asarray([-1, 7, -1], jnp.int32)
    _, k_new, v_new = gpu.rope_kv_write(qkv, cos, sin, slot, k_pages, v_pages, interpret=INTERPRET)
    flat = lambda x: np.asarray(x, np.float32).reshape(-1, *x.shape[2:])  # noqa: E731
    changed = np.nonzero(np.any(flat(k_new) != flat(k_pages), axis=(1, 2)))[0]
    assert changed.tolist() == [7]
    np.testing.assert_array_equal(flat(v_new)[7], np.asarray(qkv[1, :, 3], np.float32))
    keep = np.arange(16) != 7
    np.testing.assert_array_equal(flat(v_new)[keep], flat(v_pages)[keep])


def test_cache_dtype_differs_from_activations():
    args = _case(np.random.default_rng(2), 2, 2, 2, 64, 3, 8, jnp.bfloat16, cache_dtype=jnp.float32)
    want = reference.rope_kv_write(*args)
    got = gpu.rope_kv_write(*args, interpret=INTERPRET)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=8e-3, atol=8e-3)


def test_reference_matches_the_models_unfused_path():
    """reference.rope_kv_write == apply_rope + write_kv of the model (what the engine runs
    where the kernel does not), in float32."""
    B, K, G, H, P, S = 3, 2, 3, 64, 4, 4
    qkv, cos, sin, _, k_pages, v_pages = _case(np.random.default_rng(3), B, K, G, H, P, S, jnp.float32)
    positions = jnp.asarray([[5], [0], [9]], jnp.int32)
    kv_lens = jnp.asarray([6, 0, 10], jnp.int32)  # row 1 is padding
    table = jnp.asarray([[2, 0, 1], [3, 3, 3], [1, 2, 0]], jnp.int32)
    full = (jnp.concatenate([cos, cos], -1)[:, None], jnp.concatenate([sin, sin], -1)[:, None])  # [B, 1, H]
    q = apply_rope(qkv[:, None, :, :G].reshape(B, 1, K * G, H), *full)
    k = apply_rope(qkv[:, None, :, G], *full)
    want_k, want_v = write_kv(k_pages, v_pages, k, qkv[:, None, :, G + 1], table, positions, kv_lens)
    page = jnp.take_along_axis(table, positions // S, axis=1)[:, 0]
    slot = jnp.where(positions[:, 0] < kv_lens, page * S + positions[:, 0] % S, -1)
    got_q, got_k, got_v = reference.rope_kv_write(qkv, cos, sin, slot, k_pages, v_pages)
    np.testing.assert_allclose(got_q, q[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_k, want_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_v, want_v)


def test_supports():
    sds = jax.ShapeDtypeStruct
    pages = sds((4, 16, 8, 128), jnp.bfloat16)
    assert gpu.supports(sds((1, 8, 6, 128), jnp.bfloat16), pages)
    assert not gpu.supports(sds((1, 8, 6, 96), jnp.bfloat16), sds((4, 16, 8, 96), jnp.bfloat16))  # H/2 = 48
    assert not gpu.supports(sds((1, 4, 6, 128), jnp.bfloat16), pages)  # kv heads differ
    # Unsupported shapes run the reference (jitted: float32 rounding may differ).
    args = _case(np.random.default_rng(4), 2, 2, 2, 96, 3, 4, jnp.float32)
    for w, g in zip(reference.rope_kv_write(*args), gpu.rope_kv_write(*args, interpret=INTERPRET)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K,G,H", [(8, 4, 128), (2, 3, 64), (1, 8, 256)])
def test_kernel_lowers_for_cuda(K, G, H):
    sds = jax.ShapeDtypeStruct
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    B, P, S = 4, 64, 16
    exp = export.export(jax.jit(gpu.rope_kv_write), platforms=["cuda"], disabled_checks=[triton_call])(
        sds((B, K, G + 2, H), jnp.bfloat16), sds((B, H // 2), jnp.bfloat16), sds((B, H // 2), jnp.bfloat16),
        sds((B,), jnp.int32), sds((P, S, K, H), jnp.bfloat16), sds((P, S, K, H), jnp.bfloat16))
    text = exp.mlir_module()
    assert "__gpu$xla.gpu.triton" in text
    assert "output_operand_aliases" in text  # the pages are written in place

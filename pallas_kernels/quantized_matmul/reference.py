"""Weight-only quantized matmul in plain jnp: what the kernel (gpu.py) computes.

  x      [M, D]   activations (bfloat16 or float32)
  q      [D, N]   the weight quantized per output channel (int8 or float8_e4m3fn)
  scale  [N]      float32, one per output channel (runtime.quantization)
  y      [M, N]   = (x @ q) * scale in x's dtype: q's values converted to x's dtype (exact
                  for int8 and e4m3 in bfloat16), the products summed in float32, scaled
                  per channel in float32 and rounded once.

runtime.models.layers.project computes the same through XLA (its einsum with
preferred_element_type=float32); this is its 2-D form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def quantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    # HIGHEST: XLA's default float32 GEMM on a GPU is TF32 (the kernel's is IEEE).
    y = jnp.dot(x, q.astype(x.dtype), precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return (y * scale[None, :]).astype(x.dtype)

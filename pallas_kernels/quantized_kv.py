"""Quantized KV rows: the cache format the attention kernels and their references read.

A quantized cache (dtype int8 or float8_e4m3fn) stores each token's row of a kv head as
its H values divided by one float32 scale (max |x| over the row / the dtype's largest
value: int8 rounds to the nearest step, fp8 e4m3 to its 3-bit mantissa), followed by the
scale's 4 bytes bitcast into SCALE_LANES more lanes of the same dtype: [..., H + 4]. A
row of zeros has scale 1. runtime/kv_cache.py says why the scale travels with its row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Quantized cache dtypes and the largest value each holds (a row's max |x| maps to it).
QUANTIZED = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_LANES = 4  # a row's float32 scale, bitcast into 4 one-byte lanes after its values


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype).name in QUANTIZED


def row_width(head_dim: int, dtype) -> int:
    """Lanes of one token's row of a kv head in a cache of `dtype`."""
    return head_dim + SCALE_LANES if is_quantized(dtype) else head_dim


def quantize_rows(x: jax.Array, dtype) -> jax.Array:
    """x [..., H] -> [..., H + SCALE_LANES] in the quantized `dtype`."""
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / QUANTIZED[dtype.name], 1.0)
    y = x / scale
    q = jnp.clip(jnp.round(y), -127, 127).astype(dtype) if dtype == jnp.int8 else y.astype(dtype)
    bits = jax.lax.bitcast_convert_type(scale[..., 0], jnp.uint8)  # [..., 4]
    return jnp.concatenate([q, jax.lax.bitcast_convert_type(bits, dtype)], axis=-1)


def dequantize_rows(rows: jax.Array, dtype) -> jax.Array:
    """[..., H + SCALE_LANES] quantized rows -> [..., H] in `dtype`; rows of another dtype
    as they are (cast to `dtype`)."""
    if not is_quantized(rows.dtype):
        return rows.astype(dtype)
    H = rows.shape[-1] - SCALE_LANES
    bits = jax.lax.bitcast_convert_type(rows[..., H:], jnp.uint8)  # [..., 4]
    scale = jax.lax.bitcast_convert_type(bits, jnp.float32)  # [...]
    return (rows[..., :H].astype(jnp.float32) * scale[..., None]).astype(dtype)

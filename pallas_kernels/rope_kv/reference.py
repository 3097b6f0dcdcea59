"""Rotary embedding of a decode step's q and k, and the write of its k and v into the
paged cache: what the fused kernel (gpu.py) computes, in plain jnp.

Layout (the engine's fused projection, runtime.models.layers._qkv_weight):
  qkv        [B, K, G + 2, H]  per kv head its G query heads, then k, then v
  cos, sin   [B, H // 2]       of each row's position (rotate-half: both halves use them)
  slot       [B] int32         the cache row (page * S + position % S) the token's k and v
                               go to; -1 = none (a padding row: nothing is written)
  k_pages, v_pages [P, S, K, H]

Returns q [B, K * G, H] after the rotation, and the pages with each row's k (rotated) and
v written. The rotation is rotate-half: with x = [x1, x2] (halves of H),
  [x1 * cos - x2 * sin, x2 * cos + x1 * sin],
computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., H] rotated by cos/sin [..., H // 2] (broadcast against x's leading axes), float32."""
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    c, s = cos.astype(jnp.float32), sin.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_kv_write(qkv, cos, sin, slot, k_pages, v_pages):
    B, K, J, H = qkv.shape
    P, S, _, _ = k_pages.shape
    G = J - 2
    trig = (cos[:, None, None, :], sin[:, None, None, :])
    q = rotate(qkv[:, :, :G], *trig).astype(qkv.dtype).reshape(B, K * G, H)
    k = rotate(qkv[:, :, G], *(t[:, 0] for t in trig)).astype(k_pages.dtype)  # [B, K, H]
    v = qkv[:, :, G + 1].astype(v_pages.dtype)
    rows = jnp.where(slot >= 0, slot, P * S)  # out of range: dropped
    k_pages = k_pages.reshape(P * S, K, H).at[rows].set(k, mode="drop").reshape(P, S, K, H)
    v_pages = v_pages.reshape(P * S, K, H).at[rows].set(v, mode="drop").reshape(P, S, K, H)
    return q, k_pages, v_pages

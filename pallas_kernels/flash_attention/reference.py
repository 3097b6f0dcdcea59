"""Causal self-attention over a padded prefill chunk, pure jax.numpy: the definition
of correct for the flash-attention kernels.

  q        [B, T, N, H]   N = K * G query heads, grouped by kv head
  k, v     [B, T, K, H]   keys/values of the same T positions
  lengths  [B]            valid tokens per row (right padding beyond)
Query t sees key s when s <= t, s < lengths[b] and, with a window W, s > t - W.
Queries at t >= lengths[b] are padding: their output is zero. Scores and softmax are
float32; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)  # [B, T, K*G, H] -> [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    t = jnp.arange(T, dtype=jnp.int32)
    mask = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < lengths[:, None, None])  # [B, T, S]
    if window is not None:
        mask &= (t[None, :] > t[:, None] - window)[None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o.reshape(B, T, N, H)  # [B, T, K, G, H] -> [B, T, N, H]
    valid = t[None, :] < lengths[:, None]
    return jnp.where(valid[:, :, None, None], o, 0.0).astype(q.dtype)

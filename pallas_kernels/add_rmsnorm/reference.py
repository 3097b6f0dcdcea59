"""The residual add and the RMSNorm after it: what the fused kernel (gpu.py) computes,
in plain jnp, and what runtime.models.layers.RMSNorm runs.

  s = x + h            in x's dtype (h None: s = x, no add)
  y = RMSNorm_w(s)     statistics in float32:
                         n = s32 * rsqrt(mean(s32 ** 2) + eps), s32 = s as float32
                       Llama style: w * n rounded to s's dtype (the product in the
                       promoted dtype, as Hugging Face multiplies after casting back);
                       Gemma style (`plus_one`): n * (1 + w) in float32, rounded once.

x, h [..., D]; w [D]. Returns (s, y); a decoder layer carries s as its residual stream
and feeds y to the next projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rmsnorm(s: jax.Array, w: jax.Array, *, eps: float, plus_one: bool) -> jax.Array:
    s32 = s.astype(jnp.float32)
    n = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (n * (1.0 + w.astype(jnp.float32))).astype(s.dtype)
    return w * n.astype(s.dtype)


def add_rmsnorm(x: jax.Array, h: jax.Array | None, w: jax.Array, *, eps: float,
                plus_one: bool) -> tuple[jax.Array, jax.Array]:
    s = x if h is None else x + h
    return s, rmsnorm(s, w, eps=eps, plus_one=plus_one)

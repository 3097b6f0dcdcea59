"""Paged attention in pure jax.numpy: the definition of correct for the kernels.

Queries of several positions per sequence (a prefill chunk or one decode token) attend
to keys and values stored in fixed-size pages. One function serves prefill with or
without earlier context and decode; the kernels must agree with it.

Layout (see runtime/kv_cache.py):
  q            [B, T, N, H]   N = K * G query heads, grouped by kv head
  k_pages      [P, S, K, H]   P pages of S tokens (or QuantizedPages: values [P, S, K, H]
  v_pages      [P, S, K, H]   and scales [P, K, S], pallas_kernels/quantized_kv.py)
  page_table   [B, MP]        page ids of each sequence, in order
  q_positions  [B, T]         absolute position of each query token
  kv_lens      [B]            tokens of each sequence present in the pages
A query at position p sees keys at positions j with j <= p, j < kv_len and, with a
window W, j > p - W. Queries with p >= kv_len are padding: their output is zero.
Pages beyond a sequence's length may hold another request's data: masking by length
is what makes a freed page unreadable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_kv import gather_pages


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Returns [B, T, N, H] in q.dtype. Scores and softmax are float32."""
    B, T, N, H = q.shape
    _, S, K, _ = k_pages.shape  # QuantizedPages: its values' shape
    MP = page_table.shape[1]
    G = N // K
    # Gather each sequence's pages: [B, MP, S, K, H] -> [B, MP*S, K, H] (quantized rows
    # dequantized to q's dtype after the gather)
    k = gather_pages(k_pages, page_table, q.dtype).reshape(B, MP * S, K, H)
    v = gather_pages(v_pages, page_table, q.dtype).reshape(B, MP * S, K, H)
    qg = q.reshape(B, T, K, G, H)  # [B, T, K*G, H] -> [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    kv_pos = jnp.arange(MP * S, dtype=jnp.int32)
    q_pos = q_positions[:, :, None]  # [B, T, 1]
    mask = (kv_pos[None, None, :] <= q_pos) & (kv_pos[None, None, :] < kv_lens[:, None, None])
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos - window
    s = jnp.where(mask[:, None, None, :, :], s, -jnp.inf)  # [B, 1, 1, T, S] over [B, K, G, T, S]
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows (padding queries)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o.reshape(B, T, N, H)  # [B, T, K, G, H] -> [B, T, N, H]
    q_valid = q_positions < kv_lens[:, None]
    return jnp.where(q_valid[:, :, None, None], o, 0.0).astype(q.dtype)

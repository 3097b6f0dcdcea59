"""Causal flash attention over a padded prefill chunk as a Pallas Mosaic TPU kernel.

Layout (the same as reference.py; the reshapes are free, no HBM copy unless T must be
padded up to a block multiple):
  q      [B, T, N, H] -> [B, T, N*H]     N = K * G, query heads grouped by kv head
  k, v   [B, T, K, H] -> [B, T, K*H]
  lengths [B]: scalar prefetch (SMEM)
  out    [B, T, N*H]  -> [B, T, N, H]

Grid (B, T/block_q, T/block_k), the last axis sequential. A step holds a (block_q, N*H)
query block and (block_k, K*H) key/value blocks: whole rows, so the block is legal for
any N, K, H, and head n is the lane slice [n*H, (n+1)*H) (128-aligned for H = 128/256).
The G query heads of one kv head are stacked to one (G*block_q, H) operand, so one
matmul serves the whole group against that head's keys; G is never padded in HBM.
Float32 m, l, acc scratch carries the online softmax across kv blocks; the output is
written on the last kv step.

Block skipping: query block i needs kv blocks [lo, hi] with
hi = min(i*block_q + block_q - 1, length - 1) // block_k (causal and length) and
lo = max(0, i*block_q - W + 1) // block_k (window). The kv index maps clamp into
[lo, hi], so skipped steps repeat the previous block index (no DMA) and skip compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite "minus infinity": exp(NEG - m) underflows to 0 instead of giving NaN for rows
# that are fully masked within a block (possible with a window).
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kv_block_range(i, length, block_q, block_k, window):
    """First and last kv block query block i can see (last >= first >= 0). Operands are
    non-negative, so lax.div (truncating) is floor division without `//`'s sign op."""
    hi = jax.lax.div(jnp.maximum(jnp.minimum(i * block_q + block_q - 1, length - 1), 0), block_k)
    if window is None:
        lo = jnp.int32(0)
    else:
        lo = jax.lax.div(jnp.maximum(i * block_q - window + 1, 0), block_k)
    return jnp.minimum(lo, hi), hi


def _kernel(
    # scalar prefetch:
    lengths_ref,  # [B] int32, SMEM
    # inputs:
    q_ref,        # (block_q, N*H) block of [B, T, N*H]
    k_ref,        # (block_k, K*H) block of [B, T, K*H]
    v_ref,        # (block_k, K*H) block of [B, T, K*H]
    # outputs:
    o_ref,        # (block_q, N*H) block of [B, T, N*H]
    # scratch:
    m_ref,        # (K, G*block_q, 1) f32 running max
    l_ref,        # (K, G*block_q, 1) f32 running denominator
    acc_ref,      # (K, G*block_q, H) f32 unnormalised output
    *, scale, window, softcap, block_q, block_k, num_kv_heads, group, head_dim,
):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    lo, hi = _kv_block_range(i, length, block_q, block_k, window)
    H, G = head_dim, group

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((i * block_q < length) & (j >= lo) & (j <= hi))
    def _block():
        row = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        col = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        mask = (col <= row) & (col < length)
        if window is not None:
            mask &= col > row - window
        if G > 1:
            mask = jnp.concatenate([mask] * G, axis=0)  # (block_q, S) -> (G*block_q, S)
        for kh in range(num_kv_heads):
            k = k_ref[:, kh * H:(kh + 1) * H]  # (block_k, H)
            v = v_ref[:, kh * H:(kh + 1) * H]  # (block_k, H)
            heads = [q_ref[:, n * H:(n + 1) * H] for n in range(kh * G, (kh + 1) * G)]
            q = jnp.concatenate(heads, axis=0) if G > 1 else heads[0]  # (G*block_q, H)
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale  # (G*block_q, block_k)
            if softcap is not None:
                s = jnp.tanh(s / softcap) * softcap
            s = jnp.where(mask, s, _NEG)
            m_prev = m_ref[kh]  # (G*block_q, 1)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            l_ref[kh] = alpha * l_ref[kh] + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # (G*block_q, H)
            acc_ref[kh] = alpha * acc_ref[kh] + pv
            m_ref[kh] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        row = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
        valid = row < length
        for kh in range(num_kv_heads):
            l = l_ref[kh]
            o = acc_ref[kh] / jnp.where(l == 0.0, 1.0, l)  # (G*block_q, H)
            for g in range(G):
                n = kh * G + g
                o_g = jnp.where(valid, o[g * block_q:(g + 1) * block_q], 0.0)
                o_ref[:, n * H:(n + 1) * H] = o_g.astype(o_ref.dtype)


def _flash_attention(q, k, v, lengths, *, scale, window, softcap, block_q=None, block_k=None):
    B, T, N, H = q.shape
    K = k.shape[2]
    assert N % K == 0, f"num_heads={N} is not a multiple of num_kv_heads={K}"
    G = N // K
    # 128 rows fill the MXU on v5e (128x128) and keep VMEM use modest (f32 scratch is
    # N*block_q*H*4 bytes: 2 MiB at N=32, H=128); 16 rows is the bf16 sublane tile.
    block_q = block_q or min(128, pl.cdiv(T, 16) * 16)
    block_k = block_k or block_q
    T_pad = pl.cdiv(T, max(block_q, block_k)) * max(block_q, block_k)
    assert T_pad % block_q == 0 and T_pad % block_k == 0, (
        f"block_q={block_q} and block_k={block_k} must divide one another")
    q2 = q.reshape(B, T, N * H)  # [B, T, N, H] -> [B, T, N*H]
    k2 = k.reshape(B, T, K * H)  # [B, T, K, H] -> [B, T, K*H]
    v2 = v.reshape(B, T, K * H)  # [B, T, K, H] -> [B, T, K*H]
    if T_pad != T:
        # Padded positions are >= lengths, so they are masked keys and zeroed queries.
        pad = ((0, 0), (0, T_pad - T), (0, 0))
        q2, k2, v2 = jnp.pad(q2, pad), jnp.pad(k2, pad), jnp.pad(v2, pad)

    def kv_map(b, i, j, lens):
        lo, hi = _kv_block_range(i, lens[b], block_q, block_k, window)
        return b, jnp.clip(j, lo, hi), 0

    kernel = functools.partial(
        _kernel, scale=scale, window=window, softcap=softcap, block_q=block_q, block_k=block_k,
        num_kv_heads=K, group=G, head_dim=H)
    qo_spec = pl.BlockSpec((None, block_q, N * H), lambda b, i, j, lens: (b, i, 0))
    kv_spec = pl.BlockSpec((None, block_k, K * H), kv_map)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, T_pad // block_q, T_pad // block_k),
            in_specs=[qo_spec, kv_spec, kv_spec],
            out_specs=qo_spec,
            scratch_shapes=[
                pltpu.VMEM((K, G * block_q, 1), jnp.float32),
                pltpu.VMEM((K, G * block_q, 1), jnp.float32),
                pltpu.VMEM((K, G * block_q, H), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, N * H), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="flash_attention_causal",
    )(lengths.astype(jnp.int32), q2, k2, v2)
    return out[:, :T].reshape(B, T, N, H)  # [B, T, N*H] -> [B, T, N, H]


# jit: every layer's call with the same shapes and options lowers to one shared
# function (see pallas_kernels/dispatch.py), not one kernel module per layer.
@functools.partial(jax.jit, static_argnames=('scale', 'window', 'softcap'))
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
    """Causal attention; q [B, T, N, H], k/v [B, T, K, H], lengths [B] -> [B, T, N, H]
    in q.dtype. Semantics as reference.flash_attention; softmax and accumulation float32."""
    return _flash_attention(q, k, v, lengths, scale=scale, window=window, softcap=softcap)

"""Causal flash attention over a padded prefill chunk as a Pallas GPU kernel (Triton
lowering).

Same function, signature and layout as reference.py, plus `interpret`:
  q        [B, T, N, H]   N = K * G query heads, grouped by kv head
  k, v     [B, T, K, H]
  lengths  [B]            valid tokens per row (right padding beyond)
Query t sees key s when s <= t, s < lengths[b] and, with a window W, s > t - W;
queries at t >= lengths[b] are padding and their output is zero.

Design:
- One program per (batch row, block of `block_q` queries, query head); the program
  of head n reads kv head n // G, so the G heads of a group share K/V through L2.
- The key loop visits only blocks that can hold a visible key: from the window start
  of the block's first query to min(last query + 1, length). Causal skipping halves
  the work; a sliding window makes it linear in T; blocks wholly past the row's
  length (padding) are skipped, and a query block that is all padding writes zeros
  without reading K/V.
- Only key blocks on the diagonal, the length edge or the window edge are masked;
  blocks wholly visible to the query block skip the mask arithmetic.
- Scores, online softmax and the accumulator are float32; P is cast to V's dtype for
  the second matmul, as in the reference.
- T need not be a multiple of the block sizes: loads and stores past T are masked.

Backend choice (measured, pallas_kernels/BENCHMARKS.md): on Hopper, `impl="gpu"` runs
the Mosaic GPU kernel (gpu_mosaic.py: 1.07-1.18x cuDNN on an H100 and an H200, where
this Triton kernel reaches 0.62-0.69x; Pallas' Triton lowering is deprecated since
JAX 0.11 in favour of Mosaic GPU). This kernel remains for what that one does not run:
float32 inputs, other head sizes, pre-Hopper GPUs, and CPU tests in interpret mode
(the Mosaic GPU interpreter is far slower).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The Triton compiler parameters are `CompilerParams` in jax 0.10 and 0.11; older
# releases called them `TritonCompilerParams`.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

# Finite "minus infinity" for the running max: exp(-inf - _NEG) is 0, never NaN.
_NEG = -1e30


_MIN_T = 16


def default_blocks(head_dim: int) -> tuple[int, int, int]:
    """(block_q, block_k, num_warps): 64x64 tiles with 4 warps keep a d<=128 program's
    q, k, v tiles and f32 accumulator in registers/shared memory; d=256 doubles every
    tile, so it uses 8 warps and halves block_k."""
    if head_dim <= 128:
        return 64, 64, 4
    return 64, 32, 8


def _load(ref, mask):
    """ref[...], with rows outside `mask` (past T) read as zero; unmasked when T fits."""
    return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0)


def _flash_kernel(
    # inputs:
    len_ref,  # [1] int32: valid tokens of this row
    q_ref,  # [T, H]: this row's queries of one head
    k_ref,  # [T, H]: this row's keys of the head's kv head
    v_ref,  # [T, H]
    # outputs:
    o_ref,  # [T, H]: this row's output of the head (this program writes block_q rows)
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    block_q: int,
    block_k: int,
):
    T, H = q_ref.shape
    qi = pl.program_id(1)
    q_start = qi * block_q
    length = len_ref[0]

    q_rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
    q_mask = q_rows < T if T % block_q else None
    q = _load(q_ref.at[pl.ds(q_start, block_q), :], q_mask)  # [BQ, H]

    # Keys [k_lo, k_hi) hold every key visible to some query of this block.
    k_hi = jnp.minimum(q_start + block_q, length)
    k_lo = jnp.maximum(q_start - window + 1, 0) if window is not None else jnp.int32(0)
    first = k_lo // block_k
    last = jnp.where(q_start < length, pl.cdiv(k_hi, block_k), first)  # all padding: none

    # Blocks [mid_lo, mid_hi) are visible to every query of the block (below the
    # diagonal, inside the length and the window): they skip the mask. Only the
    # diagonal, length and window edges pay for it.
    mid_hi = jnp.minimum(q_start + 1, length) // block_k
    mid_lo = pl.cdiv(jnp.maximum(q_start + block_q - window, 0), block_k) if window is not None else first
    mid_lo = jnp.clip(mid_lo, first, last)
    mid_hi = jnp.clip(mid_hi, mid_lo, last)

    t = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)  # query position

    def body(kb, carry, masked: bool):
        acc, m, l = carry
        k_start = kb * block_k
        k_rows = k_start + lax.broadcasted_iota(jnp.int32, (block_k, H), 0)
        kv_mask = k_rows < T if (masked and T % block_k) else None
        k = _load(k_ref.at[pl.ds(k_start, block_k), :], kv_mask)  # [BK, H]
        v = _load(v_ref.at[pl.ds(k_start, block_k), :], kv_mask)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)  # float32: IEEE, not Triton's default TF32
        s = s * scale  # [BQ, BK]
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        if masked:
            s_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            visible = (s_pos <= t) & (s_pos < length)
            if window is not None:
                visible &= s_pos > t - window
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        pv = lax.dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    edge = functools.partial(body, masked=True)
    carry = (
        jnp.zeros((block_q, H), jnp.float32),  # acc
        jnp.full((block_q,), _NEG, jnp.float32),  # running max m
        jnp.zeros((block_q,), jnp.float32),  # softmax sum l
    )
    carry = lax.fori_loop(first, mid_lo, edge, carry)  # window edge
    carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(mid_hi, last, edge, carry)  # diagonal and length edge
    out = acc / jnp.where(l == 0, 1.0, l)[:, None]
    out = jnp.where(q_rows < length, out, 0.0)  # padding queries: exactly zero
    plgpu.store(o_ref.at[pl.ds(q_start, block_q), :], out.astype(o_ref.dtype), mask=q_mask)


# jit: every layer's call with the same shapes and options lowers to one shared
# function (see pallas_kernels/dispatch.py), not one kernel module per layer.
@functools.partial(jax.jit, static_argnames=('scale', 'window', 'softcap', 'interpret'))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a right-padded chunk. Returns [B, T, N, H] in q.dtype."""
    return flash_attention_tuned(q, k, v, lengths, scale=scale, window=window, softcap=softcap, interpret=interpret)


def flash_attention_tuned(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    lengths: jax.Array,  # [B] int32
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:
    """flash_attention with the tuning knobs exposed (for benchmarks and tests)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    assert N % K == 0, f"{N} query heads are not a multiple of {K} kv heads"
    assert H & (H - 1) == 0, f"head_dim {H} must be a power of 2 (Triton)"
    if T < _MIN_T:
        # Triton tiles are at least 16 rows: pad the chunk (padding rows are beyond
        # `lengths`, so they are masked) and cut the output back.
        pad = ((0, 0), (0, _MIN_T - T), (0, 0), (0, 0))
        out = flash_attention_tuned(
            jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), lengths, scale=scale, window=window,
            softcap=softcap, interpret=interpret, block_q=block_q, block_k=block_k, num_warps=num_warps,
            num_stages=num_stages,
        )
        return out[:, :T]
    G = N // K
    dq, dk, dw = default_blocks(H)
    # A block never exceeds the chunk: the largest power of two <= T caps it.
    cap = 1 << (T.bit_length() - 1)
    block_q = min(block_q or dq, cap)
    block_k = min(block_k or dk, cap)
    num_warps = num_warps or dw
    lens = lengths.astype(jnp.int32).reshape(B, 1)

    kernel = functools.partial(
        _flash_kernel, scale=scale, window=window, softcap=softcap, block_q=block_q, block_k=block_k,
    )
    return pl.pallas_call(
        kernel,
        grid=(B, pl.cdiv(T, block_q), N),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, i, n: (b, 0)),  # length
            pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n, 0)),  # q, head n
            pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n // G, 0)),  # k, its kv head
            pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n // G, 0)),  # v
        ],
        out_specs=pl.BlockSpec((None, T, None, H), lambda b, i, n: (b, 0, n, 0)),
        out_shape=jax.ShapeDtypeStruct((B, T, N, H), q.dtype),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"flash_causal_G{G}_H{H}_bq{block_q}_bk{block_k}",
    )(lens, q, k, v)

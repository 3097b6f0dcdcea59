"""Rotary embedding of a decode step's q and k plus the write of k and v into the paged
cache, as one Pallas (Triton) kernel; semantics and layout in reference.py.

Why: in a batch-1 decode step on an H200 (Llama-3.1-8B, 2026-11-29) XLA ran this part of
each layer as about eight small kernels (slices, concatenates and multiplies of the
rotation, one cache update each for k and v), 1.1-1.8 us apiece and ~10 us per layer,
where the layer's weights take ~110 us to read. Here one program per (row, kv head) reads
its G + 2 rows of the q/k/v projection once, rotates q and k in float32, stores q and
writes k and v into their cache row in place (the pages are aliased to the outputs).

Each row is handled as two halves of H / 2 lanes (the rotation pairs lane i with lane
i + H / 2), so H / 2 must be a power of two (Triton vectors): H in 32, 64, 128, 256.
`supports` says whether a call can run here; the engine falls back to jnp otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rope_kv import reference

# The Triton compiler parameters are `CompilerParams` in jax 0.10 and 0.11.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def supports(qkv: jax.Array, k_pages: jax.Array) -> bool:
    if qkv.ndim != 4 or k_pages.ndim != 4:
        return False
    half = qkv.shape[-1] // 2
    return qkv.shape[-1] == k_pages.shape[-1] and qkv.shape[1] == k_pages.shape[2] and half >= 16 and (
        half & (half - 1) == 0) and qkv.shape[2] >= 3


def _kernel(slot_ref, cos_ref, sin_ref, qkv_ref, k_in_ref, v_in_ref, q_ref, k_ref, v_ref, *, G: int, half: int):
    del k_in_ref, v_in_ref  # aliased to k_ref / v_ref
    c = cos_ref[...].astype(jnp.float32)  # [half]
    s = sin_ref[...].astype(jnp.float32)
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    def rotated(j):
        x1 = qkv_ref[j, lo].astype(jnp.float32)
        x2 = qkv_ref[j, hi].astype(jnp.float32)
        return x1 * c - x2 * s, x2 * c + x1 * s

    for g in range(G):
        a, b = rotated(g)
        q_ref[g, lo] = a.astype(q_ref.dtype)
        q_ref[g, hi] = b.astype(q_ref.dtype)
    slot = slot_ref[0]
    # A padding row (slot -1) writes nothing: a masked store at row 0.
    row = jnp.maximum(slot, 0)
    keep = jnp.full((half,), slot >= 0)
    a, b = rotated(G)
    plgpu.store(k_ref.at[row, lo], a.astype(k_ref.dtype), mask=keep)
    plgpu.store(k_ref.at[row, hi], b.astype(k_ref.dtype), mask=keep)
    plgpu.store(v_ref.at[row, lo], qkv_ref[G + 1, lo].astype(v_ref.dtype), mask=keep)
    plgpu.store(v_ref.at[row, hi], qkv_ref[G + 1, hi].astype(v_ref.dtype), mask=keep)


@functools.partial(jax.jit, static_argnames=("interpret",))
def rope_kv_write(qkv, cos, sin, slot, k_pages, v_pages, *, interpret: bool = False):
    """See reference.rope_kv_write. Shapes `supports` rejects run the reference."""
    if not supports(qkv, k_pages):
        return reference.rope_kv_write(qkv, cos, sin, slot, k_pages, v_pages)
    B, K, J, H = qkv.shape
    P, S, _, _ = k_pages.shape
    G, half = J - 2, H // 2
    rows = P * S
    q, k_rows, v_rows = pl.pallas_call(
        functools.partial(_kernel, G=G, half=half),
        grid=(B, K),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (b,)),  # slot
            pl.BlockSpec((None, half), lambda b, h: (b, 0)),  # cos
            pl.BlockSpec((None, half), lambda b, h: (b, 0)),  # sin
            pl.BlockSpec((None, None, J, H), lambda b, h: (b, h, 0, 0)),  # this kv head's q, k, v rows
            pl.BlockSpec((rows, None, H), lambda b, h: (0, h, 0)),  # k pool, kv head h
            pl.BlockSpec((rows, None, H), lambda b, h: (0, h, 0)),  # v pool, kv head h
        ],
        out_specs=[
            pl.BlockSpec((None, None, G, H), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((rows, None, H), lambda b, h: (0, h, 0)),
            pl.BlockSpec((rows, None, H), lambda b, h: (0, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, G, H), qkv.dtype),
            jax.ShapeDtypeStruct((rows, K, H), k_pages.dtype),
            jax.ShapeDtypeStruct((rows, K, H), v_pages.dtype),
        ],
        input_output_aliases={4: 1, 5: 2},
        compiler_params=_CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name=f"rope_kv_write_G{G}_H{H}",
    )(slot.astype(jnp.int32), cos, sin, qkv, k_pages.reshape(rows, K, H), v_pages.reshape(rows, K, H))
    return q.reshape(B, K * G, H), k_rows.reshape(P, S, K, H), v_rows.reshape(P, S, K, H)

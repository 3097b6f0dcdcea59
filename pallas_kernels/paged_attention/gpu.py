"""Paged decode attention as a Pallas GPU kernel (Triton lowering).

Same function, signature and layout as reference.py (decode only: T == 1), plus
`interpret`. Layout:
  q            [B, 1, N, H]   N = K * G query heads, grouped by kv head
  k_pages      [P, S, K, H]   P pages of S tokens
  v_pages      [P, S, K, H]
  page_table   [B, MP]        page ids of each sequence, in order
  q_positions  [B, 1]         absolute position of the decode token
  kv_lens      [B]            tokens of each sequence present in the pages
Quantized pages (QuantizedPages, pallas_kernels/quantized_kv.py: int8 or fp8 values
[P, S, K, H] and float32 scales [P, K, S]) are read as they are stored: the values cast
to the query's dtype (exact: int8 and e4m3 values are bfloat16 values) go through the
same dots, a key block's scales multiply the scores' columns, and the value scales the
probabilities' columns before their dot with V. No page is dequantized in memory.

Design (decode is memory bound: the goal is to read each visible KV byte once):
- One program per (sequence, kv head, split). It handles all G query heads of its kv
  head together, so each K/V page is read once for the whole group. G is padded to a
  16-row tile only inside the program (masked load, masked store); q and the output
  keep their [B, K, G, H] shape in memory.
- The page table, position and length are read inside the kernel; the loop visits
  only the key blocks that hold visible keys (from the window start to
  min(position + 1, kv_len)), so a short sequence in a wide page table costs little,
  and a sliding-window layer reads only its window.
- A key block is `pages_per_block` pages gathered through the page table (about 64
  keys: big enough for a tensor-core tile, small enough to keep the f32 scores in
  registers). Online softmax in float32.
- Split-K (flash-decoding): when B * K programs cannot fill the GPU (batch-1 long
  context), the visible key blocks of a sequence are divided among `num_splits`
  programs at run time, each writes (o, m, l) in float32, and a small jnp pass
  combines them. With one split the kernel writes the normalized output directly.

Backend choice: Pallas' Triton lowering is deprecated since JAX 0.11 in favour of
Mosaic GPU. On Hopper the engine runs gpu_mosaic.py instead (pallas_kernels/dispatch.py):
measured on an H200 (2026-11-21, device time, pallas_kernels/BENCHMARKS.md) it reads
K/V at 4.1-4.6 TB/s at batch >= 32 where this kernel reads ~2.5 TB/s (it gathers
256-byte rows of one head per program, and its loads in flight cap it near that rate
on both the H100 and the H200). This kernel stays for what the Mosaic kernel does not
cover: float32, other GPUs than sm90, shapes gpu_mosaic.supports() rejects, and CPU
tests in interpret mode (fast, unlike the Mosaic GPU interpreter).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quantized_kv import QuantizedPages

# The Triton compiler parameters are `CompilerParams` in jax 0.10 and 0.11; older
# releases called them `TritonCompilerParams`.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

# Triton's dot of float32 operands defaults to TF32 (10-bit mantissas): float32 models
# get IEEE float32 dots, as the reference (the H200 showed 1e-3 errors); bfloat16 and
# float16 operands are unaffected.
_EXACT = lax.Precision.HIGHEST
# Triton's tensor-core dot needs every dimension >= 16: the query-head group is
# padded to this many rows inside the program.
_MIN_ROWS = 16
# Keys per block: 64 keys is a full MMA tile and, for bf16 up to H = 256, K and V
# tiles of 32 KiB each, double-buffered (num_stages=2) in 128 KiB of the H100's
# 227 KiB shared memory. Wider rows (f32 at H = 256) take fewer keys to stay there.
_BLOCK_KEYS = 64
_TILE_BYTES = 32 * 1024
# Fewer programs than about twice the SM count (H100: 132 SMs) leaves bandwidth
# unused; split-K adds programs until this many, but each split keeps at least
# _MIN_BLOCKS_PER_SPLIT key blocks so the combine pass stays negligible.
_TARGET_PROGRAMS = 264
_MIN_BLOCKS_PER_SPLIT = 4
# A call of at most this many (sequence, kv head) pairs is bound by latency, not by
# bandwidth: it splits into about one program per SM (_LATENCY_PROGRAMS), down to a
# single key block per split. H200, batch 1, Llama-3.1-8B heads (8 kv heads), device time
# with the combine (2026-12-01, runtime/BENCHMARKS.md): 16 splits took 7.9 / 8.3 / 11.3
# us at 576 / 1024 / 2048 tokens against 8.8 / 9.2 / 14.5 for 8 splits (the rule above
# at a 2048-token table) and 9.2 / 9.6 / 12.0 for 32; at batch 2, 8 splits 8.6 us at 576
# tokens against 9.2 for 17.
_LATENCY_PAIRS = 16
_LATENCY_PROGRAMS = 128
# Finite "minus infinity" for the running max: exp(-inf - _NEG) is 0, never NaN.
_NEG = -1e30


def _decode_kernel(
    # scalar inputs, one per program:
    pos_ref,  # [1] int32: position of the decode token
    len_ref,  # [1] int32: kv_len of the sequence
    # inputs:
    table_ref,  # [MPP] int32: the sequence's page table, padded to whole blocks
    q_ref,  # [G, H]: the kv head's query heads
    k_ref,  # [P, S, H]: every page, this kv head
    v_ref,  # [P, S, H]
    *refs,  # quantized: ks_ref, vs_ref [P, S] float32 (this kv head's scales); then
    # outputs:
    # o_ref [G, H] (num_splits == 1, normalized, q.dtype) or f32 partial output;
    # num_splits > 1: m_ref [G], l_ref [G], float32
    scale: float,
    window: int | None,
    softcap: float | None,
    pages_per_block: int,
    num_splits: int,
    quantized: bool,
):
    ks_ref, vs_ref = refs[:2] if quantized else (None, None)
    o_ref, *ml_refs = refs[2:] if quantized else refs
    G, H = q_ref.shape
    S = k_ref.shape[1]
    R = max(_MIN_ROWS, pl.next_power_of_2(G))
    BK = pages_per_block * S

    rows = lax.broadcasted_iota(jnp.int32, (R, H), 0)
    q = plgpu.load(q_ref.at[pl.ds(0, R), :], mask=rows < G, other=0)  # [R, H]
    # A float32 model over a bfloat16 cache (EngineConfig.cache_dtype's default): the
    # scores in the promoted dtype, as the reference's einsum computes them (Triton's dot
    # takes one dtype: the H200 raised "a and b must have the same element type").
    # Quantized values: in the query's dtype.
    score_dtype = q_ref.dtype if quantized else jnp.promote_types(q_ref.dtype, k_ref.dtype)
    q = q.astype(score_dtype)

    pos = pos_ref[0]
    kv_len = len_ref[0]
    end = jnp.minimum(pos + 1, kv_len)  # keys [start, end) are visible
    start = jnp.maximum(pos - window + 1, 0) if window is not None else jnp.int32(0)
    first = start // BK
    n_blocks = jnp.where(pos < kv_len, pl.cdiv(end, BK) - first, 0)  # padding query: none
    per_split = pl.cdiv(n_blocks, num_splits)
    split = pl.program_id(2)
    lo = first + split * per_split
    hi = jnp.minimum(lo + per_split, first + n_blocks)

    def body(blk, carry):
        acc, m, l = carry
        page_idx = blk * pages_per_block + lax.iota(jnp.int32, pages_per_block)
        pages = table_ref[pl.ds(blk * pages_per_block, pages_per_block)]
        # Table slots past the sequence's last page may hold anything (a freed id, a
        # sentinel): read page 0 there instead; those keys are masked below.
        pages = jnp.where(page_idx * S < end, pages, 0)
        k = k_ref[pages].reshape(BK, H)  # [PPB, S, H] -> [BK, H]
        v = v_ref[pages].reshape(BK, H)
        s = lax.dot_general(q, k.astype(score_dtype), (((1,), (1,)), ((), ())), precision=_EXACT,
                            preferred_element_type=jnp.float32)
        if quantized:
            s = s * ks_ref[pages].reshape(1, BK)  # each key's scale
        s = s * scale  # [R, BK]
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        kv_pos = blk * BK + lax.broadcasted_iota(jnp.int32, (R, BK), 1)
        visible = (kv_pos >= start) & (kv_pos < end)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        if quantized:  # each value row's scale on its probability column (a masked row's may be anything)
            pw = jnp.where(visible, p * vs_ref[pages].reshape(1, BK), 0.0)
            pv = lax.dot(pw.astype(score_dtype), v.astype(score_dtype), precision=_EXACT,
                         preferred_element_type=jnp.float32)
        else:
            pv = lax.dot(p.astype(v.dtype), v, precision=_EXACT, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    acc = jnp.zeros((R, H), jnp.float32)
    m = jnp.full((R,), _NEG, jnp.float32)
    l = jnp.zeros((R,), jnp.float32)
    acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))
    out = acc / jnp.where(l == 0, 1.0, l)[:, None]  # no visible key (padding): 0
    plgpu.store(o_ref.at[pl.ds(0, R), :], out.astype(o_ref.dtype), mask=rows < G)
    if num_splits > 1:
        m_ref, l_ref = ml_refs
        vec_rows = lax.iota(jnp.int32, R)
        plgpu.store(m_ref.at[pl.ds(0, R)], m, mask=vec_rows < G)
        plgpu.store(l_ref.at[pl.ds(0, R)], l, mask=vec_rows < G)


def default_num_splits(batch: int, kv_heads: int, max_keys: int, block_keys: int = _BLOCK_KEYS) -> int:
    """Splits per sequence: enough programs to fill the GPU, none for a big batch."""
    programs = batch * kv_heads
    if programs >= _TARGET_PROGRAMS:
        return 1
    blocks = pl.cdiv(max_keys, block_keys)
    if programs <= _LATENCY_PAIRS:
        return max(1, min(pl.cdiv(_LATENCY_PROGRAMS, programs), blocks))
    most = max(1, blocks // _MIN_BLOCKS_PER_SPLIT)
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, programs), most))


# jit: every layer's call with the same shapes and options lowers to one shared
# function (see pallas_kernels/dispatch.py), not one kernel module per layer.
@functools.partial(jax.jit, static_argnames=('scale', 'window', 'softcap', 'interpret'))
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
    interpret: bool = False,
) -> jax.Array:
    """Decode attention over paged KV. Returns [B, 1, N, H] in q.dtype.

    Same semantics as reference.paged_attention with T == 1: the token at position p
    sees keys j <= p, j < kv_len (and j > p - window); a token with p >= kv_len is
    padding and its output is zero.
    """
    return paged_attention_tuned(
        q, k_pages, v_pages, page_table, q_positions, kv_lens,
        scale=scale, window=window, softcap=softcap, interpret=interpret,
    )


def paged_attention_tuned(
    q: jax.Array,  # [B, 1, N, H]
    k_pages: jax.Array | QuantizedPages,  # [P, S, K, H]
    v_pages: jax.Array | QuantizedPages,  # [P, S, K, H]
    page_table: jax.Array,  # [B, MP] int32
    q_positions: jax.Array,  # [B, 1] int32
    kv_lens: jax.Array,  # [B] int32
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """paged_attention with the tuning knobs exposed (for benchmarks and tests)."""
    B, T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    MP = page_table.shape[1]
    assert T == 1, (
        f"the GPU paged_attention kernel is for decode (one query per sequence), got T={T}; "
        "use the reference or flash_attention for prefill chunks"
    )
    assert N % K == 0, f"{N} query heads are not a multiple of {K} kv heads"
    assert S & (S - 1) == 0 and H & (H - 1) == 0, f"page size {S} and head_dim {H} must be powers of 2 (Triton)"
    G = N // K
    if pages_per_block is None:
        keys = min(_BLOCK_KEYS, _TILE_BYTES // (H * k_pages.dtype.itemsize))
        pages_per_block = max(1, keys // S)
    if num_splits is None:
        num_splits = default_num_splits(B, K, MP * S, pages_per_block * S)
    MPP = pl.cdiv(MP, pages_per_block) * pages_per_block
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, MPP - MP)))  # whole blocks
    pos = q_positions.astype(jnp.int32).reshape(B, 1)
    lens = kv_lens.astype(jnp.int32).reshape(B, 1)
    qg = q.reshape(B, K, G, H)  # [B, 1, K*G, H] -> [B, K, G, H]

    quantized = isinstance(k_pages, QuantizedPages)
    kernel = functools.partial(
        _decode_kernel, scale=scale, window=window, softcap=softcap,
        pages_per_block=pages_per_block, num_splits=num_splits, quantized=quantized,
    )
    operands = [pos, lens, table, qg, k_pages, v_pages]
    in_specs = [
        pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),  # position
        pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),  # kv_len
        pl.BlockSpec((None, MPP), lambda b, h, s: (b, 0)),  # page table row
        pl.BlockSpec((None, None, G, H), lambda b, h, s: (b, h, 0, 0)),  # q group
        pl.BlockSpec((P, S, None, H), lambda b, h, s: (0, 0, h, 0)),  # k pages, kv head h
        pl.BlockSpec((P, S, None, H), lambda b, h, s: (0, 0, h, 0)),  # v pages, kv head h
    ]
    if quantized:
        operands = [pos, lens, table, qg, k_pages.values, v_pages.values, k_pages.scales, v_pages.scales]
        in_specs += [pl.BlockSpec((P, None, S), lambda b, h, s: (0, h, 0))] * 2  # scales [P, K, S], kv head h
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((B, K, G, H), q.dtype)
        out_specs = pl.BlockSpec((None, None, G, H), lambda b, h, s: (b, h, 0, 0))
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, B, K, G, H), jnp.float32),  # o per split
            jax.ShapeDtypeStruct((num_splits, B, K, G), jnp.float32),  # running max m
            jax.ShapeDtypeStruct((num_splits, B, K, G), jnp.float32),  # softmax sum l
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, G, H), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, G), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, G), lambda b, h, s: (s, b, h, 0)),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(B, K, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"paged_decode_G{G}_H{H}_S{S}_ppb{pages_per_block}_splits{num_splits}",
    )(*operands)

    if num_splits > 1:
        o, m, l = out  # [NS, B, K, G, H], [NS, B, K, G], [NS, B, K, G]
        m_all = m.max(axis=0)
        w = l * jnp.exp(m - m_all[None])  # weight of each split's normalized output
        total = w.sum(axis=0)
        out = (o * w[..., None]).sum(axis=0) / jnp.where(total == 0, 1.0, total)[..., None]
        out = out.astype(q.dtype)
    return out.reshape(B, 1, N, H)  # [B, K, G, H] -> [B, 1, K*G, H]

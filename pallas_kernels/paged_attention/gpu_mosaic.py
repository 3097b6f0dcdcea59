"""Paged decode attention as a Pallas Mosaic GPU kernel (Hopper, sm90: TMA, mbarriers,
warpgroup MMA, a producer warpgroup).

Same function, signature, layout and semantics as gpu.py (the Triton kernel) and
reference.py with T == 1:
  q            [B, 1, N, H]   N = K * G query heads, grouped by kv head
  k_pages      [P, S, K, H]   P pages of S tokens
  v_pages      [P, S, K, H]
  page_table   [B, MP]        page ids of each sequence, in order
  q_positions  [B, 1]         absolute position of the decode token
  kv_lens      [B]            tokens of each sequence present in the pages

Why: decode reads every visible K/V byte once, so its speed is the rate at which a
kernel keeps loads in flight. The Triton kernel (one program per sequence and kv head,
gathering 256-byte rows of one head through pointer loads) reads ~2.0 TB/s on both the
H100 and the H200 whatever its knobs (pallas_kernels/BENCHMARKS.md): on the H200 that
is under half the copy rate.

Design: one CTA per (sequence, split) reads whole pages of all kv heads.
- A page [S, K, H] is contiguous; viewed as rows (token, kv head) of H elements it is
  S * K rows of the 2-D array k_pages.reshape(P * S * K, H). A pipeline block is
  `block_rows` such rows (128: 16 tokens x 8 kv heads for Llama-3), fetched by one TMA
  copy per page it touches straight into a swizzled shared-memory slot: 32 KiB of K and
  32 KiB of V per block at head_dim 128. A producer warpgroup reads the page ids from
  the table and keeps `stages` blocks in flight through a ring of slots ("ready"
  mbarriers completed by the TMA, "free" mbarriers the compute warpgroups arrive on).
- All N query heads of the sequence are the rows of one 64-row wgmma tile per compute
  warpgroup (N <= 64: one warpgroup; N <= 128: two). S = Q K^T is then a 64 x
  block_rows matrix where query row r (kv head r // G) and key row c (kv head c % K)
  belong together only when their heads match: the others are masked to -inf like keys
  outside the causal/window/length range, so each query head sees exactly its kv
  head's keys. O += P V over the same block rows gives each query row the weighted sum
  of its own head's values (P is zero elsewhere). The tensor cores do K times the
  useful multiply-adds (and 64 / N more for padding rows), which decode can afford:
  at B=32 ctx 4096 that is ~34 GFLOP against ~0.54 GB of K/V, about a fifth of the
  memory time on an H100, overlapped with the copies.
- Online softmax in float32 with exp2 (scores scaled by scale * log2 e), the running
  max starting at a finite -1e30 so a row whose keys are all masked stays at p = 0.
  Only the window-start and length-edge blocks apply the position mask; every block
  applies the head mask.
- Split-K: with fewer sequences than SMs, the visible blocks of a sequence are divided
  among `num_splits` CTAs (B * splits ~ the SM count, one CTA per SM), each writing its
  normalized float32 output and (max, sum) per row; a jnp pass combines them exactly
  like gpu.py. With one split the kernel writes the output in q.dtype.
- Q is copied as its N rows into the 64-row tile (rows past N are never used); with
  one split the output goes back the same way (registers -> Q tile -> TMA store of N
  rows), so no padding pass runs outside the kernel. Split outputs are stored from
  registers straight to global memory (a few KiB per CTA).

Shared memory (bf16, head_dim 128, 128-row blocks, 2 stages): Q 16 KiB per compute
warpgroup + K/V ring 2 x 2 x 32 KiB = 144 KiB, one CTA per SM; `smem_bytes` computes it.

Falls back to the Triton kernel (gpu.py), same call: float32 inputs (wgmma has no
plain f32), head_dim other than 64/128/256, more than 128 query heads, a kv head count
that is not a power of two dividing the block, pages smaller than the TMA tile
alignment (S * K < 8 rows when a block spans pages). `supports()` says which path runs.

Measured (H200, JAX 0.11.2, 2026-11-21, `python -m pallas_kernels.bench`, device time):
at B=32 ctx 4096 (Llama-3 8B heads, bf16) 0.129-0.133 ms = 4.0-4.2 TB/s of K/V, 98-102%
of the copy rate measured in the same run (a pure read outruns a read + write copy),
1.93-2.00x the bundled Pallas paged_attention at its defaults (two runs) and 1.6x our
Triton kernel; 4.5-4.6
TB/s at B >= 32 with longer contexts or B=128. So dispatch runs it for decode on sm90.

Verification without a GPU (tests/pallas_kernels/test_gpu_mosaic_paged.py): the Mosaic
GPU interpreter runs the kernel (TMA, barriers, masks, softmax, stores; the two
matmuls become jnp dots of the same shared-memory tiles because the jax 0.10
interpreter cannot run a wgmma with a transposed or register operand), and exporting
for CUDA runs the real lowering. The H100/H200 runs the compiled tests and
`python -m pallas_kernels.bench --decode_only` ("ours mosaic" column).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic
from pallas_kernels.paged_attention import gpu as triton_gpu

_LOG2E = math.log2(math.e)
_NEG = -1e30  # finite "minus infinity" for the running max (log2 units)
_ROWS = 64  # query rows per compute warpgroup: the M of one wgmma
_MAX_WGS = 2
_SMEM_LIMIT = flash_mosaic._SMEM_LIMIT
_REDUCTION_SCRATCH = flash_mosaic._REDUCTION_SCRATCH
HEAD_DIMS = flash_mosaic.HEAD_DIMS
DTYPES = flash_mosaic.DTYPES
# One CTA per SM: the split count aims at this many CTAs where the batch is smaller.
_DEFAULT_SMS = 132  # H100 / H200 SXM
_MIN_BLOCKS_PER_SPLIT = 4
# One sequence over a table of at most this many tokens: the Triton kernel is quicker
# (`latency_bound`). H200, Llama-3.1-8B heads, page 16, device time per call with the
# combine, 32 layers' caches (2026-12-01, runtime/BENCHMARKS.md): at batch 1 this kernel
# took 10.9 / 11.2 / 12.7 / 15.4 us at 576 / 1024 / 2048 / 4096 tokens, the Triton kernel
# at 16 splits 7.9 / 8.3 / 11.3 / 16.8 (at 4096 no split count beat 16.2). At batch 2 the
# Triton kernel won at 576 tokens (8.6 against 11.3) and lost at 2048 (15.5 against 14.2);
# from batch 8 it lost at every length. This kernel's fixed cost per CTA (the ring's
# set-up, the wgmma tiles, the 64-row padded partials the combine reads) is what a short
# batch-1 call pays; the Triton kernel's gathered loads cost it bandwidth only when the
# cache read is long enough to matter.
_LATENCY_BOUND_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Config:
    block_rows: int = 128  # (token, kv head) rows per pipeline block: the N of S = Q K^T
    stages: int = 2  # blocks in flight

    def __post_init__(self):
        if self.block_rows not in (64, 128):
            # P V's contraction is block_rows: with P from registers, wgmma needs a
            # multiple of 64 ("K must be a multiple of 64" at 32, seen on the H200).
            raise ValueError(f"block_rows={self.block_rows} must be 64 or 128")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")


def default_config(head_dim: int, num_wgs: int = 1) -> Config:
    """128-row blocks, 2 stages; narrower blocks where the ring would not fit."""
    for rows in (128, 64):
        config = Config(block_rows=rows)
        if smem_bytes(head_dim, 2, config, num_wgs) <= _SMEM_LIMIT:
            return config
    return Config(block_rows=64)


def smem_bytes(head_dim: int, itemsize: int, config: Config, num_wgs: int = 1) -> int:
    q = num_wgs * _ROWS * head_dim * itemsize
    ring = 2 * config.stages * config.block_rows * head_dim * itemsize
    barriers = 8 * (num_wgs + 4 * config.stages)
    return q + ring + barriers + _REDUCTION_SCRATCH


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _geometry(S: int, K: int, config: Config) -> tuple[int, int] | None:
    """(tokens per block, TMA copies per block), or None when the layout does not fit."""
    rows = config.block_rows
    if not (_is_pow2(K) and K <= rows and _is_pow2(S)):
        return None
    tokens = rows // K
    if S >= tokens:
        return tokens, 1
    if (S * K) % 8:  # each page's rows start at a multiple of the 8-row smem tile
        return None
    return tokens, tokens // S


def supports(q: jax.Array, k_pages: jax.Array, window=None, softcap=None) -> bool:
    """Whether this kernel runs the call (else the Triton kernel does)."""
    del window, softcap  # every value is supported
    if q.ndim != 4 or k_pages.ndim != 4 or q.shape[1] != 1:
        return False
    B, _, N, H = q.shape
    _, S, K, Hk = k_pages.shape
    dtype = jnp.dtype(q.dtype)
    if dtype not in DTYPES or jnp.dtype(k_pages.dtype) != dtype or H != Hk or H not in HEAD_DIMS:
        return False
    if N % K or N > _MAX_WGS * _ROWS:
        return False
    num_wgs = -(-N // _ROWS)
    config = default_config(H, num_wgs)
    return _geometry(S, K, config) is not None and smem_bytes(H, dtype.itemsize, config, num_wgs) <= _SMEM_LIMIT


def num_sms() -> int:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or _DEFAULT_SMS) if device.platform == "gpu" else _DEFAULT_SMS


def latency_bound(batch: int, table_tokens: int) -> bool:
    """Whether a call this small runs faster in the Triton kernel (_LATENCY_BOUND_TOKENS)."""
    return batch == 1 and table_tokens <= _LATENCY_BOUND_TOKENS


def runs_triton(q, k_pages, page_table, window=None, softcap=None, *, latency_rule: bool = True) -> bool:
    """Whether paged_attention hands this call to the Triton kernel: a call this kernel
    does not support, or (with `latency_rule`) a `latency_bound` one."""
    return not supports(q, k_pages, window, softcap) or (
        latency_rule and latency_bound(q.shape[0], page_table.shape[1] * k_pages.shape[1]))


def default_num_splits(batch: int, blocks: int, sms: int | None = None) -> int:
    """Splits per sequence: about one CTA per SM in all, each split >= 4 blocks."""
    sms = sms or num_sms()
    if batch >= sms:
        return 1
    return max(1, min(sms // batch, blocks // _MIN_BLOCKS_PER_SPLIT))


# ------------------------------------------------------------------ kernel


def _decode_kernel(
    pos_ref,  # [B] int32 GMEM: position of the decode token
    len_ref,  # [B] int32 GMEM: kv_len
    table_ref,  # [B, MPP] int32 GMEM: page ids, padded to whole blocks
    q_ref,  # [B, Np, H] GMEM: query heads (N, padded to a multiple of 8 rows)
    k_ref,  # [P * S * K, H] GMEM: rows (page, token, kv head)
    v_ref,  # [P * S * K, H]
    o_ref,  # [B, Np, H] q.dtype (one split) or [NS, B, R, H] float32, R = 64 * num_wgs
    *ml_refs,  # splits > 1: m_ref, l_ref [NS, B, R] float32
    config: Config,
    page_size: int,
    kv_heads: int,
    groups: int,
    num_wgs: int,
    num_splits: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    interpret: bool,
):
    S, K, G = page_size, kv_heads, groups
    rows, stages = config.block_rows, config.stages
    tokens, copies = _geometry(S, K, config)
    per_copy = min(S, tokens)  # tokens of one TMA copy
    Np, H = q_ref.shape[1:]
    dtype = q_ref.dtype
    wg_rows = [min(_ROWS, Np - w * _ROWS) for w in range(num_wgs)]  # query rows of each warpgroup
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    log2_k = K.bit_length() - 1

    def layout(x, lay):
        return x if interpret else plgpu.layout_cast(x, lay)

    def iota(shape, dim):
        return layout(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    def body(q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_free, v_free):
        split = lax.axis_index("split")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        pos, kv_len = pos_ref[b], len_ref[b]
        end = jnp.minimum(pos + 1, kv_len)  # visible tokens [start, end)
        start = jnp.maximum(pos - window + 1, 0) if window is not None else jnp.int32(0)
        first = flash_mosaic._div(start, tokens)
        n_blocks = jnp.where(pos < kv_len, flash_mosaic._div(end + tokens - 1, tokens) - first, 0)
        per_split = flash_mosaic._div(n_blocks + num_splits - 1, num_splits)
        lo = first + split * per_split
        hi = jnp.maximum(jnp.minimum(lo + per_split, first + n_blocks), lo)

        def slot_of(kb):
            return lax.rem(kb - lo, jnp.int32(stages))

        @pl.when(wg < num_wgs)
        def _compute():
            if num_wgs > 1:
                plgpu.set_max_registers(232, action="increase")
            r0 = wg * _ROWS
            q_tile = q_smem.at[wg]
            # Rows past N stay uninitialized: they have no kv head, so the head mask
            # turns their scores into -inf whatever Q holds, and they are not stored.
            for w, n in enumerate(wg_rows):

                @pl.when(wg == w)
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(w * _ROWS, n)], q_tile.at[pl.ds(0, n)], q_ready.at[w])

            plgpu.barrier_wait(q_ready.at[wg])
            # Blocks wholly inside [start, end) need only the head mask.
            mid_lo = jnp.clip(flash_mosaic._div(start + tokens - 1, tokens), lo, hi)
            mid_hi = jnp.clip(flash_mosaic._div(end, tokens), mid_lo, hi)

            def step(kb, carry, *, masked: bool):
                acc, m, l = carry
                slot = slot_of(kb)
                k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
                plgpu.barrier_wait(k_ready.at[slot])
                if interpret:
                    s = lax.dot_general(
                        q_tile[...], k_tile[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                    )
                else:

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((_ROWS, rows), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])

                if softcap is None:
                    c = scale * _LOG2E
                else:
                    s = flash_mosaic._tanh(s * (scale / softcap))
                    c = softcap * _LOG2E
                col = iota((_ROWS, rows), 1)
                row_head = lax.div(r0 + iota((_ROWS, rows), 0), jnp.int32(G))
                visible = (col & (K - 1)) == row_head  # rows >= N have no kv head: nothing
                if masked:
                    t = kb * tokens + lax.shift_right_logical(col, jnp.int32(log2_k))
                    visible &= (t >= start) & (t < end)
                s = jnp.where(visible, s, -jnp.inf)

                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_ready.at[slot])
                if interpret:
                    acc = acc + lax.dot(p16, v_tile[...], preferred_element_type=jnp.float32)
                else:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_tile)

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                layout(jnp.zeros((_ROWS, H), jnp.float32), plgpu.Layout.WGMMA),
                layout(jnp.full((_ROWS,), _NEG, jnp.float32), flash_mosaic._ROW_LAYOUT),
                layout(jnp.zeros((_ROWS,), jnp.float32), flash_mosaic._ROW_LAYOUT),
            )
            masked = functools.partial(step, masked=True)
            carry = lax.fori_loop(lo, mid_lo, masked, carry)  # window start
            carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(mid_hi, hi, masked, carry)  # length edge

            # No visible key (padding query, empty split, padding row): l = 0, acc = 0.
            inv = 1.0 / jnp.maximum(l, 1e-30)
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            if num_splits == 1:  # through the Q tile (this warpgroup's own) to its N rows
                q_tile[...] = out.astype(dtype)
                plgpu.commit_smem()
                for w, n in enumerate(wg_rows):

                    @pl.when(wg == w)
                    def _():
                        plgpu.copy_smem_to_gmem(q_tile.at[pl.ds(0, n)], o_ref.at[b, pl.ds(w * _ROWS, n)])

                plgpu.wait_smem_to_gmem(0)
            else:
                m_ref, l_ref = ml_refs
                o_ref.at[split, b, pl.ds(r0, _ROWS)][...] = out
                m_ref.at[split, b, pl.ds(r0, _ROWS)][...] = m
                l_ref.at[split, b, pl.ds(r0, _ROWS)][...] = l

        @pl.when(wg == num_wgs)
        def _producer():
            if num_wgs > 1:
                plgpu.set_max_registers(40, action="decrease")

            def sources(kb):
                """The first global row of each TMA copy of block kb: one page-table
                read per page, issued before the producer waits for a free slot, so
                the read's latency overlaps the wait."""
                t0 = kb * tokens
                rows_ = []
                for j in range(copies):
                    t = t0 + j * per_copy
                    page = table_ref[b, flash_mosaic._div(t, S)]
                    if copies > 1:
                        # A page of the block outside [start, end) may be freed or
                        # unassigned (any id): read page 0 instead, masked anyway.
                        page = jnp.where((t < end) & (t + per_copy > start), page, 0)
                    rows_.append((page * S + lax.rem(t, jnp.int32(S))) * K)
                return rows_

            def issue(src, slot, ref, smem, barrier):
                for j, row in enumerate(src):
                    dst = smem.at[slot] if copies == 1 else smem.at[slot, pl.ds(j * per_copy * K, per_copy * K)]
                    plgpu.copy_gmem_to_smem(ref.at[pl.ds(row, per_copy * K)], dst, barrier.at[slot])

            flash_mosaic.produce_kv_ring(
                lo, hi, stages, prepare=sources,
                copy_k=lambda src, slot: issue(src, slot, k_ref, k_smem, k_ready),
                copy_v=lambda src, slot: issue(src, slot, v_ref, v_smem, v_ready),
                k_free=k_free, v_free=v_free,
            )

    pl.run_scoped(
        body,
        plgpu.SMEM((num_wgs, _ROWS, H), dtype, transforms=transforms),  # Q
        plgpu.SMEM((stages, rows, H), dtype, transforms=transforms),  # K ring
        plgpu.SMEM((stages, rows, H), dtype, transforms=transforms),  # V ring
        plgpu.Barrier(num_barriers=num_wgs),  # Q loaded
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # K slot loaded
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # V slot loaded
        plgpu.Barrier(num_arrivals=num_wgs, num_barriers=stages),  # K slot free
        plgpu.Barrier(num_arrivals=num_wgs, num_barriers=stages),  # V slot free
        collective_axes="wg",
    )


# ------------------------------------------------------------------ entry points


# jit: every layer's call with the same shapes and options lowers to one shared
# function (see pallas_kernels/dispatch.py).
@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "interpret"))
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
    interpret=False,
) -> jax.Array:
    """Decode attention over paged KV. Returns [B, 1, N, H] in q.dtype; see gpu.py.
    `interpret`: False (compile), True (Mosaic GPU interpreter) or InterpretGPUParams.
    Calls `supports()` rejects run the Triton kernel."""
    return paged_attention_tuned(
        q, k_pages, v_pages, page_table, q_positions, kv_lens,
        scale=scale, window=window, softcap=softcap, interpret=interpret,
    )


def paged_attention_tuned(
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
    interpret=False,
    block_rows: int | None = None,
    stages: int | None = None,
    num_splits: int | None = None,
    latency_rule: bool = True,
) -> jax.Array:
    """paged_attention with the tuning knobs exposed (for benchmarks and tests). A call
    `latency_bound` selects runs the Triton kernel unless a knob is given or
    `latency_rule` is False."""
    B, T, N, H = q.shape
    assert T == 1, f"the GPU paged_attention kernel is for decode (one query per sequence), got T={T}"
    tuned = block_rows is not None or stages is not None or num_splits is not None
    if runs_triton(q, k_pages, page_table, window, softcap, latency_rule=latency_rule and not tuned):
        return triton_gpu.paged_attention(
            q, k_pages, v_pages, page_table, q_positions, kv_lens, scale=scale, window=window, softcap=softcap,
            interpret=interpret not in (False, None),
        )
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1")
    P, S, K, _ = k_pages.shape
    assert v_pages.shape == k_pages.shape and v_pages.dtype == q.dtype, (k_pages.shape, v_pages.shape)
    MP = page_table.shape[1]
    num_wgs = -(-N // _ROWS)
    default = default_config(H, num_wgs)
    config = Config(block_rows=block_rows or default.block_rows, stages=stages or default.stages)
    geometry = _geometry(S, K, config)
    if geometry is None:
        raise ValueError(f"{config} does not fit pages of {S} tokens x {K} kv heads")
    need = smem_bytes(H, q.dtype.itemsize, config, num_wgs)
    if need > _SMEM_LIMIT:
        raise ValueError(f"{config} at head_dim {H} needs {need} bytes of shared memory > {_SMEM_LIMIT}")
    tokens, _ = geometry
    blocks = -(-(MP * S) // tokens)
    if num_splits is None:
        num_splits = default_num_splits(B, blocks)
    params = flash_mosaic._interpret_params(interpret)

    R = num_wgs * _ROWS
    MPP = -(-(blocks * tokens) // S)  # table slots of whole blocks
    # TMA moves whole 8-row smem tiles: a head count that is not a multiple of 8
    # (Gemma-3 1B: 4) is padded (padding rows have no kv head, like rows past N).
    Np = -(-N // 8) * 8
    qr = q.reshape(B, N, H)
    if Np != N:
        qr = jnp.pad(qr, ((0, 0), (0, Np - N), (0, 0)))
    table = page_table.astype(jnp.int32)
    if MPP != MP:
        table = jnp.pad(table, ((0, 0), (0, MPP - MP)))
    pos = q_positions.astype(jnp.int32).reshape(B)
    lens = kv_lens.astype(jnp.int32).reshape(B)
    k_rows = k_pages.reshape(P * S * K, H)
    v_rows = v_pages.reshape(P * S * K, H)

    if num_splits == 1:
        out_type = jax.ShapeDtypeStruct((B, Np, H), q.dtype)
    else:
        out_type = (
            jax.ShapeDtypeStruct((num_splits, B, R, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, R), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, R), jnp.float32),
        )
    kernel = functools.partial(
        _decode_kernel, config=config, page_size=S, kv_heads=K, groups=N // K, num_wgs=num_wgs,
        num_splits=num_splits, scale=float(scale), window=window,
        softcap=None if softcap is None else float(softcap), interpret=params is not None,
    )
    call = plgpu.kernel(
        kernel,
        **{flash_mosaic._OUT_ARG: out_type},
        grid=(num_splits, B),
        grid_names=("split", "batch"),
        num_threads=num_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
    )
    out = call(pos, lens, table, qr, k_rows, v_rows)
    if num_splits > 1:
        o, m, l = out  # [NS, B, R, H], [NS, B, R] (m in log2 units), [NS, B, R]
        w = l * jnp.exp2(m - m.max(axis=0)[None])
        total = w.sum(axis=0)
        out = (o * w[..., None]).sum(axis=0) / jnp.where(total == 0, 1.0, total)[..., None]
    return out[:, :N].astype(q.dtype).reshape(B, 1, N, H)

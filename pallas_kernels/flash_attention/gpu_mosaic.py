"""Causal flash attention over a padded prefill chunk as a Pallas Mosaic GPU kernel
(Hopper, sm90: TMA, mbarriers, warpgroup MMA, warp specialization).

Same function, signature and semantics as gpu.py (the Triton kernel) and reference.py:
  q        [B, T, N, H]   N = K * G query heads, grouped by kv head
  k, v     [B, T, K, H]
  lengths  [B]            valid tokens per row (right padding beyond)
Query t sees key s when s <= t, s < lengths[b] and, with a window W, s > t - W;
queries at t >= lengths[b] are padding and their output is zero.

Why a second GPU kernel: Pallas' Triton lowering is deprecated since JAX 0.11 in favour
of Mosaic GPU, and on the H100 our Triton kernel reaches only 0.62-0.69x of cuDNN for
causal GQA prefill (pallas_kernels/BENCHMARKS.md), while JAX's bundled Mosaic GPU
kernel (attention_mgpu, FlashAttention-3 style) runs at 0.97-1.02x cuDNN. That kernel
lacks what the engine needs (per-row lengths, sliding window, softcap, a scale, bf16
tiles, T not a multiple of 128), so this module implements the same kind of schedule
with those semantics. Which kernel `impl="gpu"` runs was decided by measurement
(`python -m pallas_kernels.bench --prefill_only`, pallas_kernels/BENCHMARKS.md): at
B=8 T=2048 and B=1 T=16384 (causal, 32 q / 8 kv heads, d=128, bf16) this kernel runs
at 1.12x / 1.07x cuDNN on an H100 and 1.18x / 1.08x on an H200, the Triton kernel at
0.62-0.69x. So dispatch runs this kernel for flash attention on sm90 GPUs; the Triton
kernel covers what this one does not support (below), pre-Hopper GPUs, and CPU tests
in interpret mode (the Mosaic GPU interpreter is far slower).

Design (one CTA = three warpgroups):
- Grid (query head, query tile, batch row); a query tile is 2 x block_q = 128 rows.
  Heads vary fastest, so the G heads of a kv group run side by side and read the same
  K/V from L2. Query tiles are issued last-first: under the causal mask the late tiles
  have the most key blocks, so they start first and the short ones fill the tail.
- Warpgroups 0 and 1 compute, each on block_q = 64 query rows (the M of one wgmma)
  of the tile; warpgroup 2 is the producer: it only issues TMA copies of K and V
  blocks (block_kv keys) into a ring of `stages` shared-memory slots. Per slot, a
  "ready" mbarrier (completed by the TMA) and a "free" mbarrier (both compute
  warpgroups arrive when done with the slot) hand it back and forth. The producer
  gives its registers to the compute warpgroups (setmaxnreg 40 / 232).
- A compute step on key block kb: S = Q K^T by wgmma from shared memory (K read
  transposed through the swizzled layout), the score transform (scale, softcap), the
  mask (edge blocks only), online softmax in float32 with exp2 (the running max is
  kept in log2 units so p = exp2(s * c - m) is one FMA + ex2), then O += P V by wgmma
  with P (cast to the input dtype) from registers. The two compute warpgroups
  alternate through a two-party "schedule" mbarrier: one runs its softmax while the
  other's matmuls occupy the tensor cores (FA3 ping-pong). The wait for the next K
  block is issued while the P V wgmma is in flight.
- Block skipping: each warpgroup's key blocks are [first, last): first from its first
  query's window start, last from min(last query + 1, length), so key blocks above
  the diagonal, outside the window or wholly past the row's length are never loaded
  or multiplied; a query block wholly past the length has no key blocks and reads no
  K/V. Inside that range, blocks wholly visible to every query of the warpgroup skip
  the mask arithmetic; only the diagonal, length and window edge blocks are masked.
  The producer loads the union of both warpgroups' ranges; in a step outside its own
  range a warpgroup only takes part in the barrier protocol ("skip" step). With
  block_kv = 128 both warpgroups of a tile have the same causal range, so skip steps
  only occur at a window or length edge.
- Masking: keys s > t, s >= length or s <= t - W get a score of -inf before the row
  max; the running max starts at a finite -1e30, so a row whose keys are all masked in
  a block adds exp2(-inf) = 0 and never forms inf - inf. Queries t >= length are
  computed like the others (they see the keys < length) and their output rows are
  set to exactly 0 before the store. The output goes registers -> shared memory (the
  warpgroup's Q slot) -> TMA store.
- Softcap: tanh(s * scale / c) * c, applied before masking. tanh is computed as
  1 - 2 / (exp2(2 x log2 e) + 1) rather than with tanh.approx, whose ~5e-4 relative
  error times c = 30..50 would move logits by ~0.02.
- Any T: the wrapper pads the chunk to a multiple of 128 (padding positions are past
  every row's length, so they are masked like any padding) and cuts the output back;
  this costs one copy of q, k, v when T % 128 != 0 and nothing otherwise.

Tiling and shared memory (bytes, bf16/f16; Hopper allows 227 KiB = 232448 per block;
"total" adds 8 bytes per mbarrier and Mosaic's 2048-byte reduction scratch, the number
the lowering checks):
  head_dim  block_kv  stages   Q (2 x 64 rows)   K + V ring        total
     64       128       2          16384            65536          84056
    128       128       2          32768           131072         165976
    128       128       3          32768           196608         231544  (bench sweep)
    128        64       2          32768            65536          100440  (bench sweep)
    256        64       2          65536           131072         198744
`smem_bytes` computes it; a config over the limit is refused by the wrapper and would
fail at lowering ("exceeds available shared memory"; the tests export for CUDA on CPU,
which runs that check). One CTA per SM: the three warpgroups' registers fill the
file (and at head_dim >= 128 so does shared memory). Registers per compute
thread (128 threads per warpgroup): the O accumulator 64 x H f32 is H / 2 registers
(64 at H = 128, 128 at H = 256), S block_kv / 2 (64), P block_kv / 4 (32), under the
232 the compute warpgroups claim (2 x 232 + 40 for the producer fills the 64K file).

Falls back to the Triton kernel (gpu.py), with the same call: float32 (wgmma has no
plain f32 inputs), head_dim other than 64 / 128 / 256, q/k/v of different dtypes.
`supports()` says which path a call takes.

Verification without a GPU (tests/pallas_kernels/test_gpu_mosaic_flash.py):
- `interpret=True` runs the kernel in Pallas' Mosaic GPU interpreter (CPU threads for
  the warpgroups, simulated shared memory, TMA and mbarriers with strict phase checks,
  NaN-poisoned uninitialized memory); `interpret=` also takes an InterpretGPUParams
  (e.g. detect_races=True), which plgpu.kernel's `interpret` argument accepts.
  The interpreter of jax 0.10 cannot run four things this kernel uses on the GPU:
  a wgmma whose B operand is a transposed ref (its wgmma callback fails on the
  TransposeTransform), a wgmma whose A operand is a register value (the callback
  reads A from a buffer), pl.run_state ("Higher-order primitive run_state" is not
  implemented) and plgpu.layout_cast (no CPU lowering). So in interpret mode, and
  only there, S = Q K^T and O += P V are jnp dot products of the same shared-memory
  tiles and the layout casts are identities; everything else (TMA copies, the
  barrier protocol, block ranges, masking, softmax, stores) is the code that runs on
  the GPU.
- Exporting for CUDA on CPU runs Pallas' Mosaic GPU lowering of the real code path
  (wgmma operands, layouts, every op's lowering rule, the shared-memory check) into
  the module XLA will compile; its remaining passes (to LLVM, PTX, ptxas) only run
  when compiling for a GPU.
What neither can check, and the H100 run must: those passes, register allocation
(spills, most likely at head_dim 256), the wgmma/TMA results on hardware, the speed,
and the schedule's real overlap.

On the GPU: `python -m pallas_kernels.bench --prefill_only` ("ours mosaic ms" against
"cudnn ms"; "mosaic_speedup" in the --out JSON) and
tests/pallas_kernels/test_gpu_mosaic_flash.py, whose sweeps run compiled there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu as triton_gpu

# The Mosaic GPU interpreter's parameters: public as plgpu.InterpretGPUParams in later
# jax releases; jax 0.10 has them only under jax._src.
InterpretGPUParams = getattr(plgpu, "InterpretGPUParams", None)
if InterpretGPUParams is None:
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # pragma: no cover - a jax without the Mosaic GPU interpreter
        InterpretGPUParams = None

_LOG2E = math.log2(math.e)
# Finite "minus infinity" for the running max (log2 units): exp2(-inf - _NEG) is 0.
_NEG = -1e30
_COMPUTE_WGS = 2  # compute warpgroups per CTA; warpgroup 2 is the TMA producer
_SMEM_LIMIT = 227 * 1024  # Hopper's opt-in shared memory per block
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The row-vector layout of a WGMMA accumulator: `Layout.WGMMA.reduce(1)` in jax 0.10+,
# `Layout.WGMMA_ROW` in earlier releases.
if hasattr(plgpu.Layout.WGMMA, "reduce"):
    _ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)
else:  # pragma: no cover - older jax
    _ROW_LAYOUT = plgpu.Layout.WGMMA_ROW
# plgpu.kernel's output argument: `out_type` (jax 0.10+) or `out_shape` (earlier).
_OUT_ARG = "out_type" if "out_type" in inspect.signature(plgpu.kernel).parameters else "out_shape"


@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 64  # query rows per compute warpgroup (the M of one wgmma)
    block_kv: int = 128  # keys per pipeline step
    stages: int = 2  # K/V slots in flight

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q}: one wgmma row block per warpgroup is 64")
        if self.block_kv not in (64, 128):
            raise ValueError(f"block_kv={self.block_kv} must be 64 or 128 (it must divide the 128-row tile)")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2 (one slot loading while one is used)")

    @property
    def tile_q(self) -> int:
        return _COMPUTE_WGS * self.block_q


def default_config(head_dim: int) -> Config:
    """128-key blocks, 2 stages; head_dim 256 halves the key block so that Q and a
    2-stage K/V ring fit shared memory (196608 bytes)."""
    return Config(block_kv=128 if head_dim <= 128 else 64)


# Shared memory Mosaic GPU reserves for cross-warp reductions (CompilerParams default).
_REDUCTION_SCRATCH = getattr(plgpu.CompilerParams(), "reduction_scratch_bytes", 2048)


def smem_bytes(head_dim: int, itemsize: int, config: Config) -> int:
    """Shared memory per CTA: Q/O tiles, the K/V ring, mbarriers and Mosaic's
    reduction scratch (what the lowering checks against the 227 KiB limit)."""
    q = _COMPUTE_WGS * config.block_q * head_dim * itemsize
    kv = 2 * config.stages * config.block_kv * head_dim * itemsize
    barriers = 8 * (_COMPUTE_WGS + 4 * config.stages + 1)
    return q + kv + barriers + _REDUCTION_SCRATCH


def supports(q: jax.Array, k: jax.Array, window: int | None = None, softcap: float | None = None) -> bool:
    """Whether this kernel runs the call (else flash_attention falls back to Triton):
    bf16 / f16 inputs of one dtype and head_dim 64, 128 or 256. Any window, softcap,
    T and head grouping are supported."""
    del window, softcap  # every value is supported
    if q.ndim != 4 or k.ndim != 4 or q.shape[2] % k.shape[2]:
        return False
    dtype = jnp.dtype(q.dtype)
    if dtype not in DTYPES or jnp.dtype(k.dtype) != dtype:
        return False
    H = q.shape[-1]
    return H in HEAD_DIMS and smem_bytes(H, dtype.itemsize, default_config(H)) <= _SMEM_LIMIT


def _interpret_params(interpret):
    """False / None: compile; True: the Mosaic GPU interpreter with its defaults
    (uninitialized memory is NaN, out-of-bounds reads raise); an InterpretGPUParams:
    used as given."""
    if interpret is False or interpret is None:
        return None
    if interpret is True:
        if InterpretGPUParams is None:
            raise NotImplementedError("this jax has no Mosaic GPU interpreter")
        return InterpretGPUParams()
    return interpret


# ------------------------------------------------------------------ kernel


@dataclasses.dataclass(frozen=True)
class _Range:
    """Key blocks of one warpgroup: [first, last) hold every key visible to one of its
    queries; [mid_lo, mid_hi) are visible to all of them (no mask needed)."""

    first: jax.Array
    mid_lo: jax.Array
    mid_hi: jax.Array
    last: jax.Array


def _div(x, n: int):
    return lax.div(x, jnp.int32(n))  # x >= 0 here: truncation is floor


def _key_range(q0, length, *, block_q: int, block_kv: int, window: int | None) -> _Range:
    """Key blocks for queries [q0, q0 + block_q) of a row of `length` valid tokens.
    An all-padding block (q0 >= length) gets the empty range [first, first)."""
    if window is None:
        first = jnp.int32(0)
        mid_lo = first
    else:
        first = _div(jnp.maximum(q0 - window + 1, 0), block_kv)
        # A block is inside the window for every query when its first key > last query - W.
        mid_lo = _div(jnp.maximum(q0 + block_q - window, 0) + block_kv - 1, block_kv)
    live = q0 < length
    last = _div(jnp.minimum(q0 + block_q, length) + block_kv - 1, block_kv)
    last = jnp.where(live, jnp.maximum(last, first), first)
    # A block is visible to every query when its last key <= the first query (q0)
    # and < length, i.e. (kb + 1) * block_kv <= min(q0 + 1, length).
    mid_hi = _div(jnp.minimum(q0 + 1, length), block_kv)
    mid_lo = jnp.clip(mid_lo, first, last)
    mid_hi = jnp.clip(mid_hi, mid_lo, last)
    return _Range(first, mid_lo, mid_hi, last)


def _tanh(x):
    """tanh from exp2: accurate to ~1e-7 absolute under approx math (tanh.approx is ~5e-4)."""
    return 1.0 - 2.0 / (jnp.exp2(x * (2.0 * _LOG2E)) + 1.0)


def produce_kv_ring(lo, hi, stages: int, *, prepare, copy_k, copy_v, k_free, v_free) -> None:
    """The producer side of a K/V ring in shared memory: blocks kb in [lo, hi) go to
    slot (kb - lo) % stages. `prepare(kb)` computes what the copies need (issued before
    the wait for a free slot, so a global read it makes overlaps the wait);
    `copy_k(prepared, slot)` / `copy_v(...)` issue the TMA copies that complete the
    slot's "ready" barriers; the consumers arrive on `k_free` / `v_free` when done with
    a slot. The first `stages` blocks need no wait; at the end the producer waits for
    each slot's last release, so it has observed every phase of the free barriers
    (the interpreter's strict phase checks require it)."""
    num_steps = hi - lo

    def fill(i: int):
        @pl.when(i < num_steps)
        def _():
            prepared = prepare(lo + i)
            copy_k(prepared, i)
            copy_v(prepared, i)

    def drain(i: int):
        @pl.when(i < num_steps)
        def _():
            plgpu.barrier_wait(k_free.at[i])
            plgpu.barrier_wait(v_free.at[i])

    for i in range(stages):
        fill(i)

    @pl.loop(lo + stages, jnp.maximum(hi, lo + stages))
    def _(kb):
        slot = lax.rem(kb - lo, jnp.int32(stages))
        prepared = prepare(kb)
        plgpu.barrier_wait(k_free.at[slot])
        copy_k(prepared, slot)
        plgpu.barrier_wait(v_free.at[slot])
        copy_v(prepared, slot)

    for i in range(stages):
        drain(i)


@dataclasses.dataclass(frozen=True)
class _Paged:
    """K/V in pages (`paged_prefill`): a key block of block_kv tokens is `copies` TMA
    copies of `per_copy` tokens each, from the pages the row's table names."""

    page_size: int
    copies: int


def _flash_kernel(
    *refs,
    config: Config,
    groups: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    num_tiles: int,
    interpret: bool,
    paged: _Paged | None = None,
):
    """Contiguous (paged None): refs are
      len_ref [B] int32 GMEM (valid tokens per row, clipped to [0, T]), q_ref [B, Tp, N, H],
      k_ref / v_ref [B, Tp, K, H], o_ref [B, Tp, N, H].
    Paged: refs are
      len_ref [B] (the chunk's valid tokens), start_ref [B] (tokens before the chunk: query t
      is at position start + t and keys [0, start + len) are in the pages), table_ref
      [B, MPP] (page ids, padded to whole key blocks), q_ref, k_ref / v_ref [P * S, K, H]
      (the pages' token rows), o_ref."""
    if paged is None:
        len_ref, q_ref, k_ref, v_ref, o_ref = refs
        start_ref = table_ref = None
    else:
        len_ref, start_ref, table_ref, q_ref, k_ref, v_ref, o_ref = refs
    bq, bk, stages = config.block_q, config.block_kv, config.stages
    H = q_ref.shape[-1]
    dtype = q_ref.dtype
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def layout(x, lay):
        return x if interpret else plgpu.layout_cast(x, lay)

    def iota(shape, dim):
        x = lax.broadcasted_iota(jnp.int32, shape, dim)
        return layout(x, plgpu.Layout.WGMMA)

    def body(q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, k_free, v_free, sched):
        b = lax.axis_index("batch")
        head = lax.axis_index("heads")
        tile = num_tiles - 1 - lax.axis_index("q_tile")  # longest tiles first
        wg = lax.axis_index("wg")
        kv_head = _div(head, groups)
        length = len_ref[b]
        # Key positions are the queries' plus `offset`: the tokens cached before the chunk.
        offset = jnp.int32(0) if start_ref is None else start_ref[b]
        base = tile * config.tile_q
        ranges = [
            _key_range(offset + base + w * bq, offset + length, block_q=bq, block_kv=bk, window=window)
            for w in range(_COMPUTE_WGS)
        ]
        # The producer loads the union [lo, hi) of both warpgroups' ranges (warpgroup 0
        # has the earlier window start; an empty range counts as [lo, lo)).
        lo = ranges[0].first
        hi = lo
        for r in ranges:
            hi = jnp.maximum(hi, jnp.where(r.last > r.first, r.last, lo))
        num_steps = hi - lo

        def slot_of(kb):
            return lax.rem(kb - lo, jnp.int32(stages))

        def rendezvous():  # both compute warpgroups pass the schedule barrier together
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < _COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q0 = base + wg * bq
            mine = _key_range(offset + q0, offset + length, block_q=bq, block_kv=bk, window=window)
            # An empty range sits at lo so that every step of [lo, hi) is a skip step.
            empty = mine.last <= mine.first
            first, mid_lo, mid_hi, last = (
                jnp.where(empty, lo, x) for x in (mine.first, mine.mid_lo, mine.mid_hi, mine.last)
            )
            q_tile = q_smem.at[wg]

            @pl.when(q0 < length)
            def _():
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), head], q_tile, q_ready.at[wg])
                plgpu.barrier_wait(q_ready.at[wg])

            def wait_next_k(kb):
                # Both operands are computed here, outside any pl.run_state body: a
                # constant used inside one (lo is a literal 0 without a window) becomes
                # a discharged output of the run_state, which the jax 0.11 Mosaic GPU
                # lowering rejects ("Shaped arrays must be represented by ir.Values").
                has_next, next_slot = kb + 1 < hi, slot_of(kb + 1)

                def wait():
                    @pl.when(has_next)
                    def _():
                        plgpu.barrier_wait(k_ready.at[next_slot])

                return wait

            def end_softmax(slot):  # my softmax is done; wait for V and the tensor cores
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(sched)

            def skip_step(kb, carry):
                """A step outside this warpgroup's range: the barrier protocol only."""
                slot = slot_of(kb)
                rendezvous()
                plgpu.barrier_arrive(k_free.at[slot])
                end_softmax(slot)
                wait_next_k(kb)()
                plgpu.barrier_arrive(v_free.at[slot])
                return carry

            def step(kb, carry, *, masked: bool):
                acc, m, l = carry
                slot = slot_of(kb)
                k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]

                # S = Q K^T
                if interpret:
                    s = lax.dot_general(
                        q_tile[...], k_tile[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                    )
                    rendezvous()
                else:

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
                        rendezvous()  # the other warpgroup may start its softmax
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])

                # Logits in units of c: exp(logit - max) = exp2(s * c - m).
                if softcap is None:
                    c = scale * _LOG2E
                else:
                    s = _tanh(s * (scale / softcap))
                    c = softcap * _LOG2E
                if masked:
                    t = offset + q0 + iota((bq, bk), 0)
                    pos = kb * bk + iota((bq, bk), 1)
                    visible = (pos <= t) & (pos < offset + length)
                    if window is not None:
                        visible &= pos > t - window
                    s = jnp.where(visible, s, -jnp.inf)

                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha
                p16 = p.astype(dtype)
                if H <= 128:
                    # Finish the row sums before yielding the tensor cores.
                    l = l + p.sum(axis=1)
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    end_softmax(slot)
                else:  # fewer live registers across the barrier at head_dim 256
                    end_softmax(slot)
                    l = l + p.sum(axis=1)

                # O += P V
                if interpret:
                    acc = acc + lax.dot(p16, v_tile[...], preferred_element_type=jnp.float32)
                    wait_next_k(kb)()
                else:
                    wait_k = wait_next_k(kb)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_tile)
                        wait_k()  # overlaps with the wgmma in flight

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                layout(jnp.zeros((bq, H), jnp.float32), plgpu.Layout.WGMMA),
                layout(jnp.full((bq,), _NEG, jnp.float32), _ROW_LAYOUT),
                layout(jnp.zeros((bq,), jnp.float32), _ROW_LAYOUT),
            )

            @pl.when(num_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(rendezvous)  # warpgroup 1 runs half a step behind
            masked = functools.partial(step, masked=True)
            carry = lax.fori_loop(lo, first, skip_step, carry)
            carry = lax.fori_loop(first, mid_lo, masked, carry)  # window edge
            carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(mid_hi, last, masked, carry)  # diagonal and length edge
            acc, _, l = lax.fori_loop(last, hi, skip_step, carry)
            pl.when(wg == 0)(rendezvous)

            # A row with no visible key (padding query of an all-padding block) has
            # l = 0 and acc = 0; any other row has l >= 1.
            inv = 1.0 / jnp.maximum(l, 1e-30)
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            out = jnp.where(q0 + iota((bq, H), 0) < length, out, 0.0)  # padding queries: exactly 0
            q_tile[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(q0, bq), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            if paged is None:
                def sources(kb):
                    return [(b, pl.ds(kb * bk, bk), kv_head)]

                def dst(smem, slot, j):
                    return smem.at[slot]
            else:
                S, copies = paged.page_size, paged.copies
                per_copy = bk // copies
                end = offset + length

                def sources(kb):
                    """One page-table read per copy, issued before the producer waits for a
                    free slot (the read's latency overlaps the wait)."""
                    out = []
                    for j in range(copies):
                        t = kb * bk + j * per_copy
                        # A page past the row's keys may be freed or unassigned (any id):
                        # read page 0 instead, masked anyway.
                        page = jnp.where(t < end, table_ref[b, _div(t, S)], 0)
                        out.append((pl.ds(page * S + lax.rem(t, jnp.int32(S)), per_copy), kv_head))
                    return out

                def dst(smem, slot, j):
                    return smem.at[slot] if copies == 1 else smem.at[slot, pl.ds(j * per_copy, per_copy)]

            def issue(src, slot, ref, smem, barrier):
                for j, r in enumerate(src):
                    plgpu.copy_gmem_to_smem(ref.at[r], dst(smem, slot, j), barrier.at[slot])

            produce_kv_ring(
                lo, hi, stages, prepare=sources,
                copy_k=lambda src, slot: issue(src, slot, k_ref, k_smem, k_ready),
                copy_v=lambda src, slot: issue(src, slot, v_ref, v_smem, v_ready),
                k_free=k_free, v_free=v_free,
            )

    copies_per_block = 1 if paged is None else paged.copies
    pl.run_scoped(
        body,
        plgpu.SMEM((_COMPUTE_WGS, bq, H), dtype, transforms=transforms),  # Q, then O
        plgpu.SMEM((stages, bk, H), dtype, transforms=transforms),  # K ring
        plgpu.SMEM((stages, bk, H), dtype, transforms=transforms),  # V ring
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # Q loaded
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=stages),  # K slot loaded
        plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=stages),  # V slot loaded
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),  # K slot free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),  # V slot free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),  # schedule (ping-pong)
        collective_axes="wg",
    )


# ------------------------------------------------------------------ entry points


def _flash_call(shape, dtype, K: int, config: Config, scale, window, softcap, params, paged: _Paged | None = None):
    """The kernel over a padded query array `shape` = [B, Tp, N, H] (Tp whole 128-row tiles):
    grid (query head, query tile, batch row), two compute warpgroups and the producer."""
    B, Tp, N, H = shape
    num_tiles = Tp // config.tile_q
    kernel = functools.partial(
        _flash_kernel, config=config, groups=N // K, scale=float(scale), window=window,
        softcap=None if softcap is None else float(softcap), num_tiles=num_tiles, interpret=params is not None,
        paged=paged,
    )
    return plgpu.kernel(
        kernel,
        **{_OUT_ARG: jax.ShapeDtypeStruct((B, Tp, N, H), dtype)},
        grid=(N, num_tiles, B),
        grid_names=("heads", "q_tile", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
    )


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
    interpret=False,
) -> jax.Array:
    """Causal attention of a right-padded chunk. Returns [B, T, N, H] in q.dtype.
    `interpret`: False (compile for the GPU), True (Mosaic GPU interpreter) or an
    InterpretGPUParams. Calls `supports()` rejects run the Triton kernel."""
    return flash_attention_tuned(q, k, v, lengths, scale=scale, window=window, softcap=softcap, interpret=interpret)


def flash_attention_tuned(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    lengths: jax.Array,  # [B]
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    interpret=False,
    block_kv: int | None = None,
    stages: int | None = None,
) -> jax.Array:
    """flash_attention with the tuning knobs exposed (for benchmarks and tests)."""
    if not supports(q, k, window, softcap):
        return triton_gpu.flash_attention(
            q, k, v, lengths, scale=scale, window=window, softcap=softcap, interpret=interpret not in (False, None)
        )
    B, T, N, H = q.shape
    K = k.shape[2]
    assert k.shape == v.shape == (B, T, K, H), (q.shape, k.shape, v.shape)
    assert v.dtype == q.dtype, (q.dtype, v.dtype)
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1")
    default = default_config(H)
    config = Config(block_kv=block_kv or default.block_kv, stages=stages or default.stages)
    need = smem_bytes(H, q.dtype.itemsize, config)
    if need > _SMEM_LIMIT:
        raise ValueError(f"{config} at head_dim {H} needs {need} bytes of shared memory > {_SMEM_LIMIT}")
    params = _interpret_params(interpret)

    # Pad T to whole 128-row tiles: the padding is past every row's length.
    Tp = -(-T // config.tile_q) * config.tile_q
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    lens = jnp.clip(lengths.astype(jnp.int32), 0, T).reshape(B)
    call = _flash_call((B, Tp, N, H), q.dtype, K, config, scale, window, softcap, params)
    out = call(lens, q, k, v)
    return out[:, :T] if Tp != T else out


# ------------------------------------------------------------------ chunks over a cached prefix


def _paged_geometry(S: int, config: Config) -> _Paged | None:
    """How a key block of block_kv tokens comes from pages of S tokens, or None: one copy
    when a page holds whole blocks, else one per page (a page's rows must start at a
    multiple of the 8-row shared-memory tile)."""
    if S <= 0 or S & (S - 1):
        return None
    if S >= config.block_kv:
        return _Paged(S, 1)
    return _Paged(S, config.block_kv // S) if S % 8 == 0 else None


def supports_paged(q: jax.Array, k_pages: jax.Array, window: int | None = None, softcap: float | None = None) -> bool:
    """Whether `paged_prefill` runs the call here (else the caller runs the paged reference):
    what `supports` takes, with pages of a power-of-two size that is >= block_kv or a
    multiple of 8 tokens."""
    if q.ndim != 4 or k_pages.ndim != 4 or not supports(q, k_pages, window, softcap):
        return False
    return _paged_geometry(k_pages.shape[1], default_config(q.shape[-1])) is not None


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "interpret", "block_kv", "stages"))
def paged_prefill(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    page_table: jax.Array,  # [B, MP]
    starts: jax.Array,  # [B] tokens of the row cached before the chunk
    lengths: jax.Array,  # [B] valid tokens of the chunk
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    interpret=False,
    block_kv: int | None = None,
    stages: int | None = None,
) -> jax.Array:
    """Causal attention of a prefill chunk that continues cached context: query t of row
    b is at position starts[b] + t and sees the keys s <= that position (and, with a
    window W, s > position - W), which are token s % S of page page_table[b, s // S]; the
    chunk's own keys must already be in the pages. Queries t >= lengths[b] are padding
    (output 0). The same schedule as `flash_attention` (its docstring), with the K/V
    blocks gathered page by page by the TMA producer. Returns [B, T, N, H] in q.dtype;
    the paged reference (pallas_kernels/paged_attention/reference.py with T > 1) computes
    the same. Calls `supports_paged` rejects raise ValueError."""
    if not supports_paged(q, k_pages, window, softcap):
        raise ValueError(f"paged_prefill does not support q {q.shape} {q.dtype} over pages {k_pages.shape} "
                         f"{k_pages.dtype} (supports_paged)")
    B, T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    assert v_pages.shape == k_pages.shape and v_pages.dtype == q.dtype, (k_pages.shape, v_pages.shape)
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1")
    default = default_config(H)
    config = Config(block_kv=block_kv or default.block_kv, stages=stages or default.stages)
    paged = _paged_geometry(S, config)
    if paged is None:
        raise ValueError(f"{config} does not fit pages of {S} tokens")
    need = smem_bytes(H, q.dtype.itemsize, config)
    if need > _SMEM_LIMIT:
        raise ValueError(f"{config} at head_dim {H} needs {need} bytes of shared memory > {_SMEM_LIMIT}")
    params = _interpret_params(interpret)

    Tp = -(-T // config.tile_q) * config.tile_q
    if Tp != T:
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    lens = jnp.clip(lengths.astype(jnp.int32), 0, T).reshape(B)
    starts = jnp.maximum(starts.astype(jnp.int32), 0).reshape(B)
    # The producer reads a table slot for every page of every key block it loads: whole blocks.
    MP = page_table.shape[1]
    MPP = -(-(MP * S) // config.block_kv) * config.block_kv // S
    # A buffer of its own: Mosaic GPU requires 256-byte aligned operands, and a table sliced
    # out of a larger array (the engine unpacks it from one packed int32 argument) can be a
    # view at any offset ("Input buffer 2 is not 256-byte aligned" on the H200). Page ids
    # are >= 0, so the maximum changes nothing but cannot be simplified away.
    table = jnp.maximum(page_table.astype(jnp.int32), 0)
    if MPP > MP:
        table = jnp.pad(table, ((0, 0), (0, MPP - MP)))
    call = _flash_call((B, Tp, N, H), q.dtype, K, config, scale, window, softcap, params, paged)
    out = call(lens, starts, table, q, k_pages.reshape(P * S, K, H), v_pages.reshape(P * S, K, H))
    return out[:, :T] if Tp != T else out

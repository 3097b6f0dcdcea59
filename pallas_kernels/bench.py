"""python -m pallas_kernels.bench [--quick] [--decode_only | --prefill_only] [--reps=10] [--out=PATH]
    [--decode_batches=32,128 --decode_contexts=4096 --page_sizes=16]

Our Pallas GPU attention kernels against what else a JAX user can call, on one device,
in one run, printed as one markdown table (last, so the tail of the output holds it):

- decode: ours (paged_attention.gpu, Triton lowering) and "ours mosaic"
  (paged_attention.gpu_mosaic, Mosaic GPU, Hopper only) vs the Pallas paged-attention kernel bundled with
  JAX (jax.experimental.pallas.ops.gpu.paged_attention) vs XLA (our jnp reference:
  gather the pages, then attention), 32 q / 8 kv heads, head_dim 128, bf16, every
  sequence at the full context. Rate: KV bytes read (every visible key and value once)
  per second, and that as a percentage of the device-to-device copy bandwidth measured
  in the same run (bytes read + written by an elementwise pass over 2 GiB).
- prefill: ours (flash_attention.gpu, Triton lowering) and "ours mosaic"
  (flash_attention.gpu_mosaic, Mosaic GPU, Hopper only) vs cuDNN and XLA through
  jax.nn.dot_product_attention vs the bundled Mosaic GPU flash attention
  (attention_mgpu, Hopper only), causal, same heads. Rate: causal FLOPs
  (4 * B * N * T * T * H / 2) per second, and that as a percentage of a large bf16
  matmul's rate measured in the same run.
With sweeps on (not in --quick), "ours tuned" is the fastest of a few settings of the
`*_tuned` knobs, "ours mosaic" the fastest of its default and a few block_kv / stages
settings, the bundled decode kernel the fastest of a few k_splits and the bundled
Mosaic kernel of two block_kv; the knobs are printed with the time. Configurations that
start after --sweep_budget_s (180 s) skip their sweeps, so a run stays near 4 minutes;
prefill runs first. "speedup" is the baseline's best time (bundled for decode, cuDNN
for prefill) over our best (any of our columns): above 1, ours is faster; the JSON
also gives "mosaic_speedup", cuDNN over "ours mosaic" alone.

Method (device time only):
- Each implementation runs as R independent calls inside ONE jitted program, returning
  all R outputs (nothing is dead code; no reduction kernels added). The kernel sits in
  its own inner jit, so the program holds R call sites of one lowered kernel (one
  compile). After a warm-up run that compiles, --reps runs of the program run under
  jax.profiler, and a call's time is the device's busy time in that trace (the union
  of its kernel intervals: the kernel and any small XLA ops around it, such as a
  split-K combine) over reps x R. The host's dispatch and the sync between programs
  are not counted: measured on an H200 they added ~30 us per call at R = 8, as much as
  the differences between decode kernels. The host-clock median per call (the program
  timed with block_until_ready, divided by R) is kept in the JSON as "wall_ms". On CPU
  (--interpret) there is no device timeline and the host clock is the time. R is
  chosen so a program runs for about 2 ms (at most 48 calls).
- Inputs are fresh normal random numbers (never zeros). Calls rotate over several
  input sets, together at least twice the L2 cache (50 MB) and up to 256 MiB, so no call
  reads data the previous one left in cache (a set too big for two is used alone).
  Decode calls read disjoint regions of one page pool (pages of a region scattered by a
  random permutation, as a real cache is), each call with its own query; prefill calls
  each have their own q, k, v. Two calls never have identical inputs, so XLA cannot
  merge them. The pool is capped at 40% of device memory: the "sets/calls" column gives
  the number of sets and calls per program.
- Layout conversions (our [P, S, K, H] pages to the bundled kernel's [K, P, S, H], the
  scale folded into q for kernels without a scale argument, f16 for the Mosaic kernel)
  happen before timing.
- Before timing, each variant's output of the first call is compared with our jnp
  reference on the same inputs (decode: the first 8 sequences; prefill: the first 4096
  positions, which causal attention computes from those positions alone):
  ||out - ref|| / ||ref|| must be <= 2e-2 (bf16) and NaN never passes. A failure marks
  the cell with "!" and the variant cannot be the best. The warm-up run feeds the inputs
  in reverse order, so an output element the kernel never wrote would hold another
  call's result and fail the check.
- A failing implementation (an unsupported shape, a compile error, out of memory)
  prints its error in its cell; the run goes on. Configurations whose KV does not fit
  the memory budget are skipped with a note.

--interpret runs tiny shapes with the Pallas kernels in the interpreter (CPU; cuDNN and
both Mosaic GPU kernels report n/a: the Mosaic GPU interpreter compiles its program
per grid point and thread, ~3 s each, so a smoke run of our Mosaic kernel would take
minutes; tests/pallas_kernels/test_gpu_mosaic_flash.py checks it instead): a smoke test
of this script, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.flash_attention import gpu as flash_gpu
from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic
from pallas_kernels.flash_attention import reference as flash_ref
from pallas_kernels.paged_attention import gpu as paged_gpu
from pallas_kernels.paged_attention import gpu_mosaic as paged_mosaic
from pallas_kernels.paged_attention import reference as paged_ref
from runtime import profile

DTYPE = jnp.bfloat16
# bf16 inputs and outputs: a correct kernel lands between 1e-3 and 1e-2.
REL_ERR_BOUND = 2e-2
# Decode is checked on this many sequences: the reference gathers their pages only.
CHECK_SEQS = 8
# Device memory the rotating input sets may take; the rest is for outputs, the XLA
# path's gathered K/V and the bundled kernel's copy of the pool.
POOL_FRACTION = 0.4
# The XLA path materializes what it reads (decode: the gathered K/V; prefill: the
# [B, N, T, T] float32 scores and probabilities): skipped beyond this fraction.
XLA_FRACTION = 0.45
# Rough decode cost to size a program: KV bytes at this rate plus a launch.
_EST_BYTES_PER_S = 2e12
_EST_LAUNCH_S = 10e-6


@dataclasses.dataclass(frozen=True)
class Suite:
    """The shapes of one run and how its programs are sized."""

    q_heads: int
    kv_heads: int
    head_dim: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    page_sizes: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]  # (B, T)
    sweep: bool  # time the knob variants too
    copy_bytes: int  # array size of the copy-bandwidth pass
    matmul_n: int  # n x n x n bf16 matmul for the FLOP ceiling
    rotate_bytes: int  # each program reads at least this much distinct data (L2: 50 MB on H100)
    max_calls: int  # call sites per program (compile time)
    program_s: float  # aim for programs this long, so dispatch and sync are amortized
    check_tokens: int  # prefill positions checked against the reference
    memory: int  # device memory to assume where the backend does not report it


FULL = Suite(
    q_heads=32, kv_heads=8, head_dim=128,
    decode_batches=(1, 32, 128), decode_contexts=(512, 4096, 32768), page_sizes=(16, 64),
    prefill=((8, 2048), (1, 16384)), sweep=True,
    copy_bytes=2 << 30, matmul_n=8192, rotate_bytes=256 << 20, max_calls=48, program_s=2e-3,
    check_tokens=4096, memory=16 << 30,
)
QUICK = dataclasses.replace(
    FULL, decode_batches=(1, 32), decode_contexts=(4096,), page_sizes=(16,), prefill=((8, 2048),), sweep=False,
)
# Tiny shapes for the interpreter on CPU: exercises every code path of this script.
SMOKE = Suite(
    q_heads=4, kv_heads=2, head_dim=32,
    decode_batches=(1, 3), decode_contexts=(64,), page_sizes=(16,),
    prefill=((2, 64),), sweep=False,
    copy_bytes=4 << 20, matmul_n=128, rotate_bytes=64 << 10, max_calls=2, program_s=0.0,
    check_tokens=64, memory=1 << 30,
)


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool = False
    interpret: bool = False  # tiny shapes, Pallas kernels in the interpreter
    decode: bool = True
    prefill: bool = True
    reps: int = 10
    sweep: bool | None = None  # None: the suite's choice
    sweep_budget_s: float = 180.0  # configurations started later than this into the run skip their sweeps
    # Decode shapes instead of the suite's (empty: the suite's).
    decode_batches: tuple[int, ...] = ()
    decode_contexts: tuple[int, ...] = ()
    page_sizes: tuple[int, ...] = ()

    @property
    def suite(self) -> Suite:
        suite = SMOKE if self.interpret else QUICK if self.quick else FULL
        suite = suite if self.sweep is None else dataclasses.replace(suite, sweep=self.sweep)
        for name in ("decode_batches", "decode_contexts", "page_sizes"):
            if getattr(self, name):
                suite = dataclasses.replace(suite, **{name: getattr(self, name)})
        return suite


@dataclasses.dataclass
class Cell:
    """One implementation (one knob setting) on one configuration."""

    ms: float | None = None  # median time per call
    rel_err: float | None = None  # ||out - ref|| / ||ref|| of the first call; None: not checked
    knobs: str = ""  # the tuning knobs, when not the implementation's defaults
    error: str | None = None  # why there is no time
    wall_ms: float | None = None  # host clock per call (the program's dispatch and sync included)
    device_time: bool = False  # ms is device time from a profiler trace (else the host clock)

    @property
    def ok(self) -> bool:
        return self.ms is not None and (self.rel_err is None or self.rel_err <= REL_ERR_BOUND)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What an implementation's timed program is fed."""

    shared: tuple  # arguments of every call (the page pool)
    per_call: list[tuple]  # one argument tuple per call, no two alike (XLA would merge them)
    check: Callable[[jax.Array], jax.Array] | None  # first call's output -> relative error
    reps: int


@dataclasses.dataclass
class Row:
    op: str  # "decode" | "prefill"
    config: str
    sets: int = 0  # distinct input sets the programs rotate over
    calls: int = 0  # calls per timed program
    work: float = 0.0  # per call: KV bytes read (decode) or FLOPs (prefill)
    cells: dict[str, Cell] = dataclasses.field(default_factory=dict)  # column -> best variant
    variants: list[tuple[str, Cell]] = dataclasses.field(default_factory=list)  # everything timed
    note: str = ""  # why the row has no numbers


# ------------------------------------------------------------------ measuring


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return msg.replace("|", "/")[:60]


@jax.jit
def _rel_err(out: jax.Array, ref: jax.Array) -> jax.Array:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
    return jnp.where(jnp.isfinite(out).all(), err, jnp.inf)  # NaN never passes


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype=DTYPE) -> jax.Array:
    return jax.random.normal(key, shape, dtype)


def measure(call: Callable[..., jax.Array], inputs: Inputs, knobs: str = "") -> Cell:
    """Median time of `call(*inputs.shared, *args)` per args in `inputs.per_call`, all
    the calls in one jitted program, and the check of the first call's output. Any
    exception becomes the cell's error: a third-party kernel must not end the run."""
    try:
        inner = jax.jit(call)  # one lowering (one kernel compile) for every call site
        program = jax.jit(lambda shared, per_call: [inner(*shared, *args) for args in per_call])
        shared, per_call = inputs.shared, inputs.per_call
        # Compile and warm up on the calls in reverse order: an output element the
        # kernel never writes would then hold another call's result, which the check
        # on the next run's first output sees.
        jax.block_until_ready(program(shared, per_call[::-1]))
        outs = jax.block_until_ready(program(shared, per_call))
        rel_err = None if inputs.check is None else float(inputs.check(outs[0]))
        del outs
        times = []
        for _ in range(inputs.reps):
            start = time.perf_counter()
            jax.block_until_ready(program(shared, per_call))
            times.append(time.perf_counter() - start)
        wall_ms = 1e3 * statistics.median(times) / len(per_call)
        device_ms = _device_ms(program, shared, per_call, inputs.reps)
        return Cell(ms=device_ms if device_ms is not None else wall_ms, rel_err=rel_err, knobs=knobs,
                    wall_ms=wall_ms, device_time=device_ms is not None)
    except Exception as e:  # noqa: BLE001 - reported in the table
        _log(f"    {knobs or 'default'}: {type(e).__name__}: {str(e)[:500]}")
        return Cell(knobs=knobs, error=_short(e))


def _device_ms(program, shared, per_call, runs: int) -> float | None:
    """Device time per call: `runs` runs of the program under jax.profiler, the union of
    the device's kernel intervals over runs x calls. Host dispatch and the sync between
    programs (~30 us per call at 8 calls per program on an H200, more than some kernels'
    differences) are not device time. None where the trace has no device timeline (CPU)."""
    if jax.default_backend() == "cpu":
        return None
    with tempfile.TemporaryDirectory() as log_dir:
        with profile.trace(log_dir):
            for _ in range(runs):
                jax.block_until_ready(program(shared, per_call))
        busy = profile.device_busy_us(log_dir)
    return None if busy is None else busy / 1e3 / (runs * len(per_call))


def _knobs_label(knobs: dict[str, Any]) -> str:
    short = {
        "pages_per_block": "ppb", "num_splits": "splits", "num_warps": "warps", "num_stages": "stages",
        "block_q": "bq", "block_k": "bk", "block_kv": "bkv", "k_splits": "k_splits",
        "pages_per_compute_block": "ppcb",
    }
    return " ".join(f"{short.get(k, k)}={v}" for k, v in knobs.items())


def _best(cells: Sequence[Cell]) -> Cell:
    """The fastest cell that passed its check; else the first (its error or mark shows)."""
    ok = [c for c in cells if c.ok]
    return min(ok, key=lambda c: c.ms) if ok else cells[0]


def _sweep(row: Row, column: str, inputs: Inputs, make: Callable[..., Callable], variants=({},)) -> None:
    """Times `make(**knobs)` for each knob set; the column shows the best."""
    cells = []
    for knobs in variants:
        cell = measure(make(**knobs), inputs, knobs=_knobs_label(knobs))
        row.variants.append((column, cell))
        cells.append(cell)
    row.cells[column] = _best(cells)


def _rotation(set_bytes: int, suite: Suite, budget: float) -> int:
    """Input sets per program: enough to exceed suite.rotate_bytes (at least 2), as many
    as the budget holds; 0 when one set does not fit."""
    fits = int(budget // set_bytes)
    return min(fits, suite.max_calls, max(2, math.ceil(suite.rotate_bytes / set_bytes)))


def _device_memory(default: int) -> int:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    return int(stats.get("bytes_limit", default))


# ------------------------------------------------------------------ ceilings


def copy_bandwidth(nbytes: int, passes: int = 10, repeats: int = 5) -> float:
    """Bytes/s of an elementwise pass over `nbytes` of float32 (read + write counted):
    `passes` donated passes queued back to back and synced once, so dispatch and sync
    vanish; the best of `repeats`. runtime.bench uses the same ceiling."""
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(f(_normal(jax.random.key(1), (nbytes // 4,), jnp.float32)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            x = f(x)
        jax.block_until_ready(x)
        best = min(best, (time.perf_counter() - start) / passes)
    del x
    return 2 * nbytes / best


def matmul_rate(suite: Suite, reps: int) -> float:
    """TFLOP/s of an n x n x n bf16 matmul."""
    n = suite.matmul_n
    keys = jax.random.split(jax.random.key(2), 4)
    ab = [(_normal(keys[2 * i], (n, n)), _normal(keys[2 * i + 1], (n, n))) for i in range(2)]
    cell = measure(jnp.matmul, Inputs((), ab, None, reps))  # bf16 out: cuBLAS accumulates in f32, no extra pass
    return 2 * n**3 / (cell.ms * 1e-3) / 1e12 if cell.ms else float("nan")


# ------------------------------------------------------------------ decode


def _bundled_knobs(pages_per_seq: int, page_size: int, k_splits: int) -> dict[str, int]:
    """Knobs the bundled kernel accepts: 128 keys per compute block (what its defaults
    give at page 16; its 8 pages of 64 would not fit shared memory), and k_splits
    halved until it divides the page table into whole compute blocks."""
    ppcb = max(1, 128 // page_size)

    def valid(ks):  # its asserts; it clips the block to the pages of one split
        per_split = pages_per_seq // ks
        return pages_per_seq % ks == 0 and per_split % min(ppcb, per_split) == 0

    while k_splits > 1 and not valid(k_splits):
        k_splits //= 2
    return {"k_splits": k_splits, "pages_per_compute_block": min(ppcb, pages_per_seq // k_splits)}


def _to_bundled_layout(pages: list[jax.Array]) -> tuple[jax.Array, ...]:
    """[P, S, K, H] -> [K, P, S, H], freeing each original as soon as it is converted
    (peak 1.5x the pool; the originals must not be used afterwards)."""
    out = []
    while pages:
        x = pages.pop(0)
        out.append(jax.block_until_ready(jnp.transpose(x, (2, 0, 1, 3))))
        x.delete()
    return tuple(out)


def _paged(fn, **kw):
    """Our argument order (pages shared, per-call q/table/positions/lengths) -> fn's."""
    return lambda k, v, q, table, pos, lens: fn(q, k, v, table, pos, lens, **kw)


def decode_row(suite: Suite, opts: Options, memory: int, B: int, ctx: int, S: int, *, seed: int, sweep: bool) -> Row:
    N, K, H = suite.q_heads, suite.kv_heads, suite.head_dim
    MP = ctx // S  # pages per sequence
    scale = H**-0.5
    call_bytes = 2 * B * ctx * K * H * jnp.dtype(DTYPE).itemsize  # every visible key and value once
    row = Row("decode", f"B={B} ctx={ctx} page={S}", work=call_bytes)
    sets = _rotation(call_bytes, suite, POOL_FRACTION * memory)
    if not sets:
        row.note = f"skip: KV {call_bytes / 1e9:.1f} GB > {POOL_FRACTION:.0%} of memory"
        return row
    est_s = call_bytes / _EST_BYTES_PER_S + _EST_LAUNCH_S
    calls = min(suite.max_calls, max(sets, 2, math.ceil(suite.program_s / est_s)))
    row.sets, row.calls = sets, calls

    keys = iter(jax.random.split(jax.random.key(seed), 2 + calls))
    rng = np.random.default_rng(seed)
    region = B * MP  # the pages of one set: call i reads region i % sets, scattered
    pages = [_normal(next(keys), (sets * region, S, K, H)) for _ in "kv"]
    tables = [
        jnp.asarray((i % sets) * region + rng.permutation(region).reshape(B, MP), jnp.int32) for i in range(calls)
    ]
    qs = [_normal(next(keys), (B, 1, N, H)) for _ in range(calls)]
    pos = jnp.full((B, 1), ctx - 1, jnp.int32)
    lens = jnp.full((B,), ctx, jnp.int32)

    b = min(B, CHECK_SEQS)
    ref = jax.jit(_paged(paged_ref.paged_attention, scale=scale))(*pages, qs[0][:b], tables[0][:b], pos[:b], lens[:b])
    ref = jax.block_until_ready(ref)  # before the pool in our layout is freed

    def check(out):  # [B, 1, N, H] or the bundled [B, N, H]
        return _rel_err(out[:b].reshape(ref.shape), ref)

    inputs = Inputs(tuple(pages), [(q, t, pos, lens) for q, t in zip(qs, tables)], check, opts.reps)

    def ours(fn=paged_gpu.paged_attention_tuned, **knobs):
        return _paged(fn, scale=scale, interpret=opts.interpret, **knobs)

    _sweep(row, "ours", inputs, lambda: ours(paged_gpu.paged_attention))
    if sweep:
        splits = paged_gpu.default_num_splits(B, K, ctx)
        # Also measured on an H200 (2026-11-21, B=32 ctx 4096): 4 stages and 8 pages x
        # 3 stages were no faster than these.
        variants = [{"num_warps": 8}, {"num_warps": 2}, {"num_stages": 3}, {"pages_per_block": max(1, 128 // S)}]
        variants += [{"num_splits": 2 * splits}] if splits > 1 else []
        _sweep(row, "ours tuned", inputs, ours, variants)
    if opts.interpret:
        row.cells["ours mosaic"] = Cell(error="n/a: interpreter too slow")
    elif not paged_mosaic.supports(qs[0], pages[0]):
        row.cells["ours mosaic"] = Cell(error="n/a: unsupported shape")
    else:
        # Defaults: 128-row blocks (16 tokens x 8 kv heads), 2 stages, ~1 CTA per SM.
        # The variants keep more bytes in flight (3-6 stages, up to 192 KiB), or run
        # two CTAs per SM (twice the splits, a 96 KiB ring each).
        variants = [{}]
        if sweep:
            variants += [{"block_rows": 128, "stages": 3}, {"block_rows": 64, "stages": 4},
                         {"block_rows": 64, "stages": 6}]
            splits = paged_mosaic.default_num_splits(B, ctx * K // 128)
            variants += [{"num_splits": 2 * splits, "block_rows": 64, "stages": 3}] if B < 128 else []
        _sweep(row, "ours mosaic", inputs, lambda **kw: ours(paged_mosaic.paged_attention_tuned, **kw), variants)
    if call_bytes <= XLA_FRACTION * memory:  # the K/V it gathers for one call, beside the pool
        _sweep(row, "xla", inputs, lambda: _paged(paged_ref.paged_attention, scale=scale))
    else:
        row.cells["xla"] = Cell(error="skip: gathered KV > memory")
    del inputs

    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled
    except Exception as e:  # noqa: BLE001 - reported in the table
        row.cells["bundled"] = Cell(error=_short(e))
        return row
    kv = _to_bundled_layout(pages)  # frees our layout: nothing below may use it
    # No scale argument: fold it into q. [B, 1, N, H] -> [B, N, H]
    inputs = Inputs(kv, [((q * scale).reshape(B, N, H), t, lens) for q, t in zip(qs, tables)], check, opts.reps)

    def theirs(**knobs):
        return lambda k, v, q, table, lens: bundled.paged_attention(q, k, v, table, lens, interpret=opts.interpret,
                                                                    **knobs)

    variants = []
    for k_splits in (16, 4, 1) if sweep else (16,):
        if (knobs := _bundled_knobs(MP, S, k_splits)) not in variants:
            variants.append(knobs)
    _sweep(row, "bundled", inputs, theirs, variants)
    return row


# ------------------------------------------------------------------ prefill


def prefill_row(suite: Suite, opts: Options, memory: int, B: int, T: int, *, seed: int, sweep: bool) -> Row:
    N, K, H = suite.q_heads, suite.kv_heads, suite.head_dim
    scale = H**-0.5
    row = Row("prefill", f"B={B} T={T} causal", work=4 * B * N * T * T * H / 2)
    set_bytes = B * T * (N + 2 * K) * H * jnp.dtype(DTYPE).itemsize
    # Identical calls would be merged by XLA: one call per set, never a repeated set.
    sets = _rotation(set_bytes, suite, POOL_FRACTION * memory)
    if not sets:
        row.note = f"skip: q/k/v {set_bytes / 1e9:.1f} GB > {POOL_FRACTION:.0%} of memory"
        return row
    row.sets = row.calls = sets
    keys = iter(jax.random.split(jax.random.key(seed), 3 * sets))
    lens = jnp.full((B,), T, jnp.int32)
    qkv = [tuple(_normal(next(keys), (B, T, n, H)) for n in (N, K, K)) for _ in range(sets)]

    Tc = min(T, suite.check_tokens)  # causal: the first Tc outputs depend on the first Tc positions only
    q0, k0, v0 = (x[:, :Tc] for x in qkv[0])
    ref = jax.jit(functools.partial(flash_ref.flash_attention, scale=scale))(q0, k0, v0, jnp.full((B,), Tc, jnp.int32))

    def check(out):
        return _rel_err(out[:, :Tc], ref)

    inputs = Inputs((), [(*x, lens) for x in qkv], check, opts.reps)

    def ours(fn=flash_gpu.flash_attention_tuned, **knobs):
        return lambda q, k, v, lens: fn(q, k, v, lens, scale=scale, interpret=opts.interpret, **knobs)

    def sdpa(implementation):
        return lambda q, k, v, lens: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation=implementation)

    _sweep(row, "ours", inputs, lambda: ours(flash_gpu.flash_attention))
    if sweep:
        variants = [
            {"block_q": 128, "block_k": 64, "num_warps": 8},
            {"block_q": 128, "block_k": 128, "num_warps": 8},
            {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 3},
        ]
        _sweep(row, "ours tuned", inputs, ours, variants)

    def mosaic(**knobs):
        return lambda q, k, v, lens: flash_mosaic.flash_attention_tuned(q, k, v, lens, scale=scale, **knobs)

    if opts.interpret:
        row.cells["ours mosaic"] = Cell(error="n/a: interpreter too slow")
    elif not flash_mosaic.supports(*qkv[0][:2]):
        row.cells["ours mosaic"] = Cell(error="n/a: unsupported shape")
    else:
        # 128-key blocks and 2 stages are the defaults at head_dim <= 128; 3 stages
        # still fit shared memory there (231544 bytes).
        variants = [{}, {"block_kv": 64}, {"stages": 3}] if sweep else [{}]
        _sweep(row, "ours mosaic", inputs, mosaic, variants)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        _sweep(row, "cudnn", inputs, lambda: sdpa("cudnn"))
    else:
        row.cells["cudnn"] = Cell(error="n/a: no GPU")
    if 2 * B * N * T * T * 4 <= XLA_FRACTION * memory:  # f32 scores and probabilities
        _sweep(row, "xla", inputs, lambda: sdpa("xla"))
    else:
        row.cells["xla"] = Cell(error="skip: T x T scores > memory")
    if not on_gpu:
        row.cells["mgpu"] = Cell(error="n/a: no GPU")
        return row
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception as e:  # noqa: BLE001 - reported in the table
        row.cells["mgpu"] = Cell(error=_short(e))
        return row
    # No scale argument (fold it into q); its shared-memory tiles are float16.
    f16 = [((q * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)) for q, k, v in qkv]

    def mgpu(**knobs):
        config = attention_mgpu.TuningConfig(block_q=64, max_concurrent_steps=2, causal=True, **knobs)
        return lambda q, k, v: attention_mgpu.attention(q, k, v, config)

    variants = [{"block_kv": 128}, {"block_kv": 64}] if sweep else [{"block_kv": 128}]
    _sweep(row, "mgpu", Inputs((), f16, check, opts.reps), mgpu, variants)
    return row


# ------------------------------------------------------------------ the table

COLUMNS = ("op", "config", "sets/calls", "ours ms", "ours tuned ms", "ours mosaic ms", "bundled ms", "cudnn ms",
           "mgpu ms", "xla ms", "ours rate", "% of ceiling", "speedup")
BASELINE = {"decode": "bundled", "prefill": "cudnn"}
OURS = ("ours", "ours tuned", "ours mosaic")  # our best time is the fastest of these


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.ms is None:
        return cell.error or "-"
    text = f"{cell.ms:.4g}" + (f" ({cell.knobs})" if cell.knobs else "")
    return text + (" !" if not cell.ok else "")


def _derived(row: Row, copy_gbs: float, matmul_tfs: float) -> dict[str, float | None]:
    """Our best time's rate, its share of the ceiling, and the baseline's speedup."""
    ours = [c for c in map(row.cells.get, OURS) if c is not None and c.ok]
    base = row.cells.get(BASELINE[row.op])
    mosaic = row.cells.get("ours mosaic")
    base_ok = base is not None and base.ok
    mosaic_speedup = base.ms / mosaic.ms if base_ok and mosaic is not None and mosaic.ok else None
    if not ours:
        return {"ours_best_ms": None, "rate": None, "pct_ceiling": None, "speedup": None,
                "mosaic_speedup": mosaic_speedup}
    best = min(c.ms for c in ours)
    if row.op == "decode":
        rate = row.work / (best * 1e-3) / 1e9  # GB/s
        ceiling = copy_gbs
    else:
        rate = row.work / (best * 1e-3) / 1e12  # TFLOP/s
        ceiling = matmul_tfs
    return {
        "ours_best_ms": best,
        "rate": rate,
        "pct_ceiling": 100 * rate / ceiling if ceiling > 0 else None,
        "speedup": base.ms / best if base_ok else None,
        "mosaic_speedup": mosaic_speedup,
    }


def table(rows: Sequence[Row], copy_gbs: float, matmul_tfs: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row.note:
            cells = [row.op, row.config, row.note] + [""] * (len(COLUMNS) - 3)
        else:
            d = _derived(row, copy_gbs, matmul_tfs)
            unit = "GB/s" if row.op == "decode" else "TF/s"
            cells = [
                row.op, row.config, f"{row.sets}/{row.calls}",
                *(_cell_text(row.cells.get(c))
                  for c in ("ours", "ours tuned", "ours mosaic", "bundled", "cudnn", "mgpu", "xla")),
                f"{d['rate']:.4g} {unit}" if d["rate"] is not None else "-",
                f"{d['pct_ceiling']:.0f}%" if d["pct_ceiling"] is not None else "-",
                f"{d['speedup']:.2f}x" if d["speedup"] is not None else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(opts: Options) -> tuple[str, dict[str, Any]]:
    """Measures everything; returns the report (header lines, then the table) and the
    numbers as a JSON-able dict."""
    run_start = time.perf_counter()
    suite = opts.suite
    memory = _device_memory(suite.memory)
    device = jax.devices()[0]
    _log(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, memory {memory / 2**30:.1f} GiB")
    copy_gbs = copy_bandwidth(suite.copy_bytes) / 1e9
    matmul_tfs = matmul_rate(suite, opts.reps)
    _log(f"copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul_tfs:.1f} TFLOP/s")

    # Prefill first: with the time budget, its sweeps (ours vs cuDNN) are the last to go.
    configs = []
    if opts.prefill:
        for B, T in suite.prefill:
            configs.append(functools.partial(prefill_row, suite, opts, memory, B, T))
    if opts.decode:
        for B, ctx, S in itertools.product(suite.decode_batches, suite.decode_contexts, suite.page_sizes):
            configs.append(functools.partial(decode_row, suite, opts, memory, B, ctx, S))
    rows: list[Row] = []
    unswept = 0
    for seed, make_row in enumerate(configs, start=10):
        start = time.perf_counter()
        sweep = suite.sweep and start - run_start < opts.sweep_budget_s
        unswept += suite.sweep and not sweep
        row = make_row(seed=seed, sweep=sweep)
        rows.append(row)
        cells = ", ".join(f"{k} {_cell_text(c)}" for k, c in row.cells.items())
        _log(f"{row.op} {row.config}: {row.note or cells} [{time.perf_counter() - start:.0f} s]")
    rows.sort(key=lambda row: row.op != "decode")  # stable: decode rows, then prefill

    header = [
        f"device: {device.device_kind}, jax {jax.__version__}; copy {copy_gbs:.0f} GB/s (read + write), "
        f"bf16 matmul {matmul_tfs:.3g} TFLOP/s; {opts.reps} reps; {suite.q_heads} q / {suite.kv_heads} kv heads, "
        f"head_dim {suite.head_dim}, bf16; run {time.perf_counter() - run_start:.0f} s"
        + (" (INTERPRET: not a measurement)" if opts.interpret else ""),
        (
            "ms = device time per call (profiler: kernel busy time / calls; JSON wall_ms: host clock); "
            "rate and % from our best (ours, tuned or mosaic): decode KV GB/s vs copy, "
            "prefill TFLOP/s vs matmul; speedup = baseline (bundled / cudnn) ms / ours ms; "
            f"! = rel err > {REL_ERR_BOUND:g}"
        ),
        *([f"sweeps skipped for the last {unswept} configurations (--sweep_budget_s={opts.sweep_budget_s:g})"]
          if unswept else []),
    ]
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "options": dataclasses.asdict(opts),
        "suite": dataclasses.asdict(suite),
        "copy_gb_per_s": copy_gbs,
        "matmul_tflop_per_s": matmul_tfs,
        "rows": [
            {
                **{k: v for k, v in dataclasses.asdict(row).items() if k not in ("cells", "variants")},
                "best": {k: dataclasses.asdict(c) for k, c in row.cells.items()},
                "variants": [{"column": col, **dataclasses.asdict(c)} for col, c in row.variants],
                **_derived(row, copy_gbs, matmul_tfs),
            }
            for row in rows
        ],
    }
    return "\n".join(header) + "\n\n" + table(rows, copy_gbs, matmul_tfs), results


def main(argv: Sequence[str]) -> None:
    del argv
    f = flags.FLAGS
    opts = Options(
        quick=f.quick, interpret=f.interpret, decode=not f.prefill_only, prefill=not f.decode_only, reps=f.reps,
        sweep=f.sweep, sweep_budget_s=f.sweep_budget_s,
        decode_batches=tuple(map(int, f.decode_batches)), decode_contexts=tuple(map(int, f.decode_contexts)),
        page_sizes=tuple(map(int, f.page_sizes)),
    )
    report, results = run(opts)
    if f.out:
        with open(f.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    sys.stderr.flush()
    print(report, flush=True)


if __name__ == "__main__":
    flags.DEFINE_bool("decode_only", False, "Only the paged decode kernels.")
    flags.DEFINE_bool("prefill_only", False, "Only the prefill (flash attention) kernels.")
    flags.DEFINE_bool("quick", False, "A small subset: decode B=1,32 at ctx 4096 page 16; prefill B=8 T=2048; "
                      "no sweeps.")
    flags.DEFINE_bool("interpret", False, "Tiny shapes with the Pallas kernels interpreted (CPU smoke test).")
    flags.DEFINE_bool("sweep", None, "Time the kernels' knob variants and report the best (default: on, off "
                      "with --quick).")
    flags.DEFINE_float("sweep_budget_s", 180.0, "Configurations that start later than this into the run skip "
                       "their sweeps (keeps the run near 4 minutes).")
    flags.DEFINE_list("decode_batches", [], "Decode batch sizes instead of the suite's (e.g. 32,128).")
    flags.DEFINE_list("decode_contexts", [], "Decode context lengths instead of the suite's.")
    flags.DEFINE_list("page_sizes", [], "Page sizes instead of the suite's.")
    flags.DEFINE_integer("reps", 10, "Timed runs of each program; the median is reported.")
    flags.DEFINE_string("out", None, "Also write every number (each variant too) as JSON here.")
    app.run(main)

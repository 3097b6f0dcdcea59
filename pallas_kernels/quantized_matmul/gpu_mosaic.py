"""Skinny matmuls for decode as a Pallas Mosaic GPU kernel (Hopper, sm90: TMA, mbarriers,
warpgroup MMA, a producer warpgroup): y = x @ w for few rows of x, w in bfloat16 or
quantized per output channel (int8 / float8_e4m3fn, scaled like reference.py).

  x      [M, D]   bfloat16 activations, M <= 64 (decode batches)
  w      [D, N]   bfloat16, or int8 / float8_e4m3fn with
  scale  [N]      float32, one per output channel (runtime.quantization)
  y      [M, N]   bfloat16: x @ w summed in float32 (times scale), rounded once

Why: a decode step is a stream of weight reads. XLA's GEMMs (cuBLAS or its Triton
emitter) read Llama-3.1-8B's bf16 projections at 61-72% of the copy rate with 64 rows
(q/k/v, output and down; runtime/BENCHMARKS.md, session 16), which keeps batch-64
decode at 82% of its roofline; and neither XLA's fused convert nor the Triton kernel
(gpu.py) reads int8 weights faster than 54% of the copy rate, so int8 decode gained
1.05x instead of the ~1.9x the bytes allow.

Design: one CTA per (column block, split of D), at most one per SM.
- A producer warpgroup streams the CTA's D range in steps of `block_k` rows: per step a
  TMA copy of w's (block_k, block_n) tile and one of x's (M8, block_k) tile (x's rows
  padded to a multiple of 8, the shared-memory tile's height) into a ring of `stages`
  slots ("ready" barriers completed by the copies, "free" barriers the compute
  warpgroup arrives on). Deep rings keep ~100 KiB of loads in flight per SM.
- The compute warpgroup accumulates acc[64, block_n] += x_tile[64, block_k] @ w_tile in
  float32 with one wgmma per step (the 64 - M8 rows past x's are whatever the tile held:
  rows of a matmul are independent, and those rows are never stored). A quantized tile
  is first converted to bfloat16 in registers (exact for int8 and e4m3) and written to a
  bfloat16 tile the wgmma reads, never to global memory.
- One split: the epilogue scales acc per column (quantized w), rounds it to bfloat16 and
  stores the M8 rows with a TMA copy. Several splits (split-K: enough CTAs to keep the
  GPU's loads in flight when N alone has too few column blocks): each stores float32
  partials of its M8 rows, and a small jnp pass sums them and rounds once.

Measured (H200, JAX 0.11.2, 2026-12-01, runtime/BENCHMARKS.md session 17): bf16 weights at
64 rows read at 82-96% of the copy rate at q/k/v, output and down (XLA: 63-86%), but
inside the batch-64 decode step it did not pay: XLA's output and down GEMMs add the
residual in their epilogue, and its q/k/v GEMM ran faster there than alone. So the
engine runs it only when asked (runtime.models.layers.DENSE_MATMUL = "kernel"). Quantized
tiles read at only 26-44% of the copy rate: the one compute warpgroup converts a tile and
then waits for its wgmma, so conversion and tensor cores never overlap; not used for
int8 / e4m3 weights yet (issue 16).

Gated form (`gated_matmul`, bf16 only): act(x @ gate) * (x @ up) for the MLP's fused
w [D, 2F] (gate | up, the GPU layout of runtime.models.layers.MLP.w_gate_up viewed 2-D).
Each CTA's producer copies a gate tile and the up tile F columns further per step; the
compute warpgroup keeps two accumulators and applies the activation (silu or tanh-gelu,
float32, from exp2) in the epilogue, so the [M, 2F] GEMM output and the fusion that read
it back (SiLU x up: ~2.5 us per layer in the batch-64 step, session 17) are gone. Runs
unsplit (the activation needs whole sums). On by default for calls of 64 rows on Hopper
(runtime.models.layers.DENSE_MATMUL "auto"): H200, 2026-12-02, 56.6 us against XLA's 59.4
at 64 rows, and the batch-64 decode step 0.09-0.11 ms faster in two device calls; no gain
at 8 rows, a loss at 1 (runtime/BENCHMARKS.md, session 19).

Falls back (`supports` False; callers run XLA or gpu.py): x not bfloat16, M > 64, D or N
not multiples of the smallest tiles (64), w of another dtype.

Verification without a GPU (tests/pallas_kernels/test_gpu_mosaic_matmul.py): Pallas'
Mosaic GPU interpreter runs the kernel (TMA, barriers, ring, epilogue; the wgmma becomes
a jnp dot of the same shared-memory tiles, as in paged_attention/gpu_mosaic.py), and
exporting for CUDA runs the real Mosaic GPU lowering. The H200 runs the compiled tests
and `python -m pallas_kernels.bench_quantized_matmul` ("mosaic" columns).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic

_ROWS = 64  # the M of one wgmma: x's rows are padded up to it in shared memory
MAX_ROWS = _ROWS
WDTYPES = ("bfloat16", "int8", "float8_e4m3fn")
_SMEM_LIMIT = flash_mosaic._SMEM_LIMIT
_REDUCTION_SCRATCH = flash_mosaic._REDUCTION_SCRATCH
_DEFAULT_SMS = 132  # H100 / H200 SXM
_IN_FLIGHT = 160 * 1024  # ring bytes per CTA the default config aims at
_MIN_STEPS = 4  # steps of block_k per split at least
_MAX_STAGES = 12
_COL_LAYOUT = plgpu.Layout.WGMMA.reduce(0) if hasattr(plgpu.Layout.WGMMA, "reduce") else None
# Gated matmuls (`gated_matmul`): act(x @ gate) * (x @ up), the MLP's first half.
ACTIVATIONS = ("silu", "gelu_tanh")
_LOG2E = 1.4426950408889634
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int = 128  # output columns per CTA: the N of each wgmma
    block_k: int = 64  # rows of w per pipeline step
    stages: int = 6  # steps in flight
    num_splits: int = 1  # CTAs splitting D per column block

    def __post_init__(self):
        if self.block_n not in (64, 128, 256):
            raise ValueError(f"block_n={self.block_n} must be 64, 128 or 256")
        if self.block_k not in (64, 128):
            raise ValueError(f"block_k={self.block_k} must be 64 or 128")
        if self.stages < 2 or self.num_splits < 1:
            raise ValueError(f"stages={self.stages} must be >= 2 and num_splits={self.num_splits} >= 1")


def _rows8(M: int) -> int:
    return -(-M // 8) * 8


def smem_bytes(M: int, wdtype, config: Config, gated: bool = False) -> int:
    """Shared memory of one CTA: the x and w rings (gated: two w tiles per step), the
    converted tile (quantized w), the output tile, the scales and the barriers."""
    wbytes = jnp.dtype(wdtype).itemsize
    quantized = jnp.dtype(wdtype) != jnp.bfloat16
    x_ring = config.stages * _ROWS * config.block_k * 2
    w_ring = config.stages * config.block_k * config.block_n * wbytes * (2 if gated else 1)
    w16 = config.block_k * config.block_n * 2 if quantized else 0
    out = _ROWS * config.block_n * (4 if config.num_splits > 1 else 2)
    scales = config.block_n * 4 if quantized else 0
    barriers = 8 * (4 * config.stages + 2)
    return x_ring + w_ring + w16 + out + scales + barriers + _REDUCTION_SCRATCH


def num_sms() -> int:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or _DEFAULT_SMS) if device.platform == "gpu" else _DEFAULT_SMS


def _stages_for(M: int, wdtype, block_n: int, block_k: int, num_splits: int, gated: bool = False) -> int:
    per_step = _ROWS * block_k * 2 + block_k * block_n * jnp.dtype(wdtype).itemsize * (2 if gated else 1)
    stages = max(2, min(_MAX_STAGES, _IN_FLIGHT // per_step))
    while stages > 2 and smem_bytes(M, wdtype, Config(block_n, block_k, stages, num_splits), gated) > _SMEM_LIMIT:
        stages -= 1
    return stages


def default_config(M: int, D: int, N: int, wdtype, sms: int | None = None) -> Config:
    """128 rows of w per step; the narrowest column block (64, 128, 256) whose CTAs fit
    one wave (at most one per SM), then split-K while the CTAs still fit (each split >=
    4 steps); rings as deep as _IN_FLIGHT allows. From the H200 sweep of Llama-3.1-8B's
    projections at M = 1 and 64 (`bench_quantized_matmul --kernels=mosaic --sweep`,
    2026-12-01, runtime/BENCHMARKS.md): 128-row steps won every shape; q/k/v (96 blocks
    of 64) ran best unsplit, output and down (64 blocks) with 2 splits, gate/up with
    256-column blocks (112 CTAs)."""
    sms = sms or num_sms()
    block_k = 128 if D % 128 == 0 else 64
    steps = D // block_k
    fits = [bn for bn in (64, 128, 256) if N % bn == 0 and N // bn <= sms]
    block_n = fits[0] if fits else max(bn for bn in (64, 128, 256) if N % bn == 0)
    blocks = N // block_n
    splits = max(1, min(sms // blocks, steps // _MIN_STEPS))
    return Config(block_n=block_n, block_k=block_k, stages=_stages_for(M, wdtype, block_n, block_k, splits),
                  num_splits=splits)


def supports(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> bool:
    """Whether this kernel takes the call."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        return False
    M, D = x.shape
    N = w.shape[1]
    if jnp.dtype(x.dtype) != jnp.bfloat16 or str(jnp.dtype(w.dtype)) not in WDTYPES:
        return False
    quantized = jnp.dtype(w.dtype) != jnp.bfloat16
    if quantized != (scale is not None) or (scale is not None and scale.shape != (N,)):
        return False
    return 1 <= M <= MAX_ROWS and D % 64 == 0 and N % 64 == 0


def runs_here() -> bool:
    """A Hopper GPU (wgmma and TMA are sm90 features)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


# ------------------------------------------------------------------ kernel


def _swizzle(row_bytes: int) -> int:
    for s in (128, 64, 32):
        if row_bytes % s == 0:
            return s
    raise ValueError(f"rows of {row_bytes} bytes")


def _transforms(dtype, cols: int):
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = _swizzle(cols * bits // 8)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _activate(g, activation: str):
    """ACTIVATIONS[activation](g) in float32 from exp2 (what Mosaic GPU lowers)."""
    if activation == "silu":
        return g / (1.0 + jnp.exp2(g * -_LOG2E))
    inner = g * (_GELU_C + _GELU_C * 0.044715 * g * g)
    return 0.5 * g * (1.0 + flash_mosaic._tanh(inner))


def _matmul_kernel(x_ref, w_ref, *refs, config: Config, rows: int, quantized: bool, interpret: bool,
                   activation: str | None = None):
    """x_ref [M8, D] bf16; w_ref [D, N]; (s_ref [N] f32 if quantized); o_ref [M8, N] bf16
    (one split) or [splits, M8, N] f32. With `activation` (gated; bf16 w, one split): w_ref
    [D, 2F] holds gate | up, and o_ref [M8, F] gets act(x @ gate) * (x @ up)."""
    s_ref, o_ref = refs if quantized else (None, refs[0])
    bn, bk, stages, splits = config.block_n, config.block_k, config.stages, config.num_splits
    D = x_ref.shape[1]
    steps = D // bk
    per_split = -(-steps // splits)
    out_dtype = o_ref.dtype
    gated = activation is not None
    F = o_ref.shape[-1]  # gated: the up half's first column

    def body(x_smem, w_smem, w16_smem, o_smem, s_smem, x_ready, w_ready, x_free, w_free, s_ready):
        n = lax.axis_index("n")
        split = lax.axis_index("split")
        lo = split * per_split
        hi = jnp.minimum(lo + per_split, steps)
        n0 = n * bn

        @pl.when(lax.axis_index("wg") == 0)
        def _compute():
            if quantized:
                plgpu.copy_gmem_to_smem(s_ref.at[pl.ds(n0, bn)], s_smem, s_ready.at[0])

            def step(kb, acc):
                slot = lax.rem(kb - lo, jnp.int32(stages))
                plgpu.barrier_wait(w_ready.at[slot])
                if gated:  # both halves' tiles, one accumulator each
                    plgpu.barrier_wait(x_ready.at[slot])
                    if interpret:
                        x = x_smem.at[slot][...]
                        acc = tuple(a + lax.dot(x, w_smem.at[slot, h][...], preferred_element_type=jnp.float32)
                                    for h, a in enumerate(acc))
                    else:

                        def mma2(acc_refs):
                            for h, acc_ref in enumerate(acc_refs):
                                plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot, h])

                        acc = pl.run_state(mma2)(tuple(plgpu.ACC.init(a) for a in acc))
                    plgpu.barrier_arrive(x_free.at[slot])
                    plgpu.barrier_arrive(w_free.at[slot])
                    return acc
                if quantized:
                    if interpret:
                        w16_smem[...] = w_smem.at[slot][...].astype(jnp.bfloat16)
                    else:
                        w = plgpu.load(w_smem.at[slot], (), layout=plgpu.Layout.WGMMA)
                        if w.dtype != jnp.int8:  # e4m3 converts to bf16 through f16 (both exact)
                            w = w.astype(jnp.float16)
                        w16_smem[...] = w.astype(jnp.bfloat16)
                        plgpu.commit_smem()
                    plgpu.barrier_arrive(w_free.at[slot])
                    w_tile = w16_smem
                else:
                    w_tile = w_smem.at[slot]
                plgpu.barrier_wait(x_ready.at[slot])
                if interpret:
                    acc = acc + lax.dot(x_smem.at[slot][...], w_tile[...], preferred_element_type=jnp.float32)
                else:

                    def mma(acc_ref):
                        plgpu.wgmma(acc_ref, x_smem.at[slot], w_tile)

                    acc = pl.run_state(mma)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(x_free.at[slot])
                if not quantized:
                    plgpu.barrier_arrive(w_free.at[slot])
                return acc

            acc = jnp.zeros((_ROWS, bn), jnp.float32)
            if not interpret:
                acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
            acc = lax.fori_loop(lo, hi, step, (acc, acc) if gated else acc)
            if gated:
                gate, up = acc
                acc = _activate(gate, activation) * up
            if quantized:
                plgpu.barrier_wait(s_ready.at[0])
                if interpret:
                    s = s_smem[...]
                else:
                    s = plgpu.load(s_smem, (), layout=_COL_LAYOUT)
                acc = acc * lax.broadcast_in_dim(s, acc.shape, [1])
            o_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            src = o_smem.at[pl.ds(0, rows)]
            dst = o_ref.at[pl.ds(0, rows), pl.ds(n0, bn)] if splits == 1 else o_ref.at[
                split, pl.ds(0, rows), pl.ds(n0, bn)]
            plgpu.copy_smem_to_gmem(src, dst)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(lax.axis_index("wg") == 1)
        def _producer():
            def copy_x(kb, slot):
                plgpu.copy_gmem_to_smem(
                    x_ref.at[:, pl.ds(kb * bk, bk)], x_smem.at[slot, pl.ds(0, rows)], x_ready.at[slot])

            def copy_w(kb, slot):
                if gated:  # gate columns [n0, n0 + bn) and the same up columns, F further
                    for h in range(2):
                        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(kb * bk, bk), pl.ds(h * F + n0, bn)],
                                                w_smem.at[slot, h], w_ready.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(kb * bk, bk), pl.ds(n0, bn)], w_smem.at[slot],
                                            w_ready.at[slot])

            flash_mosaic.produce_kv_ring(
                lo, hi, stages, prepare=lambda kb: kb, copy_k=copy_w, copy_v=copy_x, k_free=w_free, v_free=x_free)

    wdtype = w_ref.dtype
    pl.run_scoped(
        body,
        plgpu.SMEM((stages, _ROWS, bk), jnp.bfloat16, transforms=_transforms(jnp.bfloat16, bk)),  # x ring
        plgpu.SMEM((stages, 2, bk, bn) if gated else (stages, bk, bn), wdtype,
                   transforms=_transforms(wdtype, bn)),  # w ring (gated: gate and up tiles)
        plgpu.SMEM((bk, bn) if quantized else (8, 64), jnp.bfloat16,
                   transforms=_transforms(jnp.bfloat16, bn if quantized else 64)),  # converted w tile
        plgpu.SMEM((_ROWS, bn), out_dtype, transforms=_transforms(out_dtype, bn)),  # output tile
        plgpu.SMEM((bn,), jnp.float32),  # scales
        plgpu.Barrier(num_barriers=stages),  # x slot loaded
        plgpu.Barrier(num_arrivals=2 if gated else 1, num_barriers=stages),  # w slot loaded
        plgpu.Barrier(num_barriers=stages),  # x slot free
        plgpu.Barrier(num_barriers=stages),  # w slot free
        plgpu.Barrier(num_barriers=1),  # scales loaded
        collective_axes="wg",
    )


# ------------------------------------------------------------------ entry points


@functools.partial(jax.jit, static_argnames=("interpret",))
def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, interpret=False) -> jax.Array:
    """y = x @ w (times scale per column for a quantized w) in bfloat16, at default_config.
    `interpret`: False (compile), True (Mosaic GPU interpreter) or InterpretGPUParams."""
    return matmul_tuned(x, w, scale, interpret=interpret)


def matmul_tuned(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, interpret=False,
                 config: Config | None = None, **knobs) -> jax.Array:
    """`matmul` with the config (or some of its fields as knobs) given."""
    if not supports(x, w, scale):
        raise ValueError(f"unsupported: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, "
                         f"scale {None if scale is None else scale.shape}")
    M, D = x.shape
    N = w.shape[1]
    config = config or default_config(M, D, N, w.dtype)
    if knobs:
        if "stages" not in knobs:
            knobs["stages"] = _stages_for(M, w.dtype, knobs.get("block_n", config.block_n),
                                          knobs.get("block_k", config.block_k),
                                          knobs.get("num_splits", config.num_splits))
        config = dataclasses.replace(config, **knobs)
    if D % config.block_k or N % config.block_n:
        raise ValueError(f"{config} does not tile D={D}, N={N}")
    need = smem_bytes(M, w.dtype, config)
    if need > _SMEM_LIMIT:
        raise ValueError(f"{config} needs {need} bytes of shared memory > {_SMEM_LIMIT}")
    steps = D // config.block_k
    splits = min(config.num_splits, steps)
    splits = -(-steps // -(-steps // splits))  # no split without steps
    config = dataclasses.replace(config, num_splits=splits)
    quantized = scale is not None
    rows = _rows8(M)
    xp = jnp.pad(x, ((0, rows - M), (0, 0))) if rows != M else x
    if splits == 1:
        out_type = jax.ShapeDtypeStruct((rows, N), jnp.bfloat16)
    else:
        out_type = jax.ShapeDtypeStruct((splits, rows, N), jnp.float32)
    params = flash_mosaic._interpret_params(interpret)
    kernel = functools.partial(_matmul_kernel, config=config, rows=rows, quantized=quantized,
                               interpret=params is not None)
    call = plgpu.kernel(
        kernel,
        **{flash_mosaic._OUT_ARG: out_type},
        grid=(splits, N // config.block_n),
        grid_names=("split", "n"),
        num_threads=2,
        thread_name="wg",
        interpret=params,
    )
    args = (xp, w) + ((scale.astype(jnp.float32),) if quantized else ())
    out = call(*args)
    if splits > 1:
        out = out.sum(axis=0).astype(jnp.bfloat16)
    return out[:M] if rows != M else out


def gated_default_config(M: int, D: int, F: int, sms: int | None = None) -> Config:
    """default_config's rule for a gated call: column blocks of the F outputs (each CTA
    reads a gate and an up tile per step), one wave at most, no split (the activation
    needs whole sums); rings as deep as fit."""
    sms = sms or num_sms()
    block_k = 128 if D % 128 == 0 else 64
    fits = [bn for bn in (64, 128, 256) if F % bn == 0 and F // bn <= sms]
    block_n = fits[0] if fits else max(bn for bn in (64, 128, 256) if F % bn == 0)
    for bn in [block_n] + [b for b in (128, 64) if b < block_n and F % b == 0]:
        config = Config(block_n=bn, block_k=block_k, stages=_stages_for(M, jnp.bfloat16, bn, block_k, 1, True))
        if smem_bytes(M, jnp.bfloat16, config, True) <= _SMEM_LIMIT:
            return config
    return config


def gated_supports(x: jax.Array, w: jax.Array, activation: str) -> bool:
    """Whether `gated_matmul` takes the call: bf16 x and w [D, 2F] (gate | up)."""
    if activation not in ACTIVATIONS or w.ndim != 2 or w.shape[1] % 2:
        return False
    return jnp.dtype(w.dtype) == jnp.bfloat16 and supports(x, w[:, : w.shape[1] // 2])


@functools.partial(jax.jit, static_argnames=("activation", "interpret"))
def gated_matmul(x: jax.Array, w: jax.Array, *, activation: str = "silu", interpret=False) -> jax.Array:
    """act(x @ w[:, :F]) * (x @ w[:, F:]) in bfloat16 for w [D, 2F] (the fused gate | up
    weight): the MLP's first half in one kernel, gate and up summed in float32 and the
    product rounded once (the unfused path rounds gate and up, then their product)."""
    return gated_matmul_tuned(x, w, activation=activation, interpret=interpret)


def gated_matmul_tuned(x: jax.Array, w: jax.Array, *, activation: str = "silu", interpret=False,
                       config: Config | None = None, **knobs) -> jax.Array:
    """`gated_matmul` with the config (or some of its fields as knobs) given; one split."""
    if not gated_supports(x, w, activation):
        raise ValueError(f"unsupported gated call: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, {activation!r}")
    M, D = x.shape
    F = w.shape[1] // 2
    config = config or gated_default_config(M, D, F)
    if knobs:
        if "stages" not in knobs:
            knobs["stages"] = _stages_for(M, w.dtype, knobs.get("block_n", config.block_n),
                                          knobs.get("block_k", config.block_k), 1, True)
        config = dataclasses.replace(config, **knobs)
    if config.num_splits != 1:
        raise ValueError(f"{config}: a gated call runs unsplit (its activation needs whole sums)")
    if D % config.block_k or F % config.block_n:
        raise ValueError(f"{config} does not tile D={D}, F={F}")
    need = smem_bytes(M, w.dtype, config, True)
    if need > _SMEM_LIMIT:
        raise ValueError(f"{config} needs {need} bytes of shared memory > {_SMEM_LIMIT}")
    rows = _rows8(M)
    xp = jnp.pad(x, ((0, rows - M), (0, 0))) if rows != M else x
    params = flash_mosaic._interpret_params(interpret)
    kernel = functools.partial(_matmul_kernel, config=config, rows=rows, quantized=False,
                               interpret=params is not None, activation=activation)
    call = plgpu.kernel(
        kernel,
        **{flash_mosaic._OUT_ARG: jax.ShapeDtypeStruct((rows, F), jnp.bfloat16)},
        grid=(1, F // config.block_n),
        grid_names=("split", "n"),
        num_threads=2,
        thread_name="wg",
        interpret=params,
    )
    out = call(xp, w)
    return out[:M] if rows != M else out


def gated_reference(x: jax.Array, w: jax.Array, activation: str = "silu") -> jax.Array:
    """What gated_matmul computes, in jnp: float32 sums, the activation in float32, one
    rounding to bfloat16."""
    y = jnp.dot(x, w.astype(x.dtype), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    F = w.shape[1] // 2
    gate, up = y[:, :F], y[:, F:]
    act = jax.nn.silu(gate) if activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return (act * up).astype(jnp.bfloat16)


def reference(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """What the kernel computes, in jnp: float32 products of x and w's values (exact in
    bfloat16), scaled per column, rounded once to bfloat16."""
    y = jnp.dot(x, w.astype(x.dtype), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale[None, :].astype(jnp.float32)
    return y.astype(jnp.bfloat16)


def bytes_read(M: int, D: int, N: int, wdtype) -> int:
    """The least bytes one call must read: w once, x once."""
    return D * N * jnp.dtype(wdtype).itemsize + M * D * 2 + (N * 4 if jnp.dtype(wdtype) != jnp.bfloat16 else 0)


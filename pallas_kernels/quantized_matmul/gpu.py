"""Weight-only quantized matmul as a Pallas GPU kernel (Triton lowering): the weight is
read once in its quantized bytes and converted in registers, never materialized in
bfloat16. Same function and layout as reference.py, plus tuning knobs.

Why: decode is a stream of weight reads, and int8 / e4m3 weights halve the bytes. XLA
fuses the convert into its GEMV but reads the quantized weight at 1.5-1.7 TB/s on an
H200 where it reads bfloat16 at 3.4 (runtime/BENCHMARKS.md, session 9): int8 decode ran
at 0.84x the bf16 speed instead of ~1.9x.

Design: a program per (row block, column block, split of D). It walks its part of D in
`block_k` steps: a (block_m, block_k) tile of x and a (block_k, block_n) tile of q (the
weight's rows are D: each step reads block_k contiguous rows of block_n bytes), q's tile
converted to x's dtype, one tensor-core dot accumulated in float32. Rows of x are padded
to block_m (>= 16, Triton's dot minimum; decode pads its 1-8 rows, which costs nothing
in a memory-bound kernel). With one split the program scales its accumulator per column
and writes y in x's dtype; with several (split-K: enough programs to keep the GPU's
loads in flight when M and N are small, as in a batch-1 GEMV of a 4096-wide output) each
writes float32 partials and a small jnp pass sums and scales them.

Unsupported shapes (`supports`): D or N not multiples of the smallest tiles, or an x of
another dtype than bfloat16 / float32; the caller then runs the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

QDTYPES = ("int8", "float8_e4m3fn")
XDTYPES = ("bfloat16", "float32")
_MIN_ROWS = 16  # Triton's dot: every dimension >= 16
# Programs that keep an H100/H200 (132 SMs) busy streaming: split-K adds programs up to
# about this many, each keeping at least _MIN_STEPS steps of block_k.
_TARGET_PROGRAMS = 264
_MIN_STEPS = 4


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def default_config(M: int, D: int, N: int) -> Config:
    """Decode-sized M (<= 64): one row tile, 128 x 128 weight tiles, split-K to fill the
    GPU. Larger M (prefill): 64 x 128 x 64 tiles, no split."""
    if M <= 64:
        block_m = _pow2_at_least(M, _MIN_ROWS)
        block_n = 128 if N % 128 == 0 else 64
        block_k = 128 if D % 128 == 0 else 64
        programs = N // block_n
        splits = 1
        while (programs * splits * 2 <= _TARGET_PROGRAMS and D % (block_k * splits * 2) == 0
               and D // (block_k * splits * 2) >= _MIN_STEPS):
            splits *= 2
        return Config(block_m, block_n, block_k, splits)
    return Config(64, 128 if N % 128 == 0 else 64, 64, 1, num_warps=4, num_stages=3)


def supports(x, q, scale) -> bool:
    """Whether the kernel runs this call (else the caller runs the reference)."""
    if x.ndim != 2 or q.ndim != 2 or scale.ndim != 1:
        return False
    M, D = x.shape
    if q.shape[0] != D or scale.shape[0] != q.shape[1]:
        return False
    N = q.shape[1]
    return (jnp.dtype(q.dtype).name in QDTYPES and jnp.dtype(x.dtype).name in XDTYPES and M > 0
            and D % 64 == 0 and N % 64 == 0)


def runs_here(qdtype) -> bool:
    """Whether this process's GPU converts `qdtype` in Triton: int8 on any, e4m3 from sm89
    (Ada, Hopper) on. Without a GPU (ahead-of-time compiles for one) True."""
    if jnp.dtype(qdtype).name != "float8_e4m3fn":
        return True
    device = jax.devices()[0]
    if device.platform != "gpu":
        return True
    major, _, minor = str(getattr(device, "compute_capability", "9.0")).partition(".")
    return (int(major), int(minor or 0)) >= (8, 9)


def _kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int, steps: int, num_splits: int):
    # x_ref (block_m, D), q_ref (D, block_n), s_ref (block_n,), o_ref (block_m, block_n)
    split = pl.program_id(2)
    first = split * steps

    def body(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]
        w = q_ref[pl.ds(k0, block_k), :].astype(x.dtype)
        # HIGHEST: float32 x as float32 (IEEE); DEFAULT is TF32 in Triton, 1e-3 relative off the
        # reference (H200, 2026-11-30). bf16 x is unaffected.
        return acc + jax.lax.dot(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    if num_splits == 1:
        o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)
    else:
        o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantized_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, interpret: bool = False) -> jax.Array:
    """(x [M, D] @ q [D, N]) * scale [N] -> [M, N] in x.dtype; see reference.py."""
    return quantized_matmul_tuned(x, q, scale, interpret=interpret)


def quantized_matmul_tuned(x, q, scale, *, interpret: bool = False, config: Config | None = None,
                           **knobs) -> jax.Array:
    """quantized_matmul with the tiling exposed (`config`, or fields of the default one
    replaced by `knobs`), for benchmarks and tests."""
    assert supports(x, q, scale), (x.shape, x.dtype, q.shape, q.dtype, scale.shape)
    M, D = x.shape
    N = q.shape[1]
    config = dataclasses.replace(config or default_config(M, D, N), **knobs)
    bm, bn, bk, splits = config.block_m, config.block_n, config.block_k, config.num_splits
    assert bm >= _MIN_ROWS and D % (bk * splits) == 0 and N % bn == 0, config
    steps = D // (bk * splits)
    Mp = -(-M // bm) * bm
    xp = jnp.pad(x, ((0, Mp - M), (0, 0))) if Mp != M else x
    kernel = functools.partial(_kernel, block_k=bk, steps=steps, num_splits=splits)
    grid = (Mp // bm, N // bn, splits)
    in_specs = [
        pl.BlockSpec((bm, D), lambda i, j, s: (i, 0)),
        pl.BlockSpec((D, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((bn,), lambda i, j, s: (j,)),
    ]
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((Mp, N), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, Mp, N), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret, name=f"quantized_matmul_bm{bm}_bn{bn}_bk{bk}_splits{splits}",
    )(xp, q, scale.astype(jnp.float32))
    if splits > 1:
        out = (out.sum(axis=0) * scale[None, :]).astype(x.dtype)
    return out[:M]

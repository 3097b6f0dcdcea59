"""The residual add and the RMSNorm after it as one Pallas (Triton) kernel; semantics in
reference.py.

Why: in a batch-1 decode step on an H200 (Llama-3.1-8B, 2026-11-29) XLA ran each of a
layer's two `x + h; RMSNorm` pairs as three kernels (the add, the sum of squares, the
scaling), 1.4-1.6 us apiece, ~9 us per layer where the layer's weights take ~110 us to
read. Here one program per row reads x, h and w once, writes x + h and the normalized
row. At 64 rows and more, cuBLAS adds the residual in its GEMM epilogue and XLA's norm
is one kernel, so the engine keeps XLA's path there (runtime.models.transformer).

One program holds a whole row, so D must be a power of two (Triton vectors) and at
most 16384; `supports` says whether a call can run here, the caller falls back to jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.add_rmsnorm import reference

# The Triton compiler parameters are `CompilerParams` in jax 0.10 and 0.11.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

MAX_DIM = 16384


def supports(x: jax.Array, w: jax.Array) -> bool:
    D = x.shape[-1]
    return w.shape == (D,) and 16 <= D <= MAX_DIM and D & (D - 1) == 0


def _kernel(*refs, has_h: bool, eps: float, plus_one: bool):
    if has_h:
        x_ref, h_ref, w_ref, s_ref, y_ref = refs
        # The sum in float32, rounded once to x's dtype: what XLA does for x + h.
        s = (x_ref[...].astype(jnp.float32) + h_ref[...].astype(jnp.float32)).astype(s_ref.dtype)
        s_ref[...] = s
    else:
        x_ref, w_ref, y_ref = refs
        s = x_ref[...]
    s32 = s.astype(jnp.float32)
    n = s32 * jax.lax.rsqrt(jnp.sum(s32 * s32) / s32.shape[-1] + eps)
    w = w_ref[...].astype(jnp.float32)
    if plus_one:
        y = n * (1.0 + w)
    else:
        y = w * n.astype(s.dtype).astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "plus_one", "interpret"))
def add_rmsnorm(x, h, w, *, eps: float, plus_one: bool, interpret: bool = False):
    """See reference.add_rmsnorm. Shapes `supports` rejects run the reference."""
    if not supports(x, w):
        return reference.add_rmsnorm(x, h, w, eps=eps, plus_one=plus_one)
    shape, D = x.shape, x.shape[-1]
    rows = x.reshape(-1, D)
    R = rows.shape[0]
    y_dtype = x.dtype if plus_one else jnp.result_type(w.dtype, x.dtype)
    row = pl.BlockSpec((None, D), lambda r: (r, 0))
    vec = pl.BlockSpec((D,), lambda r: (0,))
    args = [rows] if h is None else [rows, h.reshape(R, D)]
    out_shape = [jax.ShapeDtypeStruct((R, D), y_dtype)]
    if h is not None:
        out_shape.insert(0, jax.ShapeDtypeStruct((R, D), x.dtype))
    out = pl.pallas_call(
        functools.partial(_kernel, has_h=h is not None, eps=eps, plus_one=plus_one),
        grid=(R,),
        in_specs=[row] * len(args) + [vec],
        out_specs=[row] * len(out_shape),
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=4 if D <= 4096 else 8, num_stages=1),
        interpret=interpret,
        name=f"add_rmsnorm_D{D}" if h is not None else f"rmsnorm_D{D}",
    )(*args, w)
    if h is None:
        return x, out[0].reshape(shape)
    return out[0].reshape(shape), out[1].reshape(shape)

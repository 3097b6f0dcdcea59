"""Building blocks shared by every family: RMSNorm, rotary embeddings, attention, MLP.

Einsum letters (used across runtime/models): B batch, T query positions, S key
positions, N query heads, K kv heads, G queries per kv head, H head_dim, D embed,
F ffw, V vocab.

Every weight is an `nnx.Param` with `logical_axes` metadata; sharding/rules.py maps
those names onto mesh axes, so this code never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.add_rmsnorm import reference as add_rmsnorm_reference
from pallas_kernels.paged_attention import reference as paged_reference
from runtime.config import ModelConfig, RopeConfig
from runtime.kv_cache import cache_rows, is_quantized, write_kv
from sharding.ops import Local

ATTENTION_IMPLS = ("reference", "pallas")


_SHAPES_ONLY = contextvars.ContextVar("xlserve_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Modules built inside hold ShapeDtypeStructs, not weights (transformer.abstract_model):
    what nnx.eval_shape gives, without tracing every initializer (~1.7 s for a 30-layer
    model on CPU, most of a small checkpoint's restore time)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def building_shapes_only() -> bool:
    """Whether modules are being built inside `shapes_only()`."""
    return _SHAPES_ONLY.get()


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str, ...], dtype, init: str = "normal") -> nnx.Param:
    """Declares one weight: its shape, dtype, logical axes and initializer."""
    assert len(shape) == len(axes), (shape, axes)
    if _SHAPES_ONLY.get():
        return nnx.Param(jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)), logical_axes=axes)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        # Scaled so random-weight activations stay O(1) through many layers.
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, statistics in float32.

    Llama-style multiplies by w after casting back to the input dtype; Gemma-style
    (`plus_one`) multiplies by (1 + w) in float32, as each family's reference does.
    """

    def __init__(self, dim: int, axis: str, *, eps: float, plus_one: bool, dtype, rngs=None):
        self.eps = eps
        self.plus_one = plus_one
        self.scale = param(rngs, (dim,), (axis,), dtype, init="zeros" if plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        return add_rmsnorm_reference.rmsnorm(x, self.scale[...], eps=self.eps, plus_one=self.plus_one)

    def add(self, x: jax.Array, h: jax.Array | None, kernel=None) -> tuple[jax.Array, jax.Array]:
        """(x + h, this norm of it); h None: (x, norm(x)). `kernel`: a module with
        add_rmsnorm (pallas_kernels/add_rmsnorm/gpu.py) that runs both as one kernel."""
        if kernel is None:
            return add_rmsnorm_reference.add_rmsnorm(x, h, self.scale[...], eps=self.eps, plus_one=self.plus_one)
        with jax.named_scope("add_rmsnorm_kernel"):
            return kernel.add_rmsnorm(x, h, self.scale[...], eps=self.eps, plus_one=self.plus_one,
                                      interpret=dispatch.platform() != "gpu")


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] for rotate-half rotary embeddings at integer positions [B, T]."""
    inv_freq = jnp.asarray(rope.inv_freq(head_dim), jnp.float32)  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rope_half_tables(rope: RopeConfig, head_dim: int, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, H / 2] at integer positions [B]: rope_tables' halves (which are equal)."""
    inv_freq = jnp.asarray(rope.inv_freq(head_dim), jnp.float32)  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H]; cos/sin [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    impl: str,
    fresh: bool,
) -> jax.Array:
    """The one attention call of every model: q [B, T, N, H] against the sequence's
    keys. `fresh` (static) says every row starts at position 0, so the chunk's own k/v
    [B, T, K, H] are all there is to see (the pages already hold them too).

    impl "reference": the paged reference for everything. impl "pallas": the flash
    kernel for fresh prefill, the paged kernel for decode (T == 1), and for prefill
    chunks that continue earlier context the paged reference, or with
    PAGED_PREFILL_KERNEL on Hopper the flash kernel over the pages
    (flash_attention/gpu_mosaic.paged_prefill; the Triton and TPU kernels have no such
    mode yet). Rows of a chunk hold consecutive positions from positions[:, 0].
    Quantized pages (QuantizedPages, runtime/kv_cache.py): the paged decode kernels read
    them as stored (GPU: the Triton kernel, also on Hopper; TPU: its kernel); continued
    prefill chunks go through the paged reference, which dequantizes after its gather;
    a fresh prefill on impl "pallas" runs the flash kernel over the chunk's own k/v,
    unquantized, while the reference reads every key back from the pages (so
    runtime.quality measures what the quantized cache costs at every position).
    """
    kw = dict(scale=scale, window=window, softcap=softcap)
    quantized_chunk = not fresh and q.shape[1] > 1 and is_quantized(k_pages.dtype)
    if impl == "reference" or (impl == "pallas" and quantized_chunk):
        return paged_reference.paged_attention(q, k_pages, v_pages, page_table, positions, kv_lens, **kw)
    if impl != "pallas":
        raise ValueError(f"attention impl {impl!r} is not available; choose from {', '.join(ATTENTION_IMPLS)}")
    kernel = dispatch.engine_kernel_impl()
    if fresh:
        return dispatch.load("flash_attention", kernel)(q, k, v, kv_lens, **kw)
    if q.shape[1] == 1:
        return dispatch.load("paged_attention", kernel)(q, k_pages, v_pages, page_table, positions, kv_lens, **kw)
    if PAGED_PREFILL_KERNEL and kernel == "gpu" and dispatch.module_name("flash_attention", kernel) == "gpu_mosaic":
        from pallas_kernels.flash_attention import gpu_mosaic as flash_mosaic

        if flash_mosaic.supports_paged(q, k_pages, window, softcap):
            starts = positions[:, 0]
            lengths = jnp.maximum(kv_lens - starts, 0)  # a padding row (kv_lens 0) has none
            return flash_mosaic.paged_prefill(q, k_pages, v_pages, page_table, starts, lengths, **kw,
                                              interpret=dispatch.platform() != "gpu")
    return paged_reference.paged_attention(q, k_pages, v_pages, page_table, positions, kv_lens, **kw)


# Continued prefill chunks through flash_attention/gpu_mosaic.paged_prefill on Hopper (else
# the paged reference, which attends over every table slot). On an H200 (session 8) three
# servers ran with it (budgets 512, 544, 8192; no failed request) and a continued chunk
# beside 64 decode rows cost what a fresh one does (10.3 against 16.3 ms per step).
# XLSERVE_PAGED_PREFILL=0 turns it off.
PAGED_PREFILL_KERNEL = os.environ.get("XLSERVE_PAGED_PREFILL", "1") == "1"


@dataclasses.dataclass(frozen=True)
class Segment:
    """One part of a mixed call (runtime.engine's decode rows beside a prefill chunk):
    `rows` sequences of `length` tokens each, laid out row after row on the call's flat
    token axis, with their own page tables, positions and cache lengths. Built while
    tracing; `rows`, `length` and `fresh` are static."""

    page_table: jax.Array  # [rows, MP]
    positions: jax.Array  # [rows, length]
    kv_lens: jax.Array  # [rows]
    rows: int
    length: int
    fresh: bool  # every row starts at position 0 (attention's `fresh`)

    @property
    def size(self) -> int:
        return self.rows * self.length


def _fused_param(fn, parts: list, axes: tuple[str, ...], sharding_of) -> nnx.Param:
    """The Param fn(*parts) with logical `axes`, placed by `sharding_of(axes, shape)`
    (None: where the first part lives); for an abstract model (ShapeDtypeStruct parts)
    its shape and dtype."""
    out = jax.eval_shape(fn, *parts)
    sharding = sharding_of(axes, out.shape)
    if any(isinstance(p, jax.ShapeDtypeStruct) for p in parts):
        value = jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
    else:
        value = _jit_fuse(fn, sharding or parts[0].sharding)(*parts)
    return nnx.Param(value, logical_axes=axes)


def _fused_scale(fn, scales: list, weight_axes: list[tuple[str, ...]], axes: tuple[str, ...], sharding_of):
    """The per-channel scale of the fused weight fn(*weights) with logical `axes` (the
    fused weight's, "embed" among them), from the parts' scales (each its weight's axes
    without "embed"): each scale gets a size-1 embed axis where its weight has one, so
    the same fn lays the channels out as it lays out the weights'; then that axis goes."""
    def fused(*parts):
        parts = [jnp.expand_dims(p, w_axes.index("embed")) for p, w_axes in zip(parts, weight_axes)]
        return jnp.squeeze(fn(*parts), axes.index("embed"))

    return _fused_param(fused, scales, tuple(a for a in axes if a != "embed"), sharding_of)


@functools.cache
def _jit_fuse(fn, sharding):
    return jax.jit(fn, out_shardings=sharding)


# Quantized projections (weight-only int8 / fp8). "auto" on GPU, where the einsum is a plain
# [M, D] x [D, N] (every GPU layout's projection), chooses by M from the H200 measurements
# of `python -m pallas_kernels.bench_quantized_matmul` (Llama-3.1-8B's projections,
# 2026-11-30, runtime/BENCHMARKS.md):
# - M <= 8: XLA's fused convert on x padded to 8 rows. At M = 8 XLA reads the int8 weight
#   at ~2.5 TB/s (1.16x bf16 at gate/up), at M = 1 it picks a slower GEMV (0.77x bf16) and
#   the Pallas kernel (1.04x) is slower than XLA at 8 rows.
# - 8 < M <= 64: pallas_kernels/quantized_matmul/gpu.py (M = 64: 1.01-1.24x bf16, XLA's
#   convert 0.87-1.07x).
# - M > 64 (prefill chunks): XLA's convert (M = 512: the kernel 0.39-0.44x bf16, XLA 0.52-0.60x).
# Elsewhere XLA's convert. "xla": always XLA's convert, unpadded; "kernel": the kernel
# wherever it takes the shapes; "interpret": the kernel interpreted on any platform (CPU
# tests). runtime.bench --quantized_matmul sets it.
QUANTIZED_MATMUL = "auto"
QUANTIZED_MATMUL_MODES = ("auto", "xla", "kernel", "interpret")
_PAD_ROWS = 8  # "auto": XLA's convert on at least this many rows
_KERNEL_ROWS = 64  # "auto": the kernel up to this many rows


def _matmul_view(spec: str) -> tuple[int, int] | None:
    """(x's leading batch axes, contracted axes) when `spec` is x [batch..., contracted...]
    times w [contracted..., out...] -> [batch..., out...] with the axes in those orders
    (a 2-D matmul of free reshapes); else None."""
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in xs if c not in out]
    batch = xs[:len(xs) - len(contracted)]
    outs = ws[len(contracted):]
    if xs != batch + "".join(contracted) or ws != "".join(contracted) + outs or out != batch + outs:
        return None
    return len(batch), len(contracted)


def _xla_quantized(spec: str, x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """XLA's fused convert: w converted to x's dtype inside the matmul, float32 product scaled."""
    ins, out = spec.split("->")
    x_letters, w_letters = ins.split(",")
    s_letters = [c for c in w_letters if c not in x_letters]
    order = sorted(range(len(s_letters)), key=lambda i: out.index(s_letters[i]))
    assert out.endswith("".join(s_letters[i] for i in order)), (spec, s_letters)
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * jnp.transpose(scale, order)).astype(x.dtype)


def quantized_matmul_path(rows: int, mode: str, platform: str) -> str:
    """How a quantized [rows, D] x [D, N] projection runs: "xla", "xla_padded" (XLA's
    convert on rows padded to _PAD_ROWS) or "kernel" (the Pallas kernel, where it takes
    the shapes), by QUANTIZED_MATMUL's `mode` (above)."""
    if mode == "interpret" or (mode == "kernel" and platform == "gpu"):
        return "kernel"
    if mode != "auto" or platform != "gpu" or rows > _KERNEL_ROWS:
        return "xla"
    return "xla_padded" if rows < _PAD_ROWS else "xla" if rows == _PAD_ROWS else "kernel"


def _quantized_matmul(spec: str, x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """project's quantized case, by QUANTIZED_MATMUL (above)."""
    view = _matmul_view(spec)
    if view is None:
        return _xla_quantized(spec, x, w, scale)
    nb, nc = view
    M, D = int(np.prod(x.shape[:nb])), int(np.prod(x.shape[nb:]))
    path = quantized_matmul_path(M, QUANTIZED_MATMUL, dispatch.platform())
    if path == "xla":
        return _xla_quantized(spec, x, w, scale)
    x2, w2, s2 = x.reshape(M, D), w.reshape(D, -1), scale.reshape(-1)
    if path == "xla_padded":
        y = _xla_quantized("md,dn->mn", jnp.pad(x2, ((0, _PAD_ROWS - M), (0, 0))), w2, s2)[:M]
        return y.reshape(*x.shape[:nb], *w.shape[nc:])
    from pallas_kernels.quantized_matmul import gpu as qmm

    interpret = dispatch.platform() != "gpu"
    if not qmm.supports(x2, w2, s2) or (not interpret and not qmm.runs_here(w2.dtype)):
        return _xla_quantized(spec, x, w, scale)
    y = qmm.quantized_matmul(x2, w2, s2, interpret=interpret)
    return y.reshape(*x.shape[:nb], *w.shape[nc:])


# Dense bf16 projections through pallas_kernels/quantized_matmul/gpu_mosaic.py (Hopper,
# up to 64 rows): the plain form built, measured, off by default. H200, Llama-3.1-8B, 2026-12-01
# (runtime/BENCHMARKS.md, session 17):
# - alone (`bench_quantized_matmul --kernels=mosaic`, device time) the kernel beat XLA at
#   16-64 rows on q/k/v (14.0-14.6 us against 15.3-19.0), and at 64 rows on the output
#   projection (12.7 against 14.6) and down (32.8 against 37.1); it lost at gate/up and at
#   1-8 rows;
# - in the batch-64 decode step it did not pay: with it on q/k/v, output and down the
#   step took 5.95 ms against 5.80 (XLA's output and down GEMMs add the residual in their
#   epilogue, so the kernel cost an add and a split-K sum per projection, and XLA's q/k/v
#   GEMM in the step took 18.0 us, not 19.0), and on q/k/v alone 5.90 against 5.88.
# The gated form (gpu_mosaic.gated_matmul: the gate/up GEMM and act(gate) * up in one
# kernel) paid at 64 rows and not at 8. H200, Llama-3.1-8B shapes, 2026-12-02
# (runtime/BENCHMARKS.md, session 19), device time per call alone: 56.6 us against XLA's
# GEMM + activation fusion 59.4 at 64 rows, 55.8 against 56.2 at 8, 57.8 against 55.6 at
# 1; the batch-64 decode step (prompt 512) in two device calls, two processes each: 5.82
# and 5.65 ms against 5.91 and 5.76 (80.5 -> 82.8% and 82.7 -> 84.1% of roofline); batch
# 8: 4.46 against 4.42 (noise), batch 1: 4.29 against 4.22.
# Modes: "auto" (default): the gated form where a call has at least GATED_MIN_ROWS rows (and
# at most the kernel's 64) on Hopper, XLA everywhere else; "xla": never the kernel;
# "kernel": wherever it takes the shapes, on sm90 (projections and the gated half);
# "gated": the gated half at any row count; "interpret": both interpreted on any platform
# (CPU tests). runtime.bench --dense_matmul sets it.
DENSE_MATMUL = "auto"
DENSE_MATMUL_MODES = ("auto", "xla", "kernel", "gated", "interpret")
GATED_MIN_ROWS = 64


def dense_matmul_path(mode: str, hopper: bool, gated: bool = False, rows: int | None = None) -> str:
    """How a bf16 projection of `rows` rows (`gated`: the MLP's gate/up with its
    activation) runs: "xla" or "kernel" (above)."""
    if mode not in DENSE_MATMUL_MODES:
        raise ValueError(f"dense matmul mode {mode!r}; choose from {', '.join(DENSE_MATMUL_MODES)}")
    if mode == "auto":
        return "kernel" if gated and hopper and rows is not None and rows >= GATED_MIN_ROWS else "xla"
    on = ("kernel", "gated") if gated else ("kernel",)
    return "kernel" if mode == "interpret" or (mode in on and hopper) else "xla"


def _dense_matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """project's bf16 case, by DENSE_MATMUL (above)."""
    if DENSE_MATMUL in ("xla", "auto") or dense_matmul_path(DENSE_MATMUL, dispatch.on_hopper()) != "kernel":
        return jnp.einsum(spec, x, w)
    view = _matmul_view(spec)
    if view is None or x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return jnp.einsum(spec, x, w)
    from pallas_kernels.quantized_matmul import gpu_mosaic

    nb, nc = view
    M, D = int(np.prod(x.shape[:nb])), int(np.prod(x.shape[nb:]))
    x2, w2 = x.reshape(M, D), w.reshape(D, -1)
    if not gpu_mosaic.supports(x2, w2):
        return jnp.einsum(spec, x, w)
    y = gpu_mosaic.matmul(x2, w2, interpret=DENSE_MATMUL == "interpret")
    return y.reshape(*x.shape[:nb], *w.shape[nc:])


def _gated_dense(x: jax.Array, w_gate_up: jax.Array, activation: str) -> jax.Array | None:
    """act(x @ gate) * (x @ up) through the Mosaic GPU kernel's gated form where
    DENSE_MATMUL runs the kernel and it takes the call (x [B, T, D] of at most 64 rows,
    bf16 w [D, 2, F], the GPU layout); None otherwise (the caller runs XLA)."""
    rows = int(np.prod(x.shape[:-1]))
    if DENSE_MATMUL == "xla" or dense_matmul_path(DENSE_MATMUL, dispatch.on_hopper(), True, rows) != "kernel":
        return None
    if w_gate_up.ndim != 3 or w_gate_up.shape[1] != 2 or x.dtype != jnp.bfloat16:
        return None
    from pallas_kernels.quantized_matmul import gpu_mosaic

    B, T, D = x.shape
    x2, w2 = x.reshape(B * T, D), w_gate_up.reshape(D, -1)
    if not gpu_mosaic.gated_supports(x2, w2, activation):
        return None
    h = gpu_mosaic.gated_matmul(x2, w2, activation=activation, interpret=DENSE_MATMUL == "interpret")
    return h.reshape(B, T, -1)


def project(spec: str, x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """jnp.einsum(spec, x, w); with `scale` (runtime.quantization), w is a quantized weight:
    converted to x's dtype inside the matmul, the float32 product scaled per output
    channel (scale: w's output axes, in w's order; the output's trailing axes) and
    rounded once to x's dtype. On GPU decode-sized rows may run the Pallas kernel that
    reads the weight in its quantized bytes (QUANTIZED_MATMUL); bf16 weights may run the
    Mosaic GPU kernel (DENSE_MATMUL: the plain form is off by default)."""
    if scale is None:
        return _dense_matmul(spec, x, w)
    return _quantized_matmul(spec, x, w, scale)


def _qkv_weight(wq, wk, wv):
    """[D, K, G + 2, H]: per kv head its G query heads, then k, then v (D leading, like
    gate/up: one GEMV whose output is contiguous)."""
    D, N, H = wq.shape
    K = wk.shape[0]
    q = wq.reshape(D, K, N // K, H)
    return jnp.concatenate([q, wk.transpose(2, 0, 1)[:, :, None], wv.transpose(2, 0, 1)[:, :, None]], axis=2)


def _qkv_bias(bq, bk, bv):
    N, H = bq.shape
    K = bk.shape[0]
    return jnp.concatenate([bq.reshape(K, N // K, H), bk[:, None], bv[:, None]], axis=1)


def _qkv_weight_tpu(wq, wk, wv):
    """[G + 2, K, D, H]: `_qkv_weight` with D next to H and q/k/v outermost, the layout
    XLA's TPU matmuls read (libtpu, v5e: it relaid [D, K, G + 2, H] on every call, and
    [K, G + 2, D, H] on every prefill call)."""
    return _qkv_weight(wq, wk, wv).transpose(2, 1, 0, 3)


def repeat_fused_kv_heads(wqkv, r: int, axes: tuple[str, ...]):
    """A fused q/k/v weight or bias with logical `axes` (QKV_LAYOUTS; the bias: kv_heads,
    qkv, head_dim) with each kv head repeated r times, as sharding.mesh.replicate_kv_heads
    repeats wk and wv: kv head j becomes heads j*r .. j*r + r-1, and the G query heads
    that read it are dealt out to them in order, G / r each."""
    canonical = tuple(a for a in ("embed", "kv_heads", "qkv", "head_dim") if a in axes)  # `_qkv_weight`'s order
    if tuple(axes) != canonical:
        out = repeat_fused_kv_heads(jnp.transpose(wqkv, [axes.index(a) for a in canonical]), r, canonical)
        return jnp.transpose(out, [canonical.index(a) for a in axes])
    kv_axis = axes.index("kv_heads")
    shape = wqkv.shape
    K, J, H = shape[kv_axis: kv_axis + 3]
    G = J - 2
    lead = shape[:kv_axis]
    q = wqkv[..., :G, :].reshape(*lead, K * r, G // r, H)
    k = jnp.repeat(wqkv[..., G:G + 1, :], r, axis=kv_axis)
    v = jnp.repeat(wqkv[..., G + 1:, :], r, axis=kv_axis)
    return jnp.concatenate([q, k, v], axis=kv_axis + 1)


def _gate_up_weight(w_gate, w_up):
    """[D, 2, F]: gate and up side by side per input row."""
    return jnp.stack([w_gate, w_up], axis=1)


def _gate_up_weight_tpu(w_gate, w_up):
    """[2, D, F]: the layout XLA's TPU matmul reads (it relaid [D, 2, F] on every call,
    and tiles of its minor two dims (2, F) pad the 2)."""
    return jnp.stack([w_gate, w_up], axis=0)


# Fused weight layouts by platform (fuse_projections picks one): the einsum of each and
# its logical axes. GPUs (and CPU) read [D, ...] GEMVs whose output is contiguous; XLA's
# TPU matmul wants D second-minor beside the output's minor dim (libtpu compile, v5e,
# 2026-11-29: the GPU layouts cost a copy of the weight per call).
QKV_LAYOUTS = {
    "gpu": (_qkv_weight, "BTD,DKJH->BTKJH", ("embed", "kv_heads", "qkv", "head_dim")),
    "tpu": (_qkv_weight_tpu, "BTD,JKDH->BTKJH", ("qkv", "kv_heads", "embed", "head_dim")),
}
GATE_UP_LAYOUTS = {
    "gpu": (_gate_up_weight, "BTD,DJF->BTJF", ("embed", "gate_up", "ffw")),
    "tpu": (_gate_up_weight_tpu, "BTD,JDF->BTJF", ("gate_up", "embed", "ffw")),
}


def _gate_up_bias(b_gate, b_up):
    return jnp.stack([b_gate, b_up], axis=0)


def _quantize(module, mode: str, weights: dict[str, tuple[str, ...]]) -> None:
    """Replaces each weight NAME of `module` (by the names of its input axes) with its
    quantized form and sets NAME_scale (runtime.quantization.quantize_param); the module
    must not be quantized in another mode."""
    if module.quantization == mode:
        return
    if module.quantization is not None:
        raise ValueError(f"quantize {mode}: the projections are {module.quantization}")
    from runtime.quantization import quantize_param

    for name, in_names in weights.items():
        q, scale = quantize_param(getattr(module, name), in_names, mode)
        setattr(module, name, q)
        setattr(module, f"{name}_scale", scale)
    module.quantization = mode


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs | None):
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.window = cfg.layer_windows[layer]
        self.softcap = cfg.attn_softcap
        self.rope = cfg.layer_rope(layer)
        self.head_dim = H
        self.num_heads = N
        self.wq = param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype)
        # k and v as [K, H, D] (D contiguous): a decode step reads them as row reductions.
        # Stored [D, K, H] like wq, XLA's GPU GEMV wanted them transposed and did that on
        # every call (checkpoint format 1 has them so: checkpoints.orbax_io).
        self.wk = param(rngs, (K, H, D), ("kv_heads", "head_dim", "embed"), dtype)
        self.wv = param(rngs, (K, H, D), ("kv_heads", "head_dim", "embed"), dtype)
        self.wo = param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.bq = param(rngs, (N, H), ("q_heads", "head_dim"), dtype, init="zeros")
            self.bk = param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.bv = param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
        else:
            self.bq = self.bk = self.bv = None
        self.bo = param(rngs, (D,), ("embed",), dtype, init="zeros") if cfg.o_bias else None
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype, rngs=rngs)
            self.q_norm = RMSNorm(H, "head_dim", **norm)
            self.k_norm = RMSNorm(H, "head_dim", **norm)
        else:
            self.q_norm = self.k_norm = None
        # The serving form (`fuse`): q, k and v as one weight, read by one GEMV.
        self.wqkv = self.bqkv = nnx.data(None)
        self.qkv_layout = "gpu"  # QKV_LAYOUTS key of wqkv
        # Weight-only quantization (`quantize`, runtime.quantization): per-channel scales,
        # of the fused weight, or of the three (a quantized checkpoint, before `fuse`).
        self.wqkv_scale = self.wo_scale = self.wq_scale = self.wk_scale = self.wv_scale = nnx.data(None)
        self.quantization = None

    def fuse(self, sharding_of, layout: str = "gpu") -> None:
        """Replaces wq, wk, wv (and their biases) by one weight wqkv, in place: a decode
        step then reads them in one GEMV instead of three. `layout` (QKV_LAYOUTS): [D, K,
        G + 2, H] (`_qkv_weight`), or for TPUs [K, G + 2, D, H]. `sharding_of(axes,
        shape)` places the new weight. Checkpoints keep the three (the converter and
        restore never see this form)."""
        if self.wqkv is not None:
            return
        fn, _, axes = QKV_LAYOUTS[layout]
        self.qkv_layout = layout
        self.wqkv = _fused_param(fn, [self.wq.get_value(), self.wk.get_value(), self.wv.get_value()], axes,
                                 sharding_of)
        if self.wq_scale is not None:  # quantized unfused (a quantized checkpoint): the scales too
            parts = [self.wq_scale, self.wk_scale, self.wv_scale]
            self.wqkv_scale = _fused_scale(fn, [p.get_value() for p in parts],
                                           [w.get_metadata()["logical_axes"] for w in (self.wq, self.wk, self.wv)],
                                           axes, sharding_of)
            self.wq_scale = self.wk_scale = self.wv_scale = None
        if self.bq is not None:
            self.bqkv = _fused_param(_qkv_bias, [self.bq.get_value(), self.bk.get_value(), self.bv.get_value()],
                                     ("kv_heads", "qkv", "head_dim"), sharding_of)
        self.wq = self.wk = self.wv = self.bq = self.bk = self.bv = None

    def quantize(self, mode: str) -> None:
        """Quantizes q/k/v (fused, or the three: a quantized checkpoint's form, which `fuse`
        then fuses with their scales) and the output projection in place
        (runtime.quantization); the same mode again changes nothing."""
        qkv = {"wqkv": ("embed",)} if self.wqkv is not None else {f"w{n}": ("embed",) for n in "qkv"}
        _quantize(self, mode, {**qkv, "wo": ("q_heads", "head_dim")})

    def _project(self, x):
        """q [B, T, N, H], k and v [B, T, K, H] of the normed input x [B, T, D]."""
        if self.wqkv is None:
            scale = lambda s: None if s is None else s[...]  # noqa: E731
            q = project("BTD,DNH->BTNH", x, self.wq[...], scale(self.wq_scale))
            k = project("BTD,KHD->BTKH", x, self.wk[...], scale(self.wk_scale))
            v = project("BTD,KHD->BTKH", x, self.wv[...], scale(self.wv_scale))
            if self.bq is not None:
                q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
            return q, k, v
        qkv = self._qkv(x)
        B, T, K, J, H = qkv.shape
        return qkv[:, :, :, : J - 2].reshape(B, T, K * (J - 2), H), qkv[:, :, :, J - 2], qkv[:, :, :, J - 1]

    def _qkv(self, x):
        """The fused projection's output [B, T, K, G + 2, H] (`_qkv_weight`'s order)."""
        scale = None if self.wqkv_scale is None else self.wqkv_scale[...]
        qkv = project(QKV_LAYOUTS[self.qkv_layout][1], x, self.wqkv[...], scale)  # J = G + 2
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...]
        return qkv

    def _decode_kernel(self, x, k_pages, impl: str):
        """The fused rope + cache-write kernel (pallas_kernels/rope_kv) serves this call:
        a decode step (T == 1) through the GPU kernels, on the fused projection, without
        q/k norms (they sit between the projection and the rotation)."""
        if impl != "pallas" or x.shape[1] != 1 or self.wqkv is None or self.q_norm is not None:
            return None
        if dispatch.engine_kernel_impl() != "gpu":
            return None  # TPU: XLA's fusion of the jnp path (no per-kernel launch cost to save)
        from pallas_kernels.rope_kv import gpu as rope_kv

        if self.qkv_layout != "gpu" or is_quantized(k_pages.dtype):  # it writes float rows
            return None
        _, K, J, H = self.wqkv.shape
        if not rope_kv.supports(jax.ShapeDtypeStruct((x.shape[0], K, J, H), x.dtype), k_pages):
            return None
        return rope_kv

    def __call__(self, x, positions, k_pages, v_pages, page_table, kv_lens, *, impl: str, fresh: bool = False,
                 local: Local | None = None, segments: tuple[Segment, ...] | None = None):
        if segments is not None:
            return self._segments(x, positions, k_pages, v_pages, segments, impl=impl, local=local)
        rope_kv = self._decode_kernel(x, k_pages, impl)
        if rope_kv is not None:
            with jax.named_scope("qkv_rope_kv"):
                # One kernel rotates q and k and writes k and v into their cache rows:
                # the same values as the path below up to one rounding of the rotation
                # (float32 inside the kernel, rounded once; pallas_kernels/rope_kv).
                cos, sin = rope_half_tables(self.rope, self.head_dim, positions[:, 0], x.dtype)
                rows = cache_rows(page_table, positions, kv_lens, k_pages.shape[1])[:, 0]
                q, k_pages, v_pages = rope_kv.rope_kv_write(
                    self._qkv(x)[:, 0], cos, sin, rows, k_pages, v_pages, interpret=dispatch.platform() != "gpu")
                q, k, v = q[:, None], None, None  # decode attention reads k and v from the pages
        else:
            q, k, v = self._qkv_rope(x, positions)
            k_pages, v_pages = write_kv(k_pages, v_pages, k, v, page_table, positions, kv_lens)
        with jax.named_scope("attn"):
            o = attention(
                q, k, v, k_pages, v_pages, page_table, positions, kv_lens,
                scale=self.scale, window=self.window, softcap=self.softcap, impl=impl, fresh=fresh,
            )
            out = self._output(o, local)
        return out, k_pages, v_pages

    def _qkv_rope(self, x, positions):
        """q, k, v of x [B, T, D] at `positions` [B, T]: projected, q/k-normed, rotated."""
        with jax.named_scope("qkv"):
            q, k, v = self._project(x)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            cos, sin = rope_tables(self.rope, self.head_dim, positions, x.dtype)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _output(self, o, local: Local | None):
        """The output projection of the attention output o [B, T, N, H]."""
        wo = self.wo[...]
        out = project("BTNH,NHD->BTD", o, wo, None if self.wo_scale is None else self.wo_scale[...])
        if local is not None:  # per device: the sum over this device's heads only
            out = local.join_sums(out, wo.shape[0], self.num_heads)
        if self.bo is not None:
            out = out + self.bo[...]
        return out

    def _segments(self, x, positions, k_pages, v_pages, segments: tuple[Segment, ...], *, impl: str,
                  local: Local | None):
        """A mixed call: x [1, N, D] holds every segment's tokens on one axis (N = the sum
        of their sizes), so the projections read each weight once for all of them; each
        segment writes its keys and values and attends as a call of its own shape would."""
        q, k, v = self._qkv_rope(x, positions)
        parts, at = [], 0
        for seg in segments:
            parts.append(tuple(a[0, at : at + seg.size].reshape(seg.rows, seg.length, *a.shape[2:]) for a in (q, k, v)))
            at += seg.size
        for seg, (_, ks, vs) in zip(segments, parts):
            k_pages, v_pages = write_kv(k_pages, v_pages, ks, vs, seg.page_table, seg.positions, seg.kv_lens)
        with jax.named_scope("attn"):
            o = jnp.concatenate([
                attention(qs, ks, vs, k_pages, v_pages, seg.page_table, seg.positions, seg.kv_lens,
                          scale=self.scale, window=self.window, softcap=self.softcap, impl=impl,
                          fresh=seg.fresh).reshape(1, seg.size, *qs.shape[2:])
                for seg, (qs, ks, vs) in zip(segments, parts)
            ], axis=1)
            out = self._output(o, local)
        return out, k_pages, v_pages


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs | None):
        D, F = cfg.embed_dim, cfg.ffw_dim
        self.ffw_dim = F
        self.activation = cfg.activation
        self.w_gate = param(rngs, (D, F), ("embed", "ffw"), dtype)
        self.w_up = param(rngs, (D, F), ("embed", "ffw"), dtype)
        self.w_down = param(rngs, (F, D), ("ffw", "embed"), dtype)
        if cfg.mlp_bias:
            self.b_gate = param(rngs, (F,), ("ffw",), dtype, init="zeros")
            self.b_up = param(rngs, (F,), ("ffw",), dtype, init="zeros")
            self.b_down = param(rngs, (D,), ("embed",), dtype, init="zeros")
        else:
            self.b_gate = self.b_up = self.b_down = None
        # The serving form (`fuse`): gate and up as one weight, read by one GEMV.
        self.w_gate_up = self.b_gate_up = nnx.data(None)
        self.gate_up_layout = "gpu"  # GATE_UP_LAYOUTS key of w_gate_up
        # Weight-only quantization (`quantize`, runtime.quantization): per-channel scales,
        # of the fused weight, or of the two (a quantized checkpoint, before `fuse`).
        self.w_gate_up_scale = self.w_down_scale = self.w_gate_scale = self.w_up_scale = nnx.data(None)
        self.quantization = None

    def fuse(self, sharding_of, layout: str = "gpu") -> None:
        """Replaces w_gate and w_up (and their biases) by one weight w_gate_up, in place
        (see Attention.fuse): [D, 2, F], or for TPUs [2, D, F] (GATE_UP_LAYOUTS)."""
        if self.w_gate_up is not None:
            return
        fn, _, axes = GATE_UP_LAYOUTS[layout]
        self.gate_up_layout = layout
        self.w_gate_up = _fused_param(fn, [self.w_gate.get_value(), self.w_up.get_value()], axes, sharding_of)
        if self.w_gate_scale is not None:  # quantized unfused (a quantized checkpoint): the scales too
            self.w_gate_up_scale = _fused_scale(fn, [self.w_gate_scale.get_value(), self.w_up_scale.get_value()],
                                                [("embed", "ffw")] * 2, axes, sharding_of)
            self.w_gate_scale = self.w_up_scale = None
        if self.b_gate is not None:
            self.b_gate_up = _fused_param(_gate_up_bias, [self.b_gate.get_value(), self.b_up.get_value()],
                                          ("gate_up", "ffw"), sharding_of)
        self.w_gate = self.w_up = self.b_gate = self.b_up = None

    def quantize(self, mode: str) -> None:
        """Quantizes gate/up (fused, or the two: see Attention.quantize) and the down
        projection in place (runtime.quantization); the same mode again changes nothing."""
        gate_up = {"w_gate_up": ("embed",)} if self.w_gate_up is not None else {"w_gate": ("embed",),
                                                                                 "w_up": ("embed",)}
        _quantize(self, mode, {**gate_up, "w_down": ("ffw",)})

    def __call__(self, x: jax.Array, local: Local | None = None) -> jax.Array:
        with jax.named_scope("mlp"):
            gated = None  # act(gate) * up
            if self.w_gate_up is None:
                scale = lambda s: None if s is None else s[...]  # noqa: E731
                gate = project("BTD,DF->BTF", x, self.w_gate[...], scale(self.w_gate_scale))
                up = project("BTD,DF->BTF", x, self.w_up[...], scale(self.w_up_scale))
                if self.b_gate is not None:
                    gate, up = gate + self.b_gate[...], up + self.b_up[...]
            else:
                if self.w_gate_up_scale is None and self.b_gate_up is None and self.gate_up_layout == "gpu":
                    gated = _gated_dense(x, self.w_gate_up[...], self.activation)  # the product, in one kernel
                if gated is None:
                    scale = None if self.w_gate_up_scale is None else self.w_gate_up_scale[...]
                    gate_up = project(GATE_UP_LAYOUTS[self.gate_up_layout][1], x, self.w_gate_up[...], scale)
                    if self.b_gate_up is not None:
                        gate_up = gate_up + self.b_gate_up[...]
                    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
            if gated is None:
                if self.activation == "silu":
                    act = jax.nn.silu(gate)
                else:
                    act = jax.nn.gelu(gate, approximate=True)
                gated = act * up
            w_down = self.w_down[...]
            scale = None if self.w_down_scale is None else self.w_down_scale[...]
            out = project("BTF,FD->BTD", gated, w_down, scale)
            if local is not None:  # per device: the sum over this device's ffw rows only
                out = local.join_sums(out, w_down.shape[0], self.ffw_dim)
            if self.b_down is not None:
                out = out + self.b_down[...]
        return out


def embed_scale(cfg: ModelConfig, dtype) -> jax.Array | None:
    """Gemma multiplies embeddings by sqrt(D), rounded to the activation dtype as HF does."""
    return jnp.asarray(np.sqrt(cfg.embed_dim), dtype) if cfg.scale_embeddings else None

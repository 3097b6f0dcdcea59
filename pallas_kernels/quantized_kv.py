"""Quantized KV pages: the cache format the attention kernels and their references read.

A quantized cache (dtype int8 or float8_e4m3fn) stores a layer's K (or V) as
`QuantizedPages`: the values [..., P, S, K, H] in the quantized dtype, each token's row
of a kv head divided by one float32 scale (max |x| over the row / the dtype's largest
value: int8 rounds to the nearest step, fp8 e4m3 to its 3-bit mantissa), and the scales
[..., P, K, S] float32. A row of zeros has scale 1.

Why two arrays with these layouts: every kernel reads whole pages. The values keep the
float cache's [P, S, K, H] layout, so a page is one aligned block (a TPU tile of (K, H)
or (S, H) without padding, 16-byte rows for the Hopper TMA), and a page's scales are one
contiguous [K, S] run (S floats per kv head: a GPU kernel's row of scores). An earlier
format kept each row's scale in 4 more lanes of the row, [P, S, K, H + 4]: a TPU kernel
needs that array in its row-major tiled layout, which pads 132 lanes to 256 (libtpu,
v5e, 2026-11-30: 1.94x the raw bytes, as large as bfloat16), and 132-byte rows are not
16-byte aligned for the TMA. The TPU kernel reads the scales through a per-call gather
into [B, K, tokens] (paged_attention/tpu.py says why), so XLA keeps [P, K, S] in the
compact layout it picks: an engine's decode step compiled for v5e (TP 8, int8 KV) has
arguments equal to the planned bytes and no temporaries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Quantized cache dtypes and the largest value each holds (a row's max |x| maps to it).
QUANTIZED = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_BYTES = 4  # one float32 per token and kv head


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype).name in QUANTIZED


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedPages:
    """One layer's quantized K or V pages: values [..., P, S, K, H] and scales [..., P, K, S]
    float32 (leading axes: a pipeline's stages). `shape`, `dtype` and `ndim` are the
    values', so code that asks a cache layer for its pages' shape reads either format."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return self.values.ndim


def scale_shape(values_shape) -> tuple[int, ...]:
    """[..., P, S, K, H] -> [..., P, K, S]."""
    *lead, P, S, K, _ = values_shape
    return (*lead, P, K, S)


def scale_spec(spec: jax.sharding.PartitionSpec, ndim: int) -> jax.sharding.PartitionSpec:
    """The scales' PartitionSpec from the values' (of `ndim` dims): the same mesh axes on
    pages, page and kv heads; none for head_dim."""
    parts = tuple(spec) + (None,) * (ndim - len(spec))
    *lead, p, s, k, _ = parts
    return jax.sharding.PartitionSpec(*lead, p, k, s)


def scale_sharding(sharding, ndim: int):
    """The scales' sharding from the values' (a NamedSharding: its spec moved with the
    axes; anything else, such as one device, as it is)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, scale_spec(sharding.spec, ndim))
    return sharding


def zeros_pages(shape, dtype, sharding=None):
    """A layer's empty K or V pages of `shape` [..., P, S, K, H]: an array, or
    QuantizedPages (scales 1) for a quantized dtype."""
    dtype = jnp.dtype(dtype)
    if not is_quantized(dtype):
        return jnp.zeros(shape, dtype, device=sharding)
    return QuantizedPages(jnp.zeros(shape, dtype, device=sharding),
                          jnp.ones(scale_shape(shape), jnp.float32, device=scale_sharding(sharding, len(shape))))


def abstract_pages(shape, dtype, sharding=None):
    """zeros_pages as ShapeDtypeStructs (ahead-of-time compilation)."""
    dtype = jnp.dtype(dtype)
    values = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    if not is_quantized(dtype):
        return values
    return QuantizedPages(values, jax.ShapeDtypeStruct(scale_shape(shape), jnp.float32,
                                                       sharding=scale_sharding(sharding, len(shape))))


def bytes_per_row(head_dim: int, dtype) -> int:
    """HBM bytes of one token's row of one kv head (values and, quantized, its scale)."""
    return head_dim * jnp.dtype(dtype).itemsize + (SCALE_BYTES if is_quantized(dtype) else 0)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] in the quantized `dtype`, scales [...] float32)."""
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / QUANTIZED[dtype.name], 1.0)
    y = x / scale[..., None]
    q = jnp.clip(jnp.round(y), -127, 127).astype(dtype) if dtype == jnp.int8 else y.astype(dtype)
    return q, scale


def dequantize(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """values [..., H] times their rows' scales [...] -> [..., H] in `dtype`."""
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def gather_pages(pages, page_table: jax.Array, dtype) -> jax.Array:
    """Each sequence's pages in `dtype`: pages [P, S, K, H] (or QuantizedPages) and
    page_table [B, MP] -> [B, MP, S, K, H]; quantized values dequantized after the gather."""
    if not isinstance(pages, QuantizedPages):
        return pages[page_table].astype(dtype)
    scales = jnp.swapaxes(pages.scales[page_table], -1, -2)  # [B, MP, K, S] -> [B, MP, S, K]
    return dequantize(pages.values[page_table], scales, dtype)


def dequantize_pages(pages, dtype) -> jax.Array:
    """All pages [..., P, S, K, H] in `dtype` (tests and debugging)."""
    if not isinstance(pages, QuantizedPages):
        return pages.astype(dtype)
    return dequantize(pages.values, jnp.swapaxes(pages.scales, -1, -2), dtype)


def write_rows(pages, rows: jax.Array, new: jax.Array):
    """Writes new [N, K, H] into the pages' rows `rows` [N] (page * S + offset; a row
    >= P * S is dropped), quantizing for QuantizedPages. Returns the new pages."""
    P, S, K, H = pages.shape
    if not isinstance(pages, QuantizedPages):
        flat = pages.reshape(P * S, K, H).at[rows].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(P, S, K, H)
    q, scale = quantize(new, pages.dtype)  # [N, K, H], [N, K]
    values = pages.values.reshape(P * S, K, H).at[rows].set(q, mode="drop").reshape(P, S, K, H)
    # Dropped rows (>= P*S) have page >= P: dropped here too.
    scales = pages.scales.at[rows // S, :, rows % S].set(scale, mode="drop")
    return QuantizedPages(values, scales)

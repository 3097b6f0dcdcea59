"""The paged KV cache: device pages per layer (an immutable pytree).

Per layer, K and V are `[num_pages, page_size, kv_heads, head_dim]` ("pages", "page",
"kv_heads", "head_dim"). A sequence owns a list of pages (its row of the page table);
token t of it lives at page `page_table[t // page_size]`, slot `t % page_size`.
Functions that take a `KVCache` and return a new one are meant to run under jit with
the cache donated, so the update happens in place.

Quantized caches (cache dtype int8 or float8_e4m3fn): a layer's K and V are each
`QuantizedPages`, the values [P, S, K, H] in the quantized dtype and a float32 scale per
token and kv head, [P, K, S] (pallas_kernels/quantized_kv.py: the format the kernels read
and why). A page's values and scales share the page id, so prefix-cached pages and
preemption (which move page ids, not data) need nothing more; sharding splits the
scales by the same mesh axes as the values (`map_pages`); readers dequantize after the
gather. Half the bytes of bfloat16 plus 4 per row (3% at H = 128).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Quantized rows (module docstring): the format every attention kernel reads.
from pallas_kernels.quantized_kv import (
    QUANTIZED, QuantizedPages, abstract_pages, bytes_per_row, dequantize, dequantize_pages, gather_pages, is_quantized,
    quantize, write_rows, zeros_pages,
)
from runtime.config import ModelConfig

KV_AXES = ("pages", "page", "kv_heads", "head_dim")
SCALE_AXES = ("pages", "kv_heads", "page")  # QuantizedPages.scales

__all__ = ["QUANTIZED", "KVCache", "QuantizedPages", "abstract_pages", "cache_rows", "dequantize", "dequantize_pages",
           "gather_pages", "is_quantized", "map_pages", "quantize", "write_kv", "zeros_pages"]


def map_pages(f, pages, lead: tuple = ()):
    """f(array, logical axes) over one layer's pages (an array, or QuantizedPages: values
    and scales each with their axes), `lead` axes prepended (a pipeline's stage axis).
    How shardings and specs are made for either format."""
    if isinstance(pages, QuantizedPages):
        return QuantizedPages(f(pages.values, (*lead, *KV_AXES)), f(pages.scales, (*lead, *SCALE_AXES)))
    return f(pages, (*lead, *KV_AXES))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array | QuantizedPages, ...]  # per layer [P, S, K, H]
    v: tuple[jax.Array | QuantizedPages, ...]  # per layer [P, S, K, H]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[-4]  # pipelined caches have a leading stage axis

    @property
    def page_size(self) -> int:
        return self.k[0].shape[-3]

    @classmethod
    def create(
        cls, cfg: ModelConfig, *, num_pages: int, page_size: int, dtype=jnp.bfloat16, sharding=None
    ) -> "KVCache":
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        make = lambda: zeros_pages(shape, dtype, sharding)  # noqa: E731
        return cls(k=tuple(make() for _ in range(cfg.num_layers)), v=tuple(make() for _ in range(cfg.num_layers)))

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * bytes_per_row(cfg.head_dim, dtype)


def cache_rows(page_table: jax.Array, positions: jax.Array, kv_lens: jax.Array, page_size: int) -> jax.Array:
    """The cache row (page * page_size + offset, in the pages flattened to rows) of each
    token at `positions` [B, T]; -1 for padding tokens (positions >= kv_lens [B])."""
    MP = page_table.shape[1]
    page_idx = jnp.clip(positions // page_size, 0, MP - 1)
    page = jnp.take_along_axis(page_table, page_idx, axis=1)  # [B, T]
    return jnp.where(positions < kv_lens[:, None], page * page_size + positions % page_size, -1)


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    kv_lens: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatters new K/V [B, T, K, H] of tokens at `positions` [B, T] into the pages.

    Tokens at positions >= kv_lens are padding: their writes are dropped, so padding
    never lands in a page (not even page 0, which may belong to someone else).
    """
    P, S, _, _ = k_pages.shape
    slot = cache_rows(page_table, positions, kv_lens, S)
    slot = jnp.where(slot >= 0, slot, P * S).reshape(-1)  # P*S is out of range: dropped
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731 -- [B, T, K, H] -> [B*T, K, H]
    return write_rows(k_pages, slot, flat(k_new)), write_rows(v_pages, slot, flat(v_new))

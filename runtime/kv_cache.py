"""The paged KV cache: device pages per layer (an immutable pytree).

Per layer, K and V are `[num_pages, page_size, kv_heads, head_dim]` ("pages", "page",
"kv_heads", "head_dim"). A sequence owns a list of pages (its row of the page table);
token t of it lives at page `page_table[t // page_size]`, slot `t % page_size`.
Functions that take a `KVCache` and return a new one are meant to run under jit with
the cache donated, so the update happens in place.

Quantized caches (cache dtype int8 or float8_e4m3fn): each token's row of a kv head
holds its H values and their float32 scale in 4 more lanes, [P, S, K, H + 4]
(pallas_kernels/quantized_kv.py, the format the kernels read). The scale travels
with its row, so everything that moves rows (the page writes, prefix-cached pages,
preemption, the sharding of pages by kv head, pipeline stages) is unchanged; readers
dequantize (`dequantize_rows`) after the gather. Half the bytes of bfloat16 plus 4 per
row (3% at H = 128).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Quantized rows (module docstring): the format every attention kernel reads.
from pallas_kernels.quantized_kv import (
    QUANTIZED, SCALE_LANES, dequantize_rows, is_quantized, quantize_rows, row_width,
)
from runtime.config import ModelConfig

KV_AXES = ("pages", "page", "kv_heads", "head_dim")

__all__ = ["QUANTIZED", "SCALE_LANES", "KVCache", "cache_rows", "dequantize_rows", "is_quantized", "quantize_rows",
           "row_width", "write_kv"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [P, S, K, H]
    v: tuple[jax.Array, ...]  # per layer [P, S, K, H]

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
        shape = (num_pages, page_size, cfg.num_kv_heads, row_width(cfg.head_dim, dtype))
        make = lambda: jnp.zeros(shape, dtype, device=sharding)  # noqa: E731
        return cls(k=tuple(make() for _ in range(cfg.num_layers)), v=tuple(make() for _ in range(cfg.num_layers)))

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * row_width(cfg.head_dim, dtype) * jnp.dtype(dtype).itemsize


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
    P, S, K, W = k_pages.shape
    slot = cache_rows(page_table, positions, kv_lens, S)
    slot = jnp.where(slot >= 0, slot, P * S).reshape(-1)  # P*S is out of range: dropped

    def rows(x, dtype):  # [B, T, K, H] -> [B*T, K, W] as the pages store them
        x = quantize_rows(x, dtype) if is_quantized(dtype) else x.astype(dtype)
        return x.reshape(-1, K, W)

    k_flat = k_pages.reshape(P * S, K, W).at[slot].set(rows(k_new, k_pages.dtype), mode="drop")
    v_flat = v_pages.reshape(P * S, K, W).at[slot].set(rows(v_new, v_pages.dtype), mode="drop")
    return k_flat.reshape(P, S, K, W), v_flat.reshape(P, S, K, W)

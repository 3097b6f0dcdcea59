"""What model code calls where per-device partial results meet. The model runs either
whole on one device (`local` is None: these are the plain operations) or per device
inside `jax.shard_map` (sharding/tensor_parallel.py) on its shards of the weights and
KV cache, with a `Local` saying over which mesh axis the shards are joined. Model code
names no mesh axis: the axis comes from sharding/rules.py, as for the weights, and
whether a tensor is split is read from its local shape against the model's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def local_page_table(page_table: jax.Array, local_pages: int, data_axis: str | None) -> jax.Array:
    """Per device of a data-parallel group: page ids of this group's rows, which are
    global (group g owns pages [g*n, (g+1)*n)), made local to its n pages. Rows of idle
    slots hold zeros, which fall outside; clipped, so no kernel reads out of bounds
    (their kv length is 0: nothing read there is used)."""
    if data_axis is None:
        return page_table
    offset = jax.lax.axis_index(data_axis) * local_pages
    return jnp.clip(page_table - offset, 0, local_pages - 1)


@dataclasses.dataclass(frozen=True)
class Local:
    """The forward runs per device; heads, ffw and vocabulary are split over `axis`."""

    axis: str

    def join_sums(self, x: jax.Array, local_size: int, full_size: int) -> jax.Array:
        """Sums the partial results of a row-split projection (o over heads, down over
        ffw): one all-reduce per block, as in Megatron. Unsplit: `x` as it is."""
        return jax.lax.psum(x, self.axis) if local_size != full_size else x

    def gather_last(self, x: jax.Array, full_size: int) -> jax.Array:
        """The whole last axis of `x` (logits split by vocabulary) on every device."""
        if x.shape[-1] == full_size:
            return x
        return jax.lax.all_gather(x, self.axis, axis=x.ndim - 1, tiled=True)


def embedding_lookup(table: jax.Array, tokens: jax.Array, vocab_size: int, local: Local | None = None) -> jax.Array:
    """The rows of the embedding table for `tokens` [B, T] -> [B, T, D].

    Per device with the table split by vocabulary (`table` holds rows [i*n, (i+1)*n)),
    each device takes the rows it holds (zeros for the others) and one sum over the
    axis joins them, exact since one device contributes each row (Megatron's
    vocab-parallel embedding). Left to the partitioner, the lookup all-gathered the
    whole table every call (1 GB at Llama-3-8B; runtime/BENCHMARKS.md).
    """
    rows = table.shape[0]
    if local is None or rows == vocab_size:
        return jnp.take(table, tokens, axis=0)
    rel = tokens - jax.lax.axis_index(local.axis) * rows
    mine = (rel >= 0) & (rel < rows)
    found = jnp.take(table, jnp.where(mine, rel, 0), axis=0)  # [B, T, D]
    return jax.lax.psum(jnp.where(mine[..., None], found, jnp.zeros_like(found)), local.axis)

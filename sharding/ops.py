"""Operations whose split over the mesh XLA's partitioner gets wrong, written per device
with shard_map. Model code calls them with the mesh it was given (None: one device) and
names no mesh axis: the axes come from sharding/rules.py, as for the weights."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sharding.rules import DEFAULT_RULES


def embedding_lookup(table: jax.Array, tokens: jax.Array, mesh: Mesh | None,
                     rules: Mapping[str, str | None] = DEFAULT_RULES) -> jax.Array:
    """The rows of `table` [V, D] for `tokens` [B, T] -> [B, T, D].

    With the table split by vocabulary over a mesh axis, each device takes the rows it
    holds (zeros for the others) and one sum over that axis joins them, exact since one
    device contributes each row (Megatron's vocab-parallel embedding). Left to the
    partitioner, the lookup all-gathered the whole table every call (1 GB at
    Llama-3-8B; runtime/BENCHMARKS.md).
    """
    axis = rules.get("vocab")
    if mesh is None or axis not in mesh.shape or mesh.shape[axis] == 1 or table.shape[0] % mesh.shape[axis]:
        return jnp.take(table, tokens, axis=0)
    rows_per_device = table.shape[0] // mesh.shape[axis]

    def local(part, tok):  # part: [V / n, D], this device's rows
        rel = tok - jax.lax.axis_index(axis) * rows_per_device
        mine = (rel >= 0) & (rel < rows_per_device)
        rows = jnp.take(part, jnp.where(mine, rel, 0), axis=0)  # [B, T, D]
        return jax.lax.psum(jnp.where(mine[..., None], rows, jnp.zeros_like(rows)), axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axis, None), PartitionSpec()),
                         out_specs=PartitionSpec(), check_vma=False)(table, tokens)

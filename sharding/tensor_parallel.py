"""The model step per device: tensor parallelism written out with `jax.shard_map`.

Each device runs the model on its shards, as laid out by sharding/rules.py: its query
and kv heads, its ffw columns, its vocabulary rows, its heads of the KV cache. Partial
sums meet in one all-reduce after the o projection and one after the down projection
per block, the embedding lookup in one more, and the logits are gathered over the
vocabulary for sampling (sharding/ops.py). Everything between is local, so the Pallas
attention kernels run unchanged on local heads (XLA cannot partition a custom call:
under GSPMD they would see every head and page on each device), and no layout
decision is left to the partitioner (under GSPMD the reference attention's cache
reads became two transposes, ~23% of a batch-64 step; runtime/BENCHMARKS.md).

kv heads must split evenly: with fewer kv heads than devices the model is given with
its kv heads repeated first (sharding.mesh.replicate_kv_heads).

Data parallelism (the "data" axis) splits the rows of every call and the KV pages into
groups, each a full copy of the tensor-parallel model on its own devices: a group sees
only its rows and its pages (page ids made local by sharding.ops.local_page_table).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from runtime.kv_cache import KVCache, map_pages
from sharding.mesh import tensor_size
from sharding.ops import Local, local_page_table
from sharding.rules import DEFAULT_RULES, logical_to_spec


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(params, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """PartitionSpecs of an nnx.State of Params (concrete or traced) from their logical axes."""

    def one(var):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes", (None,) * value.ndim)
        return logical_to_spec(axes, value.shape, mesh, rules)

    return jax.tree.map(one, params, is_leaf=_is_var)


def cache_specs(cache: KVCache, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> KVCache:
    spec = lambda x, axes: logical_to_spec(axes, x.shape, mesh, rules)  # noqa: E731
    return KVCache(k=tuple(map_pages(spec, x) for x in cache.k), v=tuple(map_pages(spec, x) for x in cache.v))


def data_axis(mesh: Mesh | None, rules: Mapping[str, str | None] = DEFAULT_RULES) -> str | None:
    """The mesh axis that splits rows and pages into data-parallel groups, when it does."""
    axis = rules.get("batch")
    return axis if mesh is not None and axis in mesh.shape and mesh.shape[axis] > 1 else None


def is_sharded(mesh: Mesh | None, rules: Mapping[str, str | None] = DEFAULT_RULES) -> bool:
    """Whether the model step runs per device (`model_step`): split by tensor or data."""
    return tensor_size(mesh, rules) > 1 or data_axis(mesh, rules) is not None


def model_step(graphdef, params, tokens, positions, cache: KVCache, page_table, kv_lens, logits_at, *, mesh: Mesh,
               rules: Mapping[str, str | None] = DEFAULT_RULES, **call):
    """`Transformer.__call__` (its keyword options in `call`) per device over `mesh`:
    float32 logits [B, V] (whole on every device; with data-parallel groups each group's
    rows on its devices) and the cache, still split by kv head (and pages by group).
    Rows of group g are [g*B/D, (g+1)*B/D) and their page ids are in group g's range."""
    axis, data = rules["q_heads"], data_axis(mesh, rules)
    cspecs = cache_specs(cache, mesh, rules)
    rows = PartitionSpec(data)  # each data-parallel group takes its rows (replicated without one)

    def body(params, cache, tokens, positions, page_table, kv_lens, logits_at):
        model = nnx.merge(graphdef, params)
        page_table = local_page_table(page_table, cache.num_pages, data)
        return model(tokens, positions, cache, page_table, kv_lens, logits_at=logits_at, local=Local(axis), **call)

    # check_vma=False: the Pallas kernels inside carry no varying-axis annotations.
    return jax.shard_map(
        body, mesh=mesh, in_specs=(param_specs(params, mesh, rules), cspecs, rows, rows, rows, rows, rows),
        out_specs=(rows, cspecs), check_vma=False,
    )(params, cache, tokens, positions, page_table, kv_lens, logits_at)

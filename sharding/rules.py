"""Logical axis names -> mesh axes: the one place that decides how tensors are split.

Model code tags every weight with logical axes (runtime/models/layers.py); the KV cache
uses runtime.kv_cache.KV_AXES. A rule maps a logical name to a mesh axis name (or
None: replicated). A mesh axis is used at most once per tensor; a logical axis whose
size is not divisible by its mesh axis is replicated instead of failing, and
`check_divisible` reports it for the configurations where that would be a mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Megatron-style tensor parallelism: heads, ffw and vocab split over "tensor"; the
# batch over "data". Pipeline stages own whole layers (sharding/pipeline.py).
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "seq": None,
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "ffw": "tensor",
    "vocab": "tensor",
    "pages": None,
    "page": None,
    "layers": None,
    "stages": "stage",  # stacked per-stage tensors (sharding/pipeline.py)
}


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> PartitionSpec:
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis not in mesh.shape
            or mesh_axis in used
            or size % mesh.shape[mesh_axis]
        ):
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def param_shardings(abstract_state, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """ShapeDtypeStructs with shardings for an abstract nnx.State whose Params carry `logical_axes`."""

    def one(var):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes", (None,) * len(value.shape))
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=named_sharding(axes, value.shape, mesh, rules))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: hasattr(x, "get_metadata"))

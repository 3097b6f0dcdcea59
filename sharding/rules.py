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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Megatron-style tensor parallelism: heads, ffw and vocab split over "tensor"; the
# batch (decode slots, prefill rows) and the KV pages over "data". Pipeline stages own
# whole layers (sharding/pipeline.py).
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "seq": None,
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,  # fused projections (runtime.models.transformer.fuse_projections): q heads of a kv head, k, v
    "ffw": "tensor",
    "gate_up": None,
    "vocab": "tensor",
    "pages": "data",  # each data-parallel group holds its own pages of the KV cache
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


def stage_mesh(mesh: Mesh, stage: int, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Mesh:
    """The devices of one pipeline stage, as a mesh with the same axis names (stage size 1)."""
    index = mesh.axis_names.index(rules["stages"])
    return Mesh(np.take(mesh.devices, [stage], axis=index), mesh.axis_names)


def param_sharding(path: Sequence, axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, num_layers: int,
                   rules: Mapping[str, str | None] = DEFAULT_RULES) -> NamedSharding:
    """Where a parameter at `path` of the model's state lives: split by its logical axes;
    with pipeline stages a layer's weights on its stage's devices only (layer l of L in
    stage l // (L / S)), never on the others', so a model that fits only across stages
    loads (sharding/pipeline.py stacks them per stage)."""
    stage_axis = rules.get("stages")
    stages = mesh.shape[stage_axis] if stage_axis in mesh.shape else 1
    if stages > 1 and len(path) > 1 and path[0] == "layers" and num_layers % stages == 0:
        mesh = stage_mesh(mesh, int(path[1]) // (num_layers // stages), rules)
    return named_sharding(axes, shape, mesh, rules)


def param_shardings(abstract_state, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """ShapeDtypeStructs with shardings (`param_sharding`) for an abstract nnx.State whose
    Params carry `logical_axes`."""
    num_layers = len(abstract_state["layers"]) if "layers" in abstract_state else 0

    def one(path, var):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes", (None,) * len(value.shape))
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        sharding = param_sharding(keys, axes, value.shape, mesh, num_layers, rules)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    return jax.tree.map_with_path(one, abstract_state, is_leaf=lambda x: hasattr(x, "get_metadata"))

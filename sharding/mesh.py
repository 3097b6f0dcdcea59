"""The device mesh: built from the parallel sizes, checked against the model, and the
placement of weights and KV cache on it.

Axes ("stage", "data", "tensor"), in that order: a mesh's last axis varies fastest over
the device list, and jax's mesh utilities order devices so that neighbours on it are
close (one host, one ICI ring), which is where tensor parallelism's per-layer
reductions belong. The axes are Auto (GSPMD): weights and cache carry shardings from
sharding/rules.py and XLA partitions the step functions and inserts the collectives;
model code names no mesh axis.

Tensor parallelism splits query heads, kv heads, the MLP's hidden units and the
vocabulary over "tensor" (Megatron: column-split projections in, row-split out, one
reduction per block). With fewer kv heads than the tensor size (MQA, Llama-3-70B at
TP 16), the kv heads are repeated to the tensor size when the model is placed
(`replicate_kv_heads`): each device then holds the one kv head its query heads read,
and the model is the same function (a GQA model whose repeated kv heads are equal).
The alternative, every kv head on every device, stores tensor / kv_heads times more
KV cache per device than this and reads all of it each step; see `kv_replication`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from runtime.config import ConfigError, ModelConfig
from sharding.rules import DEFAULT_RULES, named_sharding, param_sharding

AXES = ("stage", "data", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Parallel sizes; their product is the number of devices used. `tensor=None` leaves
    the tensor size to start-up (runtime.startup.choose_tensor_size)."""

    tensor: int | None = 1
    pipeline: int = 1
    data: int = 1

    def __post_init__(self):
        for name in ("tensor", "pipeline", "data"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}_parallel_size={getattr(self, name)} must be >= 1")

    @property
    def num_devices(self) -> int:
        if self.tensor is None:
            raise ValueError("the tensor size is not chosen yet (runtime.startup.choose_tensor_size)")
        return self.tensor * self.pipeline * self.data


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_model(cfg: ModelConfig, mesh_config: MeshConfig) -> None:
    """Raises ConfigError, naming the sizes that would work, when the model cannot be
    split `mesh_config.tensor` ways or its layers into `mesh_config.pipeline` stages. kv heads may be fewer than the tensor size (they
    are replicated) but must then divide it."""
    pp = mesh_config.pipeline
    if cfg.num_layers % pp:
        ok = [d for d in _divisors(cfg.num_layers) if d <= 64]
        raise ConfigError(f"num_layers={cfg.num_layers} is not divisible by pipeline_parallel_size={pp}; "
                          f"use pipeline_parallel_size in {{{', '.join(map(str, ok))}}}")
    tp = mesh_config.tensor
    if tp == 1:
        return
    for name, size in (("num_heads", cfg.num_heads), ("ffw_dim", cfg.ffw_dim)):
        if size % tp:
            ok = [d for d in _divisors(size) if d <= 64]
            raise ConfigError(f"{name}={size} is not divisible by tensor_parallel_size={tp}; "
                              f"use tensor_parallel_size in {{{', '.join(map(str, ok))}}}")
    k = cfg.num_kv_heads
    if k % tp and tp % k:
        raise ConfigError(f"num_kv_heads={k} and tensor_parallel_size={tp} do not divide one another; use a "
                          f"tensor size that divides {k} or that {k} divides")


def kv_replication(cfg: ModelConfig, mesh_config: MeshConfig) -> int:
    """How many devices hold each kv head (1: kv heads are split, none is repeated).
    The KV cache of all devices together is this many times that of one device."""
    tp = mesh_config.tensor
    return tp // cfg.num_kv_heads if cfg.num_kv_heads < tp else 1


def expand_kv_heads(cfg: ModelConfig, tensor: int) -> ModelConfig:
    """The config of `cfg` with its kv heads repeated up to `tensor` when there are fewer
    (check_model has ensured they divide it); `cfg` itself otherwise."""
    if cfg.num_kv_heads >= tensor:
        return cfg
    return dataclasses.replace(cfg, num_kv_heads=tensor)


def tensor_size(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """How many ways `mesh` splits heads (1 without a mesh)."""
    axis = rules.get("q_heads")
    return mesh.shape[axis] if mesh is not None and axis in mesh.shape else 1


# The attention parameters with a kv_heads axis: k and v weights, biases and (quantized)
# scales, separate or fused with q.
KV_PARAMS = ("wk", "wv", "bk", "bv", "wk_scale", "wv_scale", "wqkv", "bqkv", "wqkv_scale")


def replicate_kv_heads(model, mesh: Mesh | None, rules=DEFAULT_RULES):
    """`model` with kv heads repeated to the tensor size of `mesh` (`expand_kv_heads`)
    and those weights placed split over it; `model` itself when nothing is repeated.
    kv head j becomes heads j*r .. j*r + r-1 (r = tensor / kv_heads): device i, whose
    query heads are the i-th of `tensor` equal groups, holds head i, a copy of the kv
    head those query heads read. The given model is left as it was."""
    from runtime.models.layers import repeat_fused_kv_heads

    cfg = model.cfg
    new_cfg = expand_kv_heads(cfg, tensor_size(mesh, rules))
    if new_cfg is cfg:
        return model
    r = new_cfg.num_kv_heads // cfg.num_kv_heads

    def repeat(path, var):
        if len(path) < 2 or path[-2] != "attn" or path[-1] not in KV_PARAMS:
            return var
        axes = var.get_metadata()["logical_axes"]
        if path[-1] in ("wqkv", "bqkv", "wqkv_scale"):  # fused (runtime.models.transformer.fuse_projections)
            value = repeat_fused_kv_heads(var.get_value(), r, axes)
        else:
            value = jnp.repeat(var.get_value(), r, axis=axes.index("kv_heads"))
        return var.replace(jax.device_put(value, param_sharding(path, axes, value.shape, mesh, cfg.num_layers, rules)))

    graphdef, state = nnx.split(model)
    flat = [(path, repeat(path, var)) for path, var in nnx.to_flat_state(state)]
    out = nnx.merge(graphdef, nnx.from_flat_state(flat))
    out.cfg = new_cfg
    return out


def make_mesh(mesh_config: MeshConfig, devices=None) -> Mesh:
    """The (stage, data, tensor) mesh over the first `num_devices` devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = mesh_config.num_devices
    if n > len(devices):
        raise ConfigError(f"tensor x pipeline x data = {n} devices, but {len(devices)} are present; "
                          f"use sizes whose product is at most {len(devices)}")
    shape = (mesh_config.pipeline, mesh_config.data, mesh_config.tensor)
    return jax.make_mesh(shape, AXES, devices=devices[:n], axis_types=(AxisType.Auto,) * len(AXES))


def place_model(model, mesh: Mesh, rules=DEFAULT_RULES):
    """A copy of the model with every parameter moved to its sharding on `mesh` (from its
    logical axes); `model` is left as it was. For weights made in memory; checkpoints
    restore straight into shardings (checkpoints.load(mesh=...))."""
    graphdef, state = nnx.split(model)

    def place(path, var):
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes", (None,) * value.ndim)
        sharding = param_sharding(path, axes, value.shape, mesh, model.cfg.num_layers, rules)
        return var.replace(jax.device_put(value, sharding))

    flat = [(path, place(path, var)) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def cache_sharding(cfg: ModelConfig, num_pages: int, page_size: int, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """The KV cache's sharding: split by kv head over "tensor" (for a `cfg` whose kv
    heads were expanded to the tensor size, one head per device)."""
    from runtime.kv_cache import KV_AXES

    return named_sharding(KV_AXES, (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim), mesh, rules)


def bytes_per_device(tree) -> int:
    """Bytes the arrays of `tree` hold on their most loaded device."""
    per: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)



"""Engines over random weights of a preset's shapes (runtime/presets.py), for serving
benchmarks: speed does not depend on weight values. There is no tokenizer, so such a
server takes token ids only and returns no text.

`random_model` (also runtime.bench's): weights made on the device, one small program
per distinct shape.
"""

from __future__ import annotations

import functools

from runtime.config import EngineConfig, ModelConfig

PREFIX = "preset:"


def is_preset(checkpoint: str) -> bool:
    return checkpoint.startswith(PREFIX)


def preset_name(checkpoint: str) -> str:
    return checkpoint[len(PREFIX):]


def random_model(cfg: ModelConfig, dtype: str, mesh=None):
    """The model with random weights made on the device, one small program per shape
    and sharding (one jitted init of a whole 8B model compiles for minutes); with a
    mesh each weight is made in its shards, a layer's on its pipeline stage's devices (a 70B
    model never sits on one device), kv
    heads as many as the tensor size where fewer (sharding.mesh.expand_kv_heads)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from runtime.models.transformer import abstract_model
    from sharding.mesh import expand_kv_heads, tensor_size
    from sharding.rules import param_sharding

    cfg = expand_kv_heads(cfg, tensor_size(mesh))
    graphdef, state = nnx.split(abstract_model(cfg, jnp.dtype(dtype)))

    @functools.cache
    def maker(shape, dtype, sharding, fill):
        if fill is not None:
            return jax.jit(lambda key: jnp.full(shape, fill, dtype), out_shardings=sharding)
        return jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype),
                       out_shardings=sharding)

    flat = nnx.to_flat_state(state)
    for i, (path, var) in enumerate(flat):
        like = var.get_value()
        axes = var.get_metadata().get("logical_axes", (None,) * like.ndim)
        sharding = None if mesh is None else param_sharding(path, axes, like.shape, mesh, cfg.num_layers)
        # Norms: 1 (0 in the 1 + w form) keeps activations sane.
        fill = (0.0 if cfg.norm_plus_one else 1.0) if path[-1] == "scale" else None
        var.set_value(maker(like.shape, like.dtype, sharding, fill)(jax.random.key(i)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_random_engine(checkpoint: str, ecfg: EngineConfig, *, dtype: str = "bfloat16", auto_num_seqs: bool = False,
                       mesh_config=None):
    """`preset:NAME` (or `preset:path/config.json`) -> an Engine over random weights,
    its KV cache (and with `auto_num_seqs` its slots) sized as runtime.startup sizes them,
    on the mesh of `mesh_config`."""
    from runtime.presets import preset_config
    from runtime.startup import devices_phase, enable_compilation_cache, engine_phase, mesh_for, weights_phase

    enable_compilation_cache()
    cfg = preset_config(preset_name(checkpoint))
    devices_phase()
    mesh = mesh_for(cfg, mesh_config, ecfg, dtype)
    with weights_phase("random, ") as out:  # drawn on the devices, not read
        out["model"] = random_model(cfg, dtype, mesh)
    return engine_phase(out["model"], ecfg, auto_num_seqs=auto_num_seqs, mesh=mesh)

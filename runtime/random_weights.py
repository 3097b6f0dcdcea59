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


def random_model(cfg: ModelConfig, dtype: str):
    """The model with random weights made on the device, one small program per shape
    (one jitted init of a whole 8B model compiles for minutes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from runtime.models.transformer import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg, jnp.dtype(dtype)))

    @functools.cache
    def maker(shape, dtype):
        return jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype))

    flat = nnx.to_flat_state(state)
    for i, (path, var) in enumerate(flat):
        like = var.get_value()
        if path[-1] == "scale":  # norms: 1 (0 in the 1 + w form) keeps activations sane
            value = jnp.full(like.shape, 0.0 if cfg.norm_plus_one else 1.0, like.dtype)
        else:
            value = maker(like.shape, like.dtype)(jax.random.key(i))
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_random_engine(checkpoint: str, ecfg: EngineConfig, *, dtype: str = "bfloat16", auto_num_seqs: bool = False):
    """`preset:NAME` (or `preset:path/config.json`) -> an Engine over random weights,
    its KV cache (and with `auto_num_seqs` its slots) sized as runtime.startup sizes them."""
    from runtime.presets import preset_config
    from runtime.startup import build_engine, enable_compilation_cache

    enable_compilation_cache()
    model = random_model(preset_config(preset_name(checkpoint)), dtype)
    return build_engine(model, ecfg, auto_num_seqs=auto_num_seqs)

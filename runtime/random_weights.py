"""Engines over random weights of a preset's shapes (runtime/presets.py), for serving
benchmarks: speed does not depend on weight values. There is no tokenizer, so such a
server takes token ids only and returns no text.

`random_model` (also runtime.bench's): weights made on the device, one small program
per distinct shape.
"""

from __future__ import annotations

import functools
import sys

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


def load_random_engine(checkpoint: str, ecfg: EngineConfig, *, dtype: str = "bfloat16"):
    """`preset:NAME` (or `preset:path/config.json`) -> an Engine over random weights,
    its KV cache sized as runtime.startup sizes it."""
    import jax

    from runtime.engine import Engine
    from runtime.presets import preset_config
    from runtime.startup import enable_compilation_cache, plan_capacity

    enable_compilation_cache()
    cfg = preset_config(preset_name(checkpoint))
    model = random_model(cfg, dtype)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    cap = plan_capacity(cfg, ecfg, param_bytes)
    print(cap.describe(ecfg.max_model_len), file=sys.stderr, flush=True)
    return Engine(model, ecfg, num_pages=cap.num_pages)

"""Weight-only quantization of the serving model's linear layers (--quantization).

Modes:
  int8  symmetric, one float32 scale per output channel: q = round(w / s) in [-127, 127],
        s = c * max|w| / 127 over the channel's inputs, c in CLIP_RATIOS the one with the
        least squared rounding error (TPU v5e/v6e have int8 matrix units; GPUs read half
        the bytes of bf16).
  fp8   float8_e4m3fn with one float32 scale per output channel: q = w / s rounded to e4m3,
        s = max|w| / 448 (e4m3's largest finite value; Hopper reads and multiplies it).

What is quantized: the fused projections of every layer (runtime.models.transformer.
fuse_projections): q/k/v, the attention output, gate/up and down. Embeddings, the output
projection and norms stay in the model's dtype. A projection y = x @ W becomes
y = (x @ q) * s: the weight is converted to the activations' dtype inside the matmul,
the float32 product scaled per output channel and rounded once (runtime.models.layers.
project). A channel of zeros gets scale 1 (its q is 0).

The model is quantized in place, on the devices its weights live on (one jitted function
per weight: sharded weights are quantized shard by shard, the scale's max reduced across
the shards of a split input), after fusing its projections; running it twice changes
nothing. An abstract model (ShapeDtypeStruct leaves: ahead-of-time compiles, capacity
planning) gets the quantized shapes and dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}
_QDTYPE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def qdtype(mode: str):
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}; choose from {', '.join(MODES)}")
    return jnp.dtype(_QDTYPE[mode])


# int8: each channel's scale is the one of these fractions of max|w| / 127 whose rounding
# error (sum of squares over the channel) is least. Clipping a channel's few largest
# values buys a finer step for the rest; RMS-optimal clipping of this kind is what
# llama.cpp's and AWQ's quantizers search for too.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _round(x: jax.Array, mode: str) -> jax.Array:
    if mode == "int8":
        return jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
    return x.astype(qdtype(mode))


def quantize(w: jax.Array, in_axes: tuple[int, ...], mode: str) -> tuple[jax.Array, jax.Array]:
    """(q, scale) of weight w whose input (contracted) axes are `in_axes`: q has w's shape
    in the mode's dtype, scale (float32) w's shape without `in_axes`, one per output channel.
    int8 searches CLIP_RATIOS per channel; fp8 (relative precision: clipping gains
    nothing) scales max|w| to 448."""
    qdtype(mode)
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
    ratios = CLIP_RATIOS if mode == "int8" else (1.0,)
    best_scale = best_err = None
    for r in ratios:
        scale = jnp.where(amax > 0, amax * r / _QMAX[mode], 1.0)
        err = jnp.sum(jnp.square(_round(w32 / scale, mode).astype(jnp.float32) * scale - w32), axis=in_axes,
                      keepdims=True)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = jnp.where(better, scale, best_scale), jnp.minimum(err, best_err)
    return _round(w32 / best_scale, mode), jnp.squeeze(best_scale, axis=in_axes)


def dequantize(q: jax.Array, scale: jax.Array, in_axes: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The weight q and scale stand for (float32, or `dtype`)."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, in_axes)).astype(dtype)


@functools.cache
def _jit_quantize(in_axes: tuple[int, ...], mode: str, q_sharding, s_sharding):
    return jax.jit(functools.partial(quantize, in_axes=in_axes, mode=mode), out_shardings=(q_sharding, s_sharding))


def _scale_sharding(w: jax.Array, in_axes: tuple[int, ...]):
    """Where a weight's scale lives: the weight's devices, split as its output axes are."""
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
            *(s for i, s in enumerate(spec) if i not in in_axes)))
    return sharding


def quantize_param(param: nnx.Param, in_names: tuple[str, ...], mode: str) -> tuple[nnx.Param, nnx.Param]:
    """The quantized weight and its scale as Params with logical axes (the scale's: the
    weight's output axes, in the weight's order), placed where `param` lives."""
    axes = tuple(param.get_metadata().get("logical_axes") or ())
    w = param.get_value()
    if len(axes) != w.ndim or any(n not in axes for n in in_names):
        raise ValueError(f"cannot quantize a weight with logical axes {axes} over {in_names}")
    in_axes = tuple(axes.index(n) for n in in_names)
    out_axes = tuple(a for i, a in enumerate(axes) if i not in in_axes)
    if isinstance(w, jax.ShapeDtypeStruct):
        s_shape = tuple(d for i, d in enumerate(w.shape) if i not in in_axes)
        q = jax.ShapeDtypeStruct(w.shape, qdtype(mode), sharding=w.sharding)
        s = jax.ShapeDtypeStruct(s_shape, jnp.float32, sharding=_scale_sharding(w, in_axes))
    else:
        q, s = _jit_quantize(in_axes, mode, w.sharding, _scale_sharding(w, in_axes))(w)
    return nnx.Param(q, logical_axes=axes), nnx.Param(s, logical_axes=out_axes)


def quantize_model(model, mode: str | None, mesh=None, platform: str | None = None):
    """`model` (a runtime.models.transformer.Transformer) with its projections quantized in
    place (see the module docstring); mode None: unchanged. Returns the model."""
    if mode is None:
        return model
    qdtype(mode)  # a bad mode fails before anything changes
    stored = model.layers[0].attn.quantization if model.layers else None
    if stored not in (None, mode):
        from runtime.config import ConfigError

        raise ConfigError(f"the checkpoint's weights are stored {stored}; they cannot be quantized to {mode}: "
                          f"serve them as {stored} (no --quantization, or --quantization={stored}), or convert "
                          f"the source again with --quantize={mode}")
    from runtime.models.transformer import fuse_projections

    fuse_projections(model, mesh, platform)
    return quantize_layers(model, mode)


def quantize_layers(model, mode: str):
    """`model`'s projections quantized in place in the form they have: fused, or (a
    quantized checkpoint: checkpoints.converter, checkpoints.orbax_io) the checkpoint's
    separate q/k/v and gate/up, which fuse_projections later fuses with their scales.
    Quantizing per output channel, the two orders give the same weights and scales.
    Returns the model."""
    qdtype(mode)
    for block in model.layers:
        block.attn.quantize(mode)
        block.mlp.quantize(mode)
    return model


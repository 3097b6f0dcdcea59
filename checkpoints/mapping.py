"""Hugging Face tensor names -> xlserve parameter paths, and back to a model.

One table per family turns a HF checkpoint tensor into the layout of our weight
declaration (runtime/models/layers.py). GGUF tensors are renamed to HF names first
(checkpoints/gguf.py), so this is the only place that knows our layouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints.errors import CheckpointError
from runtime.config import ModelConfig
from runtime.models.transformer import Transformer, abstract_model

Path = tuple  # ('layers', 3, 'attn', 'wq')
Transform = Callable[[np.ndarray], np.ndarray]

# Prefixes under which the text decoder sits in the HF classes we accept.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


class MappingError(CheckpointError):
    """A checkpoint tensor that does not fit the config (name, shape or a missing tensor)."""


def _linear_in(out_shape: tuple[int, ...]) -> Transform:
    """HF Linear weight [out, in] -> ours [in, *out_shape]."""
    return lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape)


def _linear_out(in_shape: tuple[int, ...]) -> Transform:
    """HF Linear weight [out, in] with `in` = prod(in_shape) -> ours [*in_shape, out]."""
    return lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, w.shape[0])


def _reshape(shape: tuple[int, ...]) -> Transform:
    return lambda w: w.reshape(shape)


_identity: Transform = lambda w: w  # noqa: E731
_transpose: Transform = lambda w: np.ascontiguousarray(w.T)  # noqa: E731  HF [out, in] -> ours [in, out]


def _layer_table(cfg: ModelConfig) -> dict[str, tuple[tuple, Transform]]:
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table = {
        "self_attn.q_proj.weight": (("attn", "wq"), _linear_in((N, H))),
        "self_attn.k_proj.weight": (("attn", "wk"), _reshape((K, H, cfg.embed_dim))),  # [out, in] as is
        "self_attn.v_proj.weight": (("attn", "wv"), _reshape((K, H, cfg.embed_dim))),
        "self_attn.o_proj.weight": (("attn", "wo"), _linear_out((N, H))),
        "mlp.gate_proj.weight": (("mlp", "w_gate"), _transpose),
        "mlp.up_proj.weight": (("mlp", "w_up"), _transpose),
        "mlp.down_proj.weight": (("mlp", "w_down"), _transpose),
        "input_layernorm.weight": (("attn_norm", "scale"), _identity),
    }
    if cfg.qkv_bias:
        table["self_attn.q_proj.bias"] = (("attn", "bq"), _reshape((N, H)))
        table["self_attn.k_proj.bias"] = (("attn", "bk"), _reshape((K, H)))
        table["self_attn.v_proj.bias"] = (("attn", "bv"), _reshape((K, H)))
    if cfg.o_bias:
        table["self_attn.o_proj.bias"] = (("attn", "bo"), _identity)
    if cfg.mlp_bias:
        table["mlp.gate_proj.bias"] = (("mlp", "b_gate"), _identity)
        table["mlp.up_proj.bias"] = (("mlp", "b_up"), _identity)
        table["mlp.down_proj.bias"] = (("mlp", "b_down"), _identity)
    if cfg.qk_norm:
        table["self_attn.q_norm.weight"] = (("attn", "q_norm", "scale"), _identity)
        table["self_attn.k_norm.weight"] = (("attn", "k_norm", "scale"), _identity)
    if cfg.post_norms:  # Gemma: post_attention_layernorm is the post-attention norm
        table["post_attention_layernorm.weight"] = (("post_attn_norm", "scale"), _identity)
        table["pre_feedforward_layernorm.weight"] = (("mlp_norm", "scale"), _identity)
        table["post_feedforward_layernorm.weight"] = (("post_mlp_norm", "scale"), _identity)
    else:  # Llama: post_attention_layernorm is the pre-MLP norm
        table["post_attention_layernorm.weight"] = (("mlp_norm", "scale"), _identity)
    return table


def hf_name_to_path(cfg: ModelConfig, name: str) -> tuple[Path, Transform] | None:
    """Our path and layout transform for a HF tensor name; None for tensors we ignore."""
    if name == "lm_head.weight":
        return (None if cfg.tie_embeddings else (("lm_head",), _transpose))
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        return None  # vision tower, projector, ...
    if name == "embed_tokens.weight":
        return ("embedding",), _identity
    if name == "norm.weight":
        return ("final_norm", "scale"), _identity
    m = _LAYER.fullmatch(name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return None
    entry = _layer_table(cfg).get(rest)
    if entry is None:
        raise MappingError(f"unexpected tensor {name!r} for model_type {cfg.model_type}")
    if layer >= cfg.num_layers:
        raise MappingError(f"tensor {name!r} is for layer {layer}, but num_hidden_layers={cfg.num_layers}")
    return ("layers", layer, *entry[0]), entry[1]


def expected_params(cfg: ModelConfig, dtype=jnp.float32, quantization: str | None = None
                    ) -> dict[Path, jax.ShapeDtypeStruct]:
    """Every parameter path of the model with its shape (derived from the declaration);
    with `quantization`, as a quantized checkpoint stores them (scales included)."""
    state = nnx.state(abstract_model(cfg, dtype, quantization))
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def convert_tensors(
    cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]]
) -> Iterator[tuple[Path, np.ndarray]]:
    """Maps (HF name, array) pairs to (our path, array in our layout), checking shapes."""
    expected = expected_params(cfg)
    seen: set[Path] = set()
    for name, array in tensors:
        entry = hf_name_to_path(cfg, name)
        if entry is None:
            continue
        path, transform = entry
        try:
            out = transform(array)
        except ValueError as e:
            raise MappingError(f"tensor {name!r} of shape {array.shape} does not fit the config: {e}") from None
        want = expected[path].shape
        if out.shape != want:
            raise MappingError(
                f"tensor {name!r} has shape {tuple(array.shape)}, which gives {out.shape}; "
                f"the config expects {want} for {'/'.join(map(str, path))}"
            )
        seen.add(path)
        yield path, out
    missing = sorted("/".join(map(str, p)) for p in set(expected) - seen)
    if missing:
        raise MappingError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")


def model_from_params(cfg: ModelConfig, params: Mapping[Path, np.ndarray | jax.Array], dtype) -> Transformer:
    """Builds the model from a complete {path: array} dict (arrays cast to `dtype`)."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if tuple(path) not in params:
            raise MappingError(f"missing parameter {'/'.join(map(str, path))}")
        var.set_value(jnp.asarray(params[tuple(path)], dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

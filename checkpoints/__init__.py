"""Checkpoints: convert HF / GGUF sources to xlserve checkpoints, and load them.

    cfg, model = checkpoints.load("/ckpt/gemma3-270m", dtype="bfloat16", mesh=mesh)
    checkpoints.convert("model.gguf", "/ckpt/gemma3-270m", "bfloat16")

Note: `import checkpoints.convert` (the CLI module) rebinds the package attribute
`convert` to that module; library code should call `checkpoints.converter.convert`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from jax.sharding import Mesh

from checkpoints import orbax_io
from checkpoints import remote
from checkpoints.converter import CONFIG_FILE, PARAMS_DIR, convert, read_manifest
from checkpoints.errors import CheckpointError
from checkpoints.mapping import expected_params
from runtime.config import ModelConfig
from runtime.models.transformer import Transformer
from runtime.quantization import MODES

__all__ = ["CheckpointError", "convert", "load", "read_config"]


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config of a converted checkpoint (nothing else is read)."""
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; convert the source again") from None
    except (ValueError, TypeError, KeyError) as e:  # JSON, ConfigError, unknown/missing fields
        raise CheckpointError(f"{path} is not a readable model config: {e}") from None


def load(
    directory: str | os.PathLike,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    rules: Mapping[str, str | None] | None = None,
) -> tuple[ModelConfig, Transformer]:
    """Restores a converted checkpoint: its config and the model with its parameters.

    dtype: parameter dtype (None: as stored; a quantized checkpoint's linear weights stay
    quantized, runtime.quantization, and serve in that mode). mesh/rules: shard each parameter by its
    logical axes (sharding.rules); without a mesh parameters land on the first device.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    cfg = read_config(directory)
    stored = manifest.get("params", {})
    version = int(manifest.get("format_version", 1))
    quantization = manifest.get("quantization")
    if quantization is not None and quantization not in MODES:
        raise CheckpointError(f"{directory}: quantization {quantization!r} is not one xlserve reads "
                              f"({', '.join(MODES)}); convert the source again")
    for path, want in expected_params(cfg, quantization=quantization).items():
        got = stored.get(orbax_io.path_key(path))
        shape = want.shape if version >= 2 else orbax_io.legacy_shape(path, want.shape)
        if got is None or tuple(got) != shape:
            raise CheckpointError(
                f"{directory}: parameter {orbax_io.path_key(path)} is stored with shape {got}, "
                f"but {CONFIG_FILE} needs {list(shape)}; convert the source again"
            )
    params = remote.params_location(directory) or directory / PARAMS_DIR  # a bucket's: read from there
    model = orbax_io.restore_model(params, cfg, dtype or manifest["dtype"], mesh=mesh, rules=rules,
                                   format_version=version, quantization=quantization)
    return cfg, model

"""HF directory or GGUF file -> xlserve checkpoint directory, streaming tensor by tensor.

A converted checkpoint directory holds:

    params/              Orbax PyTree checkpoint of the parameters (checkpoints.orbax_io)
    model_config.json    ModelConfig.to_json()
    manifest.json        format version, source, dtype, xlserve version, parameter shapes
    tokenizer files      whatever runtime.tokenizer's `save` writes (absent if the source has none)

Everything is written into a temporary sibling directory that is renamed into place at
the end, so a failed conversion leaves nothing at the output path and never clobbers
an existing checkpoint (unless `overwrite`).

Peak host memory is about one copy of the parameters in the output dtype: each tensor
is cast as it arrives (GGUF tensors are dequantized in row chunks straight into the
output dtype), and Orbax writes the arrays without copying them (orbax_io).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints import hf as hf_io
from checkpoints import orbax_io
from checkpoints.errors import CheckpointError
from checkpoints.mapping import convert_tensors, hf_name_to_path
from runtime.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

FORMAT = "xlserve-checkpoint"
FORMAT_VERSION = 2  # 2: k and v stored [K, H, D] (1: [D, K, H])
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
OUTPUT_DTYPES = ("bfloat16", "float32", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to convert, opened and checked, nothing read beyond its metadata."""

    kind: str  # "hf" or "gguf"
    path: Path
    config: ModelConfig
    # (HF name, array in HF layout and the given dtype), one tensor at a time.
    tensors: Callable[[np.dtype], Iterator[tuple[str, np.ndarray]]]
    # The tokenizer, or None when the source has none (e.g. a directory of bare weights).
    tokenizer: Callable[[], Any]
    # Sampling defaults in generation_config.json names (HF: its generation_config.json;
    # GGUF: general.sampling.*); {} when none.
    generation_config: Callable[[], dict[str, Any]] = dict
    # How the source stores its layers' linear weights (GGUF type names, e.g. "Q8_0");
    # empty for a Hugging Face directory. Decides the default quantization (Q8_0: int8).
    linear_types: frozenset[str] = frozenset()


def _config_from_hf(hf: dict[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def open_source(path: str | os.PathLike) -> Source:
    """Opens a Hugging Face model directory or a .gguf file; fails early on anything broken."""
    path = Path(path)
    if path.is_dir():
        hf = hf_io.read_config(path)
        cfg = _config_from_hf(hf, path)
        # Every header is checked here, before any tensor is read or anything is written.
        stream = hf_io.read_tensors(path, wanted=lambda name: hf_name_to_path(cfg, name) is not None)

        def tensors(dtype):
            for name, array in stream:
                yield name, np.array(array, dtype)  # a copy: the file's pages are not kept

        def tokenizer():
            if not any((path / f).is_file() for f in _TOKENIZER_FILES):
                return None
            from runtime.tokenizer import Tokenizer

            return Tokenizer.from_dir(path)

        def generation_config():
            return _read_json(path / GENERATION_CONFIG)

        return Source("hf", path, cfg, tensors, tokenizer, generation_config)

    if path.is_file():
        # Imported here: the gguf package is needed for .gguf files only, so serving a
        # converted or Hugging Face checkpoint works where it is not installed.
        from checkpoints import gguf as gguf_io

        gf = gguf_io.open_gguf(path)
        hf = gguf_io.hf_config(gf)
        gguf_io.check_tensors(gf)
        cfg = _config_from_hf(hf, path)

        def tokenizer():
            if "tokenizer.ggml.model" not in gf.fields:
                return None
            from runtime.tokenizer import Tokenizer

            return Tokenizer.from_gguf(path)

        return Source("gguf", path, cfg, lambda dtype: gguf_io.read_tensors(gf, hf, dtype), tokenizer,
                      lambda: gguf_io.generation_config(gf), gguf_io.linear_types(gf))

    raise CheckpointError(
        f"{path} does not exist: expected a Hugging Face model directory (config.json + safetensors) or a .gguf file"
    )


GENERATION_CONFIG = "generation_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable as JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _write_sampling_defaults(directory: Path, generation: dict[str, Any]) -> None:
    """Carries the source's sampling defaults into the checkpoint's generation_config.json,
    which serve and generate read (runtime.sampling.read_sampling_defaults)."""
    from runtime.sampling import GENERATION_CONFIG_FIELDS

    sampling = {k: generation[k] for k in GENERATION_CONFIG_FIELDS if generation.get(k) is not None}
    if "do_sample" in generation:  # kept for transformers, which reads it (we do not, as vLLM)
        sampling["do_sample"] = generation["do_sample"]
    if sampling:
        (directory / GENERATION_CONFIG).write_text(json.dumps(sampling, indent=2) + "\n")


def output_dtype(dtype) -> np.dtype:
    """numpy dtype for 'bfloat16' / 'float32' / 'float16' (or the dtype objects)."""
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError:
        dt = None
    if dt is None or dt.name not in OUTPUT_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose from {', '.join(OUTPUT_DTYPES)}")
    return dt


def xlserve_version() -> str:
    try:
        return importlib.metadata.version("xlserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source checkout
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"] + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CheckpointError(f"output {output} exists and is not empty; remove it or pass overwrite (--overwrite)")


def _move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    _check_output(output, overwrite)  # again: something may have appeared meanwhile
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except OSError:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, source: Source, dtype: np.dtype, params: dict,
                   quantization: dict | None = None) -> None:
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xlserve_version": xlserve_version(),
        "source": str(source.path.absolute()),
        "source_kind": source.kind,
        "dtype": dtype.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_params": int(sum(a.size for a in params.values())),
        "tokenizer": (directory / "tokenizer_config.json").is_file(),
        "params": {orbax_io.path_key(p): list(a.shape) for p, a in params.items()},
        **({"quantization": quantization["mode"], "quantization_error": quantization["error"]}
           if quantization else {}),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not an xlserve checkpoint (no {MANIFEST_FILE}); "
            "convert it with: python -m checkpoints.convert --source=PATH --output=DIR"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')} is not "
            f"readable by this xlserve ({FORMAT} up to version {FORMAT_VERSION}); convert the source again"
        )
    return manifest


QUANTIZE_CHOICES = ("auto", "none", "int8", "fp8")


def default_quantization(source: Source) -> str | None:
    """What --quantize=auto stores: int8 for a GGUF whose layers' linear weights are all
    Q8_0 (8-bit already: a bfloat16 checkpoint would double them), else the float dtype."""
    return "int8" if source.linear_types == {"Q8_0"} else None


class _Quantizer:
    """Quantizes a checkpoint's linear weights one at a time as they arrive (per output
    channel, runtime.quantization: the same weights and scales the runtime computes when it
    quantizes at load), and keeps each one's relative error ||w - dequantized|| / ||w||."""

    def __init__(self, cfg: ModelConfig, mode: str):
        from flax import nnx

        from runtime.models.transformer import abstract_model
        from runtime.quantization import quantize_layers

        self.mode = mode
        flat = nnx.to_flat_state(nnx.state(quantize_layers(abstract_model(cfg, np.float32), mode)))
        self.axes = {tuple(p): tuple(v.get_metadata().get("logical_axes") or ()) for p, v in flat}
        self.errors: dict[str, float] = {}

    def scale_path(self, path: tuple) -> tuple | None:
        scale = (*path[:-1], f"{path[-1]}_scale")
        return scale if scale in self.axes else None

    def __call__(self, path: tuple, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from runtime.quantization import dequantize, quantize

        scale_axes = self.axes[self.scale_path(path)]
        in_axes = tuple(i for i, a in enumerate(self.axes[path]) if a not in scale_axes)
        w32 = jnp.asarray(w, jnp.float32)
        q, scale = quantize(w32, in_axes, self.mode)
        err = jnp.linalg.norm(dequantize(q, scale, in_axes) - w32) / jnp.maximum(jnp.linalg.norm(w32), 1e-30)
        self.errors[orbax_io.path_key(path)] = float(err)
        return np.asarray(q), np.asarray(scale)

    def summary(self) -> dict[str, Any]:
        worst = max(self.errors, key=self.errors.get)
        return {"mean": sum(self.errors.values()) / len(self.errors), "max": self.errors[worst], "max_param": worst}


def convert(source: str | os.PathLike, output: str | os.PathLike, dtype="bfloat16", *, overwrite: bool = False,
            quantize: str | None = "auto") -> Path:
    """Converts a HF model directory or .gguf file into an xlserve checkpoint at `output`.

    quantize: "int8" or "fp8" stores the layers' linear weights quantized with per-output-
    channel float32 scales (runtime.quantization; the manifest records the mode and the
    relative error per weight, mean and max); None or "none" stores every weight in `dtype`;
    "auto" (default) picks default_quantization(source). The other parameters (embeddings,
    norms) are stored in `dtype` either way.

    Raises CheckpointError (or ConfigError for a model xlserve cannot run); on any error
    nothing is left at `output` and an existing checkpoint there is untouched.
    """
    dt = output_dtype(dtype)
    if quantize not in (*QUANTIZE_CHOICES, None):
        raise CheckpointError(f"quantize={quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    output = Path(output).absolute()
    _check_output(output, overwrite)
    src = open_source(source)
    mode = default_quantization(src) if quantize == "auto" else None if quantize == "none" else quantize
    quantizer = _Quantizer(src.config, mode) if mode else None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        try:
            tokenizer = src.tokenizer()
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{src.path}: cannot read the tokenizer: {e}") from None
        has_tokenizer = tokenizer is not None
        _write_sampling_defaults(tmp, src.generation_config())
        if has_tokenizer:
            tokenizer.save(tmp)  # adds its token ids to generation_config.json
        del tokenizer  # its memory (a 262k-entry vocabulary) is not needed for the weights
        params = {}
        # Quantized weights are computed from float32 (a GGUF Q8_0 block's values are not
        # all bfloat16 numbers), each as it arrives; the rest is cast to dtype.
        for path, array in convert_tensors(src.config, src.tensors(np.dtype(np.float32) if quantizer else dt)):
            scale_path = quantizer.scale_path(path) if quantizer else None
            if scale_path:
                params[path], params[scale_path] = quantizer(path, array)
            else:
                params[path] = array.astype(dt, copy=False)
        orbax_io.save_params(tmp / PARAMS_DIR, params, axes=orbax_io.param_axes(src.config))
        (tmp / CONFIG_FILE).write_text(src.config.to_json() + "\n")
        write_manifest(tmp, src, dt, params, quantization=quantizer and {"mode": mode, "error": quantizer.summary()})
        del params
        _move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if quantizer:
        e = quantizer.summary()
        log.info("%s: linear weights stored as %s; relative error mean %.4f, max %.4f (%s)", output, mode, e["mean"],
                 e["max"], e["max_param"])
    if not has_tokenizer:  # warned only now: a failed conversion prints its error alone
        log.warning("%s has no tokenizer; the checkpoint at %s has none either", src.path, output)
    return output

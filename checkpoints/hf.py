"""Reads a Hugging Face model directory: config.json plus safetensors weights.

Weights come from `model.safetensors` or from the shards that
`model.safetensors.index.json` names. Every header is parsed and checked against its
file before a tensor is read (so a truncated download fails up front, naming the
file), then tensors are streamed one at a time, each memory-mapped on its own.

We read the safetensors layout ourselves instead of through
`safetensors.safe_open(framework="numpy")`: numpy has no bfloat16, and safe_open
raises "data type 'bfloat16' not understood" for the dtype most checkpoints use.
The format is small: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the end of
the header), then the raw little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Floating dtypes we convert; integer/bool tensors and float8 (which needs scales we do not
# read) are refused when the model needs them, ignored otherwise.
FLOAT_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_OTHER_DTYPES = {
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: `file`, bytes [start, end) from the start of the file."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    end: int


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: expected a Hugging Face model directory (config.json + *.safetensors)")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Hugging Face model directory needs config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory, checked to exist (shards in index order)."""
    model_dir = Path(model_dir)
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))  # unique, in first-use order
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index} is not a safetensors index (expected JSON with a 'weight_map'): {e!r}"
            ) from None
        files = [model_dir / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names {len(missing)} shard(s) that are missing: {', '.join(missing[:3])}; "
                "download the complete checkpoint"
            )
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    hint = (
        f"; found {', '.join(others[:3])}: only safetensors is supported, re-save with "
        "save_pretrained(..., safe_serialization=True)"
        if others
        else ""
    )
    raise CheckpointError(f"{model_dir}: no weights, expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parses and checks one safetensors header against the size of its file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
        itemsize = FLOAT_DTYPES[dtype].itemsize if dtype in FLOAT_DTYPES else _OTHER_DTYPES.get(dtype)
        if itemsize is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown safetensors dtype {dtype!r}")
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes, but {dtype} {list(shape)} needs "
                f"{math.prod(shape) * itemsize}; the file is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size}; download it again"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    return entries


def read_index(model_dir: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, all headers checked."""
    entries: dict[str, TensorEntry] = {}
    for file in weight_files(model_dir):
        for name, entry in read_header(file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is in both {entries[name].file} and {file}")
            entries[name] = entry
    return entries


def iter_tensors(entries: Iterable[TensorEntry]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) per entry: read-only memory maps of one tensor each, so the pages read
    leave the process once the caller drops the array."""
    for e in entries:
        dtype = FLOAT_DTYPES.get(e.dtype)
        if dtype is None:
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r} has dtype {e.dtype}; supported: {', '.join(FLOAT_DTYPES)}"
            )
        if e.end == e.start:  # np.memmap cannot map zero bytes
            yield e.name, np.empty(e.shape, dtype)
            continue
        yield e.name, np.memmap(e.file, dtype=dtype, mode="r", offset=e.start, shape=e.shape)


def read_tensors(
    model_dir: str | os.PathLike, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Streams the (name, array) pairs of a model directory, in file order.

    Every header is read and checked by the call itself; tensors are read as the
    iterator advances. `wanted(name)` filters by name first, so tensors the model
    ignores (a vision tower, an int buffer) are never touched.
    """
    entries = sorted(read_index(model_dir).values(), key=lambda e: (str(e.file), e.start))
    if wanted is not None:
        entries = [e for e in entries if wanted(e.name)]
    return iter_tensors(entries)

"""Orbax storage of model parameters: save host arrays, restore straight into shardings.

On disk a converted checkpoint's `params/` is an Orbax PyTree checkpoint (OCDBT +
zarr, one array per parameter) whose tree is our parameter paths as nested dicts with
string keys: {"layers": {"0": {"attn": {"wq": array}}}}.

Saving writes the caller's numpy arrays without copying them: Orbax's default numpy
handler deep-copies every host array before writing (a guard against concurrent
mutation), which would double the peak host memory of a conversion, so we save through
a handler registry whose numpy handler does not (where the installed Orbax can say so).

Each parameter is stored in chunks split along the axis tensor parallelism splits
(`chunk_shape`: heads, ffw columns, vocabulary rows, into up to MAX_BLOCKS blocks of at
least MIN_CHUNK_BYTES), so a host restoring its shards reads those chunks and not the
whole tensor; Orbax's own chunking (SaveArgs.chunk_byte_size) splits the largest axis
instead, which every tensor-parallel rank would read in full.

Restoring gives each parameter a ShapeDtypeStruct with the sharding that
`sharding.rules.param_shardings` derives from its logical axes, so every device reads
only its own shard, and the dtype cast happens in the read.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from orbax.checkpoint import type_handlers

from checkpoints.errors import CheckpointError
from runtime.config import ModelConfig
from runtime.models.transformer import Transformer, abstract_model
from sharding.rules import DEFAULT_RULES, param_sharding, param_shardings

ParamPath = tuple  # ('layers', 3, 'attn', 'wq')

MAX_BLOCKS = 64  # tensor-parallel sizes up to this read only their own chunks
MIN_CHUNK_BYTES = 1 << 20  # smaller chunks cost more in index and requests than they save


def chunk_shape(shape: tuple[int, ...], axes: tuple[str | None, ...], itemsize: int,
                rules: Mapping[str, str | None] = DEFAULT_RULES) -> tuple[int, ...]:
    """The chunk a parameter of `shape` with logical `axes` is stored in: the first axis
    that `rules` split over "tensor" cut into the most blocks (a power of two dividing it,
    at most MAX_BLOCKS) whose chunks stay at least MIN_CHUNK_BYTES; else the whole shape."""
    for i, name in enumerate(axes):
        if name is None or rules.get(name) != "tensor":
            continue
        blocks = 1
        while (blocks * 2 <= MAX_BLOCKS and shape[i] % (blocks * 2) == 0
               and math.prod(shape) * itemsize // (blocks * 2) >= MIN_CHUNK_BYTES):
            blocks *= 2
        return tuple(d // blocks if j == i else d for j, d in enumerate(shape))
    return tuple(shape)


class _ChunkedNumpyHandler(type_handlers.NumpyHandler):
    """Orbax's numpy handler, writing each array in the chunks `chunks[name]` gives."""

    def __init__(self, chunks: Mapping[str, tuple[int, ...]], **kwargs):
        super().__init__(**kwargs)
        self._chunks = chunks

    async def _open_and_write(self, value, tspec, ts_context):
        chunks = self._chunks.get(str(tspec.get("kvstore", {}).get("path", "")).strip("/"))
        metadata = tspec.get("metadata", {})
        if chunks is not None and "chunks" in metadata:  # zarr (v2): one key per chunk
            tspec = {**tspec, "metadata": {**metadata, "chunks": list(chunks)}}
        return await super()._open_and_write(value, tspec, ts_context)


def path_key(path: ParamPath) -> str:
    """'layers/3/attn/wq': how a parameter path is spelled in manifests and messages."""
    return "/".join(map(str, path))


def _nested(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def _lookup(tree: Mapping[str, Any], path: ParamPath) -> Any:
    for part in path:
        tree = tree[str(part)]
    return tree


def param_axes(cfg: ModelConfig) -> dict[ParamPath, tuple]:
    """{parameter path: logical axes} of the model `cfg` describes."""
    _, state = nnx.split(abstract_model(cfg, np.float32))
    return {tuple(path): var.get_metadata().get("logical_axes", ()) for path, var in nnx.to_flat_state(state)}


def save_params(directory: str | os.PathLike, params: Mapping[ParamPath, np.ndarray],
                axes: Mapping[ParamPath, tuple] | None = None) -> None:
    """Writes {path: host array} as an Orbax checkpoint at `directory` (which must not
    exist), each array chunked along its tensor-parallel axis where `axes` (logical axes
    by path, `param_axes(cfg)`) names one."""
    chunks = {}
    for path, value in params.items():
        if axes is not None and path in axes and len(axes[path]) == value.ndim:
            chunk = chunk_shape(value.shape, axes[path], value.dtype.itemsize)
            if chunk != value.shape:
                chunks[".".join(map(str, path))] = chunk  # the array's key in the checkpoint
    try:
        numpy_handler = _ChunkedNumpyHandler(chunks, deepcopy_host_arrays=False)
    except TypeError:  # older orbax (0.12.4 has no such option) always copies: peak ~2x
        numpy_handler = _ChunkedNumpyHandler(chunks)
    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler), (jax.Array, type_handlers.ArrayHandler())
    )
    # Uncompressed: zstd saves ~8% on weights but Orbax then buffers the whole compressed
    # output in memory before writing it (+60% of the checkpoint size) and saves 3x slower.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(_nested(params)))


# Checkpoint format 1 stored k and v [D, K, H] (like wq); the model now keeps them
# [K, H, D]. Restoring a format-1 checkpoint reads them as stored and transposes.
LEGACY_KV = ("wk", "wv")
LEGACY_KV_AXES = ("embed", "kv_heads", "head_dim")


def is_legacy_kv(path: ParamPath) -> bool:
    return len(path) >= 2 and path[-2] == "attn" and path[-1] in LEGACY_KV


def legacy_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """How format 1 stored a parameter of the current model's `shape`."""
    return (shape[2], shape[0], shape[1]) if is_legacy_kv(path) else tuple(shape)


@functools.lru_cache
def _legacy_kv_transpose(sharding):
    """[D, K, H] -> [K, H, D] placed on `sharding`: one jitted function (one compile) for
    every layer's k and v."""
    return jax.jit(lambda x: jnp.transpose(x, (1, 2, 0)), out_shardings=sharding)


def restore_model(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    dtype,
    *,
    mesh: Mesh | None = None,
    rules: Mapping[str, str | None] | None = None,
    format_version: int = 2,
    quantization: str | None = None,
) -> Transformer:
    """The model with parameters read from `directory`, cast to `dtype`.

    With a mesh, each parameter is sharded by its logical axes under `rules` (default
    sharding.rules.DEFAULT_RULES); without one it lands whole on the first device.
    `format_version` 1: k and v are stored [D, K, H] and transposed after reading.
    `quantization`: the linear weights are stored quantized with their scales (a scale
    that is not finite and positive fails: CheckpointError).
    """
    rules = rules or DEFAULT_RULES
    graphdef, state = nnx.split(abstract_model(cfg, dtype, quantization))
    if mesh is not None:
        targets = nnx.to_flat_state(param_shardings(state, mesh, rules))
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        targets = [
            (path, jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype, sharding=device))
            for path, var in nnx.to_flat_state(state)
        ]
    final = {tuple(p): t for p, t in targets}
    reads = dict(final)
    if format_version < 2:
        for path, t in final.items():
            if is_legacy_kv(path):
                shape = legacy_shape(path, t.shape)
                sharding = t.sharding if mesh is None else param_sharding(
                    [str(k) for k in path], LEGACY_KV_AXES, shape, mesh, cfg.num_layers, rules)
                reads[path] = jax.ShapeDtypeStruct(shape, t.dtype, sharding=sharding)
    target_tree = _nested(reads)
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), target_tree
    )
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                directory if "://" in str(directory) else Path(directory).absolute(),  # a bucket: its epath
                args=ocp.args.PyTreeRestore(item=target_tree, restore_args=restore_args),
            )
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot restore the parameters: {e}") from None
    flat = nnx.to_flat_state(state)
    # Every scale checked on its device, read back once (not a host round trip per scale).
    scales = [tuple(p) for p, _ in flat if p[-1].endswith("_scale")]
    valid = jax.device_get([jnp.all(jnp.isfinite(v) & (v > 0)) for v in (_lookup(restored, p) for p in scales)])
    bad = [path_key(p) for p, ok in zip(scales, valid) if not ok]
    if bad:
        raise CheckpointError(f"{directory}: {bad[0]} holds scales that are not finite and positive (and "
                              f"{len(bad) - 1} more); the checkpoint is corrupt: convert the source again")
    for path, var in flat:
        value = _lookup(restored, tuple(path))
        if reads[tuple(path)] is not final[tuple(path)]:  # format 1's [D, K, H] -> [K, H, D]
            value = _legacy_kv_transpose(final[tuple(path)].sharding)(value)
        var.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

"""Parameters are stored in chunks along their tensor-parallel axis, so a host that
restores its shards reads about its share of the bytes, not every parameter whole.

Measured with the kernel's count of bytes this process read (/proc/self/io rchar,
page-cache hits included), reading each tensor-parallel rank's slices through
TensorStore as Orbax's restore does per shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from checkpoints import orbax_io
from runtime.config import ModelConfig
from sharding.rules import DEFAULT_RULES

ts = pytest.importorskip("tensorstore")
IO = Path("/proc/self/io")
pytestmark = pytest.mark.skipif(not IO.exists(), reason="needs Linux /proc/self/io")

CFG = ModelConfig(family="llama", model_type="llama", vocab_size=2048, embed_dim=128, ffw_dim=512, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=32, layer_windows=(None, None))


def test_chunk_shapes_of_real_llama_weights():
    bf16 = 2
    assert orbax_io.chunk_shape((4096, 32, 128), ("embed", "q_heads", "head_dim"), bf16) == (4096, 1, 128)
    assert orbax_io.chunk_shape((8, 128, 4096), ("kv_heads", "head_dim", "embed"), bf16) == (1, 128, 4096)
    assert orbax_io.chunk_shape((32, 128, 4096), ("q_heads", "head_dim", "embed"), bf16) == (1, 128, 4096)
    assert orbax_io.chunk_shape((4096, 14336), ("embed", "ffw"), bf16) == (4096, 224)  # 64 blocks of 1.75 MiB
    assert orbax_io.chunk_shape((14336, 4096), ("ffw", "embed"), bf16) == (224, 4096)
    assert orbax_io.chunk_shape((128256, 4096), ("vocab", "embed"), bf16) == (2004, 4096)  # 128256 = 2^8 * 501
    assert orbax_io.chunk_shape((4096,), ("embed",), bf16) == (4096,)  # replicated: whole
    # Never below MIN_CHUNK_BYTES: Gemma 3 270M's single kv head, a small bias.
    assert orbax_io.chunk_shape((1, 256, 640), ("kv_heads", "head_dim", "embed"), bf16) == (1, 256, 640)
    assert orbax_io.chunk_shape((14336,), ("ffw",), bf16) == (14336,)
    # An odd split axis is kept whole rather than cut unevenly.
    assert orbax_io.chunk_shape((4096, 4099), ("embed", "vocab"), bf16) == (4096, 4099)


def _rchar() -> int:
    return int(next(line for line in IO.read_text().splitlines() if line.startswith("rchar:")).split()[1])


def _rank_slice(shape, axes, tp: int, rank: int) -> tuple:
    """The index of `rank`'s shard at tensor size `tp` (as sharding.rules.logical_to_spec splits)."""
    for i, name in enumerate(axes):
        if DEFAULT_RULES.get(name) == "tensor" and shape[i] % tp == 0:
            n = shape[i] // tp
            return tuple(slice(rank * n, (rank + 1) * n) if j == i else slice(None) for j in range(len(shape)))
    return tuple(slice(None) for _ in shape)


def _read(directory: Path, params, axes, tp: int, rank: int) -> tuple[int, int]:
    """(bytes read opening the arrays, bytes read then to get `rank`'s slice of every
    parameter), checking the values."""
    # A fresh context (nothing read for an earlier rank is reused) with Orbax's cache of
    # b-tree nodes, opened as Orbax opens an array.
    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
    before = _rchar()
    arrays = {path: ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{directory}",
                                                           "path": ".".join(map(str, path)),
                                                           "cache_pool": "cache_pool#ocdbt"}},
                            context=context).result() for path in params}
    opened = _rchar()
    index = {path: _rank_slice(value.shape, axes[path], tp, rank) for path, value in params.items()}
    got = {path: arrays[path][index[path]].read().result() for path in params}
    read = _rchar() - opened
    for path, value in params.items():  # after measuring: a lazy import here would count
        np.testing.assert_array_equal(got[path], value[index[path]])
    return opened - before, read


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_a_tensor_parallel_rank_reads_its_share(tmp_path, monkeypatch, tp):
    """Past opening the arrays (OCDBT manifest, b-tree nodes, zarr metadata), rank r of TP
    reads its 1/TP of the split parameters and the replicated ones (+1%;
    measured: +116 bytes per array); stored whole (Orbax's default), every rank reads every byte."""
    monkeypatch.setattr(orbax_io, "MIN_CHUNK_BYTES", 16 << 10)
    axes = orbax_io.param_axes(CFG)
    rng = np.random.default_rng(0)
    params = {path: rng.standard_normal(shape, dtype=np.float32) for path, shape in _shapes().items()}
    assert set(params) == set(axes)
    split = sum(v.nbytes for p, v in params.items() if _rank_slice(v.shape, axes[p], tp, 0) != (slice(None),) * v.ndim)
    replicated = sum(v.nbytes for v in params.values()) - split
    assert split > 10 * replicated  # the test means something: most bytes are split

    orbax_io.save_params(tmp_path / "chunked", params, axes=axes)
    orbax_io.save_params(tmp_path / "whole", params)
    for rank in range(tp):
        opening, got = _read(tmp_path / "chunked", params, axes, tp, rank)
        assert got <= 1.01 * (split / tp + replicated), (rank, got, split / tp + replicated, opening)
    _, whole = _read(tmp_path / "whole", params, axes, tp, tp - 1)
    assert whole >= 0.95 * (split + replicated)


def _shapes() -> dict[tuple, tuple[int, ...]]:
    from flax import nnx

    from runtime.models.transformer import abstract_model

    state = nnx.split(abstract_model(CFG, np.float32))[1]
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def test_chunked_parameters_restore_whole_and_sharded(tmp_path, monkeypatch):
    """The chunked arrays restore exactly, whole and split over a mesh."""
    import jax
    from flax import nnx

    from runtime.random_weights import random_model
    from sharding.mesh import MeshConfig, make_mesh

    monkeypatch.setattr(orbax_io, "MIN_CHUNK_BYTES", 0)
    model = random_model(CFG, "float32")
    want = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    orbax_io.save_params(tmp_path / "params", want, axes=orbax_io.param_axes(CFG))
    wq = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path / 'params'}",
                                                "path": "layers.0.attn.wq"}}).result()
    assert wq.chunk_layout.read_chunk.shape == (128, 1, 32)
    restored = orbax_io.restore_model(tmp_path / "params", CFG, "float32")
    for p, v in nnx.to_flat_state(nnx.state(restored)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), want[p], err_msg=orbax_io.path_key(p))
    if len(jax.devices()) >= 2:
        mesh = make_mesh(MeshConfig(tensor=2), devices=jax.devices()[:2])
        sharded = orbax_io.restore_model(tmp_path / "params", CFG, "float32", mesh=mesh)
        for p, v in nnx.to_flat_state(nnx.state(sharded)):
            np.testing.assert_array_equal(np.asarray(v.get_value()), want[p], err_msg=orbax_io.path_key(p))

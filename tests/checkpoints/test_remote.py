"""checkpoints.remote: a converted checkpoint in a bucket: its small files are fetched into
the local cache once (again only when its manifest changes), and its weights are restored
from the bucket itself. The bucket is a local directory here (remote._path maps
gs://bucket onto it); etils' GCS backend and tensorstore's gs driver are not exercised."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

import checkpoints
from checkpoints import aliases, converter, remote
from checkpoints.errors import CheckpointError


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.checkpoints import helpers

    root = tmp_path_factory.mktemp("bucket")
    src = root / "tiny.gguf"
    helpers.write_gguf(helpers.random_hf_model("llama"), src)
    converter.convert(src, root / "models" / "tiny", "float32")
    return root


@pytest.fixture
def gs(bucket, monkeypatch):
    monkeypatch.setattr(remote, "_path", lambda url: epath.Path(url.replace("gs://bucket", str(bucket), 1)))
    return bucket


def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_bucket_checkpoint_is_fetched_once_and_its_weights_read_from_the_bucket(gs, tmp_path, monkeypatch):
    src = gs / "models" / "tiny"
    out = aliases.resolve_checkpoint("gs://bucket/models/tiny/", cache_dir=tmp_path)
    assert out.parent == tmp_path / "remote" and out.name.startswith("tiny-")
    small = {k: v for k, v in _files(src).items() if not k.startswith("params/")}
    assert _files(out) == {**small, "remote.json": (out / "remote.json").read_bytes()}  # no weights copied
    assert json.loads((out / "remote.json").read_text())["params"] == "gs://bucket/models/tiny/params"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no side directory left
    read = []
    monkeypatch.setattr(remote, "_path", lambda url, f=remote._path: read.append(url) or f(url))
    cfg, model = checkpoints.load(out)
    assert read == ["gs://bucket/models/tiny/params"]  # the weights came from the bucket
    _, want = checkpoints.load(src)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(want))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def no_copy(*args):
        raise AssertionError("fetched again")

    monkeypatch.setattr(remote, "_copy", no_copy)
    assert aliases.resolve_checkpoint("gs://bucket/models/tiny", cache_dir=tmp_path) == out


def test_a_reconverted_checkpoint_is_copied_again(gs, tmp_path):
    first = aliases.resolve_checkpoint("gs://bucket/models/tiny", cache_dir=tmp_path)
    manifest = gs / "models" / "tiny" / converter.MANIFEST_FILE
    old = manifest.read_text()
    try:
        manifest.write_text(json.dumps({**json.loads(old), "created": "2099-01-01T00:00:00+0000"}))
        second = aliases.resolve_checkpoint("gs://bucket/models/tiny", cache_dir=tmp_path)
    finally:
        manifest.write_text(old)
    assert second != first and json.loads((second / converter.MANIFEST_FILE).read_text())["created"].startswith("2099")


def test_what_is_not_a_checkpoint_or_cannot_be_read_fails_in_one_line(gs, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"gs://bucket/models is not an xlserve checkpoint \(no manifest.json\)"):
        aliases.resolve_checkpoint("gs://bucket/models", cache_dir=tmp_path)

    broken = gs / "models" / "broken"
    broken.mkdir(exist_ok=True)
    (broken / converter.MANIFEST_FILE).write_text((gs / "models" / "tiny" / converter.MANIFEST_FILE).read_text())
    with pytest.raises(CheckpointError, match=r"gs://bucket/models/broken: no params/ beside its manifest.json"):
        aliases.resolve_checkpoint("gs://bucket/models/broken", cache_dir=tmp_path)

    class Denied:
        def __truediv__(self, name):
            return self

        def read_text(self):
            raise PermissionError("403 Forbidden")

    monkeypatch.setattr(remote, "_path", lambda url: Denied())
    with pytest.raises(CheckpointError, match=r"gs://bucket/x: cannot read it \(PermissionError: 403 Forbidden\)"):
        aliases.resolve_checkpoint("gs://bucket/x", cache_dir=tmp_path)
    assert not (tmp_path / "remote").exists()

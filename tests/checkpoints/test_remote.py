"""checkpoints.remote: a converted checkpoint in a bucket is copied into the local cache
once, and again only when its manifest changes. The bucket is a local directory here
(remote._path maps gs://bucket onto it); etils' GCS backend itself is not exercised."""

from __future__ import annotations

import json

import numpy as np
import pytest
from etils import epath

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


def test_a_bucket_checkpoint_is_copied_once_and_loads(gs, tmp_path, monkeypatch):
    src = gs / "models" / "tiny"
    out = aliases.resolve_checkpoint("gs://bucket/models/tiny/", cache_dir=tmp_path)
    assert out.parent == tmp_path / "remote" and out.name.startswith("tiny-")
    assert _files(out) == _files(src) and "params" in {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no side directory left
    cfg, model = checkpoints.load(out)
    _, want = checkpoints.load(src)
    np.testing.assert_array_equal(np.asarray(model.embedding[...]), np.asarray(want.embedding[...]))

    def no_copy(*args):
        raise AssertionError("copied again")

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

    class Denied:
        def __truediv__(self, name):
            return self

        def read_text(self):
            raise PermissionError("403 Forbidden")

    monkeypatch.setattr(remote, "_path", lambda url: Denied())
    with pytest.raises(CheckpointError, match=r"gs://bucket/x: cannot read it \(PermissionError: 403 Forbidden\)"):
        aliases.resolve_checkpoint("gs://bucket/x", cache_dir=tmp_path)
    assert not (tmp_path / "remote").exists()

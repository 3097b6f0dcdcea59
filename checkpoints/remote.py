"""Converted checkpoints in object storage (gs://, s3://), read through etils.epath.

`fetch(url)` copies a converted checkpoint directory into the local cache once
(`<cache>/remote/<name>-<digest>`, cache as in checkpoints.aliases) and returns that
directory, which loads like any other. The digest covers the URL and the remote
manifest.json, so a checkpoint converted again under the same URL is copied again and
an unchanged one is not. Files are copied on threads, each streamed in blocks (no whole
file in memory), into a side directory renamed into place at the end: a cache entry with
a manifest is a complete copy. gs:// needs etils' GCS backend (`pip install
'etils[epath,epath-gcs]'`, in the `tpu` extra) and the machine's credentials.

Not yet: reading the weights from the bucket straight into their shardings (Orbax can);
a copy costs one pass over local disk, which a TPU VM's boot disk holds for an 8B model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import converter
from checkpoints.errors import CheckpointError

log = logging.getLogger(__name__)

SCHEMES = ("gs://", "s3://")
_BLOCK = 16 << 20


def is_remote(name: str | os.PathLike) -> bool:
    return str(name).startswith(SCHEMES)


def _path(url: str):
    """The epath of `url` (a seam for tests, which map a bucket onto a local directory)."""
    try:
        from etils import epath
    except ImportError:
        raise CheckpointError(f"{url}: remote checkpoints need etils: pip install 'etils[epath,epath-gcs]'") from None
    return epath.Path(url)


def _copy(src, dst: Path) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, _BLOCK)
    return dst.stat().st_size


def fetch(url: str, cache_dir: str | os.PathLike | None = None, *, threads: int = 16) -> Path:
    """The local copy of the converted checkpoint at `url` (see the module docstring);
    CheckpointError if it is not one or cannot be read."""
    from checkpoints.aliases import cache_root

    url = url.rstrip("/")  # one cache entry whichever way the URL is written
    src = _path(url)
    try:
        manifest = (src / converter.MANIFEST_FILE).read_text()
    except FileNotFoundError:
        raise CheckpointError(
            f"{url} is not an xlserve checkpoint (no {converter.MANIFEST_FILE}): convert the model with "
            f"python -m checkpoints.convert --source=PATH --output=DIR, then copy DIR there") from None
    except Exception as e:  # noqa: BLE001 -- a missing backend, credentials, the network: one clear line
        raise CheckpointError(f"{url}: cannot read it ({type(e).__name__}: {e}); gs:// needs "
                              f"pip install 'etils[epath,epath-gcs]' and credentials for the bucket") from None
    digest = hashlib.sha256(f"{url}\n{manifest}".encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "remote" / f"{src.name}-{digest}"
    if (target / converter.MANIFEST_FILE).is_file():
        return target
    files = sorted((d / name for d, _, names in src.walk() for name in names), key=str)  # epath: no "**"
    root = str(src)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            sizes = list(pool.map(lambda p: _copy(p, tmp / str(p)[len(root):].lstrip("/")), files))
        if not (tmp / converter.MANIFEST_FILE).is_file():
            raise CheckpointError(f"{url}: {converter.MANIFEST_FILE} vanished while copying")
        if (target / converter.MANIFEST_FILE).is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy (no manifest) of the same digest
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t
    gb = sum(sizes) / 1e9
    print(f"xlserve: copied {url} ({len(files)} files, {gb:.2f} GB) to {target} in {seconds:.1f} s "
          f"({gb / max(seconds, 1e-9):.2f} GB/s)", file=sys.stderr, flush=True)
    return target

"""Converted checkpoints in object storage (gs://, s3://), read through etils.epath.

`fetch(url)` copies a converted checkpoint's small files (manifest, model config,
tokenizer, generation config) into the local cache once (`<cache>/remote/<name>-<digest>`,
cache as in checkpoints.aliases) with a `remote.json` naming the bucket's params
directory, and returns that directory. `checkpoints.load` then restores the weights from
the bucket itself (`params_location`): Orbax reads each parameter's shards straight into
their shardings, one pass, no local copy. The digest covers the URL and the remote
manifest.json, so a checkpoint converted again under the same URL is fetched again and an
unchanged one is not. The local files are written into a side directory renamed into place:
a cache entry with a manifest is complete. gs:// needs etils' GCS backend (`pip install
'etils[epath,epath-gcs]'`, in the `tpu` extra) and the machine's credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkpoints import converter
from checkpoints.errors import CheckpointError

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


def _copy(src, dst: Path) -> None:
    with src.open("rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, _BLOCK)


REMOTE_FILE = "remote.json"


def params_location(directory: str | os.PathLike):
    """The params directory of a checkpoint `fetch` made local: the bucket's (an epath), or
    None for any other directory, whose params are its own."""
    marker = Path(directory) / REMOTE_FILE
    if not marker.is_file():
        return None
    return _path(json.loads(marker.read_text())["params"])


def fetch(url: str, cache_dir: str | os.PathLike | None = None, *, threads: int = 16) -> Path:
    """The local directory standing for the converted checkpoint at `url` (see the module
    docstring); CheckpointError if it is not one or cannot be read."""
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
    if not (src / converter.PARAMS_DIR).is_dir():
        raise CheckpointError(f"{url}: no {converter.PARAMS_DIR}/ beside its {converter.MANIFEST_FILE}; "
                              "copy the whole converted directory there")
    files = [p for p in src.iterdir() if p.name != converter.PARAMS_DIR and not p.is_dir()]
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            list(pool.map(lambda p: _copy(p, tmp / p.name), files))
        if not (tmp / converter.MANIFEST_FILE).is_file():
            raise CheckpointError(f"{url}: {converter.MANIFEST_FILE} vanished while copying")
        (tmp / REMOTE_FILE).write_text(json.dumps({"url": url, "params": f"{url}/{converter.PARAMS_DIR}"}) + "\n")
        if (target / converter.MANIFEST_FILE).is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)  # an incomplete entry (no manifest) of the same digest
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

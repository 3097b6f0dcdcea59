"""Converts a Hugging Face model directory or a .gguf file into an xlserve checkpoint.

    python -m checkpoints.convert --source=PATH --output=DIR [--dtype=bfloat16] [--quantize=auto] [--overwrite]

Errors print one line on stderr and exit with status 2; nothing is left at DIR.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from checkpoints import converter
from checkpoints.errors import CheckpointError
from runtime.config import ConfigError

_SOURCE = flags.DEFINE_string("source", None, "Hugging Face model directory or .gguf file.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to create (must not exist or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", converter.OUTPUT_DTYPES, "Parameter dtype to store.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output directory.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "auto", converter.QUANTIZE_CHOICES,
    "Store the layers' linear weights quantized with a float32 scale per output channel: int8, or fp8 "
    "(float8 e4m3); none: in --dtype. auto: int8 for a GGUF whose linear weights are Q8_0, else none. "
    "Embeddings and norms are stored in --dtype either way.")


def _fail(message: str) -> int:
    print(f"convert: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    flags.FLAGS.unparse_flags()  # main() may run more than once in a process (tests)
    try:
        extra = flags.FLAGS(argv)
    except flags.Error as e:
        return _fail(e)
    if len(extra) > 1:
        return _fail(f"unexpected arguments {extra[1:]}; use --source=PATH --output=DIR")
    if not _SOURCE.value or not _OUTPUT.value:
        return _fail("--source and --output are required")
    start = time.perf_counter()
    try:
        out = converter.convert(_SOURCE.value, _OUTPUT.value, _DTYPE.value, overwrite=_OVERWRITE.value,
                                quantize=_QUANTIZE.value)
    except (CheckpointError, ConfigError, OSError) as e:
        return _fail(e)
    manifest = converter.read_manifest(out)
    stored = _DTYPE.value
    if "quantization" in manifest:
        e = manifest["quantization_error"]
        stored = (f"linear weights {manifest['quantization']} (relative error mean {e['mean']:.4f}, max {e['max']:.4f} "
                  f"in {e['max_param']}), the rest {_DTYPE.value}")
    print(f"wrote {out} ({stored}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

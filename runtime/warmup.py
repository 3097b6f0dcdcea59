"""python -m runtime.warmup --checkpoint=DIR|ALIAS [engine flags] [--list]

Compiles the engine's whole bucket manifest into the persistent compilation cache
($XLSERVE_COMPILE_CACHE or ~/.cache/xlserve/jax), so that a server or generate run
with the same flags starts without compiling. --list prints the manifest and exits.
Prints one JSON line: the manifest, backend compilations and seconds.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from runtime import flags as xflags
from runtime.config import ConfigError

flags.DEFINE_bool("list", False, "Print the bucket manifest and exit without compiling.")
xflags.define_engine_flags()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint:
        xflags.usage_error("--checkpoint is required (a directory or an alias such as gemma3-270m)")
    try:
        ecfg = xflags.engine_config_from_flags()
        mesh_config = xflags.mesh_config_from_flags()
    except ConfigError as e:
        xflags.usage_error(str(e))
    if FLAGS.list:
        from runtime.engine import bucket_manifest

        manifest = bucket_manifest(ecfg)
        if xflags.auto_num_seqs():  # the decode batch is chosen from the device's memory at start-up
            manifest["decode"] = "auto: pass --max_num_seqs to list it"
        print(json.dumps({"manifest": manifest}))
        return

    from checkpoints.errors import CheckpointError
    from runtime.startup import CapacityError, load_engine

    try:
        engine, _ = load_engine(FLAGS.checkpoint, ecfg, dtype=FLAGS.dtype, auto_num_seqs=xflags.auto_num_seqs(),
                                mesh_config=mesh_config)
    except (CheckpointError, CapacityError, ConfigError) as e:
        xflags.usage_error(str(e))
    t = time.perf_counter()
    compiled = engine.warmup()
    print(json.dumps({"manifest": engine.manifest(), "backend_compilations": compiled,
                      "seconds": round(time.perf_counter() - t, 2)}))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=xflags.parse_flags)

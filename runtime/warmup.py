"""python -m runtime.warmup --checkpoint=DIR|ALIAS [engine flags] [--list]

Compiles the engine's whole bucket manifest into the persistent compilation cache
($XLSERVE_COMPILE_CACHE or ~/.cache/xlserve/jax), and where the executable cache is on
(--executable_cache, as serve's) saves the executables there too, so that a server or
generate run with the same flags starts without compiling (a server with the executable
cache, without tracing either). --list prints the manifest and exits.
Prints one JSON line: the manifest, backend compilations and seconds.

--target_topology=v5e:2x4 (any libtpu topology name) compiles the same manifest on this
machine, CPU only, for that TPU slice: the model's config is read, no weights. Progress
goes to stderr ("[n/m] kind shape: seconds"); the JSON line adds a memory report per chip
(weights, KV cache, the largest step's temporaries, against the chip's HBM), and a plan
that does not fit fails with the numbers (exit 2). --aot_dir=DIR also writes each
serialized executable and a manifest.json keyed by the jax/jaxlib/libtpu versions, the
devices (platform, kind, count), the mesh, the model, the engine config and the KV cache
size (runtime.aot.executable_key). Without --target_topology, --aot_dir writes this
machine's executables (every program the engine runs). `runtime.serve --aot_dir=DIR`
loads them where the key matches, and compiles (saying why) where it does not. That a
real TPU loads executables compiled here is not yet confirmed: no TPU has run one.
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
flags.DEFINE_string("target_topology", None, "Compile for this TPU topology (e.g. v5e:2x4, v6e:2x4) on this machine, "
                    "without a TPU: reads the model's config, not its weights.")
flags.DEFINE_string("aot_dir", None, "With --target_topology: write the serialized executables and manifest.json here.")
xflags.define_engine_flags()
xflags.define_startup_flags()
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
    xflags.check_startup_flags()
    if FLAGS.target_topology and not FLAGS.list:
        print(json.dumps(warm_topology(ecfg, mesh_config)))
        sys.stdout.flush()
        return
    if FLAGS.list:
        from runtime.engine import bucket_manifest

        manifest = bucket_manifest(ecfg)
        if xflags.auto_num_seqs():  # the decode batch is chosen from the device's memory at start-up
            manifest["decode"] = manifest["mixed"] = "auto: pass --max_num_seqs to list it"
        print(json.dumps({"manifest": manifest}))
        return

    from checkpoints.errors import CheckpointError
    from runtime.random_weights import is_preset, load_random_engine
    from runtime.startup import CapacityError, load_engine

    try:
        if is_preset(FLAGS.checkpoint):
            engine = load_random_engine(FLAGS.checkpoint, ecfg, dtype=FLAGS.dtype,
                                        auto_num_seqs=xflags.auto_num_seqs(), mesh_config=mesh_config)
        else:
            engine, _ = load_engine(FLAGS.checkpoint, ecfg, dtype=FLAGS.dtype,
                                    auto_num_seqs=xflags.auto_num_seqs(), mesh_config=mesh_config)
    except (CheckpointError, CapacityError, ConfigError) as e:
        xflags.usage_error(str(e))
    from runtime.engine import compile_counter

    t, before = time.perf_counter(), compile_counter.count
    aot_info = {}
    if FLAGS.aot_dir:  # this machine's executables, for runtime.serve --aot_dir on the same kind of machine
        import jax

        from runtime import aot

        threads = FLAGS.compile_threads or aot.default_compile_threads(jax.devices()[0].platform)
        # fresh: not from the persistent cache (compile_programs says why)
        compiled = aot.compile_programs(engine.programs(), threads, fresh=True)
        engine.use_executables(compiled)
        steps = [(kind, shape, c) for (kind, shape), c in compiled.items()]
        key = aot.executable_key(engine.cfg, engine.ecfg, engine.mesh, jax.devices(), FLAGS.dtype, engine.num_pages)
        written, skipped = aot.save_executables(FLAGS.aot_dir, steps, key)
        aot_info = dict(aot_dir=FLAGS.aot_dir, executables=f"{written} of {len(steps)}")
        for s in skipped:
            print(f"not serialized (serve compiles it): {s['kind']} {s['shape']}: {s['error']}", file=sys.stderr)
    else:  # the programs into the persistent cache and, where on, the executable cache serve reads
        from runtime import aot

        aot.prepare_programs(engine, FLAGS.dtype, aot_dir=None, executable_cache=FLAGS.executable_cache,
                             compile_threads=FLAGS.compile_threads)
    engine.warmup()  # the programs just compiled (or loaded), none again
    result = {"manifest": engine.manifest(), "backend_compilations": compile_counter.count - before,
              "seconds": round(time.perf_counter() - t, 2), **aot_info}
    print(json.dumps(result))
    sys.stdout.flush()


def warm_topology(ecfg, mesh_config) -> dict:
    """Compiles the manifest for --target_topology (see the module docstring)."""
    import dataclasses

    import jax

    import checkpoints
    from checkpoints.aliases import resolve_checkpoint
    from checkpoints.errors import CheckpointError
    from runtime import aot
    from runtime.startup import CapacityError, auto_max_num_seqs
    from sharding.mesh import MeshConfig, check_model, make_mesh

    from runtime import random_weights
    from runtime.presets import preset_config

    try:
        if random_weights.is_preset(FLAGS.checkpoint):  # random weights of a preset's shapes
            cfg = preset_config(random_weights.preset_name(FLAGS.checkpoint))
        else:
            cfg = checkpoints.read_config(resolve_checkpoint(FLAGS.checkpoint, dtype=FLAGS.dtype))
    except (CheckpointError, ValueError) as e:
        xflags.usage_error(str(e))
    try:
        devices = aot.topology_devices(FLAGS.target_topology)
    except Exception as e:  # noqa: BLE001 -- libtpu's message names what it knows
        xflags.usage_error(f"--target_topology={FLAGS.target_topology}: {e}")
    hbm = aot.hbm_bytes(devices[0])
    # One process drives every chip of the slice: tensor parallelism over all of them unless given.
    mesh_config = MeshConfig(tensor=mesh_config.tensor or len(devices) // (mesh_config.pipeline * mesh_config.data),
                             pipeline=mesh_config.pipeline, data=mesh_config.data)
    try:
        check_model(cfg, mesh_config)
        mesh = make_mesh(mesh_config, devices=devices)
        if xflags.auto_num_seqs():  # as serve would choose them on these chips
            expanded, _, params = aot.abstract_params(cfg, mesh, FLAGS.dtype, ecfg.quantization)
            n, why = auto_max_num_seqs(expanded, ecfg, aot.abstract_bytes_per_device(params),
                                       kv_shards=aot.cache_kv_shards(expanded, ecfg, mesh), limit_bytes=hbm)
            print(f"max_num_seqs={n} ({why})", file=sys.stderr, flush=True)
            ecfg = dataclasses.replace(ecfg, max_num_seqs=n)
        engine = aot.abstract_engine(cfg, ecfg, mesh, dtype=FLAGS.dtype, limit_bytes=hbm)
    except (CapacityError, ConfigError, NotImplementedError) as e:
        xflags.usage_error(f"{FLAGS.target_topology} ({len(devices)} x {devices[0].device_kind}, "
                           f"{hbm / 2**30:.1f} GiB each): {e}")
    manifest = engine.manifest()
    entries = [(kind, tuple(shape)) for kind, shapes in manifest.items() for shape in shapes] + [(k, ()) for k in aot.SLOT_PROGRAMS]
    t0 = time.perf_counter()
    steps = []
    for i, (kind, shape) in enumerate(entries, 1):
        try:
            step = aot.compile_step(engine, kind, shape)
        except jax.errors.JaxRuntimeError as e:  # libtpu's own memory check
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            xflags.usage_error(f"{kind} {list(shape)} does not fit a {devices[0].device_kind} chip "
                               f"({hbm / 2**30:.2f} GiB): {str(e).splitlines()[0]}")
        steps.append(step)
        print(f"[{i}/{len(entries)}] {kind} {list(shape)}: {step.lower_s + step.compile_s:.1f} s", file=sys.stderr,
              flush=True)
    temp = max(s.memory.temp for s in steps)
    memory = dict(hbm=hbm, weights=engine.param_bytes_per_device, kv_cache=engine.cache_bytes_per_device, temp=temp)
    total = memory["weights"] + memory["kv_cache"] + temp
    if total > hbm:
        xflags.usage_error(f"does not fit a {devices[0].device_kind} chip: weights {memory['weights'] / 2**30:.2f} GiB "
                           f"+ KV cache {memory['kv_cache'] / 2**30:.2f} GiB + temporaries {temp / 2**30:.2f} GiB "
                           f"> HBM {hbm / 2**30:.2f} GiB")
    key = aot.executable_key(engine.cfg, engine.ecfg, mesh, devices, FLAGS.dtype, engine.num_pages)
    if FLAGS.aot_dir:
        aot.save_executables(FLAGS.aot_dir, [(s.kind, s.shape, s.compiled) for s in steps], key,
                             topology=FLAGS.target_topology, memory=memory)
    return dict(manifest=manifest, topology=FLAGS.target_topology, compiled=f"{len(steps)} of {len(entries)}",
                seconds=round(time.perf_counter() - t0, 2), memory_per_chip=memory, key=key)


if __name__ == "__main__":
    app.run(main, flags_parser=xflags.parse_flags)

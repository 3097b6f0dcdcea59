"""Ahead-of-time compilation of the engine's steps, for devices this process may not have.

The steps are the engine's own (runtime.engine.build_steps), lowered on abstract
arguments: ShapeDtypeStructs carrying the shardings the engine's arrays would have on
the mesh (parameters from their logical axes, kv heads repeated to the tensor size
where fewer, the KV cache split by kv head, the decode slots replicated). Nothing is
allocated, so the mesh may be made of compile-only devices: a TPU topology described
by libtpu on a CPU host (`topology_devices("v5e:2x4")`), and the real TPU compiler
builds the executables. Uses: checking that a model fits a chip with the KV cache the
server would plan for it (`compiled.memory_analysis()` is per chip), and compiling
for hardware we do not have (compile-cache warm-up).

The per-call inputs (tokens, page tables, sampling rows) are given without a sharding,
as the engine passes them: uncommitted host arrays. On a CPU mesh the programs lowered
here are the ones a real Engine lowers, text for text (tests/sharding/test_tpu_compile.py).
Tensor parallelism only; pipeline stages and data-parallel groups are not supported
here yet.

    mesh = make_mesh(MeshConfig(tensor=8), devices=topology_devices("v5e:2x4"))
    engine = abstract_engine(preset_config("llama3.1-8b"), ecfg, mesh)  # KV cache planned for 16 GiB
    for step in compile_manifest(engine):
        print(step.kind, step.shape, step.memory)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels import dispatch
from runtime.config import HOST_ONLY_FIELDS, EngineConfig, ModelConfig
from runtime.engine import (
    BACKGROUND_THREADS, DecodeIO, DecodeSlots, Steps, bucket_manifest, build_steps, mesh_engine_config, pack_prefill, scratch_prefill,
)
from runtime.kv_cache import KVCache, abstract_pages
from runtime.models.transformer import abstract_model, fuse_projections
from runtime.quantization import quantize_model
from runtime.startup import Capacity, cache_kv_shards, plan_capacity
from sharding import pipeline
from sharding.mesh import cache_sharding, expand_kv_heads, tensor_size
from sharding.rules import param_shardings

log = logging.getLogger(__name__)

GiB = 1 << 30

# Memory per chip by device_kind; compile-only devices cannot report it (memory_stats
# works only on addressable devices); other chips: pass limit_bytes.
HBM_BYTES = {
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}


def topology_devices(topology: str) -> list:
    """Compile-only devices of a TPU topology ("v5e:2x4", "v6e:2x4", "v5e:4x4", ...),
    described by libtpu; no TPU needed. libtpu is loaded into this process: callers that
    must keep a plain CPU process (tests) run this in a subprocess. Slices smaller than
    libtpu's default host (2x2 chips: v5e:1x1, v6e:1x1) are one host of their own size."""
    # Compile-only use: other processes may hold libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {}
    try:
        dims = [int(d) for d in topology.split(":", 1)[1].split("x")]
    except (IndexError, ValueError):
        dims = []
    if dims and math.prod(dims) < 4:
        kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)


def hbm_bytes(device) -> int:
    """A TPU chip's memory, by its device_kind (HBM_BYTES)."""
    try:
        return HBM_BYTES[device.device_kind]
    except KeyError:
        raise ValueError(f"memory of {device.device_kind!r} is not known (known: {', '.join(HBM_BYTES)}); "
                         "pass limit_bytes") from None


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Bytes per chip of one compiled step (from `Compiled.memory_analysis()`)."""

    argument: int  # inputs: weights, KV cache, slots, the call's batch
    output: int
    alias: int  # outputs that reuse donated inputs (the cache and slots, updated in place)
    temp: int  # activations and scratch
    generated_code: int

    @classmethod
    def of(cls, compiled) -> "MemoryStats":
        m = compiled.memory_analysis()
        return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                   temp=m.temp_size_in_bytes, generated_code=m.generated_code_size_in_bytes)

    @property
    def peak(self) -> int:
        """Live bytes at most: arguments, temporaries, and the outputs not written in place."""
        return self.argument + self.temp + self.output - self.alias


@dataclasses.dataclass(frozen=True)
class AbstractEngine:
    """An Engine's state as ShapeDtypeStructs with shardings, and its jitted steps."""

    cfg: ModelConfig  # kv heads expanded to the tensor size where fewer
    ecfg: EngineConfig
    mesh: Mesh
    num_pages: int
    capacity: Capacity | None  # the planned KV cache, when abstract_engine planned it
    graphdef: object
    params: object  # nnx.State of Variables holding ShapeDtypeStructs
    cache: KVCache
    slots: DecodeSlots
    steps: Steps
    platform: str  # what the steps are traced for (the mesh's devices)

    def manifest(self) -> dict[str, list[tuple]]:
        with dispatch.target_platform(self.platform):
            return bucket_manifest(self.ecfg)

    @property
    def param_bytes_per_device(self) -> int:
        return abstract_bytes_per_device(self.params)

    @property
    def cache_bytes_per_device(self) -> int:
        return abstract_bytes_per_device(self.cache)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    kind: str  # "prefill" | "decode" | "mixed" | one of SLOT_PROGRAMS
    shape: tuple  # the manifest entry: (batch, length[, "fresh"]) | (slots, mode) | (slots, batch, length[, "fresh"]) | ()
    compiled: jax.stages.Compiled
    memory: MemoryStats
    lower_s: float
    compile_s: float


def abstract_bytes_per_device(tree) -> int:
    """Bytes the ShapeDtypeStructs of `tree` take on one device of their shardings
    (shardings from sharding/rules.py split evenly: every device holds the same)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_params(cfg: ModelConfig, mesh: Mesh, dtype="bfloat16", quantization: str | None = None):
    """(cfg, graphdef, params): the model with ShapeDtypeStructs sharded on `mesh` in
    place of weights, its kv heads expanded to the tensor size where fewer (as
    sharding.mesh.replicate_kv_heads does to real weights; `cfg` says so), its
    projections quantized in `quantization`'s mode (runtime.quantization) if given."""
    cfg = expand_kv_heads(cfg, tensor_size(mesh))
    # As Engine holds it (the fused layout of the mesh's platform, quantized as it says).
    platform = mesh.devices.flat[0].platform
    model = fuse_projections(abstract_model(cfg, jnp.dtype(dtype)), platform=platform)
    graphdef, state = nnx.split(quantize_model(model, quantization, platform=platform))
    targets = dict(nnx.to_flat_state(param_shardings(state, mesh)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(targets[path])
    return cfg, graphdef, nnx.from_flat_state(flat)


def abstract_engine(cfg: ModelConfig, ecfg: EngineConfig, mesh: Mesh, num_pages: int | None = None,
                    dtype="bfloat16", *, limit_bytes: int | None = None) -> AbstractEngine:
    """What Engine(model on `mesh`, ecfg, num_pages=...) holds, as ShapeDtypeStructs,
    with its steps built by the same function (runtime.engine.build_steps). Without
    `num_pages`, the KV cache is the one the server would plan on each device
    (runtime.startup.plan_capacity, `ecfg.num_pages` or kv_cache_memory_fraction of
    `limit_bytes`, default the chip's HBM: `hbm_bytes`). Tensor parallelism only: a
    mesh with pipeline stages or data-parallel groups raises NotImplementedError."""
    if pipeline.stage_size(mesh) > 1:
        # sharding.pipeline.stage_model stacks the stages' weights from placed arrays.
        raise NotImplementedError(f"ahead-of-time compilation of pipeline stages ({pipeline.stage_size(mesh)} on "
                                  "the mesh) is not implemented: sharding.pipeline.stage_model needs placed weights")
    if mesh.shape.get("data", 1) > 1:
        raise NotImplementedError(f"ahead-of-time compilation with data-parallel groups ({mesh.shape['data']} on "
                                  "the mesh) is not implemented")
    ecfg = mesh_engine_config(ecfg, mesh)  # as the Engine runs it
    cfg, graphdef, params = abstract_params(cfg, mesh, dtype, ecfg.quantization)
    capacity = None
    if num_pages is None:
        limit = limit_bytes if limit_bytes is not None else hbm_bytes(mesh.devices.flat[0])
        capacity = plan_capacity(cfg, ecfg, abstract_bytes_per_device(params),
                                 kv_shards=cache_kv_shards(cfg, ecfg, mesh),
                                 limit_bytes=limit)
        num_pages = capacity.num_pages
    replicated = NamedSharding(mesh, PartitionSpec())
    csh = cache_sharding(cfg, num_pages, ecfg.page_size, mesh)
    page = abstract_pages((num_pages, ecfg.page_size, cfg.num_kv_heads, cfg.head_dim), ecfg.cache_dtype, csh)
    cache = KVCache(k=(page,) * cfg.num_layers, v=(page,) * cfg.num_layers)
    slots = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         jax.eval_shape(lambda: DecodeSlots.create(ecfg.max_num_seqs, cfg.vocab_size)))
    platform = mesh.devices.flat[0].platform
    with dispatch.target_platform(platform):
        steps = build_steps(graphdef, ecfg, cache_shardings=jax.tree.map(lambda x: x.sharding, cache),
                            replicated=replicated, mesh=mesh, params_treedef=jax.tree.structure(params))
    return AbstractEngine(cfg, ecfg, mesh, num_pages, capacity, graphdef, params, cache, slots, steps, platform)


def _sds(x) -> jax.ShapeDtypeStruct:
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# The small programs beside the manifest's entries that an engine runs on one slot: its
# release, and its prompt mask set from prefix-cached tokens (Engine.seed_prompt_mask).
SLOT_PROGRAMS = ("release", "seed_prompt_mask")


def step_args(engine: AbstractEngine, kind: str, shape: tuple = ()) -> tuple:
    """The abstract arguments of one manifest entry, as Engine passes them (the params
    as their list of leaves; warmup's host arrays: their shapes and dtypes, uncommitted)."""
    ecfg, MP = engine.ecfg, engine.ecfg.max_pages_per_seq
    def packed(b, t):
        ints, floats = pack_prefill(**scratch_prefill(b, t, MP, ecfg.max_num_seqs))
        return _sds(ints), _sds(floats)

    def io():
        io = jax.eval_shape(lambda: DecodeIO.create(ecfg.max_num_seqs, MP, ecfg.decode_steps_per_call,
                                                    ecfg.num_top_logprobs))
        replicated = NamedSharding(engine.mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), io)

    if kind == "prefill":
        return jax.tree.leaves(engine.params), engine.cache, engine.slots, *packed(*shape[:2])
    if kind == "decode":
        return jax.tree.leaves(engine.params), engine.cache, engine.slots, io()
    if kind == "mixed":
        return jax.tree.leaves(engine.params), engine.cache, engine.slots, io(), *packed(*shape[1:3])
    if kind == "release":
        return engine.slots, jax.ShapeDtypeStruct((), jnp.int32)
    if kind == "seed_prompt_mask":
        return engine.slots, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((MP * ecfg.page_size,),
                                                                                       jnp.int32)
    raise ValueError(f"step kind {kind!r}; choose from prefill, decode, mixed, {', '.join(SLOT_PROGRAMS)}")


def step_fn(engine: AbstractEngine, kind: str, shape: tuple = ()):
    """The jitted step that serves one manifest entry (what Engine calls for it)."""
    if kind == "prefill":
        return engine.steps.prefill["fresh" in shape[2:]]
    if kind == "decode":
        rows, mode = shape if len(shape) > 1 else (engine.ecfg.max_num_seqs, "filter")
        return engine.steps.decode[(rows, mode)]
    if kind == "mixed":
        return engine.steps.mixed[(shape[0], "fresh" in shape[3:])]
    return getattr(engine.steps, kind)  # SLOT_PROGRAMS


def compile_step(engine: AbstractEngine, kind: str, shape: tuple = ()) -> CompiledStep:
    """Lowers and compiles one manifest entry for the mesh's devices."""
    with dispatch.target_platform(engine.platform):
        t0 = time.perf_counter()
        lowered = step_fn(engine, kind, shape).lower(*step_args(engine, kind, shape))
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return CompiledStep(kind, tuple(shape), compiled, MemoryStats.of(compiled), t1 - t0, t2 - t1)


def compile_manifest(engine: AbstractEngine, entries: dict[str, list[tuple]] | None = None, *,
                     release: bool = True) -> list[CompiledStep]:
    """Compiles `entries` (default: the engine's whole manifest, `Engine.manifest()`),
    and the slot programs (SLOT_PROGRAMS) when `release`; entries must be in the manifest."""
    manifest = engine.manifest()
    entries = manifest if entries is None else entries
    out = []
    for kind, shapes in entries.items():
        for shape in shapes:
            if tuple(shape) not in [tuple(s) for s in manifest.get(kind, [])]:
                raise ValueError(f"{kind} {tuple(shape)} is not in the manifest {manifest}")
            out.append(compile_step(engine, kind, tuple(shape)))
    if release:
        out.extend(compile_step(engine, kind) for kind in SLOT_PROGRAMS)
    return out


# --- serialized executables (runtime.warmup --aot_dir writes, runtime.serve --aot_dir loads) ---

AOT_FORMAT = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def executable_key(cfg: ModelConfig, ecfg: EngineConfig, mesh: Mesh | None, devices: list, dtype: str,
                   num_pages: int) -> dict:
    """What a set of serialized executables was built for. A server loads them only where
    every field matches: versions, the devices (platform, kind, count), the mesh, the
    model (kv heads as the engine holds them), the engine config (less the fields only the
    host's scheduling reads) and the KV cache size."""
    return json.loads(json.dumps(dict(
        format=AOT_FORMAT, jax=jax.__version__, jaxlib=_version("jaxlib"), libtpu=_version("libtpu"),
        platform=devices[0].platform, device_kind=devices[0].device_kind, num_devices=len(devices),
        mesh=dict(mesh.shape) if mesh is not None else {}, dtype=dtype, model=json.loads(cfg.to_json()),
        engine={k: v for k, v in dataclasses.asdict(ecfg).items() if k not in HOST_ONLY_FIELDS},
        num_pages=num_pages)))


def compile_programs(programs: list[tuple], threads: int = 1, *, fresh: bool = False,
                     on_compiled: Callable | None = None, thread_prefix: str = "xlserve-compile",
                     stop=None, stats: dict | None = None) -> dict[tuple[str, tuple], jax.stages.Compiled]:
    """{(kind, shape): compiled} of (kind, shape, jitted, args) programs (Engine.programs).
    They are lowered here one after another (tracing holds the GIL) and compiled on
    `threads` threads (XLA compiles without it), so compiles overlap each other and the
    next program's lowering. `on_compiled(kind, shape, compiled)` runs as each one is
    done, on the thread that compiled it (the executable cache writes each program there,
    beside the compiles still running). The persistent compilation cache serves as with
    jit, unless `fresh` (_persistent_cache_off meanwhile, for every thread): executables
    to be serialized must not come from it, since on
    XLA:CPU (jaxlib 0.10.2) one loaded from that cache serializes without its kernels and
    its copy fails when it runs ("Function copy_bitcast_fusion.4 not found").
    Once the `stop` event is set, no further program is lowered or compiled (those
    compiling finish) and the result holds the programs done by then. `stats` gains
    "lower_s" (seconds lowering, on this thread) and "compile_s" (summed over threads)."""
    stats = {} if stats is None else stats
    stats.setdefault("lower_s", 0.0)
    stats.setdefault("compile_s", 0.0)
    lock = threading.Lock()
    off = _persistent_cache_off() if fresh else contextlib.nullcontext()

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    def lower(fn, args):
        t = time.perf_counter()
        lowered = fn.lower(*args)
        stats["lower_s"] += time.perf_counter() - t
        return lowered

    def build(kind, shape, lowered):
        if stopped():
            return None
        t = time.perf_counter()
        compiled = lowered.compile()
        with lock:
            stats["compile_s"] += time.perf_counter() - t
        if on_compiled is not None and not stopped():
            on_compiled(kind, shape, compiled)
        return compiled

    with off:
        if threads <= 1:
            out = {(kind, shape): build(kind, shape, lower(fn, args))
                   for kind, shape, fn, args in programs if not stopped()}
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix=thread_prefix) as pool:
                futures = [((kind, shape), pool.submit(build, kind, shape, lower(fn, args)))
                           for kind, shape, fn, args in programs if not stopped()]
                out = {name: future.result() for name, future in futures}
    return {name: c for name, c in out.items() if c is not None}


@contextlib.contextmanager
def _persistent_cache_off():
    """JAX's persistent compilation cache neither read nor written inside (every thread).
    `jax_enable_compilation_cache=False` is not enough: JAX decides once per process,
    at its first compile, whether the cache is used (jax 0.10.2: an executable compiled
    with it False was written, and read back by the next process)."""
    from jax.experimental.compilation_cache import compilation_cache

    directory = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", directory)
        compilation_cache.reset_cache()


def key_digest(key: dict) -> str:
    """A short name for an executable key: the directory of its executables in a cache."""
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _entry_name(kind: str, shape: tuple) -> str:
    return "-".join([kind, *map(str, shape)]) + ".xla"


class ExecutableWriter:
    """Writes serialized executables into `directory` one at a time, from any thread
    (`add`), then manifest.json (`finish`): each (kind, shape, compiled) with its argument
    and result tree structures. Programs the backend cannot serialize are listed with the
    error instead."""

    def __init__(self, directory: str):
        import threading

        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.files: list[dict] = []
        self.skipped: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, shape: tuple, compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            payload = serialize(compiled)  # (executable, in_tree, out_tree)
        except jax.errors.JaxRuntimeError as e:
            # XLA:CPU cannot serialize some programs (a sort's comparator: "`LessThan` is
            # not serializable"); the server compiles those.
            with self._lock:
                self.skipped.append(dict(kind=kind, shape=list(shape), error=str(e).splitlines()[0][:200]))
            return
        name = _entry_name(kind, shape)
        with open(os.path.join(self.directory, name), "wb") as f:
            pickle.dump(payload, f)
        with self._lock:
            self.files.append(dict(kind=kind, shape=list(shape), file=name))

    def finish(self, key: dict, **extra) -> tuple[int, list[dict]]:
        """Writes the manifest; returns how many programs were written and the skipped ones."""
        with open(os.path.join(self.directory, "manifest.json"), "w") as f:
            json.dump(dict(key=key, executables=self.files, not_serialized=self.skipped, **extra), f, indent=1)
        return len(self.files), self.skipped


def save_executables(directory: str, steps: list[tuple[str, tuple, jax.stages.Compiled]], key: dict,
                     **extra) -> tuple[int, list[dict]]:
    """Writes each (kind, shape, compiled) and manifest.json (`key`, the entries, and
    `extra`) with an ExecutableWriter. Returns how many were written and the ones the
    backend could not serialize (with its error)."""
    writer = ExecutableWriter(directory)
    for kind, shape, compiled in steps:
        writer.add(kind, shape, compiled)
    return writer.finish(key, **extra)


def key_difference(want: dict, have: dict) -> str | None:
    """The first field where two keys differ, in words; None when they match."""
    for field in sorted(set(want) | set(have)):
        if want.get(field) != have.get(field):
            if isinstance(want.get(field), dict) and isinstance(have.get(field), dict):
                inner = key_difference(want[field], have[field])
                return f"{field}.{inner}" if inner else field
            return f"{field}: this server {want.get(field)!r}, the executables {have.get(field)!r}"
    return None


def load_executables(directory: str, key: dict, threads: int = 1, select: Callable | None = None,
                     thread_prefix: str = "xlserve-load") -> tuple[dict[tuple[str, tuple], jax.stages.Compiled], str | None]:
    """The executables of `directory` as {(kind, shape): compiled} (those whose (kind,
    shape) `select` accepts, if given), loaded onto this process's devices on `threads`
    threads, when its manifest's key matches `key`; else ({}, why not)."""
    from jax.experimental.serialize_executable import deserialize_and_load

    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return {}, f"no readable {path}: {e}"
    why = key_difference(key, manifest.get("key", {}))
    if why is not None:
        return {}, f"built for another configuration ({why})"
    if key.get("platform") == "gpu":
        # Importing Mosaic GPU points its custom call at the runtime library
        # (MOSAIC_GPU_RUNTIME_LIB_PATH). A jit call does this while lowering; loading a
        # saved executable skips lowering, and its Mosaic kernels then fail to link
        # ("Failed to lookup host symbol ... anonymous_mosaic_gpu", H200, JAX 0.11.2).
        with contextlib.suppress(ImportError):
            import jax.experimental.mosaic.gpu  # noqa: F401
    def load(entry):
        path = os.path.join(directory, entry["file"])
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return deserialize_and_load(payload, in_tree, out_tree), None
        except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: compile instead
            return None, f"{path} does not load: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    # Loading releases the GIL for most of its time: on threads, the programs load side by
    # side (74 programs of Llama-3.1-8B shapes one after another: 47.9 s on an H200).
    entries = [e for e in manifest["executables"] if select is None or select((e["kind"], tuple(e["shape"])))]
    threads = max(1, min(threads, len(entries)))
    if threads == 1:
        results = map(load, entries)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix=thread_prefix) as pool:
            results = list(pool.map(load, entries))
    out = {}
    for entry, (compiled, why) in zip(entries, results):
        if why is not None:
            return {}, why
        out[(entry["kind"], tuple(entry["shape"]))] = compiled
    return out, None


def install_executables(engine, directory: str, key: dict, *, named: bool, threads: int = 1,
                        select: Callable | None = None) -> dict:
    """Installs the executables of `directory` in the engine where they match `key`
    (loaded on `threads` threads; those `select` accepts, if given); returns them ({} if
    none), and says on stderr how many, or why none. `named`: the directory is
    --aot_dir's, else the executable cache's."""
    from runtime.startup import clock

    with clock.phase("aot load") as detail:
        executables, why = load_executables(directory, key, threads, select)
        where = f"--aot_dir={directory}" if named else f"executable cache {directory}"
        if why is not None:
            detail[0] = "none"
            print(f"xlserve: {where} not used, compiling instead: {why}", file=sys.stderr, flush=True)
            return {}
        n = engine.use_executables(executables)
        detail[0] = f"{n} of {len(engine.programs())} programs"
        print(f"xlserve: {where}: {detail[0]} loaded", file=sys.stderr, flush=True)
    return executables


def executable_cache_dir(key: dict) -> str | None:
    """Where this configuration's executables live in the executable cache: beside a local
    persistent compilation cache; None without one (a gs:// cache, or none)."""
    root = jax.config.jax_compilation_cache_dir
    if not root or "://" in root:
        return None
    return os.path.join(root, "executables", key_digest(key))


def default_compile_threads(platform: str) -> int:
    """One per core, up to 8. On GPUs XLA autotunes GEMM fusions by timing candidates on
    the device, so compiles running together time each other's kernels; measured on an
    H200 (Llama-3.1-8B, 2026-11-29, runtime/BENCHMARKS.md) the programs compiled on 8
    threads served as fast as those compiled on one (TPOT 4.65 against 4.71 ms; 64
    streams 3461 against 3391 tok/s) and compiled 3.5x faster."""
    return max(1, min(8, os.cpu_count() or 1))


def core_programs(engine) -> set[tuple[str, tuple]]:
    """The programs a progressive start serves with first ((kind, shape), as
    Engine.programs names them): a prefill program of the largest shape that runs any
    chunk (the continuation variant, where there is one, also runs fresh prompts), a
    decode program of the largest bucket in "filter" (any rows, any sampling), and the
    slot programs those calls need. Every other call has a bigger stand-in among them:
    it pads further, a mixed step runs as a prefill call and a decode call."""
    ecfg = engine.ecfg
    b, t = max(ecfg.prefill_batch_sizes), max(ecfg.prefill_lengths)
    prefill = ("prefill", (b, t)) if False in engine.prefill_variants else ("prefill", (b, t, "fresh"))
    rows = max(ecfg.decode_buckets)
    return {prefill, ("decode", (rows, "filter")), ("release", ()), ("seed_prompt_mask", ()), ("set_table", ()),
            ("snapshot", (rows,))}


# A progressive start's other programs, in the order they are brought in: decode first
# (every step runs one), then prefill, then the mixed calls with their sampling programs.
_REST_ORDER = {"snapshot": 0, "decode": 1, "prefill": 2, "mixed_sample": 3, "mixed": 4}


class Background:
    """A progressive start's other programs (prepare_programs), brought in on threads once
    the server serves: each one, compiled or loaded, `arrive`s at the engine, which installs
    it between calls. Their compilations are not the serving path's (engine.BACKGROUND_THREADS:
    compile_counter.count leaves them out). A failure leaves the engine serving with the
    programs it has, and is logged."""

    def __init__(self, job: Callable[[threading.Event], str], num_programs: int):
        self._job = job
        self.num_programs = num_programs
        self.done = threading.Event()
        self.stopping = threading.Event()  # the job starts no further program once set
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{BACKGROUND_THREADS}-start", daemon=True)

    def start(self) -> None:
        _running.add(self)
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Asks the job to start nothing more and waits up to `timeout_s` for the programs
        compiling now; True once it has ended (a process must not exit while XLA compiles on
        one of its threads: on an H200 that ended in a segfault after the drain)."""
        self.stopping.set()
        return not self._thread.is_alive() or self.done.wait(timeout_s)

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            what = self._job(self.stopping)
            if self.stopping.is_set():
                print(f"xlserve: stopped bringing in the other programs ({what or 'none ready'})", file=sys.stderr,
                      flush=True)
                return
        except Exception as e:  # noqa: BLE001 -- serving goes on with the programs it has
            self.error = e
            log.exception("bringing in the other programs failed")
            print(f"xlserve: the other {self.num_programs} programs failed to build ({e!r}); serving goes on with "
                  f"the start-up programs (slower calls: padded shapes, no mixed calls)", file=sys.stderr, flush=True)
        else:
            print(f"xlserve: {what} in the background in {time.perf_counter() - t:.1f} s: every program ready",
                  file=sys.stderr, flush=True)
        finally:
            self.done.set()
            _running.discard(self)


_running: set[Background] = set()


def stop_background(timeout_s: float) -> bool:
    """Stops every started Background job (Background.stop); True if none is still running."""
    deadline = time.monotonic() + timeout_s
    return all([b.stop(max(0.0, deadline - time.monotonic())) for b in list(_running)])


def prepare_programs(engine, dtype: str, *, aot_dir: str | None, executable_cache: str,
                     compile_threads: int | None, progressive: bool = False) -> Background | None:
    """Before warm-up: the engine's programs from --aot_dir, else from the executable
    cache (loaded on `compile_threads` threads); the others compiled on those threads and,
    with the cache, each written to it as it compiles, for the next start. Warm-up then
    runs them and compiles nothing.

    `progressive` (one process, no --aot_dir): only core_programs() now, the engine limited
    to them (Engine.limit_programs); returns the Background job that brings in the others
    (loaded from the cache, else compiled and written to it) for the caller to start once
    the server serves."""
    import shutil

    from runtime.engine import compile_counter
    from runtime.startup import clock

    key = executable_key(engine.cfg, engine.ecfg, engine.mesh, jax.devices(), dtype, engine.num_pages)
    platform = jax.devices()[0].platform
    threads = compile_threads or default_compile_threads(platform)
    loaded = install_executables(engine, aot_dir, key, named=True, threads=threads) if aot_dir else {}
    if jax.process_count() > 1:
        return None  # several processes: jit compiles at warm-up, in step on every process
    core = core_programs(engine) if progressive and not aot_dir else None
    on = executable_cache == "on" or (executable_cache == "auto" and platform in ("gpu", "tpu"))
    cache_dir = executable_cache_dir(key) if on else None
    cached = bool(cache_dir and not aot_dir and os.path.exists(os.path.join(cache_dir, "manifest.json")))
    if cached:
        loaded = install_executables(engine, cache_dir, key, named=False, threads=threads,
                                     select=None if core is None else core.__contains__)
    programs = engine.programs()
    missing = [p for p in programs if (p[0], p[1]) not in loaded and (core is None or (p[0], p[1]) in core)]
    rest = [] if core is None else sorted((p for p in programs if (p[0], p[1]) not in core),
                                          key=lambda p: _REST_ORDER[p[0]])
    if not rest and (not missing or (threads <= 1 and not cache_dir)):
        return None  # nothing to compile, or jit compiles each program at warm-up as before
    # With the cache, each program is written (aside, renamed into place at the end, so a
    # reader never sees half a set) on the thread that compiled it, beside the compiles
    # still running: written after them, 74 programs of Llama-3.1-8B shapes took 28.7 s
    # more on an H200 (2026-11-30). A progressive start that loaded its programs from the
    # cache writes nothing.
    writer = None
    tmp = f"{cache_dir}.tmp{os.getpid()}"
    if cache_dir is not None and not aot_dir and not (core is not None and cached and loaded):
        try:
            writer = ExecutableWriter(tmp)
        except OSError as e:
            log.warning("could not write the executable cache %s: %s", cache_dir, e)

    def write(kind, shape, compiled):
        nonlocal writer
        if writer is None:
            return
        try:
            writer.add(kind, shape, compiled)
        except OSError as e:  # a full or read-only disk: serve anyway
            log.warning("could not write the executable cache %s: %s", cache_dir, e)
            writer = None

    fresh = cache_dir is not None and not aot_dir and platform == "cpu"  # see compile_programs
    compiled = {}
    if missing:
        with clock.phase("compile") as detail:
            hits = compile_counter.cache_hits
            stats = {}
            compiled = compile_programs(missing, threads, fresh=fresh, on_compiled=write, stats=stats)
            engine.use_executables(compiled)
            detail[0] = (f"{len(compiled)} programs on {threads} thread{'s' if threads > 1 else ''}, "
                         f"{compile_counter.cache_hits - hits} from the persistent cache, lowering "
                         f"{stats['lower_s']:.1f} s, compiles {stats['compile_s']:.1f} s summed"
                         + (f"; {len(rest)} more after SERVING" if rest else ""))

    def finish_writing(count: int) -> str:
        """The cache's manifest, the set renamed into place; returns what was written."""
        if writer is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return ""
        try:
            for (kind, shape), c in loaded.items():  # a partial hit: the set is written whole
                writer.add(kind, shape, c)
            written, skipped = writer.finish(key)
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.replace(writer.directory, cache_dir)
        except OSError as e:  # a full or read-only disk: serve anyway
            shutil.rmtree(writer.directory, ignore_errors=True)
            log.warning("could not write the executable cache %s: %s", cache_dir, e)
            return f"failed: {e}"
        return f"{written} of {count} programs" + (
            f"; not serializable here, so compiled at every start: {', '.join(s['kind'] for s in skipped)}"
            if skipped else "")

    if core is None:
        if writer is not None:
            with clock.phase("executable cache write") as detail:
                detail[0] = finish_writing(len(loaded) + len(compiled))
        return None
    engine.limit_programs(core)

    def bring_in_the_rest(stop: threading.Event) -> str:
        names = {(p[0], p[1]) for p in rest}
        arrived = {}
        if cached and loaded and not stop.is_set():
            arrived, why = load_executables(cache_dir, key, threads, names.__contains__,
                                            thread_prefix=f"{BACKGROUND_THREADS}-load")
            if why is not None:
                log.warning("the executable cache %s: %s; compiling those programs", cache_dir, why)
                arrived = {}
            if arrived:
                engine.arrive(arrived)
        todo = [p for p in rest if (p[0], p[1]) not in arrived]

        def compiled_one(kind, shape, c):
            write(kind, shape, c)
            engine.arrive({(kind, shape): c})

        stats = {}
        done = compile_programs(todo, threads, fresh=fresh, on_compiled=compiled_one, stop=stop, stats=stats,
                                thread_prefix=f"{BACKGROUND_THREADS}-compile") if todo else {}
        what = ", ".join(x for x in (f"{len(arrived)} programs loaded" if arrived else "",
                                     f"{len(done)} compiled (lowering {stats['lower_s']:.1f} s on one thread, "
                                     f"compiles {stats['compile_s']:.1f} s summed over {threads})" if done else "")
                         if x)
        if stop.is_set():  # a part of the set: the next start compiles it again
            shutil.rmtree(tmp, ignore_errors=True)
            return what
        wrote = finish_writing(len(programs)) if writer is not None else ""
        return what + (f" (executable cache: {wrote})" if wrote else "")

    return Background(bring_in_the_rest, len(rest))

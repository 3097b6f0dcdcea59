"""Start-up shared by the entry points: checkpoint -> model -> sized KV cache -> engine.

The KV cache gets what is left of `kv_cache_memory_fraction` of device memory after the
weights and an activation reserve (or `num_pages` when given). If the weights plus one
full-length sequence cannot fit, start-up fails at once with the numbers.

Decode slots (`max_num_seqs`), when the user leaves them to us, follow the cache: as
many as it holds sequences of max_model_len, between 8 and AUTO_MAX_NUM_SEQS. A decode
call runs the smallest bucket of slots holding every decoding one (EngineConfig.
decode_buckets), so a lone request no longer pays for idle slots (before the buckets, a
step at 64 slots took 8.05 ms against 6.50 ms at 1 slot on an H200, runtime/BENCHMARKS.md).
The cap bounds the largest bucket (compiled in every sampling mode) and the per-slot
vocabulary rows (logits, penalty counts); 64 streams is what the serving benchmarks load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import math
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import checkpoints
from checkpoints.aliases import resolve_checkpoint
from runtime.config import AUTO_MAX_NUM_SEQS, AUTO_MIN_NUM_SEQS, ConfigError, EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.kv_cache import KVCache
from runtime.quantization import quantize_model
from runtime.sampling import read_sampling_defaults
from runtime.tokenizer import Tokenizer, load_tokenizer
from sharding import pipeline, tensor_parallel
from sharding.mesh import (
    MeshConfig, bytes_per_device, cache_sharding, check_model, kv_replication, make_mesh, replicate_kv_heads,
)

log = logging.getLogger(__name__)
GiB = 1 << 30


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0.0, time.time() - start)


@dataclasses.dataclass
class StartupClock:
    """Where a process's start-up goes: the phases in the order they ran, with seconds and
    what each moved (runtime.serve logs `summary()` at SERVING and exports the phases as
    Prometheus gauges). One per process: `clock`."""

    phases: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)  # (name, seconds, detail)
    weight_bytes: int = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times the block as phase `name`; the block may set `detail[0]` (words, shown after the time)."""
        detail = [""]
        t = time.perf_counter()
        try:
            yield detail
        finally:
            self.phases.append((name, time.perf_counter() - t, detail[0]))

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, sec, _ in self.phases:
            out[name] = out.get(name, 0.0) + sec
        return out

    def summary(self, total_s: float | None = None) -> str:
        parts = []
        for name, sec, detail in self.phases:
            parts.append(f"{name} {sec:.1f} s" + (f" ({detail})" if detail else ""))
        if total_s is not None:
            before = total_s - sum(sec for _, sec, _ in self.phases)
            parts.insert(0, f"process start to loading {max(0.0, before):.1f} s")
            parts.append(f"ready {total_s:.1f} s after the process started")
        return "start-up: " + ", ".join(parts)


clock = StartupClock()


def freeze_heap() -> None:
    """Moves every object alive now (the model, the compiled programs, the tokenizer:
    ~0.6 M objects for a small model after warm-up) out of the garbage collector's
    reach (gc.freeze), after collecting what is already garbage. Without it, each
    full collection while serving walks all of them: 351 ms on this 2-core CPU for
    Gemma 3 270M, and a 171 ms step at 64 streams in an 8B server on the H200 (every
    stream's next token waited; runtime/BENCHMARKS.md). Objects made later are
    collected as usual."""
    gc.collect()
    gc.freeze()


def devices_phase() -> None:
    """The backends' start, timed as the "devices" phase."""
    with clock.phase("devices") as detail:
        devices = jax.devices()
        detail[0] = f"{len(devices)} x {devices[0].device_kind}"


@contextlib.contextmanager
def weights_phase(note: str = ""):
    """Times the block that puts the weights on the devices (it sets `out["model"]`) as
    the "weights" phase, with their size and rate."""
    out = {}
    t = time.perf_counter()
    with clock.phase("weights") as detail:
        yield out
        state = nnx.state(out["model"])
        jax.block_until_ready(state)
        nbytes = clock.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        sec = time.perf_counter() - t
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
        detail[0] = note + size + (f", {nbytes / sec / 1e9:.2f} GB/s" if sec > 0 else "")


def engine_phase(model, ecfg: EngineConfig, *, auto_num_seqs: bool, mesh) -> Engine:
    """build_engine, timed as the "engine" phase (KV cache, fused projections, steps)."""
    with clock.phase("engine") as detail:
        engine = build_engine(model, ecfg, auto_num_seqs=auto_num_seqs, mesh=mesh)
        detail[0] = f"{engine.num_pages} KV pages"
    return engine


class CapacityError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Capacity:
    num_pages: int
    page_size: int
    page_bytes: int
    max_pages_per_seq: int

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def max_full_length_seqs(self) -> int:
        return self.num_pages // self.max_pages_per_seq

    def describe(self, max_model_len: int) -> str:
        return (
            f"KV cache: {self.num_pages} pages x {self.page_size} tokens = {self.num_tokens} tokens "
            f"({self.num_pages * self.page_bytes / GiB:.2f} GiB); "
            f"{self.max_full_length_seqs} concurrent sequences at max_model_len={max_model_len}"
        )


def activation_reserve(cfg: ModelConfig, ecfg: EngineConfig) -> int:
    """Rough upper bound of live activations in one step (bytes), float32."""
    prefill_tokens = max(ecfg.prefill_batch_sizes) * max(ecfg.prefill_lengths)
    per_token = 4 * (3 * cfg.embed_dim + 2 * cfg.ffw_dim + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    slots = ecfg.max_num_seqs * cfg.vocab_size * (4 + 4 + 1)  # logits, output counts, prompt mask
    return 2 * prefill_tokens * per_token + 2 * slots + 256 * (1 << 20)


def memory_limit(device=None, limit_bytes: int | None = None) -> int | None:
    """The memory a device may allocate: `limit_bytes` when given (a device that cannot
    say, such as a compile-only TPU device: runtime/aot.py), else its memory_stats'
    bytes_limit; None where there is none (CPU)."""
    if limit_bytes is not None:
        return limit_bytes
    device = device or jax.local_devices()[0]  # with several processes jax.devices()[0] may be another's
    return (device.memory_stats() or {}).get("bytes_limit")


def cache_kv_shards(cfg: ModelConfig, ecfg: EngineConfig, mesh) -> int:
    """How many ways the KV cache's pages are split over `mesh` (by kv head over the
    tensor axis; `cfg` with its kv heads already expanded to the tensor size)."""
    if mesh is None:
        return 1
    sharded_axis = cache_sharding(cfg, 1, ecfg.page_size, mesh).spec[2]
    # With pipeline stages each device holds its stage's layers' pages only.
    return (mesh.shape[sharded_axis] if sharded_axis else 1) * pipeline.stage_size(mesh)


def plan_capacity(cfg: ModelConfig, ecfg: EngineConfig, param_bytes: int, device=None, *,
                  kv_shards: int = 1, limit_bytes: int | None = None) -> Capacity:
    """KV pages for one device's memory: `param_bytes` are the weights on that device,
    and each page is split `kv_shards` ways (by kv head over the tensor axis).
    `limit_bytes` stands for the device's memory where it cannot be read (`memory_limit`)."""
    page_bytes = KVCache.bytes_per_token(cfg, jnp.dtype(ecfg.cache_dtype)) * ecfg.page_size // kv_shards
    need = ecfg.max_pages_per_seq
    limit = memory_limit(device, limit_bytes)
    reserve = activation_reserve(cfg, ecfg)
    if ecfg.num_pages is not None:
        pages = ecfg.num_pages
        if limit is not None and param_bytes + reserve + pages * page_bytes > limit:
            raise CapacityError(
                f"weights {param_bytes / GiB:.2f} GiB + activations {reserve / GiB:.2f} GiB + "
                f"{pages} pages x {page_bytes / (1 << 20):.2f} MiB = "
                f"{(param_bytes + reserve + pages * page_bytes) / GiB:.2f} GiB exceed the device's "
                f"{limit / GiB:.2f} GiB; lower --num_pages"
            )
    elif limit is not None:
        budget = int(ecfg.kv_cache_memory_fraction * limit) - param_bytes - reserve
        pages = max(0, budget // page_bytes)
    else:  # CPU: no memory limit to read; enough for every slot at full length
        pages = ecfg.max_num_seqs * need
    if pages < need:
        raise CapacityError(
            f"the KV cache holds {pages} pages of {ecfg.page_size} tokens, but one sequence of "
            f"max_model_len={ecfg.max_model_len} needs {need}; weights take {param_bytes / GiB:.2f} GiB"
            + (f" of {limit / GiB:.2f} GiB" if limit else "")
            + "; lower --max_model_len, raise --kv_cache_memory_fraction, or use more devices"
        )
    return Capacity(pages, ecfg.page_size, page_bytes, need)


def auto_max_num_seqs(cfg: ModelConfig, ecfg: EngineConfig, param_bytes: int, device=None, *,
                      kv_shards: int = 1, limit_bytes: int | None = None) -> tuple[int, str]:
    """Decode slots from the KV cache (see the module docstring), and why, in words.
    `ecfg.max_num_seqs` is ignored, except on a device without a memory limit (CPU),
    where the cache is sized from the slots and it is kept."""
    if ecfg.num_pages is None and memory_limit(device, limit_bytes) is None:
        return ecfg.max_num_seqs, "no device memory limit to size the KV cache from (CPU); the default"
    # The activation reserve grows with the slots: plan for the most we would choose.
    cap = plan_capacity(cfg, dataclasses.replace(ecfg, max_num_seqs=AUTO_MAX_NUM_SEQS), param_bytes, device,
                        kv_shards=kv_shards, limit_bytes=limit_bytes)
    fits = cap.max_full_length_seqs
    n = min(AUTO_MAX_NUM_SEQS, max(AUTO_MIN_NUM_SEQS, fits))
    why = f"the KV cache holds {fits} sequences of max_model_len={ecfg.max_model_len}"
    if n == AUTO_MAX_NUM_SEQS and fits > n:
        why += f"; capped at {AUTO_MAX_NUM_SEQS} (the largest decode bucket)"
    elif n > fits:
        why += f"; at least {AUTO_MIN_NUM_SEQS} (shorter sequences share the cache; the scheduler preempts)"
    return n, why


def build_engine(model, ecfg: EngineConfig, *, auto_num_seqs: bool = False, mesh=None) -> Engine:
    """Sizes the KV cache (and, with `auto_num_seqs`, the decode slots) for `model` on
    this device (with a mesh: on its most loaded device, the model already placed on
    it, its kv heads repeated to the tensor size where fewer), says so on stderr, and
    builds the engine."""
    model = replicate_kv_heads(model, mesh)
    # Quantized here, not first in the Engine, so the KV cache is planned beside the
    # smaller weights (the Engine's own call is then a no-op).
    quantize_model(model, ecfg.quantization, mesh)
    cfg = model.cfg
    param_bytes = bytes_per_device(nnx.state(model))  # layers already on their stage's devices only
    shards = cache_kv_shards(cfg, ecfg, mesh)
    # Data-parallel groups each hold a copy of the model and 1/D of the slots and pages:
    # plan one group's devices, then multiply.
    data = tensor_parallel.data_axis(mesh)
    groups = mesh.shape[data] if data else 1
    if groups > 1 and not auto_num_seqs and ecfg.max_num_seqs % groups:
        raise ConfigError(f"max_num_seqs={ecfg.max_num_seqs} is not a multiple of data_parallel_size={groups}")
    per_group = dataclasses.replace(
        ecfg, max_num_seqs=max(1, ecfg.max_num_seqs // groups),
        num_pages=None if ecfg.num_pages is None else max(1, ecfg.num_pages // groups))
    if auto_num_seqs:
        n, why = auto_max_num_seqs(cfg, per_group, param_bytes, kv_shards=shards)
        per_group = dataclasses.replace(per_group, max_num_seqs=n)
        ecfg = dataclasses.replace(ecfg, max_num_seqs=n * groups)
        print(f"max_num_seqs={n * groups} ({why}" + (f", per data-parallel group of {groups}" if groups > 1 else "")
              + "; --max_num_seqs sets it)", file=sys.stderr, flush=True)
    cap = plan_capacity(cfg, per_group, param_bytes, kv_shards=shards)
    where = "" if mesh is None else f", per device of {mesh.size}"
    if groups > 1:
        where = f", per data-parallel group of {groups} ({mesh.size // groups} devices each)"
    print(cap.describe(ecfg.max_model_len) + where, file=sys.stderr, flush=True)  # stdout is the output
    num_pages = cap.num_pages * groups
    sharding = None if mesh is None else cache_sharding(cfg, num_pages, ecfg.page_size, mesh)
    return Engine(model, ecfg, num_pages=num_pages, cache_sharding=sharding)


def enable_compilation_cache(directory: str | None = None) -> None:
    """JAX's persistent compilation cache: a warm start compiles nothing from scratch."""
    import os

    directory = directory or os.environ.get("XLSERVE_COMPILE_CACHE") or os.path.expanduser("~/.cache/xlserve/jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # warm start compiles nothing


def _weight_bytes(cfg: ModelConfig, dtype: str, quantization: str | None) -> int:
    """The model's parameter bytes in `dtype`, its projections quantized as given."""
    from runtime.models.transformer import abstract_model

    leaves = jax.tree.leaves(nnx.state(abstract_model(cfg, jnp.dtype(dtype), quantization)))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def choose_tensor_size(cfg: ModelConfig, ecfg: EngineConfig, dtype: str, mesh_config: MeshConfig, *,
                       num_devices: int | None = None, limit_bytes: int | None = None) -> tuple[int, str]:
    """The tensor size when the user gives none, and why, in words: 1 where the weights,
    the activation reserve and one sequence of max_model_len fit one device's share
    (kv_cache_memory_fraction) of memory, else every device (after pipeline and data
    sizes), or the most that split the model. Several processes: every device."""
    check_model(cfg, dataclasses.replace(mesh_config, tensor=1))  # the stages, whatever the tensor size
    n = (num_devices or len(jax.devices())) // (mesh_config.pipeline * mesh_config.data)
    if n <= 1:
        return 1, "one device"
    limit = memory_limit(limit_bytes=limit_bytes)
    weights = _weight_bytes(cfg, dtype, ecfg.quantization) / mesh_config.pipeline
    if jax.process_count() == 1:
        if limit is None:
            return 1, "no device memory limit to decide from (CPU)"
        kv = KVCache.bytes_per_token(cfg, jnp.dtype(ecfg.cache_dtype)) * ecfg.max_model_len / mesh_config.pipeline
        need = weights + activation_reserve(cfg, ecfg) + kv
        if need <= ecfg.kv_cache_memory_fraction * limit:
            return 1, f"the weights ({weights / GiB:.1f} GiB) and one full-length sequence fit one device"
    for t in range(n, 1, -1):
        try:
            check_model(cfg, dataclasses.replace(mesh_config, tensor=t))
        except ConfigError:
            continue
        why = "several processes" if jax.process_count() > 1 else (
            f"the weights ({weights / GiB:.1f} GiB) do not fit one device's {limit / GiB:.1f} GiB")
        return t, f"{why}; {t} of {n} devices split the model"
    raise ConfigError(f"the model does not fit one device and no tensor size up to {n} splits it; "
                      "set --tensor_parallel_size / --pipeline_parallel_size")


def mesh_for(cfg: ModelConfig, mesh_config: MeshConfig | None, ecfg: EngineConfig | None = None,
             dtype: str = "bfloat16"):
    """The mesh for `mesh_config` after checking the model splits that way; None for
    one device (the single-device placement the engine has always used). A tensor size
    left open (None) is chosen here (`choose_tensor_size`) and said on stderr."""
    if mesh_config is not None and mesh_config.tensor is None:
        tensor, why = choose_tensor_size(cfg, ecfg or EngineConfig(), dtype, mesh_config)
        if why != "one device":  # there was a choice to make
            print(f"tensor_parallel_size={tensor} ({why}; --tensor_parallel_size sets it)", file=sys.stderr,
                  flush=True)
        mesh_config = dataclasses.replace(mesh_config, tensor=tensor)
    if mesh_config is None or mesh_config.num_devices == 1:
        return None
    check_model(cfg, mesh_config)
    mesh = make_mesh(mesh_config)
    if kv_replication(cfg, mesh_config) > 1:
        print(f"num_kv_heads={cfg.num_kv_heads} < tensor_parallel_size={mesh_config.tensor}: each kv head is "
              f"repeated on {kv_replication(cfg, mesh_config)} devices (one per device)", file=sys.stderr, flush=True)
    return mesh


def load_engine(checkpoint: str, ecfg: EngineConfig, *, dtype: str = "bfloat16", mesh_config: MeshConfig | None = None,
                auto_num_seqs: bool = False) -> tuple[Engine, Tokenizer]:
    """The engine and tokenizer of a checkpoint (dir, alias, HF dir or .gguf), its
    weights restored straight into their shardings on the mesh of `mesh_config`. With
    `auto_num_seqs`, ecfg.max_num_seqs is replaced by `auto_max_num_seqs`'s choice."""
    enable_compilation_cache()
    directory = resolve_checkpoint(checkpoint, dtype=dtype)  # bad input fails before any backend starts
    devices_phase()
    mesh = mesh_for(checkpoints.read_config(directory), mesh_config, ecfg, dtype)
    with weights_phase() as out:
        cfg, out["model"] = checkpoints.load(directory, dtype=dtype, mesh=mesh)
    if ecfg.max_model_len > cfg.max_position:
        log.warning("max_model_len=%d exceeds the model's max_position=%d", ecfg.max_model_len, cfg.max_position)
    engine = engine_phase(out["model"], ecfg, auto_num_seqs=auto_num_seqs, mesh=mesh)
    engine.sampling_defaults = read_sampling_defaults(directory)
    return engine, load_tokenizer(directory)


def progressive_start(startup: str, platform: str, *, aot_dir: str | None, one_process: bool) -> bool:
    """--startup: "progressive" as asked (main refuses it beside --aot_dir or several
    processes); "auto" where it applies, on GPUs and TPUs, whose cold compiles take minutes
    (an 8B server on an H200: SERVING 25.5 s progressive against 253 s full, and 9.1 s
    against 21.1 s warm, runtime/BENCHMARKS.md), and not on CPU."""
    if startup == "progressive":
        return True
    return startup == "auto" and platform in ("gpu", "tpu") and not aot_dir and one_process

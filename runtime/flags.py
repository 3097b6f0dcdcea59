"""absl flags shared by the entry points (generate, serve, bench, warmup), and the
parser that turns a flag error into one line on stderr and exit code 2."""

from __future__ import annotations

import sys

from absl import flags

from runtime.config import (
    ATTENTION_CHOICES,
    AUTO_MIN_NUM_SEQS,
    CACHE_DTYPES,
    COMMAND_BUFFER_CHOICES,
    SAMPLING_MODES,
    ConfigError,
    EngineConfig,
)

FLAGS = flags.FLAGS


def define_engine_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Converted checkpoint dir, HF model dir, .gguf file, or alias "
                        "(gemma3-270m, smollm2-135m).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype.")
    flags.DEFINE_enum("cache_dtype", None, list(CACHE_DTYPES), "KV cache dtype (default: --dtype). int8 and "
                      "float8_e4m3fn store each token's row of a kv head quantized with a float32 scale: ~1.9x the "
                      "tokens of bfloat16 in the same memory.")
    flags.DEFINE_enum("quantization", None, ["int8", "fp8"], "Quantize the projections' weights at load, on the "
                      "device: int8 or float8 e4m3 with a float32 scale per output channel (weight-only; "
                      "embeddings and norms keep --dtype). Default: none (a checkpoint converted with "
                      "--quantize serves as it was stored).")
    flags.DEFINE_integer("max_num_seqs", None, "Decode slots: sequences decoded together (default: as many "
                         "sequences of max_model_len as the KV cache holds, 8 to 64; 8 on CPU).")
    flags.DEFINE_integer("max_model_len", 2048, "Context length (prompt + generated) per sequence.")
    flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
    flags.DEFINE_integer("num_pages", None, "KV pages (default: from --kv_cache_memory_fraction).")
    flags.DEFINE_float("kv_cache_memory_fraction", 0.85, "Fraction of device memory for weights + KV cache.")
    flags.DEFINE_list("prefill_lengths", [], "Prefill length buckets (default: powers of two up to 2048).")
    flags.DEFINE_list("prefill_batch_sizes", ["1"], "Prompts per prefill call buckets.")
    flags.DEFINE_integer("decode_steps_per_call", 1, "Decode steps per dispatch.")
    flags.DEFINE_integer("max_num_batched_tokens", 544, "Tokens per step (prefill chunks + decode) while sequences "
                         "decode (each decoding sequence counting as 2): a long prompt is prefilled over several steps instead of "
                         "stalling every stream (at least one chunk of the smallest --prefill_lengths per step). With nothing decoding, "
                         "prefill runs at full chunk. Smaller values even out inter-token latency at a cost in "
                         "throughput and first-token latency.")
    flags.DEFINE_boolean("mixed_calls", True, "While sequences decode, run a step's prefill chunk and its decode "
                         "step as one forward pass (weights read once for both; one device call). One device only, "
                         "one decode step per call; --nomixed_calls runs them as two calls.")
    flags.DEFINE_boolean("enable_prefix_caching", True, "Reuse the KV pages of prompt prefixes already in the cache "
                         "(same tokens from the start, same cache_salt) instead of recomputing them "
                         "(--noenable_prefix_caching: recompute every prompt).")
    flags.DEFINE_list("decode_batch_sizes", [], "Decode buckets: a call runs the first b slots, b the smallest bucket "
                      "holding every decoding slot (default: 1,8,64,512 below --max_num_seqs; --max_num_seqs is "
                      "always one).")
    flags.DEFINE_enum("attention", "auto", list(ATTENTION_CHOICES),
                      "Attention: the Pallas kernels, the jnp reference, or auto (Pallas on GPU).")
    flags.DEFINE_enum("command_buffers", "all", list(COMMAND_BUFFER_CHOICES),
                      "GPU: the steps XLA runs as CUDA graphs (all; decode only; none). A graph is re-recorded "
                      "when its buffers move, as prefill's inputs do on every call.")
    flags.DEFINE_integer("num_top_logprobs", 0, "Top-N logprobs computed per step (max a request may ask).")
    flags.DEFINE_list("decode_sampling_modes", list(SAMPLING_MODES),
                      "Decode variants to compile: greedy (argmax only), sample (temperature), filter (also "
                      "top-k/top-p/min-p; required: serves any request). Each call runs the cheapest that fits its "
                      "requests; fewer variants start faster.")
    flags.DEFINE_integer("tensor_parallel_size", None, "Devices that split every layer (heads, MLP, vocabulary); "
                         "default: 1 where the model fits one device, else every device.")
    flags.DEFINE_integer("pipeline_parallel_size", 1, "Pipeline stages: contiguous layers per group of devices.")
    flags.DEFINE_integer("pipeline_microbatches", 1, "With pipeline stages: groups the decode slots pass through "
                         "the stages in (prefill uses one per stage).")
    flags.DEFINE_integer("data_parallel_size", 1, "Data-parallel groups: each a copy of the model on its own devices "
                         "with its own decode slots and KV pages (max_num_seqs is split among them).")


def define_startup_flags() -> None:
    """How a server (and the warm-up job that prepares one) gets its compiled programs."""
    flags.DEFINE_enum("executable_cache", "auto", ["auto", "on", "off"], "Keep this server's compiled programs, "
                      "serialized, beside the compile cache (XLSERVE_COMPILE_CACHE/executables/<configuration digest>) "
                      "and run them at the next start with the same configuration: a warm start then neither traces, "
                      "lowers nor compiles. auto: on GPUs and TPUs (XLA:CPU cannot serialize every program). One process "
                      "and a local compile cache only.")
    flags.DEFINE_integer("compile_threads", None, "Threads compiling the programs at start-up (default: one per core, "
                         "up to 8). 1 on a GPU keeps XLA's autotuner from timing kernels while other compiles run.")


def check_startup_flags() -> None:
    if FLAGS.compile_threads is not None and FLAGS.compile_threads < 1:
        usage_error(f"--compile_threads={FLAGS.compile_threads} must be at least 1")


def define_distributed_flags() -> None:
    """Flags of a multi-process run (sharding/distributed.py): the entry points that can
    span hosts (serve, generate) define them."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordination service, reachable "
                        "from every process (multi-process runs; on Cloud TPU VMs leave the three unset: detected).")
    flags.DEFINE_integer("num_processes", None, "Processes (hosts) in the run; with --coordinator_address and "
                         "--process_id.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes); process 0 serves, "
                         "the others follow its engine calls.")
    flags.DEFINE_float("worker_timeout_s", 30.0, "Multi-process: a process whose heartbeat stops, or whose device "
                       "call makes no progress, for this long fails the run (process 0: NOT_SERVING, exit 1).")


def distributed_config_from_flags():
    """sharding.distributed.DistributedConfig of the flags; ConfigError if inconsistent."""
    from sharding.distributed import DistributedConfig

    try:
        return DistributedConfig(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                 process_id=FLAGS.process_id, timeout_s=FLAGS.worker_timeout_s)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def join_cluster(dist, mesh_config):
    """(cluster, mesh config) after jax.distributed start-up (sharding.distributed); the
    cluster is None for one process. A cluster that cannot form: one line, exit 1; a
    mesh that does not span it: one line, exit 2."""
    from sharding import distributed

    try:
        cluster = distributed.initialize(dist)
        return cluster, distributed.mesh_config_for(cluster, mesh_config)
    except distributed.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        usage_error(str(e))


def _ints(name: str, values) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated integers, got {','.join(values)}") from None


def auto_num_seqs() -> bool:
    """True when --max_num_seqs is left to start-up to size from the KV cache."""
    return FLAGS.max_num_seqs is None


def engine_config_from_flags(**overrides) -> EngineConfig:
    """The EngineConfig of the flags; with --max_num_seqs unset it holds the CPU default,
    which runtime.startup replaces when it sizes the slots (`auto_num_seqs()`)."""
    kwargs = dict(
        max_num_seqs=AUTO_MIN_NUM_SEQS if auto_num_seqs() else FLAGS.max_num_seqs,
        max_model_len=FLAGS.max_model_len,
        page_size=FLAGS.page_size,
        num_pages=FLAGS.num_pages,
        kv_cache_memory_fraction=FLAGS.kv_cache_memory_fraction,
        prefill_lengths=_ints("prefill_lengths", FLAGS.prefill_lengths),
        prefill_batch_sizes=_ints("prefill_batch_sizes", FLAGS.prefill_batch_sizes),
        decode_steps_per_call=FLAGS.decode_steps_per_call,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens,
        mixed_calls=FLAGS.mixed_calls,
        quantization=FLAGS.quantization,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        decode_batch_sizes=_ints("decode_batch_sizes", FLAGS.decode_batch_sizes),
        attention=FLAGS.attention,
        command_buffers=FLAGS.command_buffers,
        cache_dtype=FLAGS.cache_dtype or FLAGS.dtype,
        num_top_logprobs=FLAGS.num_top_logprobs,
        decode_sampling_modes=tuple(FLAGS.decode_sampling_modes),
        pipeline_microbatches=FLAGS.pipeline_microbatches,
    )
    kwargs.update(overrides)
    return EngineConfig(**kwargs)


def mesh_config_from_flags():
    """The parallel sizes of the flags (sharding.mesh.MeshConfig); ConfigError if invalid."""
    from sharding.mesh import MeshConfig

    return MeshConfig(tensor=FLAGS.tensor_parallel_size, pipeline=FLAGS.pipeline_parallel_size,
                      data=FLAGS.data_parallel_size)


def usage_error(message: str) -> "NoReturn":  # noqa: F821
    """One line on stderr, exit code 2: for bad flags and bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for app.run that reports errors in one line with exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        usage_error(str(e))

"""python -m runtime.bench --model=llama3.1-8b --random_weights --batch_sizes=1,8,64 [--peer=hf]

Decode and prefill speed of the engine through the orchestrator loop (what generate and
serve run), against a bandwidth roofline: the bytes a decode step must read (weights,
minus the embedding table when the output projection is separate, plus each
sequence's KV) over the device copy bandwidth measured in this same run. Prints a table;
--json_out writes the numbers. Speed does not depend on weight values, so weights are
random (made on the device).

"decode tok/s" counts the orchestrated window in which all `batch` sequences decode
(empty when prompts are admitted over so many calls that the first finish before the
last start: raise --gen_len or --max_prefill_tokens); "device tok/s" is decode calls
queued back to back with every slot active at the window's mean context, so it compares
attention implementations at any shape. --profile_dir adds a kernel-level breakdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from runtime import flags as xflags

flags.DEFINE_string("model", "llama3.1-8b", "Preset name (runtime/presets.py) or a config.json path.")
flags.DEFINE_bool("random_weights", True, "Random weights of the model's shapes (the only mode for now).")
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Concurrent sequences to measure.")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per sequence.")
flags.DEFINE_integer("gen_len", 128, "Generated tokens per sequence.")
flags.DEFINE_enum("peer", "none", ["none", "hf"], "Also run transformers generate (static cache) on the same shapes.")
flags.DEFINE_list("peer_batch_sizes", ["1"], "Batch sizes the peer runs (each costs it a compile).")
flags.DEFINE_integer("peer_timeout_s", 300, "Give up on the peer after this long.")
flags.DEFINE_string("json_out", None, "Write the results here as JSON.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and KV cache dtype.")
flags.DEFINE_enum("quantization", None, ["int8", "fp8"], "Weight-only quantization of the projections "
                  "(runtime.quantization); the roofline counts the quantized bytes.")
flags.DEFINE_enum("cache_dtype", None, ["bfloat16", "float32", "int8", "float8_e4m3fn"],
                  "KV cache dtype (default: --dtype); int8 / float8_e4m3fn store quantized pages and the "
                  "roofline counts their bytes (values and scales).")
flags.DEFINE_enum("quantized_matmul", "auto", ["auto", "xla", "kernel"],
                  "With --quantization (runtime.models.layers.QUANTIZED_MATMUL): auto chooses by rows on GPU "
                  "(XLA's fused convert on rows padded to 8, the Pallas kernel up to 64 rows, XLA beyond); xla "
                  "XLA's fused convert, unpadded; kernel the Pallas kernel for every projection it takes.")
flags.DEFINE_enum("dense_matmul", "auto", ["auto", "xla", "kernel", "gated"],
                  "bf16 projections (runtime.models.layers.DENSE_MATMUL): auto (the engine's default) runs the "
                  "Mosaic GPU kernel's gated form for the MLP's gate/up and activation in 64-row calls on Hopper, "
                  "XLA elsewhere; xla never the kernel; kernel the kernel "
                  "(pallas_kernels/quantized_matmul/gpu_mosaic.py) wherever it takes the shapes on Hopper; "
                  "gated only its gated form, at any row count.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("decode_steps_per_call", 1, "Decode steps per dispatch (1, the engine default, streams every token).")
flags.DEFINE_enum("attention", "auto", ["auto", "reference", "pallas"], "Attention (auto: Pallas on GPU).")
flags.DEFINE_enum("command_buffers", "all", ["all", "decode", "none"], "GPU: steps run as CUDA graphs (EngineConfig).")
flags.DEFINE_integer("max_model_len", None, "Context per sequence (default: prompt + gen, rounded up to a page); "
                     "the server's default is 2048: its page table is that wide.")
flags.DEFINE_integer("num_pages", None, "KV pages (default: max_num_seqs sequences of max_model_len); the server "
                     "sizes its cache from the device memory instead.")
flags.DEFINE_integer("max_num_seqs", None, "Decode slots (default: the batch measured). More slots than the batch "
                     "add the server's default decode buckets (1, 8, 64, ...) below them.")
flags.DEFINE_integer("max_prefill_tokens", 16384, "Prompt tokens per prefill call at most (activation memory).")
flags.DEFINE_integer("tensor_parallel_size", 1, "Devices that split every layer; the roofline is per device.")
flags.DEFINE_integer("pipeline_parallel_size", 1, "Pipeline stages (contiguous layers per group of devices).")
flags.DEFINE_integer("pipeline_microbatches", 1, "With stages: groups the decode slots pass through the stages in.")
flags.DEFINE_bool("profile_python", False, "With --profile_dir: also trace Python frames in the orchestrated "
                  "steps (slows the host, so it opens device gaps of its own).")
flags.DEFINE_string("profile_dir", None, "Trace 3 decode calls per batch size here (jax.profiler) and print "
                    "where their device time goes (runtime/profile.py).")
FLAGS = flags.FLAGS


def prefill_flops(cfg, T: int) -> float:
    """FLOPs of one T-token prefill of one prompt: every layer's projections on T rows,
    causal attention (QK^T and PV over the lower triangle), and the output projection on
    the one row whose logits are sampled."""
    d, f, n, k, h = cfg.embed_dim, cfg.ffw_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linear = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    # Causal pairs T(T+1)/2 per head; per pair QK^T and PV are H multiply-adds each: 4H flops.
    attention = 4 * n * h * T * (T + 1) / 2
    return cfg.num_layers * (2 * T * linear + attention) + 2 * d * cfg.vocab_size


def _least_model_len() -> int:
    """Prompt + generated tokens (and a call's extra steps), rounded up to a page."""
    page = FLAGS.page_size
    return -(-(FLAGS.prompt_len + FLAGS.gen_len + FLAGS.decode_steps_per_call) // page) * page


def activate_slots(slots, *, ctx: int):
    """Every slot active at context `ctx`, with no budget or stop to end it (slots
    donated): the decode calls timed back to back run every slot's kernels. Written into
    the donated arrays, so every buffer keeps its address: a fresh array per call
    (jnp.full_like) moved buffers between the decode calls, and XLA updated the decode
    step's CUDA graph on every call (H200, session 19: `updated_allocs=4` per call), which
    the timing then included."""
    return _activate_jit()(slots, ctx=ctx)


@functools.cache
def _activate_jit():
    import jax  # jax is imported once the flags are parsed (main)

    def activate(slots, *, ctx):
        return dataclasses.replace(slots, lengths=slots.lengths.at[:].set(ctx),
                                   remaining=slots.remaining.at[:].set(1 << 30), stop_ids=slots.stop_ids.at[:].set(-1))

    return jax.jit(activate, static_argnames=("ctx",), donate_argnums=(0,))


def bench_batch(model, batch: int, bandwidth: float, matmul_flops: float, mesh=None, profile_prefill=False) -> dict:
    import jax
    import numpy as np

    from flax import nnx

    from runtime.config import DEFAULT_DECODE_BATCH_SIZES, EngineConfig
    from runtime.engine import attention_impl
    from runtime.kv_cache import KVCache
    from runtime.orchestrator import Orchestrator, Request
    from runtime.sampling import SamplingParams, SlotSampling

    cfg = model.cfg
    steps = FLAGS.decode_steps_per_call
    page = FLAGS.page_size
    max_len = FLAGS.max_model_len or _least_model_len()
    slots = max(batch, FLAGS.max_num_seqs or batch)
    # More slots than the batch: the server's buckets (EngineConfig.decode_buckets' default),
    # and the batch's own, which the calls timed back to back below run.
    buckets = (batch,) if slots == batch else tuple(sorted(set(DEFAULT_DECODE_BATCH_SIZES) | {batch}))
    # Prompts per prefill call: all of them where they fit the token budget (so the
    # decode batch fills at once), else as many as fit.
    rows = max(1, min(batch, FLAGS.max_prefill_tokens // FLAGS.prompt_len))
    prefill_batch_sizes = tuple(sorted({1, min(8, batch), rows}))
    # One decode bucket: the measured window has every slot decoding, which is the
    # largest bucket whatever the smaller ones (they would only add compile time). The
    # token budget fits a full prefill call beside every slot decoding: prompts admitted
    # after the first call (batch > rows) fill the batch at full speed, as the window needs.
    ecfg = EngineConfig(
        max_num_seqs=slots, max_model_len=max_len, page_size=page, prefill_lengths=(FLAGS.prompt_len,),
        prefill_batch_sizes=prefill_batch_sizes, decode_steps_per_call=steps,
        max_num_batched_tokens=max(prefill_batch_sizes) * FLAGS.prompt_len + batch * steps,
        decode_batch_sizes=buckets, attention=FLAGS.attention, command_buffers=FLAGS.command_buffers,
        cache_dtype=FLAGS.cache_dtype or FLAGS.dtype, pipeline_microbatches=FLAGS.pipeline_microbatches,
        quantization=FLAGS.quantization,
    )
    from runtime.startup import build_engine

    engine = build_engine(model, dataclasses.replace(ecfg, num_pages=FLAGS.num_pages or slots * ecfg.max_pages_per_seq),
                          mesh=mesh)
    t = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - t

    # Prefill alone: one prompt per call, on scratch rows (no slot is filled).
    rng = np.random.default_rng(0)
    args = dict(
        tokens=rng.integers(1, min(1000, cfg.vocab_size), (1, FLAGS.prompt_len)).astype(np.int32), starts=np.zeros(1, np.int32),
        lens=np.full(1, FLAGS.prompt_len, np.int32),
        page_table=np.arange(ecfg.max_pages_per_seq, dtype=np.int32)[None],
        slot_ids=np.full(1, slots, np.int32), is_last=np.ones(1, bool),
        sampling=SlotSampling.pack([None], [0]), stop_ids=np.full((1, 16), -1, np.int32),
        remaining=np.zeros(1, np.int32),
    )
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(engine.prefill(**args))
        times.append(time.perf_counter() - t)
    prefill_s = statistics.median(times)

    orc = Orchestrator(engine, None)
    submit = time.perf_counter()
    for i in range(batch):
        prompt = rng.integers(1, min(1000, cfg.vocab_size), FLAGS.prompt_len).tolist()
        orc.add_request(Request(str(i), prompt, SamplingParams(temperature=0.0), max_tokens=FLAGS.gen_len,
                                ignore_eos=True))
    first_token, steady, all_decoding_before = {}, [], False
    generated = {}  # request id -> its tokens (tokens_digest: same weights, same tokens)
    # With --profile_dir, steps 10-19 of the steady window are traced (device and host).
    from runtime import profile

    loop_dir = FLAGS.profile_dir and os.path.join(FLAGS.profile_dir, f"loop{batch}")
    loop_trace, tracing = contextlib.ExitStack(), False
    while orc.has_work():
        decoding_before = sum(1 for s in orc.scheduler.running.values() if s.status.value == "running")
        if loop_dir and len(steady) == 10 and not tracing:
            loop_trace.enter_context(profile.trace(loop_dir, python=FLAGS.profile_python))
            tracing = True
        elif tracing and len(steady) == 20:
            loop_trace.close()
            tracing = False
            print(f"profile, batch {batch}, 10 orchestrated steps:\n{profile.summarize(loop_dir)}\n"
                  f"{profile.host_summary(loop_dir)}\n{profile.gap_report(loop_dir)}", flush=True)
            profile.keep_flat(loop_dir, f"{loop_dir}.perfetto.json.gz")
            loop_dir = None
        t = time.perf_counter()
        outs = orc.step()
        dt = time.perf_counter() - t
        now = time.perf_counter()
        produced = 0
        for o in outs:
            first_token.setdefault(o.request_id, now - submit)
            produced += len(o.token_ids)
            generated.setdefault(o.request_id, []).extend(o.token_ids)
        # The steady window: every slot decoding in this step and the one before. The
        # first step with every slot decoding also reads the last prefill call's results,
        # so it waits for that prefill (366 ms at batch 64 x 512 tokens on an H200): it
        # is not a decode step. Traced steps count (their host work runs under the Python
        # tracer, so --profile_dir runs read a little slow).
        if decoding_before == batch and all_decoding_before and not any(o.finished for o in outs):
            steady.append((dt, produced))
        all_decoding_before = decoding_before == batch
    assert orc.num_compiles_since_ready == 0, "the benchmark compiled after warm-up"

    # Where a decode call's time goes: device throughput (calls queued back to back),
    # a call synced on its tokens (adds dispatch and transfer), and the orchestrator's
    # whole step (adds scheduling and per-token bookkeeping). The requests are done, so
    # slots and pages are the benchmark's: every slot is made active at the window's
    # mean context before each call (idle slots would skip the kernels' KV reads).
    ctx = FLAGS.prompt_len + FLAGS.gen_len // 2
    table = (np.arange(batch * ecfg.max_pages_per_seq, dtype=np.int32) % engine.num_pages).reshape(batch, -1)
    def decode_call():
        engine.slots = activate_slots(engine.slots, ctx=ctx)
        return engine.decode(table, mode="greedy")  # the requests are greedy

    jax.block_until_ready(decode_call())
    t = time.perf_counter()
    for _ in range(10):
        out = decode_call()
    jax.block_until_ready(out)
    call_async_s = (time.perf_counter() - t) / 10
    t = time.perf_counter()
    for _ in range(10):
        np.asarray(decode_call()["tokens"])
    call_sync_s = (time.perf_counter() - t) / 10
    if FLAGS.profile_dir:
        log_dir = os.path.join(FLAGS.profile_dir, f"batch{batch}")
        with profile.trace(log_dir):
            for _ in range(3):
                out = decode_call()
            jax.block_until_ready(out)
        print(f"profile, batch {batch}, 3 decode calls of {steps} steps:\n{profile.summarize(log_dir)}", flush=True)
        profile.keep_flat(log_dir, f"{log_dir}.perfetto.json.gz")
        if profile_prefill:
            log_dir = os.path.join(FLAGS.profile_dir, "prefill")
            with profile.trace(log_dir):
                for _ in range(3):
                    out = engine.prefill(**args)
                jax.block_until_ready(out)
            # The host's side too: a prefill call's dispatch (~4-5 ms on the H200 where a decode
            # call's is ~1 ms) delays the first token; its events say where that goes.
            print(f"profile, 3 prefill calls of 1 x {FLAGS.prompt_len} tokens:\n{profile.summarize(log_dir)}\n"
                  f"{profile.host_summary(log_dir)}\n{profile.gap_report(log_dir)}", flush=True)
            profile.keep_flat(log_dir, f"{log_dir}.perfetto.json.gz")
    step_s = sum(d for d, _ in steady)
    tokens = sum(n for _, n in steady)
    agg = tokens / step_s if step_s else float("nan")

    # Roofline for one decode step of `batch` sequences at the window's mean context, on
    # the most loaded device: the bytes it holds of the weights and of the KV cache.
    from sharding import pipeline
    from sharding.mesh import bytes_per_device

    param_bytes = bytes_per_device(nnx.state(model))  # layers already on their stage's devices only
    if not cfg.tie_embeddings:  # only B rows of it are read
        param_bytes -= bytes_per_device(model.embedding.get_value())
    ctx = FLAGS.prompt_len + FLAGS.gen_len / 2
    cache_leaf = jax.tree.leaves(engine.cache)[0]
    kv_share = cache_leaf.addressable_shards[0].data.size / cache_leaf.size
    kv_bytes = batch * ctx * KVCache.bytes_per_token(cfg, jax.numpy.dtype(FLAGS.cache_dtype or FLAGS.dtype)) * kv_share
    # With S stages and M microbatches a step is M + S - 1 ticks, and in each every device
    # reads all its weights (idle ticks too: the stages run in lockstep); the KV once.
    stages = pipeline.stage_size(mesh)
    micro = pipeline.microbatches_for(batch, FLAGS.pipeline_microbatches) if stages > 1 else 1
    floor_s = ((micro + stages - 1) * param_bytes + kv_bytes) / bandwidth
    per_step_s = batch / agg if agg == agg else float("nan")
    ttft = sorted(first_token.values())
    step_ms = [1e3 * d for d, _ in steady]
    return dict(
        batch=batch, attention=attention_impl(engine.ecfg), compile_s=compile_s, prefill_tok_s=FLAGS.prompt_len / prefill_s,
        prefill_ms=prefill_s * 1e3, prefill_matmul_frac=prefill_flops(cfg, FLAGS.prompt_len) / prefill_s / matmul_flops,
        ttft_mean_s=statistics.mean(ttft), ttft_p50_s=statistics.median(ttft),
        decode_tok_s=agg, decode_tok_s_per_seq=agg / batch, step_ms=per_step_s * 1e3,
        roofline_step_ms=floor_s * 1e3, roofline_frac=floor_s / per_step_s,
        hbm_tb_s=(param_bytes + kv_bytes) / per_step_s / 1e12,
        call_device_ms=call_async_s * 1e3, device_tok_s=batch * steps / call_async_s, call_synced_ms=call_sync_s * 1e3,
        call_orchestrated_ms=per_step_s * steps * 1e3,
        # The loop's calls one by one: a mean far above the median is stalls, not steady cost.
        loop_call_ms=step_ms,
        # Greedy tokens of every request: two runs of one model (random weights are seeded)
        # under different compiler options or kernels must print the same digest.
        tokens_digest=hashlib.sha256(json.dumps([generated[k] for k in sorted(generated, key=int)]).encode()).hexdigest()[:16],
    )


def main(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)
    from runtime.models import layers
    from runtime.presets import preset_config, preset_hf_config

    layers.QUANTIZED_MATMUL = FLAGS.quantized_matmul
    layers.DENSE_MATMUL = FLAGS.dense_matmul

    try:
        hf_config = preset_hf_config(FLAGS.model)
        cfg = preset_config(FLAGS.model)
        batches = [int(b) for b in FLAGS.batch_sizes]
    except ValueError as e:
        xflags.usage_error(str(e))
    if FLAGS.max_model_len and FLAGS.max_model_len < _least_model_len():
        xflags.usage_error(f"--max_model_len={FLAGS.max_model_len} holds no prompt of {FLAGS.prompt_len} tokens plus "
                           f"{FLAGS.gen_len} generated ({_least_model_len()} with the page rounding)")
    if FLAGS.num_pages is not None and FLAGS.num_pages < 1:
        xflags.usage_error(f"--num_pages={FLAGS.num_pages} must be positive")
    peer = {}
    if FLAGS.peer == "hf":  # before JAX claims the device memory
        args = dict(hf_config=hf_config, batch_sizes=[int(b) for b in FLAGS.peer_batch_sizes], prompt_len=FLAGS.prompt_len, gen_len=FLAGS.gen_len,
                    dtype=FLAGS.dtype)
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "runtime.bench_peer", json.dumps(args)], capture_output=True,
                                  text=True, env={**os.environ, "CUDA_MODULE_LOADING": "LAZY"},
                                  timeout=FLAGS.peer_timeout_s)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess([], 1, "", f"timed out after {FLAGS.peer_timeout_s} s")
        print(f"peer: {time.perf_counter() - t:.0f} s", flush=True)
        if proc.returncode:
            print(f"peer failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        else:
            peer = {r["batch"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    import jax

    t = time.perf_counter()
    from pallas_kernels.bench import copy_bandwidth

    from pallas_kernels.bench import FULL, SMOKE, matmul_rate

    bandwidth = copy_bandwidth(4 << 30 if jax.default_backend() != "cpu" else 256 << 20)
    # The prefill ceiling: an 8192^3 bf16 matmul (cuBLAS) measured now, in FLOP/s.
    matmul_flops = matmul_rate(FULL if jax.default_backend() != "cpu" else SMOKE, reps=5) * 1e12
    from runtime.config import ConfigError
    from runtime.random_weights import random_model
    from runtime.startup import mesh_for
    from sharding.mesh import MeshConfig

    try:
        mesh = mesh_for(cfg, MeshConfig(tensor=FLAGS.tensor_parallel_size, pipeline=FLAGS.pipeline_parallel_size))
    except ConfigError as e:
        xflags.usage_error(str(e))
    model = random_model(cfg, FLAGS.dtype, mesh)
    jax.block_until_ready(model)
    print(f"bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_flops / 1e12:.0f} TFLOP/s; random weights in {time.perf_counter() - t:.0f} s", flush=True)
    device = jax.devices()[0].device_kind
    rows = []
    from runtime.startup import CapacityError

    for b in batches:
        # Prefill does not depend on the batch size: profiled once.
        try:
            rows.append(bench_batch(model, b, bandwidth, matmul_flops, mesh, profile_prefill=b == batches[0]))
        except CapacityError as e:  # --num_pages (or the batch) beyond the device's memory
            xflags.usage_error(str(e))
        except jax.errors.JaxRuntimeError as e:  # the same where no memory limit is known (CPU)
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            xflags.usage_error(f"batch {b}, --num_pages={FLAGS.num_pages}: {str(e).splitlines()[0]}")
        print(json.dumps(rows[-1]), flush=True)
    quant = f", {FLAGS.quantization} weights ({FLAGS.quantized_matmul} matmuls)" if FLAGS.quantization else ""
    quant += f", {FLAGS.cache_dtype} KV cache" if FLAGS.cache_dtype and FLAGS.cache_dtype != FLAGS.dtype else ""
    print(f"\n{FLAGS.model} ({cfg.num_params() / 1e9:.2f}B params, {FLAGS.dtype}{quant}) on {device} "
          f"x TP {FLAGS.tensor_parallel_size} x PP {FLAGS.pipeline_parallel_size} (roofline per device), "
          f"jax {jax.__version__}, prompt {FLAGS.prompt_len}, gen {FLAGS.gen_len}, "
          f"{FLAGS.decode_steps_per_call} steps/call, attention={rows[0]['attention'] if rows else FLAGS.attention}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_flops / 1e12:.0f} TFLOP/s")
    head = ("batch", "decode tok/s", "per seq", "step ms", "roofline ms", "% roofline", "HBM TB/s",
            "prefill tok/s", "prefill ms (% matmul rate)", "TTFT mean s", "HF tok/s", "vs HF", "call ms: device/synced/loop",
            "device tok/s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        p = peer.get(r["batch"])
        print(" | ".join([
            str(r["batch"]), f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s_per_seq']:.1f}", f"{r['step_ms']:.2f}",
            f"{r['roofline_step_ms']:.2f}", f"{100 * r['roofline_frac']:.1f}%", f"{r['hbm_tb_s']:.2f}",
            f"{r['prefill_tok_s']:.0f}", f"{r['prefill_ms']:.2f} ({100 * r['prefill_matmul_frac']:.1f}%)",
            f"{r['ttft_mean_s']:.3f}",
            f"{p['decode_tok_s']:.1f}" if p else "-", f"{r['decode_tok_s'] / p['decode_tok_s']:.2f}x" if p else "-",
            f"{r['call_device_ms']:.2f}/{r['call_synced_ms']:.2f}/{r['call_orchestrated_ms']:.2f}",
            f"{r['device_tok_s']:.1f}",
        ]))
    for r in rows:
        calls = sorted(r["loop_call_ms"])
        if calls:
            p10, p50, p90 = (calls[min(len(calls) - 1, int(p * len(calls)))] for p in (0.1, 0.5, 0.9))
            print(f"batch {r['batch']}: {len(calls)} orchestrated calls, ms p10 {p10:.2f} p50 {p50:.2f} "
                  f"p90 {p90:.2f} max {calls[-1]:.2f}; slowest: {', '.join(f'{c:.1f}' for c in calls[-5:])}; "
                  f"tokens digest {r['tokens_digest']}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(dict(model=FLAGS.model, device=device, bandwidth=bandwidth, matmul_flops=matmul_flops, rows=rows, peer=peer), f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=xflags.parse_flags)

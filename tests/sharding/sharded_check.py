"""Sharded == one device, run in a process of its own with 8 simulated CPU devices
(tests/sharding/test_tensor_parallel.py starts it: the main test process keeps one).

For each tiny config and layout (tensor size, pipeline stages, attention impl, decode
microbatches), greedy requests go through the orchestrator on a one-device engine and
on a sharded one; one JSON line per (config, layout) reports tokens equal, the largest logprob difference, the parameter and cache
shardings, bytes per device, compilations after warm-up and whether the compiled decode
step reduces over devices. The workload has chunked prefill (a prompt longer than the
largest prefill bucket) and preemption (fewer KV pages than the requests need).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from runtime.config import EngineConfig, ModelConfig  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.models.transformer import Transformer  # noqa: E402
from runtime.orchestrator import Orchestrator, Request  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from sharding.mesh import (  # noqa: E402
    MeshConfig, bytes_per_device, cache_sharding, check_model, make_mesh, place_model, replicate_kv_heads,
)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
# name: (HF config, layouts (tensor, pipeline, attention, decode microbatches[, data])); "pallas"
# is the GPU kernels in Pallas' interpreter, inside shard_map on local heads.
R, PL = "reference", "pallas"
CONFIGS = {
    # GQA, 8 query heads over 2 kv heads; a vocabulary not divisible by 4 or 8 (replicated there).
    "llama_gqa": (dict(model_type="llama", vocab_size=510, num_attention_heads=8, num_key_value_heads=2),
                  ((2, 1, R, 1), (4, 1, R, 1), (8, 1, R, 1), (2, 1, PL, 1), (1, 2, R, 1), (2, 1, R, 1, 2))),
    # Four layers: four stages, and tensor x pipeline with two decode microbatches.
    "llama_4layers": (dict(model_type="llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=2,
                           num_hidden_layers=4), ((1, 4, R, 1), (2, 2, R, 2), (2, 2, R, 1, 2))),
    "mqa": (dict(model_type="llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=1),
            ((4, 1, R, 1), (2, 2, R, 1))),
    "mistral_window": (dict(model_type="mistral", vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                            sliding_window=8), ((2, 1, R, 1), (1, 2, R, 2))),
    # Local then global layer: with two stages, each stage's layer differs (a switch on the stage).
    # Prefix caching on the sharded engine (the one-device reference runs without it): the
    # second round's prompts extend the first round's, so they map its cached pages.
    "llama_prefix": (dict(model_type="llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=2,
                          num_hidden_layers=4), ((2, 2, R, 1), (2, 1, R, 1, 2))),
    # int8 weights (runtime.quantization) and an int8 KV cache (runtime/kv_cache.py), on
    # both sides: the scales split with their weights' output channels and with their
    # rows' kv heads; stages stack them with the layers; the decode kernel reads the
    # quantized pages per device.
    "llama_int8": (dict(model_type="llama", vocab_size=512, num_attention_heads=8, num_key_value_heads=2,
                        num_hidden_layers=4), ((2, 1, R, 1), (2, 2, R, 1), (2, 1, PL, 1))),
    "gemma3": (dict(model_type="gemma3_text", vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"]), ((2, 1, R, 1), (1, 2, R, 1), (2, 2, PL, 1),
                                                                          (1, 1, PL, 1, 2))),
}
ECFG = EngineConfig(max_num_seqs=4, max_model_len=64, page_size=8, prefill_lengths=(16, 32),
                    prefill_batch_sizes=(1, 2), cache_dtype="float32", num_top_logprobs=2,
                    # One decode variant (serves the greedy requests too): sampling modes do
                    # not touch the sharding, and each variant is a compile per layout.
                    decode_sampling_modes=("filter",),
                    # One decode bucket (all slots) too: buckets slice the slots the same way
                    # on any mesh (tests/sharding/test_tpu_compile.py lowers them all).
                    decode_batch_sizes=(4,))
NUM_PAGES = 12  # three requests admitted together outgrow it: preempted and recomputed
PROMPTS = [list(range(3, 12)), list(range(40, 61)), list(range(100, 140)), list(range(200, 233))]  # 40 > 32: chunked
# The prefix-caching layouts' second round: each prompt of the first round and three more tokens.
SECOND_ROUND = [p + [7, 8, 9] for p in PROMPTS]


def peaked_model(hf: dict):
    cfg = ModelConfig.from_hf({**BASE, **hf})
    graphdef, state = nnx.split(Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    # Large weights: a peaked distribution, so greedy has no near-ties between layouts.
    state = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 and x.shape[0] != cfg.vocab_size else x, state)
    return nnx.merge(graphdef, state)


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def run(engine, rounds=(PROMPTS,)) -> dict:
    """Each round's prompts added together and run to the end, the next round after."""
    orc = Orchestrator(engine, None)
    engine.warmup()
    orc.mark_ready()
    res, cached = {}, 0
    for r, prompts in enumerate(rounds):
        for i, p in enumerate(prompts):
            rid = str(i) if r == 0 else f"{r}.{i}"
            res[rid] = ([], [])
            # The second round with a repetition penalty: its prompt mask takes the cached
            # tokens (Engine.seed_prompt_mask), so tokens still equal one device's uncached.
            sampling = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.3 if r else 1.0)
            orc.add_request(Request(request_id=rid, prompt_ids=p, sampling=sampling, max_tokens=20, ignore_eos=True))
        while orc.has_work():
            for out in orc.step():
                res[out.request_id][0].extend(out.token_ids)
                res[out.request_id][1].extend(out.logprobs)
                cached += out.num_cached_tokens if out.finished else 0
    return dict(res=res, compiles=orc.num_compiles_since_ready, preemptions=orc.scheduler.num_preemptions,
                pages_used=orc.allocator.num_used, cached_tokens=cached)


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
    for name in names:
        hf, sizes = CONFIGS[name]
        model = peaked_model(hf)
        caching = name.endswith("_prefix")
        quant = "int8" if name.endswith("_int8") else None
        rounds = (PROMPTS, SECOND_ROUND) if caching else (PROMPTS,)
        cache_dtype = "int8" if quant else ECFG.cache_dtype
        one = Engine(_copy(model) if quant else model,
                     dataclasses.replace(ECFG, quantization=quant, cache_dtype=cache_dtype), num_pages=NUM_PAGES)
        bases = {R: run(one, rounds)}
        total = bytes_per_device(nnx.state(model))
        layer_total = bytes_per_device(nnx.state(model)["layers"])
        for tp, pp, attention, micro, *data in sizes:
            dp = data[0] if data else 1
            ecfg = dataclasses.replace(ECFG, attention=attention, pipeline_microbatches=micro,
                                       enable_prefix_caching=caching, quantization=quant, cache_dtype=cache_dtype)
            mc = MeshConfig(tensor=tp, pipeline=pp, data=dp)
            check_model(model.cfg, mc)
            mesh = make_mesh(mc)
            sharded = replicate_kv_heads(place_model(model, mesh), mesh)
            # Per data-parallel group fewer pages than one device has: two requests of a
            # group outgrow them, so groups preempt too (one sequence needs at most 8).
            pages = NUM_PAGES if dp == 1 else 10 * dp
            engine = Engine(sharded, ecfg, num_pages=pages,
                            cache_sharding=cache_sharding(sharded.cfg, pages, ECFG.page_size, mesh))
            got = run(engine, rounds)
            if quant and attention not in bases:
                # A quantized cache against one device with the same attention: the flash
                # kernel's fresh prefill reads its keys unquantized, the reference reads them
                # back from the pages (they differ by the cache's rounding, not the sharding).
                bases[attention] = run(Engine(_copy(model), dataclasses.replace(
                    ECFG, attention=attention, quantization=quant, cache_dtype=cache_dtype), num_pages=NUM_PAGES),
                    rounds)
            base = bases[attention] if quant else bases[R]
            params = engine.params
            outer = params["outer"] if pp > 1 else params
            spec = lambda v: str(v.get_value().sharding.spec)  # noqa: E731
            hlo = engine._decode[(ECFG.max_num_seqs, "filter")].lower(engine.param_leaves, engine.cache, engine.slots,
                                                                     engine.io).compile().as_text()
            diffs = [float(np.max(np.abs(np.array(base["res"][k][1]) - np.array(got["res"][k][1])))) for k in base["res"]]
            print(json.dumps(dict(
                config=name, tp=tp, pp=pp, dp=dp, attention=attention, microbatches=micro,
                tokens_equal=all(base["res"][k][0] == got["res"][k][0] for k in base["res"]),
                max_logprob_diff=max(diffs),
                wqkv=spec(params["layers"][0]["attn"]["wqkv"]), w_gate_up=spec(params["layers"][0]["mlp"]["w_gate_up"]),
                w_down=spec(params["layers"][0]["mlp"]["w_down"]), embedding=spec(outer["embedding"]),
                cache=str(jax.tree.leaves(engine.cache)[0].sharding.spec),
                param_bytes_per_device=bytes_per_device(params), param_bytes=total,
                # What the memory planner counts (runtime.startup.build_engine): the placed model.
                planned_param_bytes=bytes_per_device(nnx.state(sharded)),
                layer_bytes_per_device=bytes_per_device(params["layers"]), layer_bytes=layer_total,
                cache_bytes_per_device=bytes_per_device(engine.cache), cache_bytes=bytes_per_device(one.cache),
                group_pages=pages // dp, one_device_pages=NUM_PAGES,
                kv_heads=model.cfg.num_kv_heads, sharded_kv_heads=sharded.cfg.num_kv_heads,
                compiles_after_warmup=got["compiles"], preemptions=got["preemptions"], pages_used=got["pages_used"],
                prefix_caching=caching, cached_tokens=got["cached_tokens"], base_cached_tokens=base["cached_tokens"],
                quantization=quant, cache_dtype=str(jax.tree.leaves(engine.cache)[0].dtype),
                cache_row=jax.tree.leaves(engine.cache)[0].shape[-1],
                cache_scales=str(engine.cache.k[0].scales.sharding.spec) if quant else None,
                cache_scales_shape=list(engine.cache.k[0].scales.shape) if quant else None,
                wqkv_dtype=str(params["layers"][0]["attn"]["wqkv"].get_value().dtype),
                wqkv_scale=spec(params["layers"][0]["attn"]["wqkv_scale"]) if quant else None,
                all_reduce="all-reduce" in hlo, collective_permute="collective-permute" in hlo,
            )), flush=True)


if __name__ == "__main__":
    sys.exit(main())

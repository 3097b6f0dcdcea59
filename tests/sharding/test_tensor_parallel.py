"""Tensor and pipeline parallelism: sharded == one device, and the mesh's checks.

The equivalence runs in a subprocess with 8 simulated CPU devices (tests/sharding/
sharded_check.py): the main test process keeps its one device. Tolerance: both sides compute
in float32 and differ only in the order of the cross-device sums (per-head partial
attention outputs and MLP rows reduced over "tensor"), ~1e-6 on logprobs measured;
1e-4 leaves room without hiding a wrong layout (that changes tokens or logprobs by far more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from runtime.config import ConfigError, ModelConfig
from sharding.mesh import MeshConfig, check_model, kv_replication, make_mesh

ROOT = Path(__file__).resolve().parents[2]
LOGPROB_ATOL = 1e-4
# With an int8 KV cache on both sides: a key or value that float32 rounding of the sharded
# sums puts on the other side of an int8 rounding boundary moves by one step (1/127 of its
# row's largest value), and the logprobs by ~1e-3 (measured 2.6e-3 at TP 2 and TP 2 x PP 2).
KV_INT8_LOGPROB_ATOL = 1e-2


@pytest.fixture(scope="module")
def rows():
    """The check in two processes at once (half the configs each): its compilations are
    mostly single-threaded, so on two cores this halves the wall time."""
    # -O0 as in this process (tests/conftest.py): both sides of every comparison compile in
    # the check's own process, where compiling each layout's programs is most of the time.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()}
    groups = ("llama_gqa,mqa,llama_prefix", "llama_4layers,mistral_window,gemma3,llama_int8")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.sharded_check", g], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for g in groups]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1200)
        assert p.returncode == 0, stderr[-4000:]
        out += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return out


def test_sharded_equals_one_device(rows):
    assert {(r["config"], r["tp"], r["pp"], r["dp"], r["attention"]) for r in rows} == {
        ("llama_gqa", 2, 1, 1, "reference"), ("llama_gqa", 4, 1, 1, "reference"), ("llama_gqa", 8, 1, 1, "reference"),
        ("llama_gqa", 2, 1, 1, "pallas"), ("llama_gqa", 1, 2, 1, "reference"), ("llama_gqa", 2, 1, 2, "reference"),
        ("llama_4layers", 1, 4, 1, "reference"), ("llama_4layers", 2, 2, 1, "reference"),
        ("llama_4layers", 2, 2, 2, "reference"),
        ("mqa", 4, 1, 1, "reference"), ("mqa", 2, 2, 1, "reference"),
        ("mistral_window", 2, 1, 1, "reference"), ("mistral_window", 1, 2, 1, "reference"),
        ("gemma3", 2, 1, 1, "reference"), ("gemma3", 1, 2, 1, "reference"), ("gemma3", 2, 2, 1, "pallas"),
        ("gemma3", 1, 1, 2, "pallas"), ("llama_prefix", 2, 2, 1, "reference"), ("llama_prefix", 2, 1, 2, "reference"),
        ("llama_int8", 2, 1, 1, "reference"), ("llama_int8", 2, 2, 1, "reference"), ("llama_int8", 2, 1, 1, "pallas")}
    assert any(r["microbatches"] > 1 for r in rows)
    for r in rows:
        where = f"{r['config']} TP {r['tp']} PP {r['pp']} DP {r['dp']} {r['attention']}"
        assert r["tokens_equal"], where
        assert r["max_logprob_diff"] < (KV_INT8_LOGPROB_ATOL if r["cache_dtype"] == "int8" else LOGPROB_ATOL), where
        assert r["compiles_after_warmup"] == 0 and r["pages_used"] == 0, where
        assert r["preemptions"] > 0, where  # the workload preempts and recomputes
        # Prefix caching on the sharded engine: the second round found the first's pages
        # (and gave the one-device engine's tokens, without caching, above).
        assert r["cached_tokens"] > 0 if r["prefix_caching"] else r["cached_tokens"] == 0, where
        assert r["base_cached_tokens"] == 0, where
        # int8 weights and KV cache (both sides quantized): the scales split with their
        # weights' kv heads; the cache's values [.., P, S, K, 8] and scales [.., P, K, S] by kv head.
        if r["quantization"]:
            assert r["wqkv_dtype"] == "int8" and "'tensor'" in r["wqkv_scale"], where
            assert r["cache_dtype"] == "int8" and r["cache_row"] == 8 and "'tensor'" in r["cache"], where
            assert "'tensor'" in r["cache_scales"] and r["cache_scales_shape"][-2:] == [r["sharded_kv_heads"], 8], where
        assert r["all_reduce"] or r["tp"] * r["pp"] == 1, f"{where}: the decode step has no cross-device reduction"
        # Stages hand activations on with a collective permute; without stages there is none.
        # (With data-parallel groups the partitioner may also move rows with one.)
        assert r["collective_permute"] == (r["pp"] > 1) or r["dp"] > 1, where


def test_large_tensors_are_split_not_replicated(rows):
    for r in rows:
        where = f"{r['config']} TP {r['tp']} PP {r['pp']} DP {r['dp']} {r['attention']}"
        # Heads and ffw split: q/k/v fused per kv head (runtime.models.transformer.fuse_projections),
        # so kv heads split too (where fewer than the devices, repeated to one per device).
        if r["tp"] > 1:
            assert all("'tensor'" in r[k] for k in ("wqkv", "w_gate_up", "w_down", "cache")), where
        if r["pp"] > 1:  # layers stacked over stages
            assert "'stage'" in r["wqkv"] and "'stage'" in r["cache"], where
        if r["dp"] > 1:  # each data-parallel group holds its own pages
            assert "'data'" in r["cache"] and "'data'" not in r["wqkv"], where
        assert r["sharded_kv_heads"] == max(r["kv_heads"], r["tp"]), where
        # Each device holds its kv heads' share of the one-device cache: 1/TP of it, or
        # one head's worth where kv heads were repeated (MQA at TP 4: all of it).
        heads_per_device = r["sharded_kv_heads"] // r["tp"]
        # Data-parallel layouts: each group's pages only (`group_pages` of them).
        assert (r["cache_bytes_per_device"] * r["kv_heads"] * r["pp"] * r["one_device_pages"]
                == r["cache_bytes"] * heads_per_device * r["group_pages"]), where
        # The planner sizes the KV cache from the placed model's bytes: they must be what
        # the engine holds once staged (a layer or repeated kv head left on every stage
        # would make them differ).
        assert r["planned_param_bytes"] == r["param_bytes_per_device"], where
        # Every device holds 1/(TP x PP) of the layers (more where kv heads are repeated).
        assert r["layer_bytes_per_device"] * r["tp"] * r["pp"] <= 1.3 * r["layer_bytes"], where
        # Each device holds well under the whole model (the embedding and output
        # projection are replicated over stages, and at these tiny sizes they weigh).
        # (Data-parallel groups each hold a whole copy of their split.)
        assert r["param_bytes_per_device"] < 0.8 * r["param_bytes"] or r["tp"] * r["pp"] == 1, where


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=128, hidden_size=64,
                                    **{"intermediate_size": 96, "num_hidden_layers": 1, **kw}))


def test_bad_splits_fail_with_what_would_work():
    with pytest.raises(ConfigError, match=r"num_heads=6 is not divisible by tensor_parallel_size=4; use "
                                          r"tensor_parallel_size in \{1, 2, 3, 6\}"):
        check_model(_cfg(num_attention_heads=6, num_key_value_heads=2), MeshConfig(tensor=4))
    with pytest.raises(ConfigError, match=r"num_kv_heads=3 and tensor_parallel_size=2 do not divide one another"):
        check_model(_cfg(num_attention_heads=6, num_key_value_heads=3), MeshConfig(tensor=2))
    with pytest.raises(ConfigError, match="ffw_dim=100 is not divisible by tensor_parallel_size=8"):
        check_model(_cfg(num_attention_heads=8, num_key_value_heads=8, intermediate_size=100), MeshConfig(tensor=8))
    with pytest.raises(ConfigError, match=r"2 devices, but 1 are present"):
        make_mesh(MeshConfig(tensor=2))
    for kw, what in ((dict(tensor=0), "tensor_parallel_size=0"), (dict(data=0), "data_parallel_size=0")):
        with pytest.raises(ConfigError, match=what):
            MeshConfig(**kw)
    with pytest.raises(ConfigError, match=r"num_layers=1 is not divisible by pipeline_parallel_size=2; use "
                                          r"pipeline_parallel_size in \{1\}"):
        check_model(_cfg(num_attention_heads=8, num_key_value_heads=2), MeshConfig(pipeline=2))
    cfg = _cfg(num_attention_heads=8, num_key_value_heads=2)
    check_model(cfg, MeshConfig(tensor=8))  # fewer kv heads than devices: replicated, allowed
    assert kv_replication(cfg, MeshConfig(tensor=8)) == 4 and kv_replication(cfg, MeshConfig(tensor=2)) == 1


def test_expand_kv_heads_repeats_each_head_for_its_query_group():
    """Device i's query heads (the i-th of TP equal groups) read kv head i of the
    expanded model, which must be the kv head they read before: original head
    (i * N/TP) // (N/K)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from runtime.models.transformer import Transformer
    from sharding.mesh import expand_kv_heads, replicate_kv_heads

    cfg = _cfg(num_attention_heads=8, num_key_value_heads=2, attention_bias=True)
    assert expand_kv_heads(cfg, 2) is cfg and expand_kv_heads(cfg, 8).num_kv_heads == 8
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1, 1, 1), ("stage", "data", "tensor"))  # one device: the repeat alone
    assert replicate_kv_heads(model, mesh) is model
    wk = np.asarray(model.layers[0].attn.wk[...])
    from unittest import mock

    with mock.patch("sharding.mesh.tensor_size", return_value=8):
        big = replicate_kv_heads(model, mesh)
    assert big.cfg.num_kv_heads == 8 and model.cfg.num_kv_heads == 2  # the given model is left as it was
    assert np.asarray(model.layers[0].attn.wk[...]).shape == wk.shape
    new_wk, new_bv = np.asarray(big.layers[0].attn.wk[...]), np.asarray(big.layers[0].attn.bv[...])
    q_per_device, q_per_kv = cfg.num_heads // 8, cfg.num_heads // cfg.num_kv_heads
    for i in range(8):
        orig = (i * q_per_device) // q_per_kv
        np.testing.assert_array_equal(new_wk[i], wk[orig])
        np.testing.assert_array_equal(new_bv[i], np.asarray(model.layers[0].attn.bv[...])[orig])


def test_tensor_size_is_chosen_from_memory_when_not_given():
    """--tensor_parallel_size unset: 1 where the model fits one device, else every device
    (or the most that split the model); the reason is said."""
    from runtime.config import EngineConfig
    from runtime.startup import choose_tensor_size

    ecfg = EngineConfig(max_model_len=256)
    cfg = _cfg(num_attention_heads=8, num_key_value_heads=2)
    auto = MeshConfig(tensor=None)
    assert choose_tensor_size(cfg, ecfg, "bfloat16", auto, num_devices=1, limit_bytes=1)[0] == 1
    n, why = choose_tensor_size(cfg, ecfg, "bfloat16", auto, num_devices=8, limit_bytes=1 << 40)
    assert n == 1 and "fit one device" in why
    n, why = choose_tensor_size(cfg, ecfg, "bfloat16", auto, num_devices=8, limit_bytes=1 << 20)
    assert n == 8 and "do not fit" in why
    # Pipeline stages take their share of the devices first.
    two_layers = _cfg(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)
    assert choose_tensor_size(two_layers, ecfg, "bfloat16", MeshConfig(tensor=None, pipeline=2), num_devices=8,
                              limit_bytes=1 << 20)[0] == 4
    with pytest.raises(ConfigError, match="num_layers=1 is not divisible by pipeline_parallel_size=2"):
        choose_tensor_size(cfg, ecfg, "bfloat16", MeshConfig(tensor=None, pipeline=2), num_devices=8)
    # 6 heads: 8 and 7 do not split them; 6 does.
    odd = _cfg(num_attention_heads=6, num_key_value_heads=2)
    assert choose_tensor_size(odd, ecfg, "bfloat16", auto, num_devices=8, limit_bytes=1 << 20)[0] == 6
    with pytest.raises(ValueError, match="not chosen yet"):
        auto.num_devices
    # Quantized weights are counted as stored: Llama-3.1-8B's 16 GB of bf16 do not fit a
    # 16 GiB chip, its ~9 GB with int8 projections do.
    from runtime.presets import preset_config

    big, chip = preset_config("llama3.1-8b"), 16 << 30
    assert choose_tensor_size(big, ecfg, "bfloat16", auto, num_devices=8, limit_bytes=chip)[0] == 8
    ecfg8 = EngineConfig(max_model_len=256, quantization="int8")
    n, why = choose_tensor_size(big, ecfg8, "bfloat16", auto, num_devices=8, limit_bytes=chip)
    assert n == 1 and "weights (8.5 GiB)" in why, why

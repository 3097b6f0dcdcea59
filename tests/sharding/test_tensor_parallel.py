"""Tensor parallelism: sharded == one device, and the mesh's checks.

The equivalence runs in a subprocess with 8 simulated CPU devices (tests/sharding/
tp_check.py): the main test process keeps its one device. Tolerance: both sides compute
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

import pytest

from runtime.config import ConfigError, ModelConfig
from sharding.mesh import MeshConfig, check_model, kv_replication, make_mesh

ROOT = Path(__file__).resolve().parents[2]
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def rows():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "tests.sharding.tp_check"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_sharded_equals_one_device(rows):
    assert {(r["config"], r["tp"]) for r in rows} == {
        ("llama_gqa", 2), ("llama_gqa", 4), ("llama_gqa", 8), ("mqa", 4), ("mistral_window", 2), ("gemma3", 2)}
    for r in rows:
        where = f"{r['config']} TP {r['tp']}"
        assert r["tokens_equal"], where
        assert r["max_logprob_diff"] < LOGPROB_ATOL, where
        assert r["compiles_after_warmup"] == 0 and r["pages_used"] == 0, where
        assert r["preemptions"] > 0, where  # the workload preempts and recomputes
        assert r["all_reduce"], f"{where}: the decode step has no cross-device reduction"


def test_large_tensors_are_split_not_replicated(rows):
    for r in rows:
        where = f"{r['config']} TP {r['tp']}"
        assert "'tensor'" in r["wq"], where  # query heads split
        assert "'tensor'" in r["w_down"], where
        kv_split = r["config"] != "mqa" and not (r["config"] == "llama_gqa" and r["tp"] > 2)
        assert ("'tensor'" in r["wk"]) == kv_split and ("'tensor'" in r["cache"]) == kv_split, where
        # Each device holds well under the whole model (embedding, norms and replicated
        # kv projections are what is not divided).
        assert r["param_bytes_per_device"] < 0.7 * r["param_bytes"], where


def _cfg(**kw) -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                    **{"intermediate_size": 96, **kw}))


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
    for kw, what in ((dict(tensor=0), "tensor_parallel_size=0"), (dict(pipeline=2), "pipeline stages"),
                     (dict(data=2), "data parallelism")):
        with pytest.raises(ConfigError, match=what):
            MeshConfig(**kw)
    cfg = _cfg(num_attention_heads=8, num_key_value_heads=2)
    check_model(cfg, MeshConfig(tensor=8))  # fewer kv heads than devices: replicated, allowed
    assert kv_replication(cfg, MeshConfig(tensor=8)) == 4 and kv_replication(cfg, MeshConfig(tensor=2)) == 1

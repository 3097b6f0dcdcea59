"""runtime.warmup --target_topology: the serve manifest compiled on this CPU machine for a
TPU slice we do not have (libtpu's compile-only devices), with a memory report per chip,
serialized executables and a versioned manifest; a plan that does not fit fails with the
numbers. Run as a user runs it (a subprocess: libtpu loads into it)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.presets import preset_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
ENGINE = ("--max_num_seqs=4", "--max_model_len=128", "--prefill_lengths=16", "--decode_sampling_modes=filter")


def _warmup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.warmup", *args], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory holding only the config (the warm-up reads nothing else): two
    layers of Llama-shaped heads (head_dim 128, 8 kv heads: one per chip at TP 8)."""
    cfg = dataclasses.replace(preset_config("tiny-llama"), num_layers=2, layer_windows=(None, None), embed_dim=256,
                              num_heads=8, num_kv_heads=8, head_dim=128, ffw_dim=512, vocab_size=1024)
    path = tmp_path_factory.mktemp("small")
    (path / "model_config.json").write_text(cfg.to_json())
    (path / "manifest.json").write_text("{}")
    return path


@pytest.mark.parametrize("topology,kind", [("v5e:2x4", "TPU v5 lite"), ("v6e:2x4", "TPU v6")])
def test_target_topology_compiles_the_manifest_with_a_memory_report(small_checkpoint, tmp_path, topology, kind):
    aot_dir = tmp_path / "aot"
    p = _warmup(f"--checkpoint={small_checkpoint}", f"--target_topology={topology}", f"--aot_dir={aot_dir}", *ENGINE)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    manifest = {"prefill": [[1, 16]], "decode": [[1, "filter"], [4, "filter"]], "mixed": []}  # TP 8: no mixed calls
    assert out["manifest"] == manifest and out["compiled"] == "5 of 5"
    progress = [line for line in p.stderr.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in progress] == [
        "[1/5] prefill [1, 16]", "[2/5] decode [1, 'filter']", "[3/5] decode [4, 'filter']", "[4/5] release []",
        "[5/5] seed_prompt_mask []"]
    memory = out["memory_per_chip"]
    assert memory["weights"] > 0 and memory["kv_cache"] > 0 and memory["temp"] > 0
    assert memory["weights"] + memory["kv_cache"] + memory["temp"] <= memory["hbm"]
    key = out["key"]
    assert (key["platform"], key["num_devices"]) == ("tpu", 8) and key["device_kind"].startswith(kind)
    assert key["mesh"] == {"stage": 1, "data": 1, "tensor": 8} and key["libtpu"]
    assert {"jax", "jaxlib", "libtpu", "model", "engine", "num_pages"} <= set(key)
    written = json.loads((aot_dir / "manifest.json").read_text())
    assert written["key"] == key and written["topology"] == topology and written["not_serialized"] == []
    assert len(written["executables"]) == 5
    for entry in written["executables"]:
        assert (aot_dir / entry["file"]).stat().st_size > 1000, entry


def test_target_topology_fits_check_fails_with_the_numbers():
    """Llama-3.1-8B's 16 GB of bf16 weights do not leave room on one 16 GiB v5e chip."""
    p = _warmup("--checkpoint=preset:llama3.1-8b", "--target_topology=v5e:1x1", *ENGINE)
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: v5e:1x1 (1 x TPU v5 lite, 16.0 GiB each)") and "GiB" in line, line


@pytest.mark.slow
def test_target_topology_fits_llama8b_int8_on_one_v5e_chip():
    """With int8 projections the same model fits one 16 GiB v5e chip: the memory report
    says how (about 8.5 GiB of weights, the rest KV cache and temporaries)."""
    p = _warmup("--checkpoint=preset:llama3.1-8b", "--target_topology=v5e:1x1", "--quantization=int8", *ENGINE)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    memory = out["memory_per_chip"]
    assert 8.0 * 2**30 < memory["weights"] < 9.0 * 2**30, memory
    assert memory["weights"] + memory["kv_cache"] + memory["temp"] <= memory["hbm"] == 16 * 2**30, memory
    assert out["compiled"] == "7 of 7"  # one chip: the mixed calls too


def test_target_topology_bad_input_is_one_line(small_checkpoint):
    p = _warmup(f"--checkpoint={small_checkpoint}", "--target_topology=v5e:3x3", *ENGINE)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --target_topology=v5e:3x3")
    # --aot_dir alone writes this machine's executables (tests/runtime/test_aot_dir.py).

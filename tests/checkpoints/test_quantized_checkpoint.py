"""Quantized checkpoints (checkpoints.converter --quantize, checkpoints.load): linear
weights stored int8 / fp8 with per-output-channel scales, restored quantized, and the
same weights, scales and logits as quantizing the float checkpoint at load; GGUF Q8_0
sources convert to int8 by default with the requantization error reported; corrupt
scales and mismatched modes fail with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
import checkpoints.converter as converter
from checkpoints.errors import CheckpointError
from runtime.config import ConfigError, EngineConfig
from runtime.quantization import quantize_model
from runtime.startup import build_engine
from tests.checkpoints.helpers import PROMPT, logits, random_hf_model, write_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny random Llama as a Hugging Face directory, a GGUF with Q8_0 linear weights
    (float32 elsewhere), and a Gemma 3 directory (q/k norms, 3 layers, head_dim 32)."""
    d = tmp_path_factory.mktemp("sources")
    llama = random_hf_model("llama")
    llama.save_pretrained(d / "llama", safe_serialization=True)
    write_gguf(llama, d / "q8.gguf", quant={"attn_": "Q8_0", "ffn_": "Q8_0"})
    write_gguf(llama, d / "f32.gguf")
    random_hf_model("gemma3", seed=1).save_pretrained(d / "gemma3", safe_serialization=True)
    return d


def _flat(model) -> dict:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_stored_quantized_equals_quantized_at_load(sources, tmp_path, kind, mode):
    """Quantizing the separate q/k/v and gate/up weights (the checkpoint's form) and then
    fusing weights and scales gives exactly what fusing and then quantizing gives (one
    scale per output channel either way): the same arrays, so the same logits."""
    converter.convert(sources / kind, tmp_path / "float", "float32", quantize="none")
    converter.convert(sources / kind, tmp_path / "q", "float32", quantize=mode)
    manifest = converter.read_manifest(tmp_path / "q")
    assert manifest["quantization"] == mode and 0 < manifest["quantization_error"]["max"] < 0.05
    assert "layers/0/attn/wq_scale" in manifest["params"] and "layers/0/mlp/w_down_scale" in manifest["params"]
    _, stored = checkpoints.load(tmp_path / "q")
    assert str(stored.layers[0].attn.wq.get_value().dtype) == {"int8": "int8", "fp8": "float8_e4m3fn"}[mode]
    assert stored.embedding.get_value().dtype == jnp.float32  # embeddings and norms stay float
    _, at_load = checkpoints.load(tmp_path / "float")
    quantize_model(at_load, mode)
    quantize_model(stored, mode)  # fuses the stored weights with their scales
    want, got = _flat(at_load), _flat(stored)
    assert set(want) == set(got)
    for path in want:
        assert want[path].dtype == got[path].dtype, path
        np.testing.assert_array_equal(np.asarray(got[path], np.float32), np.asarray(want[path], np.float32),
                                      err_msg=str(path))
    np.testing.assert_array_equal(logits(stored), logits(at_load))
    # The checkpoint's linear weights take 1 byte each, not 4.
    size = lambda p: sum(f.stat().st_size for f in (p / "params").rglob("*") if f.is_file())  # noqa: E731
    assert size(tmp_path / "q") < 0.6 * size(tmp_path / "float")


def test_unfused_quantized_model_runs_as_fused(sources, tmp_path):
    """The model as restored (separate quantized q/k/v, gate/up) computes the same logits
    as its fused form, up to float32 rounding of the split matmuls."""
    converter.convert(sources / "llama", tmp_path / "q", "float32", quantize="int8")
    _, unfused = checkpoints.load(tmp_path / "q")
    want = logits(unfused)
    _, fused = checkpoints.load(tmp_path / "q")
    quantize_model(fused, "int8")
    np.testing.assert_allclose(logits(fused), want, atol=1e-4, rtol=1e-4)


def test_gguf_q8_0_converts_to_int8_by_default(sources, tmp_path):
    """A GGUF whose linear weights are Q8_0 is stored int8 (requantized per output channel
    from the Q8_0 values: the manifest reports the error) unless told otherwise; the
    logits stay within int8 rounding of the float conversion of the same file."""
    converter.convert(sources / "q8.gguf", tmp_path / "auto", "float32")
    manifest = converter.read_manifest(tmp_path / "auto")
    assert manifest["quantization"] == "int8"
    error = manifest["quantization_error"]
    assert 0 < error["mean"] <= error["max"] < 0.02, error  # measured ~0.004-0.005
    converter.convert(sources / "q8.gguf", tmp_path / "float", "float32", quantize="none")
    assert "quantization" not in converter.read_manifest(tmp_path / "float")
    converter.convert(sources / "f32.gguf", tmp_path / "f32", "float32")  # auto: float32 source stays float
    assert "quantization" not in converter.read_manifest(tmp_path / "f32")
    _, q = checkpoints.load(tmp_path / "auto")
    _, f = checkpoints.load(tmp_path / "float")
    got, want = logits(q), logits(f)
    # int8 rounding of every linear weight (~0.5% relative) moves the logits by about that
    # much of their spread; a wrong scale or layout moves them by their whole size.
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want)), np.max(np.abs(got - want))
    assert (np.argmax(got, -1) == np.argmax(want, -1)).mean() >= 0.9


def test_a_corrupt_scale_is_rejected(sources, tmp_path, monkeypatch):
    import runtime.quantization as quantization

    real = quantization.quantize

    def bad(w, in_axes, mode):  # the first weight's scales: NaN and a negative one
        q, s = real(w, in_axes, mode)
        if w.shape[-1] == 64 and w.ndim == 3 and not bad.done:
            bad.done = True
            s = s.at[0].set(jnp.nan).at[-1].set(-1.0)
        return q, s

    bad.done = False
    monkeypatch.setattr(quantization, "quantize", bad)
    converter.convert(sources / "llama", tmp_path / "q", "float32", quantize="int8")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="_scale holds scales that are not finite and positive"):
        checkpoints.load(tmp_path / "q")


def test_a_scale_of_the_wrong_shape_is_rejected(sources, tmp_path):
    converter.convert(sources / "llama", tmp_path / "q", "float32", quantize="int8")
    path = tmp_path / "q" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["params"]["layers/1/mlp/w_up_scale"] = [95]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layers/1/mlp/w_up_scale is stored with shape \[95\]"):
        checkpoints.load(tmp_path / "q")
    manifest["quantization"] = "int4"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="quantization 'int4' is not one xlserve reads"):
        checkpoints.load(tmp_path / "q")


def test_serving_mode_must_match_the_stored_one(sources, tmp_path):
    """An int8 checkpoint serves as int8 (no flag, or the same mode: nothing changes);
    asking for fp8 is a configuration error that says what to do."""
    converter.convert(sources / "llama", tmp_path / "q", "float32", quantize="int8")
    ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, prefill_lengths=(16,), decode_batch_sizes=(2,),
                        attention="reference")
    for mode in (None, "int8"):
        _, model = checkpoints.load(tmp_path / "q")
        engine = build_engine(model, EngineConfig(**{**ecfg.__dict__, "quantization": mode}))
        layer = engine.params["layers"][0]
        assert layer["attn"]["wqkv"].get_value().dtype == jnp.int8 and "wq_scale" not in layer["attn"]
        assert layer["attn"]["wqkv_scale"].get_value().shape == layer["attn"]["wqkv"].get_value().shape[1:]
    _, model = checkpoints.load(tmp_path / "q")
    with pytest.raises(ConfigError, match="stored int8; they cannot be quantized to fp8"):
        build_engine(model, EngineConfig(**{**ecfg.__dict__, "quantization": "fp8"}))


def test_convert_cli_reports_the_quantization(sources, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "checkpoints.convert", *args], cwd=ROOT, capture_output=True,
                              text=True, env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                                              "PATH": "/usr/bin:/bin"}, timeout=300)

    p = run(f"--source={sources / 'llama'}", f"--output={tmp_path / 'q'}", "--quantize=fp8")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "linear weights fp8 (relative error mean 0.0" in p.stdout and "the rest bfloat16" in p.stdout
    p = run(f"--source={sources / 'llama'}", f"--output={tmp_path / 'x'}", "--quantize=int4")
    assert p.returncode == 2 and "--quantize" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sharded_quantized_checkpoint_matches_one_device(sources, tmp_path):
    """Restored onto a 4-device tensor-parallel mesh (its 2 kv heads repeated to 4, their
    scales with them), the int8 checkpoint gives one device's tokens."""
    converter.convert(sources / "llama", tmp_path / "q", "float32", quantize="int8")
    code = f"""
import dataclasses, json, numpy as np
import checkpoints
from runtime.config import EngineConfig
from runtime.orchestrator import Orchestrator, Request
from runtime.sampling import SamplingParams
from runtime.startup import build_engine
from sharding.mesh import MeshConfig, make_mesh
ecfg = EngineConfig(max_num_seqs=2, max_model_len=64, prefill_lengths=(16,), decode_batch_sizes=(2,),
                    attention="reference")
def tokens(mesh):
    _, model = checkpoints.load({str(tmp_path / 'q')!r}, mesh=mesh)
    orc = Orchestrator(build_engine(model, ecfg, mesh=mesh), None)
    orc.add_request(Request("r", {PROMPT!r}, SamplingParams(temperature=0.0), max_tokens=8, ignore_eos=True))
    out = []
    while orc.has_work():
        out += [t for o in orc.step() for t in o.token_ids]
    return out
print(json.dumps([tokens(None), tokens(make_mesh(MeshConfig(tensor=4)))]))
"""
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    one, sharded = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(one) == 8 and sharded == one


def test_abstract_quantized_model_matches_the_stored_shapes(sources, tmp_path):
    """checkpoints.mapping.expected_params with a mode (what load checks the manifest
    against) lists exactly what the converter stores."""
    from checkpoints.mapping import expected_params

    converter.convert(sources / "gemma3", tmp_path / "q", "bfloat16", quantize="fp8")
    manifest = converter.read_manifest(tmp_path / "q")
    cfg = checkpoints.read_config(tmp_path / "q")
    from checkpoints import orbax_io

    want = {orbax_io.path_key(p): list(v.shape) for p, v in expected_params(cfg, quantization="fp8").items()}
    assert want == manifest["params"]
    assert jax.tree.leaves(want)  # not empty

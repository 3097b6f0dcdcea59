"""The serving form of a model (runtime.models.transformer.fuse_projections): q/k/v and
gate/up each one weight. It must compute exactly what the checkpoint's form computes,
for every head layout and bias option, alone and with kv heads repeated for tensor
parallelism; abstract models (ahead-of-time compilation) must get the same shapes.

Exactness: the fused GEMV computes each output element as the same dot product over
the embedding axis as the separate one, so float32 on CPU agrees to the last bit in
the runs below (asserted with a 1e-6 relative bound, which a wrong head order misses by
orders of magnitude)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runtime.kv_cache import KVCache
from runtime.models.layers import QKV_LAYOUTS, _qkv_bias, repeat_fused_kv_heads
from runtime.models.transformer import Transformer, abstract_model, fuse_projections
from runtime.presets import preset_config

# (query heads, kv heads, qkv/mlp bias): GQA, MQA, MHA, an odd group of 3, biases (Qwen2).
LAYOUTS = [(4, 2, False), (4, 1, False), (4, 4, False), (6, 2, True), (3, 3, True)]


def _config(n: int, k: int, bias: bool):
    cfg = preset_config("tiny-llama")
    return dataclasses.replace(cfg, num_heads=n, num_kv_heads=k, qkv_bias=bias, mlp_bias=bias)


def _randomize_biases(model: Transformer) -> None:
    """Biases start at zero, where a misplaced one would not show."""
    key = jax.random.key(7)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] in ("bq", "bk", "bv", "b_gate", "b_up", "b_down"):
            key, sub = jax.random.split(key)
            var.set_value(jax.random.normal(sub, var.get_value().shape, var.get_value().dtype))


def _forward(model: Transformer, T: int = 7):
    cfg = model.cfg
    B = 2
    tokens = (jnp.arange(B * T).reshape(B, T) * 37) % cfg.vocab_size
    positions = jnp.tile(jnp.arange(T), (B, 1))
    cache = KVCache.create(cfg, num_pages=8, page_size=4, dtype=jnp.float32)
    table = jnp.arange(8).reshape(B, 4)
    logits, cache = model(tokens, positions, cache, table, jnp.full((B,), T))
    return np.asarray(logits), [np.asarray(x) for x in cache.k + cache.v]


@pytest.mark.parametrize("platform", ["gpu", "tpu"])  # the fused weights' layout (layers.QKV_LAYOUTS)
@pytest.mark.parametrize("n,k,bias", LAYOUTS)
def test_fused_forward_equals_unfused(n, k, bias, platform):
    model = Transformer(_config(n, k, bias), dtype=jnp.float32, rngs=nnx.Rngs(3))
    if bias:
        _randomize_biases(model)
    want_logits, want_cache = _forward(model)
    fuse_projections(model, platform=platform)
    D, F = model.cfg.embed_dim, model.cfg.ffw_dim
    qkv, gate_up = model.layers[0].attn.wqkv.get_value().shape, model.layers[0].mlp.w_gate_up.get_value().shape
    assert (qkv[0], gate_up[0]) == ((D, D) if platform == "gpu" else (n // k + 2, 2)) and gate_up[-1] == F
    names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert {"wqkv", "w_gate_up"} <= names and not names & {"wq", "wk", "wv", "w_gate", "w_up", "bq", "b_gate"}
    assert ("bqkv" in names) == bias
    got_logits, got_cache = _forward(model)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_cache, want_cache):  # k and v land in the same pages
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    before = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    fuse_projections(model)  # a second time changes nothing
    after = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    assert before.keys() == after.keys() and all(before[p] is after[p] for p in before)


def test_fused_bfloat16_matches_unfused():
    model = Transformer(_config(4, 2, False), dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    want, _ = _forward(model)
    got, _ = _forward(fuse_projections(model))
    # bf16 outputs of the same dot products; allow one bf16 rounding step of the logits.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("r", [2, 4])
def test_repeated_kv_heads_of_fused_weights(r):
    """Repeating kv heads of the fused weight (tensor parallelism with fewer kv heads
    than devices) == fusing the repeated separate weights."""
    D, N, K, H = 8, 8, 2, 4
    rng = np.random.default_rng(0)
    wq, wk, wv = rng.normal(size=(D, N, H)), rng.normal(size=(K, H, D)), rng.normal(size=(K, H, D))
    bq, bk, bv = rng.normal(size=(N, H)), rng.normal(size=(K, H)), rng.normal(size=(K, H))
    for layout in ("gpu", "tpu"):
        fuse, _, axes = QKV_LAYOUTS[layout]
        np.testing.assert_array_equal(repeat_fused_kv_heads(fuse(wq, wk, wv), r, axes),
                                      fuse(wq, np.repeat(wk, r, 0), np.repeat(wv, r, 0)))
    np.testing.assert_array_equal(repeat_fused_kv_heads(_qkv_bias(bq, bk, bv), r, ("kv_heads", "qkv", "head_dim")),
                                  _qkv_bias(bq, np.repeat(bk, r, 0), np.repeat(bv, r, 0)))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_abstract_model_fuses_to_the_same_shapes(platform):
    cfg = _config(6, 2, True)
    real = fuse_projections(Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), platform=platform)
    abstract = fuse_projections(abstract_model(cfg, jnp.bfloat16), platform=platform)
    shapes = lambda m: {p: (v.get_value().shape, v.get_value().dtype) for p, v in nnx.to_flat_state(nnx.state(m))}  # noqa: E731
    assert shapes(real) == shapes(abstract)

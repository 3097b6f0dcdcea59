"""Mixed calls (runtime.engine._mixed): decode rows and a prefill chunk in one forward
pass over the flat token axis (runtime.models.layers.Segment) compute what the two calls
compute apart: the same logits and the same cache, per model family (sliding windows,
q/k norms, biases, Gemma's norms), fused and unfused projections, fresh and continued
chunks, with an idle decode row that must write nothing.

Tolerance: float32 throughout; the mixed call runs the same ops on the same values, but
XLA may block the projections differently for N = rows + chunk tokens than for either
alone, so sums can round differently: 1e-5 relative on logits of O(1-10)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runtime.config import ModelConfig
from runtime.kv_cache import KVCache
from runtime.models.layers import Segment
from runtime.models.transformer import Transformer, fuse_projections

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, num_hidden_layers=2)
FAMILIES = {
    "llama": dict(model_type="llama", **COMMON),
    "mistral_window": dict(model_type="mistral", **COMMON, sliding_window=5, head_dim=16),
    "qwen2_bias": dict(model_type="qwen2", **COMMON),
    "qwen3_qk_norm": dict(model_type="qwen3", **COMMON, head_dim=16),
    "gemma3": dict(model_type="gemma3_text", **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=24, rope_theta=100000.0, rope_local_base_freq=1000.0),
}
PAGE = 4
MP = 8  # 32 tokens per sequence at most


def build(family: str, fused: bool, seed: int = 0) -> Transformer:
    cfg = ModelConfig.from_hf(FAMILIES[family])
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    # Weights off their init (norm scales and biases too) so every term matters.
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    model = nnx.merge(graphdef, state)
    return fuse_projections(model) if fused else model


def cached_state(model: Transformer, prompt_lens, rng):
    """A cache holding each sequence's prompt (stale values elsewhere), their page tables."""
    cfg = model.cfg
    B = len(prompt_lens)
    perm = rng.permutation(B * MP + 2)
    table = perm[: B * MP].reshape(B, MP).astype(np.int32)
    cache = KVCache.create(cfg, num_pages=B * MP + 2, page_size=PAGE, dtype=jnp.float32)
    cache = jax.tree.map(lambda x: jnp.full_like(x, 1e3), cache)  # stale: must never be read
    T = max(max(prompt_lens), 1)
    tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    _, cache = jax.jit(lambda m, *a: m(*a))(model, tokens, positions, cache, table, np.asarray(prompt_lens, np.int32))
    return cache, table


# The serving form (fused projections) for every family, fresh chunks and chunks that
# continue 6 cached tokens; the checkpoint form for two.
CASES = [(f, True, start) for f in FAMILIES for start in (0, 6)] + [("llama", False, 6), ("qwen2_bias", False, 0)]


@pytest.mark.parametrize("family, fused, start", CASES)
def test_mixed_forward_equals_decode_then_prefill(family, fused, start):
    rng = np.random.default_rng(3)
    model = build(family, fused)
    V = model.cfg.vocab_size
    # Rows 0-2 decode (row 1 idle: length 0), row 3's prompt continues at `start`.
    lengths = np.array([5, 0, 11], np.int32)
    cache, table = cached_state(model, [5, 0, 11, start], rng)
    d_table, p_table = table[:3], table[3:]
    d_tok = rng.integers(1, V, (3, 1)).astype(np.int32)
    d_kv = np.where(lengths > 0, lengths + 1, 0).astype(np.int32)
    T, n = 8, 7  # the chunk: 7 tokens padded to 8
    p_tok = np.zeros((1, T), np.int32)
    p_tok[0, :n] = rng.integers(1, V, n)
    p_pos = (start + np.arange(T, dtype=np.int32))[None]
    p_kv = np.array([start + n], np.int32)
    logits_at = np.array([n - 1], np.int32)

    @jax.jit
    def apart(model, cache):
        d_logits, cache = model(d_tok, lengths[:, None], cache, d_table, d_kv, logits_at=jnp.zeros(3, jnp.int32))
        p_logits, cache = model(p_tok, p_pos, cache, p_table, p_kv, logits_at=logits_at)
        return jnp.concatenate([d_logits, p_logits]), cache

    @jax.jit
    def mixed(model, cache):
        segments = (Segment(d_table, lengths[:, None], d_kv, 3, 1, False), Segment(p_table, p_pos, p_kv, 1, T, start == 0))
        tokens = jnp.concatenate([d_tok[:, 0], p_tok[0]])[None]
        positions = jnp.concatenate([lengths, p_pos[0]])[None]
        at = jnp.concatenate([jnp.arange(3), 3 + logits_at])
        return model(tokens, positions, cache, None, None, logits_at=at, segments=segments)

    want_logits, want_cache = apart(model, cache)
    got_logits, got_cache = mixed(model, cache)
    active = [0, 2, 3]  # the idle row's logits are unused
    np.testing.assert_allclose(np.asarray(got_logits)[active], np.asarray(want_logits)[active], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The idle row and the chunk's padding wrote nothing: stale values where nobody wrote.
    unused = sorted(set(range(table.size + 2)) - set(table[[0, 2, 3]].ravel()))
    for pages in jax.tree.leaves(got_cache):
        assert np.all(np.asarray(pages)[unused] == 1e3)

"""Logit parity with Hugging Face transformers on tiny random configs.

Each config is built with transformers' own config class, the torch model is randomly
initialised, and its weights go through checkpoints.mapping (the same path conversion
uses). We prefill a ragged batch across page boundaries, then run 16 cached decode
steps, and compare every position against the torch model's full causal forward of
each sequence alone (eager attention, float32).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from checkpoints.mapping import convert_tensors, model_from_params  # noqa: E402
from runtime.config import ModelConfig  # noqa: E402
from tests.utils import prefill_then_decode  # noqa: E402

VOCAB = 160
PROMPT_LENS = (11, 7, 3, 1)  # ragged; page size 4: crosses page boundaries, one single-token prompt
DECODE_STEPS = 16
PAGE_SIZE = 4

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)


def _configs():
    T = transformers
    return {
        "llama3_rope_scaling": T.LlamaConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        "llama_mqa_tied": T.LlamaConfig(
            **{**COMMON, "num_key_value_heads": 1}, num_hidden_layers=2, tie_word_embeddings=True
        ),
        "mistral_window": T.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=5, head_dim=16),
        "qwen2": T.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False),
        "qwen3": T.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False),
        "gemma3": T.Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=3,
            head_dim=32,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            rope_theta=100000.0,
            rope_local_base_freq=1000.0,
        ),
    }


_HF_FOR_CONFIG = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "Gemma3TextConfig": "Gemma3ForCausalLM",
}


def _randomize(model: "torch.nn.Module", seed: int):
    """Weights far from init (norm scales and biases included) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                center = 1.0 if ("norm" in name and "Gemma" not in type(model).__name__) else 0.0
                p.copy_(center + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def build_pair(name: str, seed: int = 0):
    hf_config = _configs()[name]
    cls = getattr(transformers, _HF_FOR_CONFIG[type(hf_config).__name__])
    torch.manual_seed(seed)
    hf_model = cls(hf_config).eval()
    _randomize(hf_model, seed)
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    tensors = ((k, v.detach().numpy()) for k, v in hf_model.state_dict().items())
    params = dict(convert_tensors(cfg, tensors))
    return hf_model, cfg, params


def hf_full_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def _sequences(seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
    continuations = [rng.integers(0, VOCAB, DECODE_STEPS).tolist() for _ in PROMPT_LENS]
    return prompts, continuations


@pytest.mark.parametrize("name", sorted(_configs()))
def test_float32_parity_prefill_and_decode(name):
    hf_model, cfg, params = build_pair(name)
    model = model_from_params(cfg, params, jnp.float32)
    prompts, continuations = _sequences(1)
    ours = prefill_then_decode(model, prompts, continuations, page_size=PAGE_SIZE, cache_dtype=jnp.float32)
    for p, c, got in zip(prompts, continuations, ours):
        want = hf_full_logits(hf_model, p + c)
        assert got.shape == want.shape
        # float32 throughout: differences are summation order only (~1e-6 relative).
        err = np.max(np.abs(got - want))
        assert err <= 1e-4 * np.max(np.abs(want)), (name, len(p), err, np.max(np.abs(want)))


def test_config_windows_and_rope_are_read():
    cfg = ModelConfig.from_hf(_configs()["gemma3"].to_dict())
    assert cfg.layer_windows == (4, None, 4)
    assert cfg.local_rope.theta == 1000.0 and cfg.rope.theta == 100000.0
    assert cfg.attn_scale == pytest.approx(24**-0.5)
    cfg = ModelConfig.from_hf(_configs()["mistral_window"].to_dict())
    assert cfg.layer_windows == (5, 5)
    cfg = ModelConfig.from_hf(_configs()["llama3_rope_scaling"].to_dict())
    assert cfg.rope.kind == "llama3" and cfg.rope.original_max_position == 16


@pytest.mark.parametrize("name", ["llama3_rope_scaling", "gemma3"])
def test_bfloat16_parity(name):
    """bf16 weights and activations vs the float32 truth.

    bf16 keeps 8 significant bits (relative rounding 2^-9 per operation). Through a
    few layers the rounding errors add up to around 1% of the logit scale, and any
    implementation pays it: transformers itself in bf16 is the yardstick. We require
    our error against float32 to be no worse than 2x transformers' own bf16 error
    (plus 0.5% of the logit scale for the different, equally valid, rounding points).
    """
    hf_model, cfg, params = build_pair(name)
    model = model_from_params(cfg, params, jnp.bfloat16)
    prompts, continuations = _sequences(2)
    ours = prefill_then_decode(model, prompts, continuations, page_size=PAGE_SIZE, cache_dtype=jnp.bfloat16)
    hf_bf16 = build_pair(name)[0].to(torch.bfloat16)
    for p, c, got in zip(prompts, continuations, ours):
        truth = hf_full_logits(hf_model, p + c)
        scale = np.max(np.abs(truth))
        hf_err = np.max(np.abs(hf_full_logits(hf_bf16, p + c) - truth))
        err = np.max(np.abs(got - truth))
        assert err <= 2 * hf_err + 5e-3 * scale, (name, err, hf_err, scale)
        assert err <= 5e-2 * scale, (name, err, scale)

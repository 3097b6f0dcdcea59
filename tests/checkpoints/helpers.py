"""Tiny random Hugging Face models and GGUF files for the checkpoint tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from checkpoints.mapping import convert_tensors, model_from_params
from runtime.config import ModelConfig
from runtime.kv_cache import KVCache

VOCAB = 128
PROMPT = [1, 5, 9, 17, 33, 65, 127, 2, 40, 41, 42]  # 11 tokens: crosses pages of 4

LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
GEMMA3 = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
    rope_theta=100000.0, rope_local_base_freq=1000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)  # fmt: skip


def random_hf_model(kind: str, seed: int = 0):
    """A transformers model with every weight (norms included) randomised."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json (+ tokenizer_config.json) over the tiny vocabulary."""
    import tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def reference_params(model_dir: Path, cfg: ModelConfig) -> dict:
    """{our path: float32 array} read with the safetensors library itself (not our reader)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return dict(convert_tensors(cfg, iter(tensors.items())))


def state_dict_params(model, cfg: ModelConfig) -> dict:
    """{our path: float32 array} from a torch model's state dict."""
    sd = ((k, v.detach().float().numpy()) for k, v in model.state_dict().items())
    return dict(convert_tensors(cfg, sd))


_forward = jax.jit(lambda model, *args: model(*args))


def logits(model, tokens=PROMPT) -> np.ndarray:
    """float32 logits [T, V] of one prompt, prefilled through the paged cache."""
    page_size, T = 4, len(tokens)
    pages = -(-T // page_size)
    cache = KVCache.create(model.cfg, num_pages=pages, page_size=page_size, dtype=model.embedding[...].dtype)
    out, _ = _forward(
        model,
        jnp.asarray([tokens], jnp.int32),
        jnp.arange(T, dtype=jnp.int32)[None],
        cache,
        jnp.arange(pages, dtype=jnp.int32)[None],
        jnp.asarray([T], jnp.int32),
    )
    return np.asarray(out[0])


def reference_logits(cfg: ModelConfig, params: dict, dtype) -> np.ndarray:
    return logits(model_from_params(cfg, params, dtype))


# --- GGUF -----------------------------------------------------------------------------

_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}  # fmt: skip
_GGUF_LLAMA = {**_GGUF_BLOCK, "post_attention_layernorm": "ffn_norm"}
_GGUF_GEMMA3 = {
    **_GGUF_BLOCK, "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}  # fmt: skip


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows (rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, *, quant: dict[str, str] | None = None, arch: str | None = None,
               metadata: dict[str, float] | None = None) -> None:
    """Writes a torch model the way llama.cpp's converter would (names, permutation, 1 + w norms).

    `quant` maps a substring of the GGUF tensor name to a quantization type name (default F32).
    `metadata`: further keys (ints as uint32, floats as float32), e.g. general.sampling.*.
    """
    hf = model.config
    real_arch = "llama" if hf.model_type == "llama" else "gemma3"
    arch = arch or real_arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf.num_hidden_layers)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_vocab_size(hf.vocab_size)
    w.add_bos_token_id(hf.bos_token_id)
    w.add_eos_token_id(hf.eos_token_id)
    for key, value in (metadata or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(key, value)
    if hf.pad_token_id is not None:
        w.add_pad_token_id(hf.pad_token_id)
    if real_arch == "llama":
        w.add_rope_freq_base(hf.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(hf.hidden_size // hf.num_attention_heads)
        names = _GGUF_LLAMA
    else:
        w.add_rope_freq_base(hf.rope_parameters["full_attention"]["rope_theta"])
        w.add_key_length(hf.head_dim)
        w.add_value_length(hf.head_dim)
        w.add_sliding_window(hf.sliding_window)
        names = _GGUF_GEMMA3
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "lm_head.weight":
            if hf.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{names[module]}.{suffix}"
        if real_arch == "llama" and ".attn_q." in gname:
            a = _llama_cpp_permute(a, hf.num_attention_heads)
        elif real_arch == "llama" and ".attn_k." in gname:
            a = _llama_cpp_permute(a, hf.num_key_value_heads)
        if real_arch == "gemma3" and gname.endswith("norm.weight"):
            a = a + 1.0
        qname = next((q for key, q in (quant or {}).items() if key in gname), "F32")
        if qname == "F32":
            w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
        elif qname == "F16":
            w.add_tensor(gname, np.ascontiguousarray(a, np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[qname]
            q = gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

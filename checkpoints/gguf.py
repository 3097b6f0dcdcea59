"""Reads a llama.cpp GGUF file: metadata -> HF-style config, tensors -> HF names and layouts.

The file is memory-mapped; tensors are dequantized one at a time (with
`gguf.quants.dequantize`), in row chunks, straight into the requested dtype. What
llama.cpp's converter changed is undone so that our weights equal what transformers
loads with `from_pretrained(dir, gguf_file=...)`:

- GGUF lists dims innermost first; in numpy order a linear weight is HF's [out, in].
- llama: q/k rows were permuted from rotate-half order into interleaved pairs (ggml's
  "normal" RoPE mode); we permute them back.
- gemma3: every RMSNorm weight was stored as 1 + w; we subtract 1 (in float32, before
  rounding to the output dtype, as transformers does).
- gemma3: the file lacks the sliding pattern (5 local : 1 global), the local RoPE base
  (10000) and query_pre_attn_scalar; we use llama.cpp's values for those.

The header is parsed here rather than by gguf.GGUFReader, which makes numpy views of
every vocabulary entry (for Gemma's 262k tokens that takes ~15 s and ~700 MB) and keeps
the whole file mapped, so every page read stays in the process's resident set.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from checkpoints.errors import CheckpointError
from runtime.config import RopeConfig

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[n]
    for n in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)
_CHUNK_ELEMENTS = 16 * 2**20  # dequantize at most this many values (64 MiB of float32) at a time

# GGUF block tensor -> HF module path (without ".weight"/".bias"), per architecture.
_COMMON_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_BLOCK_NAMES = {
    "llama": {**_COMMON_BLOCK, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_COMMON_BLOCK,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONFIG_TENSORS = ("rope_freqs.weight",)  # configuration stored as a tensor (read by hf_config)
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")

# GGUF metadata value types -> struct format (little-endian); 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_ARRAY = 4096  # longer metadata arrays (the vocabulary) are skipped, not stored


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    tensor_type: GGMLQuantizationType
    file: Path
    start: int  # byte range [start, start + nbytes) in the file
    nbytes: int

    @property
    def data(self) -> np.ndarray:
        """The stored bytes, memory-mapped afresh on each access so the pages read leave
        the process once the array is dropped: float32/float16 arrays in numpy order, else
        uint8 [rows, bytes per row] as gguf.quants.dequantize expects."""
        raw = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.start, shape=(self.nbytes,))
        if self.tensor_type == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(self.shape[::-1])
        if self.tensor_type == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(self.shape[::-1])
        return raw.reshape(math.prod(self.shape) // self.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, Any]  # metadata; arrays longer than _MAX_ARRAY hold None
    tensors: list[GGUFTensor]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Memory-maps a GGUF file; a missing, foreign, truncated or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: expected a .gguf file or a Hugging Face model directory")
    size = path.stat().st_size
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    try:
        fields, tensors = _parse(buf, path)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{path} is truncated or corrupt: cannot read its GGUF header ({size} bytes; {e})"
        ) from None
    return GGUFFile(path, fields, tensors)


def _parse(buf: np.ndarray, path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    mem = memoryview(buf)
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mem, 4)
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")

    def string(off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", mem, off)
        if off + 8 + n > len(mem):
            raise ValueError("a string runs past the end of the file")
        return bytes(mem[off + 8 : off + 8 + n]).decode("utf-8"), off + 8 + n

    def value(off: int, ty: int) -> tuple[Any, int]:
        if ty == 8:
            return string(off)
        if ty in _SCALARS:
            return struct.unpack_from("<" + _SCALARS[ty], mem, off)[0], off + struct.calcsize(_SCALARS[ty])
        if ty != 9:
            raise ValueError(f"unknown metadata value type {ty}")
        item, n = struct.unpack_from("<IQ", mem, off)
        off += 12
        if item in _SCALARS:
            end = off + n * struct.calcsize(_SCALARS[item])
            if end > len(mem):
                raise ValueError("an array runs past the end of the file")
            items = np.frombuffer(mem, np.dtype("<" + _SCALARS[item]), n, off).tolist() if n <= _MAX_ARRAY else None
            return items, end
        items = []
        for _ in range(n):
            v, off = value(off, item)
            items.append(v)
        return (items if n <= _MAX_ARRAY else None), off

    fields: dict[str, Any] = {}
    off = 24
    for _ in range(n_kv):
        key, off = string(off)
        (ty,) = struct.unpack_from("<I", mem, off)
        fields[key], off = value(off + 4, ty)
    infos = []
    for _ in range(n_tensors):
        name, off = string(off)
        (n_dims,) = struct.unpack_from("<I", mem, off)
        dims = struct.unpack_from(f"<{n_dims}Q", mem, off + 4)
        ty, offset = struct.unpack_from("<IQ", mem, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(d) for d in dims), ty, offset))
    align = int(fields.get("general.alignment", 32))
    data_start = -(-off // align) * align

    tensors = []
    for name, dims, ty, offset in infos:
        try:
            qtype = GGMLQuantizationType(ty)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown GGML type {ty}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of {block}")
        start, nbytes = data_start + offset, n // block * type_size
        if start + nbytes > len(buf):
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {start + nbytes}, the file has {len(buf)}; "
                "download it again"
            )
        tensors.append(GGUFTensor(name, dims, qtype, path, start, nbytes))
    return fields, tensors


def _field(gf: GGUFFile, key: str, default: Any = ...) -> Any:
    if key not in gf.fields:
        if default is ...:
            raise CheckpointError(f"{gf.path}: GGUF metadata lacks {key!r}")
        return default
    return gf.fields[key]


def architecture(gf: GGUFFile) -> str:
    arch = _field(gf, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{gf.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def hf_tensor_name(arch: str, gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; None for tensors that only carry configuration."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _CONFIG_TENSORS:
        return None
    m = _BLOCK.fullmatch(gguf_name)
    module = _BLOCK_NAMES[arch].get(m.group(2)) if m else None
    if module is None:
        raise CheckpointError(f"GGUF tensor {gguf_name!r} is not part of a {arch} model that xlserve knows")
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}"


# llama.cpp's recommended-sampling metadata -> generation_config.json names.
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature", "general.sampling.top_k": "top_k", "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p", "general.sampling.penalty_repeat": "repetition_penalty",
}


def generation_config(gf: GGUFFile) -> dict[str, Any]:
    """The sampling values the file recommends (general.sampling.*), in the names of a
    Hugging Face generation_config.json; {} when it has none."""
    return {name: gf.fields[key] for key, name in _SAMPLING_KEYS.items() if key in gf.fields}


def hf_config(gf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face config.json equivalent of the GGUF metadata (for `ModelConfig.from_hf`)."""
    arch = architecture(gf)

    def key(name: str, default: Any = ...) -> Any:
        return _field(gf, f"{arch}.{name}", default)

    tensors = {t.name: t for t in gf.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{gf.path}: GGUF file has no token_embd.weight tensor")
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer (OpenELM-style); ours is uniform
        if len(set(kv_heads)) != 1:
            raise CheckpointError(f"{gf.path}: per-layer head_count_kv {kv_heads} is not supported")
        kv_heads = kv_heads[0]
    embed = int(key("embedding_length"))
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or embed // heads
    hf: dict[str, Any] = {
        "num_hidden_layers": int(key("block_count")),
        "hidden_size": embed,
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        # The embedding's row count is the model's vocabulary (the token list may be shorter).
        "vocab_size": tensors["token_embd.weight"].shape[-1],
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(gf, "tokenizer.ggml.bos_token_id", None),
        "pad_token_id": _field(gf, "tokenizer.ggml.padding_token_id", None),
    }
    eos = [_field(gf, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    hf["eos_token_id"] = list(dict.fromkeys(i for i in eos if i is not None))
    if (context := key("context_length", None)) is not None:
        hf["max_position_embeddings"] = int(context)
    if (theta := key("rope.freq_base", None)) is not None:
        hf["rope_theta"] = float(theta)
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor", 1.0))}
        if (orig := key("rope.scaling.original_context_length", None)) is not None:
            hf["rope_scaling"]["original_max_position_embeddings"] = int(orig)

    if arch == "llama":
        hf["model_type"] = "llama"
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
        if "rope_freqs.weight" in tensors:
            t = tensors["rope_freqs.weight"]
            factors = np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
            hf["rope_scaling"] = _llama3_scaling(factors, hf.get("rope_theta", 10000.0), hf["head_dim"], gf.path)
        return hf

    # gemma3
    hf["model_type"] = "gemma3_text"
    hf["hidden_activation"] = "gelu_pytorch_tanh"
    hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
    hf["sliding_window"] = int(key("attention.sliding_window", 4096))
    pattern = key("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # newer llama.cpp: one is-sliding flag per layer
        hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # llama.cpp hard-codes Gemma 3's 5 local : 1 global
        hf["sliding_window_pattern"] = int(pattern or 6)
    hf["rope_local_base_freq"] = float(key("rope.freq_base_swa", 10_000.0))
    # llama.cpp scales queries by key_length ** -0.5, except for Gemma 3 27B (62 layers),
    # whose query_pre_attn_scalar is embed / heads = 168. transformers uses its default
    # (256), which agrees for every other size.
    hf["query_pre_attn_scalar"] = embed // heads if hf["num_hidden_layers"] == 62 else hf["head_dim"]
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if (cap := key(name, None)) is not None:
            hf[name] = float(cap)
    return hf


def _llama3_scaling(freq_factors: np.ndarray, theta: float, head_dim: int, path) -> dict[str, Any]:
    """Llama 3.x RoPE scaling from llama.cpp's rope_freqs tensor (inverse-frequency divisors).

    llama.cpp bakes the scaling into per-frequency factors and drops the parameters; we
    recover them by checking the factors against Llama 3's band edges (transformers
    ignores the tensor and runs such files unscaled).
    """
    factor = float(freq_factors.max())
    rope = RopeConfig(
        theta=theta, kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
    )
    base = RopeConfig(theta=theta).inv_freq(head_dim)
    if freq_factors.shape != base.shape or not np.allclose(base / rope.inv_freq(head_dim), freq_factors, rtol=1e-4):
        raise CheckpointError(
            f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling (factor {factor}, low/high frequency "
            "factors 1/4, original context 8192); other frequency scalings are not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def check_tensors(gf: GGUFFile) -> None:
    """Fails before any work if a tensor has an unsupported type or an unknown name."""
    arch = architecture(gf)
    for t in gf.tensors:
        hf_tensor_name(arch, t.name)
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{gf.path}: tensor {t.name!r} is quantized as {t.tensor_type.name}, which xlserve cannot "
                f"dequantize; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}"
            )


# The GGUF names of a layer's linear weights (quantizable: runtime.quantization).
_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def linear_types(gf: GGUFFile) -> frozenset[str]:
    """The storage types (names such as "Q8_0", "F16") of the layers' linear weights."""
    return frozenset(t.tensor_type.name for t in gf.tensors if _LINEAR.fullmatch(t.name))


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    # [N * (H/2) * 2, ...] -> [N, H/2, 2, ...] -> [N, 2, H/2, ...] -> [N * H, ...]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize_into(t: GGUFTensor, dtype, fix: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """The tensor in numpy (HF) order and `dtype`, dequantized a block of rows at a time so
    no float32 copy of a large tensor (the 262k-row Gemma embedding) is ever held."""
    shape = t.shape[::-1]
    out = np.empty(shape, dtype)
    flat_out = out.reshape(-1, shape[-1])  # [rows, row length]
    flat_in = t.data.reshape(flat_out.shape[0], -1)  # [rows, row length or bytes per row]
    step = max(1, _CHUNK_ELEMENTS // shape[-1])
    for i in range(0, flat_out.shape[0], step):
        block = dequantize(flat_in[i : i + step], t.tensor_type).reshape(-1, shape[-1])  # float32
        flat_out[i : i + step] = fix(block) if fix else block
    return out


def read_tensors(gf: GGUFFile, hf: dict[str, Any], dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout and `dtype`) for every weight, one at a time."""
    arch = architecture(gf)
    minus_one = lambda block: block - np.float32(1.0)  # noqa: E731
    for t in gf.tensors:
        name = hf_tensor_name(arch, t.name)
        if name is None:
            continue
        fix = minus_one if arch == "gemma3" and t.name.endswith("norm.weight") else None
        w = _dequantize_into(t, dtype, fix)
        if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_q.bias")):
            w = _unpermute_rows(w, hf["num_attention_heads"])
        elif arch == "llama" and t.name.endswith((".attn_k.weight", ".attn_k.bias")):
            w = _unpermute_rows(w, hf["num_key_value_heads"])
        yield name, w

"""Model configuration: one frozen dataclass drives one code path per model family.

`ModelConfig.from_hf(config_dict)` reads a Hugging Face config.json (transformers 4.x
`rope_theta`/`rope_scaling` keys and 5.x `rope_parameters` both work). GGUF metadata is
translated to the same HF-style dict by `checkpoints.gguf`, so there is one parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

# model_type (HF) -> family. One forward pass per family; the rest is config.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class ConfigError(ValueError):
    """A model or engine config that xlserve cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies (rotate-half convention, as in HF transformers)."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    # llama3 only: frequency band edges and the context the base model was trained on.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta and factor must be positive, got theta={self.theta} factor={self.factor}")

    def inv_freq(self, head_dim: int):
        """Inverse frequencies, float64 numpy [head_dim // 2]; scaled per `kind`."""
        import numpy as np

        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(is_medium, smoothed, scaled)
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a checkpoint.

    `layer_windows[i]` is the sliding-window size of layer i (None: global attention);
    a layer with a window uses `local_rope`, a global one `rope`.
    """

    family: Literal["llama", "gemma3"]
    model_type: str
    vocab_size: int
    embed_dim: int
    ffw_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    activation: Literal["silu", "gelu_tanh"] = "silu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Gemma: RMSNorm multiplies by (1 + w), norms after attention and MLP too, the
    # embedding is scaled by sqrt(embed_dim).
    norm_plus_one: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False
    query_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None
    layer_windows: tuple[int | None, ...] = ()
    max_position: int = 8192
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None

    def __post_init__(self):
        if self.family not in ("llama", "gemma3"):
            raise ConfigError(f"family {self.family!r} is not supported; supported: llama, gemma3")
        for name in ("vocab_size", "embed_dim", "ffw_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} is not supported; supported: silu, gelu_tanh")
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"layer_windows has {len(self.layer_windows)} entries for num_layers={self.num_layers}"
            )
        if any(w is not None and w <= 0 for w in self.layer_windows):
            raise ConfigError(f"sliding windows must be positive, got {self.layer_windows}")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_rope(self, layer: int) -> RopeConfig:
        if self.layer_windows[layer] is not None and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def num_params(self) -> int:
        d, f, n, k, h = self.embed_dim, self.ffw_dim, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed

    # --- serialisation -------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        raw = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; was this written by a newer xlserve?")
        raw["rope"] = RopeConfig(**raw["rope"])
        if raw.get("local_rope") is not None:
            raw["local_rope"] = RopeConfig(**raw["local_rope"])
        raw["layer_windows"] = tuple(raw["layer_windows"])
        raw["eos_ids"] = tuple(raw["eos_ids"])
        return cls(**raw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        return _from_hf(hf)


# --- Hugging Face config.json ---------------------------------------------------------

def _rope_from_hf(params: dict[str, Any] | None, default_theta: float) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", default_theta))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _llama_windows(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    if layer_types is None:
        # Qwen applies the window from layer max_window_layers on; Mistral everywhere.
        start = int(hf.get("max_window_layers", 0)) if model_type != "mistral" else 0
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    if "text_config" in hf:  # multimodal wrappers (Gemma3ForConditionalGeneration): text tower only
        hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    family = SUPPORTED_MODEL_TYPES[model_type]
    try:
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        embed_dim = int(hf["hidden_size"])
        common = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            embed_dim=embed_dim,
            ffw_dim=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or embed_dim // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=int(hf.get("max_position_embeddings", 8192)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=_as_ids(hf.get("eos_token_id")),
            pad_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act_name not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"activation {act_name!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    activation = SUPPORTED_ACTIVATIONS[act_name]
    rope_params = hf.get("rope_parameters")

    if family == "llama":
        if hf.get("rope_scaling") is not None and rope_params is None:
            rope_params = {**hf["rope_scaling"], "rope_theta": hf.get("rope_theta", 10000.0)}
        if isinstance(rope_params, dict) and "full_attention" in rope_params:
            rope_params = rope_params["full_attention"]
        rope = _rope_from_hf(rope_params, float(hf.get("rope_theta", 10000.0)))
        windows = _llama_windows(hf, model_type, num_layers)
        return ModelConfig(
            family="llama",
            activation=activation,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope=rope,
            layer_windows=windows,
            **common,
        )

    # Gemma 3
    if rope_params is not None and "full_attention" in rope_params:
        rope = _rope_from_hf(rope_params["full_attention"], 1_000_000.0)
        local_rope = _rope_from_hf(rope_params.get("sliding_attention"), 10_000.0)
    else:
        rope = _rope_from_hf(
            {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}, 1_000_000.0
        )
        local_rope = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10_000.0)))
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
        ]
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ConfigError(f"layer types {unknown} are not supported; supported: full_attention, sliding_attention")
    window = int(hf.get("sliding_window", 4096))
    return ModelConfig(
        family="gemma3",
        activation=activation,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
        norm_plus_one=True,
        post_norms=True,
        scale_embeddings=True,
        query_scale=float(hf.get("query_pre_attn_scalar", common["head_dim"])) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        rope=rope,
        local_rope=local_rope,
        layer_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        **common,
    )


ATTENTION_CHOICES = ("auto", "reference", "pallas")  # auto: pallas on GPU, else reference
# Which steps run as CUDA graphs (XLA command buffers) on a GPU: a graph launches a whole
# step at once but is re-recorded when a buffer it touches moves (prefill's inputs do on
# every call), and that happens before the device starts. Elsewhere this changes nothing.
COMMAND_BUFFER_CHOICES = ("all", "decode", "none")
# int8 and float8_e4m3fn: quantized rows with a scale each (runtime/kv_cache.py).
CACHE_DTYPES = ("bfloat16", "float32", "int8", "float8_e4m3fn")
# Decode variants by what sampling they compute, cheapest first (runtime.sampling).
SAMPLING_MODES = ("greedy", "sample", "filter")


def _default_prefill_lengths(max_len: int) -> tuple[int, ...]:
    lengths, n = [], 32
    while n < max_len:
        lengths.append(n)
        n *= 2
    lengths.append(max_len)
    return tuple(sorted(set(min(x, 2048) for x in lengths)))


# Decode buckets when none are given: a decode call runs the slots below the smallest
# bucket that holds every decoding slot (slots are handed out lowest first), so one
# stream does not pay for the rows of 64 idle ones (runtime.engine, issue 13).
DEFAULT_DECODE_BATCH_SIZES = (1, 8, 64, 512)

# Decode slots when start-up sizes them from the KV cache (runtime/startup.py says why).
AUTO_MIN_NUM_SEQS = 8
AUTO_MAX_NUM_SEQS = 64


# EngineConfig fields that no compiled program depends on: runtime.aot leaves them out of
# the key of serialized executables, so changing one does not refuse them. The budget only
# decides which programs there are (runtime.engine.prefill_variants, mixed_lengths), not
# what any of them computes: a server whose budget needs programs the saved set lacks
# compiles them at warm-up.
HOST_ONLY_FIELDS = frozenset({"max_num_batched_tokens"})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out work: slots, pages, buckets. Built from flags in entry points.

    The compiled shapes are exactly: prefill (batch in `prefill_batch_sizes`) x (length in
    `prefill_lengths`), and decode over the first b slots for b in `decode_buckets` (each
    in every sampling mode of `decode_sampling_modes`). Prompts longer than the largest
    prefill length are prefilled in chunks of it; while sequences decode, a step's prefill
    chunks hold at most `max_num_batched_tokens` tokens beside its decode tokens
    (runtime.scheduler), so a long prompt does not stall every stream's next token.
    """

    max_num_seqs: int = AUTO_MIN_NUM_SEQS
    max_model_len: int = 2048
    page_size: int = 16
    num_pages: int | None = None  # None: from kv_cache_memory_fraction (or enough for every slot on CPU)
    kv_cache_memory_fraction: float = 0.85
    prefill_lengths: tuple[int, ...] = ()  # () -> powers of two from 32 up to min(max_model_len, 2048)
    prefill_batch_sizes: tuple[int, ...] = (1,)
    decode_steps_per_call: int = 1
    # Prefill plus decode tokens per step while sequences decode (runtime.scheduler); with
    # nothing decoding, prefill runs at full chunk. Host only: no compiled shape depends on it.
    # A decoding sequence counts as 2 tokens (runtime.scheduler.DECODE_TOKEN_WEIGHT).
    # 544 = a 512-token chunk beside up to 16 decoding sequences: an idle-ish server
    # prefills such a prompt in one step; from 17 streams on chunks are 256 tokens, which
    # keeps the inter-token p99 under twice the median at 64 streams at 96-99% of the best
    # throughput measured (8192 gave 3-4x; H200, runtime/BENCHMARKS.md, session 8) and at
    # 2.3x it beside 4096-token prompts at 32 streams (session 9).
    max_num_batched_tokens: int = 544
    # Prefix caching (runtime.page_allocator, runtime.scheduler): a prompt's full pages
    # already in the cache (same tokens from the start, same cache_salt) are mapped, not
    # recomputed. Off here (the library's default); the command lines turn it on
    # (runtime.flags: --enable_prefix_caching, default true).
    enable_prefix_caching: bool = False
    # While sequences decode, a step's prefill chunk and its decode step run as one forward
    # pass (runtime.engine._mixed; one device, decode_steps_per_call 1, else two calls).
    mixed_calls: bool = True
    # Weight-only quantization of the projections (runtime.quantization.MODES: "int8",
    # "fp8"), applied to the model when the engine is built; None: the model's dtype.
    quantization: str | None = None
    # Decode buckets (`decode_buckets`); () -> DEFAULT_DECODE_BATCH_SIZES. max_num_seqs is always one.
    decode_batch_sizes: tuple[int, ...] = ()
    attention: str = "auto"
    command_buffers: str = "all"  # COMMAND_BUFFER_CHOICES: the steps XLA runs as CUDA graphs on a GPU
    cache_dtype: str = "bfloat16"
    num_top_logprobs: int = 0  # top-N logprobs computed per step (0: only the chosen token's)
    # Decode variants compiled (SAMPLING_MODES; "filter" serves any request): fewer
    # compile faster, and a call whose mode is missing runs the next stronger one.
    decode_sampling_modes: tuple[str, ...] = SAMPLING_MODES
    seed: int = 0  # base of per-request seeds when a request gives none
    # Pipeline stages only: decode slots are run through the stages in this many groups
    # (sharding/pipeline.py). Prefill uses one group per stage.
    pipeline_microbatches: int = 1

    def __post_init__(self):
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs} must be positive")
        if self.max_model_len <= 1:
            raise ConfigError(f"max_model_len={self.max_model_len} must be at least 2")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size={self.page_size} must be a power of two, e.g. 16")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ConfigError(f"num_pages={self.num_pages} must be positive")
        if not (0.0 < self.kv_cache_memory_fraction <= 1.0):
            raise ConfigError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1]")
        if not self.prefill_lengths:
            object.__setattr__(self, "prefill_lengths", _default_prefill_lengths(self.max_model_len))
        if sorted(set(self.prefill_lengths)) != list(self.prefill_lengths) or self.prefill_lengths[0] <= 0:
            raise ConfigError(f"prefill_lengths={self.prefill_lengths} must be positive and increasing")
        if not self.prefill_batch_sizes or min(self.prefill_batch_sizes) <= 0:
            raise ConfigError(f"prefill_batch_sizes={self.prefill_batch_sizes} must be positive")
        if self.decode_steps_per_call <= 0:
            raise ConfigError(f"decode_steps_per_call={self.decode_steps_per_call} must be positive")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least 1")
        if self.quantization not in (None, "int8", "fp8"):
            raise ConfigError(f"quantization={self.quantization!r}; choose from int8, fp8")
        sizes = tuple(self.decode_batch_sizes)
        if sizes and (sorted(set(sizes)) != list(sizes) or sizes[0] <= 0):
            raise ConfigError(f"decode_batch_sizes={','.join(map(str, sizes))} must be positive and increasing")
        object.__setattr__(self, "decode_batch_sizes", sizes)
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention={self.attention!r}; choose from {', '.join(ATTENTION_CHOICES)}")
        if self.command_buffers not in COMMAND_BUFFER_CHOICES:
            raise ConfigError(f"command_buffers={self.command_buffers!r}; choose from {', '.join(COMMAND_BUFFER_CHOICES)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache_dtype={self.cache_dtype!r}; choose from {', '.join(CACHE_DTYPES)}")
        if self.pipeline_microbatches <= 0:
            raise ConfigError(f"pipeline_microbatches={self.pipeline_microbatches} must be positive")
        modes = tuple(self.decode_sampling_modes)
        if not set(modes) <= set(SAMPLING_MODES) or "filter" not in modes:
            raise ConfigError(f"decode_sampling_modes={','.join(modes)} must be among {','.join(SAMPLING_MODES)} "
                              "and include filter (it serves any request)")
        object.__setattr__(self, "decode_sampling_modes", tuple(m for m in SAMPLING_MODES if m in modes))
        if not (0 <= self.num_top_logprobs <= 20):
            raise ConfigError(f"num_top_logprobs={self.num_top_logprobs} must be in [0, 20]")

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        """The slot counts decode is compiled for: `decode_batch_sizes` (default
        DEFAULT_DECODE_BATCH_SIZES) below max_num_seqs, and max_num_seqs."""
        given = self.decode_batch_sizes or DEFAULT_DECODE_BATCH_SIZES
        return tuple(sorted({b for b in given if b < self.max_num_seqs} | {self.max_num_seqs}))

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

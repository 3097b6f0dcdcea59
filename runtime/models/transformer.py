"""The decoder-only transformer for every supported family, driven by `ModelConfig`.

Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2): pre-norm blocks, SiLU gated
MLP, optional qkv bias / q-k norm / sliding window.
Gemma 3: the same block with (1 + w) norms, post-attention and post-MLP norms, q-k
norm, GELU-tanh MLP, sqrt(D)-scaled embeddings and per-layer local/global attention.

The forward pass takes the paged KV cache explicitly and returns the updated one; it
serves prefill (T > 1, with or without earlier context) and decode (T = 1) alike.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dispatch
from runtime.config import ModelConfig
from runtime.kv_cache import KVCache
from runtime.models.layers import (
    MLP, Attention, RMSNorm, Segment, building_shapes_only, embed_scale, param, shapes_only,
)
from sharding.ops import Local, embedding_lookup


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs | None):
        norm = dict(eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.embed_dim, "embed", **norm)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, "embed", **norm)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.embed_dim, "embed", **norm)
            self.post_mlp_norm = RMSNorm(cfg.embed_dim, "embed", **norm)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def __call__(self, x, positions, k_pages, v_pages, page_table, kv_lens, *, impl: str, fresh: bool,
                 local: Local | None = None, segments: tuple[Segment, ...] | None = None):
        x, h, k_pages, v_pages = self.step(x, None, positions, k_pages, v_pages, page_table, kv_lens, impl=impl,
                                           fresh=fresh, local=local, segments=segments)
        return x + h, k_pages, v_pages

    def step(self, x, h, positions, k_pages, v_pages, page_table, kv_lens, *, impl: str, fresh: bool,
             local: Local | None = None, segments: tuple[Segment, ...] | None = None):
        """The layer with its residual adds deferred: x + h enters (h None: x), and the
        layer returns (x', h', pages) with x' + h' its output, so each add runs with the
        norm after it (the next layer's, or the final norm) as one kernel where
        `norm_kernel` says so. Same values as __call__: the adds and norms are the same ops."""
        kernel = norm_kernel(x, impl)
        x, a = self.attn_norm.add(x, h, kernel)
        h, k_pages, v_pages = self.attn(
            a, positions, k_pages, v_pages, page_table, kv_lens, impl=impl, fresh=fresh, local=local,
            segments=segments,
        )
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x, m = self.mlp_norm.add(x, h, kernel)
        h = self.mlp(m, local)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x, h, k_pages, v_pages


# Decode calls of at least this many rows take their matmuls from cuBLAS, not XLA's
# Triton GEMMs (runtime.engine._compiler_options has the measurement). cuBLAS adds the
# residual in its GEMM epilogue and XLA's norm is then one kernel, so the fused add +
# RMSNorm kernel serves the smaller calls only.
CUBLAS_DECODE_ROWS = 64


def norm_kernel(x: jax.Array, impl: str):
    """pallas_kernels.add_rmsnorm's GPU kernel where it serves this call: a decode step
    (T == 1) of fewer than CUBLAS_DECODE_ROWS rows through the GPU kernels; else None (XLA's
    fusion of the jnp path: on TPU there is no per-kernel launch cost to save)."""
    if impl != "pallas" or x.shape[1] != 1 or x.shape[0] >= CUBLAS_DECODE_ROWS:
        return None
    if dispatch.engine_kernel_impl() != "gpu":
        return None
    from pallas_kernels.add_rmsnorm import gpu as add_rmsnorm

    return add_rmsnorm if add_rmsnorm.supports(x, x[0, 0]) else None


# Each forward pass traces its layers through one jitted function (_layer_steps): layers
# of the same structure and shapes (all of Llama's 32; Gemma 3's local and global kinds)
# are traced and lowered once per forward pass and called, and XLA inlines the calls,
# so the compiled program is the one an unrolled loop gives. Tracing and lowering no
# longer grow with depth: the start-up's cost per program (runtime/BENCHMARKS.md, issue
# 14). XLSERVE_LAYER_JIT=0 traces every layer inline, as before.
LAYER_JIT = os.environ.get("XLSERVE_LAYER_JIT", "1") == "1"


def _eager_step(block, x, h, positions, k_pages, v_pages, page_table, kv_lens, *, impl, fresh, local, segments):
    return block.step(x, h, positions, k_pages, v_pages, page_table, kv_lens, impl=impl, fresh=fresh, local=local,
                      segments=segments)


def _layer_steps():
    """Block.step as a jitted function of (graphdef, state, arrays), made per forward
    pass: its trace cache then lives for one trace only, so a module-level setting read
    while tracing (pallas_kernels.dispatch, an environment switch) is never stale in a
    later program. Segments travel as their arrays plus their static fields."""

    def run(graphdef, state, x, h, positions, k_pages, v_pages, page_table, kv_lens, segment_arrays, *, impl, fresh,
            local, segment_shapes):
        segments = None if segment_shapes is None else tuple(
            Segment(*arrays, *shape) for arrays, shape in zip(segment_arrays, segment_shapes))
        return nnx.merge(graphdef, state).step(x, h, positions, k_pages, v_pages, page_table, kv_lens, impl=impl,
                                               fresh=fresh, local=local, segments=segments)

    jitted = jax.jit(run, static_argnums=(0,), static_argnames=("impl", "fresh", "local", "segment_shapes"))

    def step(block, x, h, positions, k_pages, v_pages, page_table, kv_lens, *, impl, fresh, local, segments):
        graphdef, state = nnx.split(block)
        arrays = None if segments is None else tuple((s.page_table, s.positions, s.kv_lens) for s in segments)
        shapes = None if segments is None else tuple((s.rows, s.length, s.fresh) for s in segments)
        return jitted(graphdef, state, x, h, positions, k_pages, v_pages, page_table, kv_lens, arrays, impl=impl,
                      fresh=fresh, local=local, segment_shapes=shapes)

    return step


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        if rngs is None and not building_shapes_only():  # shapes only: no key (no device, no backend)
            rngs = nnx.Rngs(0)
        self.cfg = cfg
        self.embedding = param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(
            cfg.embed_dim, "embed", eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype, rngs=rngs
        )
        self.lm_head = None if cfg.tie_embeddings else param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32, absolute
        cache: KVCache,
        page_table: jax.Array,  # [B, MP] int32
        kv_lens: jax.Array,  # [B] int32: tokens in the cache after this step
        *,
        attn_impl: str = "reference",
        logits_at: jax.Array | None = None,  # [B] index into T: logits of one position only
        fresh_prefill: bool = False,  # static: every row starts at position 0 (no earlier context)
        local: Local | None = None,  # static: runs per device on shards (sharding/tensor_parallel.py)
        segments: tuple[Segment, ...] | None = None,  # a mixed call (below)
    ) -> tuple[jax.Array, KVCache]:
        """Returns float32 logits [B, T, V] (or [B, V] with `logits_at`) and the new cache.

        A mixed call (`segments`): tokens and positions [1, N] hold the segments' tokens
        one after another (each Segment carries its own page table and cache lengths;
        `page_table` and `kv_lens` are unused), and logits_at [M] indexes N: logits [M, V]."""
        x, h = self.embed(tokens, local), None
        new_k, new_v = [], []
        step = _layer_steps() if LAYER_JIT else _eager_step
        for layer, k_pages, v_pages in zip(self.layers, cache.k, cache.v):
            x, h, k_pages, v_pages = step(layer, x, h, positions, k_pages, v_pages, page_table, kv_lens,
                                          impl=attn_impl, fresh=fresh_prefill, local=local, segments=segments)
            new_k.append(k_pages)
            new_v.append(v_pages)
        kernel = norm_kernel(x, attn_impl)  # as the layers chose (decode), before the take
        if logits_at is not None and segments is not None:  # [1, N, D] -> [M, 1, D]
            x, h = (a[0, logits_at][:, None] for a in (x, h))
        elif logits_at is not None:  # [B, T, D] -> [B, 1, D]
            x, h = (jnp.take_along_axis(a, logits_at[:, None, None], axis=1) for a in (x, h))
        _, x = self.final_norm.add(x, h, kernel)
        logits = self.logits(x, local)
        return (logits if logits_at is None else logits[:, 0]), KVCache(k=tuple(new_k), v=tuple(new_v))

    def embed(self, tokens: jax.Array, local: Local | None = None) -> jax.Array:
        """The scaled embeddings [B, T, D] of `tokens` [B, T]."""
        x = embedding_lookup(self.embedding[...], tokens, self.cfg.vocab_size, local)
        scale = embed_scale(self.cfg, x.dtype)
        return x if scale is None else x * scale

    def head(self, x: jax.Array, local: Local | None = None) -> jax.Array:
        """float32 logits [..., V] of the last layer's output [..., D] (final norm, output
        projection, soft cap), whole on every device."""
        return self.logits(self.final_norm(x), local)

    def logits(self, x: jax.Array, local: Local | None = None) -> jax.Array:
        """float32 logits [..., V] of the final norm's output [..., D]: the output
        projection and soft cap, whole on every device."""
        with jax.named_scope("logits"):
            if self.lm_head is None:
                logits = jnp.einsum("...D,VD->...V", x, self.embedding[...], preferred_element_type=jnp.float32)
            else:
                logits = jnp.einsum("...D,DV->...V", x, self.lm_head[...], preferred_element_type=jnp.float32)
            if local is not None:
                logits = local.gather_last(logits, self.cfg.vocab_size)
        if self.cfg.final_softcap is not None:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits


def fuse_projections(model: Transformer, mesh=None, platform: str | None = None) -> Transformer:
    """The serving form of `model`, made in place (the unfused weights are dropped, so
    memory does not double): every layer's q/k/v weights as one (Attention.fuse) and its
    gate/up weights as one (MLP.fuse), in the layout the platform's matmuls read
    (layers.QKV_LAYOUTS; `platform`: default the mesh's devices', else the default
    backend's). A decode step then runs two GEMVs fewer per layer. Fused weights are
    split by their logical axes on `mesh` (a layer's on its pipeline stage's devices)
    or, without one, stay where the weights were; an abstract model (ShapeDtypeStruct
    weights) gets the fused shapes. Running it twice changes nothing. Checkpoints hold
    the unfused form: this runs when an engine is built."""
    from sharding.rules import param_sharding

    if platform is None:
        platform = mesh.devices.flat[0].platform if mesh is not None else dispatch.platform()
    layout = "tpu" if platform == "tpu" else "gpu"
    for i, block in enumerate(model.layers):
        def sharding_of(axes, shape, path=("layers", i)):
            return None if mesh is None else param_sharding(path, axes, shape, mesh, model.cfg.num_layers)

        block.attn.fuse(sharding_of, layout)
        block.mlp.fuse(sharding_of, layout)
    return model


def abstract_model(cfg: ModelConfig, dtype=jnp.bfloat16, quantization: str | None = None) -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory;
    with `quantization`, its projections quantized as a quantized checkpoint stores them
    (runtime.quantization.quantize_layers)."""
    with shapes_only():
        model = Transformer(cfg, dtype=dtype)
    if quantization:
        from runtime.quantization import quantize_layers

        quantize_layers(model, quantization)
    return model

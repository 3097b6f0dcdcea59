"""Pipeline parallelism for inference: contiguous layers per stage, activations passed
on with `ppermute`, composed with tensor parallelism inside one `jax.shard_map`.

Layout. With S stages of Ls = L / S layers, stage s owns layers s*Ls .. s*Ls + Ls-1.
A jitted program takes arrays over the whole mesh, so a stage's weights cannot be
arrays of their own; instead the i-th layers of all stages are stacked on a leading
axis split over "stage" (logical axis "stages", sharding/rules.py): layer s*Ls + i's
weights live only on stage s's devices, as do its pages of the KV cache (per i one
array [S, pages, page, kv_heads, head_dim]). The embedding, final norm and output
projection are replicated over stages (split over "tensor" as usual): the first stage
embeds and every stage can compute logits.

Schedule. A call's rows are split into M microbatches. At tick t stage s runs its
layers on microbatch t - s (when there is one) and hands the result to stage s + 1;
after M + S - 1 ticks the last stage holds every microbatch's output, which one sum
over "stage" brings to all devices for the output projection and sampling. Idle
(stage, tick) pairs run on a microbatch with no tokens (kv lengths 0), so they write
no KV and their output is dropped. The bubble is (S - 1) / (M + S - 1) of a call.

Layers whose static configuration differs between stages at the same index (Gemma 3's
local/global pattern, a sliding window on some layers) are run with `lax.switch` on the
stage index: each device takes its own stage's branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runtime.kv_cache import KV_AXES, KVCache, map_pages, zeros_pages
from sharding.ops import Local, local_page_table
from sharding.rules import DEFAULT_RULES, logical_to_spec
from sharding.tensor_parallel import data_axis, param_specs

STAGES = "stages"  # the logical axis of stacked per-stage tensors


@dataclasses.dataclass(frozen=True)
class Staged:
    """What a pipelined step needs besides arrays: the model without its layers (embed
    and head), each layer's graph by (index in stage, stage), and the microbatch count."""

    shell: nnx.GraphDef
    blocks: tuple[tuple[nnx.GraphDef, ...], ...]  # [i][s]: layer s * Ls + i
    stages: int
    microbatches: int


def stage_size(mesh: Mesh | None, rules: Mapping[str, str | None] = DEFAULT_RULES) -> int:
    axis = rules.get(STAGES)
    return mesh.shape[axis] if mesh is not None and axis in mesh.shape else 1


def _stacked(parts: list[jax.Array], axes: tuple, mesh: Mesh, rules) -> jax.Array:
    """One array [S, ...] split over "stage" from per-stage arrays, part s placed on stage
    s's devices with its own sharding: assembled from the devices' shards, so no device
    ever holds another stage's part."""
    shape = (len(parts), *parts[0].shape)
    target = NamedSharding(mesh, logical_to_spec((STAGES, *axes), shape, mesh, rules))
    shards = [shard.data[None] for part in parts for shard in part.addressable_shards]
    return jax.make_array_from_single_device_arrays(shape, target, shards)


def stage_model(model, mesh: Mesh, microbatches: int, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """(Staged, params) for running `model` pipelined over `mesh`'s stages: params is
    {"outer": the non-layer weights over the whole mesh, "layers": per index in a stage
    the stacked weights of that layer of every stage}. Weights already on their stage's
    devices (sharding.rules.param_sharding, as loading places them) are not moved."""
    from sharding.mesh import place_model

    S = stage_size(mesh, rules)
    L = model.cfg.num_layers
    if L % S:
        raise ValueError(f"num_layers={L} is not divisible by {S} stages")
    Ls = L // S
    graphdef, state = nnx.split(place_model(model, mesh, rules))  # layers on their stage's devices
    layer_states = state["layers"]
    outer = nnx.State({k: v for k, v in state.items() if k != "layers"})
    layers = []
    for i in range(Ls):
        per_stage = [layer_states[s * Ls + i] for s in range(S)]

        def stack(*vars_):
            axes = vars_[0].get_metadata().get("logical_axes", (None,) * vars_[0].get_value().ndim)
            value = _stacked([v.get_value() for v in vars_], axes, mesh, rules)
            return vars_[0].replace(value, logical_axes=(STAGES, *axes))

        layers.append(jax.tree.map(stack, *per_stage, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    shell = nnx.merge(graphdef, state)
    shell.layers = nnx.List([])
    blocks = tuple(tuple(nnx.split(model.layers[s * Ls + i])[0] for s in range(S)) for i in range(Ls))
    return Staged(nnx.split(shell)[0], blocks, S, microbatches), {"outer": outer, "layers": tuple(layers)}


def cache_sharding(cfg, num_pages: int, page_size: int, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    S = stage_size(mesh, rules)
    shape = (S, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return NamedSharding(mesh, logical_to_spec((STAGES, *KV_AXES), shape, mesh, rules))


def create_cache(cfg, *, num_pages: int, page_size: int, dtype, mesh: Mesh, rules=DEFAULT_RULES) -> KVCache:
    """Per index in a stage, K and V [S, pages, page, kv_heads, head_dim]: stage s's
    pages on stage s's devices (split by kv head over "tensor")."""
    S = stage_size(mesh, rules)
    sharding = cache_sharding(cfg, num_pages, page_size, mesh, rules)
    shape = (S, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    make = lambda: zeros_pages(shape, dtype, sharding)  # noqa: E731
    Ls = cfg.num_layers // S
    return KVCache(k=tuple(make() for _ in range(Ls)), v=tuple(make() for _ in range(Ls)))


def microbatches_for(rows: int, target: int) -> int:
    """The most microbatches, at most `target`, that split `rows` evenly."""
    return max(d for d in range(1, min(rows, target) + 1) if rows % d == 0)


def _run_layer(graphdefs: tuple[nnx.GraphDef, ...], stage, params, *args, **kw):
    """Layer i of this device's stage: one graph for every stage, or a switch on the
    stage index over the distinct ones."""
    distinct = list(dict.fromkeys(graphdefs))
    apply = lambda gd: lambda p, *a: nnx.merge(gd, p)(*a, **kw)  # noqa: E731
    if len(distinct) == 1:
        return apply(distinct[0])(params, *args)
    which = jnp.asarray([distinct.index(g) for g in graphdefs], jnp.int32)[stage]
    return jax.lax.switch(which, [apply(g) for g in distinct], params, *args)


def model_step(staged: Staged, params, tokens, positions, cache: KVCache, page_table, kv_lens, logits_at, *,
               mesh: Mesh, attn_impl: str, fresh_prefill: bool = False,
               rules: Mapping[str, str | None] = DEFAULT_RULES):
    """`Transformer.__call__` pipelined over the stages of `mesh` (and split over its
    "tensor" axis): float32 logits [B, V] (or [B, T, V] without `logits_at`) on every
    device and the cache."""
    stage_axis, tensor_axis, data = rules[STAGES], rules["q_heads"], data_axis(mesh, rules)
    S = staged.stages
    B, T = tokens.shape
    B //= mesh.shape[data] if data else 1  # the rows of one data-parallel group
    # Decode: the configured groups (ecfg.pipeline_microbatches). Prefill: one per stage.
    M = microbatches_for(B, staged.microbatches if T == 1 else S)
    b = B // M
    pspecs = param_specs(params, mesh, rules)
    spec = lambda x, axes: logical_to_spec(axes, x.shape, mesh, rules)  # noqa: E731
    cspecs = KVCache(k=tuple(map_pages(spec, x, (STAGES,)) for x in cache.k),
                     v=tuple(map_pages(spec, x, (STAGES,)) for x in cache.v))
    rows = PartitionSpec(data)
    has_at = logits_at is not None
    logits_at = jnp.zeros((B,), jnp.int32) if logits_at is None else logits_at

    def body(params, cache, tokens, positions, page_table, kv_lens, logits_at):
        s = jax.lax.axis_index(stage_axis)
        local = Local(tensor_axis)
        shell = nnx.merge(staged.shell, params["outer"])
        layers = [jax.tree.map(lambda x: x[0], p) for p in params["layers"]]
        first = lambda x: jax.tree.map(lambda a: a[0], x)  # noqa: E731 -- this stage's pages
        ks, vs = [first(x) for x in cache.k], [first(x) for x in cache.v]
        page_table = local_page_table(page_table, ks[0].shape[0], data)
        x = shell.embed(tokens, local)
        D = x.shape[-1]
        mb = lambda a: a.reshape(M, b, *a.shape[1:])  # noqa: E731
        x, positions, page_table, kv_lens, logits_at = map(mb, (x, positions, page_table, kv_lens, logits_at))
        held = jnp.zeros((b, T, D), x.dtype)  # what the previous stage handed over
        out = jnp.zeros((M, b, D) if has_at else (M, b, T, D), x.dtype)
        for tick in range(M + S - 1):
            m = tick - s
            valid = (m >= 0) & (m < M)
            mc = jnp.clip(m, 0, M - 1)
            pick = lambda a: jax.lax.dynamic_index_in_dim(a, mc, keepdims=False)  # noqa: E731
            h = jnp.where(s == 0, x[min(tick, M - 1)], held)
            lens = jnp.where(valid, pick(kv_lens), 0)
            for i in range(len(layers)):
                h, ks[i], vs[i] = _run_layer(staged.blocks[i], s, layers[i], h, pick(positions), ks[i], vs[i],
                                             pick(page_table), lens, impl=attn_impl, fresh=fresh_prefill, local=local)
            y = jnp.take_along_axis(h, pick(logits_at)[:, None, None], axis=1)[:, 0] if has_at else h
            done = (s == S - 1) & valid
            out = jnp.where(done, jax.lax.dynamic_update_index_in_dim(out, y, mc, 0), out)
            if tick < M + S - 2:
                held = jax.lax.ppermute(h, stage_axis, [(j, j + 1) for j in range(S - 1)])
        # The last stage's outputs to every stage (the others contribute zeros: exact).
        out = jax.lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)), stage_axis)
        logits = shell.head(out.reshape(B, *out.shape[2:]), local)
        stack = lambda x: jax.tree.map(lambda a: a[None], x)  # noqa: E731
        return logits, KVCache(k=tuple(stack(k) for k in ks), v=tuple(stack(v) for v in vs))

    return jax.shard_map(
        body, mesh=mesh, in_specs=(pspecs, cspecs, rows, rows, rows, rows, rows), out_specs=(rows, cspecs),
        check_vma=False,
    )(params, cache, tokens, positions, page_table, kv_lens, logits_at)

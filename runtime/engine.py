"""Compiled prefill and decode steps over the paged KV cache.

Device state is two pytrees, both donated to every step so they are updated in place:
  cache   KVCache, per layer [P, S, K, H]
  slots   DecodeSlots: per decode slot the last token, its length, sampling arrays and
          penalty bookkeeping; a slot is idle when its length is 0.
Params are split from the NNX module once; steps are pure functions of
(params, cache, slots, batch). Nothing here decides *what* runs: the scheduler's plan
says which prompts prefill into which slots and the orchestrator calls these steps.

Compiled shapes come from an explicit manifest (`Engine.manifest()`); `warmup()`
compiles exactly it, and every compilation afterwards is counted in
`compile_counter` (the orchestrator logs it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dispatch
from runtime.config import ConfigError, EngineConfig, ModelConfig
from runtime.kv_cache import KVCache
from runtime.models.layers import Segment
from runtime.models.transformer import CUBLAS_DECODE_ROWS, Transformer, fuse_projections
from runtime.quantization import quantize_model
from runtime.sampling import SlotSampling, sample, sampling_mode
from sharding import pipeline, tensor_parallel

log = logging.getLogger(__name__)


# Threads whose compilations are a progressive start's programs arriving while the engine
# serves (runtime.aot.prepare_programs), not compilations on the serving path.
BACKGROUND_THREADS = "xlserve-background"


class _CompileCounter:
    """Counts XLA compilations process-wide (jax.monitoring events).

    JAX reports every executable it builds under the backend-compile event, including
    those loaded from the persistent compilation cache; those hits are not
    compilations, so they are subtracted.
    """

    def __init__(self):
        self._built = 0
        self._cache_hits = 0
        self._background = 0  # built on BACKGROUND_THREADS threads (a progressive start's rest)
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                if threading.current_thread().name.startswith(BACKGROUND_THREADS):
                    self._background += 1
                else:
                    self._built += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            with self._lock:
                if threading.current_thread().name.startswith(BACKGROUND_THREADS):
                    return  # counted in `background` as built
                self._cache_hits += 1

    @property
    def count(self) -> int:
        """Compilations outside the background threads (what serving must not do)."""
        with self._lock:
            return self._built - self._cache_hits

    @property
    def background(self) -> int:
        """Executables built on background threads (compiled, or from the persistent cache)."""
        with self._lock:
            return self._background

    @property
    def cache_hits(self) -> int:
        """Executables loaded from the persistent compilation cache."""
        with self._lock:
            return self._cache_hits


compile_counter = _CompileCounter()

# Stop token ids checked on device per slot (EOS ids + a request's stop_token_ids).
MAX_STOP_IDS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeSlots:
    tokens: jax.Array  # [B] i32: the token each slot feeds next
    lengths: jax.Array  # [B] i32: tokens in the cache before that token; 0 = idle slot
    sampling: SlotSampling
    prompt_mask: jax.Array  # [B, V] bool: token occurs in the prompt (repetition penalty)
    output_counts: jax.Array  # [B, V] i32: occurrences in the generated text
    stop_ids: jax.Array  # [B, MAX_STOP_IDS] i32: tokens that end the sequence; -1 = none
    remaining: jax.Array  # [B] i32: tokens the slot may still generate (max_tokens budget)

    @classmethod
    def create(cls, num_slots: int, vocab: int) -> "DecodeSlots":
        host = SlotSampling.pack([None] * num_slots, [0] * num_slots)
        return cls(
            tokens=jnp.zeros((num_slots,), jnp.int32),
            lengths=jnp.zeros((num_slots,), jnp.int32),
            sampling=SlotSampling(**{k: jnp.asarray(v) for k, v in host.items()}),
            prompt_mask=jnp.zeros((num_slots, vocab), bool),
            output_counts=jnp.zeros((num_slots, vocab), jnp.int32),
            stop_ids=jnp.full((num_slots, MAX_STOP_IDS), -1, jnp.int32),
            remaining=jnp.zeros((num_slots,), jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeIO:
    """What changes between decode calls besides the slots: the page table in and the
    sampled outputs out, in device buffers that every call updates in place (donated).

    On a GPU a step runs as a command buffer (a CUDA graph) that records the address of
    every buffer its kernels touch. A fresh page table per call and fresh output arrays
    moved those addresses, so XLA updated the graph on every call: 1.37 ms of the host's
    time per call (H200, 8B, batch 64, 2026-11-29). Here the table changes only through
    `Engine._set_table` (a small program of its own) and the host reads the outputs from
    copies made after each call into two alternating buffer sets (`Engine._snapshot`,
    decode()), so nothing is allocated between decode calls and no graph is updated at
    batch 64 or at batch 1 (runtime/BENCHMARKS.md)."""

    page_table: jax.Array  # [B, MP] i32: the decode slots' pages
    out: dict  # tokens, logprob, valid [S, B] and top_ids, top_logprobs [S, B, N]: the last call's

    @classmethod
    def create(cls, num_slots: int, max_pages: int, steps: int, num_top_logprobs: int) -> "DecodeIO":
        out = dict(
            tokens=jnp.zeros((steps, num_slots), jnp.int32), logprob=jnp.zeros((steps, num_slots), jnp.float32),
            valid=jnp.zeros((steps, num_slots), bool),
        )
        if num_top_logprobs:
            out.update(top_ids=jnp.zeros((steps, num_slots, num_top_logprobs), jnp.int32),
                       top_logprobs=jnp.zeros((steps, num_slots, num_top_logprobs), jnp.float32))
        return cls(page_table=jnp.zeros((num_slots, max_pages), jnp.int32), out=out)


def _model_step(graphdef, params, tokens, positions, cache, page_table, kv_lens, logits_at, attn_impl, fresh=False,
                mesh=None):
    if isinstance(graphdef, pipeline.Staged):
        return pipeline.model_step(graphdef, params, tokens, positions, cache, page_table, kv_lens, logits_at,
                                   mesh=mesh, attn_impl=attn_impl, fresh_prefill=fresh)
    if tensor_parallel.is_sharded(mesh):
        return tensor_parallel.model_step(graphdef, params, tokens, positions, cache, page_table, kv_lens, logits_at,
                                          mesh=mesh, attn_impl=attn_impl, fresh_prefill=fresh)
    model: Transformer = nnx.merge(graphdef, params)
    return model(
        tokens, positions, cache, page_table, kv_lens, attn_impl=attn_impl, logits_at=logits_at, fresh_prefill=fresh,
    )


def _prefill(
    graphdef, params, cache: KVCache, slots: DecodeSlots,
    tokens,  # [Bp, T] prompt chunk, right-padded
    starts,  # [Bp] tokens of the prompt already in the cache (chunked prefill)
    lens,  # [Bp] valid tokens in this chunk; 0 for padding rows
    page_table,  # [Bp, MP]
    slot_ids,  # [Bp] decode slot of each prompt; out of range for padding rows
    is_last,  # [Bp] bool: the prompt's last chunk (the slot becomes active)
    sampling: SlotSampling,  # rows [Bp]
    stop_ids,  # [Bp, MAX_STOP_IDS]
    remaining,  # [Bp] tokens the sequence may generate after the one this call samples
    *, attn_impl: str, num_top_logprobs: int, fresh: bool, mesh=None,
):
    positions, kv_lens = _chunk_positions(tokens, starts, lens)
    logits, cache = _model_step(
        graphdef, params, tokens, positions, cache, page_table, kv_lens, jnp.maximum(lens - 1, 0), attn_impl, fresh,
        mesh,
    )
    slots, out = _prefill_sample(slots, logits, tokens, starts, lens, kv_lens, slot_ids, is_last, sampling, stop_ids,
                                 remaining, num_top_logprobs=num_top_logprobs)
    return cache, slots, out


def _chunk_positions(tokens, starts, lens):
    """Positions [Bp, T] of a prefill call's tokens, and the rows' cache lengths [Bp]
    after it (0 for padding rows)."""
    T = tokens.shape[1]
    positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return positions, jnp.where(lens > 0, starts + lens, 0)


def _prefill_sample(slots: DecodeSlots, logits, tokens, starts, lens, kv_lens, slot_ids, is_last,
                    sampling: SlotSampling, stop_ids, remaining, *, num_top_logprobs: int):
    """Samples each prefill row's token from its last position's logits [Bp, V] and
    fills the rows' decode slots."""
    Bp, T = tokens.shape
    V = logits.shape[-1]
    # Which tokens the prompt holds (repetition penalty): this chunk's, merged with the
    # earlier chunks' that their calls left in the slot's row.
    valid_tok = jnp.arange(T)[None, :] < lens[:, None]
    mask_rows = jnp.zeros((Bp, V), bool).at[jnp.arange(Bp)[:, None], tokens].max(valid_tok)
    earlier = slots.prompt_mask.at[slot_ids].get(mode="fill", fill_value=False)
    mask_rows = mask_rows | (earlier & (starts > 0)[:, None])
    # "filter" serves every row with no branch on the device (runtime.sampling.SAMPLING_MODES);
    # its sort over the vocabulary is small next to a prefill, so one variant is enough.
    out = sample(
        logits, sampling, kv_lens, mask_rows, jnp.zeros((Bp, V), jnp.int32), num_top_logprobs=num_top_logprobs,
        mode="filter",
    )
    tok = out["tokens"]
    # The slot decodes after the prompt's last chunk unless the sampled token already ends it.
    starts_decoding = is_last & (remaining > 0) & ~jnp.any(tok[:, None] == stop_ids, axis=-1)
    slots = DecodeSlots(
        tokens=slots.tokens.at[slot_ids].set(tok, mode="drop"),
        # The slot stays idle (length 0) until the prompt's last chunk is in.
        lengths=slots.lengths.at[slot_ids].set(jnp.where(starts_decoding, kv_lens, 0), mode="drop"),
        sampling=jax.tree.map(lambda a, r: a.at[slot_ids].set(r, mode="drop"), slots.sampling, sampling),
        prompt_mask=slots.prompt_mask.at[slot_ids].set(mask_rows, mode="drop"),
        output_counts=slots.output_counts.at[slot_ids].set(
            jax.nn.one_hot(tok, V, dtype=jnp.int32), mode="drop"
        ),
        stop_ids=slots.stop_ids.at[slot_ids].set(stop_ids, mode="drop"),
        remaining=slots.remaining.at[slot_ids].set(remaining, mode="drop"),
    )
    return slots, out


# A prefill call's host arguments travel as one int32 and one float32 array: on a GPU
# each argument was a host-to-device copy of its own (12 per call, ~1 ms of host time
# before the step's graph could launch; H200 trace, runtime/BENCHMARKS.md).
_PREFILL_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# Columns of the int32 array after the chunk's T tokens and the page table's MP entries.
_PREFILL_INT_COLS = (("starts", 1), ("lens", 1), ("slot_ids", 1), ("is_last", 1), ("top_k", 1), ("key", 2),
                     ("stop_ids", MAX_STOP_IDS), ("remaining", 1))


def pack_prefill(*, tokens, starts, lens, page_table, slot_ids, is_last, sampling: dict, stop_ids,
                 remaining) -> tuple[np.ndarray, np.ndarray]:
    """The prefill step's host arguments: ints [Bp, T + MP + 9 + MAX_STOP_IDS] (tokens,
    page table, then _PREFILL_INT_COLS; the PRNG key's uint32 words as their bits) and
    floats [Bp, 6] (_PREFILL_FLOATS)."""
    b = len(tokens)
    col = lambda x: np.asarray(x).reshape(b, -1)  # noqa: E731
    named = dict(starts=starts, lens=lens, slot_ids=slot_ids, is_last=is_last, top_k=sampling["top_k"],
                 key=np.asarray(sampling["key"], np.uint32).view(np.int32), stop_ids=stop_ids, remaining=remaining)
    ints = np.concatenate([col(tokens), col(page_table)] + [col(named[k]) for k, _ in _PREFILL_INT_COLS],
                          axis=1, dtype=np.int32)
    floats = np.stack([np.asarray(sampling[k], np.float32) for k in _PREFILL_FLOATS], axis=1)
    return ints, floats


def scratch_prefill(rows: int, t: int, max_pages: int, num_slots: int) -> dict:
    """A prefill call's arguments on scratch rows (slot ids out of range: no slot is
    filled), for warm-up and ahead-of-time lowering."""
    return dict(
        tokens=np.zeros((rows, t), np.int32), starts=np.zeros(rows, np.int32), lens=np.zeros(rows, np.int32),
        page_table=np.zeros((rows, max_pages), np.int32), slot_ids=np.full(rows, num_slots, np.int32),
        is_last=np.zeros(rows, bool), sampling=SlotSampling.pack([None] * rows, [0] * rows),
        stop_ids=np.full((rows, MAX_STOP_IDS), -1, np.int32), remaining=np.zeros(rows, np.int32),
    )


def _unpack_prefill(ints, floats, max_pages: int) -> dict:
    """pack_prefill's arrays back into _prefill's arguments (static slices, in the step)."""
    T = ints.shape[1] - max_pages - sum(n for _, n in _PREFILL_INT_COLS)
    out = dict(tokens=ints[:, :T], page_table=ints[:, T : T + max_pages])
    at = T + max_pages
    for name, n in _PREFILL_INT_COLS:
        out[name] = ints[:, at : at + n] if n > 1 else ints[:, at]
        at += n
    key = jax.lax.bitcast_convert_type(out.pop("key"), jnp.uint32)
    sampling = SlotSampling(top_k=out.pop("top_k"), key=key,
                            **{k: floats[:, i] for i, k in enumerate(_PREFILL_FLOATS)})
    return dict(out, is_last=out["is_last"] != 0, sampling=sampling)


def _prefill_packed(graphdef, params, cache: KVCache, slots: DecodeSlots, ints, floats, *, max_pages: int, **static):
    return _prefill(graphdef, params, cache, slots, **_unpack_prefill(ints, floats, max_pages), **static)


def _decode_one(graphdef, params, cache: KVCache, slots: DecodeSlots, page_table, *, attn_impl, num_top_logprobs,
                sampling_mode: str, mesh=None):
    B = slots.tokens.shape[0]
    kv_lens = jnp.where(slots.lengths > 0, slots.lengths + 1, 0)
    logits, cache = _model_step(
        graphdef, params, slots.tokens[:, None], slots.lengths[:, None], cache, page_table, kv_lens,
        jnp.zeros((B,), jnp.int32), attn_impl, mesh=mesh,
    )
    slots, out = _decode_sample(slots, logits, kv_lens, num_top_logprobs=num_top_logprobs, sampling_mode=sampling_mode)
    return cache, slots, out


def _decode_sample(slots: DecodeSlots, logits, kv_lens, *, num_top_logprobs: int, sampling_mode: str):
    """Samples every active slot's next token from its logits [B, V] and advances the slots."""
    B = slots.tokens.shape[0]
    active = slots.lengths > 0
    out = sample(
        logits, slots.sampling, kv_lens, slots.prompt_mask, slots.output_counts, num_top_logprobs=num_top_logprobs,
        mode=sampling_mode,
    )
    tok = jnp.where(active, out["tokens"], 0)
    # A slot that emits a stop id or spends its budget goes idle here, so later steps of
    # the same call neither write its pages nor count its tokens.
    ends = jnp.any(tok[:, None] == slots.stop_ids, axis=-1) | (slots.remaining <= 1)
    slots = dataclasses.replace(
        slots,
        tokens=tok,
        lengths=jnp.where(active & ~ends, kv_lens, 0),
        output_counts=slots.output_counts.at[jnp.arange(B), tok].add(active.astype(jnp.int32)),
        remaining=slots.remaining - active.astype(jnp.int32),
    )
    return slots, dict(out, tokens=tok, valid=active)


# The DecodeSlots fields a decode step changes (_decode_sample). A call over fewer rows
# than slots writes only these back: writing the prompt masks back too ([slots, V], 8 MB
# at 64 slots of a 128K vocabulary, which no decode step changes) made XLA copy the
# whole array, twice, in every call (seen in the compiled program, CPU).
_DECODE_WRITES = ("tokens", "lengths", "output_counts", "remaining")


def _decode(graphdef, params, cache: KVCache, slots: DecodeSlots, io: DecodeIO, *, steps: int, rows: int,
            **static):
    """`steps` decode steps in one dispatch over slots [0, rows) (the others are idle and
    untouched); outputs are stacked [steps, rows, ...] into io.out's first rows."""
    B = slots.tokens.shape[0]
    part = slots if rows == B else jax.tree.map(lambda x: x[:rows], slots)
    page_table = io.page_table[:rows]

    def body(carry, _):
        cache, part = carry
        cache, part, out = _decode_one(graphdef, params, cache, part, page_table, **static)
        return (cache, part), out

    # A while loop, not unrolled: on an H100 (8B, batch 1) the unrolled form cost ~9.8 ms
    # per step; the loop ~6.0 ms per step plus ~7 ms per call (see the issue notes).
    (cache, part), outs = jax.lax.scan(body, (cache, part), None, length=steps)
    if rows < B:  # only what a step changes goes back (_DECODE_WRITES)
        slots = dataclasses.replace(slots, **{k: getattr(slots, k).at[:rows].set(getattr(part, k))
                                              for k in _DECODE_WRITES})
    else:
        slots = part
    out = {k: io.out[k].at[:, :rows].set(outs[k].astype(io.out[k].dtype)) for k in io.out}
    return cache, slots, DecodeIO(page_table=io.page_table, out=out)


def _mixed(graphdef, params, cache: KVCache, slots: DecodeSlots, io: DecodeIO, ints, floats, *, rows: int,
           max_pages: int, fresh: bool, attn_impl: str, num_top_logprobs: int, mesh=None):
    """One decode step over slots [0, rows) and one prefill call (pack_prefill's arrays)
    as a single forward pass: the decode rows and the chunk's tokens share every weight
    read (runtime.models.layers.Segment). The same tokens as a prefill call followed by a
    decode call, except that a prompt completed here starts decoding in the next step
    (its slot is idle while this step decodes). The prefill rows are sampled here and
    their outputs returned; the decode rows' logits [rows, V] and cache lengths [rows]
    (0: idle in this step) are returned for `_mixed_sample`, a program per sampling mode
    (so a greedy step does not pay for the top-k/top-p sort: ~1 ms of a 64-row step on
    an H200, runtime/BENCHMARKS.md)."""
    if mesh is not None and tensor_parallel.is_sharded(mesh):
        raise NotImplementedError("mixed calls run on one device (mesh_engine_config turns them off on a sharded mesh)")
    p = _unpack_prefill(ints, floats, max_pages)
    B = slots.tokens.shape[0]
    part = slots if rows == B else jax.tree.map(lambda x: x[:rows], slots)
    Bp, T = p["tokens"].shape
    d_kv = jnp.where(part.lengths > 0, part.lengths + 1, 0)
    p_pos, p_kv = _chunk_positions(p["tokens"], p["starts"], p["lens"])
    segments = (Segment(io.page_table[:rows], part.lengths[:, None], d_kv, rows, 1, False),
                Segment(p["page_table"], p_pos, p_kv, Bp, T, fresh))
    tokens = jnp.concatenate([part.tokens, p["tokens"].reshape(-1)])[None]
    positions = jnp.concatenate([part.lengths, p_pos.reshape(-1)])[None]
    logits_at = jnp.concatenate([jnp.arange(rows, dtype=jnp.int32),
                                 rows + jnp.arange(Bp, dtype=jnp.int32) * T + jnp.maximum(p["lens"] - 1, 0)])
    model: Transformer = nnx.merge(graphdef, params)
    logits, cache = model(tokens, positions, cache, None, None, attn_impl=attn_impl, logits_at=logits_at,
                          segments=segments)
    slots, p_out = _prefill_sample(slots, logits[rows:], p["tokens"], p["starts"], p["lens"], p_kv, p["slot_ids"],
                                   p["is_last"], p["sampling"], p["stop_ids"], p["remaining"],
                                   num_top_logprobs=num_top_logprobs)
    return cache, slots, p_out, dict(logits=logits[:rows].astype(jnp.float32), kv_lens=d_kv)


def _mixed_sample(slots: DecodeSlots, io: DecodeIO, logits, kv_lens, *, num_top_logprobs: int,
                  sampling_mode: str) -> tuple[DecodeSlots, DecodeIO]:
    """The decode rows of a mixed call (`_mixed`), sampled after it: logits [rows, V] and
    the rows' cache lengths [rows] (0: idle in that step). Rows idle in the step keep
    their state, which the mixed call's prefill may just have written (a prompt it
    completed). Outputs go to io.out[0] as _decode's."""
    B, rows = slots.tokens.shape[0], logits.shape[0]
    active = kv_lens > 0
    part = slots if rows == B else jax.tree.map(lambda x: x[:rows], slots)
    stepped, d_out = _decode_sample(dataclasses.replace(part, lengths=jnp.where(active, part.lengths, 0)), logits,
                                    kv_lens, num_top_logprobs=num_top_logprobs, sampling_mode=sampling_mode)
    keep = lambda new, old: jnp.where(active.reshape(-1, *([1] * (new.ndim - 1))), new, old)  # noqa: E731
    part = jax.tree.map(keep, stepped, part)
    slots = part if rows == B else jax.tree.map(lambda x, q: x.at[:rows].set(q), slots, part)
    out = {k: io.out[k].at[0, :rows].set(d_out[k].astype(io.out[k].dtype)) for k in io.out}
    return slots, DecodeIO(page_table=io.page_table, out=out)


def attention_impl(ecfg: EngineConfig) -> str:
    """The attention path the engine compiles. "auto" takes the Pallas kernels on GPUs,
    where they are measured (pallas_kernels/BENCHMARKS.md), and the reference elsewhere:
    on CPU the kernels only run interpreted, and the TPU kernels are verified in the
    interpreter and compiled by libtpu but not yet run on a TPU."""
    if ecfg.attention != "auto":
        return ecfg.attention
    return "pallas" if dispatch.platform() == "gpu" else "reference"


def prefill_variants(ecfg: EngineConfig) -> tuple[bool, ...]:
    """Prefill programs by "fresh" (every row starts at 0): the Pallas path compiles a
    fresh variant (flash attention over the chunk) and, when a prompt can be split into
    chunks, a continuation variant; the reference needs one. A prompt is split when it is
    longer than the largest prefill length, or when the token budget (runtime.scheduler,
    policy 4) can leave it less than its length: unless the budget holds a full call of
    the longest prompts beside every slot's decode tokens, some step may. With prefix
    caching a prompt longer than a page may start after cached pages."""
    if attention_impl(ecfg) == "reference":
        return (False,)
    longest = ecfg.max_model_len - 1
    full_step = max(ecfg.prefill_batch_sizes) * longest + ecfg.max_num_seqs * ecfg.decode_steps_per_call
    chunked = longest > max(ecfg.prefill_lengths) or (
        longest > min(ecfg.prefill_lengths) and ecfg.max_num_batched_tokens < full_step) or (
        ecfg.enable_prefix_caching and longest > ecfg.page_size)  # a prompt after its cached pages
    return (True, False) if chunked else (True,)


def mixed_lengths(ecfg: EngineConfig) -> tuple[int, ...]:
    """The chunk lengths of the mixed calls (`_mixed`): while sequences decode, the token
    budget caps a step's chunks (runtime.scheduler, policy 4) at the budget or the smallest
    length, and a chunk pads up to a length; () where mixed calls are off
    (`EngineConfig.mixed_calls`, or several decode steps per call)."""
    if not ecfg.mixed_calls or ecfg.decode_steps_per_call != 1:
        return ()
    cap = max(ecfg.max_num_batched_tokens, ecfg.prefill_lengths[0])
    top = next((t for t in ecfg.prefill_lengths if t >= cap), ecfg.prefill_lengths[-1])
    return tuple(t for t in ecfg.prefill_lengths if t <= top)


def mixed_rows(ecfg: EngineConfig) -> tuple[int, ...]:
    """The decode buckets that have mixed calls (each with a `_mixed_sample` per sampling mode)."""
    return tuple(sorted({rows for rows, *_ in bucket_manifest(ecfg)["mixed"]}))


def bucket_manifest(ecfg: EngineConfig) -> dict[str, list[tuple]]:
    """Every program an engine with this config compiles: prefill (batch, length[, "fresh"]),
    decode (slots it runs, sampling mode) and mixed (decode slots, prefill batch, length[,
    "fresh"]; a decode step beside a prefill call). Warm-up compiles exactly these."""
    tag = {True: ("fresh",), False: ()}
    return {
        "prefill": [
            (b, t, *tag[f]) for f in prefill_variants(ecfg) for b in ecfg.prefill_batch_sizes for t in ecfg.prefill_lengths
        ],
        "decode": [(rows, mode) for rows in ecfg.decode_buckets for mode in ecfg.decode_sampling_modes],
        # One prefill batch size: while sequences decode, the budget leaves room for few chunks
        # (a step with more runs as two calls).
        "mixed": [
            (rows, min(ecfg.prefill_batch_sizes), t, *tag[f]) for f in prefill_variants(ecfg)
            for rows in ecfg.decode_buckets for t in mixed_lengths(ecfg)
        ],
    }


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted step functions of an engine: what its manifest compiles."""

    prefill: dict[bool, Callable]  # by "fresh" (prefill_variants); (params, cache, slots, *pack_prefill(...))
    decode: dict[tuple[int, str], Callable]  # by (rows, sampling mode): the manifest's; (params, cache, slots, io)
    mixed: dict[tuple[int, bool], Callable]  # by (decode rows, fresh); (params, cache, slots, io, *pack_prefill(...))
    # by (decode rows, sampling mode): a mixed call's decode rows; (slots, io, logits [rows, V], kv_lens [rows])
    mixed_sample: dict[tuple[int, str], Callable]
    release: Callable  # (slots, slot)
    # (slots, slot, tokens [max_pages_per_seq * page_size], padded with the vocabulary size)
    seed_prompt_mask: Callable
    set_table: Callable  # (io, page_table [B, MP]): io with that table
    snapshot: Callable  # (io, dst) -> dst (donated) holding io.out's first rows, for the host to read


def mesh_engine_config(ecfg: EngineConfig, mesh) -> EngineConfig:
    """The config an engine on `mesh` runs. Data-parallel groups and pipeline stages decode
    every slot in each call: decode buckets take the first slots, but groups own slot
    ranges and stages run the slots in microbatches. Mixed calls run on one device (the
    sharded step functions take one rectangular call), so sharded engines make two calls."""
    if mesh is None:
        return ecfg
    if tensor_parallel.data_axis(mesh) and mesh.shape[tensor_parallel.data_axis(mesh)] > 1 or (
            pipeline.stage_size(mesh) > 1):
        ecfg = dataclasses.replace(ecfg, decode_batch_sizes=(ecfg.max_num_seqs,))
    if tensor_parallel.is_sharded(mesh) or pipeline.stage_size(mesh) > 1:
        ecfg = dataclasses.replace(ecfg, mixed_calls=False)
    return ecfg


def _from_leaves(fn: Callable, params_treedef) -> Callable:
    """fn(params, *args) as a function of the params' leaves (a list), rebuilt into the
    tree while tracing. jit flattens its arguments on every call; for an nnx.State of ~300
    Variables that took 0.3-0.5 ms of host time per call (CPU, 2026-11-29), for a list 0.02."""
    if params_treedef is None:
        return fn

    @functools.wraps(fn)
    def call(leaves, *args):
        return fn(jax.tree.unflatten(params_treedef, leaves), *args)

    return call


def build_steps(graphdef, ecfg: EngineConfig, *, cache_shardings, replicated, mesh=None,
                params_treedef=None) -> Steps:
    """The step functions of an engine with this config, jitted with the cache and slots
    donated (updated in place) and the outputs pinned: the cache to `cache_shardings`
    (a KVCache of shardings), slots and sampled outputs to `replicated`. The Engine
    calls them on its device state; runtime/aot.py lowers them on abstract arguments
    for devices this process may not have. With `params_treedef` (the params' tree
    structure) the prefill and decode steps take the params as their list of leaves."""
    # Outputs pinned to the inputs' shardings: the cache and slots a step returns are
    # the next step's inputs, and a sharding XLA picked differently would compile the
    # step again. The sampled ids and logprobs are small and read on the host: replicated.
    outs = (cache_shardings, replicated, replicated)
    static = dict(attn_impl=attention_impl(ecfg), num_top_logprobs=ecfg.num_top_logprobs, mesh=mesh)
    # Prefill variants: with the Pallas kernels a call whose rows all start at 0
    # ("fresh") runs flash attention over the chunk; chunks continuing a long prompt
    # need the paged path. The reference serves both in one variant.
    prefill = {
        fresh: jax.jit(_from_leaves(functools.partial(_prefill_packed, graphdef, **static, fresh=fresh,
                                                      max_pages=ecfg.max_pages_per_seq), params_treedef),
                       donate_argnums=(1, 2), out_shardings=outs,
                       compiler_options=_compiler_options(ecfg, "prefill"))
        for fresh in prefill_variants(ecfg)
    }
    # Decode variants by sampling mode: the host knows every slot's sampling parameters
    # and picks the cheapest exact one per call (runtime.sampling.sampling_mode); and by
    # bucket: the slots a call runs. The cache, slots and io are updated in place.
    decode = {
        (rows, mode): jax.jit(
            _from_leaves(functools.partial(_decode, graphdef, steps=ecfg.decode_steps_per_call, rows=rows,
                                           sampling_mode=mode, **static), params_treedef),
            donate_argnums=(1, 2, 3), out_shardings=(cache_shardings, replicated, replicated),
            compiler_options=_compiler_options(ecfg, "decode", rows))
        for rows, mode in bucket_manifest(ecfg)["decode"]
    }
    # Mixed calls by decode bucket and prefill variant (the chunk's shape is traced per call).
    mixed = {
        (rows, fresh): jax.jit(
            _from_leaves(functools.partial(_mixed, graphdef, rows=rows, fresh=fresh, max_pages=ecfg.max_pages_per_seq,
                                           **static), params_treedef),
            donate_argnums=(1, 2), out_shardings=(cache_shardings, replicated, replicated, replicated),
            compiler_options=_compiler_options(ecfg, "prefill"))
        for rows, _, _, *fresh_tag in bucket_manifest(ecfg)["mixed"] for fresh in [bool(fresh_tag)]
    }
    mixed_sample = {
        (rows, mode): jax.jit(functools.partial(_mixed_sample, num_top_logprobs=ecfg.num_top_logprobs,
                                                sampling_mode=mode),
                              donate_argnums=(0, 1), out_shardings=(replicated, replicated))
        for rows in mixed_rows(ecfg) for mode in ecfg.decode_sampling_modes
    }
    release = jax.jit(_release, donate_argnums=(0,), out_shardings=replicated)
    seed_prompt_mask = jax.jit(_seed_prompt_mask, donate_argnums=(0,), out_shardings=replicated)
    set_table = jax.jit(_set_table, donate_argnums=(0,), out_shardings=replicated)
    snapshot = jax.jit(_snapshot, donate_argnums=(1,), out_shardings=replicated)
    return Steps(prefill, decode, mixed, mixed_sample, release, seed_prompt_mask, set_table, snapshot)


# Decode buckets of at least CUBLAS_DECODE_ROWS rows (runtime.models.transformer) take
# their matmuls from cuBLAS, not XLA's Triton GEMMs. H200, Llama-3.1-8B shapes, batch 64,
# prompt 512 (2026-11-29, one device call, two processes, --xla_gpu_enable_triton_gemm=false
# in the second): 6.18 ms per step against 6.40, device time per call 6.11 against 6.43;
# the q/k/v and o projections at M=64 were where Triton fell furthest below the copy rate
# (~2.7 TB/s). At batch 1 cuBLAS was slower (5.80 ms against 4.45-4.55: the vocabulary
# projection became a float32 GEMV behind a 0.75 ms conversion of its weight), and so was
# the 512-token prefill (14.97 ms against 14.00), so smaller buckets and prefill keep
# Triton. The per-program option was confirmed on the H200 the next day: the batch-64
# trace runs nvjet (cuBLAS) kernels, the batch-1 trace Triton's gemm fusions.


# A step's CUDA graph records the address of its temporary buffer, which XLA's allocator
# may place elsewhere on the next call when anything else was allocated in between (a new
# page table, a prefill's inputs): XLA then updates the graph on the host (1.7-2.5 ms per
# update at 8B), and with one call in flight the device waits. This mode asks XLA to keep
# the temporary buffer at one virtual address (remapped onto whatever memory the call
# gets), so the graph is never updated for it. XLA does that remapping only when the
# client's allocator is its VMM allocator (GpuExecutableBufferAllocator::
# CreateExecutionScope checks for DeviceAddressVmmAllocator), which JAX picks with
# XLA_PYTHON_CLIENT_ALLOCATOR=vmm; under the default BFC allocator the mode changes
# nothing. H200, session 19 (runtime/BENCHMARKS.md): with the default allocator XLA's
# log still shows the decode graph updated twice per page crossing ("updated_allocs=1",
# then back), 14-15 calls apart. Session 18's one-call gain with it (4.21 ms per step
# against 4.30, p90 4.43 against 5.44; two later runs p90 4.54 and 5.47) is therefore
# within the spread between runs. Kept: harmless, and the VMM allocator is the next A/B.
# JAX 0.10's XLA names its modes differently: there the option is left out
# (_stable_temp_option). XLSERVE_COMMAND_BUFFER_UPDATE_MODE replaces the mode for
# measurements (ALWAYS_UPDATE: XLA's default; SKIP_PROFILED: XLA's other remapping mode,
# which profiles the first calls for the buffers that move; not yet measured here).
STABLE_TEMP_OPTION = ("xla_gpu_command_buffer_update_mode", "SKIP_TEMP")


@functools.cache
def _stable_temp_option() -> dict:
    """STABLE_TEMP_OPTION where this process's XLA knows it, else nothing."""
    name, value = STABLE_TEMP_OPTION
    value = os.environ.get("XLSERVE_COMMAND_BUFFER_UPDATE_MODE", value)
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(jnp.zeros(1, jnp.int32)).compile()
    except Exception as e:  # noqa: BLE001 -- an older XLA rejects the value: run without it
        log.info("XLA does not take %s=%s (%s); command buffers are updated when buffers move", name, value,
                 str(e).splitlines()[0][:200])
        return {}
    return {name: value}


def _compiler_options(ecfg: EngineConfig, step: str, rows: int = 0) -> dict | None:
    """Per-program XLA options on a GPU: out of CUDA graphs (EngineConfig.command_buffers),
    a temporary buffer at a stable address for those in graphs (STABLE_TEMP_OPTION), and
    cuBLAS matmuls for the large decode buckets (CUBLAS_DECODE_ROWS). None where XLA's
    defaults apply, and off a GPU, whose compilers do not know these options."""
    if dispatch.platform() != "gpu":
        return None
    options = {}
    keep = {"all": ("prefill", "decode"), "decode": ("decode",), "none": ()}[ecfg.command_buffers]
    if step not in keep:
        options["xla_gpu_enable_command_buffer"] = ""
    else:
        options.update(_stable_temp_option())
    if step == "decode" and rows >= CUBLAS_DECODE_ROWS:
        options["xla_gpu_enable_triton_gemm"] = False
    return options or None


def _set_table(io: DecodeIO, page_table) -> DecodeIO:
    # Written into the donated table, so it keeps its address (DecodeIO).
    return dataclasses.replace(io, page_table=io.page_table.at[:].set(page_table))


def _snapshot(io: DecodeIO, dst: dict) -> dict:
    # Written into the donated dst, so it keeps its address (Engine.decode says why).
    return {k: dst[k].at[:].set(v[:, : dst[k].shape[1]]) for k, v in io.out.items()}


def _release(slots: DecodeSlots, slot) -> DecodeSlots:
    return dataclasses.replace(slots, lengths=slots.lengths.at[slot].set(0, mode="drop"))


def _seed_prompt_mask(slots: DecodeSlots, slot, tokens) -> DecodeSlots:
    # The slot's prompt mask holds exactly `tokens` (ids >= the vocabulary size: padding).
    row = jnp.zeros(slots.prompt_mask.shape[1], bool).at[tokens].set(True, mode="drop")
    return dataclasses.replace(slots, prompt_mask=slots.prompt_mask.at[slot].set(row, mode="drop"))


class _Installed:
    """A step served by ahead-of-time executables for the argument shapes they were built
    for (`key(args)` picks one) and by its jitted function otherwise."""

    def __init__(self, jitted: Callable, table: dict, key: Callable):
        self.jitted, self.table, self.key = jitted, table, key

    def __call__(self, *args):
        return self.table.get(self.key(args), self.jitted)(*args)


class Engine:
    """Owns params, cache and slots on device; runs compiled prefill and decode.

    Not thread-safe: one owner (the orchestrator loop) calls it.
    """

    def __init__(self, model: Transformer, ecfg: EngineConfig, *, num_pages: int, cache_sharding=None):
        self.cfg: ModelConfig = model.cfg
        self.ecfg = ecfg
        # The checkpoint's generation_config.json sampling defaults (runtime.startup sets
        # them): front ends apply them to the fields a request leaves unset.
        self.sampling_defaults: dict[str, float | int] = {}
        self.num_pages = num_pages
        # Committed placements from the start: the step outputs are committed, and inputs
        # that differ only in commitment would compile the steps a second time.
        device = jax.tree.leaves(nnx.state(model))[0].sharding
        mesh = device.mesh if isinstance(device, jax.sharding.NamedSharding) else None
        self.mesh = mesh
        # q/k/v and gate/up as one weight each, in place (the caller's model is this one),
        # quantized where ecfg says so (runtime.startup quantizes before planning memory).
        fuse_projections(model, mesh)
        quantize_model(model, ecfg.quantization, mesh)
        self.graphdef, self.params = nnx.split(model)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else (
            jax.sharding.SingleDeviceSharding(list(device.device_set)[0]))
        self._replicated = replicated
        # Data-parallel groups: group g owns slots [g*B/D, (g+1)*B/D), pages [g*P/D, (g+1)*P/D)
        # and, in a prefill call of D*b rows, rows [g*b, (g+1)*b) (sharding/tensor_parallel.py).
        data = tensor_parallel.data_axis(mesh)
        self.data_groups = mesh.shape[data] if data else 1
        for name, n in (("max_num_seqs", ecfg.max_num_seqs), ("num_pages", num_pages)):
            if n % self.data_groups:
                raise ConfigError(f"{name}={n} is not a multiple of data_parallel_size={self.data_groups}")
        ecfg = self.ecfg = mesh_engine_config(ecfg, mesh)
        if pipeline.stage_size(mesh) > 1:
            # Layers in stages: each stage's weights and pages stacked over "stage" (sharding/pipeline.py).
            self.graphdef, self.params = pipeline.stage_model(model, mesh, ecfg.pipeline_microbatches)
            self.cache = pipeline.create_cache(self.cfg, num_pages=num_pages, page_size=ecfg.page_size,
                                               dtype=jnp.dtype(ecfg.cache_dtype), mesh=mesh)
        else:
            self.cache = KVCache.create(
                self.cfg, num_pages=num_pages, page_size=ecfg.page_size, dtype=jnp.dtype(ecfg.cache_dtype),
                sharding=cache_sharding or replicated,
            )
        self.slots = jax.device_put(DecodeSlots.create(ecfg.max_num_seqs, self.cfg.vocab_size), replicated)
        self.io = jax.device_put(DecodeIO.create(ecfg.max_num_seqs, ecfg.max_pages_per_seq, ecfg.decode_steps_per_call,
                                                 ecfg.num_top_logprobs), replicated)
        self._table_sent = np.zeros((ecfg.max_num_seqs, ecfg.max_pages_per_seq), np.int32)  # what io holds
        # Per decode bucket, two sets of output buffers the host reads, used in turn (decode()).
        self._readback = {
            rows: [jax.device_put(DecodeIO.create(rows, 1, ecfg.decode_steps_per_call, ecfg.num_top_logprobs).out,
                                  replicated) for _ in range(2)]
            for rows in ecfg.decode_buckets
        }
        self._readback_turn = 0
        self.prefill_variants = prefill_variants(ecfg)
        # The steps take the params as a flat list (build_steps), flattened once here.
        self.param_leaves, treedef = jax.tree.flatten(self.params)
        steps = build_steps(self.graphdef, ecfg, cache_shardings=jax.tree.map(lambda x: x.sharding, self.cache),
                            replicated=replicated, mesh=mesh, params_treedef=treedef)
        self._prefill, self._decode, self._release = steps.prefill, steps.decode, steps.release
        self._seed_prompt_mask = steps.seed_prompt_mask
        self._mixed = steps.mixed
        self._mixed_sample = steps.mixed_sample
        self._mixed_shapes = {tuple(e) for e in self.manifest()["mixed"]}
        self._set_table, self._snapshot = steps.set_table, steps.snapshot
        # A progressive start (runtime.aot.prepare_programs) serves with some programs while
        # the others compile: `ready` holds the ready ones ((kind, shape) as programs()
        # names them), None once every program is; calls take the best ready program.
        self.ready: set[tuple[str, tuple]] | None = None
        self._arrivals: queue.SimpleQueue = queue.SimpleQueue()
        self._unwarmed: set[tuple[str, tuple]] = set()  # arrived, not yet run (warm_arrivals)
        self.background = None  # the job bringing the others (runtime.aot.Background), if any

    # --- the bucket manifest ---------------------------------------------------------

    def manifest(self) -> dict[str, list[tuple]]:
        return bucket_manifest(self.ecfg)

    def prefill_shape(self, num_prompts: int, chunk_len: int, fresh: bool = False) -> tuple[int, int]:
        """The smallest manifest shape that holds `num_prompts` chunks of `chunk_len` tokens
        (with data-parallel groups: per group; a call has data_groups times the rows) and
        has a ready program for them (`fresh`: every chunk starts its prompt, which the
        continuation program serves too)."""
        t = next((t for t in self.ecfg.prefill_lengths if t >= chunk_len), None)
        b = next((b for b in self.ecfg.prefill_batch_sizes if b >= num_prompts), None)
        if t is None or b is None:
            raise ValueError(
                f"no prefill bucket for {num_prompts} prompts of {chunk_len} tokens; "
                f"lengths {self.ecfg.prefill_lengths}, batch sizes {self.ecfg.prefill_batch_sizes}"
            )
        if self.ready is None:
            return b, t
        for bb in self.ecfg.prefill_batch_sizes:
            for tt in self.ecfg.prefill_lengths:
                if bb >= b and tt >= t and self._prefill_variant(bb, tt, fresh) is not None:
                    return bb, tt
        raise ValueError(f"no ready prefill program for {num_prompts} prompts of {chunk_len} tokens")

    def _prefill_variant(self, b: int, t: int, fresh: bool) -> bool | None:
        """The prefill program (its "fresh" key) that runs chunks of shape (b, t): the fresh
        one for fresh chunks where ready, else the continuation one; None if neither is."""
        if fresh and True in self._prefill and self._is_ready("prefill", (b, t, "fresh")):
            return True
        if False in self._prefill and self._is_ready("prefill", (b, t)):
            return False
        return None

    def decode_choice(self, top: int, sampling: list) -> tuple[int, str]:
        """(rows, sampling mode) of the decode call for slots [0, top) sampled with these
        parameters (SamplingParams; None for idle rows): the smallest bucket with a ready
        program in the cheapest mode that samples them exactly."""
        for rows in self.ecfg.decode_buckets:
            if rows < top or not self._is_ready("snapshot", (rows,)):  # (the outputs' copy)
                continue
            modes = tuple(m for m in self.ecfg.decode_sampling_modes if self._is_ready("decode", (rows, m)))
            try:
                return rows, sampling_mode(sampling, modes)
            except StopIteration:  # no ready mode samples these rows exactly
                continue
        raise ValueError(f"no ready decode program for {top} slots")

    # --- a progressive start -------------------------------------------------------------

    def _is_ready(self, kind: str, shape: tuple) -> bool:
        return self.ready is None or (kind, shape) in self.ready

    def program_names(self) -> list[tuple[str, tuple]]:
        """(kind, shape) of every program, in programs()' order, without building arguments."""
        m = self.manifest()
        return ([("prefill", tuple(e)) for e in m["prefill"]] + [("decode", tuple(e)) for e in m["decode"]]
                + [("mixed", tuple(e)) for e in m["mixed"]] + [("mixed_sample", k) for k in self._mixed_sample]
                + [("release", ()), ("seed_prompt_mask", ()), ("set_table", ())]
                + [("snapshot", (rows,)) for rows in self._readback])

    def limit_programs(self, ready) -> None:
        """Serve with only these programs ((kind, shape)) until the others `arrive`. They
        must cover every call: a prefill program of the largest shape that serves any chunk,
        and a decode program of the largest bucket in a mode that samples anything
        (runtime.aot.core_programs)."""
        self.ready = set(ready)

    def arrive(self, executables: dict) -> None:
        """More programs ({(kind, shape): compiled}), from any thread; the engine's owner
        installs them between calls (`install_arrivals`)."""
        self._arrivals.put(dict(executables))

    def install_arrivals(self) -> int:
        """Installs the programs that arrived (owner's thread, between calls); returns how
        many. Once every program is ready, `ready` becomes None."""
        n = 0
        while True:
            try:
                executables = self._arrivals.get_nowait()
            except queue.Empty:
                break
            self.use_executables(executables)
            n += len(executables)
            self._unwarmed |= set(executables)
            if self.ready is not None:
                self.ready |= set(executables)
                if self.ready >= set(self.program_names()):
                    self.ready = None
        return n

    def warm_arrivals(self, max_entries: int = 1) -> int:
        """Runs up to `max_entries` warm-up entries (warmup's, on scratch rows) over programs
        that arrived and have not run yet, each to completion; returns how many such
        entries are left. On a GPU a program's first run records and instantiates its CUDA
        graph, tens of ms that a request reaching that program first waited for (H200,
        2026-12-01: an idle server's first TTFT p99 82.8 ms, 38.5 ms with this).
        For the owner's thread with no call in flight and no request running: the entries
        change no slot and write no page, so a prefix cache's pages stay as they were.
        Each entry is waited for, so a request arriving meanwhile finds at most one
        entry's work ahead of it on the device (dispatch alone would queue them all). An
        entry whose other programs are not ready waits for them; nothing compiles here."""
        if not self._unwarmed:
            return 0
        ran = left = 0
        for programs, _, run in self._warm_entries():
            if not programs & self._unwarmed:
                continue
            if ran >= max_entries:
                left += 1
                continue
            self._unwarmed -= programs  # before running: a failing entry is not retried forever
            run()
            jax.block_until_ready(self.slots)
            ran += 1
        return left

    def warmup(self) -> int:
        """Compiles the whole manifest (on scratch rows: slots stay idle). Returns compilations.
        `warmup_report` then lists each entry: (name, seconds, "compiled" | "cache" (loaded
        from the persistent compilation cache) | "ready" (built earlier in this process))."""
        before = compile_counter.count
        self.warmup_report: list[tuple[str, float, str]] = []
        # A progressive start warms its ready programs only; the others arrive compiled
        # (warm_arrivals runs them).
        for programs, name, run in self._warm_entries():
            built, hits, t = compile_counter.count, compile_counter.cache_hits, time.perf_counter()
            run()
            jax.block_until_ready(self.slots)
            how = "compiled" if compile_counter.count > built else "cache" if compile_counter.cache_hits > hits else "ready"
            self.warmup_report.append((name, time.perf_counter() - t, how))
            self._unwarmed -= programs
        return compile_counter.count - before

    def _warm_entries(self):
        """warmup's entries whose programs are all ready: (the programs an entry runs, its
        name, a function that runs it once on scratch rows: no slot changes, no page is
        written)."""
        ready = self._is_ready
        for b, t, *fresh in self.manifest()["prefill"]:
            key = ("prefill", (b, t, *fresh))
            if ready(*key):
                yield {key}, f"prefill {b}x{t}" + (" fresh" if fresh else ""), functools.partial(
                    self._warm_prefill, bool(fresh), b, t)
        for rows, mode in self.manifest()["decode"]:
            programs = {("decode", (rows, mode)), ("snapshot", (rows,)), ("set_table", ())}
            if all(ready(*p) for p in programs):
                yield programs, f"decode {rows} {mode}", functools.partial(self._warm_decode, rows, mode)
        for rows, b, t, *fresh in self.manifest()["mixed"]:
            programs = {("mixed", (rows, b, t, *fresh)), ("mixed_sample", (rows, "filter")), ("snapshot", (rows,)),
                        ("set_table", ())}
            if all(ready(*p) for p in programs):
                yield programs, f"mixed {rows}+{b}x{t}" + (" fresh" if fresh else ""), functools.partial(
                    self._warm_mixed, bool(fresh), rows, b, t)
        samples = [k for k in self._mixed_sample if ready("mixed_sample", k)]
        if samples:
            yield {("mixed_sample", k) for k in samples}, "mixed sampling", functools.partial(
                self._warm_mixed_samples, samples)
        yield ({("set_table", ()), ("release", ()), ("seed_prompt_mask", ())}, "set_table, release, seed_prompt_mask",
               self._warm_slot_programs)

    def _warm_prefill(self, fresh: bool, b: int, t: int) -> None:
        ecfg = self.ecfg  # b rows per data-parallel group
        self._prefill_call(fresh, **scratch_prefill(b * self.data_groups, t, ecfg.max_pages_per_seq,
                                                    ecfg.max_num_seqs))

    def _warm_decode(self, rows: int, mode: str) -> None:
        self.decode(np.zeros((rows, self.ecfg.max_pages_per_seq), np.int32), mode=mode)

    def _warm_mixed(self, fresh: bool, rows: int, b: int, t: int) -> None:
        ecfg = self.ecfg
        self._mixed_call(fresh, np.zeros((rows, ecfg.max_pages_per_seq), np.int32),
                         **scratch_prefill(b, t, ecfg.max_pages_per_seq, ecfg.max_num_seqs))

    def _warm_mixed_samples(self, keys) -> None:
        for rows, mode in keys:  # idle rows: changes nothing
            self.slots, self.io = self._mixed_sample[(rows, mode)](self.slots, self.io, *self._idle_mixed_rows(rows))

    def _warm_slot_programs(self) -> None:
        self.io = self._set_table(self.io, self._table_sent)  # compiled; changes nothing
        self.release(self.ecfg.max_num_seqs)  # out of range: changes nothing
        self.seed_prompt_mask(self.ecfg.max_num_seqs, [])  # out of range: changes nothing

    # --- ahead-of-time executables (runtime/aot.py) ------------------------------------

    def programs(self) -> list[tuple[str, tuple, Callable, tuple]]:
        """Every program the engine runs: (kind, shape, jitted step, the arguments it is
        called with, as warmup passes them). The manifest's entries, the slot release,
        the page-table write and the output copy per decode bucket."""
        ecfg = self.ecfg
        out = []
        for b, t, *fresh in self.manifest()["prefill"]:
            packed = pack_prefill(**scratch_prefill(b * self.data_groups, t, ecfg.max_pages_per_seq, ecfg.max_num_seqs))
            out.append(("prefill", (b, t, *fresh), self._jit("prefill", bool(fresh)),
                        (self.param_leaves, self.cache, self.slots, *packed)))
        for rows, mode in self.manifest()["decode"]:
            out.append(("decode", (rows, mode), self._jit("decode", (rows, mode)),
                        (self.param_leaves, self.cache, self.slots, self.io)))
        for rows, b, t, *fresh in self.manifest()["mixed"]:
            packed = pack_prefill(**scratch_prefill(b, t, ecfg.max_pages_per_seq, ecfg.max_num_seqs))
            out.append(("mixed", (rows, b, t, *fresh), self._jit("mixed", (rows, bool(fresh))),
                        (self.param_leaves, self.cache, self.slots, self.io, *packed)))
        for rows, mode in self._mixed_sample:
            out.append(("mixed_sample", (rows, mode), self._jit("mixed_sample", (rows, mode)),
                        (self.slots, self.io, *self._idle_mixed_rows(rows))))
        out.append(("release", (), self._jit("release"), (self.slots, np.int32(ecfg.max_num_seqs))))
        out.append(("seed_prompt_mask", (), self._jit("seed_prompt_mask"),
                    (self.slots, np.int32(ecfg.max_num_seqs), self._mask_tokens([]))))
        out.append(("set_table", (), self._jit("set_table"), (self.io, self._table_sent)))
        for rows, bufs in self._readback.items():
            out.append(("snapshot", (rows,), self._jit("snapshot", rows), (self.io, bufs[0])))
        return out

    def _idle_mixed_rows(self, rows: int) -> tuple[jax.Array, jax.Array]:
        """A `_mixed_sample` call's logits and cache lengths for `rows` rows idle in the step,
        placed as a mixed call returns them (the same program then serves both)."""
        return tuple(jax.device_put(x, self._replicated) for x in (
            np.zeros((rows, self.cfg.vocab_size), np.float32), np.zeros(rows, np.int32)))

    def _jit(self, kind: str, key=None):
        """The jitted function of a program (under any executables installed over it)."""
        fn = {"prefill": lambda: self._prefill[key], "decode": lambda: self._decode[key],
              "mixed": lambda: self._mixed[key], "mixed_sample": lambda: self._mixed_sample[key],
              "release": lambda: self._release, "seed_prompt_mask": lambda: self._seed_prompt_mask,
              "set_table": lambda: self._set_table,
              "snapshot": lambda: self._snapshot}[kind]()
        return getattr(fn, "jitted", fn)

    def use_executables(self, executables: dict[tuple[str, tuple], Callable]) -> int:
        """Runs the given compiled programs ({(kind, shape): compiled}, as `programs()`
        names them) in place of compiling them. Returns how many of the engine's programs
        they cover; the others compile as usual."""
        by_program = {}
        for kind, shape, _, args in self.programs():
            if (kind, shape) in executables:
                by_program[(kind, shape)] = (executables[(kind, shape)], args)
        prefill_by_shape: dict[bool, dict] = {f: {} for f in self._prefill}
        mixed_by_shape: dict[tuple[int, bool], dict] = {k: {} for k in self._mixed}
        snapshot_by_rows = {}
        for (kind, shape), (compiled, args) in by_program.items():
            if kind == "prefill":
                prefill_by_shape["fresh" in shape][args[3].shape] = compiled
            elif kind == "decode":
                self._decode[shape] = _Installed(self._jit("decode", shape), {(): compiled}, lambda a: ())
            elif kind == "mixed":
                mixed_by_shape[(shape[0], "fresh" in shape)][args[4].shape] = compiled
            elif kind == "mixed_sample":
                self._mixed_sample[shape] = _Installed(self._jit("mixed_sample", shape), {(): compiled}, lambda a: ())
            elif kind == "release":
                self._release = _Installed(self._jit("release"), {(): compiled}, lambda a: ())
            elif kind == "seed_prompt_mask":
                self._seed_prompt_mask = _Installed(self._jit("seed_prompt_mask"), {(): compiled}, lambda a: ())
            elif kind == "set_table":
                self._set_table = _Installed(self._jit("set_table"), {(): compiled}, lambda a: ())
            elif kind == "snapshot":
                snapshot_by_rows[shape[0]] = compiled
        # A second call (the programs a partial cache hit lacked, compiled) adds to the
        # tables the first installed: replacing them dropped the loaded executables, and
        # warm-up then compiled those programs again (H200, 15 of 51, 193 s).
        for fresh, table in prefill_by_shape.items():
            if table:
                self._prefill[fresh] = self._merged(self._prefill[fresh], table, lambda a: a[3].shape)
        for key, table in mixed_by_shape.items():
            if table:
                self._mixed[key] = self._merged(self._mixed[key], table, lambda a: a[4].shape)
        if snapshot_by_rows:
            self._snapshot = self._merged(self._snapshot, snapshot_by_rows, lambda a: a[1]["tokens"].shape[1])
        return len(by_program)

    @staticmethod
    def _merged(current, table: dict, pick: Callable) -> _Installed:
        """A step served by `table`'s executables, those `current` already had, else jit."""
        if isinstance(current, _Installed):
            return _Installed(current.jitted, {**current.table, **table}, pick)
        return _Installed(current, table, pick)

    def warmup_summary(self) -> str:
        """warmup_report in words: counts by how each entry was built, total and slowest."""
        report = getattr(self, "warmup_report", [])
        if not report:
            return "no warm-up"
        hows = collections.Counter(how for _, _, how in report)
        slow = max(report, key=lambda r: r[1])
        counts = ", ".join(f"{n} {how}" for how, n in sorted(hows.items()))
        return f"{len(report)} programs: {counts}; slowest {slow[0]} {slow[1]:.1f} s"

    # --- steps -----------------------------------------------------------------------

    def prefill(self, *, starts, **kwargs) -> dict[str, jax.Array]:
        """Runs one prefill call; rows whose slot id is in range fill that decode slot."""
        b, t = np.shape(kwargs["tokens"])
        fresh = self._prefill_variant(b // self.data_groups, t, not np.any(np.asarray(starts)))
        if fresh is None:
            raise ValueError(f"no ready prefill program for {b} x {t}")
        return self._prefill_call(fresh, starts=starts, **kwargs)

    def _prefill_call(
        self, fresh: bool, *, tokens, starts, lens, page_table, slot_ids, is_last, sampling: dict, stop_ids, remaining
    ) -> dict[str, jax.Array]:
        # Host arrays go to the step as they are: jit moves them (uncommitted, like the
        # abstract arguments runtime/aot.py lowers with) in its C++ dispatch, where a
        # jnp.asarray per argument cost ~25 us each (CPU, 2026-11-29). Two arrays in all.
        ints, floats = pack_prefill(tokens=tokens, starts=starts, lens=lens, page_table=page_table, slot_ids=slot_ids,
                                    is_last=is_last, sampling=sampling, stop_ids=stop_ids, remaining=remaining)
        self.cache, self.slots, out = self._prefill[fresh](self.param_leaves, self.cache, self.slots, ints, floats)
        return out

    def decode(self, page_table, mode: str = "filter") -> dict[str, jax.Array]:
        """`decode_steps_per_call` steps for slots [0, b), b = the rows of `page_table`
        [b, MP] (a bucket of `ecfg.decode_buckets`; slots past b must be idle). Idle slots
        compute but change nothing. Outputs are [steps, b, ...]; `valid` marks the tokens
        that count. They stay readable until the decode call after next, whose copy reuses
        their buffers: a caller may read them after dispatching the next call. `mode`
        (runtime.sampling.SAMPLING_MODES) must cover every active slot's sampling
        (`sampling_mode` of their parameters); "filter" covers any."""
        rows = len(page_table)
        step = self._decode.get((rows, mode))
        if step is None:
            buckets = sorted({b for b, _ in self._decode})
            if rows not in buckets:
                raise ValueError(f"decode over {rows} slots; the buckets are {', '.join(map(str, buckets))}")
            raise ValueError(f"decode mode {mode!r}; choose from {', '.join(sorted({m for _, m in self._decode}))}")
        self._send_table(page_table)
        self.cache, self.slots, self.io = step(self.param_leaves, self.cache, self.slots, self.io)
        return self._decode_outputs(rows)

    def mixes(self, rows: int, num_prompts: int, chunk_len: int, fresh: bool, mode: str = "filter") -> bool:
        """Whether a mixed call (`mixed`) is ready for a decode step over `rows` slots in
        sampling `mode` beside a prefill call of that shape (`prefill_shape`'s buckets)."""
        return (self._mixed_variant(rows, num_prompts, chunk_len, fresh) is not None
                and self._is_ready("mixed_sample", (rows, mode)) and self._is_ready("snapshot", (rows,)))

    def _mixed_variant(self, rows: int, b: int, t: int, fresh: bool) -> bool | None:
        """The mixed program ("fresh" key) for that shape: as `_prefill_variant`."""
        shape = (rows, b, t)
        if fresh and any(k[1] for k in self._mixed) and (*shape, "fresh") in self._mixed_shapes and self._is_ready(
                "mixed", (*shape, "fresh")):
            return True
        if (rows, False) in self._mixed and shape in self._mixed_shapes and self._is_ready("mixed", shape):
            return False
        return None

    def mixed(self, decode_table, *, starts, mode: str = "filter",
              **prefill) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """A prefill call (`prefill`'s arguments) and one decode step over slots [0, b)
        (decode_table [b, MP], as `decode` takes it; its rows sampled in `mode`, as
        `decode`'s) in one forward pass (runtime.engine._mixed); `mixes` says which shapes
        are compiled. Returns (prefill outputs, decode outputs), each as its own call
        returns them. A prompt this call completes decodes from the next step on."""
        b, t = np.shape(prefill["tokens"])
        fresh = self._mixed_variant(len(decode_table), b, t, not np.any(np.asarray(starts)))
        if fresh is None:
            raise ValueError(f"no ready mixed call over {len(decode_table)} slots beside {b} x {t}")
        return self._mixed_call(fresh, decode_table, mode=mode, starts=starts, **prefill)

    def _mixed_call(self, fresh: bool, decode_table, *, mode: str = "filter",
                    **prefill) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        rows = len(decode_table)
        step = self._mixed.get((rows, fresh))
        if step is None:
            raise ValueError(f"no mixed call over {rows} slots{' (fresh)' if fresh else ''}; "
                             f"compiled: {sorted(self._mixed_shapes)}")
        sample = self._mixed_sample.get((rows, mode))
        if sample is None:
            raise ValueError(f"no sampling of a mixed call's {rows} decode rows in mode {mode!r}; "
                             f"compiled: {sorted(self._mixed_sample)}")
        ints, floats = pack_prefill(**prefill)
        self._send_table(decode_table)
        self.cache, self.slots, out, decode_rows = step(self.param_leaves, self.cache, self.slots, self.io, ints,
                                                        floats)
        self.slots, self.io = sample(self.slots, self.io, decode_rows["logits"], decode_rows["kv_lens"])
        return out, self._decode_outputs(rows)

    def _send_table(self, page_table) -> None:
        """The decode page table [rows, MP] into io (rewritten only when it changed)."""
        rows = len(page_table)
        table = np.asarray(page_table, np.int32)
        if not np.array_equal(table, self._table_sent[:rows]):
            # Rows past the bucket belong to idle slots: they keep their old pages, unread.
            self._table_sent = self._table_sent.copy()
            self._table_sent[:rows] = table
            self.io = self._set_table(self.io, self._table_sent)

    def _decode_outputs(self, rows: int) -> dict[str, jax.Array]:
        # The outputs the host reads are copied into buffers that alternate between calls
        # (io.out itself is overwritten by the next call, which may run before the host
        # reads this one's). A fresh array per call was a device allocation between
        # decode calls, and on a GPU it moved the next call's temporary buffer: the
        # step's CUDA graph then had to be updated on every call (runtime/BENCHMARKS.md).
        turn = self._readback[rows]
        out = turn[self._readback_turn] = self._snapshot(self.io, turn[self._readback_turn])
        self._readback_turn ^= 1
        return out

    def release(self, slot: int) -> None:
        """Marks a slot idle (its pages are freed by the scheduler)."""
        self.slots = self._release(self.slots, np.int32(slot))

    def seed_prompt_mask(self, slot: int, tokens) -> None:
        """Sets the slot's prompt mask (the tokens a repetition penalty counts as seen) to
        `tokens`: a prompt's prefix found in the prefix cache, which no prefill call of this
        admission runs. Its chunks then add their own tokens (they start after 0)."""
        self.slots = self._seed_prompt_mask(self.slots, np.int32(slot), self._mask_tokens(tokens))

    def _mask_tokens(self, tokens) -> np.ndarray:
        # One shape for every prefix (one program): a sequence's longest, padded with ids
        # the mask drops.
        out = np.full(self.ecfg.max_pages_per_seq * self.ecfg.page_size, self.cfg.vocab_size, np.int32)
        out[: len(tokens)] = tokens
        return out

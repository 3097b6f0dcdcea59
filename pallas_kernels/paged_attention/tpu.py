"""Paged attention for decode (T == 1) as a Pallas Mosaic TPU kernel.

Layout (the same as reference.py; every reshape below is free, no HBM copy):
  q            [B, 1, N, H]  -> [B, K, G, H]    query heads grouped by kv head
  k/v_pages    [P, S, K, H]                     read as they are ([P, S, H] for K == 1)
  page_table   [B, MP], q_positions [B, 1] -> [B], kv_lens [B]: scalar prefetch (SMEM)
  out          [B, K, G, H]  -> [B, 1, N, H]

Grid (B, cdiv(MP, pages_per_step)). Each step receives `pages_per_step` pages of one
sequence, every one a (S, K, H) VMEM block picked through the prefetched page table:
the page's last two dims are whole, so the block is legal for any S, K, H, and kv head
kh is the (S, H) slice [:, kh, :] of it in VMEM. The pages are not reshaped: on a TPU
[P, S, K, H] -> [P, S, K*H] changes the tiled layout, and XLA copied every layer's whole
cache for it on every decode call (libtpu compile, v5e, 2026-11-29: 1.9 GB of temporaries
for a 3.8 GB cache; now 1.9 MB). All G query heads of one kv head form one (G, H) x
(H, S) matmul; G is never padded in HBM.

Quantized pages (QuantizedPages, pallas_kernels/quantized_kv.py): each page's values
arrive as the same (S, K, H) block in int8 or fp8. The scales are gathered per sequence
before the call, [P, K, S] -> [B, K, slots * S] (slots in table order, padded to whole
steps), and each step reads its (K, pages_per_step * S) block: 256 lanes of float32 per
kv head. Reading them per page from [P, K, S] instead would make the kernel ask for
that array in a row-major tiled layout, which XLA does not keep it in (it picks a
compact layout for the scatter that writes it): libtpu (v5e, TP 8, one kv head, S = 16)
copied every layer's scales into a 128-lane-padded layout on every decode call, 1.7 GB
of temporaries for a 14 GB cache. The gather moves 4 bytes per visible token and kv
head (3% of the values' bytes at H = 128). The values are cast to the query's dtype for
the dots (exact), the key scales multiply the scores' columns and the value scales the
probabilities' columns; nothing is dequantized in HBM.

Only pages a query can see are read: for query position p and length L the visible
pages are [max(0, p - W + 1) // S, min(p, L - 1) // S]. The index maps clamp the page
slot into that range, so steps outside it repeat the previous block index (the
pipeline then skips the DMA) and the kernel skips their compute. Pages past a
sequence's length are never fetched, so a freed page holding another request's data
is unreadable. Online softmax (float32 m, l, acc in VMEM scratch) runs across pages;
the output is written once, on the last step. Queries with p >= L are padding and
return zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_kv import QuantizedPages

# Finite "minus infinity": exp(NEG - m) underflows to 0 without producing NaN when a
# whole row is masked (-inf - -inf would).
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def _visible_pages(pos, kv_len, page_size, window):
    """First and last page slot a query at `pos` may see (last >= first >= 0). Operands
    are non-negative, so lax.div (truncating) is floor division without `//`'s sign op."""
    last = jax.lax.div(jnp.maximum(jnp.minimum(pos, kv_len - 1), 0), page_size)
    if window is None:
        first = jnp.int32(0)
    else:
        first = jax.lax.div(jnp.maximum(pos - window + 1, 0), page_size)
    return jnp.minimum(first, last), last


def _kernel(
    # scalar prefetch:
    page_table_ref,  # [B, MP] int32, SMEM
    q_pos_ref,       # [B] int32, SMEM
    kv_lens_ref,     # [B] int32, SMEM
    # inputs:
    q_ref,           # (K, G, H) block of [B, K, G, H]
    *refs,           # pages_per_step k blocks (S, K, H), then pages_per_step v blocks (S, K, H);
                     # quantized: then the step's k scales and v scales, (K, pages_per_step * S) each
    # outputs: o_ref (K, G, H) block of [B, K, G, H]
    # scratch: m_ref, l_ref (K, G, 1) f32; acc_ref (K, G, H) f32
    scale, window, softcap, page_size, pages_per_step, num_kv_heads, head_dim, quantized, whole_scales,
):
    del page_table_ref
    n = pages_per_step
    k_refs, v_refs = refs[:n], refs[n:2 * n]
    ks_ref, vs_ref = refs[2 * n:2 * n + 2] if quantized else (None, None)
    o_ref, m_ref, l_ref, acc_ref = refs[2 * n + (2 if quantized else 0):]
    b, j = pl.program_id(0), pl.program_id(1)
    pos, kv_len = q_pos_ref[b], kv_lens_ref[b]
    first, last = _visible_pages(pos, kv_len, page_size, window)
    q_valid = pos < kv_len

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    G = q_ref.shape[1]
    for i in range(pages_per_step):
        slot = j * pages_per_step + i

        @pl.when(q_valid & (slot >= first) & (slot <= last))
        def _page(i=i, slot=slot):
            kv_pos = slot * page_size + jax.lax.broadcasted_iota(jnp.int32, (G, page_size), 1)
            mask = (kv_pos <= pos) & (kv_pos < kv_len)
            if window is not None:
                mask &= kv_pos > pos - window
            if quantized:
                # The page's values in q's dtype (exact), all kv heads at once: Mosaic
                # (libtpu for v6e, 2026-11-30) cannot convert a one-head slice of packed
                # int8 sublanes; the slices below are then of q's dtype, as unquantized.
                k_page = k_refs[i][...].astype(q_ref.dtype)
                v_page = v_refs[i][...].astype(q_ref.dtype)
            else:
                k_page, v_page = k_refs[i], v_refs[i]
            for kh in range(num_kv_heads):
                q = q_ref[kh]                      # (G, H)
                if len(k_refs[i].shape) == 2:      # one kv head: (S, H) blocks
                    k, v = k_page[...], v_page[...]
                else:
                    k = k_page[:, kh, :]           # (S, H)
                    v = v_page[:, kh, :]           # (S, H)
                if quantized:  # scales (1, S) of this page's keys / values
                    at = (slot if whole_scales else i) * page_size
                    k_scale = ks_ref[pl.ds(kh, 1), pl.ds(at, page_size)]
                    v_scale = vs_ref[pl.ds(kh, 1), pl.ds(at, page_size)]
                s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) * scale  # (G, S)
                if quantized:
                    s = s * k_scale
                if softcap is not None:
                    s = jnp.tanh(s / softcap) * softcap
                s = jnp.where(mask, s, _NEG)
                m_prev = m_ref[kh]                 # (G, 1)
                m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                alpha = jnp.exp(m_prev - m_new)
                p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
                l_ref[kh] = alpha * l_ref[kh] + jnp.sum(p, axis=1, keepdims=True)
                if quantized:  # masked rows' scales may be anything: their p stays 0
                    p = jnp.where(mask, p * v_scale, 0.0)
                pv = jnp.dot(p.astype(v.dtype), v,
                             preferred_element_type=jnp.float32)  # (G, H)
                acc_ref[kh] = alpha * acc_ref[kh] + pv
                m_ref[kh] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        l = l_ref[...]
        o = acc_ref[...] / jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = jnp.where(q_valid, o, 0.0).astype(o_ref.dtype)


def _paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *, scale, window, softcap,
                     pages_per_step=None):
    B, T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    MP = page_table.shape[1]
    quantized = isinstance(k_pages, QuantizedPages)
    assert T == 1, f"the TPU paged-attention kernel serves decode (T == 1), got T={T}; use impl='reference' for prefill"
    assert N % K == 0, f"num_heads={N} is not a multiple of num_kv_heads={K}"
    G = N // K
    if pages_per_step is None:
        # ~256 tokens per step: big enough to amortise per-step overhead, small in VMEM.
        pages_per_step = max(1, min(MP, 256 // S))
    steps = pl.cdiv(MP, pages_per_step)

    def page_map(i):
        def index_map(b, j, pt, pos, lens):
            first, last = _visible_pages(pos[b], lens[b], S, window)
            slot = jnp.clip(j * pages_per_step + i, first, jnp.minimum(last, MP - 1))
            return (pt[b, slot], 0, 0, 0)[:len(page_block) + 1]
        return index_map


    # One kv head (a device's share under tensor parallelism): the pages as [P, S, H], a
    # free reshape that XLA lays out without the size-1 dim; as [P, S, 1, H] blocks the
    # kernel would ask for a tiling that pads it, and XLA relaid the whole cache for it
    # (libtpu, v5e TP 8: 29.5 GB of temporaries).
    page_block = (S, H) if K == 1 else (S, K, H)
    kv_specs = [pl.BlockSpec((None, *page_block), page_map(i)) for i in range(pages_per_step)]
    values = (k_pages.values, v_pages.values) if quantized else (k_pages, v_pages)
    whole_scales = quantized and steps > 1 and (pages_per_step * S) % 128 != 0
    scale_specs, scales = [], []
    if quantized:  # [P, K, S] -> [B, K, slots * S], slots padded to whole steps (page 0 there: masked)
        slots = steps * pages_per_step
        table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, slots - MP)))
        table = jnp.clip(table, 0, P - 1)  # unused slots may hold anything; never read unmasked

        def gather(s):
            return s[table].transpose(0, 2, 1, 3).reshape(B, K, slots * S)

        scales = [gather(k_pages.scales), gather(v_pages.scales)]
        # A step's lanes must be a multiple of 128 (the default's 256 tokens are); else
        # each sequence's whole row of scales is one block.
        lanes = slots * S if whole_scales else pages_per_step * S
        scale_specs = [pl.BlockSpec((None, K, lanes), lambda b, j, pt, pos, lens: (b, 0, 0 if whole_scales else j))] * 2
    qo_spec = pl.BlockSpec((None, K, G, H), lambda b, j, pt, pos, lens: (b, 0, 0, 0))
    kernel = functools.partial(
        _kernel, scale=scale, window=window, softcap=softcap, page_size=S,
        pages_per_step=pages_per_step, num_kv_heads=K, head_dim=H, quantized=quantized, whole_scales=whole_scales)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, steps),
            in_specs=[qo_spec] + kv_specs + kv_specs + scale_specs,
            out_specs=qo_spec,
            scratch_shapes=[
                pltpu.VMEM((K, G, 1), jnp.float32),  # m: running max
                pltpu.VMEM((K, G, 1), jnp.float32),  # l: running denominator
                pltpu.VMEM((K, G, H), jnp.float32),  # acc: unnormalised output
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((B, K, G, H), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        name="paged_attention_decode",
    )(
        page_table.astype(jnp.int32),
        q_positions[:, 0].astype(jnp.int32),
        kv_lens.astype(jnp.int32),
        q.reshape(B, K, G, H),  # [B, 1, K*G, H] -> [B, K, G, H]
        *([values[0].reshape(P, *page_block)] * pages_per_step),
        *([values[1].reshape(P, *page_block)] * pages_per_step),
        *scales,
    )
    return out.reshape(B, T, N, H)  # [B, K, G, H] -> [B, 1, K*G, H]


# jit: every layer's call with the same shapes and options lowers to one shared
# function (see pallas_kernels/dispatch.py), not one kernel module per layer.
@functools.partial(jax.jit, static_argnames=('scale', 'window', 'softcap'))
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Decode attention over pages; q [B, 1, N, H], k/v_pages [P, S, K, H],
    page_table [B, MP], q_positions [B, 1], kv_lens [B] -> [B, 1, N, H] in q.dtype.
    Semantics as reference.paged_attention; scores, softmax and accumulation float32."""
    return _paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens,
                            scale=scale, window=window, softcap=softcap)

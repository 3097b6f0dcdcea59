"""Paged attention (decode). `paged_attention(..., impl=...)` picks the implementation;
see reference.py for the layout and semantics every implementation follows."""

from __future__ import annotations

from pallas_kernels import dispatch


def paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_lens, *, scale, window=None, softcap=None,
                    impl: str = "auto"):
    """q [B, T, N, H] over pages [P, S, K, H]; see reference.py. Kernels serve T == 1
    (decode); other T use the reference."""
    impl = dispatch.resolve(impl)
    if q.shape[1] != 1:
        impl = "reference"
    fn = dispatch.load("paged_attention", impl)
    return fn(q, k_pages, v_pages, page_table, q_positions, kv_lens, scale=scale, window=window, softcap=softcap)

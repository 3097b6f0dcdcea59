"""Causal flash attention over a prefill chunk. `flash_attention(..., impl=...)` picks
the implementation; see reference.py for the semantics every implementation follows."""

from __future__ import annotations

from pallas_kernels import dispatch


def flash_attention(q, k, v, lengths, *, scale, window=None, softcap=None, impl: str = "auto"):
    """q [B, T, N, H], k/v [B, T, K, H], lengths [B]; see reference.py."""
    fn = dispatch.load("flash_attention", dispatch.resolve(impl))
    return fn(q, k, v, lengths, scale=scale, window=window, softcap=softcap)

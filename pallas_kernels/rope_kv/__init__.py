"""Rotary embedding of a decode step's q and k fused with the paged cache write of k and
v (reference.py: layout and semantics; gpu.py: the Pallas Triton kernel)."""

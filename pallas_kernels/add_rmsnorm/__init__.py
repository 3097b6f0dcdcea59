"""The residual add fused with the RMSNorm that follows it (reference.py: semantics;
gpu.py: the Pallas Triton kernel)."""

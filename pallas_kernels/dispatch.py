"""Choosing an attention implementation: "reference" (pure jnp, runs everywhere),
"gpu" / "tpu" (Pallas kernels), or "auto" (the kernel of the default backend, the
reference on CPU). A kernel module exposes the same function as its reference.py."""

from __future__ import annotations

import importlib

import jax

IMPLS = ("auto", "reference", "gpu", "tpu")


def resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    return platform if platform in ("gpu", "tpu") else "reference"


def load(kernel: str, impl: str):
    """The `kernel` function ("paged_attention" or "flash_attention") of an implementation."""
    module = importlib.import_module(f"pallas_kernels.{kernel}.{resolve(impl) if impl != 'reference' else 'reference'}")
    return getattr(module, kernel)

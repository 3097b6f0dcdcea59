"""Choosing an attention implementation.

"reference" is pure jnp and runs everywhere; "gpu" / "tpu" are the Pallas kernels;
"auto" is the kernel of the default backend and, on CPU, the reference. Asking for
"gpu" off a GPU runs the kernel in Pallas' interpreter (how CPU tests exercise it).
A kernel module exposes the same function as its reference.py.
"""

from __future__ import annotations

import functools
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


def engine_kernel_impl() -> str:
    """What the engine's --attention=pallas runs: the backend's kernel; on CPU the GPU
    kernel in interpret mode, so the same code path is tested without an accelerator."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def load(kernel: str, impl: str):
    """The `kernel` function ("paged_attention" / "flash_attention") of an implementation."""
    impl = resolve(impl)
    fn = getattr(importlib.import_module(f"pallas_kernels.{kernel}.{impl}"), kernel)
    if impl == "gpu" and jax.default_backend() != "gpu":
        return functools.partial(fn, interpret=True)
    return fn

"""Choosing an attention implementation.

"reference" is pure jnp and runs everywhere; "gpu" / "tpu" are the Pallas kernels;
"auto" is the kernel of the default backend and, on CPU, the reference. Asking for
"gpu" off a GPU runs the kernel in Pallas' interpreter (how CPU tests exercise it).
A kernel module exposes the same function as its reference.py.

"gpu" for flash_attention is two kernels, chosen by measurement
(pallas_kernels/BENCHMARKS.md): on Hopper (sm90) the Mosaic GPU kernel
(flash_attention/gpu_mosaic.py, 1.07-1.12x cuDNN on an H100, where the Triton kernel
reaches 0.62-0.69x), which itself hands what it does not support (float32, other head
sizes) to the Triton kernel; on other GPUs, and interpreted on CPU, the Triton kernel
(flash_attention/gpu.py). Paged decode likewise: on Hopper the Mosaic GPU kernel
(paged_attention/gpu_mosaic.py: whole pages of all kv heads through a TMA ring, 4.15
TB/s of K/V in device time at B=32 ctx 4096 on an H200, 101% of the copy rate, where
the Triton kernel reads 2.5 TB/s), which hands float32, shapes it does not support and
batch-1 calls over tables of at most 2048 tokens (latency-bound: the Triton kernel took
7.9-11.3 us per layer there against 10.9-12.7, gpu_mosaic._LATENCY_BOUND_TOKENS) to the
Triton kernel (paged_attention/gpu.py), which also serves other GPUs and CPU tests.

Every kernel module's public function is a jax.jit with static options. A model calls
attention once per layer with the same shapes; under jit JAX lowers the kernel once
and the layers call that one function, where unwrapped each call would embed its own
copy of the kernel (Mosaic GPU: ~0.3 s of lowering and 0.5 MB of module per call at
head_dim 128, measured by exporting for CUDA on CPU; 32 layers times every prefill
shape made an 8B engine's compile minutes longer on the H100).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib

import jax

IMPLS = ("auto", "reference", "gpu", "tpu")

_target = contextvars.ContextVar("xlserve_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace for `platform` ("tpu", "gpu") instead of the default backend: compiling
    ahead of time for devices this process does not run on (runtime/aot.py)."""
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)


def platform() -> str:
    """The platform programs are traced for: `target_platform`'s, else the default backend."""
    return _target.get() or jax.default_backend()


def resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    target = platform()
    return target if target in ("gpu", "tpu") else "reference"


def engine_kernel_impl() -> str:
    """What the engine's --attention=pallas runs: the target platform's kernel; on CPU the GPU
    kernel in interpret mode, so the same code path is tested without an accelerator."""
    return "tpu" if platform() == "tpu" else "gpu"


def on_hopper() -> bool:
    """Whether the default device is an sm90 GPU (what Mosaic GPU's wgmma kernels need)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).split(".")[0] == "9"


def module_name(kernel: str, impl: str) -> str:
    """The module under pallas_kernels.<kernel> that runs `impl` here."""
    impl = resolve(impl)
    if impl == "gpu" and on_hopper():
        return "gpu_mosaic"
    return impl


def load(kernel: str, impl: str):
    """The `kernel` function ("paged_attention" / "flash_attention") of an implementation."""
    impl = resolve(impl)
    module = importlib.import_module(f"pallas_kernels.{kernel}.{module_name(kernel, impl)}")
    fn = getattr(module, kernel)
    if impl == "gpu" and platform() != "gpu":
        return functools.partial(fn, interpret=True)
    return fn

import os

# No code path may reach a model hub; make transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import glob
import sys

import pytest


def _cpu_compiles_at_o0() -> None:
    """XLA:CPU compiles this process's programs at LLVM -O0 (`--xla_backend_optimization_level=0`).

    The suite compiles thousands of small programs and runs them on tiny shapes, where the
    compile is most of a test's time: a tiny-llama engine's warm-up took 22.4-23.3 s at -O0
    against 36.2-38.6 s at XLA's default -O3 (this 2-core machine, 2026-12-01), and its
    steps ran as fast. Results stay IEEE float32/bfloat16 arithmetic; they may differ from
    -O3's in the last bit (measured: a tiny model's logprobs by <= 5e-7), so the tests'
    tolerances hold either way. Only this process: XLA reads XLA_FLAGS once, at its first
    compile (forced here), and the variable is put back, so the servers, CLIs, TPU compiles
    and quality scoring that tests start as subprocesses compile as users' processes do.
    Not on machines with a GPU or TPU (their kernel tests measure what users run)."""
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu") or glob.glob("/dev/nvidia[0-9]*") or glob.glob(
            "/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    saved = os.environ.get("XLA_FLAGS")
    if saved and "xla_backend_optimization_level" in saved:
        return
    os.environ["XLA_FLAGS"] = f"{saved or ''} --xla_backend_optimization_level=0".strip()
    try:
        import jax
        import jax.numpy as jnp

        jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready()
    finally:
        if saved is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = saved


_cpu_compiles_at_o0()


# XLA:CPU maps ~5 memory regions per live executable, and the kernel allows a process
# 65530 (vm.max_map_count). At the limit, XLA's next compile or serialization segfaults:
# the full suite died so at ~85% (in tests/runtime/test_progressive_start.py, 3 times on
# 809c3c2 and 8638f28, here and in CI), and a script compiling executables under a lowered
# limit segfaulted in the same place (backend_compile_and_load). The jit caches of module-
# level functions keep every shape a test ever compiled (tests/runtime alone reached 40k
# regions by test_fuzz, 34k of them left by test_engine), so executables are released at
# the end of each test module.


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """After each module: JAX's caches are cleared and unreachable engines collected,
    releasing every executable nothing else holds (no JAX object outlives its module:
    tests/runtime's warmed engine is per module)."""
    yield
    import gc

    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache_across_tests():
    """JAX's persistent compilation cache does not outlive the test that turned it on.
    In-process code turns it on for the rest of a process (runtime.startup.load_engine;
    a test's own cache directory: JAX keeps the first cache it opens), so every later test
    read and wrote executables that earlier tests compiled. Tests of the cache run their
    own processes or set their own directory; the others compile as a fresh process would."""
    yield
    jax = sys.modules.get("jax")
    if jax is None:
        return
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
    compilation_cache.reset_cache()

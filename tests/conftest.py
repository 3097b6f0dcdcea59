import os

# No code path may reach a model hub; make transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

import pytest


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

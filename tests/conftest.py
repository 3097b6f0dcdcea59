import os

# No code path may reach a model hub; make transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache_across_tests():
    """JAX's persistent compilation cache does not outlive the test that turned it on.
    In-process code turns it on for the rest of a process (runtime.startup.load_engine,
    a test's own cache directory), so every later test read and wrote executables that
    earlier tests had compiled. In the full suite one of those writes crashed the pytest
    process: a segfault in XLA:CPU's executable serialization (jaxlib 0.10.2,
    jax/_src/compilation_cache.py put_executable_and_time) at ~85%, twice on 809c3c2 (here
    and in CI), while the same tests pass in smaller runs. Tests that check the cache run
    their own processes or turn it on themselves; the others compile as a fresh process would."""
    yield
    jax = sys.modules.get("jax")
    if jax is None:
        return
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
    compilation_cache.reset_cache()

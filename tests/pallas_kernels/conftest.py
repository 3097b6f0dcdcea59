"""Fixtures of the Pallas kernel tests."""

from __future__ import annotations

import jax
import pytest

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(scope="module")
def reuse_thread_programs():
    """Speeds up the Mosaic GPU interpreter (jax 0.10): its thread_map lowers and
    compiles the kernel's per-thread program anew for every grid point and thread.
    Here each thread index keeps one jitted program (same jaxpr, same argument types:
    only the values differ), so it compiles once per kernel call. One program per
    thread index, not one shared: the threads of a grid point run concurrently and
    block on each other's barriers inside host callbacks."""
    if ON_GPU:
        yield
        return
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:  # another jax: run unpatched (slower)
        yield
        return
    original = getattr(thread_map, "_run_jaxpr", None)
    if original is None:
        yield
        return
    programs = {}

    def run_jaxpr(jaxpr, consts, *args):
        thread = int(args[0])  # thread_map passes the thread id first
        if thread not in programs:

            def run(jaxpr, consts, *args):
                thread_map.jax_core.eval_jaxpr(jaxpr, consts, *args)

            programs[thread] = jax.jit(run, static_argnums=0)
        programs[thread](jaxpr, consts, *args)

    thread_map._run_jaxpr = run_jaxpr
    try:
        yield
    finally:
        thread_map._run_jaxpr = original

"""Serialized executables (runtime.aot.save_executables / load_executables): an engine
that runs them instead of compiling gives the same tokens and compiles nothing, a key
that differs is refused with the field that differs, and runtime.warmup --aot_dir then
runtime.serve --aot_dir serves from them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from runtime import aot
from runtime.config import EngineConfig
from runtime.engine import Engine, compile_counter
from runtime.orchestrator import Orchestrator, Request
from runtime.presets import preset_config
from runtime.random_weights import random_model
from runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
ECFG = EngineConfig(max_num_seqs=2, max_model_len=64, page_size=8, prefill_lengths=(8, 32), decode_batch_sizes=(1, 2),
                    attention="reference", num_top_logprobs=2)


def _engine(ecfg=ECFG) -> Engine:
    return Engine(random_model(preset_config("tiny-llama"), "float32", None), ecfg, num_pages=16)


def _generate(engine) -> dict[str, list[int]]:
    orc = Orchestrator(engine, None)
    requests = [Request("greedy", [5, 6, 7], SamplingParams(temperature=0.0), max_tokens=9, ignore_eos=True),
                Request("sampled", list(range(1, 20)), SamplingParams(temperature=0.8, top_k=20, seed=3),
                        max_tokens=7, ignore_eos=True)]
    for r in requests:
        orc.add_request(r)
    got = {r.request_id: [] for r in requests}
    while orc.has_work():
        for out in orc.step():
            got[out.request_id] += out.token_ids
    return got


def _key(engine):
    return aot.executable_key(engine.cfg, engine.ecfg, engine.mesh, jax.devices(), "float32", engine.num_pages)


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("aot"))
    engine = _engine()
    compiled = aot.compile_programs(engine.programs(), fresh=True)  # serializable (compile_programs says why)
    steps = [(kind, shape, c) for (kind, shape), c in compiled.items()]
    written, skipped = aot.save_executables(directory, steps, _key(engine))
    assert written == len(steps) and not skipped
    return directory


def test_engine_runs_loaded_executables_and_compiles_nothing(aot_dir):
    want = _generate(_engine())
    engine = _engine()
    executables, why = aot.load_executables(aot_dir, _key(engine))
    assert why is None
    assert engine.use_executables(executables) == len(engine.programs())
    # Kinds: prefill (2 lengths x fresh/continuation), decode (2 buckets x 3 modes),
    # mixed (2 buckets x 2 lengths x fresh/continuation) and their decode-row sampling (2
    # buckets x 3 modes), release, the prompt-mask seed, the page-table write and the
    # output copy per bucket.
    assert {kind for kind, _ in executables} == {"prefill", "decode", "mixed", "mixed_sample", "release",
                                                 "seed_prompt_mask", "set_table", "snapshot"}
    before = compile_counter.count
    engine.warmup()
    assert {how for _, _, how in engine.warmup_report} == {"ready"}
    assert _generate(engine) == want
    assert compile_counter.count == before


def test_a_different_configuration_is_refused_with_the_field(aot_dir):
    engine = _engine(dataclasses.replace(ECFG, max_model_len=128))
    executables, why = aot.load_executables(aot_dir, _key(engine))
    assert executables == {} and why.startswith("built for another configuration (engine.max_model_len: ")
    assert "this server 128" in why and "the executables 64" in why
    key = dict(_key(_engine()), jax="0.0.1")
    assert "jax: this server '0.0.1'" in aot.load_executables(aot_dir, key)[1]
    assert "no readable" in aot.load_executables(aot_dir + "/missing", key)[1]


def test_the_token_budget_leaves_the_key_alone():
    """--max_num_batched_tokens only changes how the host schedules: executables built
    under one budget serve any other."""
    engine = _engine()
    other = dataclasses.replace(ECFG, max_num_batched_tokens=7)
    key = aot.executable_key(engine.cfg, other, engine.mesh, jax.devices(), "float32", engine.num_pages)
    assert key == _key(engine)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_damaged_executable_is_refused(aot_dir, tmp_path, threads):
    import shutil

    key = _key(_engine())
    assert set(aot.load_executables(aot_dir, key, threads)[0]) == {(k, s) for k, s, *_ in _engine().programs()}
    damaged = tmp_path / "damaged"
    shutil.copytree(aot_dir, damaged)
    victim = next(damaged.glob("decode-*.xla"))
    victim.write_bytes(victim.read_bytes()[:100])
    executables, why = aot.load_executables(str(damaged), key, threads)
    assert executables == {} and why.startswith(f"{victim} does not load: ")


def test_warmup_then_serve_from_the_aot_dir(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": str(tmp_path / "cache")}
    flags = ["--checkpoint=preset:tiny-llama", "--max_model_len=128", "--dtype=float32", "--max_num_seqs=2",
             "--prefill_lengths=16,32", "--decode_batch_sizes=2", "--page_size=8"]
    p = subprocess.run([sys.executable, "-m", "runtime.warmup", *flags, f"--aot_dir={tmp_path / 'aot'}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"executables": "' in p.stdout
    from runtime.client import Client
    from tests.runtime.server_harness import serve_subprocess

    for extra, expect in (([f"--aot_dir={tmp_path / 'aot'}"], "programs loaded"),
                          ([f"--aot_dir={tmp_path / 'aot'}", "--max_num_seqs=1", "--decode_batch_sizes=1"],
                           "not used, compiling instead: built for another configuration (engine.")):
        with serve_subprocess(*flags, *extra, "--port=0", env=env, cwd=ROOT, wait_serving=False, timeout=120) as srv:
            with Client(f"localhost:{srv.port}") as client:
                client.wait_until_serving(120)
                out = client.generate_unary(token_ids=[1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True)
                assert len(out.token_ids) == 4
            assert any(expect in line for line in srv.lines), "".join(srv.lines)[-3000:]
            startup = next(line for line in srv.lines if "xlserve: start-up: " in line)
            if "programs loaded" in expect:  # every program came from the directory: warm-up built none
                assert "aot load" in startup and " ready; slowest" in startup and "compiled" not in startup, startup
            else:  # compiled at start-up (on threads: the compile phase), none taken from the directory
                assert "aot load" in startup and "(none)" in startup and "compile " in startup, startup


def test_warmup_job_fills_the_executable_cache_serve_reads(tmp_path):
    """`runtime.warmup` (the compile-cache warm-up job) with the executable cache on saves
    every program; `runtime.serve` with the same flags then loads them all at start-up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": str(tmp_path / "cache")}
    flags = ["--checkpoint=preset:tiny-llama", "--max_model_len=64", "--dtype=float32", "--max_num_seqs=2",
             "--prefill_lengths=16,32", "--decode_batch_sizes=2", "--page_size=8", "--executable_cache=on",
             "--compile_threads=2"]
    p = subprocess.run([sys.executable, "-m", "runtime.warmup", *flags], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "executables").glob("*/manifest.json"))) == 1
    from runtime.client import Client
    from tests.runtime.server_harness import serve_subprocess

    with serve_subprocess(*flags, "--port=0", env=env, cwd=ROOT, wait_serving=False, timeout=120) as srv:
        with Client(f"localhost:{srv.port}") as client:
            client.wait_until_serving(120)
            out = client.generate_unary(token_ids=[1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(out.token_ids) == 4
        startup = next(line for line in srv.lines if "xlserve: start-up: " in line)
        assert any("executable cache" in line and "programs loaded" in line for line in srv.lines), startup
        assert "compile " not in startup and " ready; slowest" in startup, startup
    bad = subprocess.run([sys.executable, "-m", "runtime.warmup", *flags, "--compile_threads=0"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "--compile_threads=0 must be at least 1" in bad.stderr



def test_executables_installed_in_two_parts_all_serve(aot_dir):
    """A partial cache hit installs the loaded programs, then the compiled rest: the
    second call adds to the first's tables (it replaced them, and warm-up compiled the
    dropped programs again: 15 of 51 on an H200)."""
    engine = _engine()
    executables, why = aot.load_executables(aot_dir, _key(engine))
    assert why is None
    names = sorted(executables)  # every other program in each part: both hold prefill and mixed shapes
    parts = [{n: executables[n] for n in names[i::2]} for i in (0, 1)]
    assert all({"prefill", "mixed"} <= {kind for kind, _ in part} for part in parts)
    assert sum(engine.use_executables(part) for part in parts) == len(engine.programs())
    before = compile_counter.count
    engine.warmup()
    assert {how for _, _, how in engine.warmup_report} == {"ready"} and compile_counter.count == before

# Fewer programs (7) for the tests that compile a whole set more than once.
SMALL = dataclasses.replace(ECFG, prefill_lengths=(32,), decode_batch_sizes=(2,))


def test_programs_compiled_on_threads_serve_the_same_tokens():
    engine = _engine(dataclasses.replace(SMALL, num_top_logprobs=1))  # other programs: none in memory yet
    want = _generate(_engine(engine.ecfg))
    compiled = aot.compile_programs(engine.programs(), threads=2)
    assert engine.use_executables(compiled) == len(engine.programs())
    before = compile_counter.count
    engine.warmup()
    assert _generate(engine) == want and compile_counter.count == before


@pytest.fixture
def compile_cache(tmp_path):
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    yield tmp_path / "jax"
    jax.config.update("jax_compilation_cache_dir", old)


def test_the_executable_cache_serves_the_next_start(compile_cache, capsys):
    """A server's first start compiles and saves every program under the compile cache;
    the next start with the same configuration loads them all (warm-up compiles nothing,
    same tokens); a damaged set is refused, compiled again and rewritten."""
    ecfg = dataclasses.replace(SMALL, max_model_len=48)
    first = _engine(ecfg)
    aot.prepare_programs(first, "float32", aot_dir=None, executable_cache="on", compile_threads=2)
    directory = aot.executable_cache_dir(_key(first))
    assert directory.startswith(str(compile_cache)) and os.path.exists(os.path.join(directory, "manifest.json"))
    want = _generate(first)

    second = _engine(ecfg)
    before = compile_counter.count
    aot.prepare_programs(second, "float32", aot_dir=None, executable_cache="on", compile_threads=2)
    second.warmup()
    assert compile_counter.count == before
    assert {how for _, _, how in second.warmup_report} == {"ready"}
    assert _generate(second) == want
    assert f"executable cache {directory}: {len(second.programs())} of {len(second.programs())} programs loaded" \
        in capsys.readouterr().err

    victim = next(Path(directory).glob("decode-*.xla"))
    victim.write_bytes(b"not an executable")
    third = _engine(ecfg)
    aot.prepare_programs(third, "float32", aot_dir=None, executable_cache="on", compile_threads=1)
    assert "not used, compiling instead" in capsys.readouterr().err
    assert _generate(third) == want
    assert aot.load_executables(directory, _key(third))[1] is None  # rewritten whole


def test_the_executable_cache_is_off_on_cpu_by_default_and_keyed(compile_cache):
    engine = _engine(dataclasses.replace(ECFG, max_model_len=40))
    aot.prepare_programs(engine, "float32", aot_dir=None, executable_cache="auto", compile_threads=1)
    assert not (compile_cache / "executables").exists()  # XLA:CPU: off unless asked
    other = _engine(dataclasses.replace(ECFG, max_model_len=41))
    assert aot.executable_cache_dir(_key(engine)) != aot.executable_cache_dir(_key(other))
    jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")
    assert aot.executable_cache_dir(_key(engine)) is None  # a remote compile cache: no executable cache


def test_fresh_compiles_neither_read_nor_write_the_persistent_cache(compile_cache):
    """compile_programs(fresh=True) (executables bound for the executable cache on CPU)
    compiles from scratch even for a program the persistent cache holds, writes nothing
    there, and leaves the cache serving afterwards. jax_enable_compilation_cache=False
    did neither once the process had compiled with the cache on."""
    import jax.numpy as jnp

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    args = (jax.ShapeDtypeStruct((13,), jnp.float32),)

    def program(scale):  # a new function object each time: no in-memory hit
        return jax.jit(lambda x: jnp.tanh(x) * scale - 2)

    program(7.0).lower(*args).compile()
    entries = set(os.listdir(compile_cache))
    assert any(e.startswith("jit__lambda") for e in entries)
    hits = compile_counter.cache_hits
    done = aot.compile_programs([("a", (1,), program(7.0), args), ("b", (1,), program(9.0), args)], threads=2,
                                fresh=True)
    assert set(done) == {("a", (1,)), ("b", (1,))}
    assert compile_counter.cache_hits == hits and set(os.listdir(compile_cache)) == entries
    assert jax.config.jax_compilation_cache_dir == str(compile_cache)
    program(7.0).lower(*args).compile()
    assert compile_counter.cache_hits == hits + 1  # served again after

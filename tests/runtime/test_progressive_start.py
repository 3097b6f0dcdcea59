"""A progressive start (runtime.serve --startup=progressive; runtime.aot.prepare_programs):
the engine serves with core_programs() while the other programs compile on background
threads and arrive between calls. Invariants: the tokens and logprobs equal a fully
warmed engine's (greedy and seeded sampling, prompts longer than a prefill length,
several sequences decoding beside new prompts), before, while and after the programs
arrive; the serving path compiles nothing (background compilations are counted apart);
every program ends up ready."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from runtime import aot
from runtime.config import EngineConfig
from runtime.engine import Engine, compile_counter
from runtime.orchestrator import Orchestrator, Request
from runtime.presets import preset_config
from runtime.random_weights import random_model
from runtime.sampling import SamplingParams

# Budget-split prompts, mixed calls, two decode buckets and sampling modes (few programs:
# the background compiles them all on this test's clock).
ECFG = EngineConfig(max_num_seqs=4, max_model_len=96, page_size=8, prefill_lengths=(8, 32),
                    decode_batch_sizes=(1, 4), attention="reference", num_top_logprobs=2,
                    max_num_batched_tokens=24, decode_sampling_modes=("greedy", "filter"))


def _engine(ecfg=ECFG) -> Engine:
    return Engine(random_model(preset_config("tiny-llama"), "float32", None), ecfg, num_pages=48)


def _requests(tag: str) -> list[Request]:
    rng = np.random.default_rng(7)
    out = []
    for i, n in enumerate((3, 40, 11, 70, 5, 29)):
        prompt = [int(t) for t in rng.integers(1, 200, n)]
        sampling = (SamplingParams(temperature=0.0, logprobs=2) if i % 3 == 0 else
                    SamplingParams(temperature=0.9, seed=i) if i % 3 == 1 else
                    SamplingParams(temperature=0.7, top_k=12, top_p=0.9, seed=i))
        out.append(Request(f"{tag}{i}", prompt, sampling, max_tokens=6 + i, ignore_eos=True))
    return out


def _serve(orc: Orchestrator, requests: list[Request], on_step=None) -> dict[str, tuple[list[int], list]]:
    """Submits two requests, then one more each step (decoding beside new prompts)."""
    got = {r.request_id: ([], []) for r in requests}
    pending = list(requests)
    for r in pending[:2]:
        orc.add_request(r)
    pending = pending[2:]
    step = 0
    while orc.has_work() or pending:
        if pending:
            orc.add_request(pending.pop(0))
        for out in orc.step():
            got[out.request_id][0].extend(out.token_ids)
            got[out.request_id][1].extend(out.logprobs or [])
        step += 1
        if on_step is not None:
            on_step(step)
    return got


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        np.testing.assert_allclose(np.asarray(got[k][1], np.float64), np.asarray(want[k][1], np.float64),
                                   atol=2e-5, err_msg=k)  # float32 sums over other paddings


@pytest.fixture(scope="module")
def reference():
    engine = _engine()
    engine.warmup()
    return {tag: {k[len(tag):]: v for k, v in _serve(Orchestrator(engine, None), _requests(tag)).items()}
            for tag in ("a", "b")}


def test_core_programs_serve_alone_then_the_others_arrive(reference):
    engine = _engine()
    background = aot.prepare_programs(engine, "float32", aot_dir=None, executable_cache="off", compile_threads=2,
                                      progressive=True)
    core = aot.core_programs(engine)
    assert engine.ready == core and background.num_programs == len(engine.program_names()) - len(core)
    assert core == {("prefill", (1, 32)), ("decode", (4, "filter")), ("release", ()), ("seed_prompt_mask", ()),
                    ("set_table", ()), ("snapshot", (4,))}
    assert sorted(engine.program_names()) == sorted((k, s) for k, s, *_ in engine.programs())
    engine.warmup()
    assert {how for _, _, how in engine.warmup_report} == {"ready"}  # the core, compiled before
    assert len(engine.warmup_report) == 3  # prefill, decode, slot programs: nothing else ran

    # Core programs only: stand-ins (padded shapes, filter mode, two calls for mixed steps).
    orc = Orchestrator(engine, None)
    calls = []
    real_mixed, real_decode = engine.mixed, engine.decode
    engine.mixed = lambda *a, **k: calls.append("mixed") or real_mixed(*a, **k)
    engine.decode = lambda table, mode="filter": calls.append((len(table), mode)) or real_decode(table, mode)
    got = _serve(orc, _requests("a"))
    _same({k[1:]: v for k, v in got.items()}, reference["a"])
    assert "mixed" not in calls and set(calls) == {(4, "filter")}
    assert orc.num_compiles_since_ready == 0

    # The others compile on background threads and arrive between steps, mid-run.
    before = compile_counter.background
    started = []
    got = _serve(orc, _requests("b"), on_step=lambda n: n == 3 and (background.start(), started.append(n)))
    assert started and background.done.wait(300) and background.error is None
    _same({k[1:]: v for k, v in got.items()}, reference["b"])
    # (identical programs compile once per process: at most one compilation each)
    assert 0 < compile_counter.background - before <= background.num_programs
    assert orc.num_compiles_since_ready == 0  # the serving path compiled nothing

    orc.step()  # installs whatever arrived after the last step
    assert engine.ready is None

    # Idle: each arrived program runs once on scratch rows (Engine.warm_arrivals), so no
    # request waits for a first run; the cache's pages and the slots stay as they were.
    calls.clear()
    cache, lengths = [np.asarray(x) for x in jax.tree.leaves(engine.cache)], np.asarray(engine.slots.lengths)
    idle_calls = 0
    while orc.idle():
        idle_calls += 1
    assert idle_calls > 3 and not engine._unwarmed and not orc.idle()
    assert (1, "greedy") in calls and "mixed" not in calls  # decode buckets by decode(); mixed by _mixed_call
    for before, after in zip(cache, jax.tree.leaves(engine.cache)):
        np.testing.assert_array_equal(np.asarray(after), before)
    np.testing.assert_array_equal(np.asarray(engine.slots.lengths), lengths)
    assert orc.num_compiles_since_ready == 0
    calls.clear()
    got = _serve(orc, _requests("b"))
    _same({k[1:]: v for k, v in got.items()}, reference["b"])
    assert "mixed" in calls and (1, "greedy") in calls  # the exact programs now
    assert orc.num_compiles_since_ready == 0


def test_stand_ins_by_shape_variant_and_mode():
    """Engine choices under a partial set, on an engine with fresh and continuation prefill
    variants (the Pallas path compiles both; nothing runs here)."""
    ecfg = dataclasses.replace(ECFG, attention="pallas", prefill_lengths=(8, 16, 32), decode_batch_sizes=(1, 2, 4),
                               decode_sampling_modes=("greedy", "sample", "filter"))
    engine = _engine(ecfg)
    assert engine.prefill_variants == (True, False)
    engine.limit_programs(aot.core_programs(engine))
    assert ("prefill", (1, 32)) in engine.ready  # the continuation program serves fresh prompts too
    assert engine.prefill_shape(1, 5, fresh=True) == (1, 32)
    assert engine._prefill_variant(1, 32, True) is False
    greedy, drawn, filtered = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                               SamplingParams(temperature=1.0, top_k=3))
    assert engine.decode_choice(1, [greedy]) == (4, "filter")
    assert not engine.mixes(1, 1, 8, True, "filter")

    engine.ready |= {("prefill", (1, 8, "fresh")), ("decode", (2, "sample")), ("decode", (1, "greedy")),
                     ("mixed", (2, 1, 16)), ("mixed_sample", (2, "sample"))}
    assert engine.decode_choice(1, [greedy]) == (4, "filter")  # no copy program for 1 or 2 rows yet
    assert not engine.mixes(2, 1, 16, True, "sample")
    engine.ready |= {("snapshot", (1,)), ("snapshot", (2,))}
    assert engine.prefill_shape(1, 5, fresh=True) == (1, 8) and engine._prefill_variant(1, 8, True) is True
    assert engine.prefill_shape(1, 5, fresh=False) == (1, 32)  # a continued chunk needs its variant
    assert engine.decode_choice(1, [greedy]) == (1, "greedy")
    assert engine.decode_choice(1, [drawn]) == (2, "sample")  # greedy cannot draw: the next bucket up
    assert engine.decode_choice(2, [greedy, filtered]) == (4, "filter")
    assert engine.mixes(2, 1, 16, True, "sample")  # a fresh chunk through the continuation program
    assert not engine.mixes(2, 1, 16, True, "filter") and not engine.mixes(2, 1, 8, False, "sample")

    engine.arrive({(k, s): None for k, s in engine.program_names() if (k, s) not in engine.ready})
    engine.use_executables = lambda executables: len(executables)  # nothing real to install here
    assert engine.install_arrivals() > 0 and engine.ready is None
    assert engine.decode_choice(1, [drawn]) == (1, "sample") and engine.prefill_shape(1, 5, fresh=False) == (1, 8)


def _serve_progressive(*flags: str):
    """runtime.serve --startup=progressive over tiny-llama (float32, pages of 8) with `flags`."""
    import os
    from pathlib import Path

    from tests.runtime.server_harness import serve_subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
    return serve_subprocess("--checkpoint=preset:tiny-llama", "--port=0", "--startup=progressive", "--dtype=float32",
                            "--page_size=8", *flags, env=env, cwd=root, timeout=180)


def test_serve_progressive_answers_at_once_and_compiles_nothing_on_the_serving_path():
    """runtime.serve --startup=progressive: SERVING after the core programs, requests
    answered while the others compile, the arrived programs warmed while idle, the same
    greedy tokens before and after every program is ready, and the Load message counts
    no compilation after ready."""
    import time

    from runtime.client import Client

    with _serve_progressive("--max_model_len=96", "--prefill_lengths=8,32", "--max_num_seqs=4",
                            "--decode_batch_sizes=1,4", "--max_num_batched_tokens=24") as srv:
        startup = next(line for line in srv.lines if "xlserve: start-up: " in line)
        assert "more after SERVING" in startup, startup
        with Client(f"localhost:{srv.port}") as client:
            prompt = list(range(1, 41))  # two budget-split chunks
            first = client.generate_unary(token_ids=prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
            deadline = time.monotonic() + 180
            # Idle, the server runs each arrived program once, then freezes the heap again.
            while not any("heap frozen again" in line for line in srv.lines):
                assert time.monotonic() < deadline and srv.proc.poll() is None, "".join(srv.lines)
                time.sleep(0.5)
            text = "".join(srv.lines)
            assert text.index("every program ready") < text.index("programs warm, heap frozen again"), text
            again = client.generate_unary(token_ids=prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
            assert list(again.token_ids) == list(first.token_ids) and len(first.token_ids) == 8
            assert client.model_info().load.num_compiles_since_ready == 0


def test_serve_progressive_stops_its_background_compiles_on_sigterm():
    """SIGTERM right after SERVING, the other programs still compiling: the server drains,
    stops bringing them in (no program after the one compiling is started) and exits 0.
    A process that exited with XLA compiling on a thread died in a segfault (exit 139)
    after its drain on an H200 (2026-11-30)."""
    import signal
    import time

    # More buckets than above, compiled one at a time: a background too long to finish first.
    with _serve_progressive("--max_model_len=128", "--prefill_lengths=8,16,32,64", "--max_num_seqs=8",
                            "--decode_batch_sizes=1,2,4,8", "--compile_threads=1") as srv:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(120) == 0, "".join(srv.lines)
        deadline = time.monotonic() + 10  # the reader thread takes the last lines
        while not any("stopped bringing in" in line for line in srv.lines) and time.monotonic() < deadline:
            time.sleep(0.1)
    text = "".join(srv.lines)
    assert "xlserve: stopped\n" in text and "stopped bringing in the other programs" in text, text
    assert "every program ready" not in text and "exiting with background compiles still running" not in text


def test_startup_auto_is_progressive_on_accelerators_where_it_applies():
    """--startup=auto (the default): progressive on GPUs and TPUs with one process and no
    --aot_dir; full on CPU, beside --aot_dir and across processes. An explicit
    --startup is kept (main refuses progressive where it cannot run)."""
    from runtime.startup import progressive_start  # (runtime.serve defines absl flags: not imported here)

    for platform in ("gpu", "tpu"):
        assert progressive_start("auto", platform, aot_dir=None, one_process=True)
        assert not progressive_start("auto", platform, aot_dir="/aot", one_process=True)
        assert not progressive_start("auto", platform, aot_dir=None, one_process=False)
        assert not progressive_start("full", platform, aot_dir=None, one_process=True)
    assert not progressive_start("auto", "cpu", aot_dir=None, one_process=True)
    assert progressive_start("progressive", "cpu", aot_dir=None, one_process=True)

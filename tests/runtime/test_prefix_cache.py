"""Prefix caching (runtime.page_allocator, runtime.scheduler): a request whose leading
full pages are already cached maps them and prefills only the rest, with the same tokens
and log-probs as without the cache; cached pages are reclaimed before anyone is
preempted, never shared across salts, and a digest collision cannot serve wrong KV."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.orchestrator import Orchestrator, Request
from runtime.page_allocator import OutOfPages, PageAllocator
from runtime.presets import preset_config
from runtime.random_weights import random_model
from runtime.sampling import SamplingParams
from runtime.scheduler import Status

S = 8  # tokens per page in these tests
ECFG = EngineConfig(max_num_seqs=3, max_model_len=128, page_size=S, prefill_lengths=(16, 64), decode_batch_sizes=(3,),
                    attention="reference", num_top_logprobs=2, enable_prefix_caching=True)


# --- the allocator ------------------------------------------------------------------


def test_lookup_finds_the_registered_chain_and_compares_tokens():
    a = PageAllocator(16, 4, prefix_caching=True)
    tokens = list(range(100, 114))  # 3 full pages + 2 tokens
    a.grow("x", len(tokens))
    assert a.register("x", tokens) == 3  # the partial last page is never registered
    pages = a.pages("x")
    assert a.lookup(tokens) == pages[:3]
    assert a.lookup(tokens, max_pages=2) == pages[:2]
    assert a.lookup(tokens[:4] + [0] + tokens[5:]) == pages[:1]  # diverges in page 2
    assert a.lookup([1] + tokens[1:]) == []
    assert a.lookup(tokens, salt="tenant-b") == []  # another salt: another chain
    a.check_conserved()


def test_freed_cached_pages_are_reclaimed_lru_before_running_out():
    a = PageAllocator(6, 4, prefix_caching=True)
    owned = {}
    for name, base in (("x", 0), ("y", 100)):
        owned[name] = list(a.grow(name, 8))
        a.register(name, list(range(base, base + 8)))
        a.free(name)
    assert a.num_free == 6 and a.num_reclaimable == 4 and a.num_cached == 4
    a.check_conserved()
    # 2 free pages, then the least recently freed cached one: x's, from its tail, so its
    # first page (the prefix others share) stays findable.
    a.grow("z", 12)
    assert a.num_reclaimed == 1 and a.lookup(list(range(0, 8))) == owned["x"][:1]
    assert a.lookup(list(range(100, 108))) == owned["y"]
    a.check_conserved()
    # Sharing reclaimable pages takes them out of the LRU: of the 3 reclaimable (x's
    # first, y's two), y's two are shared and one is left for new contents.
    shared = a.lookup(list(range(100, 108)))
    assert a.can_share_and_grow("w", shared, 12, 0) and not a.can_share_and_grow("w", shared, 16, 0)
    a.share("w", shared)
    assert a.num_reclaimable == 1
    a.grow("w", 12)
    with pytest.raises(OutOfPages):
        a.grow("w", 16)
    a.free("w")
    a.free("z")
    a.check_conserved()


def test_a_digest_collision_does_not_serve_another_prompts_pages(monkeypatch):
    a = PageAllocator(8, 4, prefix_caching=True)
    monkeypatch.setattr(a, "_digest", lambda parent, tokens, salt: b"same")
    a.grow("x", 8)
    a.register("x", [1, 2, 3, 4, 5, 6, 7, 8])
    assert a.lookup([1, 2, 3, 4, 5, 6, 7, 8]) == a.pages("x")[:1]  # page 2's digest "collides" with page 1's
    assert a.lookup([9, 9, 9, 9, 5, 6, 7, 8]) == []  # same digest, other tokens: no hit
    a.check_conserved()


# --- the engine -----------------------------------------------------------------------


_ENGINES = {}


def _engine(caching: bool, num_pages: int) -> Engine:
    """One engine per configuration for the module (an orchestrator's requests leave its
    slots idle; stale pages are unreachable), so its programs compile once."""
    key = (caching, num_pages)
    if key not in _ENGINES:
        model = random_model(preset_config("tiny-llama"), "float32", None)
        _ENGINES[key] = Engine(model, dataclasses.replace(ECFG, enable_prefix_caching=caching), num_pages=num_pages)
    return _ENGINES[key]


def _serve(caching: bool, batches, num_pages=48):
    """Runs each batch of requests to completion, one batch after another, on one
    orchestrator; returns ({id: (tokens, logprobs, cached tokens)}, orchestrator)."""
    orc = Orchestrator(_engine(caching, num_pages), None)
    got = {}
    for batch in batches:
        for r in batch:
            orc.add_request(r)
            got[r.request_id] = ([], [], 0)
        while orc.has_work():
            for out in orc.step():
                ids, lps, _ = got[out.request_id]
                got[out.request_id] = (ids + out.token_ids, lps + out.logprobs, out.num_cached_tokens)
        orc.allocator.check_conserved()
    return got, orc


def _req(name, prompt, *, sampled=False, n=6, **kw):
    sampling = SamplingParams(temperature=0.9, top_k=30, seed=7) if sampled else SamplingParams(temperature=0.0)
    return Request(name, list(prompt), dataclasses.replace(sampling, **kw), max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("shared", [0, S - 1, S, 3 * S, 40])  # 40: the whole prompt of "b"
@pytest.mark.parametrize("sampled", [False, True])
def test_cached_prefixes_give_the_same_outputs(shared, sampled):
    rng = np.random.default_rng(shared)
    a = rng.integers(1, 200, 40).tolist()
    b = a[:shared] + rng.integers(1, 200, 40 - shared).tolist()
    batches = [[_req("a", a, sampled=sampled)], [_req("b", b, sampled=sampled)]]
    cached, orc = _serve(True, batches)
    plain, _ = _serve(False, batches)
    for r in ("a", "b"):
        assert cached[r][0] == plain[r][0]
        np.testing.assert_allclose(cached[r][1], plain[r][1], atol=1e-4)  # float32, chunked vs whole prefill
    # Full pages only, and never the last prompt token (it runs to give the first logits).
    assert cached["b"][2] == min(shared // S * S, (len(b) - 1) // S * S)
    assert plain["b"][2] == 0 and cached["a"][2] == 0


def test_a_conversation_turn_reuses_the_previous_answer():
    """Generated tokens' pages are cached when their request finishes: the next turn,
    whose prompt is the last one plus its answer plus a new message, reuses them."""
    rng = np.random.default_rng(1)
    first = rng.integers(1, 200, 21).tolist()
    got, orc = _serve(True, [[_req("t1", first, n=20)]])
    second = first + got["t1"][0] + rng.integers(1, 200, 5).tolist()
    got2, orc2 = _serve(True, [[_req("t1", first, n=20)], [_req("t2", second)]])
    plain, _ = _serve(False, [[_req("t2", second)]])
    assert got2["t2"][0] == plain["t2"][0]
    # 21 + 20 tokens, all but the last with KV: 40 -> 5 full pages.
    assert got2["t2"][2] == 40


def test_salts_never_share_pages():
    rng = np.random.default_rng(2)
    prompt = rng.integers(1, 200, 33).tolist()
    batches = [[dataclasses.replace(_req("a", prompt), cache_salt="tenant-a")],
               [dataclasses.replace(_req("b", prompt), cache_salt="tenant-b")],
               [dataclasses.replace(_req("c", prompt), cache_salt="tenant-a")]]
    got, _ = _serve(True, batches)
    assert got["b"][2] == 0 and got["c"][2] == 32
    assert got["a"][0] == got["b"][0] == got["c"][0]


@pytest.mark.parametrize("mid_decode", [False, True])
def test_a_repetition_penalty_sees_the_cached_part_of_the_prompt(mid_decode):
    """A request with a repetition penalty maps cached pages too: before its first chunk
    its slot's prompt mask gets the cached tokens (Engine.seed_prompt_mask), so the mask
    is the whole prompt's, as without the cache. Checked on the mask itself and on the
    tokens of a penalty so large that no prompt token can be sampled; `mid_decode`: "b"
    arrives while "a" decodes (a mixed call runs its chunk)."""
    # each case its own prompt: the module's engines are shared, and a slot's mask from an
    # earlier test must not look right by chance
    prompt = np.random.default_rng(30 + mid_decode).integers(1, 200, 30).tolist()
    b = _req("b", prompt, n=12, repetition_penalty=1e6)

    def run(caching):
        engine = _engine(caching, 48)
        orc = Orchestrator(engine, None)
        got, cached, mask = {"a": [], "b": []}, 0, None
        orc.add_request(_req("a", prompt, n=12 if mid_decode else 2))
        while orc.has_work() or "b" not in orc._tracks and not got["b"]:
            if "b" not in orc._tracks and not got["b"] and (len(got["a"]) == 3 if mid_decode else not orc.has_work()):
                orc.add_request(b)
            for out in orc.step():
                got[out.request_id] += out.token_ids
                cached = out.num_cached_tokens if out.request_id == "b" else cached
            seq = next((q for q in orc.scheduler.running.values() if q.seq_id == "b"), None)
            if mask is None and seq is not None and seq.status == Status.RUNNING:  # its prompt is in
                mask = np.asarray(engine.slots.prompt_mask[seq.slot])
        orc.allocator.check_conserved()
        return got["b"], cached, mask

    tokens, cached, mask = run(True)
    plain, plain_cached, _ = run(False)
    assert cached == 24 and plain_cached == 0
    assert tokens == plain and len(tokens) == 12 and not set(tokens) & set(prompt)
    want = np.zeros(mask.shape, bool)
    want[prompt] = True
    np.testing.assert_array_equal(mask, want)


def test_cached_pages_are_reclaimed_without_preempting():
    """Finished requests' cached pages fill the cache; a new request takes them back
    (least recently used first) instead of waiting or preempting anyone."""
    rng = np.random.default_rng(4)
    batches = [[_req(f"r{i}", rng.integers(1, 200, 40).tolist(), n=8)] for i in range(5)]
    got, orc = _serve(True, batches, num_pages=20)  # 6 pages a request; 20 in all
    assert orc.allocator.num_reclaimed > 0 and orc.scheduler.num_preemptions == 0
    plain, _ = _serve(False, batches, num_pages=20)
    assert {r: g[0] for r, g in got.items()} == {r: g[0] for r, g in plain.items()}


def test_a_cached_prompt_arriving_mid_decode_runs_in_a_mixed_call():
    """"b" shares "a"'s first 3 pages and arrives while "a" decodes: its rest runs as a
    mixed call's chunk that starts after the cached pages (the continuation path), with
    the tokens of a run without the cache."""
    rng = np.random.default_rng(5)
    a = rng.integers(1, 200, 30).tolist()
    b = a[:24] + rng.integers(1, 200, 9).tolist()

    def run(caching):
        orc = Orchestrator(_engine(caching, 48), None)
        got = {"a": [], "b": []}
        cached = {}
        orc.add_request(_req("a", a, n=12))
        kinds, steps = [], 0
        while orc.has_work():
            if steps == 4:
                orc.add_request(_req("b", b, n=6))
            for out in orc.step():
                got[out.request_id] += out.token_ids
                cached[out.request_id] = out.num_cached_tokens
            kinds.append(orc.last_step.kind)
            steps += 1
        orc.allocator.check_conserved()
        return got, cached, kinds

    got, cached, kinds = run(True)
    plain, _, plain_kinds = run(False)
    assert got == plain and cached["b"] == 24 and "mixed" in kinds


def test_a_preempted_request_finds_its_pages_again():
    """Pages run short while three requests decode: the newest is preempted, its
    confirmed pages (prompt and generated tokens) stay cached, and at its re-admission it
    maps them instead of recomputing everything; the tokens are those without the cache."""
    rng = np.random.default_rng(6)
    # r1 ends soon after the preemption, so r2 returns before the others' growth
    # reclaims its pages.
    batches = [[_req(f"r{i}", rng.integers(1, 200, 20).tolist(), n=14 if i == 1 else 30) for i in range(3)]]
    orc = Orchestrator(_engine(True, 13), None)
    readmitted = []
    real_share = orc.allocator.share
    orc.allocator.share = lambda seq_id, pages, **kw: readmitted.append((seq_id, len(pages))) or real_share(
        seq_id, pages, **kw)
    got = {r.request_id: [] for r in batches[0]}
    for r in batches[0]:
        orc.add_request(r)
    while orc.has_work():
        for out in orc.step():
            got[out.request_id] += out.token_ids
    orc.allocator.check_conserved()
    assert orc.scheduler.num_preemptions > 0 and readmitted and all(n > 0 for _, n in readmitted)
    plain, porc = _serve(False, batches, num_pages=13)
    assert porc.scheduler.num_preemptions > 0
    assert got == {r: g[0] for r, g in plain.items()}


@pytest.mark.parametrize("args,want", [((), True), (("--noenable_prefix_caching",), False)])
def test_the_command_lines_cache_prefixes_by_default(args, want):
    """serve / generate / warmup build their EngineConfig from the flags: caching is on
    unless --noenable_prefix_caching (EngineConfig itself, the library's, defaults off)."""
    code = ("import sys; from absl import flags; from runtime import flags as xf; xf.define_engine_flags(); "
            "flags.FLAGS(sys.argv); print(xf.engine_config_from_flags().enable_prefix_caching)")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(want)
    assert EngineConfig().enable_prefix_caching is False

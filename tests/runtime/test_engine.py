"""Engine + scheduler + orchestrator invariants on a tiny random model.

The model is random (vocab of the SmolLM2 tokenizer so text paths run for real), all
float32 so batched and alone compute the same numbers.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.config import ConfigError, EngineConfig
from runtime.engine import MAX_STOP_IDS, Engine, pack_prefill
from runtime.orchestrator import Orchestrator, Request, RequestError
from runtime.sampling import SAMPLING_MODES, SamplingParams, SlotSampling
from runtime.scheduler import Status
from tests.utils import peaked_tiny_llama, smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return peaked_tiny_llama(tokenizer.vocab_size)

ECFG = dict(
    max_num_seqs=4, max_model_len=96, page_size=8, prefill_lengths=(8, 16), prefill_batch_sizes=(1, 2, 4),
    cache_dtype="float32", num_top_logprobs=3,
)


_ENGINES: dict = {}


def make_orchestrator(model, tokenizer, pipeline=True, **overrides):
    """A fresh orchestrator (all pages free) over a warmed engine shared per config."""
    num_pages = overrides.pop("num_pages", 48)
    key = (id(model), num_pages, tuple(sorted(overrides.items())))
    if key not in _ENGINES:
        engine = Engine(model, EngineConfig(**{**ECFG, **overrides}), num_pages=num_pages)
        engine.warmup()
        _ENGINES[key] = engine
    engine = _ENGINES[key]
    assert not bool(jnp.any(engine.slots.lengths)), "a previous test left a slot active"
    return Orchestrator(engine, tokenizer, pipeline=pipeline)


def run(orc, requests):
    results = {}
    for r in requests:
        orc.add_request(r)
    while orc.has_work():
        for out in orc.step():
            res = results.setdefault(out.request_id, dict(ids=[], text="", logprobs=[], finals=0))
            res["ids"] += out.token_ids
            res["text"] += out.text
            res["logprobs"] += out.logprobs
            if out.finished:
                res["finals"] += 1
                res["reason"] = out.finish_reason
    orc.allocator.check_conserved()
    assert orc.allocator.num_free == orc.allocator.num_pages, "pages leaked"
    return results


def mixed_requests(n=16, seed=0):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        kind = i % 4
        sp = [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.9, top_k=20, seed=100 + i),
            SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, seed=200 + i, logprobs=2),
            SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5,
                           frequency_penalty=0.3, seed=300 + i),
        ][kind]
        prompt = rng.integers(3, 2000, int(rng.integers(1, 40))).tolist()  # up to 39: chunked (16)
        reqs.append(Request(f"r{i}", prompt, sp, max_tokens=int(rng.integers(1, 24)), ignore_eos=True))
    return reqs


@pytest.fixture(scope="module")
def alone_results(model, tokenizer):
    orc = make_orchestrator(model, tokenizer, pipeline=False)
    out = {}
    for r in mixed_requests():
        out.update(run(orc, [r]))
    assert orc.num_compiles_since_ready == 0
    return out


@pytest.mark.parametrize("order_seed, pipeline", [(0, True), (1, True), (2, False)])
def test_batched_equals_alone_any_order(model, tokenizer, alone_results, order_seed, pipeline):
    reqs = mixed_requests()
    np.random.default_rng(order_seed).shuffle(reqs)
    orc = make_orchestrator(model, tokenizer, pipeline=pipeline)
    got = run(orc, reqs)
    for r in reqs:
        assert got[r.request_id]["ids"] == alone_results[r.request_id]["ids"], r.request_id
        assert got[r.request_id]["finals"] == 1
        assert len(got[r.request_id]["ids"]) == r.max_tokens
        np.testing.assert_allclose(got[r.request_id]["logprobs"], alone_results[r.request_id]["logprobs"],
                                   rtol=1e-4, atol=1e-4)
    assert orc.num_compiles_since_ready == 0


def test_preemption_recomputes_identically(model, tokenizer, alone_results):
    """So few pages that running sequences are preempted and recomputed; same tokens."""
    reqs = mixed_requests()
    orc = make_orchestrator(model, tokenizer, num_pages=14)  # 112 tokens for 4 slots of up to 62
    got = run(orc, reqs)
    assert orc.scheduler.num_preemptions > 0
    for r in reqs:
        assert got[r.request_id]["ids"] == alone_results[r.request_id]["ids"], r.request_id


def test_multi_step_decode_equals_single_step(model, tokenizer, alone_results):
    """3 tokens per dispatch, stops and budgets masked on device: the same tokens."""
    reqs = mixed_requests()
    orc = make_orchestrator(model, tokenizer, decode_steps_per_call=3)
    got = run(orc, reqs)
    for r in reqs:
        assert got[r.request_id]["ids"] == alone_results[r.request_id]["ids"], r.request_id
        assert got[r.request_id]["finals"] == 1
    assert orc.num_compiles_since_ready == 0


def test_token_budget_splits_a_long_prompt_without_changing_tokens(model, tokenizer):
    """A 60-token prompt arriving while three requests decode: under a budget of 12 tokens
    a step its prefill chunks hold at most 12 - 3 = 9 tokens (chunks of 8, the largest
    length <= 9, then the rest), under the default budget they are full chunks of 16; the
    greedy tokens of every request are the same either way."""
    rng = np.random.default_rng(5)
    greedy = SamplingParams(temperature=0.0)
    short = [Request(f"s{i}", rng.integers(3, 2000, 5 + i).tolist(), greedy, max_tokens=30, ignore_eos=True)
             for i in range(3)]
    long = Request("long", rng.integers(3, 2000, 60).tolist(), greedy, max_tokens=8, ignore_eos=True)

    def serve(orc):
        """Every request's tokens, and per call with prefill chunks (a prefill call, or a
        mixed one with a decode step) the decoding sequences and the (slot, length) of each
        chunk the engine ran."""
        calls, prefill, mixed = [], orc.engine.prefill, orc.engine.mixed

        def record(kwargs):
            decoding = sum(s.status == Status.RUNNING for s in orc.scheduler.running.values())
            chunks = [(int(s), int(n)) for s, n in zip(kwargs["slot_ids"], kwargs["lens"]) if n]
            calls.append((decoding, chunks))

        def spy_prefill(**kwargs):
            record(kwargs)
            return prefill(**kwargs)

        def spy_mixed(table, **kwargs):
            record(kwargs)
            return mixed(table, **kwargs)

        got = {}

        def step():
            for out in orc.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)

        orc.engine.prefill, orc.engine.mixed = spy_prefill, spy_mixed
        try:
            for r in short:
                orc.add_request(r)
            while sum(s.status == Status.RUNNING for s in orc.scheduler.running.values()) < len(short):
                step()
            orc.add_request(long)
            while orc.has_work():
                step()
        finally:
            del orc.engine.prefill, orc.engine.mixed  # the instance attributes: the Engine's methods again
        assert orc.num_compiles_since_ready == 0
        return got, calls

    want, full_calls = serve(make_orchestrator(model, tokenizer))
    got, calls = serve(make_orchestrator(model, tokenizer, max_num_batched_tokens=12))
    assert got == want and all(len(got[r.request_id]) == r.max_tokens for r in [*short, long])
    long_slot = len(short)  # the lowest slot free when it arrives
    assert [n for _, chunks in full_calls for s, n in chunks if s == long_slot] == [16, 16, 16, 12]
    assert [n for _, chunks in calls for s, n in chunks if s == long_slot] == [8] * 7 + [4]
    for decoding, chunks in calls:
        if decoding:
            assert sum(n for _, n in chunks) <= max(12 - decoding, 8), (decoding, chunks)


@pytest.mark.parametrize("mixed_calls", [True, False])
def test_prompts_arriving_mid_decode_mix_with_it_and_change_no_token(model, tokenizer, alone_results, mixed_calls):
    """Requests added while others decode: their chunks and the decode step run as one
    mixed call (Engine.mixed), or as two calls with --nomixed_calls; every request's
    tokens and logprobs are those it gets alone either way."""
    reqs = mixed_requests()
    orc = make_orchestrator(model, tokenizer, mixed_calls=mixed_calls)
    mixed, prefill, kinds = orc.engine.mixed, orc.engine.prefill, []
    orc.engine.mixed = lambda *a, **k: kinds.append("mixed") or mixed(*a, **k)
    orc.engine.prefill = lambda **k: kinds.append("prefill") or prefill(**k)
    got: dict = {}
    try:
        for i, r in enumerate(reqs):
            orc.add_request(r)
            for _ in range(i % 3):  # arrivals spread over the steps
                for out in orc.step():
                    got.setdefault(out.request_id, dict(ids=[], lp=[]))
                    got[out.request_id]["ids"] += out.token_ids
                    got[out.request_id]["lp"] += out.logprobs
        while orc.has_work():
            for out in orc.step():
                got.setdefault(out.request_id, dict(ids=[], lp=[]))
                got[out.request_id]["ids"] += out.token_ids
                got[out.request_id]["lp"] += out.logprobs
    finally:
        del orc.engine.mixed, orc.engine.prefill
    for r in reqs:
        assert got[r.request_id]["ids"] == alone_results[r.request_id]["ids"], r.request_id
        np.testing.assert_allclose(got[r.request_id]["lp"], alone_results[r.request_id]["logprobs"], rtol=1e-4,
                                   atol=1e-4)
    assert ("mixed" in kinds) == mixed_calls and "prefill" in kinds  # the first prompt has no decode beside it
    assert orc.num_compiles_since_ready == 0
    orc.allocator.check_conserved()
    assert orc.allocator.num_free == orc.allocator.num_pages


def test_mixed_call_manifest():
    """Mixed calls: per decode bucket, the smallest prefill batch, the lengths a budgeted
    chunk can pad to, each prefill variant; none with several decode steps per call or
    --nomixed_calls; an unknown shape is refused."""
    from runtime.engine import bucket_manifest

    base = EngineConfig(**ECFG)
    assert bucket_manifest(base)["mixed"] == [(1, 1, 8), (1, 1, 16), (4, 1, 8), (4, 1, 16)]
    small = dataclasses.replace(base, max_num_batched_tokens=6)  # chunks beside decode: 8 at most
    assert bucket_manifest(small)["mixed"] == [(1, 1, 8), (4, 1, 8)]
    for off in (dict(mixed_calls=False), dict(decode_steps_per_call=2)):
        assert bucket_manifest(dataclasses.replace(base, **off))["mixed"] == []
    pallas = dataclasses.replace(base, attention="pallas", max_model_len=32)
    assert (4, 1, 16, "fresh") in bucket_manifest(pallas)["mixed"] and (4, 1, 16) in bucket_manifest(pallas)["mixed"]


def test_greedy_matches_model_level_decode(model, tokenizer):
    from tests.utils import greedy_batch

    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [42]]
    want = greedy_batch(model, prompts, 10, page_size=8, cache_dtype=jnp.float32)
    orc = make_orchestrator(model, tokenizer)
    got = run(orc, [Request(f"g{i}", p, SamplingParams(temperature=0.0), max_tokens=10, ignore_eos=True)
                    for i, p in enumerate(prompts)])
    assert [got["g0"]["ids"], got["g1"]["ids"]] == want


@pytest.mark.parametrize("steps, pipeline", [(1, False), (1, True), (3, True)])
def test_stop_conditions(model, tokenizer, steps, pipeline):
    orc = make_orchestrator(model, tokenizer, pipeline=pipeline, decode_steps_per_call=steps)
    greedy = SamplingParams(temperature=0.0)
    base = run(orc, [Request("a", [5, 6, 7], greedy, max_tokens=12, ignore_eos=True)])["a"]
    ids, text = base["ids"], base["text"]
    # A stop token id: generation ends at its first occurrence, the token is reported.
    stop_tok = ids[4]
    r = run(orc, [Request("b", [5, 6, 7], greedy, max_tokens=12, stop_token_ids=(stop_tok,))])["b"]
    assert r["ids"] == ids[: ids.index(stop_tok) + 1] and r["reason"] == "stop"
    # A stop string: the text ends before it.
    s = text[len(text) // 2 : len(text) // 2 + 3]
    if s.strip():
        r = run(orc, [Request("c", [5, 6, 7], greedy, max_tokens=12, stop=(s,), ignore_eos=True)])["c"]
        assert r["reason"] == "stop" and r["text"] == text[: text.index(s)]
    # max_tokens
    r = run(orc, [Request("d", [5, 6, 7], greedy, max_tokens=3, ignore_eos=True)])["d"]
    assert r["ids"] == ids[:3] and r["reason"] == "length"
    # the context limit caps max_tokens
    long_prompt = list(range(3, 3 + 90))
    r = run(orc, [Request("e", long_prompt, greedy, max_tokens=50, ignore_eos=True)])["e"]
    assert len(r["ids"]) == 96 - 90 and r["reason"] == "length"


def test_abort_frees_slot_and_pages(model, tokenizer):
    orc = make_orchestrator(model, tokenizer)
    orc.add_request(Request("x", [5, 6, 7], SamplingParams(temperature=0.0), max_tokens=50, ignore_eos=True))
    orc.add_request(Request("y", [8, 9], SamplingParams(temperature=0.0), max_tokens=5, ignore_eos=True))
    orc.step()
    orc.step()
    assert orc.abort("x") and not orc.abort("nope")
    finals = {}
    while orc.has_work():
        for out in orc.step():
            if out.finished:
                finals[out.request_id] = out.finish_reason
    for out in orc.step():
        if out.finished:
            finals[out.request_id] = out.finish_reason
    assert finals == {"x": "abort", "y": "length"}
    assert orc.allocator.num_free == orc.allocator.num_pages


@pytest.mark.parametrize(
    "request_kwargs, match",
    [
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[1, 10**7]), "out of range"),
        (dict(prompt_ids=list(range(3, 200))), "context holds"),
        (dict(prompt_ids=[1], max_tokens=0), "max_tokens"),
        (dict(prompt_ids=[1], sampling=SamplingParams(logprobs=5)), "num_top_logprobs"),
    ],
)
def test_bad_requests_are_rejected(model, tokenizer, request_kwargs, match):
    orc = make_orchestrator(model, tokenizer)
    with pytest.raises(RequestError, match=match):
        orc.add_request(Request("bad", **request_kwargs))
    assert not orc.has_work()


def test_attention_auto_resolves_by_backend():
    from runtime.engine import attention_impl

    expected = "pallas" if jax.default_backend() == "gpu" else "reference"
    assert attention_impl(EngineConfig()) == expected
    assert attention_impl(EngineConfig(attention="pallas")) == "pallas"
    assert attention_impl(EngineConfig(attention="reference")) == "reference"
    with pytest.raises(ConfigError, match="attention='flash'"):
        EngineConfig(attention="flash")


def test_decode_steps_have_no_data_dependent_branch(model, tokenizer):
    """On a GPU a lax.cond reads its predicate back to the host, which then waits for the
    step's forward pass before it can dispatch anything more (runtime.sampling.SAMPLING_MODES):
    no decode variant or prefill may contain one."""
    engine = make_orchestrator(model, tokenizer).engine
    table = jnp.zeros((engine.ecfg.max_num_seqs, engine.ecfg.max_pages_per_seq), jnp.int32)
    B = engine.ecfg.max_num_seqs
    assert set(engine._decode) == {(rows, mode) for rows in engine.ecfg.decode_buckets for mode in SAMPLING_MODES}
    programs = {mode: engine._decode[(B, mode)].lower(engine.param_leaves, engine.cache, engine.slots, engine.io)
                for mode in SAMPLING_MODES}
    b, t = engine.manifest()["prefill"][0][:2]
    i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    packed = pack_prefill(tokens=i32(b, t), starts=i32(b), lens=i32(b), page_table=i32(b, table.shape[1]),
                          slot_ids=i32(b), is_last=np.zeros(b, bool), sampling=SlotSampling.pack([None] * b, [0] * b),
                          stop_ids=i32(b, MAX_STOP_IDS), remaining=i32(b))
    programs["prefill"] = engine._prefill[False].lower(engine.param_leaves, engine.cache, engine.slots, *packed)
    for name, lowered in programs.items():
        text = lowered.as_text()
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, name
    with pytest.raises(ValueError, match="decode mode 'auto'"):
        engine.decode(np.asarray(table), mode="auto")


def test_each_decode_call_takes_the_variant_its_slots_need(model, tokenizer):
    """Greedy requests decode in the "greedy" variant; a sampled request joining makes
    the calls that decode it "sample" or "filter", and the variant drops back once it ends."""
    orc = make_orchestrator(model, tokenizer)
    modes = []
    decode = orc.engine.decode
    orc.engine.decode = lambda table, mode="filter": (modes.append(mode), decode(table, mode=mode))[1]
    try:
        prompt = [5, 6, 7, 8, 9]
        run(orc, [Request("g", prompt, SamplingParams(temperature=0.0), max_tokens=6, ignore_eos=True)])
        assert modes and set(modes) == {"greedy"}
        modes.clear()
        run(orc, [Request("g", prompt, SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True),
                  Request("t", prompt, SamplingParams(temperature=0.8, seed=1), max_tokens=3, ignore_eos=True)])
        assert modes[0] == "sample" and modes[-1] == "greedy", modes
        modes.clear()
        run(orc, [Request("p", prompt, SamplingParams(temperature=0.8, top_p=0.9, seed=1), max_tokens=4,
                          ignore_eos=True)])
        assert set(modes) == {"filter"}, modes
    finally:
        del orc.engine.decode  # the instance attribute: Engine.decode again


def test_decode_runs_the_smallest_bucket_holding_its_slots(model, tokenizer, alone_results):
    """Slots are handed out lowest first and a call runs slots [0, b) for the smallest
    bucket b (EngineConfig.decode_buckets: 1 and 4 here) that holds every decoding slot:
    a lone request runs one row, a full batch all four, and the tokens are the same as
    alone (test_batched_equals_alone_any_order runs both buckets too)."""
    orc = make_orchestrator(model, tokenizer)
    assert orc.engine.ecfg.decode_buckets == (1, 4)
    rows = []
    decode = orc.engine.decode
    orc.engine.decode = lambda table, mode="filter": (rows.append(len(table)), decode(table, mode=mode))[1]
    try:
        reqs = mixed_requests()
        got = run(orc, [reqs[0]])
        assert set(rows) == {1}, rows
        rows.clear()
        got.update(run(orc, reqs[1:5]))
        assert 4 in rows, rows  # several decoding slots: the full bucket
    finally:
        del orc.engine.decode
    for r in reqs[:5]:
        assert got[r.request_id]["ids"] == alone_results[r.request_id]["ids"], r.request_id
    with pytest.raises(ValueError, match="decode over 3 slots; the buckets are 1, 4"):
        orc.engine.decode(np.zeros((3, orc.engine.ecfg.max_pages_per_seq), np.int32), mode="greedy")


def test_decode_state_keeps_its_buffers(model, tokenizer):
    """Every decode call updates the cache, the slots and its page table and outputs
    (runtime.engine.DecodeIO) in place: on a GPU a step is a command buffer that records
    buffer addresses, and one that moved would be updated (and its next launch wait for
    the previous one) on every call. Prefill and slot release keep them too, and so do
    the buffers the host reads the outputs from."""
    orc = make_orchestrator(model, tokenizer)
    engine = orc.engine
    state = lambda: [x.unsafe_buffer_pointer()  # noqa: E731
                     for x in jax.tree.leaves((engine.cache, engine.slots, engine.io, engine._readback))]
    before = state()
    run(orc, mixed_requests()[:6])
    assert state() == before


def test_decode_over_fewer_rows_changes_only_those_rows(model, tokenizer):
    """A call over a bucket smaller than the slots (1 of 4 here) changes its rows' tokens,
    lengths, budgets and output counts, and nothing else: the other slots whole, and every
    slot's prompt mask, sampling parameters and stop ids (runtime.engine._DECODE_WRITES)."""
    engine = make_orchestrator(model, tokenizer).engine
    B, V = engine.slots.prompt_mask.shape
    rng = np.random.default_rng(0)
    engine.slots = dataclasses.replace(
        engine.slots, lengths=jnp.arange(1, B + 1, dtype=jnp.int32) * 3, remaining=jnp.full((B,), 50, jnp.int32),
        prompt_mask=jnp.asarray(rng.random((B, V)) < 0.3), output_counts=jnp.asarray(rng.integers(0, 3, (B, V)), jnp.int32))
    before = jax.tree.map(np.asarray, engine.slots)
    try:
        out = engine.decode(np.arange(engine.ecfg.max_pages_per_seq, dtype=np.int32)[None], mode="greedy")
        after = jax.tree.map(np.asarray, engine.slots)
        tok = int(np.asarray(out["tokens"])[0, 0])
    finally:
        for slot in range(B):
            engine.release(slot)
    for name in ("prompt_mask", "stop_ids"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name), err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, after.sampling, before.sampling)
    for name in ("tokens", "lengths", "remaining", "output_counts"):
        np.testing.assert_array_equal(getattr(after, name)[1:], getattr(before, name)[1:], err_msg=name)
    assert after.tokens[0] == tok and after.lengths[0] == before.lengths[0] + 1
    assert after.remaining[0] == before.remaining[0] - 1
    counts = before.output_counts[0].copy()
    counts[tok] += 1
    np.testing.assert_array_equal(after.output_counts[0], counts)


def test_decode_buckets_config():
    assert EngineConfig(max_num_seqs=64).decode_buckets == (1, 8, 64)
    assert EngineConfig(max_num_seqs=300).decode_buckets == (1, 8, 64, 300)
    assert EngineConfig(max_num_seqs=5, decode_batch_sizes=(2, 16)).decode_buckets == (2, 5)
    with pytest.raises(ConfigError, match="decode_batch_sizes=4,2 must be positive and increasing"):
        EngineConfig(decode_batch_sizes=(4, 2))


def test_gpu_compiler_options():
    """--command_buffers keeps prefill (or every step) out of CUDA graphs on a GPU, the
    programs in graphs keep their temporary buffer at a stable address where XLA knows how
    (JAX 0.11: STABLE_TEMP_OPTION; an older XLA gets nothing), and decode buckets of 64+
    rows take cuBLAS matmuls; other compilers are asked nothing (libtpu rejects options it
    does not know)."""
    from pallas_kernels import dispatch
    from runtime.engine import STABLE_TEMP_OPTION, _compiler_options, _stable_temp_option

    off = {"xla_gpu_enable_command_buffer": ""}
    stable = _stable_temp_option()
    assert stable in ({}, dict([STABLE_TEMP_OPTION]))
    with dispatch.target_platform("gpu"):
        got = {c: [_compiler_options(EngineConfig(command_buffers=c), s) for s in ("prefill", "decode")]
               for c in ("all", "decode", "none")}
        graph = stable or None
        assert got == {"all": [graph, graph], "decode": [off, graph], "none": [off, off]}
        cublas = {"xla_gpu_enable_triton_gemm": False}
        assert [_compiler_options(EngineConfig(), "decode", rows) for rows in (1, 8, 63, 64, 512)] == [
            graph, graph, graph, {**stable, **cublas}, {**stable, **cublas}]
        assert _compiler_options(EngineConfig(command_buffers="none"), "decode", 64) == {**off, **cublas}
        assert _compiler_options(EngineConfig(), "prefill", 64) == graph  # prefill keeps Triton
    with dispatch.target_platform("tpu"):
        assert _compiler_options(EngineConfig(command_buffers="none"), "decode", 512) is None
    with pytest.raises(ConfigError, match="command_buffers='some'"):
        EngineConfig(command_buffers="some")


def test_stable_temp_option_probe(monkeypatch):
    """The probe asks this process's XLA: a value it does not know leaves the option out
    (no program fails to compile over it), one it knows is passed on."""
    from runtime import engine

    monkeypatch.setattr(engine, "STABLE_TEMP_OPTION", ("xla_gpu_command_buffer_update_mode", "NO_SUCH_MODE"))
    engine._stable_temp_option.cache_clear()
    try:
        assert engine._stable_temp_option() == {}
        monkeypatch.setattr(engine, "STABLE_TEMP_OPTION", ("xla_gpu_command_buffer_update_mode", "ALWAYS_UPDATE"))
        engine._stable_temp_option.cache_clear()
        assert engine._stable_temp_option() == {"xla_gpu_command_buffer_update_mode": "ALWAYS_UPDATE"}
    finally:
        engine._stable_temp_option.cache_clear()


def test_prefill_arguments_pack_into_two_arrays():
    """pack_prefill / _unpack_prefill round-trip every argument exactly, including a PRNG
    key word with its top bit set (carried as int32 bits) and negative stop ids."""
    from runtime.engine import _unpack_prefill
    from runtime.sampling import SamplingParams

    rng = np.random.default_rng(0)
    b, t, mp = 3, 5, 4
    params = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                             presence_penalty=0.2, frequency_penalty=-0.3), None, SamplingParams(temperature=0.0)]
    host = dict(tokens=rng.integers(0, 1000, (b, t)).astype(np.int32), starts=np.array([0, 7, 3], np.int32),
                lens=np.array([5, 0, 2], np.int32), page_table=rng.integers(0, 50, (b, mp)).astype(np.int32),
                slot_ids=np.array([2, 9, 0], np.int32), is_last=np.array([True, False, True]),
                sampling=SlotSampling.pack(params, [2**64 - 1, 0, 12345]),
                stop_ids=np.full((b, MAX_STOP_IDS), -1, np.int32), remaining=np.array([4, 0, 1], np.int32))
    host["stop_ids"][0, :2] = [2, 128001]
    ints, floats = pack_prefill(**host)
    assert ints.dtype == np.int32 and floats.dtype == np.float32 and floats.shape == (b, 6)
    got = jax.jit(_unpack_prefill, static_argnums=2)(ints, floats, mp)
    for name in ("tokens", "starts", "lens", "page_table", "slot_ids", "is_last", "stop_ids", "remaining"):
        np.testing.assert_array_equal(np.asarray(got[name]), host[name], err_msg=name)
        assert got[name].dtype == (jnp.bool_ if name == "is_last" else jnp.int32), name
    for name, want in host["sampling"].items():
        value = getattr(got["sampling"], name)
        assert value.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=name)


def test_warmup_reports_every_program(model, tokenizer):
    """Engine.warmup lists each manifest entry with its time and how it was built; a second
    warm-up of the same engine builds nothing ("ready")."""
    orc = make_orchestrator(model, tokenizer)
    engine = orc.engine
    names = [name for name, _, _ in engine.warmup_report]
    manifest = engine.manifest()
    # + the mixed calls' decode-row sampling (every bucket and mode) and set_table/release/seed_prompt_mask.
    assert len(names) == len(manifest["prefill"]) + len(manifest["decode"]) + len(manifest["mixed"]) + 2
    assert names[0].startswith("prefill ") and any(n.startswith("decode ") for n in names)
    assert sorted(n for n in names if n.startswith("mixed ")) == ["mixed 1+1x16", "mixed 1+1x8", "mixed 4+1x16",
                                                                 "mixed 4+1x8", "mixed sampling"]
    assert set(engine._mixed_sample) == {(rows, mode) for rows in (1, 4) for mode in engine.ecfg.decode_sampling_modes}
    assert {how for _, _, how in engine.warmup_report} <= {"compiled", "cache", "ready"}
    assert engine.warmup() == 0
    assert {how for _, _, how in engine.warmup_report} == {"ready"}
    assert all(sec >= 0 for _, sec, _ in engine.warmup_report)
    assert engine.warmup_summary().startswith(f"{len(names)} programs: {len(names)} ready; slowest ")

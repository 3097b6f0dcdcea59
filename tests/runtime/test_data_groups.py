"""Data parallelism on the host: slots, pages and prefill rows split into D groups.

Pure Python over the allocator and the scheduler, and the orchestrator over a fake
engine that keeps its "KV cache" per data group (a group's pages only, addressed by
global page id minus the group's offset, as the device does), so a page of the wrong
group, a wrong prefill row or a wrong page table shows up as a wrong token.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest

from runtime.config import EngineConfig
from runtime.orchestrator import Orchestrator, Request, RequestError
from runtime.page_allocator import OutOfPages, PageAllocator
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler, Sequence, Status

# --- the allocator ------------------------------------------------------------------


def test_allocator_grows_in_its_group_and_frees_back_to_it():
    a = PageAllocator(8, 4, groups=2)
    assert a.pages_per_group == 4 and [a.group_of_page(p) for p in range(8)] == [0] * 4 + [1] * 4
    assert a.grow("x", 6, group=1) == [4, 5]
    assert a.group_of("x") == 1 and a.num_free == 6 and a.num_free_in(0) == 4 and a.num_free_in(1) == 2
    assert a.grow("x", 12) == [4, 5, 6]  # later calls keep its group
    assert a.can_grow("x", 16) and not a.can_grow("x", 17)
    with pytest.raises(ValueError, match="group 1, not 0"):
        a.grow("x", 16, group=0)
    assert a.grow("y", 16, group=0) == [0, 1, 2, 3]
    a.check_conserved()
    a.free("x")
    assert a.num_free_in(1) == 4 and a.num_free_in(0) == 0 and a.group_of("x") is None
    assert a.grow("x", 4, group=1)[0] in range(4, 8)  # freed: it may start in any group again
    a.free("x")
    a.free("y")
    a.check_conserved()
    assert a.num_free == a.num_used + 8 == 8


def test_allocator_out_of_pages_is_per_group():
    a = PageAllocator(8, 4, groups=2)
    a.grow("x", 12, group=0)
    assert not a.can_grow("y", 8, group=0) and a.can_grow("y", 8, group=1)
    with pytest.raises(OutOfPages, match="in group 0"):
        a.grow("y", 8, group=0)  # 5 pages free in all, 1 in group 0
    assert a.pages("y") == [] and a.group_of("y") is None
    a.grow("x", 16)
    with pytest.raises(OutOfPages):
        a.grow("x", 20)  # group 1's pages do not help
    a.check_conserved()


def test_allocator_needs_a_group_when_there_are_several():
    a = PageAllocator(8, 4, groups=2)
    with pytest.raises(ValueError, match="pass group="):
        a.grow("x", 4)
    with pytest.raises(ValueError, match="out of range"):
        a.grow("x", 4, group=2)
    with pytest.raises(ValueError, match="equal groups"):
        PageAllocator(9, 4, groups=2)
    one = PageAllocator(8, 4)
    assert one.grow("x", 8) == [0, 1] and one.pages_per_group == 8 and one.num_free_in(0) == 6


def test_conservation_catches_a_page_of_another_group():
    a = PageAllocator(8, 4, groups=2)
    a.grow("x", 4, group=0)
    a.check_conserved()
    stolen = a._free[1].popleft()  # hand a group-1 page to a group-0 sequence
    a._pages["x"].append(stolen)
    a._refcount[stolen] = 1
    with pytest.raises(AssertionError, match="another group"):
        a.check_conserved()


# --- the scheduler ------------------------------------------------------------------


def seq(name: str, n: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id=name, prompt_ids=list(range(1, n + 1)), sampling=SamplingParams(), max_tokens=max_tokens,
                    seed=0)


def make_scheduler(num_pages=16, page_size=4, num_slots=4, groups=2, max_prefill_batch=4, max_chunk=64):
    alloc = PageAllocator(num_pages, page_size, groups=groups)
    return Scheduler(alloc, num_slots=num_slots, max_prefill_batch=max_prefill_batch, prefill_lengths=(max_chunk,),
                     groups=groups)


def run_prefill(sched, plan):
    for c in plan.prefill:
        sched.prefill_done(c)


def check_groups(sched):
    """Every running sequence's pages lie in its slot's group; the books balance."""
    a = sched.allocator
    for slot, s in sched.running.items():
        g = sched.group_of_slot(slot)
        assert a.group_of(s.seq_id) == g
        assert {a.group_of_page(p) for p in a.pages(s.seq_id)} == {g}, (s.seq_id, a.pages(s.seq_id))
    a.check_conserved()


def test_admission_spreads_over_groups_by_free_pages():
    sched = make_scheduler(num_pages=16, page_size=4, num_slots=4)
    for i, n in enumerate([8, 4, 4, 4]):
        sched.add(seq(f"s{i}", n))
    plan = sched.schedule()
    # s0 (3 pages) -> group 0 (tie); s1 -> group 1 (8 free vs 5); s2 -> group 1 (6 vs 5);
    # s3 -> group 0 (5 vs 4).
    assert [(c.seq.seq_id, c.seq.slot) for c in plan.prefill] == [("s0", 0), ("s1", 2), ("s2", 3), ("s3", 1)]
    check_groups(sched)


def test_prefill_cap_is_per_group():
    sched = make_scheduler(num_pages=64, page_size=4, num_slots=8, max_prefill_batch=2, max_chunk=4)
    for i in range(6):
        sched.add(seq(f"s{i}", 10))
    plan = sched.schedule()
    assert len(plan.prefill) == 4  # 2 per group: the total is D times the cap
    assert sorted(sched.group_of_slot(c.seq.slot) for c in plan.prefill) == [0, 0, 1, 1]
    assert sched.num_waiting == 2
    run_prefill(sched, plan)
    plan = sched.schedule()  # 4 continue (chunks of 4 tokens): no room for the waiting
    assert [c.start for c in plan.prefill] == [4] * 4 and sched.num_waiting == 2
    check_groups(sched)
    run_prefill(sched, plan)
    sched.max_prefill_batch = 1  # continuing prompts are capped per group too, oldest first
    plan = sched.schedule()
    assert [(c.seq.seq_id, c.start) for c in plan.prefill] == [("s0", 8), ("s1", 8)]
    assert sorted(sched.group_of_slot(c.seq.slot) for c in plan.prefill) == [0, 1]


def test_admission_is_fcfs_and_stops_at_a_head_that_fits_no_group():
    sched = make_scheduler(num_pages=16, page_size=4, num_slots=4)  # 8 pages per group
    sched.add(seq("a", 20))  # 6 pages: group 0
    sched.add(seq("b", 20))  # 6 pages: group 1
    sched.add(seq("c", 12))  # 4 pages: fits neither group (2 free each), though 4 are free in all
    sched.add(seq("d", 4))  # would fit, but waits behind c
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.prefill] == ["a", "b"]
    assert [s.seq_id for s in sched.waiting] == ["c", "d"]
    assert sched.allocator.num_free == 4
    check_groups(sched)


def test_full_group_sends_the_head_to_the_other_group():
    sched = make_scheduler(num_pages=16, page_size=4, num_slots=4)
    sched.add(seq("a", 4))
    sched.add(seq("b", 4))
    sched.add(seq("c", 4))
    plan = sched.schedule()
    assert [c.seq.slot for c in plan.prefill] == [0, 2, 1]  # a: g0, b: g1, c: g0 (tie on free pages)
    run_prefill(sched, plan)
    sched.add(seq("d", 4))
    sched.add(seq("e", 4))
    plan = sched.schedule()  # group 0 has no slot left though it has pages: d goes to group 1
    assert [(c.seq.seq_id, c.seq.slot) for c in plan.prefill] == [("d", 3)]
    assert [s.seq_id for s in sched.waiting] == ["e"]
    check_groups(sched)


def test_preemption_stays_in_the_short_group():
    sched = make_scheduler(num_pages=12, page_size=4, num_slots=4)  # 6 pages per group, 2 slots
    a, b, c, d = seq("a", 4, 16), seq("b", 4, 16), seq("c", 4, 16), seq("d", 4, 16)
    for s in (a, b, c, d):
        sched.add(s)
    plan = sched.schedule()
    assert [s.slot for s in (a, b, c, d)] == [0, 2, 1, 3]  # a, c in group 0; b, d in group 1
    run_prefill(sched, plan)
    check_groups(sched)
    # Group 0's sequences grow to 3 pages each: group 0 is full, group 1 has 2 pages free.
    for s in (a, c):
        s.output_ids += [7] * 8
    plan = sched.schedule()
    assert plan.preempted == [] and sched.allocator.num_free_in(0) == 0 and sched.allocator.num_free_in(1) == 2
    check_groups(sched)
    # Now a and c each need a fourth page: group 0 is short. The newest decoding sequence
    # is d (group 1), but only group 0's newest, c, is preempted.
    for s in (a, c):
        s.output_ids += [7] * 4
    assert sched.schedule(can_preempt=False) is None
    assert sched.allocator.num_free_in(0) == 0 and sched.num_running == 4  # nothing changed
    plan = sched.schedule()
    assert plan.preempted == [c] and plan.released_slots == [1]
    assert [s.seq_id for s in sched.waiting] == ["c"] and c.status == Status.WAITING
    assert len(sched.allocator.pages("a")) == 4 and (b.slot, d.slot) == (2, 3)
    # c (16 tokens + 1: 5 pages) cannot come back yet: 2 pages free in each group.
    assert plan.prefill == [] and sched.allocator.num_free == 4
    check_groups(sched)
    for s in (a, b, d):
        sched.finish(s)
    plan = sched.schedule()
    assert [ch.seq for ch in plan.prefill] == [c] and c.slot == 0
    sched.finish(c)
    assert sched.allocator.num_free == 12
    sched.allocator.check_conserved()


def test_random_workload_keeps_groups_and_returns_every_page():
    rng = random.Random(0)
    for groups in (1, 2, 4):
        sched = make_scheduler(num_pages=8 * groups, page_size=4, num_slots=2 * groups, groups=groups,
                               max_prefill_batch=1, max_chunk=8)
        seqs = [seq(f"s{i}", rng.randint(1, 20), rng.randint(1, 12)) for i in range(40)]
        for s in seqs:
            sched.add(s)
        for _ in range(2000):
            if not sched.has_work():
                break
            plan = sched.schedule()
            per_group = [0] * groups
            for ch in plan.prefill:
                per_group[sched.group_of_slot(ch.seq.slot)] += 1
            assert max(per_group) <= 1
            run_prefill(sched, plan)
            check_groups(sched)
            for s in [s for s in sched.running.values() if s.status == Status.RUNNING]:
                s.output_ids.append(1)
                if len(s.output_ids) >= s.max_tokens or rng.random() < 0.05:
                    sched.finish(s)
        assert not sched.has_work()
        assert sched.allocator.num_free == sched.allocator.num_pages
        sched.allocator.check_conserved()
        if groups > 1:
            assert sched.num_preemptions > 0  # the pages are tight enough to exercise it


# --- the orchestrator over a fake engine --------------------------------------------

VOCAB = 1000


def next_token(tokens) -> int:
    """The fake model: the next token is a hash of the whole context."""
    h = 0
    for t in tokens:
        h = (h * 31 + int(t) + 7) % 1_000_003
    return 1 + h % (VOCAB - 1)


def reference(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class _Out(np.ndarray):
    def copy_to_host_async(self):
        pass


def _out(**arrays):
    return {k: np.asarray(v).view(_Out) for k, v in arrays.items()}


class FakeEngine:
    """The engine's host interface over a per-group paged token cache. It checks the data
    groups' contract: prefill rows [g*b, (g+1)*b) are group g's, every page a slot uses is
    in its group (read and written through the group's local page index)."""

    def __init__(self, ecfg: EngineConfig, num_pages: int, data_groups: int):
        self.ecfg, self.num_pages, self.data_groups = ecfg, num_pages, data_groups
        self.cfg = types.SimpleNamespace(vocab_size=VOCAB, eos_ids=())
        self.pages_per_group = num_pages // data_groups
        self.slots_per_group = ecfg.max_num_seqs // data_groups
        self.cache = [{} for _ in range(data_groups)]  # local page -> its tokens
        b = ecfg.max_num_seqs
        self.length, self.last, self.remaining = [0] * b, [0] * b, [0] * b
        self.prefill_calls: list[dict] = []

    def mixes(self, rows, num_prompts, chunk_len, fresh, mode="filter") -> bool:
        return False  # prefill and decode as two calls, as a data-parallel engine makes them

    def decode_choice(self, top, sampling):
        from runtime.sampling import sampling_mode

        return next(b for b in self.ecfg.decode_buckets if b >= top), sampling_mode(sampling)

    def prefill_shape(self, num_prompts, chunk_len, fresh=False):
        t = next(t for t in self.ecfg.prefill_lengths if t >= chunk_len)
        b = next(b for b in self.ecfg.prefill_batch_sizes if b >= num_prompts)
        return b, t

    def _page(self, group, row, pos):
        local = int(row[pos // self.ecfg.page_size]) - group * self.pages_per_group
        assert 0 <= local < self.pages_per_group, f"page {row[pos // self.ecfg.page_size]} is not group {group}'s"
        return self.cache[group].setdefault(local, [None] * self.ecfg.page_size)

    def _write(self, group, row, pos, token):
        self._page(group, row, pos)[pos % self.ecfg.page_size] = int(token)

    def _context(self, group, row, n):
        tokens = [self._page(group, row, p)[p % self.ecfg.page_size] for p in range(n)]
        assert None not in tokens
        return tokens

    def prefill(self, *, tokens, starts, lens, page_table, slot_ids, is_last, sampling, stop_ids, remaining):
        n = len(tokens)
        assert n % self.data_groups == 0
        b = n // self.data_groups
        assert b in self.ecfg.prefill_batch_sizes and tokens.shape[1] in self.ecfg.prefill_lengths
        assert all(len(v) == n for v in (starts, lens, page_table, slot_ids, is_last, stop_ids, remaining))
        assert all(len(v) == n for v in sampling.values())
        self.prefill_calls.append(dict(b=b, slot_ids=slot_ids.copy(), lens=lens.copy(), starts=starts.copy()))
        out = np.zeros(n, np.int32)
        for r in range(n):
            g, s = r // b, int(slot_ids[r])
            if lens[r] == 0:
                assert s == self.ecfg.max_num_seqs, "a padding row with a slot"
                continue
            assert s // self.slots_per_group == g, f"row {r} (group {g}) holds slot {s}"
            for k in range(lens[r]):
                self._write(g, page_table[r], starts[r] + k, tokens[r, k])
            if is_last[r]:
                n_ctx = int(starts[r] + lens[r])
                out[r] = next_token(self._context(g, page_table[r], n_ctx))
                self.length[s], self.last[s], self.remaining[s] = n_ctx, int(out[r]), int(remaining[r])
        z = np.zeros(n, np.float32)
        return _out(tokens=out, logprob=z, top_ids=np.zeros((n, 1), np.int32), top_logprobs=np.zeros((n, 1)))

    def decode(self, page_table, mode="filter"):
        assert mode in ("greedy", "sample", "filter"), mode
        steps, b = self.ecfg.decode_steps_per_call, self.ecfg.max_num_seqs
        assert page_table.shape == (b, self.ecfg.max_pages_per_seq)
        out, valid = np.zeros((steps, b), np.int32), np.zeros((steps, b), bool)
        for step in range(steps):
            for s in range(b):
                if self.length[s] == 0 or self.remaining[s] <= 0:
                    continue
                g = s // self.slots_per_group
                self._write(g, page_table[s], self.length[s], self.last[s])
                self.length[s] += 1
                self.last[s] = next_token(self._context(g, page_table[s], self.length[s]))
                self.remaining[s] -= 1
                out[step, s], valid[step, s] = self.last[s], True
        z = np.zeros((steps, b), np.float32)
        return _out(tokens=out, valid=valid, logprob=z, top_ids=np.zeros((steps, b, 1), np.int32),
                    top_logprobs=np.zeros((steps, b, 1)))

    def release(self, slot):
        if slot < self.ecfg.max_num_seqs:
            self.length[slot] = 0


def make_fake(groups, num_pages, **ecfg):
    ecfg = EngineConfig(**{**dict(max_num_seqs=4, max_model_len=64, page_size=4, prefill_lengths=(4, 8),
                                  prefill_batch_sizes=(1, 2), cache_dtype="float32"), **ecfg})
    return FakeEngine(ecfg, num_pages, groups)


def run_all(orc, requests, *, check=True):
    results = {r.request_id: [] for r in requests}
    for r in requests:
        orc.add_request(r)
    while orc.has_work():
        for out in orc.step():
            results[out.request_id] += out.token_ids
            assert out.finish_reason in (None, "length"), out
        if check:
            for slot, s in orc.scheduler.running.items():
                assert {orc.allocator.group_of_page(p) for p in orc.allocator.pages(s.seq_id)} == {
                    orc.scheduler.group_of_slot(slot)}
            orc.allocator.check_conserved()
    orc.allocator.check_conserved()
    assert orc.allocator.num_free == orc.allocator.num_pages, "pages leaked"
    return results


def test_orchestrator_lays_prefill_rows_out_by_group():
    engine = make_fake(2, 32)  # slots 0, 1 in group 0; 2, 3 in group 1
    orc = Orchestrator(engine, None)
    prompts = {"a": [5, 6, 7], "b": [8, 9], "c": [10, 11, 12, 13]}
    requests = [Request(k, p, SamplingParams(temperature=0.0), max_tokens=5, ignore_eos=True)
                for k, p in prompts.items()]
    results = run_all(orc, requests)
    first = engine.prefill_calls[0]
    # a -> group 0 (slot 0), b -> group 1 (slot 2), c -> group 0 (slot 1): group 0 has the
    # most chunks (2), so b = 2 rows per group and 4 rows in all; row 3 is padding.
    assert first["b"] == 2
    assert first["slot_ids"].tolist() == [0, 1, 2, 4]
    assert first["lens"].tolist() == [3, 4, 2, 0]
    assert results == {k: reference(p, 5) for k, p in prompts.items()}


def test_orchestrator_one_group_per_call_row_count():
    engine = make_fake(2, 32)
    orc = Orchestrator(engine, None)
    run_all(orc, [Request("a", [1, 2, 3], max_tokens=2, ignore_eos=True)])
    call = engine.prefill_calls[0]
    assert call["b"] == 1 and call["slot_ids"].tolist() == [0, 4] and call["lens"].tolist() == [3, 0]


@pytest.mark.parametrize("groups,num_pages,pipeline,overrides", [
    (1, 24, True, {}), (2, 24, True, {}), (2, 24, False, dict(decode_steps_per_call=2)),
    (4, 44, True, dict(max_num_seqs=8)), (2, 64, True, dict(decode_steps_per_call=3, prefill_batch_sizes=(1, 2, 4))),
    (2, 24, True, dict(max_num_batched_tokens=5, prefill_lengths=(2, 4, 8))),
])
def test_orchestrator_outputs_match_the_reference(groups, num_pages, pipeline, overrides):
    """Many requests through chunked prefill (cut smaller by a token budget), per-group
    admission and (with few pages) preemption: every token is what the model gives for
    that context alone."""
    engine = make_fake(groups, num_pages, **overrides)
    orc = Orchestrator(engine, None, pipeline=pipeline)
    assert orc.scheduler.prefill_lengths == engine.ecfg.prefill_lengths
    assert orc.scheduler.max_num_batched_tokens == engine.ecfg.max_num_batched_tokens
    rng = random.Random(groups * 100 + num_pages)
    requests = [Request(f"r{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))],
                        max_tokens=rng.randint(1, 24), ignore_eos=True) for i in range(16)]
    results = run_all(orc, requests)
    assert results == {r.request_id: reference(r.prompt_ids, r.max_tokens) for r in requests}
    for call in engine.prefill_calls:  # never more than the largest batch of one group in a call
        assert call["b"] <= max(engine.ecfg.prefill_batch_sizes)
    if num_pages < 64:
        assert orc.scheduler.num_preemptions > 0
    if groups > 1:  # some calls carried several groups' chunks
        assert any(len({s // orc.scheduler.slots_per_group for s, n in zip(c["slot_ids"], c["lens"]) if n}) > 1
                   for c in engine.prefill_calls)


def test_a_group_smaller_than_the_context_caps_max_tokens():
    engine = make_fake(4, 24)  # 6 pages of 4 tokens per group: 24 tokens, max_model_len 64
    orc = Orchestrator(engine, None)
    results = run_all(orc, [Request("a", [3] * 10, max_tokens=40, ignore_eos=True),
                            Request("b", [4] * 20, max_tokens=40, ignore_eos=True)])
    assert results == {"a": reference([3] * 10, 14), "b": reference([4] * 20, 4)}


def test_orchestrator_refuses_a_prompt_larger_than_a_group():
    orc = Orchestrator(make_fake(2, 8), None)  # 4 pages of 4 tokens per group
    orc.validate(Request("ok", list(range(1, 16))))  # 15 + 1 tokens: 4 pages
    with pytest.raises(RequestError, match="needs 5 KV pages; the cache has 4 per data group"):
        orc.validate(Request("big", list(range(1, 17))))
    one = Orchestrator(make_fake(1, 8), None)
    one.validate(Request("big", list(range(1, 17))))


@pytest.mark.parametrize("num_pages", [64, 24])  # 24: preemptions too
def test_prefix_caching_across_data_groups(num_pages):
    """Prefix caching with 2 data groups on the fake engine (whose tokens follow from the
    pages' contents, so a wrong shared page shows as a wrong token): prompts sharing one
    of 3 prefixes arrive in waves; later ones map pages of their own group only, and
    every token is what the model gives for that context alone."""
    engine = make_fake(2, num_pages, enable_prefix_caching=True)
    engine.cfg.to_json = lambda: "fake-model"  # the cache's namespace
    orc = Orchestrator(engine, None)
    shares = []
    real_share = orc.allocator.share
    orc.allocator.share = lambda seq_id, pages, **kw: shares.append((seq_id, pages, kw["group"])) or real_share(
        seq_id, pages, **kw)
    rng = random.Random(num_pages)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(10)] for _ in range(3)]
    for wave in range(3):
        requests = [Request(f"w{wave}-{i}", prefixes[i % 3] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))],
                            max_tokens=rng.randint(1, 12), ignore_eos=True) for i in range(6)]
        results = run_all(orc, requests)
        assert results == {r.request_id: reference(r.prompt_ids, r.max_tokens) for r in requests}
    assert shares and all(orc.allocator.group_of_page(p) == g for _, pages, g in shares for p in pages)

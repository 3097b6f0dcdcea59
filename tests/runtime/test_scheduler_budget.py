"""The per-step token budget (`max_num_batched_tokens`, runtime.scheduler policy 4), pure
Python over the scheduler: while sequences decode, a group's prefill chunks hold at most
max(budget - its decode tokens, smallest prefill length) tokens, cut at a prefill length;
with nothing decoding, prefill runs at full chunk as without a budget."""

from __future__ import annotations

import random

import pytest

from runtime.config import ConfigError, EngineConfig
from runtime.page_allocator import PageAllocator
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler, Sequence, Status

LENGTHS = (16, 32, 64, 128)


def seq(name: str, n: int, max_tokens: int = 100) -> Sequence:
    return Sequence(seq_id=name, prompt_ids=list(range(1, n + 1)), sampling=SamplingParams(), max_tokens=max_tokens,
                    seed=0)


def make_scheduler(budget: int | None = 64, *, num_pages=256, page_size=16, num_slots=8, groups=1,
                   max_prefill_batch=4, prefill_lengths=LENGTHS, decode_steps=1, weight=1) -> Scheduler:
    """The budget's arithmetic is tested with each decode token counting once (`weight`);
    test_decode_tokens_count_twice_by_default covers the default weight."""
    return Scheduler(PageAllocator(num_pages, page_size, groups=groups), num_slots=num_slots,
                     max_prefill_batch=max_prefill_batch, prefill_lengths=prefill_lengths,
                     max_num_batched_tokens=budget, decode_steps=decode_steps, groups=groups,
                     decode_token_weight=weight)


def step(sched: Scheduler) -> list[tuple[str, int, int]]:
    """One step as the orchestrator runs it: the plan's chunks run, then every RUNNING
    sequence decodes `decode_steps` tokens. Returns the chunks as (seq_id, start, length)."""
    plan = sched.schedule()
    decoding = [s for s in sched.running.values() if s.status == Status.RUNNING]
    for c in plan.prefill:
        sched.prefill_done(c)
    for s in decoding:
        s.output_ids += [1] * sched.decode_steps
    return [(c.seq.seq_id, c.start, c.length) for c in plan.prefill]


def start_decoding(sched: Scheduler, n: int, prompt_len: int = 4) -> list[Sequence]:
    """n sequences admitted and prefilled in one step (nothing decodes yet): RUNNING after it."""
    seqs = [seq(f"d{i}", prompt_len) for i in range(n)]
    for s in seqs:
        sched.add(s)
    assert step(sched) == [(s.seq_id, 0, prompt_len) for s in seqs]
    assert all(s.status == Status.RUNNING for s in seqs)
    return seqs


def test_a_long_prompt_beside_decoding_streams_takes_the_largest_length_in_the_budget():
    sched = make_scheduler(64)
    start_decoding(sched, 3)
    long = seq("long", 300)
    sched.add(long)
    lengths = []
    while long.status != Status.RUNNING:
        chunks = step(sched)
        assert [c[0] for c in chunks] == ["long"]
        assert chunks[0][1] == sum(lengths)  # chunks follow one another
        lengths.append(chunks[0][2])
    # 64 - 3 decode tokens leave 61: chunks of 32 (the largest length <= 61) until the
    # rest of the prompt fits, which is the last chunk (300 - 8 * 32 = 44 <= 61).
    assert lengths == [32] * 8 + [44]


@pytest.mark.parametrize("decoding, chunk", [(1, 512), (16, 512), (17, 256), (32, 256), (64, 256), (300, 32)])
def test_decode_tokens_count_twice_by_default(decoding, chunk):
    """The engine's default budget (544) with the default weight (2): a 512-token chunk
    beside up to 16 decoding sequences, 256 from 17 to 144, the smallest length beyond."""
    from runtime.scheduler import DECODE_TOKEN_WEIGHT

    assert DECODE_TOKEN_WEIGHT == 2
    lengths = EngineConfig(max_model_len=4096).prefill_lengths
    sched = Scheduler(PageAllocator(8192, 16), num_slots=512, max_prefill_batch=512, prefill_lengths=lengths,
                      max_num_batched_tokens=EngineConfig().max_num_batched_tokens)
    start_decoding(sched, decoding)
    sched.add(seq("long", 1000))
    assert step(sched) == [("long", 0, chunk)]


def test_nothing_decoding_prefills_at_full_chunk_whatever_the_budget():
    plans = {}
    for budget in (None, 16, 64):
        sched = make_scheduler(budget, max_prefill_batch=2)
        for name, n in (("a", 300), ("b", 200), ("c", 40)):
            sched.add(seq(name, n))
        steps = []
        while not any(s.status == Status.RUNNING for s in sched.running.values()):
            steps.append(step(sched))
        plans[budget] = steps
    # Two prompts per call at the largest length (256 tokens a step, beyond either budget)
    # until the first completes; c is admitted when a prefill row frees up.
    assert plans[None] == [[("a", 0, 128), ("b", 0, 128)], [("a", 128, 128), ("b", 128, 72)]]
    assert plans[16] == plans[64] == plans[None]


@pytest.mark.parametrize("budget, decode_steps", [(2, 1), (8, 4), (1, 1)])
def test_a_budget_below_the_decode_tokens_still_prefills_the_smallest_length(budget, decode_steps):
    sched = make_scheduler(budget, decode_steps=decode_steps)
    start_decoding(sched, 3)  # 3 or 12 decode tokens a step: more than the budget
    a, b = seq("a", 40), seq("b", 20)
    sched.add(a)
    sched.add(b)
    steps = []
    while a.status != Status.RUNNING:
        steps.append(step(sched))
    # One chunk of the smallest length a step (the floor), then the rest. b waits: a takes
    # the whole floor, and the 8 tokens its rest leaves hold no chunk of b (20 > 8 < 16).
    assert steps == [[("a", 0, 16)], [("a", 16, 16)], [("a", 32, 8)]]
    assert b.status == Status.WAITING
    assert step(sched) == [("b", 0, 16)]


def test_prompts_admitted_together_share_the_budget():
    sched = make_scheduler(64)
    start_decoding(sched, 3)
    for name, n in (("a", 40), ("b", 100), ("c", 20)):
        sched.add(seq(name, n))
    # 61 tokens: a's whole prompt (40), then 21 left: b's first chunk is 16 (the largest
    # length <= 21), and the 5 left hold no chunk of c, which waits.
    assert step(sched) == [("a", 0, 40), ("b", 0, 16)]
    assert [s.seq_id for s in sched.waiting] == ["c"]
    # a decodes too now (4 decode tokens, 60 left): b continues first with 32 (28 left),
    # then c is admitted with its whole prompt (20 <= 28).
    assert step(sched) == [("b", 16, 32), ("c", 0, 20)]
    # c decodes too (5 decode tokens, 59 left): b's rest (52) fits.
    assert step(sched) == [("b", 48, 52)]
    assert all(s.status == Status.RUNNING for s in sched.running.values())


def test_a_continuing_prompt_gets_no_chunk_beyond_the_budget():
    sched = make_scheduler(36)
    start_decoding(sched, 4)
    a, b = seq("a", 100), seq("b", 100)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 0, 32)]  # 32 of 32: b is not admitted
    sched.max_num_batched_tokens = 52  # 48 left beside the 4 decoding: a 32, b 16
    assert step(sched) == [("a", 32, 32), ("b", 0, 16)]
    sched.max_num_batched_tokens = 36  # 32 left: a, the oldest, takes them all; b waits a step
    assert step(sched) == [("a", 64, 32)]
    assert b.status == Status.PREFILLING and b.num_cached == 16


def test_budgets_are_per_group():
    # 2 groups of 4 slots; d0 and d2 go to group 0, d1 to group 1 (most free pages, ties low).
    sched = make_scheduler(17, num_pages=128, page_size=4, num_slots=8, groups=2, prefill_lengths=(4, 8, 16))
    decoding = start_decoding(sched, 3)
    assert [sched.group_of_slot(s.slot) for s in decoding] == [0, 1, 0]
    p, q, r = seq("p", 60), seq("q", 60), seq("r", 60)
    for s in (p, q, r):
        sched.add(s)
    chunks = step(sched)
    assert [sched.group_of_slot(s.slot) for s in (p, q, r)] == [1, 0, 0]
    # Group 1 (1 decoding): 16 tokens, p takes them. Group 0 (2 decoding): 15 tokens, q
    # takes 8 and r 4 (the largest length <= 7); r went to group 0 though group 1 had more
    # free pages (46 to 44): group 1 had no budget left.
    assert chunks == [("p", 0, 16), ("q", 0, 8), ("r", 0, 4)]


def test_with_one_group_decoding_every_group_is_budgeted():
    """A call's length is shared by every group's rows: while one group decodes, the others'
    chunks stay within the budget too (theirs, without decode tokens)."""
    sched = make_scheduler(20, num_pages=128, page_size=4, num_slots=4, groups=2, prefill_lengths=(4, 8, 16, 32))
    d = seq("d", 4)
    sched.add(d)
    step(sched)
    assert d.status == Status.RUNNING and sched.group_of_slot(d.slot) == 0
    p = seq("p", 60)
    sched.add(p)
    assert step(sched) == [("p", 0, 16)] and sched.group_of_slot(p.slot) == 1  # 20, not 32


def test_random_workload_respects_the_budget_and_finishes():
    rng = random.Random(0)
    for groups, budget, decode_steps in ((1, 40, 1), (2, 24, 2), (2, 5, 1)):
        sched = make_scheduler(budget, num_pages=32 * groups, page_size=4, num_slots=3 * groups, groups=groups,
                               max_prefill_batch=2, prefill_lengths=(4, 8, 16), decode_steps=decode_steps)
        seqs = [seq(f"s{i}", rng.randint(1, 50), rng.randint(1, 12)) for i in range(40)]
        for s in seqs:
            sched.add(s)
        for _ in range(3000):
            if not sched.has_work():
                break
            plan = sched.schedule()
            decoding = [s for s in sched.running.values() if s.status == Status.RUNNING]
            prefill = [0] * groups
            for c in plan.prefill:
                rest = len(c.seq.tokens_to_prefill) - c.start
                assert c.length == min(rest, 16) or c.length in sched.prefill_lengths, c
                prefill[sched.group_of_slot(c.seq.slot)] += c.length
            if decoding:
                for g in range(groups):
                    tokens = decode_steps * sum(sched.group_of_slot(s.slot) == g for s in decoding)
                    assert prefill[g] <= max(budget - tokens, 4), (g, prefill[g], tokens)
            for c in plan.prefill:
                sched.prefill_done(c)
            for s in decoding:
                s.output_ids += [1] * decode_steps
                if len(s.output_ids) >= s.max_tokens:
                    sched.finish(s)
        assert not sched.has_work() and all(s.status == Status.FINISHED for s in seqs)
        assert sched.allocator.num_free == sched.allocator.num_pages
        sched.allocator.check_conserved()


def test_prefill_lengths_are_sorted_and_required():
    alloc = PageAllocator(8, 4)
    sched = Scheduler(alloc, num_slots=2, max_prefill_batch=1, prefill_lengths=[32, 8, 16])
    assert sched.prefill_lengths == (8, 16, 32) and sched.max_chunk == 32 and sched.max_num_batched_tokens is None
    for lengths in ((), (0, 8)):
        with pytest.raises(ValueError, match="must be given and positive"):
            Scheduler(alloc, num_slots=2, max_prefill_batch=1, prefill_lengths=lengths)


def test_the_engine_budget_is_at_least_one_token():
    assert EngineConfig().max_num_batched_tokens == 544
    assert EngineConfig(max_num_batched_tokens=1).max_num_batched_tokens == 1  # the floor still prefills
    with pytest.raises(ConfigError, match="max_num_batched_tokens=0 must be at least 1"):
        EngineConfig(max_num_batched_tokens=0)

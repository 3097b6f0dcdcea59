"""Continuous batching, host only: which prompts prefill, who decodes, who is preempted.

Pure Python over plain data (imports no jax): `schedule()` returns a `Plan` and the
orchestrator carries it out on the engine. Policy, per step:
  1. Decoding sequences get pages for the tokens this step writes; if
     pages run out, the newest running sequence is preempted (pages freed, its tokens so
     far become its prompt, it waits at the head of the queue and is recomputed later).
  2. Sequences mid-prefill continue with their next chunk.
  3. Waiting sequences are admitted first come, first served while a decode slot, the
     pages for their whole prompt (plus the first decode token), a prefill row and
     prefill budget (4) are free.
  4. While sequences decode, the token budget (`max_num_batched_tokens`) bounds the
     step's prefill, so a long prompt is spread over steps instead of stalling every
     stream's next token behind one long prefill call. A group's chunks hold at most
     max(budget - its decode tokens, smallest prefill length) tokens, its decode tokens
     being its RUNNING sequences (after 1) times `decode_steps` times
     `decode_token_weight` (DECODE_TOKEN_WEIGHT: a decode row costs a step more than a
     prefill token); the floor lets the oldest prompt progress however many decode. A
     chunk is the rest of the prompt (up to the largest length) where that fits what is
     left of the group's budget, else the largest prefill length that does (calls are
     compiled per length: a chunk cut anywhere else pads up to a longer one); where none fits, the sequence gets no chunk this step (at
     the head of the queue, admission stops: FCFS). While nothing decodes (no RUNNING
     sequence in any group), there is no budget: chunks up to the largest prefill length,
     `max_prefill_batch` of them per group.
After the prefill call, every sequence in RUNNING status decodes (the engine decodes
every active slot), including those whose prompt completed in this step's prefill.

Prefix caching (the allocator's `prefix_caching`): an admitted sequence first maps the
longest cached chain of its tokens' full pages (same salt; at most up to its last token,
which must run to give the first output's logits), and prefills only the rest: its first
chunk starts after them. Full pages join the cache once the host has read back the
calls that wrote them (`confirm`: a failed call's pages never do), and a finished or
preempted sequence's confirmed pages, generated tokens' included, stay cached. A
sequence with a repetition penalty prefills whole (its prompt mask is built from the
chunks it runs). Among data groups, admission prefers the one holding the longest
cached prefix.

Data parallelism (`groups` = D > 1): slots and pages are split into D equal groups
(slot s is in group s // (num_slots / D), pages as in `PageAllocator`), and a sequence's
pages all lie in its slot's group. Shortage is per group: a short group preempts its own
newest decoding sequence, never another group's. `max_prefill_batch` caps the chunks of
one group in a call (a call holds up to D times that), and the token budget is per group
(a group's own decode tokens count against it); while any group decodes, every group's
budget holds, since the call's length bucket is shared by all of its rows. Admission
stays FCFS: the head of the queue goes to the group, among those with a free slot, a free
prefill row, budget for a chunk and pages for its reservation, with the most free pages
(ties: the lowest); if none, admission stops.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import math
from collections.abc import Iterable

from runtime.page_allocator import PageAllocator
from runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's token state. Mutated only by the scheduler and the orchestrator loop."""

    seq_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    seed: int  # the request's seed (given, or drawn at arrival): its tokens depend on nothing else
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0  # tokens of `tokens_to_prefill` already in the cache
    num_inflight: int = 0  # tokens dispatched to the device that the host has not read yet
    num_preemptions: int = 0
    arrival_order: int = 0
    cache_salt: str = ""  # prefix caching: sequences of different salts never share pages
    num_prefix_cached: int = 0  # tokens its last admission found in the prefix cache
    num_kv_confirmed: int = 0  # leading tokens whose KV calls the host has read back (`confirm`)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_cap(self, n: int) -> int:
        """A sequence never holds more than prompt + max_tokens tokens: pages beyond are waste."""
        return min(n, len(self.prompt_ids) + self.max_tokens)

    @property
    def tokens_to_prefill(self) -> list[int]:
        """Prompt plus, after a preemption, the tokens generated before it."""
        return self.prompt_ids + self.output_ids


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first token of the chunk (tokens before it are cached)
    length: int  # tokens in the chunk
    is_last: bool  # the chunk that completes the prompt: its slot starts decoding


@dataclasses.dataclass(frozen=True)
class Plan:
    prefill: list[PrefillChunk]  # run together in one prefill call
    preempted: list[Sequence]  # lost their slot and pages this step (recomputed later)
    released_slots: list[int]  # the slots they held: the engine must mark them idle


# Budget tokens one decode token counts for (policy 4). A decode row reads its whole
# context's KV where a prefill token shares its chunk's reads, and a step beside a chunk
# costs what the chunk adds: on an H200 (Llama-3.1-8B, 2026-11-30, runtime/BENCHMARKS.md)
# 32 streams beside 4096-token prompts at 2 req/s had ITL p99 3.15x the median with the
# 512-token chunks that budget 544 left them counting each row once, 2.27x with 256-token
# chunks. Counted twice, a budget of 544 keeps a 512-token chunk beside up to 16 decoding
# sequences (an idle-ish server's one-step prefill) and gives 256 from 17 on.
DECODE_TOKEN_WEIGHT = 2


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        *,
        num_slots: int,
        max_prefill_batch: int,
        prefill_lengths: Iterable[int],
        max_num_batched_tokens: int | None = None,
        decode_steps: int = 1,
        groups: int = 1,
        decode_token_weight: int | None = None,
    ):
        """`prefill_lengths`: the prefill length buckets (chunks are cut at them).
        `max_num_batched_tokens`: the per-step token budget; None: none.
        `decode_token_weight`: budget tokens a decode token counts for (default
        DECODE_TOKEN_WEIGHT)."""
        lengths = tuple(sorted(set(prefill_lengths)))
        if not lengths or lengths[0] <= 0:
            raise ValueError(f"prefill lengths {lengths} must be given and positive")
        if groups <= 0 or num_slots % groups:
            raise ValueError(f"num_slots={num_slots} must split into groups={groups} equal groups")
        if allocator.groups != groups:
            raise ValueError(f"the allocator has {allocator.groups} page groups; the scheduler {groups}")
        self.allocator = allocator
        self.num_slots = num_slots
        self.groups = groups
        self.slots_per_group = num_slots // groups
        self.max_prefill_batch = max_prefill_batch
        self.prefill_lengths = lengths
        self.max_num_batched_tokens = max_num_batched_tokens
        self.decode_steps = decode_steps
        self.decode_token_weight = DECODE_TOKEN_WEIGHT if decode_token_weight is None else decode_token_weight
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence (prefilling or decoding)
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # --- bookkeeping ---------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrival_order = next(self._arrivals)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, *, cache: bool = True) -> None:
        """Frees the sequence's slot and pages at once (or drops it from the queue); with
        prefix caching its confirmed full pages stay cached unless `cache` is False (a
        request that failed: its last calls may not have written their pages)."""
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            del self.running[seq.slot]
            if cache:  # prefix caching: its confirmed full pages stay findable
                self._register(seq)
            self.allocator.free(seq.seq_id)
        seq.slot = None
        seq.status = Status.FINISHED

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def group_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_group

    @property
    def max_chunk(self) -> int:
        return self.prefill_lengths[-1]

    # --- the plan ------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        assert seq.num_inflight == 0, "preempting a sequence whose tokens are still in flight"
        del self.running[seq.slot]
        self._register(seq)  # found again at its re-admission, unless reclaimed meanwhile
        self.allocator.free(seq.seq_id)
        seq.slot = None
        seq.num_cached = seq.num_kv_confirmed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self, *, can_preempt: bool = True) -> Plan | None:
        """The next step's plan; None when pages are short and `can_preempt` is False
        (the caller first reads every token in flight, then asks again)."""
        preempted: list[Sequence] = []
        released: list[int] = []
        # 1. Pages for decoding sequences; while a group's do not fit, preempt its newest.
        decoding = sorted(
            (s for s in self.running.values() if s.status == Status.RUNNING), key=lambda s: s.arrival_order
        )
        while True:
            need = {s: s.token_cap(s.num_tokens + s.num_inflight - 1 + self.decode_steps) for s in decoding}
            short = [0] * self.groups
            for s, n in need.items():
                short[self.group_of_slot(s.slot)] += max(
                    0, self.allocator.pages_for(n) - len(self.allocator.pages(s.seq_id))
                )
            short_groups = {g for g in range(self.groups) if short[g] > self.allocator.num_free_in(g)}
            if not short_groups:
                for s, n in need.items():
                    self.allocator.grow(s.seq_id, n)
                break
            if not can_preempt:
                return None
            # The newest decoding sequence of a short group (a short group has one).
            victim = next(s for s in reversed(decoding) if self.group_of_slot(s.slot) in short_groups)
            decoding.remove(victim)
            released.append(victim.slot)
            self._preempt(victim)
            preempted.append(victim)
        # 2. Continue prompts mid-prefill, oldest first, up to the cap and the budget per group.
        chunks: list[PrefillChunk] = []
        rows = [0] * self.groups  # prefill chunks of each group in this call
        budget = self._prefill_budgets(decoding)  # prefill tokens each group may still take
        prefilling = sorted(
            (s for s in self.running.values() if s.status == Status.PREFILLING), key=lambda s: s.arrival_order
        )
        for seq in prefilling:
            g = self.group_of_slot(seq.slot)
            length = self._chunk_length(seq, budget[g])
            if rows[g] < self.max_prefill_batch and length:
                rows[g] += 1
                budget[g] -= length
                chunks.append(self._chunk(seq, length))
        # 3. Admit waiting sequences, first come first served, while some group has a
        #    slot, a prefill row, the pages and budget for a chunk free.
        free_slots = [[] for _ in range(self.groups)]
        for i in range(self.num_slots):
            if i not in self.running:
                free_slots[self.group_of_slot(i)].append(i)
        while self.waiting:
            seq = self.waiting[0]
            # Pages for the whole prompt and the first decode token, reserved up front so
            # a prompt never stalls half-prefilled for lack of pages.
            reserve = seq.token_cap(len(seq.tokens_to_prefill) + self.decode_steps)
            fits = []  # (group, its cached pages of this sequence)
            for g in range(self.groups):
                if not free_slots[g] or rows[g] >= self.max_prefill_batch:
                    continue
                cached = self._cached_prefix(seq, g)
                start = len(cached) * self.allocator.page_size
                if self._chunk_length(seq, budget[g], start) and self.allocator.can_share_and_grow(
                        seq.seq_id, cached, reserve, g):
                    fits.append((g, cached))
            if not fits:
                break
            g, cached = max(fits, key=lambda f: (len(f[1]), self.allocator.num_free_in(f[0]), -f[0]))
            self.waiting.popleft()
            if cached:
                self.allocator.share(seq.seq_id, cached, group=g)
            self.allocator.grow(seq.seq_id, reserve, group=g)
            seq.num_cached = seq.num_prefix_cached = seq.num_kv_confirmed = len(cached) * self.allocator.page_size
            seq.slot = free_slots[g].pop(0)
            seq.status = Status.PREFILLING
            self.running[seq.slot] = seq
            rows[g] += 1
            length = self._chunk_length(seq, budget[g])
            budget[g] -= length
            chunks.append(self._chunk(seq, length))
        return Plan(prefill=chunks, preempted=preempted, released_slots=released)

    def _prefill_budgets(self, decoding: list[Sequence]) -> list[float]:
        """Prefill tokens each group may take this step (policy 4): unbounded while nothing
        decodes, else the budget less the group's decode tokens, at least the smallest length."""
        if self.max_num_batched_tokens is None or not decoding:
            return [math.inf] * self.groups
        decode_tokens = [0] * self.groups
        for seq in decoding:
            decode_tokens[self.group_of_slot(seq.slot)] += self.decode_steps * self.decode_token_weight
        return [max(self.max_num_batched_tokens - n, self.prefill_lengths[0]) for n in decode_tokens]

    def _cached_prefix(self, seq: Sequence, group: int) -> list[int]:
        """The cached pages the sequence would map in `group` (the orchestrator gives a
        repetition penalty's prompt mask the cached tokens: Engine.seed_prompt_mask)."""
        if not self.allocator.prefix_caching:
            return []
        tokens = seq.tokens_to_prefill
        return self.allocator.lookup(tokens, salt=seq.cache_salt, group=group,
                                     max_pages=(len(tokens) - 1) // self.allocator.page_size)

    def _chunk_length(self, seq: Sequence, budget: float, start: int | None = None) -> int:
        """Tokens of the sequence's next chunk (from `start`, default its cached tokens)
        within `budget`: the rest of its prompt (at most the largest length) if it fits,
        else the largest length that fits; 0 if none."""
        start = seq.num_cached if start is None else start
        rest = min(self.max_chunk, len(seq.tokens_to_prefill) - start)
        if rest <= budget:
            return rest
        return max((n for n in self.prefill_lengths if n <= budget), default=0)

    def _chunk(self, seq: Sequence, length: int) -> PrefillChunk:
        start = seq.num_cached
        return PrefillChunk(seq=seq, start=start, length=length, is_last=start + length == len(seq.tokens_to_prefill))

    def confirm(self, seq: Sequence, num_tokens: int) -> None:
        """The host read back the calls that wrote the KV of the sequence's first
        `num_tokens` tokens: their full pages join the prefix cache."""
        if num_tokens <= seq.num_kv_confirmed or seq.slot is None:
            return
        S = self.allocator.page_size
        full_before, seq.num_kv_confirmed = seq.num_kv_confirmed // S, num_tokens
        if num_tokens // S > full_before:  # a page filled: per page, not per token
            self._register(seq)

    def _register(self, seq: Sequence) -> None:
        if self.allocator.prefix_caching:
            self.allocator.register(seq.seq_id, seq.tokens_to_prefill[:seq.num_kv_confirmed], salt=seq.cache_salt)

    def prefill_done(self, chunk: PrefillChunk) -> None:
        """Records that a chunk ran; after the last one the sequence decodes."""
        seq = chunk.seq
        seq.num_cached = chunk.start + chunk.length
        if chunk.is_last:
            seq.status = Status.RUNNING

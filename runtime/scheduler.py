"""Continuous batching, host only: which prompts prefill, who decodes, who is preempted.

Pure Python over plain data (imports no jax): `schedule()` returns a `Plan` and the
orchestrator carries it out on the engine. Policy, per step:
  1. Decoding sequences get pages for the tokens this step writes; if
     pages run out, the newest running sequence is preempted (pages freed, its tokens so
     far become its prompt, it waits at the head of the queue and is recomputed later).
  2. Sequences mid-prefill continue with their next chunk.
  3. Waiting sequences are admitted first come, first served while a decode slot, the
     pages for their whole prompt (plus the first decode token) and a prefill row are free.
After the prefill call, every sequence in RUNNING status decodes (the engine decodes
every active slot), including those whose prompt completed in this step's prefill.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools

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


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        *,
        num_slots: int,
        max_prefill_batch: int,
        max_chunk: int,
        decode_steps: int = 1,
    ):
        self.allocator = allocator
        self.num_slots = num_slots
        self.max_prefill_batch = max_prefill_batch
        self.max_chunk = max_chunk
        self.decode_steps = decode_steps
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence (prefilling or decoding)
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # --- bookkeeping ---------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrival_order = next(self._arrivals)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Frees the sequence's slot and pages at once (or drops it from the queue)."""
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.slot is not None:
            del self.running[seq.slot]
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

    # --- the plan ------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        assert seq.num_inflight == 0, "preempting a sequence whose tokens are still in flight"
        del self.running[seq.slot]
        self.allocator.free(seq.seq_id)
        seq.slot = None
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self, *, can_preempt: bool = True) -> Plan | None:
        """The next step's plan; None when pages are short and `can_preempt` is False
        (the caller first reads every token in flight, then asks again)."""
        preempted: list[Sequence] = []
        released: list[int] = []
        # 1. Pages for decoding sequences; preempt the newest while they do not fit.
        decoding = sorted(
            (s for s in self.running.values() if s.status == Status.RUNNING), key=lambda s: s.arrival_order
        )
        while decoding:
            need = {s: s.token_cap(s.num_tokens + s.num_inflight - 1 + self.decode_steps) for s in decoding}
            short = sum(
                max(0, self.allocator.pages_for(n) - len(self.allocator.pages(s.seq_id))) for s, n in need.items()
            )
            if short <= self.allocator.num_free:
                for s, n in need.items():
                    self.allocator.grow(s.seq_id, n)
                break
            if not can_preempt:
                return None
            victim = decoding.pop()
            released.append(victim.slot)
            self._preempt(victim)
            preempted.append(victim)
        # 2. Continue prompts mid-prefill, oldest first.
        chunks: list[PrefillChunk] = []
        prefilling = sorted(
            (s for s in self.running.values() if s.status == Status.PREFILLING), key=lambda s: s.arrival_order
        )
        for seq in prefilling[: self.max_prefill_batch]:
            chunks.append(self._next_chunk(seq))
        # 3. Admit waiting sequences while a slot, pages and a prefill row are free.
        free_slots = [i for i in range(self.num_slots) if i not in self.running]
        while self.waiting and free_slots and len(chunks) < self.max_prefill_batch:
            seq = self.waiting[0]
            # Pages for the whole prompt and the first decode token, reserved up front so
            # a prompt never stalls half-prefilled for lack of pages.
            reserve = seq.token_cap(len(seq.tokens_to_prefill) + self.decode_steps)
            if not self.allocator.can_grow(seq.seq_id, reserve):
                break
            self.waiting.popleft()
            self.allocator.grow(seq.seq_id, reserve)
            seq.slot = free_slots.pop(0)
            seq.status = Status.PREFILLING
            self.running[seq.slot] = seq
            chunks.append(self._next_chunk(seq))
        return Plan(prefill=chunks, preempted=preempted, released_slots=released)

    def _next_chunk(self, seq: Sequence) -> PrefillChunk:
        total = len(seq.tokens_to_prefill)
        length = min(self.max_chunk, total - seq.num_cached)
        return PrefillChunk(seq=seq, start=seq.num_cached, length=length, is_last=seq.num_cached + length == total)

    def prefill_done(self, chunk: PrefillChunk) -> None:
        """Records that a chunk ran; after the last one the sequence decodes."""
        seq = chunk.seq
        seq.num_cached = chunk.start + chunk.length
        if chunk.is_last:
            seq.status = Status.RUNNING

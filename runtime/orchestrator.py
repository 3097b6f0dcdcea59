"""The loop that owns the engine and the scheduler; used by generate and serve.

`Orchestrator.step()` runs one iteration: ask the scheduler for a plan, release the
slots of preempted sequences, run one prefill call (if the plan has chunks) and one
decode call (if any slot is decoding), then turn the sampled ids (one device-to-host
copy per call) into per-request outputs: token ids, text deltas, logprobs and, at the
end, a finish reason. Where the engine compiled it (Engine.mixes), a step with both
runs them as one mixed call: the sequences that were decoding and the chunks share one
forward pass, and a prompt completed in it decodes from the next step. Only this loop touches the engine; front ends talk to it through
`add_request` / `abort` and the outputs `step()` returns (the server wraps this in a
thread with queues).

Faults stay with the requests they belong to. Turning one request's tokens into output
(detokenizing, stop strings) that raises ends that request alone with an error output;
a compiled call that raises (at dispatch or when its results are read) ends the requests
in that call, and the step goes on for the others. `consecutive_call_failures` tells the
owner when the engine itself looks broken (its donated state may be gone).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from jax.profiler import TraceAnnotation

from runtime.detokenize import IncrementalDetokenizer
from runtime.engine import MAX_STOP_IDS, Engine, compile_counter
from runtime.page_allocator import PageAllocator
from runtime.sampling import SamplingParams, SlotSampling
from runtime.scheduler import PrefillChunk, Scheduler, Sequence, Status
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot run as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    cache_salt: str = ""  # prefix caching: requests of different salts never share KV pages


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]  # new this step
    text: str  # new text this step
    logprobs: list[float]  # the chosen tokens' logprobs, one per new token
    top_logprobs: list[list[tuple[int, float]]]  # per new token, when the request asked
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not recomputed
    error: str | None = None  # with finish_reason "error": what failed (this request alone)


@dataclasses.dataclass(eq=False)
class _Track:
    """Per-request host state beside the scheduler's Sequence."""

    request: Request
    seq: Sequence
    detok: IncrementalDetokenizer | None  # None without a tokenizer: token ids only
    stop_ids: frozenset[int]
    text: str = ""  # all text so far
    emitted: int = 0  # characters of `text` already returned
    pending: RequestOutput | None = None


@dataclasses.dataclass
class _InFlight:
    """Calls dispatched in one step whose results the host has not read yet."""

    prefill: list[PrefillChunk] = dataclasses.field(default_factory=list)
    prefill_rows: list[int] = dataclasses.field(default_factory=list)  # each chunk's row in the call
    prefill_out: dict | None = None
    decoding: list[Sequence] = dataclasses.field(default_factory=list)
    decode_out: dict | None = None


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one step dispatched (`Orchestrator.last_step`): for metrics and the step log."""

    kind: str  # "mixed", "prefill", "decode", "prefill+decode" or "idle" (nothing dispatched)
    decode_seqs: int = 0  # sequences decoded
    decode_rows: int = 0  # slots the decode call ran (its bucket)
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # tokens of the chunks (before padding to a length)
    waiting: int = 0  # sequences still waiting for a slot after this step
    # Where the step's host time went (ms): scheduling; dispatching this step's calls
    # (enqueueing them; a command buffer re-recorded or a program loaded shows here);
    # waiting for the previous step's results (the device still running it, then the
    # device-to-host copy); turning those results into outputs.
    schedule_ms: float = 0.0
    dispatch_ms: float = 0.0
    wait_ms: float = 0.0
    process_ms: float = 0.0


def _to_host(out: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in out.items()}


def _start_copy(out: dict) -> None:
    """Starts the device-to-host copies now, so reading them later does not wait twice."""
    for v in out.values():
        v.copy_to_host_async()


class Orchestrator:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, *, pipeline: bool = True):
        self.engine = engine
        self.tokenizer = tokenizer
        ecfg = engine.ecfg
        # Data parallelism: slots, pages and prefill rows split into this many groups.
        self.data_groups = getattr(engine, "data_groups", 1)
        # Prefix-cache digests also cover what else shapes the KV: the model and cache dtype.
        namespace = f"{engine.cfg.to_json()}|{ecfg.cache_dtype}" if ecfg.enable_prefix_caching else ""
        self.allocator = PageAllocator(engine.num_pages, ecfg.page_size, groups=self.data_groups,
                                       prefix_caching=ecfg.enable_prefix_caching, namespace=namespace)
        self.scheduler = Scheduler(
            self.allocator,
            num_slots=ecfg.max_num_seqs,
            max_prefill_batch=max(ecfg.prefill_batch_sizes),  # per data group
            prefill_lengths=ecfg.prefill_lengths,
            max_num_batched_tokens=ecfg.max_num_batched_tokens,
            decode_steps=ecfg.decode_steps_per_call,
            groups=self.data_groups,
        )
        self._tracks: dict[str, _Track] = {}
        self.pipeline = pipeline
        self._inflight: _InFlight | None = None  # the last dispatched calls, results not yet read
        self._wait_s = 0.0  # this step's wait for call results (StepRecord.wait_ms)
        self.eos_ids = frozenset(engine.cfg.eos_ids) | frozenset(tokenizer.eos_ids if tokenizer else ())
        self.compiles_at_ready = compile_counter.count
        # Per kind of engine call ("prefill", "decode", "mixed"): calls that raised since the last
        # one of that kind that worked.
        self._call_failures = {"prefill": 0, "decode": 0, "mixed": 0}
        self.last_step = StepRecord("idle")
        self._choice = None

    # --- requests ------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        ecfg = self.engine.ecfg
        if request.request_id in self._tracks:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.engine.cfg.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are out of range [0, {vocab})")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens={request.max_tokens} must be at least 1")
        if len(request.prompt_ids) + 1 > ecfg.max_model_len:
            raise RequestError(
                f"the prompt has {len(request.prompt_ids)} tokens; the context holds {ecfg.max_model_len} "
                f"(prompt + at least 1 generated token)"
            )
        # A sequence's pages all come from one data group's share of the cache.
        if self.allocator.pages_for(len(request.prompt_ids) + 1) > self.allocator.pages_per_group:
            where = "" if self.data_groups == 1 else f" per data group ({self.data_groups} groups)"
            raise RequestError(
                f"the prompt needs {self.allocator.pages_for(len(request.prompt_ids) + 1)} KV pages; "
                f"the cache has {self.allocator.pages_per_group}{where}"
            )
        num_stop_ids = len(set(request.stop_token_ids) | (set() if request.ignore_eos else self.eos_ids))
        if num_stop_ids > MAX_STOP_IDS:
            raise RequestError(f"{num_stop_ids} stop token ids (EOS included); at most {MAX_STOP_IDS}")
        if request.sampling.logprobs and request.sampling.logprobs > ecfg.num_top_logprobs:
            raise RequestError(
                f"logprobs={request.sampling.logprobs} exceeds the engine's num_top_logprobs="
                f"{ecfg.num_top_logprobs}; start it with a larger --num_top_logprobs"
            )

    def add_request(self, request: Request) -> None:
        self.validate(request)
        seed = request.sampling.seed
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**63))
        # A sequence never outgrows its data group's pages (start-up sizes a group for
        # max_model_len; where it holds less, the group's pages are the context).
        context = min(self.engine.ecfg.max_model_len, self.allocator.pages_per_group * self.allocator.page_size)
        max_tokens = min(request.max_tokens, context - len(request.prompt_ids))
        seq = Sequence(
            seq_id=request.request_id, prompt_ids=list(request.prompt_ids), sampling=request.sampling,
            max_tokens=max_tokens, seed=seed, cache_salt=request.cache_salt,
        )
        stop_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self.eos_ids)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids) if self.tokenizer else None
        self._tracks[request.request_id] = _Track(request, seq, detok, stop_ids)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Ends a request at once; its slot and pages are free before the next step."""
        track = self._tracks.get(request_id)
        if track is None:
            return False
        try:
            self._finish(track, "abort")
        except Exception as e:  # noqa: BLE001 -- flushing its text failed: it ends with the error
            log.exception("aborting request %s failed", request_id)
            self._fail(track, f"the server failed while aborting this request: {e!r}")
        return True

    def has_work(self) -> bool:
        """True while a request has not yet had its last output (an aborted one
        still owes it) or a call is in flight."""
        return bool(self._tracks) or self._inflight is not None

    @property
    def consecutive_call_failures(self) -> int:
        """The longest run of failed calls of one kind, up to now: a prefill that works
        says nothing about a decode call that keeps failing."""
        return max(self._call_failures.values())

    @property
    def num_compiles_since_ready(self) -> int:
        return compile_counter.count - self.compiles_at_ready

    def mark_ready(self) -> None:
        """Call after warm-up: compilations from here on are counted as unexpected."""
        self.compiles_at_ready = compile_counter.count

    # --- the loop ------------------------------------------------------------------

    def _install_arrivals(self) -> None:
        install = getattr(self.engine, "install_arrivals", None)
        arrived = install() if install is not None else 0  # a progressive start's programs, between calls
        if arrived:
            total = len(self.engine.program_names())
            log.info("%d more programs ready (%d of %d)", arrived,
                     total if self.engine.ready is None else len(self.engine.ready), total)

    def idle(self) -> bool:
        """Work for the engine's owner while no request runs: installs a progressive
        start's arrived programs and runs one of them once (Engine.warm_arrivals), so no
        request waits for a program's first run. Returns whether such work is left
        (call again before blocking on new requests)."""
        if self.has_work():
            return False
        self._install_arrivals()
        warm = getattr(self.engine, "warm_arrivals", None)
        return bool(warm(1)) if warm is not None else False

    def step(self) -> list[RequestOutput]:
        """Dispatches this step's prefill and decode calls, then turns the previous
        step's results into outputs while the device works on this one (with
        `pipeline=False`, this step's own results, at the cost of idling the device
        during host work). A request's outputs therefore arrive one step late."""
        t0 = time.perf_counter()
        self._wait_s = 0.0
        self._choice = None  # this step's decode call (_decode_choice)
        self._install_arrivals()
        with TraceAnnotation("xlserve.schedule"):  # named host spans for traces (runtime/profile.py gap_report)
            plan = self.scheduler.schedule(can_preempt=self._inflight is None)
        if plan is None:  # pages are short: preempting needs every token known, so drain first
            self._collect()
            plan = self.scheduler.schedule(can_preempt=True)
        t1, w1 = time.perf_counter(), self._wait_s
        for slot in plan.released_slots:
            self.engine.release(slot)  # preempted: its tokens are kept and recomputed later
        record = _InFlight()
        decoding = [s for s in self.scheduler.running.values() if s.status == Status.RUNNING]
        kind, decoded = [], (0, 0)  # (sequences, bucket rows), taken before a failed call frees them
        if plan.prefill and decoding and self._mixes(plan.prefill, decoding):
            kind, decoded = ["mixed"], (len(decoding), self._decode_rows(decoding))
            # One call: the chunks' prompts that complete here decode from the next step.
            out = self._call("mixed", [c.seq for c in plan.prefill] + decoding, self._dispatch_mixed, plan.prefill,
                             decoding)
            if out is not None:
                record.prefill, record.decoding = plan.prefill, decoding
                (record.prefill_out, record.prefill_rows), record.decode_out = out
            decoding = []
        elif plan.prefill:
            kind.append("prefill")
            out = self._call("prefill", [c.seq for c in plan.prefill], self._dispatch_prefill, plan.prefill)
            if out is not None:
                record.prefill = plan.prefill
                record.prefill_out, record.prefill_rows = out
            decoding = [s for s in self.scheduler.running.values() if s.status == Status.RUNNING]
        if decoding:
            kind.append("decode")
            decoded = (len(decoding), self._decode_rows(decoding))
            out = self._call("decode", decoding, self._dispatch_decode, decoding)
            if out is not None:
                record.decoding, record.decode_out = decoding, out
        t2 = time.perf_counter()
        previous, self._inflight = self._inflight, (record if record.prefill or record.decoding else None)
        if previous is not None:
            with TraceAnnotation("xlserve.process"):
                self._process(previous)
        if not self.pipeline:
            self._collect()
        t3 = time.perf_counter()
        self.last_step = StepRecord("+".join(kind) or "idle", *decoded, len(plan.prefill),
                                    sum(c.length for c in plan.prefill), self.scheduler.num_waiting,
                                    schedule_ms=(t1 - t0 - w1) * 1e3, dispatch_ms=(t2 - t1) * 1e3,
                                    wait_ms=self._wait_s * 1e3, process_ms=(t3 - t2 - self._wait_s + w1) * 1e3)
        outputs = []
        for track in list(self._tracks.values()):
            if track.pending is not None:
                outputs.append(track.pending)
                track.pending = None
                if outputs[-1].finished:
                    del self._tracks[track.request.request_id]
        return outputs

    def _call(self, what: str, seqs: list[Sequence], fn, *args):
        """Runs fn(*args), an engine call and its host side; if it raises, the requests of
        `seqs` end with an error and None is returned."""
        try:
            with TraceAnnotation(f"xlserve.{fn.__name__.lstrip('_')}"):
                result = fn(*args)
        except Exception as e:  # noqa: BLE001 -- fails these requests, not the loop
            self._call_failures[what] += 1
            log.exception("the engine's %s call failed; failing %d requests", what, len(seqs))
            for seq in seqs:
                track = self._tracks.get(seq.seq_id)
                if track is not None and seq.status != Status.FINISHED:
                    self._fail(track, f"the engine's {what} call failed: {e!r}")
            return None
        self._call_failures[what] = 0
        return result

    def _read(self, what: str, seqs: list[Sequence], out: dict) -> dict[str, np.ndarray] | None:
        """The host copy of a call's results (waits for the call); None if it failed."""
        t = time.perf_counter()
        try:
            return self._call(what, seqs, _to_host, out)
        finally:
            self._wait_s += time.perf_counter() - t

    def _collect(self) -> None:
        """Waits for the call in flight and processes its results."""
        previous, self._inflight = self._inflight, None
        if previous is not None:
            self._process(previous)

    def _prefill_layout(self, chunks: list[PrefillChunk]) -> tuple[list[int], int, int]:
        """Each chunk's row in the prefill call, the rows per data group and the chunk
        length: group g's chunks take rows g*b, g*b+1, ... in plan order, with b the
        batch bucket of the group with the most chunks."""
        counts = [0] * self.data_groups
        index = []
        for c in chunks:
            g = self.scheduler.group_of_slot(c.seq.slot)
            index.append((g, counts[g]))
            counts[g] += 1
        b, t = self.engine.prefill_shape(max(counts), max(c.length for c in chunks), all(c.start == 0 for c in chunks))
        return [g * b + k for g, k in index], b, t

    def _mixes(self, chunks: list[PrefillChunk], decoding: list[Sequence]) -> bool:
        """Whether this step's chunks and decode step run as one mixed call (Engine.mixes)."""
        if self.data_groups != 1:
            return False
        _, b, t = self._prefill_layout(chunks)
        rows, mode = self._decode_choice(decoding)
        return self.engine.mixes(rows, b, t, all(c.start == 0 for c in chunks), mode)

    def _dispatch_mixed(self, chunks: list[PrefillChunk], decoding: list[Sequence]) -> tuple[tuple[dict, list[int]], dict]:
        """Runs the chunks and one decode step as one call; returns ((prefill outputs,
        each chunk's row in them), decode outputs)."""
        self._seed_prompt_masks(chunks)
        args, rows = self._prefill_args(chunks)
        table, mode = self._decode_args(decoding)
        p_out, d_out = self.engine.mixed(table, mode=mode, **args)
        self._prefill_dispatched(chunks, p_out)
        self._decode_dispatched(decoding, d_out)
        return (p_out, rows), d_out

    def _dispatch_prefill(self, chunks: list[PrefillChunk]) -> tuple[dict, list[int]]:
        """Runs the prefill call; returns its outputs and each chunk's row in them."""
        self._seed_prompt_masks(chunks)
        args, rows = self._prefill_args(chunks)
        out = self.engine.prefill(**args)
        self._prefill_dispatched(chunks, out)
        return out, rows

    def _prefill_dispatched(self, chunks: list[PrefillChunk], out: dict) -> None:
        for c in chunks:
            self.scheduler.prefill_done(c)  # in the cache once dispatched: the device runs calls in order
            if c.is_last:
                c.seq.num_inflight += 1
        _start_copy(out)

    def _seed_prompt_masks(self, chunks: list[PrefillChunk]) -> None:
        """A sequence with a repetition penalty whose admission found part of its prompt in
        the prefix cache: before its first chunk, its slot's prompt mask gets the cached
        tokens (the chunks add only their own, and no call ran the cached ones)."""
        for c in chunks:
            seq = c.seq
            if c.start and c.start == seq.num_prefix_cached and seq.sampling.repetition_penalty != 1.0:
                self.engine.seed_prompt_mask(seq.slot, np.asarray(seq.tokens_to_prefill[: c.start], np.int32))

    def _prefill_args(self, chunks: list[PrefillChunk]) -> tuple[dict, list[int]]:
        """The prefill call's arguments (Engine.prefill) and each chunk's row in it."""
        ecfg = self.engine.ecfg
        rows, b_group, t = self._prefill_layout(chunks)
        b = self.data_groups * b_group  # rows [g*b_group, (g+1)*b_group) are group g's
        tokens = np.zeros((b, t), np.int32)
        starts = np.zeros(b, np.int32)
        lens = np.zeros(b, np.int32)
        table = np.zeros((b, ecfg.max_pages_per_seq), np.int32)
        slot_ids = np.full(b, ecfg.max_num_seqs, np.int32)
        is_last = np.zeros(b, bool)
        params, seeds = [None] * b, [0] * b
        stop_ids = np.full((b, MAX_STOP_IDS), -1, np.int32)
        remaining = np.zeros(b, np.int32)
        for i, c in zip(rows, chunks):
            seq = c.seq
            tokens[i, : c.length] = seq.tokens_to_prefill[c.start : c.start + c.length]
            starts[i], lens[i], slot_ids[i], is_last[i] = c.start, c.length, seq.slot, c.is_last
            pages = self.allocator.pages(seq.seq_id)
            table[i, : len(pages)] = pages
            params[i], seeds[i] = seq.sampling, seq.seed
            ids = sorted(self._tracks[seq.seq_id].stop_ids)
            stop_ids[i, : len(ids)] = ids
            remaining[i] = seq.max_tokens - len(seq.output_ids) - 1
        args = dict(tokens=tokens, starts=starts, lens=lens, page_table=table, slot_ids=slot_ids, is_last=is_last,
                    sampling=SlotSampling.pack(params, seeds), stop_ids=stop_ids, remaining=remaining)
        return args, rows

    def _dispatch_decode(self, decoding: list[Sequence]) -> dict:
        table, mode = self._decode_args(decoding)
        out = self.engine.decode(table, mode=mode)
        self._decode_dispatched(decoding, out)
        return out

    def _decode_choice(self, decoding: list[Sequence]) -> tuple[int, str]:
        """The slots a decode call runs, the first `rows`, and its sampling mode
        (Engine.decode_choice): the smallest bucket holding every decoding slot (the
        scheduler hands out the lowest free slot; the others are idle on the device), in
        the cheapest mode that samples every running sequence's parameters (slots of
        finished or preempted ones are idle). Data-parallel groups own slot ranges: their
        calls run every slot (as Engine compiles them)."""
        key = tuple(map(id, decoding))
        if self._choice is None or self._choice[0] != key:  # asked 2-3 times a step: once
            top = max(seq.slot for seq in decoding) + 1 if self.data_groups == 1 else self.engine.ecfg.max_num_seqs
            self._choice = key, self.engine.decode_choice(top, [seq.sampling for seq in decoding])
        return self._choice[1]

    def _decode_rows(self, decoding: list[Sequence]) -> int:
        return self._decode_choice(decoding)[0]

    def _decode_args(self, decoding: list[Sequence]) -> tuple[np.ndarray, str]:
        """The decode call's page table [rows, MP] and sampling mode."""
        rows, mode = self._decode_choice(decoding)
        table = np.zeros((rows, self.engine.ecfg.max_pages_per_seq), np.int32)
        for seq in decoding:
            pages = self.allocator.pages(seq.seq_id)
            table[seq.slot, : len(pages)] = pages
        return table, mode

    def _decode_dispatched(self, decoding: list[Sequence], out: dict) -> None:
        for seq in decoding:
            seq.num_inflight += self.engine.ecfg.decode_steps_per_call
        _start_copy(out)

    def _process(self, record: "_InFlight") -> None:
        """Host side of a finished call: accept tokens of sequences still running."""
        if record.prefill:
            last = [(i, c.seq) for i, c in zip(record.prefill_rows, record.prefill) if c.is_last]
            for _, seq in last:
                seq.num_inflight -= 1
            # A call that failed on the device raises here, when its results are read.
            host = self._read("prefill", [seq for _, seq in last], record.prefill_out)
            if host is not None:  # the call ran: its chunks' pages hold their KV
                for c in record.prefill:
                    if c.seq.status != Status.FINISHED:
                        self.scheduler.confirm(c.seq, c.start + c.length)
            for i, seq in last if host is not None else ():
                if seq.status == Status.RUNNING:
                    self._accept_or_fail(self._tracks[seq.seq_id], host, i)
        if record.decoding:
            steps = self.engine.ecfg.decode_steps_per_call
            for seq in record.decoding:
                seq.num_inflight -= steps
            host = self._read("decode", record.decoding, record.decode_out)  # [steps, B, ...]
            for step in range(steps if host is not None else 0):
                rows = {k: v[step] for k, v in host.items()}
                for seq in record.decoding:
                    # A sequence that ended meanwhile (host-side stop string, abort) may
                    # have more tokens from the device: they are dropped here.
                    if seq.status == Status.RUNNING and rows["valid"][seq.slot]:
                        self._accept_or_fail(self._tracks[seq.seq_id], rows, seq.slot)

    # --- per-token bookkeeping -----------------------------------------------------

    def _accept_or_fail(self, track: _Track, host: dict[str, np.ndarray], row: int) -> None:
        try:
            self._accept(track, host, row)
        except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
            log.exception("turning the output of request %s into text failed", track.request.request_id)
            self._fail(track, f"the server failed on this request's output: {e!r}")

    def _fail(self, track: _Track, message: str) -> None:
        """Ends one request with an error: its slot and pages are freed, the tokens it
        had not yet returned are dropped, and its last output carries `message`."""
        track.pending = None
        self._finish(track, "error", flush=False)
        track.pending.error = message

    def _accept(self, track: _Track, host: dict[str, np.ndarray], row: int) -> None:
        seq = track.seq
        token = int(host["tokens"][row])
        seq.output_ids.append(token)
        # The step that sampled it wrote the KV of every earlier token.
        self.scheduler.confirm(seq, seq.num_tokens - 1)
        out = track.pending or RequestOutput(
            track.request.request_id, [], "", [], [], num_prompt_tokens=len(seq.prompt_ids),
            num_cached_tokens=seq.num_prefix_cached,
        )
        track.pending = out
        out.token_ids.append(token)
        out.logprobs.append(float(host["logprob"][row]))
        n = track.request.sampling.logprobs
        if n:
            out.top_logprobs.append(
                [(int(i), float(lp)) for i, lp in zip(host["top_ids"][row][:n], host["top_logprobs"][row][:n])]
            )
        if track.detok is not None:
            track.text += track.detok.push(token)
        if token in track.stop_ids:
            self._finish(track, "stop")
        elif self._truncate_at_stop_string(track):
            self._finish(track, "stop", flush=False)  # held-back text lies past the stop string
        elif len(seq.output_ids) >= seq.max_tokens:
            self._finish(track, "length")
        else:
            self._emit_text(track, final=False)

    def _truncate_at_stop_string(self, track: _Track) -> bool:
        stops = track.request.stop
        if not stops:
            return False
        # Only the new text (plus an overlap for a stop that straddles deltas) is searched.
        window_start = max(0, track.emitted - max(len(s) for s in stops))
        hits = [i for s in stops if (i := track.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        track.text = track.text[: min(hits)]  # the stop string is not part of the output
        return True

    def _emit_text(self, track: _Track, *, final: bool) -> None:
        # Hold back a possible stop-string prefix until it is decided.
        hold = 0 if final or not track.request.stop else max(len(s) for s in track.request.stop) - 1
        upto = max(track.emitted, len(track.text) - hold)
        if track.pending is not None:
            track.pending.text += track.text[track.emitted : upto]
        track.emitted = upto

    def _finish(self, track: _Track, reason: str, *, flush: bool = True) -> None:
        seq = track.seq
        if seq.status != Status.FINISHED:
            slot = seq.slot
            if flush and track.detok is not None:
                track.text += track.detok.flush()
            self.scheduler.finish(seq, cache=reason != "error")
            if slot is not None:
                self.engine.release(slot)
        if track.pending is None:
            track.pending = RequestOutput(
                track.request.request_id, [], "", [], [], num_prompt_tokens=len(seq.prompt_ids),
                num_cached_tokens=seq.num_prefix_cached,
            )
        self._emit_text(track, final=True)
        track.pending.finished = True
        track.pending.finish_reason = reason

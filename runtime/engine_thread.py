"""The engine thread of the gRPC server: the one thread that owns the orchestrator.

`EngineLoop` loads the model and warms it up, then loops: drain the inbox (add, abort,
stop commands from the event loop), run one orchestrator step, publish the load
(`LoadSnapshot`, gauges), and hand the step's events to the event loop through the
`post` callback (the server's `call_soon_threadsafe`). It never waits on the event
loop; with no work it blocks on the inbox. Per request it keeps the timings (queue,
first token, last token) that the last response and the latency histograms report.

Events for a request, from this thread to its handler:
  ("out", RequestOutput, final)        final: None, or dict(usage=..., timings=...) on the last
  ("error", grpc.StatusCode, message)  always the last
Every request added gets exactly one last event: its finished output, or an error.
A request that fails on its own (adding it, turning its tokens into text, handling its
output) fails alone with INTERNAL; an engine call that raises fails the requests in
that call (the orchestrator reports them as error outputs), and after
_MAX_CONSECUTIVE_FAULTS such calls in a row the engine is taken for broken. A step that
raises outside the engine calls (a bug in the loop) fails the requests in flight and
the loop starts over on a fresh orchestrator over the same engine.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from runtime import startup
from runtime.metrics import ServerMetrics
from runtime.orchestrator import Orchestrator, Request, RequestError, RequestOutput

log = logging.getLogger(__name__)

Code = grpc.StatusCode
# Consecutive failed engine calls (or steps) after which the engine is taken for broken:
# a call that fails on the device leaves the donated cache unusable, so every later call
# fails too, while one bad request fails one call.
_MAX_CONSECUTIVE_FAULTS = 3


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load after its latest step (replaced whole, read by any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    num_pages_used: int = 0
    num_pages_free: int = 0
    num_preemptions: int = 0
    num_compiles_since_ready: int = 0


@dataclasses.dataclass(frozen=True)
class _Add:
    request: Request
    arrival: float  # time.monotonic() at admission


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str
    reason: str  # metrics.ABORT_REASONS


_STOP = object()


@dataclasses.dataclass
class _Progress:
    """Engine-side timing of one request (monotonic seconds)."""

    arrival: float
    prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served (Usage.cached_tokens)
    abort_reason: str | None = None


Event = tuple  # see the module docstring


def is_last(event: Event) -> bool:
    return event[0] == "error" or event[1].finished


class EngineLoop:
    """Owns the orchestrator in one thread (see the module docstring).

    load: builds (engine, tokenizer) in the engine thread; the loop warms the engine up
      and makes the orchestrator with `orchestrator_factory(engine, tokenizer)`.
    post: called in the engine thread with each step's events, a list of
      (request_id, event); it must not block (the server passes call_soon_threadsafe).
    on_ready / on_fatal: called in the engine thread once loading ends.
    """

    def __init__(self, load: Callable[[], tuple[Any, Any]], *, post: Callable[[list], None],
                 on_ready: Callable[["EngineLoop"], None], on_fatal: Callable[[BaseException], None],
                 metrics: ServerMetrics, orchestrator_factory: Callable[..., Orchestrator] = Orchestrator,
                 step_trace=None):
        self._load = load
        self._step_trace = step_trace  # runtime.profile.StepTrace or None
        self._steps = 0
        self._background = None  # a progressive start's job, until its objects are frozen (_idle)
        self._post = post
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._factory = orchestrator_factory
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._progress: dict[str, _Progress] = {}
        self._thread = threading.Thread(target=self._run, name="xlserve-engine", daemon=True)
        self._stop_requested = threading.Event()
        self.orc: Orchestrator | None = None
        self.load = LoadSnapshot()
        self._preemptions_base = 0  # of orchestrators replaced after a fault
        self._preemptions_seen = 0
        self._reclaimed_base = self._reclaimed_seen = 0  # prefix-cache pages, likewise
        self._compiles_seen = 0

    # --- any thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, arrival: float) -> None:
        self._inbox.put(_Add(request, arrival))

    def abort(self, request_id: str, reason: str) -> None:
        self._inbox.put(_Abort(request_id, reason))

    def stop(self) -> None:
        """Asks the loop to abort what is left and exit; join with `join`."""
        self._stop_requested.set()
        self._inbox.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine, tokenizer = self._load()
            if self._stop_requested.is_set():  # stopped while loading: no warm-up, no serving
                return
            t = time.perf_counter()
            with startup.clock.phase("warm-up") as detail:
                engine.warmup()
                summary = getattr(engine, "warmup_summary", None)  # a wrapper (LeaderEngine) may lack it
                detail[0] = summary() if summary else ""
            self.orc = self._factory(engine, tokenizer)
            self.orc.mark_ready()
            log.info("warm-up took %.1f s", time.perf_counter() - t)
            startup.freeze_heap()
        except BaseException as e:  # noqa: BLE001 -- the server's owner reports it (runtime.serve: one line)
            self._on_fatal(e)
            return
        self._metrics.pages_total.set(self.orc.allocator.num_pages)
        self._publish_load()
        self._on_ready(self)
        background = getattr(engine, "background", None)
        if background is not None:  # a progressive start: the other programs, while serving
            self._background = background
            background.start()
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 -- a bug in this loop: the server stops serving
            log.exception("the engine loop failed")
            self._on_fatal(e)

    def _loop(self) -> None:
        stopping, faults, idle_work = False, 0, True
        while True:
            events: list = []
            for cmd in self._take(block=not self.orc.has_work() and not idle_work):
                if cmd is _STOP:
                    stopping = True
                    for rid in list(self._progress):
                        self._abort(rid, "drain")
                elif isinstance(cmd, _Add):
                    self._add(cmd, events)
                else:
                    self._abort(cmd.request_id, cmd.reason)
            if self.orc.has_work():
                t0 = time.monotonic()
                if self._step_trace is not None:
                    self._step_trace.before_step(self._steps)
                try:
                    outputs = self.orc.step()
                    faults = 0
                    if self._step_trace is not None:
                        self._step_trace.after_step(self._steps)
                    self._steps += 1
                except Exception as e:  # noqa: BLE001 -- fail the requests, keep serving
                    faults += 1
                    self._fault(e, events)
                    if faults >= _MAX_CONSECUTIVE_FAULTS:
                        self._post(events)
                        self._on_fatal(RuntimeError(f"{faults} engine steps failed in a row; last: {e!r}"))
                        return
                else:
                    self._on_step(t0, outputs, events)
                    failures = self.orc.consecutive_call_failures
                    if failures >= _MAX_CONSECUTIVE_FAULTS:
                        self._post(events)
                        self._on_fatal(RuntimeError(f"{failures} engine calls failed in a row"))
                        return
            elif not stopping:
                idle_work = self._idle()
            self._publish_load()  # before the events: a client that saw its last message sees its pages freed
            if events:
                self._post(events)
            if stopping and not self.orc.has_work():
                return

    def _idle(self) -> bool:
        """Orchestrator.idle, then, once a progressive start's programs are all in and
        warm, startup.freeze_heap again: the background's tracing and lowering left
        objects alive (jit caches) that every full collection would otherwise walk while
        serving. Returns whether idle work is left; a failure is logged and costs no
        request."""
        try:
            if self.orc.idle():
                return True
        except Exception:  # noqa: BLE001 -- the warm-up of a program that arrived; serving goes on
            log.exception("idle work (warming an arrived program) failed")
            return False
        if self._background is not None and self._background.done.is_set():
            self._background = None
            t = time.perf_counter()
            startup.freeze_heap()
            print(f"xlserve: programs warm, heap frozen again ({time.perf_counter() - t:.2f} s)", file=sys.stderr,
                  flush=True)
        return False

    def _take(self, *, block: bool) -> list:
        items = []
        if block:
            try:
                items.append(self._inbox.get(timeout=1.0))
            except queue.Empty:
                return items
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _add(self, cmd: _Add, events: list) -> None:
        rid = cmd.request.request_id
        try:
            self.orc.add_request(cmd.request)
        except RequestError as e:  # validated at admission; only a race gets here
            self._metrics.failed.inc()  # admitted, so counted: admitted == finished + failed
            events.append((rid, ("error", Code.INVALID_ARGUMENT, str(e))))
            return
        except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
            log.exception("adding request %s failed", rid)
            self._metrics.failed.inc()
            events.append((rid, ("error", Code.INTERNAL, f"the server failed to add the request: {e!r}")))
            try:
                self.orc.abort(rid)  # whatever half of it got in; its output is dropped
            except Exception:  # noqa: BLE001
                log.exception("cleaning up request %s failed", rid)
            return
        self._progress[rid] = _Progress(arrival=cmd.arrival, prompt_tokens=len(cmd.request.prompt_ids))
        self._metrics.prompt_tokens.inc(len(cmd.request.prompt_ids))

    def _abort(self, request_id: str, reason: str) -> None:
        progress = self._progress.get(request_id)
        if progress is not None and self.orc.abort(request_id):
            progress.abort_reason = progress.abort_reason or reason

    def _on_step(self, t0: float, outputs: list[RequestOutput], events: list) -> None:
        now = time.monotonic()
        self._metrics.observe_step(self.orc.last_step, t0, now - t0, sum(len(o.token_ids) for o in outputs))
        for seq in self.orc.scheduler.running.values():
            p = self._progress.get(seq.seq_id)
            if p is not None and p.scheduled is None:  # got its slot in this step
                p.scheduled = t0
                self._metrics.queue.observe(t0 - p.arrival)
        for out in outputs:
            if out.request_id not in self._progress:  # failed earlier; the orchestrator's late output is dropped
                continue
            try:
                self._on_output(out, now, events)
            except Exception as e:  # noqa: BLE001 -- this request fails, the others go on
                log.exception("handling the output of request %s failed", out.request_id)
                self._progress.pop(out.request_id, None)
                self._metrics.failed.inc()
                events.append((out.request_id, ("error", Code.INTERNAL, f"the server failed on an output: {e!r}")))
                if not out.finished:
                    self.orc.abort(out.request_id)

    def _on_output(self, out: RequestOutput, now: float, events: list) -> None:
        p = self._progress[out.request_id]
        m = self._metrics
        if out.error is not None:  # this request failed alone (the orchestrator freed it)
            del self._progress[out.request_id]
            m.failed.inc()
            events.append((out.request_id, ("error", Code.INTERNAL, out.error)))
            return
        n = len(out.token_ids)
        if n:
            if p.first_token is None:
                p.first_token = now
                p.cached_tokens = out.num_cached_tokens  # its first admission's (a preemption may re-admit it)
                if self.orc.allocator.prefix_caching:
                    m.prefix_queried.inc(p.prompt_tokens)
                    m.prefix_hits.inc(p.cached_tokens)
                m.ttft.observe(now - p.arrival)
            else:
                gap = (now - p.last_token) / n
                for _ in range(n):
                    m.itl.observe(gap)
            p.last_token = now
            p.generated += n
            m.generation_tokens.inc(n)
        final = None
        if out.finished:
            del self._progress[out.request_id]
            first = p.first_token if p.first_token is not None else now
            final = dict(
                usage=dict(prompt_tokens=p.prompt_tokens, completion_tokens=p.generated, cached_tokens=p.cached_tokens),
                timings=dict(
                    queue_s=(p.scheduled if p.scheduled is not None else now) - p.arrival,
                    ttft_s=first - p.arrival if p.first_token is not None else 0.0,
                    decode_s=now - first, e2e_s=now - p.arrival,
                ),
            )
            m.e2e.observe(now - p.arrival)
            m.finished.labels(finish_reason=out.finish_reason).inc()
            if out.finish_reason == "abort":
                m.aborted.labels(reason=p.abort_reason or "abort_rpc").inc()
        events.append((out.request_id, ("out", out, final)))

    def _fault(self, exc: Exception, events: list) -> None:
        """A step raised: fail every request in flight with INTERNAL and start over on a
        fresh orchestrator over the same engine (all slots released)."""
        log.exception("an engine step failed; failing %d requests in flight", len(self._progress))
        for rid in self._progress:
            events.append((rid, ("error", Code.INTERNAL, f"the engine step failed: {exc!r}")))
            self._metrics.failed.inc()
        self._progress.clear()
        old = self.orc
        self._preemptions_base += old.scheduler.num_preemptions
        self._reclaimed_base += old.allocator.num_reclaimed
        for slot in range(old.engine.ecfg.max_num_seqs):
            old.engine.release(slot)
        self.orc = self._factory(old.engine, old.tokenizer)
        self.orc.compiles_at_ready = old.compiles_at_ready

    def _publish_load(self) -> None:
        orc, m = self.orc, self._metrics
        preemptions = self._preemptions_base + orc.scheduler.num_preemptions
        compiles = orc.num_compiles_since_ready
        self.load = LoadSnapshot(
            num_running=orc.scheduler.num_running, num_waiting=orc.scheduler.num_waiting,
            num_pages_used=orc.allocator.num_used, num_pages_free=orc.allocator.num_free,
            num_preemptions=preemptions, num_compiles_since_ready=compiles,
        )
        m.running.set(orc.scheduler.num_running)
        m.waiting.set(orc.scheduler.num_waiting)
        m.pages_used.set(orc.allocator.num_used)
        if preemptions > self._preemptions_seen:
            m.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions
        m.pages_cached.set(orc.allocator.num_cached)
        reclaimed = self._reclaimed_base + orc.allocator.num_reclaimed
        if reclaimed > self._reclaimed_seen:
            m.pages_reclaimed.inc(reclaimed - self._reclaimed_seen)
            self._reclaimed_seen = reclaimed
        if compiles > self._compiles_seen:
            log.warning("%d compilations after warm-up", compiles - self._compiles_seen)
            m.compilations.inc(compiles - self._compiles_seen)
            self._compiles_seen = compiles

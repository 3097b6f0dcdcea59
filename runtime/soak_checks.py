"""What a soak run (runtime/soak.py) records of each request, the server states it
reads, the invariants it checks over them (listed in runtime/soak.py's docstring), and
its printed summary. Plain data in, checks out: no gRPC here."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from runtime.proto import generation as pb

KINDS = ("greedy", "sampled", "penalized", "bad")
ACTIONS = ("complete", "cancel", "deadline", "abort")
_FINISHED = ("stop", "length")
# Outcomes an action may end in besides a normal finish. RESOURCE_EXHAUSTED is the
# server being full (a cancelled stream holds its place until the engine drops it).
_ALLOWED = {
    "complete": {"RESOURCE_EXHAUSTED"},
    "cancel": {"cancelled", "RESOURCE_EXHAUSTED"},
    "deadline": {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"},
    "abort": {"abort", "RESOURCE_EXHAUSTED"},
}


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    duration_s: float
    concurrency: int = 16  # workers, each with at most one request (and its Abort) in flight
    seed: int = 0
    max_tokens: int = 64  # upper bound of a valid request's random max_tokens
    max_requests: int = 100_000
    warmup_s: float | None = None  # RSS baseline after this long; None: duration / 4, at most 30 s
    # Measured (SmolLM2-135M server on CPU, 5-minute soak, 2026-11-28): RSS rises ~50 MB in
    # the first seconds of load (allocator arenas of the gRPC and engine threads), hence
    # the baseline after a warm-up and the end before the load stops (idle, it falls back
    # as much); between the two it stayed within +6 MB. 200 MB is far above
    # that drift, yet a leaked KV cache or per-step buffers exceed it, as does ~7 KB per
    # request over 30k requests (the report gives the growth per request).
    max_rss_growth_mb: float = 200.0
    request_timeout_s: float = 120.0  # deadline of every request without a short one: a hang fails
    settle_s: float = 10.0  # after the load, how long the server may take to go idle

    def __post_init__(self):
        if not self.duration_s > 0:
            raise ValueError(f"--duration_s={self.duration_s} must be > 0")
        if self.concurrency < 1 or self.max_tokens < 1 or self.max_requests < 1:
            raise ValueError("--concurrency, --max_tokens and --max_requests must be >= 1")
        if self.warmup_s is not None and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"--warmup_s={self.warmup_s} must be in [0, --duration_s={self.duration_s})")
        if self.max_rss_growth_mb < 0 or self.request_timeout_s <= 0 or self.settle_s < 0:
            raise ValueError("--max_rss_growth_mb and --settle_s must be >= 0, --request_timeout_s > 0")

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(30.0, self.duration_s / 4)


# --- what the client saw -----------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One request as the client saw it."""

    kind: str  # KINDS
    action: str  # ACTIONS ("complete" for bad requests)
    request_id: str = ""
    max_tokens: int = 0
    logprobs: bool = False  # asked for logprobs: every token must carry one
    outcome: str = ""  # stop | length | abort | cancelled | a status code name
    details: str = ""  # of an error status
    tokens: int = 0
    num_logprobs: int = 0
    finals: int = 0
    abort_result: str = ""  # of the Abort RPC: OK | NOT_FOUND | a status code name
    violations: list[str] = dataclasses.field(default_factory=list)

    def feed(self, r: "pb.GenerateResponse") -> None:
        """Takes the next response of the stream, checking its shape."""
        if self.finals:
            self.violations.append("a response after the last one")
        if self.request_id and r.request_id != self.request_id:
            self.violations.append(f"a response for {r.request_id!r}, not {self.request_id!r}")
        self.tokens += len(r.token_ids)
        self.num_logprobs += len(r.logprobs)
        if not r.finish_reason:
            return
        self.finals += 1
        self.outcome = pb.FinishReason.NAMES.get(r.finish_reason, f"finish_reason={r.finish_reason}")
        if r.usage.completion_tokens != self.tokens:
            self.violations.append(f"usage says {r.usage.completion_tokens} tokens, {self.tokens} streamed")
        if self.max_tokens and self.tokens > self.max_tokens:
            self.violations.append(f"{self.tokens} tokens streamed, max_tokens={self.max_tokens}")
        if self.logprobs and self.num_logprobs != self.tokens:
            self.violations.append(f"{self.num_logprobs} logprobs for {self.tokens} tokens")

    def end(self) -> None:
        """The stream ended with status OK."""
        if self.finals == 0:
            self.violations.append("the stream ended OK without a last response")
            self.outcome = self.outcome or "no_final"


@dataclasses.dataclass(frozen=True)
class ServerState:
    """What the server says about itself at one moment."""

    load: dict[str, int]  # pb.Load fields
    health: str  # gRPC health of the Generation service
    metrics: dict[str, float] | None  # parse_metrics(/metrics), None without --metrics_url
    at: float = 0.0  # seconds into the run


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str


@dataclasses.dataclass
class SoakReport:
    records: list[Record]
    duration_s: float  # of the load
    start: ServerState
    warm: ServerState
    loaded: ServerState  # as the load stops (requests still in flight)
    end: ServerState  # after the server went idle
    checks: list[Check]
    peak_rss: float | None = None

    @property
    def passed(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.ok is False]


# --- the invariants ----------------------------------------------------------------------


def metric_key(name: str, labels: dict[str, str] | None = None) -> str:
    """'name' or 'name{a="x",b="y"}' (labels sorted): the keys of parse_metrics."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {metric_key(s.name, s.labels): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _delta(a: ServerState, b: ServerState, name: str) -> float:
    return _sum(b.metrics, name) - _sum(a.metrics, name)


def check_invariants(records: list[Record], start: ServerState, warm: ServerState, loaded: ServerState,
                     end: ServerState, config: SoakConfig) -> list[Check]:
    """The invariants of the module docstring, from the records and the server's states:
    at the start, after the warm-up, as the load stops, and idle after it."""
    checks = []

    def add(name, bad: list[str], ok_detail: str):
        checks.append(Check(name, not bad, "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
                            if bad else ok_detail))

    shape = [f"{r.request_id or r.kind}: {v}" for r in records for v in r.violations]
    add("one_final_message", shape, f"{sum(r.finals for r in records)} last responses, one per finished stream")

    unexpected = []
    for r in records:
        o = r.outcome
        if r.kind == "bad":
            if o != "INVALID_ARGUMENT":
                unexpected.append(f"bad request {r.request_id or ''} ({r.details or 'admitted'}) got {o}")
        elif o not in _FINISHED and o not in _ALLOWED[r.action] and o != "INTERNAL" and o != "no_final":
            what = (f"no response within --request_timeout_s={config.request_timeout_s}"
                    if o == "DEADLINE_EXCEEDED" else r.details)
            unexpected.append(f"{r.action} {r.request_id}: {o} ({what})")
        if r.abort_result not in ("", "OK", "NOT_FOUND"):
            unexpected.append(f"Abort({r.request_id}): {r.abort_result}")
    add("expected_statuses", unexpected, "every status fits its request")

    internal = [f"{r.request_id}: {r.details}" for r in records if r.outcome == "INTERNAL"]
    if end.metrics is not None and start.metrics is not None:
        failed = _delta(start, end, "xlserve_requests_failed_total")
        if failed:
            internal.append(f"xlserve_requests_failed rose by {failed:g}")
    add("no_internal", internal, "no INTERNAL status")

    done = sum(r.outcome in _FINISHED for r in records)
    add("made_progress", [] if done else ["no request finished with stop or length"], f"{done} finished")

    load = end.load
    busy = [f"{k}={load.get(k, 0)}" for k in ("num_in_flight", "num_running", "num_waiting", "num_pending_tokens",
                                             "num_pages_used") if load.get(k, 0)]
    if end.metrics is not None and end.metrics.get("xlserve_kv_pages_used", 0):
        busy.append(f"xlserve_kv_pages_used={end.metrics['xlserve_kv_pages_used']:g}")
    add("drained", [f"{config.settle_s:g} s after the load: " + ", ".join(busy)] if busy else [],
        "nothing in flight, 0 pages used")

    compiles = [f"num_compiles_since_ready={load.get('num_compiles_since_ready', 0)}"] \
        if load.get("num_compiles_since_ready", 0) else []
    if end.metrics is not None and _sum(end.metrics, "xlserve_compilations_total"):
        compiles.append(f"xlserve_compilations={_sum(end.metrics, 'xlserve_compilations_total'):g}")
    add("no_compiles", compiles, "0 compilations after warm-up")

    add("serving", [] if end.health == "SERVING" else [f"health is {end.health}"], "SERVING")

    if end.metrics is None:
        checks.append(Check("admitted_eq_ended", None, "skipped: no --metrics_url"))
        checks.append(Check("rss_growth", None, "skipped: no --metrics_url"))
        return checks
    m = end.metrics
    admitted = _sum(m, "xlserve_requests_admitted_total")
    finished = _sum(m, "xlserve_requests_finished_total")
    failed = _sum(m, "xlserve_requests_failed_total")
    add("admitted_eq_ended", [] if admitted == finished + failed else
        [f"admitted {admitted:g} != finished {finished:g} + failed {failed:g}"],
        f"admitted {admitted:g} = finished {finished:g} + failed {failed:g}")
    # Both under load: an idle server's RSS is lower by the load's arenas and buffers,
    # which would hide a leak as large.
    before, after = warm.metrics.get("process_resident_memory_bytes"), loaded.metrics.get(
        "process_resident_memory_bytes")
    if before is None or after is None:
        add("rss_growth", ["process_resident_memory_bytes is not in /metrics"], "")
    else:
        growth = (after - before) / 2**20
        admitted_since = max(1.0, _delta(warm, loaded, "xlserve_requests_admitted_total"))
        per = f"{growth * 1024 / admitted_since:+.1f} KB per request admitted since"
        add("rss_growth", [] if growth <= config.max_rss_growth_mb else
            [f"RSS grew {growth:.1f} MB after the warm-up ({per}), more than --max_rss_growth_mb="
             f"{config.max_rss_growth_mb:g}"],
            f"{growth:+.1f} MB after the warm-up ({per}; bound {config.max_rss_growth_mb:g} MB)")
    return checks


# --- the summary -------------------------------------------------------------------------


def _table(title: str, rows: list[str], records: list[Record], key) -> list[str]:
    outcomes = sorted({r.outcome for r in records}, key=lambda o: (o not in ("stop", "length", "abort"), o))
    count = Counter((key(r), r.outcome) for r in records)
    w = max([len(title)] + [len(r) for r in rows]) + 2
    cols = [max(len(o), 5) + 2 for o in outcomes]
    lines = [f"{title:<{w}}" + "".join(f"{o:>{c}}" for o, c in zip(outcomes, cols)) + f"{'total':>8}"]
    for row in rows:
        n = sum(count[(row, o)] for o in outcomes)
        if n:
            lines.append(f"{row:<{w}}" + "".join(f"{count[(row, o)]:>{c}}" for o, c in zip(outcomes, cols)) + f"{n:>8}")
    return lines


def format_report(rep: SoakReport, config: SoakConfig) -> str:
    recs = rep.records
    n = lambda pred, rs=recs: sum(1 for r in rs if pred(r))  # noqa: E731
    lines = ["{s:{c}^72}".format(s=" Soak Result ", c="=")]
    row = lambda k, v: lines.append(f"{k:<43}{v}")  # noqa: E731
    row("Load duration (s):", f"{rep.duration_s:.1f} (concurrency {config.concurrency}, seed {config.seed})")
    row("Requests:", f"{len(recs)} ({len(recs) / rep.duration_s:.2f}/s)")
    row("Tokens streamed:", sum(r.tokens for r in recs))
    cancels = [r for r in recs if r.action == "cancel"]
    row("Client cancels (sent / finished first):",
        f"{n(lambda r: r.outcome == 'cancelled', cancels)} / {n(lambda r: r.outcome in _FINISHED, cancels)}")
    aborts = [r for r in recs if r.abort_result]
    row("Abort RPCs (OK / NOT_FOUND):", f"{len(aborts)} ({n(lambda r: r.abort_result == 'OK', aborts)} / "
        f"{n(lambda r: r.abort_result == 'NOT_FOUND', aborts)}); streams ended ABORT: "
        f"{n(lambda r: r.outcome == 'abort')}")
    dls = [r for r in recs if r.action == "deadline"]
    row("Short deadlines (exceeded / finished):", f"{len(dls)} ({n(lambda r: r.outcome == 'DEADLINE_EXCEEDED', dls)}"
        f" / {n(lambda r: r.outcome in _FINISHED, dls)})")
    bad = [r for r in recs if r.kind == "bad"]
    row("Bad requests (INVALID_ARGUMENT):", f"{len(bad)} ({n(lambda r: r.outcome == 'INVALID_ARGUMENT', bad)})")
    lines.append("-" * 72)
    lines += _table("kind \\ outcome", list(KINDS), recs, lambda r: r.kind)
    lines.append("")
    lines += _table("action \\ outcome", list(ACTIONS), [r for r in recs if r.kind != "bad"], lambda r: r.action)
    lines.append("-" * 72)
    s, e = rep.start, rep.end
    row("Server pages used / in flight at the end:", f"{e.load.get('num_pages_used')} / {e.load.get('num_in_flight')}")
    row("Server compiles since ready:", e.load.get("num_compiles_since_ready"))
    row("Server preemptions during the run:", e.load.get("num_preemptions", 0) - s.load.get("num_preemptions", 0))
    if e.metrics is not None:
        d = lambda name, **labels: f"{_delta(s, e, metric_key(name, labels)):g}"  # noqa: E731
        row("Server admitted / failed (run):",
            f"{d('xlserve_requests_admitted_total')} / {d('xlserve_requests_failed_total')}")
        row("Server finished stop / length / abort:", " / ".join(
            d("xlserve_requests_finished_total", finish_reason=r) for r in ("stop", "length", "abort")))
        row("Server aborts cancelled / deadline / rpc:", " / ".join(
            d("xlserve_requests_aborted_total", reason=r) for r in ("cancelled", "deadline", "abort_rpc")))
        mb = lambda st: (st.metrics or {}).get("process_resident_memory_bytes", math.nan) / 2**20  # noqa: E731
        row("Server RSS start / warm / end / idle (MB):", f"{mb(s):.1f} / {mb(rep.warm):.1f} (at "
            f"{rep.warm.at:.0f} s) / {mb(rep.loaded):.1f} (at {rep.loaded.at:.0f} s) / "
            f"{mb(e):.1f}; peak {(rep.peak_rss or math.nan) / 2**20:.1f}")
    lines.append("-" * 72)
    for c in rep.checks:
        lines.append(f"{'PASS' if c.ok else 'SKIP' if c.ok is None else 'FAIL'}  {c.name:<20}{c.detail}")
    lines.append("=" * 72)
    return "\n".join(lines)

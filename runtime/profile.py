"""Where device time goes: a summary of a jax.profiler trace.

`trace(log_dir)` wraps `jax.profiler.trace(..., create_perfetto_trace=True)`;
`gap_report(log_dir)` names the host work during the device's idle gaps;
`summarize(log_dir)` reads the newest perfetto_trace.json.gz under it and returns a
text table of the device's kernels (grouped by XLA op, or by kernel name where the
trace has no op), their share of busy time, and how much of the traced span the
device sat idle (launch gaps, host syncs, loop-condition round trips).

    python -m runtime.profile LOG_DIR [--top=30]
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import shutil
import sys


@contextlib.contextmanager
def trace(log_dir: str, python: bool = False):
    """jax.profiler.trace into log_dir. Python's own frames are traced only with `python`:
    that tracer slows the host several-fold, which opens device gaps an untraced run does
    not have. The serving loop's TraceAnnotations ("xlserve.*") are recorded either way."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = int(python)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
        yield


class StepTrace:
    """Traces steps [start, start + count) of a serving loop (runtime.serve --profile_dir,
    --profile_steps; counted from the first step after warm-up) into `log_dir`, then
    writes the device summary and the host summary to log_dir/summary.txt. A failure
    to trace is logged and ends tracing; serving goes on."""

    def __init__(self, log_dir: str, start: int, count: int):
        if start < 0 or count < 1:
            raise ValueError(f"profile steps start={start} count={count}: want start >= 0 and count >= 1")
        self.log_dir, self.start, self.count = log_dir, start, count
        self._ctx = None
        self.done = False

    def before_step(self, n: int) -> None:
        if n == self.start and not self.done:
            try:
                self._ctx = trace(self.log_dir)
                self._ctx.__enter__()
            except Exception:  # noqa: BLE001 -- diagnostics never stop serving
                import logging

                logging.getLogger(__name__).exception("starting the step trace failed")
                self._ctx, self.done = None, True

    def after_step(self, n: int) -> None:
        if self._ctx is None or n < self.start + self.count - 1:
            return
        ctx, self._ctx, self.done = self._ctx, None, True
        try:
            ctx.__exit__(None, None, None)
            text = (f"steps {self.start}-{self.start + self.count - 1}\n{summarize(self.log_dir)}\n"
                    f"{host_summary(self.log_dir)}\n{gap_report(self.log_dir)}\n")
            with open(os.path.join(self.log_dir, "summary.txt"), "w") as f:
                f.write(text)
            print(f"xlserve: traced steps {self.start}-{self.start + self.count - 1}: "
                  f"{os.path.join(self.log_dir, 'summary.txt')}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001
            import logging

            logging.getLogger(__name__).exception("writing the step trace failed")


def _newest_trace(log_dir: str) -> str:
    found = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    return max(found, key=os.path.getmtime)


def keep_flat(log_dir: str, dest: str) -> None:
    """Copies the newest perfetto trace to `dest` (the profiler nests it deeply)."""
    shutil.copyfile(_newest_trace(log_dir), dest)


def device_events(path: str) -> list[dict]:
    """Complete ('X') events on accelerator timelines, sorted by start."""
    events = _load(path)
    devices = {
        e["pid"] for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
        and e["args"]["name"].startswith(("/device:GPU", "/device:TPU"))
    }
    return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in devices), key=lambda e: e["ts"])


def host_summary(log_dir: str, top: int = 25) -> str:
    """Host time by event name on the thread that dispatches (the one with the most
    PjRt Execute time): where a step's host work goes (Python frames the profiler
    records, dispatch, command-buffer update and launch). Nested events each count."""
    events = _load(_newest_trace(log_dir))
    hosts = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and not e["args"]["name"].startswith("/device:")}
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in hosts]
    executes = collections.Counter()
    for e in spans:
        if "Execute" in e["name"]:
            executes[(e["pid"], e["tid"])] += e["dur"]
    if not executes:
        return "no host dispatch events in the trace"
    thread = executes.most_common(1)[0][0]
    mine = [e for e in spans if (e["pid"], e["tid"]) == thread]
    span = max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for e in mine:
        groups[e["name"]].append(e["dur"])
    lines = [f"host: dispatching thread, span {span / 1e3:.2f} ms", f"{'total ms':>9} {'count':>6} {'mean us':>9}  event"]
    for name, durs in sorted(groups.items(), key=lambda x: -sum(x[1]))[:top]:
        lines.append(f"{sum(durs) / 1e3:9.3f} {len(durs):6d} {sum(durs) / len(durs):9.1f}  {name[:100]}")
    return "\n".join(lines)


def _load(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _merged(intervals) -> list[tuple[float, float]]:
    """The union of (start, end) intervals sorted by start, as disjoint intervals in order."""
    out: list[list[float]] = []
    for s, t in intervals:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t)
        else:
            out.append([s, t])
    return [(s, t) for s, t in out]


def gap_report(log_dir: str, min_gap_us: float = 20.0, top: int = 15, largest: int = 5) -> str:
    """What the host was doing while the device sat idle: every device gap of at least
    `min_gap_us` between the first and the last kernel, and the host events overlapping
    it, summed by name: first on the dispatching thread (the one with the most PjRt
    Execute time: the serving loop's annotations, dispatch, CUDA API calls), with how much
    of the gaps it spent in no traced event at all (Python outside the annotations, or
    waiting for the interpreter lock); then on the other threads (compiles, transfers).
    Then the largest gaps one by one. Nested events each count, so an outer annotation
    and the call inside it both show the overlap."""
    events = _load(_newest_trace(log_dir))
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = sorted((e for e in events if e.get("ph") == "X" and names.get(e.get("pid"), "").startswith(
        ("/device:GPU", "/device:TPU"))), key=lambda e: e["ts"])
    if not device:
        return "gaps: no device events in the trace (CPU backend?)"
    busy = _merged((e["ts"], e["ts"] + e["dur"]) for e in device)
    gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(busy, busy[1:]) if b_start - a_end >= min_gap_us]
    span = busy[-1][1] - busy[0][0]
    idle = span - sum(t - s for s, t in busy)
    held = sum(b - a for a, b in gaps)
    lines = [f"gaps: device idle {idle / 1e3:.2f} ms of a {span / 1e3:.2f} ms span; {len(gaps)} gaps of "
             f">= {min_gap_us:g} us hold {held / 1e3:.2f} ms"]
    if not gaps:
        return lines[0]
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("dur") is not None
                   and not names.get(e.get("pid"), "/device:").startswith("/device:")), key=lambda e: e["ts"])
    executes = collections.Counter()
    for e in host:
        if "Execute" in e["name"]:
            executes[(e["pid"], e["tid"])] += e["dur"]
    dispatcher = executes.most_common(1)[0][0] if executes else None
    per_gap: list[list[tuple[float, dict]]] = [[] for _ in gaps]
    total = {True: collections.Counter(), False: collections.Counter()}  # by "on the dispatching thread"
    touched = {True: collections.Counter(), False: collections.Counter()}
    covered = [[] for _ in gaps]  # the dispatching thread's event intervals inside each gap
    for e in host:  # gaps are few and sorted: a scan per event over the overlapping ones
        s, t = e["ts"], e["ts"] + e["dur"]
        mine = (e["pid"], e["tid"]) == dispatcher
        for i, (a, b) in enumerate(gaps):
            if a >= t:
                break
            over = min(b, t) - max(a, s)
            if over > 0:
                per_gap[i].append((over, e))
                total[mine][e["name"]] += over
                touched[mine][e["name"]] += 1
                if mine:
                    covered[i].append((max(a, s), min(b, t)))
    traced = sum(t - s for c in covered for s, t in _merged(sorted(c)))
    who = threads.get(dispatcher, str(dispatcher[1])) if dispatcher else "none found"
    lines.append(f"dispatching thread [{who}]: in traced events {traced / 1e3:.2f} ms of the gaps' {held / 1e3:.2f} "
                 f"ms; the rest untraced (Python outside the annotations, or waiting for the interpreter lock)")
    for mine, title in ((True, "on the dispatching thread"), (False, "on other threads")):
        lines.append(f"{'overlap ms':>10} {'gaps':>5}  host event {title}")
        for name, over in sorted(total[mine].items(), key=lambda x: -x[1])[:top]:
            lines.append(f"{over / 1e3:10.3f} {touched[mine][name]:5d}  {name[:110]}")
    order = sorted(range(len(gaps)), key=lambda i: gaps[i][0] - gaps[i][1])[:largest]
    for i in order:
        a, b = gaps[i]
        lines.append(f"gap of {b - a:.1f} us at +{(a - busy[0][0]) / 1e3:.3f} ms:")
        ranked = sorted(per_gap[i], key=lambda x: (-((x[1]["pid"], x[1]["tid"]) == dispatcher), -x[0]))
        for over, e in ranked[:8]:
            thread = threads.get((e["pid"], e["tid"]), str(e["tid"]))
            lines.append(f"  {over:9.1f} us  [{thread[:24]}] {e['name'][:90]}")
    return "\n".join(lines)


def _op(e: dict) -> str:
    args = e.get("args") or {}
    return args.get("hlo_op") or args.get("long_name") or e["name"]


def busy_us(events: list[dict]) -> float:
    """Device busy time in microseconds: the union of the kernel intervals (streams may
    overlap), so host gaps between programs do not count."""
    return sum(t - s for s, t in _merged((e["ts"], e["ts"] + e["dur"]) for e in events))


def device_busy_us(log_dir: str) -> float | None:
    """busy_us of the newest trace under log_dir; None without device events (CPU)."""
    events = device_events(_newest_trace(log_dir))
    return busy_us(events) if events else None


def summarize(log_dir: str, top: int = 30) -> str:
    events = device_events(_newest_trace(log_dir))
    if not events:
        return "no device events in the trace (CPU backend?)"
    busy = busy_us(events)
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    by_module: dict[str, float] = collections.Counter()
    for e in events:
        by_module[(e.get("args") or {}).get("hlo_module", "?")] += e["dur"]
    total = sum(e["dur"] for e in events)
    lines = [
        f"device span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({100 * busy / span:.1f}%), "
        f"{len(events)} kernels, kernel time {total / 1e3:.2f} ms",
        "modules: " + ", ".join(f"{m} {t / 1e3:.2f} ms" for m, t in sorted(by_module.items(), key=lambda x: -x[1])),
    ]
    # By XLA op (a command buffer groups many kernels) and by kernel name.
    for title, key in (("op", _op), ("kernel", lambda e: e["name"])):
        groups: dict[str, list[float]] = collections.defaultdict(list)
        for e in events:
            groups[key(e)].append(e["dur"])
        lines.append(f"{'total ms':>9} {'%':>6} {'count':>6} {'mean us':>9}  {title}")
        for name, durs in sorted(groups.items(), key=lambda x: -sum(x[1]))[:top]:
            s = sum(durs)
            lines.append(f"{s / 1e3:9.3f} {100 * s / total:6.2f} {len(durs):6d} {s / len(durs):9.1f}  {name[:110]}")
    # Kernels by duration: how much time goes to launches that do almost nothing.
    small = collections.Counter()
    for e in events:
        small[next(b for b in (2, 5, 20, 100, float("inf")) if e["dur"] < b)] += 1
    lines.append("kernels by duration (us): " + ", ".join(f"<{b}: {n}" for b, n in sorted(small.items())))
    # The largest idle gaps between consecutive kernels, where the device waited.
    gaps = []
    end = events[0]["ts"] + events[0]["dur"]
    for prev, e in zip(events, events[1:]):
        if e["ts"] > end:
            gaps.append((e["ts"] - end, _op(prev), _op(e)))
        end = max(end, e["ts"] + e["dur"])
    gaps.sort(reverse=True)
    idle = sum(g for g, *_ in gaps)
    buckets = collections.Counter()
    for g, *_ in gaps:
        buckets[next(b for b in (5, 20, 100, 1000, float("inf")) if g < b)] += g
    lines.append(
        f"idle {idle / 1e3:.2f} ms in {len(gaps)} gaps; by gap length (us): "
        + ", ".join(f"<{b}: {t / 1e3:.2f} ms" for b, t in sorted(buckets.items())) + "; largest:"
    )
    lines += [f"  {g:9.1f} us  after {a[:50]}  before {b[:50]}" for g, a, b in gaps[:8]]
    return "\n".join(lines)


if __name__ == "__main__":
    top = next((int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--top=")), 30)
    print(summarize(sys.argv[1], top))

"""runtime/profile.py on a synthetic perfetto trace (the real ones come from GPUs)."""

import gzip
import json
import os

from runtime import profile


def _write_trace(tmp_path):
    d = tmp_path / "plugins" / "profile" / "run"
    os.makedirs(d)
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "tid": 0, "ts": 0, "dur": 1000, "name": "host work"},
        # two gemv kernels of one command buffer, a 50 us gap, a small fusion overlapping on another stream
        {"ph": "X", "pid": 7, "tid": 1, "ts": 100, "dur": 40, "name": "gemv", "args": {"hlo_op": "cb_1", "hlo_module": "m"}},
        {"ph": "X", "pid": 7, "tid": 1, "ts": 140, "dur": 60, "name": "gemv", "args": {"hlo_op": "cb_1", "hlo_module": "m"}},
        {"ph": "X", "pid": 7, "tid": 2, "ts": 190, "dur": 20, "name": "loop_fusion", "args": {"hlo_op": "f", "hlo_module": "m"}},
        {"ph": "X", "pid": 7, "tid": 1, "ts": 260, "dur": 3, "name": "tiny", "args": {"hlo_op": "f2", "hlo_module": "m"}},
    ]
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)


def test_summary_counts_device_time_only(tmp_path):
    _write_trace(tmp_path)
    events = profile.device_events(profile._newest_trace(str(tmp_path)))
    assert [e["name"] for e in events] == ["gemv", "gemv", "loop_fusion", "tiny"]
    text = profile.summarize(str(tmp_path))
    # span 100..263 = 163 us; busy = 100..210 (110) + 3 = 113 us; one 50 us gap.
    assert "device span 0.16 ms, busy 0.11 ms (69.3%), 4 kernels, kernel time 0.12 ms" in text
    assert "   0.100  81.30      2      50.0  cb_1" in text
    assert "idle 0.05 ms in 1 gaps" in text
    assert "<5: 1" in text
    profile.keep_flat(str(tmp_path), str(tmp_path / "flat.json.gz"))
    assert profile.device_events(str(tmp_path / "flat.json.gz")) == events


def test_gap_report_names_the_host_work_during_device_gaps(tmp_path):
    d = tmp_path / "plugins" / "profile" / "run"
    os.makedirs(d)
    dev = {"pid": 7, "tid": 1, "ph": "X", "args": {"hlo_op": "k", "hlo_module": "m"}}
    engine = {"ph": "X", "pid": 1, "tid": 3}
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "xlserve-engine"}},
        {"ph": "M", "pid": 1, "tid": 4, "name": "thread_name", "args": {"name": "compile"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        # kernels 0-100 and 105-200 (a 5 us gap, under the threshold), then 300-400: one 100 us gap
        {**dev, "ts": 0, "dur": 100, "name": "a"},
        {**dev, "ts": 105, "dur": 95, "name": "b"},
        {**dev, "ts": 300, "dur": 100, "name": "c"},
        # the engine thread: an Execute (it dispatches), reading results 150-230 (30 us of
        # the gap), nothing traced 230-260, the launch 260-310 (40 us); a compile thread
        # throughout
        {**engine, "ts": 0, "dur": 10, "name": "PjRt Execute"},
        {**engine, "ts": 150, "dur": 80, "name": "xlserve.to_host"},
        {**engine, "ts": 260, "dur": 50, "name": "cuGraphLaunch"},
        {**engine, "ts": 400, "dur": 50, "name": "after"},
        {"ph": "X", "pid": 1, "tid": 4, "ts": 100, "dur": 300, "name": "CompileToBackendResult"},
    ]
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    lines = profile.gap_report(str(tmp_path)).splitlines()
    assert lines[0] == "gaps: device idle 0.10 ms of a 0.40 ms span; 1 gaps of >= 20 us hold 0.10 ms"
    assert lines[1].startswith("dispatching thread [xlserve-engine]: in traced events 0.07 ms of the gaps' 0.10 ms")
    mine = lines.index("overlap ms  gaps  host event on the dispatching thread")
    others = lines.index("overlap ms  gaps  host event on other threads")
    assert lines[mine + 1:others] == ["     0.040     1  cuGraphLaunch", "     0.030     1  xlserve.to_host"]
    assert lines[others + 1] == "     0.100     1  CompileToBackendResult"
    assert "after" not in "\n".join(lines)
    at = lines.index("gap of 100.0 us at +0.200 ms:")
    assert lines[at + 1:at + 4] == ["       40.0 us  [xlserve-engine] cuGraphLaunch",
                                    "       30.0 us  [xlserve-engine] xlserve.to_host",
                                    "      100.0 us  [compile] CompileToBackendResult"]
    assert profile.gap_report(str(tmp_path), min_gap_us=200).endswith("0 gaps of >= 200 us hold 0.00 ms")

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

"""sharding/distributed.py and sharding/channel.py without processes: the wire format,
the leader's watchdog and the follower loop over an in-memory key-value store (tests/sharding/test_multiprocess.py
runs the real thing: two processes, gloo)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import jax
import numpy as np
import pytest

from sharding import distributed
from sharding.channel import BLOCK, decode, encode
from sharding.distributed import Cluster, ClusterError, DistributedConfig, Leader

TIMEOUT_S = 0.4


class FakeKV:
    """The distributed client's key-value calls, in memory."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def key_value_set_bytes(self, key, value, allow_overwrite=False):
        with self.cond:
            assert allow_overwrite or key not in self.data, key
            self.data[key] = bytes(value)
            self.cond.notify_all()

    def key_value_set(self, key, value, allow_overwrite=False):
        self.key_value_set_bytes(key, value.encode(), allow_overwrite)

    def key_value_try_get_bytes(self, key):
        with self.cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.data[key]

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    def key_value_delete(self, key):
        with self.cond:
            for k in [k for k in self.data if k == key or k.startswith(key + "/")]:
                del self.data[k]


@pytest.fixture
def exits(monkeypatch):
    """Records the hard exits instead of making them."""
    codes: list[int] = []
    monkeypatch.setattr(distributed, "_hard_exit", codes.append)
    return codes


@pytest.fixture
def make_leader(exits):
    """Leader(...) whose watchdog is stopped after the test, while exits are still recorded."""
    leaders: list[Leader] = []

    def make(*args, **kwargs) -> Leader:
        leaders.append(Leader(*args, **kwargs))
        return leaders[-1]

    yield make
    for leader in leaders:
        leader.close()


def _cluster(kv, pid=0, n=2) -> Cluster:
    return Cluster(DistributedConfig("localhost:1", n, pid, timeout_s=TIMEOUT_S), pid, n, kv)


def _beat(kv, pid, beat, *, received=-1, done=-1, error=None):
    kv.key_value_set(f"xlserve/status/{pid}", json.dumps(
        dict(beat=beat, state="ready", received=received, done=done, error=error)), allow_overwrite=True)


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_the_wire_format_round_trips_arrays_dicts_and_scalars():
    calls = [
        ("prefill", dict(tokens=np.arange(12, dtype=np.int32).reshape(3, 4), is_last=np.array([True, False, True]),
                         sampling=dict(temperature=np.array([0.0, 0.7], np.float32), seed=np.array([1, 2], np.uint32)),
                         starts=np.zeros(3, np.int32), empty=np.zeros((0, 5), np.float32))),
        ("release", dict(slot=3)),
        ("stop", dict(code=None, note="x", scale=0.5, flag=False)),
    ]
    t, got = decode(encode(calls, 123.5))
    assert t == 123.5 and [name for name, _ in got] == ["prefill", "release", "stop"]
    for (_, want), (_, have) in zip(calls, got):
        assert want.keys() == have.keys()
        for k, v in want.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    assert have[k][kk].dtype == vv.dtype and np.array_equal(have[k][kk], vv)
            elif isinstance(v, np.ndarray):
                assert have[k].dtype == v.dtype and have[k].shape == v.shape and np.array_equal(have[k], v)
            else:
                assert have[k] == v and type(have[k]) is type(v)
    with pytest.raises(TypeError, match="cannot broadcast an argument of type object"):
        encode([("decode", dict(page_table=object()))], 0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "go together"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes=0"),
    (dict(timeout_s=0), "worker_timeout_s=0"),
])
def test_bad_flags_fail_with_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_a_silent_follower_fails_the_leader_after_the_timeout(exits, make_leader):
    kv = FakeKV()
    _beat(kv, 1, 1)
    start = time.monotonic()
    leader = make_leader(_cluster(kv))  # no on_failure: it exits at once (recorded)
    _wait(lambda: exits)
    assert exits == [distributed.EXIT_FAILED]
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 1.0
    assert isinstance(leader.failed, ClusterError) and "process 1 sent no heartbeat" in str(leader.failed)
    with pytest.raises(ClusterError, match="the cluster failed"):  # no more calls go out
        leader.publish([("decode", dict(page_table=np.zeros((2, 2), np.int32)))])


def test_a_device_call_that_makes_no_progress_fails_the_leader(exits, make_leader):
    kv = FakeKV()
    reported = []
    leader = make_leader(_cluster(kv), on_failure=reported.append, exit_grace_s=0.0)
    leader.publish([("warmup", {})])
    leader.publish([("decode", dict(page_table=np.zeros((2, 2), np.int32)))])  # message 1
    stop = threading.Event()

    def follower():  # beats on, but message 1 never finishes
        beat = 0
        while not stop.is_set():
            beat += 1
            _beat(kv, 1, beat, received=1, done=0)
            time.sleep(0.02)

    threading.Thread(target=follower, daemon=True).start()
    try:
        _wait(lambda: reported)
    finally:
        stop.set()
    assert "process 1 has not finished message 1 (process 0 sent up to 1)" in str(reported[0])
    assert "a device call hangs" in str(reported[0])


def test_a_follower_error_fails_the_leader_with_its_message(exits, make_leader):
    kv = FakeKV()
    reported = []
    _beat(kv, 1, 1, error="loading the engine failed: OSError('disk')")
    make_leader(_cluster(kv), on_failure=reported.append, exit_grace_s=0.0)
    _wait(lambda: reported)
    assert "process 1 failed: loading the engine failed: OSError('disk')" in str(reported[0])


class FakeEngine:
    def __init__(self):
        self.calls = []
        self.ecfg, self.cfg, self.num_pages = "ecfg", "cfg", 7

    def warmup(self):
        self.calls.append(("warmup",))
        return 0

    def prefill(self, **kw):
        self.calls.append(("prefill", int(kw["tokens"][0, 0])))
        return {"tokens": np.zeros(2, np.int32)}

    def decode(self, page_table, mode="filter"):
        self.calls.append(("decode", int(page_table[0, 0]), mode))
        return {"tokens": np.zeros((1, 2), np.int32)}

    def release(self, slot):
        self.calls.append(("release", slot))

    def seed_prompt_mask(self, slot, tokens):
        self.calls.append(("seed_prompt_mask", slot, [int(t) for t in tokens]))


def test_the_follower_makes_the_leaders_calls_in_order_and_stops(exits, make_leader):
    kv = FakeKV()
    leader = make_leader(_cluster(kv), on_failure=lambda e: pytest.fail(str(e)), exit_grace_s=0.0)
    mine, theirs = FakeEngine(), FakeEngine()
    result = {}
    follower = threading.Thread(target=lambda: result.update(code=distributed.follow(_cluster(kv, pid=1),
                                                                                      lambda: theirs)), daemon=True)
    try:
        follower.start()
        engine = leader.attach(mine)
        engine.warmup()
        engine.prefill(tokens=np.full((1, 4), 5, np.int32), starts=np.zeros(1, np.int32))
        engine.release(0)  # goes out with the next call
        engine.seed_prompt_mask(1, [7, 8, 9])  # so does this
        engine.decode(np.full((2, 3), 9, np.int32), mode="greedy")
        for i in range(BLOCK):  # a block's worth: read, then deleted
            engine.decode(np.full((2, 3), i, np.int32))
        _wait(lambda: not any(k.startswith("xlserve/calls/0/") for k in kv.data))
        assert leader.finish(0) == 0
        follower.join(5)
    finally:
        leader.close()
    assert result == {"code": 0} and not exits
    assert theirs.calls == mine.calls
    assert theirs.calls[:6] == [("warmup",), ("prefill", 5), ("release", 0), ("seed_prompt_mask", 1, [7, 8, 9]),
                                ("decode", 9, "greedy"), ("decode", 0, "filter")]
    assert leader.stats.count == 4 + BLOCK  # the release and the mask rode with a decode; stop counted
    assert "publish p50" in leader.stats.summary()


def test_a_follower_with_a_different_engine_is_refused(exits, make_leader):
    kv = FakeKV()
    leader = make_leader(_cluster(kv), on_failure=lambda e: None, exit_grace_s=0.0)
    _beat(kv, 1, 1)
    kv.key_value_set_bytes("xlserve/hello/1", b"('other', 'cfg', 7)")
    with pytest.raises(ClusterError, match="process 1 built a different engine than process 0"):
        leader.attach(FakeEngine())


@dataclasses.dataclass(frozen=True)
class Sizes:  # sharding.mesh.MeshConfig's fields
    tensor: int | None = 1
    pipeline: int = 1
    data: int = 1


def test_the_mesh_of_several_processes_spans_all_their_devices(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    cluster = _cluster(FakeKV())
    assert distributed.mesh_config_for(None, Sizes(tensor=None)) == Sizes(tensor=None)  # one process: as given
    assert distributed.mesh_config_for(cluster, Sizes(tensor=None)) == Sizes(tensor=8)
    assert distributed.mesh_config_for(cluster, Sizes(tensor=None, pipeline=2)) == Sizes(tensor=4, pipeline=2)
    assert distributed.mesh_config_for(cluster, Sizes(tensor=4, pipeline=2)) == Sizes(tensor=4, pipeline=2)
    with pytest.raises(ValueError, match=r"2 processes hold 8 devices .* is 4 devices; use --tensor_parallel_size=8"):
        distributed.mesh_config_for(cluster, Sizes(tensor=4))

"""The channel of a multi-process run (sharding/distributed.py): engine calls as
compact messages in the key-value store of jax's coordination service.

A message is [(name, kwargs)] encoded as a little-endian u32 header length, a JSON
header (the send time, the call names, per argument a value or an array's dtype,
shape and offset) and the arrays' raw bytes: no pickle, nothing executable. Message n
lives under `xlserve/calls/<n // BLOCK>/<n>`, so the leader deletes BLOCK of them with
one call once every follower has read them; heartbeats and hellos live beside them.
"""

from __future__ import annotations

import collections
import json
import threading

import numpy as np

PREFIX = "xlserve"
BLOCK = 256  # messages per key directory, deleted together once every follower has read them
LEADER_BEAT = f"{PREFIX}/leader"


def encode(calls: list[tuple[str, dict]], sent_at: float) -> bytes:
    """[(name, kwargs)] -> bytes: a length-prefixed JSON header, then the arrays' bytes.
    kwargs values: numpy arrays, dicts of them, None, bool, int, float, str."""
    chunks: list[bytes] = []
    offset = 0

    def spec(value):
        nonlocal offset
        if isinstance(value, dict):
            return {"d": {k: spec(v) for k, v in value.items()}}
        if isinstance(value, (np.ndarray, np.generic)):
            a = np.ascontiguousarray(value)
            chunks.append(a.tobytes())
            out = {"a": [a.dtype.str, list(a.shape), offset]}
            offset += a.nbytes
            return out
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"v": value}
        raise TypeError(f"cannot broadcast an argument of type {type(value).__name__}")

    header = json.dumps({"t": sent_at, "calls": [[name, {k: spec(v) for k, v in kw.items()}] for name, kw in calls]},
                        separators=(",", ":")).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(chunks)


def decode(data: bytes) -> tuple[float, list[tuple[str, dict]]]:
    n = int.from_bytes(data[:4], "little")
    header = json.loads(data[4:4 + n])
    body = memoryview(data)[4 + n:]

    def value(s):
        if "d" in s:
            return {k: value(v) for k, v in s["d"].items()}
        if "a" in s:
            dtype, shape, offset = s["a"]
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            return np.frombuffer(body, dtype, count, offset).reshape(shape)
        return s["v"]

    return header["t"], [(name, {k: value(v) for k, v in kw.items()}) for name, kw in header["calls"]]


def call_key(seq: int) -> str:
    return f"{PREFIX}/calls/{seq // BLOCK}/{seq}"


def status_key(pid: int) -> str:
    return f"{PREFIX}/status/{pid}"


def hello_key(pid: int) -> str:
    return f"{PREFIX}/hello/{pid}"


def block_key(block: int) -> str:
    return f"{PREFIX}/calls/{block}"


def try_get(client, key: str) -> bytes | None:
    try:
        return client.key_value_try_get_bytes(key)
    except Exception as e:  # noqa: BLE001 -- jax raises JaxRuntimeError(NOT_FOUND: ...)
        if "NOT_FOUND" in str(e):
            return None
        raise


def get(client, key: str, timeout_s: float) -> bytes | None:
    """The value of `key` once set, or None after `timeout_s`."""
    try:
        return client.blocking_key_value_get_bytes(key, max(1, int(timeout_s * 1000)))
    except Exception as e:  # noqa: BLE001 -- JaxRuntimeError(DEADLINE_EXCEEDED: ...)
        if "DEADLINE_EXCEEDED" in str(e):
            return None
        raise


class Stats:
    """Per-message cost of the broadcast: seconds (the last 4096 kept) and bytes."""

    def __init__(self, what: str):
        self.what = what
        self.count = 0
        self.bytes = 0
        self._seconds: collections.deque[float] = collections.deque(maxlen=4096)
        self._lock = threading.Lock()

    def add(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            self.count += 1
            self.bytes += nbytes
            self._seconds.append(seconds)

    def summary(self) -> str:
        with self._lock:
            if not self.count:
                return "0 messages"
            s = np.asarray(self._seconds) * 1e3
            return (f"{self.count} messages, {self.bytes / self.count:.0f} bytes mean; {self.what} "
                    f"p50 {np.percentile(s, 50):.2f} ms, p90 {np.percentile(s, 90):.2f} ms, "
                    f"p99 {np.percentile(s, 99):.2f} ms, max {s.max():.2f} ms")

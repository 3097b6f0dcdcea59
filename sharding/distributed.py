"""Several processes (hosts), one server: process 0 drives, every process makes the same calls.

With a mesh over the devices of several processes no process can address the whole
mesh: each runs its share of every compiled call and XLA's collectives (gloo on CPU,
ICI / NCCL on accelerators) join the shares. Every process must therefore issue the
identical sequence of compiled calls with identical arguments, or the collectives of
different calls meet and the hosts hang. Process 0, the leader, owns the gRPC server,
tokenizer, scheduler and orchestrator; its engine is a `LeaderEngine`, which publishes
every engine call (name and numpy arguments: the step's prefill chunks, page tables,
slot ids, sampling rows, slot releases) before making it. Every other process, a
follower, builds the same engine from the same flags and `follow`s: it receives the
calls in order and makes them on its own engine. Its outputs are replicated copies of
the leader's and are never read. Nothing but these calls touches the devices after
start-up, so the hosts cannot diverge.

The channel is the key-value store of the coordination service that
`jax.distributed.initialize` starts in process 0 (the distributed client's
`key_value_set_bytes` / `blocking_key_value_get_bytes`): message n, the calls made
since message n-1, is stored under `xlserve/calls/<n // 256>/<n>` in a compact
encoding (a JSON header, then the raw array bytes; no pickle: sharding/channel.py).
The leader deletes a block of 256 once every follower has read past it.

Why not `jax.experimental.multihost_utils.broadcast_one_to_all`: measured on a 2-core
CPU machine, 2 processes on one host, nothing else running, 2 KB messages: the
key-value store takes 0.74 ms to publish (median; p90 0.94 ms) and the follower has
the message 0.61 ms after it was sent; broadcast_one_to_all took 3.7 ms median (p90
8-9 ms) on both sides. It also needs the receiver to know the shape (two rounds for a
message of variable size) and leaves an idle follower blocked inside a device
collective with no timeout, unable to tell an idle leader from a dead one; a
key-value get has a timeout. While serving (tests/sharding/test_multiprocess.py:
~220-byte messages, both processes busy on the two cores) a message takes 2.4-2.9 ms
median to publish and 1.4 ms median to receive (from when the follower is ready for
it), per engine call (a step makes one or two). Each process logs its side when it
stops: "xlserve: broadcast to 1 processes: 128 messages, 223 bytes mean; publish p50
..." on process 0, "xlserve: process 1 followed ...; receive latency p50 ..." on the
others. Publishing is synchronous, before process 0's own call, so its cost is on
process 0's host path each call.

Liveness. Every process writes a heartbeat key every `interval_s` from a thread;
followers put in it the last message they received and the last one whose device
work finished. The leader's watchdog fails the cluster when a follower's heartbeat
stops for `timeout_s` (dead, or stuck so badly its threads do not run), when a
follower reports an error, and when a follower has not finished the latest prefill or
decode call and made no progress for `timeout_s` (a hung device call: a collective
whose peer went away hangs instead of failing). Failing means: one line on stderr,
`on_failure` (the server's: health NOT_SERVING, requests in flight get UNAVAILABLE),
and `os._exit(1)` after `exit_grace_s`, so the exit is bounded even when the engine
thread is stuck in a device call and even when jax's own exit handler would wait for
the dead peer at its shutdown barrier. A follower whose leader's heartbeat stops for
`timeout_s`, or whose coordination service (in process 0) is gone, exits 1 the same
way (when process 0 is killed, jax's own coordination agent usually aborts the
follower first: SIGABRT, exit 134, within a second on localhost). Warm-up is exempt
from the hang check (compiling takes longer than any sane timeout), not from the
heartbeat; a compilation after warm-up (itself a bug: the manifest missed a shape)
that takes a follower longer than `timeout_s` is taken for a hang.

Shutdown: `Leader.finish(0)` (the server drained after SIGTERM) publishes "stop";
followers make the calls before it, say "stopped" and exit 0. A follower that gets
SIGTERM itself keeps following (the launcher usually signals every host; the leader
drains and stops it) for `sigterm_grace_s`, then exits 1.

Start-up: `initialize` with --coordinator_address, --num_processes, --process_id, or
with none of them on a Cloud TPU VM, where jax detects the slice's hosts. Each process
then loads the checkpoint itself (Orbax restores into the mesh's shardings: a process
places only its own devices' shards; no Orbax option is needed, every process takes
part in the restore). The converter stores each parameter as one chunk, though, so
each process still reads every parameter's bytes from storage (measured: 82-84 MB read
per process for a 65 MB checkpoint, 2 processes x 4 devices): reading only its shards
needs chunks split along the tensor axes at conversion. Before serving, the leader
compares each follower's engine (configs, KV pages) with its own.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sharding.channel import (
    BLOCK, LEADER_BEAT, Stats, block_key, call_key, decode, encode, get, hello_key, status_key, try_get,
)

log = logging.getLogger(__name__)

# The engine calls a follower makes; prefill and decode have device outputs it waits for.
ENGINE_CALLS = ("warmup", "prefill", "decode", "release", "seed_prompt_mask")
DEVICE_CALLS = ("prefill", "decode")
EXIT_FAILED = 1


class ClusterError(RuntimeError):
    """A process of the cluster died, hung, failed, or built a different engine."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (runtime.flags: --coordinator_address,
    --num_processes, --process_id, --worker_timeout_s)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: float = 30.0

    def __post_init__(self):
        given = [v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together (all or none)")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num_processes={self.num_processes} must be >= 1")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            raise ValueError(f"--process_id={self.process_id} must be in [0, --num_processes={self.num_processes})")
        if self.timeout_s <= 0:
            raise ValueError(f"--worker_timeout_s={self.timeout_s} must be > 0")

    @property
    def explicit(self) -> bool:
        return self.num_processes is not None

    @property
    def interval_s(self) -> float:
        """Heartbeat period: a few beats per timeout, at most one a second."""
        return min(1.0, self.timeout_s / 4)


@dataclasses.dataclass
class Cluster:
    """This process's place in an initialized multi-process run."""

    config: DistributedConfig
    process_id: int
    num_processes: int
    client: Any  # jax's distributed runtime client (the key-value store)

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def followers(self) -> range:
        return range(1, self.num_processes)


def initialize(config: DistributedConfig) -> Cluster | None:
    """Joins the multi-process run that `config` (or, with no flags, a Cloud TPU VM
    slice) describes; None when this is the only process. Call before anything uses
    jax's backend. On CPU the cross-process collectives are gloo's. Raises ClusterError
    when the run cannot be joined (jax waits up to 5 minutes for every process)."""
    import jax
    from jax._src import cloud_tpu_init

    if not config.explicit and not cloud_tpu_init.running_in_cloud_tpu_vm:
        return None
    if config.explicit and config.num_processes == 1:
        return None
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Unused here, and its SIGTERM handler would compete with the drain's.
    jax.config.update("jax_enable_preemption_service", False)
    kwargs = {}
    if config.explicit:
        kwargs = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                      process_id=config.process_id)
    try:
        # jax's own heartbeat check aborts the process; ours (NOT_SERVING first) must come first.
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=max(100, int(3 * config.timeout_s)))
    except Exception as e:  # noqa: BLE001 -- JaxRuntimeError, RuntimeError, ValueError from detection
        where = (f"process {config.process_id} of {config.num_processes} at {config.coordinator_address}"
                 if config.explicit else "the hosts of this Cloud TPU VM slice (detected; --num_processes=1 runs "
                 "this host alone)")
        raise ClusterError(f"cannot join the multi-process run as {where}: {e}") from None
    if jax.process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed

    cluster = Cluster(config, jax.process_index(), jax.process_count(), jax_distributed.global_state.client)
    _native_stdout_to_stderr()
    print(f"xlserve: process {cluster.process_id} of {cluster.num_processes}; {jax.local_device_count()} of "
          f"{jax.device_count()} devices here", file=sys.stderr, flush=True)
    return cluster


def _native_stdout_to_stderr() -> None:
    """Native code's prints (gloo's "[Gloo] Rank 0 is connected to 7 peer ranks" lines)
    go to stderr; Python's sys.stdout keeps the real stdout, which may be the output
    (runtime.generate --format=jsonl)."""
    try:
        sys.stdout.flush()
        out = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):  # no real file descriptors (an embedding host): leave them
        return
    sys.stdout = os.fdopen(out, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def mesh_config_for(cluster: Cluster | None, mesh_config):
    """The mesh sizes (sharding.mesh.MeshConfig) of a multi-process run: the mesh must
    take every process's devices (a process with none in it would have nothing to run),
    so a tensor size left open takes all of them over the pipeline and data sizes, and
    a given one must add up to them (ValueError naming the size that works)."""
    import jax

    if cluster is None:
        return mesh_config
    n, other = jax.device_count(), mesh_config.pipeline * mesh_config.data
    if mesh_config.tensor is None and n % other == 0:
        return dataclasses.replace(mesh_config, tensor=n // other)
    if mesh_config.tensor is None or mesh_config.tensor * other != n:
        given = "open" if mesh_config.tensor is None else f"{mesh_config.tensor * other} devices"
        hint = f"use --tensor_parallel_size={n // other}" if n % other == 0 else "use sizes whose product is that"
        raise ValueError(f"{cluster.num_processes} processes hold {n} devices and the mesh must span all of them, "
                         f"but tensor x pipeline x data is {given}; {hint}")
    return mesh_config


def engine_fingerprint(engine) -> str:
    """What must be equal on every process for the calls to mean the same thing."""
    return repr((engine.ecfg, engine.cfg, engine.num_pages))


def _hard_exit(code: int) -> None:
    """Exits now: jax's exit handler would wait for a dead or hung peer at its shutdown
    barrier, and the engine thread may be stuck in a device call."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


# --- process 0 -------------------------------------------------------------------------------


class Leader:
    """Process 0's side: publishes engine calls and watches the followers (see the
    module docstring). When the cluster fails, `on_failure(exc)` is called once from
    the watchdog thread; its owner should exit within `exit_grace_s` (the server keeps
    answering health NOT_SERVING that long), and the watchdog exits the process 5 s
    after that in any case. Without `on_failure` the process exits at once."""

    def __init__(self, cluster: Cluster, *, on_failure: Callable[[BaseException], None] | None = None,
                 exit_grace_s: float = 2.0):
        assert cluster.is_leader
        self.cluster = cluster
        self.on_failure = on_failure
        self.exit_grace_s = exit_grace_s
        self.stats = Stats("publish")
        self.failed: BaseException | None = None
        self._client = cluster.client
        self._seq = 0
        self._device_seq = -1  # the latest message with a prefill or decode call
        self._deferred: list[tuple[str, dict]] = []
        self._lock = threading.Lock()  # one publisher at a time
        self._fail_lock = threading.Lock()
        self._stopping = threading.Event()
        self._deleted_blocks = 0
        self._watchdog = threading.Thread(target=self._watch, name="xlserve-watchdog", daemon=True)
        self._watchdog.start()

    # --- the engine thread ---------------------------------------------------------------

    def publish(self, calls: list[tuple[str, dict]]) -> None:
        """Sends the deferred calls and `calls` as the next message; raises ClusterError
        once the cluster has failed (the call is not made: the followers are gone)."""
        with self._lock:
            if self.failed is not None:
                raise ClusterError(f"the cluster failed: {self.failed}")
            calls, self._deferred = self._deferred + calls, []
            data = encode(calls, time.time())
            t = time.perf_counter()
            self._client.key_value_set_bytes(call_key(self._seq), data)
            self.stats.add(time.perf_counter() - t, len(data))
            if any(name in DEVICE_CALLS for name, _ in calls):
                self._device_seq = self._seq
            self._seq += 1

    def defer(self, call: tuple[str, dict]) -> None:
        """Sends `call` with the next message (a slot release: no collective needs it now)."""
        with self._lock:
            self._deferred.append(call)

    def attach(self, engine) -> "LeaderEngine":
        """`engine` behind a LeaderEngine, after every follower said it built the same one."""
        mine = engine_fingerprint(engine)
        for pid in self.cluster.followers:
            theirs = self._wait_for(hello_key(pid), f"process {pid} to build its engine")
            if theirs.decode() != mine:
                raise ClusterError(f"process {pid} built a different engine than process 0; start every process "
                                   f"with the same flags and checkpoint.\n  process 0: {mine}\n  process {pid}: "
                                   f"{theirs.decode()}")
        log.info("all %d processes built the same engine", self.cluster.num_processes)
        return LeaderEngine(engine, self)

    def _wait_for(self, key: str, what: str) -> bytes:
        while True:
            if self.failed is not None:
                raise ClusterError(f"waiting for {what}: the cluster failed: {self.failed}")
            value = get(self._client, key, self.cluster.config.interval_s)
            if value is not None:
                return value

    # --- the main thread -----------------------------------------------------------------

    def finish(self, code: int) -> int:
        """Stops the followers and returns the exit code: with `code` 0 (a drained server)
        they exit 0 once they have made every call before the stop, and this returns 0
        once all of them said so. With another code, a failed cluster, or a follower that
        does not stop within the timeout, they are told to exit (where they still can)
        and this process exits at once (`_hard_exit`: jax's exit handler would wait for
        them)."""
        if self.failed is not None:
            code = code or EXIT_FAILED
        else:
            try:
                self.publish([("stop", {"code": code})])
            except Exception as e:  # noqa: BLE001 -- they will see this process go
                log.warning("could not tell the followers to stop: %s", e)
                code = code or EXIT_FAILED
        print(f"xlserve: broadcast to {self.cluster.num_processes - 1} processes: {self.stats.summary()}",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.cluster.config.timeout_s
        for pid in self.cluster.followers if code == 0 else ():
            while (status := self._status(pid)) is None or status.get("state") != "stopped":
                if time.monotonic() > deadline or self.failed is not None:
                    print(f"error: process {pid} did not stop within {self.cluster.config.timeout_s:g} s",
                          file=sys.stderr, flush=True)
                    code = EXIT_FAILED
                    break
                time.sleep(0.05)
        self.close()
        if code != 0:
            _hard_exit(code)
        return code

    def close(self) -> None:
        """Stops the watchdog (and, once the cluster failed, its exit backstop)."""
        self._stopping.set()
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(5)

    # --- the watchdog thread -------------------------------------------------------------

    def _status(self, pid: int) -> dict | None:
        try:
            raw = try_get(self._client, status_key(pid))
        except Exception:  # noqa: BLE001 -- unreadable: counts as no heartbeat
            return None
        return None if raw is None else json.loads(raw)

    def _watch(self) -> None:
        cfg = self.cluster.config
        start = time.monotonic()
        seen = {pid: (None, start) for pid in self.cluster.followers}  # last beat, when it changed
        behind: dict[int, tuple[int, float]] = {}  # pid -> (done, since) while behind the leader's device calls
        beat = 0
        while not self._stopping.wait(cfg.interval_s):
            beat += 1
            try:
                self._client.key_value_set(LEADER_BEAT, str(beat), allow_overwrite=True)
            except Exception as e:  # noqa: BLE001 -- the coordination service is in this process
                log.warning("heartbeat: %s", e)
            now = time.monotonic()
            received = []
            for pid in self.cluster.followers:
                status = self._status(pid)
                if status is not None and status["beat"] != seen[pid][0]:
                    seen[pid] = (status["beat"], now)
                if now - seen[pid][1] > cfg.timeout_s:
                    return self._fail(ClusterError(f"process {pid} sent no heartbeat for {now - seen[pid][1]:.1f} s "
                                                   f"(--worker_timeout_s={cfg.timeout_s:g}): it died or hangs"))
                if status is None:
                    received.append(-1)
                    continue
                if status.get("error"):
                    return self._fail(ClusterError(f"process {pid} failed: {status['error']}"))
                received.append(status["received"])
                done, device_seq = status["done"], self._device_seq
                if done >= device_seq:
                    behind.pop(pid, None)
                elif pid not in behind or behind[pid][0] != done:
                    behind[pid] = (done, now)
                elif now - behind[pid][1] > cfg.timeout_s:
                    return self._fail(ClusterError(
                        f"process {pid} has not finished message {done + 1} (process 0 sent up to {device_seq}) "
                        f"for {now - behind[pid][1]:.1f} s (--worker_timeout_s={cfg.timeout_s:g}): a device call "
                        f"hangs"))
            self._delete_read_blocks(min(received, default=-1))

    def _delete_read_blocks(self, min_received: int) -> None:
        while (self._deleted_blocks + 1) * BLOCK <= min_received + 1:
            try:
                self._client.key_value_delete(block_key(self._deleted_blocks))
            except Exception as e:  # noqa: BLE001
                log.warning("deleting read messages: %s", e)
                return
            self._deleted_blocks += 1

    def _fail(self, exc: BaseException) -> None:
        with self._fail_lock:
            if self.failed is not None:
                return
            self.failed = exc
        print(f"error: {exc}; stopping", file=sys.stderr, flush=True)
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:  # noqa: BLE001
                log.exception("reporting the cluster failure failed")
            if self._stopping.wait(self.exit_grace_s + 5):  # the owner exits first unless it is stuck
                return
        print(f"xlserve: broadcast to {self.cluster.num_processes - 1} processes: {self.stats.summary()}",
              file=sys.stderr, flush=True)
        _hard_exit(EXIT_FAILED)


class LeaderEngine:
    """The engine of process 0: each call is published to the followers, then made.
    Everything else (configs, manifest, slots) is the wrapped engine's."""

    def __init__(self, engine, leader: Leader):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_leader", leader)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def warmup(self) -> int:
        self._leader.publish([("warmup", {})])
        return self._engine.warmup()

    def prefill(self, **kwargs):
        self._leader.publish([("prefill", kwargs)])
        return self._engine.prefill(**kwargs)

    def decode(self, page_table, mode: str = "filter"):
        self._leader.publish([("decode", {"page_table": page_table, "mode": mode})])
        return self._engine.decode(page_table, mode=mode)

    def mixes(self, *shape) -> bool:
        return False  # followers make prefill and decode calls (sharded engines compile no mixed calls)

    def release(self, slot: int) -> None:
        self._leader.defer(("release", {"slot": int(slot)}))
        self._engine.release(slot)

    def seed_prompt_mask(self, slot: int, tokens) -> None:
        self._leader.defer(("seed_prompt_mask", {"slot": int(slot), "tokens": np.asarray(tokens, np.int32)}))
        self._engine.seed_prompt_mask(slot, tokens)


# --- the other processes ---------------------------------------------------------------------


class _Follower:
    def __init__(self, cluster: Cluster, sigterm_grace_s: float):
        self.cluster = cluster
        self.client = cluster.client
        self.stats = Stats("receive latency")
        self.sigterm_grace_s = sigterm_grace_s
        self.state = "loading"
        self.received = -1
        self.done = -1
        self.error: str | None = None
        self.lost: str | None = None  # why the leader is taken for gone
        self.sigterm_deadline: float | None = None
        self._completions: collections.deque = collections.deque()
        self._completion_ready = threading.Condition()
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="xlserve-heartbeat", daemon=True).start()
        threading.Thread(target=self._complete, name="xlserve-completions", daemon=True).start()

    def _status(self, beat: int) -> bytes:
        return json.dumps(dict(beat=beat, state=self.state, received=self.received, done=self.done,
                               error=self.error)).encode()

    def _heartbeat(self) -> None:
        cfg = self.cluster.config
        beat, leader_beat, leader_seen, failing_since = 0, None, time.monotonic(), None
        while True:
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set_bytes(status_key(self.cluster.process_id), self._status(beat),
                                                allow_overwrite=True)
                value = try_get(self.client, LEADER_BEAT)
                failing_since = None
                if value != leader_beat:
                    leader_beat, leader_seen = value, now
            except Exception as e:  # noqa: BLE001 -- the coordination service (process 0) is gone
                failing_since = failing_since or now
                if now - failing_since > cfg.timeout_s:
                    self._lose(f"process 0's coordination service is unreachable: {e}")
            if self.state == "stopped":
                return
            if now - leader_seen > cfg.timeout_s:
                self._lose(f"process 0 sent no heartbeat for {now - leader_seen:.1f} s "
                           f"(--worker_timeout_s={cfg.timeout_s:g})")
            if self._stop.wait(cfg.interval_s):
                return

    def _lose(self, why: str) -> None:
        print(f"error: process {self.cluster.process_id}: {why}; exiting", file=sys.stderr, flush=True)
        self._log_stats()
        _hard_exit(EXIT_FAILED)

    def _complete(self) -> None:
        """Marks messages done in order once their device work has finished."""
        import jax

        while True:
            with self._completion_ready:
                while not self._completions:
                    self._completion_ready.wait()
                seq, out = self._completions.popleft()
            if out is not None:
                try:
                    jax.block_until_ready(out)
                except Exception as e:  # noqa: BLE001 -- the leader reads the same failure from its copy
                    log.warning("engine call %d failed on the device: %s", seq, e)
            self.done = seq

    def _log_stats(self) -> None:
        print(f"xlserve: process {self.cluster.process_id} followed {self.stats.summary()}", file=sys.stderr,
              flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        if self.sigterm_deadline is None:
            self.sigterm_deadline = time.monotonic() + self.sigterm_grace_s
            print(f"xlserve: process {self.cluster.process_id}: {signal.Signals(signum).name}: following until "
                  f"process 0 stops (at most {self.sigterm_grace_s:g} s)", file=sys.stderr, flush=True)

    def _receive(self, seq: int) -> bytes:
        while True:
            try:
                data = get(self.client, call_key(seq), self.cluster.config.interval_s)
            except Exception as e:  # noqa: BLE001 -- the coordination service (process 0) is gone
                self._lose(f"process 0's coordination service is unreachable: {e}")
            if data is not None:
                return data
            if self.sigterm_deadline is not None and time.monotonic() > self.sigterm_deadline:
                self._lose("signalled, and process 0 did not stop this process in time")

    def run(self, engine) -> int:
        self.state = "ready"
        seq = 0
        while True:
            waiting_since = time.time()
            data = self._receive(seq)
            sent_at, calls = decode(data)
            # From when the message was there and this process ready for it (a message
            # that waited for this process's own work, e.g. warm-up, is not the channel's).
            self.stats.add(time.time() - max(sent_at, waiting_since), len(data))
            out = None
            for name, kwargs in calls:
                if name == "stop":
                    self.received = seq
                    self.state = "stopped"
                    self._stop.set()
                    self.client.key_value_set_bytes(status_key(self.cluster.process_id), self._status(-1),
                                                    allow_overwrite=True)
                    self._log_stats()
                    return int(kwargs.get("code") or 0)
                if name not in ENGINE_CALLS:
                    raise ClusterError(f"message {seq}: unknown call {name!r}")
                try:
                    result = getattr(engine, name)(**kwargs)
                except Exception:  # noqa: BLE001 -- the leader's same call raised the same (its requests fail)
                    log.exception("engine call %s (message %d) failed", name, seq)
                    continue
                if name in DEVICE_CALLS:
                    out = result
            self.received = seq
            with self._completion_ready:
                self._completions.append((seq, out))
                self._completion_ready.notify()
            seq += 1


def follow(cluster: Cluster, load: Callable[[], Any], *, sigterm_grace_s: float = 60.0,
           report: Callable[[BaseException], int] | None = None) -> int:
    """Runs a follower (process > 0): builds the engine with `load()`, says so to the
    leader, then makes the leader's calls until it says stop. Returns the exit code.
    If `load()` raises, the leader is told, `report(exc)` prints it and gives the exit
    code (default: the traceback, 1), and the process exits with it at once."""
    assert not cluster.is_leader
    follower = _Follower(cluster, sigterm_grace_s)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, follower._on_sigterm)
    try:
        engine = load()
    except BaseException as e:  # noqa: BLE001 -- told to the leader, reported, then exit
        follower.error = f"loading the engine failed: {e!r}"
        try:
            follower.client.key_value_set_bytes(status_key(cluster.process_id), follower._status(-1),
                                                allow_overwrite=True)
        except Exception:  # noqa: BLE001
            pass
        if report is None:
            log.exception("loading the engine failed")
            code = EXIT_FAILED
        else:
            code = report(e)
        _hard_exit(code)
    cluster.client.key_value_set_bytes(hello_key(cluster.process_id), engine_fingerprint(engine).encode())
    print(f"xlserve: process {cluster.process_id} following process 0", file=sys.stderr, flush=True)
    return follower.run(engine)

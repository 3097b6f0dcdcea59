"""A GenerationServer in-process on a free port, and helpers to drive it from tests
(shared by the server, security, fuzz and soak tests)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import subprocess
import sys
import threading
import time

import jax.numpy as jnp

from runtime.client import Client
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.orchestrator import Orchestrator
from runtime.proto import generation as pb
from runtime.server import GenerationServer, ServerConfig
from tests.utils import peaked_tiny_llama

# Small enough that concurrent streams are preempted and recomputed: 40 pages of 8
# tokens for 8 slots of up to 128 tokens.
ECFG = EngineConfig(
    max_num_seqs=8, max_model_len=128, page_size=8, prefill_lengths=(16, 32, 64), prefill_batch_sizes=(1, 4),
    cache_dtype="float32", num_top_logprobs=3,
    # One decode bucket: these servers test the front end; buckets are the engine's
    # (tests/runtime/test_engine.py), and each is a compile per sampling mode.
    decode_batch_sizes=(8,),
)
NUM_PAGES = 40


def tiny_engine(tokenizer) -> Engine:
    """A warmed engine over a peaked tiny float32 Llama with `tokenizer`'s vocabulary."""
    engine = Engine(peaked_tiny_llama(tokenizer.vocab_size), ECFG, num_pages=NUM_PAGES)
    engine.warmup()
    return engine


class SlowOrchestrator(Orchestrator):
    """Each step takes at least 20 ms more: requests stay in flight long enough to be
    cancelled, time out or be drained mid-way."""

    delay_s = 0.02

    def step(self):
        time.sleep(self.delay_s)
        return super().step()


class Harness:
    """A GenerationServer on its own event loop thread, and clients to it."""

    def __init__(self, server: GenerationServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(server.start("localhost:0"))
        self.target = f"localhost:{self.port}"
        self.client = Client(self.target)

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def info(self) -> pb.ModelInfo:
        return self.client.model_info()

    def close(self) -> None:
        self.client.close()
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serve(engine, tokenizer, config: ServerConfig = ServerConfig(model_name="tiny"), *, slow: bool = False,
          factory=None, load=None, wait: bool = True):
    factory = factory or (SlowOrchestrator if slow else Orchestrator)
    server = GenerationServer(load or (lambda: (engine, tokenizer)), config, orchestrator_factory=factory)
    h = Harness(server)
    try:
        if wait:
            h.call(server.wait_ready(120))
        yield h
    finally:
        h.close()
    # Every test leaves the shared engine as it found it: no slot active.
    assert not bool(jnp.any(engine.slots.lengths)), "a request left a decode slot active"


def collect(call) -> dict:
    """Drains a streaming call: ids, text, logprobs, and the count of last messages."""
    res = dict(ids=[], text="", logprobs=[], top=[], finals=0, reason=None, usage=None, timings=None, rid=None)
    for r in call:
        assert res["finals"] == 0, "a response after the last one"
        res["rid"] = r.request_id
        res["ids"] += list(r.token_ids)
        res["text"] += r.text
        res["logprobs"] += list(r.logprobs)
        res["top"] += [[(t.token_id, t.logprob) for t in step.top] for step in r.top_logprobs]
        if r.finish_reason:
            res["finals"] += 1
            res["reason"] = pb.FinishReason.NAMES[r.finish_reason]
            res["usage"], res["timings"] = r.usage, r.timings
    return res


async def acollect(call) -> dict:
    res = dict(ids=[], text="", logprobs=[], finals=0, reason=None, usage=None)
    async for r in call:
        assert res["finals"] == 0, "a response after the last one"
        res["ids"] += list(r.token_ids)
        res["text"] += r.text
        res["logprobs"] += list(r.logprobs)
        if r.finish_reason:
            res["finals"] += 1
            res["reason"] = pb.FinishReason.NAMES[r.finish_reason]
            res["usage"] = r.usage
    return res


def metric(h: Harness, name: str, **labels) -> float:
    value = h.server.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


@dataclasses.dataclass
class ServeProcess:
    """`python -m runtime.serve` as a user starts it; stderr lines collected as they come."""

    proc: subprocess.Popen
    lines: list[str]
    port: int | None = None
    metrics_port: int | None = None
    http_port: int | None = None  # --http_port: the OpenAI-compatible HTTP API's


@contextlib.contextmanager
def serve_subprocess(*flags: str, env: dict, cwd, wait_serving: bool = True, timeout: float = 180.0):
    """Starts runtime.serve with `flags` and yields once its port (and metrics and HTTP
    ports, if asked for) are printed and, with `wait_serving`, it says SERVING. Kills it
    after."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", *flags], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, text=True)
    server = ServeProcess(proc, [])
    want_metrics = any(f.startswith("--metrics_port") for f in flags)
    want_http = any(f.startswith("--http_port") for f in flags)
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            server.lines.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                server.port = int(m.group(1))
            if m := re.search(r"metrics on https?://localhost:(\d+)", line):
                server.metrics_port = int(m.group(1))
            if m := re.search(r"HTTP API on https?://\S+:(\d+)/v1", line):
                server.http_port = int(m.group(1))
            started = (server.port is not None and (server.metrics_port is not None or not want_metrics)
                       and (server.http_port is not None or not want_http))
            if started and (not wait_serving or ("SERVING" in line and "NOT_SERVING" not in line)):
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        ready.wait(timeout)
        assert server.port is not None and proc.poll() is None, "".join(server.lines)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

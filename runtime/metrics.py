"""Prometheus metrics of the gRPC server (prometheus_client), served over HTTP.

Every server owns its own `CollectorRegistry`, so several servers (tests) can live in
one process. The engine thread observes latencies and counts tokens as it produces
them; gauges are set once per engine step. Latencies are measured in the server
from a request's admission:
  time to first token   admission -> the first generated token leaves the engine
  inter-token latency   between a request's consecutive outputs, per token: an output
                        of n tokens (multi-step decode) counts n gaps of 1/n of the time
                        since the previous one; the first output counts for TTFT only
  end-to-end latency    admission -> the last response
  queue time            admission -> the request gets a decode slot (its first prefill)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import socket
import sys
import threading
import time
import weakref
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

ABORT_REASONS = ("cancelled", "deadline", "abort_rpc", "drain")
FINISH_REASONS = ("stop", "length", "abort")
REJECT_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS",
                "UNAUTHENTICATED", "INTERNAL")


class _QuietHandler(WSGIRequestHandler):
    timeout = 10.0  # a client that stalls (mid TLS handshake, say) holds one thread this long at most

    def log_message(self, format, *args):  # noqa: A002 -- a scrape every few seconds is not news
        pass


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A failed TLS handshake (plaintext to HTTPS, an untrusted client), a reset or a
        # timeout is the client's problem: not a traceback on the server's stderr.
        log.debug("metrics request from %s failed: %r", client_address, sys.exc_info()[1])


_STEP_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04,
                 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_STEP_TOKEN_BUCKETS = (0, 1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# Servers whose gc_pause histogram the one gc callback feeds (weakly held: a metrics object
# that is never closed does not stay alive for it).
_GC_LISTENERS: weakref.WeakSet = weakref.WeakSet()
_gc_started: float | None = None
_gc_seconds = 0.0  # all collections' time since the process started


def _on_gc(phase: str, info: dict) -> None:
    """gc.callbacks entry: times each collection (collections do not nest; the GIL is held)."""
    global _gc_started, _gc_seconds
    if phase == "start":
        _gc_started = time.perf_counter()
    elif _gc_started is not None:
        seconds, _gc_started = time.perf_counter() - _gc_started, None
        _gc_seconds += seconds
        for m in list(_GC_LISTENERS):
            m.gc_pause.labels(generation=str(info.get("generation", "?"))).observe(seconds)


gc.callbacks.append(_on_gc)


class ServerMetrics:
    """step_log: a path; every engine step appends one JSON line to it (`observe_step`):
    for diagnosing latency (which steps were slow, what each dispatched)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, step_log: str | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._step_log = open(step_log, "a", buffering=1 << 16) if step_log else None  # noqa: SIM115 -- closed in close()
        self._step_t0: float | None = None
        self._step_gc = _gc_seconds
        # The step's wall time in the engine thread: with the host pipelined one step behind
        # the device, a step mostly waits for the previous step's call.
        self.step_seconds = Histogram("xlserve_engine_step_seconds", "Wall time of one engine step, by the calls "
                                      "it dispatched (mixed, prefill, decode, prefill+decode).", ["kind"],
                                      buckets=_STEP_BUCKETS, registry=r)
        self.step_prefill_tokens = Histogram("xlserve_engine_step_prefill_tokens", "Prompt tokens dispatched in "
                                             "one engine step (chunks beside the decode rows).",
                                             buckets=_STEP_TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("xlserve_time_to_first_token_seconds", "Admission to the first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("xlserve_inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("xlserve_e2e_request_latency_seconds", "Admission to the last response.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue = Histogram("xlserve_request_queue_time_seconds", "Admission to getting a decode slot.",
                               buckets=_QUEUE_BUCKETS, registry=r)
        self.running = Gauge("xlserve_num_requests_running", "Requests holding a decode slot.", registry=r)
        self.waiting = Gauge("xlserve_num_requests_waiting", "Admitted requests waiting for a slot.", registry=r)
        self.pages_used = Gauge("xlserve_kv_pages_used", "KV cache pages in use.", registry=r)
        self.pages_total = Gauge("xlserve_kv_pages_total", "KV cache pages.", registry=r)
        self.ready = Gauge("xlserve_ready", "1 while the model is loaded, warm and admitting requests.", registry=r)
        self.preemptions = Counter("xlserve_preemptions", "Running requests preempted for KV pages (recomputed).",
                                   registry=r)
        self.prefix_queried = Counter("xlserve_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_hits = Counter("xlserve_prefix_cache_hit_tokens",
                                   "Prompt tokens whose KV the prefix cache served (not recomputed).", registry=r)
        self.pages_cached = Gauge("xlserve_kv_pages_cached",
                                  "KV pages in the prefix cache (in use, or unowned and reclaimable).", registry=r)
        self.pages_reclaimed = Counter("xlserve_kv_pages_reclaimed",
                                       "Cached KV pages given new contents (evicted from the prefix cache).", registry=r)
        self.aborted = Counter("xlserve_requests_aborted", "Requests ended early, by reason.", ["reason"], registry=r)
        self.failed = Counter("xlserve_requests_failed", "Admitted requests that ended with an error status (INTERNAL, or UNAVAILABLE when the engine failed).", registry=r)
        self.rejected = Counter("xlserve_requests_rejected", "Requests refused before admission, by status code.",
                                ["code"], registry=r)
        self.finished = Counter("xlserve_requests_finished", "Requests answered with a last response, by reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("xlserve_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("xlserve_generation_tokens", "Tokens generated.", registry=r)
        self.compilations = Counter("xlserve_compilations", "XLA compilations after warm-up (0 expected).",
                                    registry=r)
        # Every admitted request ends finished or failed: admitted == finished (all reasons) + failed
        # once none is in flight (runtime.soak checks it).
        self.admitted = Counter("xlserve_requests_admitted", "Requests admitted (past validation and admission).",
                                registry=r)
        self.startup = Gauge("xlserve_startup_seconds", "Seconds each start-up phase took (runtime.startup."
                             "StartupClock; phase=\"total\": process start to SERVING).", ["phase"], registry=r)
        self.startup_weight_bytes = Gauge("xlserve_startup_weight_bytes", "Bytes of weights loaded at start-up.",
                                          registry=r)
        # Garbage collections stop every Python thread, the engine loop's too: a long one is a
        # step every stream waits for (runtime.startup.freeze_heap keeps them short).
        self.gc_pause = Histogram("xlserve_gc_pause_seconds", "Time the process spent in one garbage collection, "
                                  "by generation.", ["generation"], buckets=_STEP_BUCKETS, registry=r)
        _GC_LISTENERS.add(self)
        # process_resident_memory_bytes and friends: runtime.soak bounds the RSS growth under load.
        ProcessCollector(registry=r)
        for reason in ABORT_REASONS:  # every series exists from the start, at 0
            self.aborted.labels(reason=reason)
        for reason in FINISH_REASONS:
            self.finished.labels(finish_reason=reason)
        for code in REJECT_CODES:
            self.rejected.labels(code=code)

    def observe_step(self, record, t0: float, seconds: float, tokens_out: int) -> None:
        """One engine step (runtime.orchestrator.StepRecord) that started at monotonic
        time t0 and took `seconds`, emitting `tokens_out` tokens."""
        if record.kind == "idle":
            return
        self.step_seconds.labels(kind=record.kind).observe(seconds)
        self.step_prefill_tokens.observe(record.prefill_tokens)
        if self._step_log is not None:
            if self._step_t0 is None:
                self._step_t0 = t0
            # gc_ms: garbage collection (any thread's) since the previous step was logged.
            gc_ms, self._step_gc = (_gc_seconds - self._step_gc) * 1e3, _gc_seconds
            self._step_log.write(json.dumps(dict(
                t_ms=round((t0 - self._step_t0) * 1e3, 3), ms=round(seconds * 1e3, 3), tokens_out=tokens_out,
                gc_ms=round(gc_ms, 3), **{k: round(v, 3) if isinstance(v, float) else v
                                           for k, v in dataclasses.asdict(record).items()})) + "\n")

    def record_startup(self, clock, total_s: float | None) -> None:
        """The start-up phases (runtime.startup.StartupClock) as gauges."""
        for name, sec in clock.seconds().items():
            self.startup.labels(phase=name).set(sec)
        if total_s is not None:
            self.startup.labels(phase="total").set(total_s)
        self.startup_weight_bytes.set(clock.weight_bytes)

    def serve(self, port: int, addr: str = "0.0.0.0", *, security=None) -> int:
        """Serves /metrics on `port` (0: any free port) in a daemon thread; returns the port.

        security (runtime.auth.SecurityConfig): with API keys, a scrape without
        `Authorization: Bearer <key>` gets HTTP 401; with TLS, it is HTTPS with the gRPC
        server's certificate (and, with a client CA, requires a client certificate), so
        the key never crosses the network in the clear. prometheus_client's own
        start_http_server has no way to check a key, hence this server."""
        app = make_wsgi_app(self.registry)
        if security is not None and security.api_keys:
            from runtime.auth import ApiKeys, wsgi_requiring_key

            app = wsgi_requiring_key(app, ApiKeys(security.api_keys))

        class Server(_HTTPServer):
            address_family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6

        httpd = make_server(addr, port, app, Server, handler_class=_QuietHandler)
        if security is not None and security.tls:
            # The handshake happens on the handler's first read, in its own thread: a
            # client that stalls mid-handshake does not stop the accept loop.
            httpd.socket = security.server_ssl_context().wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        self._httpd = httpd
        return httpd.server_address[1]

    def close(self) -> None:
        _GC_LISTENERS.discard(self)
        if self._step_log is not None:
            self._step_log.close()
            self._step_log = None
        httpd = getattr(self, "_httpd", None)
        if httpd is not None:
            self._httpd = None  # closing twice (serve.py, then the server's stop) is harmless
            httpd.shutdown()
            httpd.server_close()

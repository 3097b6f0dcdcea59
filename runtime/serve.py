"""python -m runtime.serve --checkpoint=DIR|ALIAS|preset:NAME --port=50051 [--http_port=8000] [--metrics_port=9090]
    [engine flags]

Serves the xlserve.v1.Generation gRPC service (runtime/server.py) with gRPC health and
reflection. The port opens at once with health NOT_SERVING; it turns SERVING once the
weights are loaded and the engine is warm. `--checkpoint=preset:llama3.1-8b` (any name
in runtime/presets.py, or preset:path/config.json) serves random weights of those
shapes, for benchmarks: no tokenizer, so token-id input only and no text out.

--http_port=N also serves the OpenAI-compatible HTTP API (runtime/openai_api.py) from
this process: same engine thread and batch, same event loop, same admission, keys and
TLS; off by default. Its starlette and uvicorn are imported only then.

Security (runtime/auth.py): --tls_cert_file + --tls_key_file serve over TLS (and
/metrics and the HTTP API over HTTPS); --tls_client_ca_file requires client
certificates (mutual TLS); --api_key_file requires `authorization: Bearer <key>` on
every call but health's (gRPC and HTTP /health), and on /metrics. Per-client bounds (runtime/limits.py): --max_request_bytes,
--max_streams_per_connection. A bad TLS file or key file exits 2 with one line.

SIGTERM (or SIGINT): health NOT_SERVING, new requests UNAVAILABLE (HTTP 503), requests
in flight on either protocol get --drain_timeout_s to finish (then are aborted), exit
code 0. A model that fails to
load exits with one line on stderr: code 2 for a bad checkpoint or capacity, else 1.

Several processes (hosts; sharding/distributed.py): start the same command on each with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (on Cloud TPU VMs none
of the three: detected) and --tensor_parallel_size over all their devices. Process 0
serves (its port opens once every process has joined); the others load the same model
and make process 0's engine calls. A process that dies or hangs for --worker_timeout_s
turns process 0 NOT_SERVING and makes it exit 1; SIGTERM on process 0 drains, then
stops the others (exit 0).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from runtime import flags as xflags
from runtime.config import ConfigError

flags.DEFINE_string("host", "[::]", "Address to bind.")
flags.DEFINE_integer("port", 50051, "gRPC port (0: any free port; the chosen one is printed).")
flags.DEFINE_integer("metrics_port", None, "Serve Prometheus /metrics on this port (0: any free port).")
flags.DEFINE_integer("http_port", None, "Also serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
                     "/v1/completions, /v1/models, /health) on this port, same --host, same engine (0: any free port; "
                     "default: off). Needs starlette and uvicorn.")
flags.DEFINE_string("aot_dir", None, "Run the executables `runtime.warmup --aot_dir` wrote here instead of compiling, "
                    "where they were built for this configuration (else compile, and say why).")
flags.DEFINE_string("step_log", None, "Append one JSON line per engine step to this file (what the step "
                    "dispatched: call kind, decode rows, prefill chunks and tokens; its wall time): for diagnosing "
                    "latency.")
flags.DEFINE_string("profile_dir", None, "Trace the engine steps --profile_steps (jax.profiler: device kernels and "
                    "host events) into this directory and write summary.txt there: where a serving step's time goes.")
flags.DEFINE_list("profile_steps", ["100", "20"], "START,COUNT: the engine steps --profile_dir traces, counted from "
                  "the first step after warm-up.")
flags.DEFINE_integer("max_queue", 128, "Requests admitted beyond --max_num_seqs (waiting); more: RESOURCE_EXHAUSTED.")
flags.DEFINE_integer("max_pending_tokens", 0, "Budget of prompt + max_tokens over the requests in flight; 0: none.")
flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM, how long requests in flight may take to finish.")
flags.DEFINE_integer("max_request_bytes", 4 * 1024 * 1024, "Largest request message; bigger: RESOURCE_EXHAUSTED.")
flags.DEFINE_integer("max_streams_per_connection", 64, "Generate/GenerateUnary calls in flight per client "
                     "connection; more: RESOURCE_EXHAUSTED (raise it behind a proxy that multiplexes users).")
flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain: serve gRPC and /metrics over TLS.")
flags.DEFINE_string("tls_key_file", None, "PEM private key (unencrypted) of --tls_cert_file.")
flags.DEFINE_string("tls_client_ca_file", None, "PEM CA(s): require client certificates signed by them (mutual TLS).")
flags.DEFINE_string("api_key_file", None, "API keys, one per line (# comments); every call but health's, and "
                    "/metrics, must send 'authorization: Bearer <key>'.")
flags.DEFINE_enum("startup", "auto", ["auto", "full", "progressive"], "full: SERVING once every program is "
                  "compiled (or loaded) and warm. progressive: SERVING once a few programs that serve any request are "
                  "(the largest prefill and decode shapes, runtime.aot.core_programs); the others compile (or load) on "
                  "threads while it serves and take over as they arrive, so calls pad more and mixed steps run as two "
                  "calls until then. One process, without --aot_dir. auto: progressive on GPUs and TPUs where it "
                  "applies (one process, no --aot_dir), else full.")
flags.DEFINE_float("gil_switch_interval_ms", 0.5, "Python's thread switch interval (sys.setswitchinterval): "
                   "the longest the engine thread waits for the interpreter lock while the event loop's thread "
                   "runs Python (streaming outputs). Python's default, 5 ms, stalled steps at 64 streams on an "
                   "H200 (ITL p99 1.5-4.3x the median; 0.5 ms: 1.35x, runtime/BENCHMARKS.md).")
xflags.define_engine_flags()
xflags.define_startup_flags()
xflags.define_distributed_flags()
FLAGS = flags.FLAGS

log = logging.getLogger("runtime.serve")


def _loader(checkpoint: str, ecfg, dtype: str, auto_num_seqs: bool, mesh_config, aot_dir: str | None = None,
            executable_cache: str = "off", compile_threads: int | None = None,
            progressive: Callable[[str], bool] = lambda platform: False):
    """What the engine thread runs to build (engine, tokenizer); `progressive(platform)`
    says whether the start is progressive (runtime.startup.progressive_start)."""

    def load():
        engine, tokenizer = _load()
        import jax

        from runtime.aot import prepare_programs

        on = progressive(jax.devices()[0].platform)
        # progressive: engine.background brings in the other programs once serving (engine_thread)
        engine.background = prepare_programs(engine, dtype, aot_dir=aot_dir, executable_cache=executable_cache,
                                             compile_threads=compile_threads, progressive=on)
        return engine, tokenizer

    def _load():
        from runtime.random_weights import is_preset, load_random_engine

        if is_preset(checkpoint):
            return load_random_engine(checkpoint, ecfg, dtype=dtype, auto_num_seqs=auto_num_seqs,
                                      mesh_config=mesh_config), None
        from runtime.startup import load_engine

        engine, tokenizer = load_engine(checkpoint, ecfg, dtype=dtype, auto_num_seqs=auto_num_seqs,
                                        mesh_config=mesh_config)
        if engine.sampling_defaults:
            print("xlserve: sampling defaults from the checkpoint's generation_config.json, for fields a request "
                  "leaves unset: " + ", ".join(f"{k}={v}" for k, v in engine.sampling_defaults.items()),
                  file=sys.stderr, flush=True)
        return engine, tokenizer

    return load


def _leader_loader(load, leader):
    """Process 0 of several: the engine behind a LeaderEngine, once the others built theirs."""

    def load_and_attach():
        engine, tokenizer = load()
        return leader.attach(engine), tokenizer

    return load_and_attach


async def _serve(load, config, leader=None) -> int:
    from runtime.metrics import ServerMetrics
    from runtime.server import GenerationServer

    try:
        metrics = ServerMetrics(step_log=FLAGS.step_log)
    except OSError as e:
        print(f"error: --step_log={FLAGS.step_log}: {e.strerror or e}", file=sys.stderr)
        return 2
    if FLAGS.metrics_port is not None:
        port = metrics.serve(FLAGS.metrics_port, security=config.security)
        scheme = "https" if config.security.tls else "http"
        print(f"xlserve: metrics on {scheme}://localhost:{port}/metrics", file=sys.stderr, flush=True)
    step_trace = None
    if FLAGS.profile_dir:
        from runtime.profile import StepTrace

        try:
            start, count = (int(x) for x in FLAGS.profile_steps)
            step_trace = StepTrace(FLAGS.profile_dir, start, count)
        except ValueError as e:
            print(f"error: --profile_steps={','.join(FLAGS.profile_steps)}: want START,COUNT with START >= 0 and "
                  f"COUNT >= 1 ({e})", file=sys.stderr)
            return 2
    server = GenerationServer(load, config, metrics=metrics, step_trace=step_trace)
    if leader is not None:  # a follower that dies or hangs: NOT_SERVING, then the leader exits
        leader.on_failure = server.fail
    http = None
    if FLAGS.http_port is not None:
        from runtime.openai_api import OpenAIServer

        http = OpenAIServer(server, model_id=FLAGS.checkpoint)
        try:
            http_port = http.bind(FLAGS.host, FLAGS.http_port)
        except OSError as e:
            print(f"error: --host={FLAGS.host} --http_port={FLAGS.http_port}: {e.strerror or e}", file=sys.stderr)
            return 2
    try:
        port = await server.start(f"{FLAGS.host}:{FLAGS.port}")
    except RuntimeError as e:  # grpcio: "Failed to bind to address ..."
        print(f"error: --host={FLAGS.host} --port={FLAGS.port}: {e}", file=sys.stderr)
        return 2
    print(f"xlserve: listening on {FLAGS.host}:{port} (NOT_SERVING until the model is loaded and warm)",
          file=sys.stderr, flush=True)
    if http is not None:
        await http.start()
        scheme = "https" if config.security.tls else "http"
        print(f"xlserve: OpenAI-compatible HTTP API on {scheme}://{FLAGS.host}:{http_port}/v1 (503 until the model "
              f"is loaded and warm)", file=sys.stderr, flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    waits = [stopped, asyncio.ensure_future(server.wait_settled())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if server.ready and not stop.is_set():
        from runtime.startup import clock, process_age_s

        age = process_age_s()
        metrics.record_startup(clock, age)
        print(f"xlserve: {clock.summary(age)}", file=sys.stderr, flush=True)
        print(f"xlserve: SERVING {config.model_name}", file=sys.stderr, flush=True)
        waits.append(asyncio.ensure_future(server.wait_failed()))
        await asyncio.wait([stopped, waits[-1]], return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if server.fatal is not None:
        if leader is not None:
            # Another process may be dead or hung, and with it the engine thread's device
            # call: health says NOT_SERVING for a moment, then the leader exits at once.
            await asyncio.sleep(leader.exit_grace_s)
            return _report_fatal(server.fatal)
        await server.stop()
        return _report_fatal(server.fatal)
    print(f"xlserve: draining ({server.num_in_flight} requests in flight, up to {FLAGS.drain_timeout_s} s)",
          file=sys.stderr, flush=True)
    await server.drain(FLAGS.drain_timeout_s)
    print("xlserve: stopped", file=sys.stderr, flush=True)
    return 0


def _report_fatal(exc: BaseException) -> int:
    from checkpoints.errors import CheckpointError
    from runtime.startup import CapacityError
    from sharding.distributed import ClusterError

    if isinstance(exc, ClusterError):  # its line is on stderr already (the watchdog's)
        return 1

    known = (CheckpointError, CapacityError, ConfigError)
    if isinstance(exc, known):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import traceback

    traceback.print_exception(exc)
    print(f"error: the engine failed: {exc!r}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # checkpoint restore logs at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint:
        xflags.usage_error("--checkpoint is required (a directory, an alias such as gemma3-270m, or preset:NAME)")
    from runtime.auth import SecurityConfig, load_api_keys
    from runtime.random_weights import is_preset, preset_name
    from runtime.server import ServerConfig

    try:
        ecfg = xflags.engine_config_from_flags()
        mesh_config = xflags.mesh_config_from_flags()
        dist = xflags.distributed_config_from_flags()
        if is_preset(FLAGS.checkpoint):
            from runtime.presets import preset_config

            preset_config(preset_name(FLAGS.checkpoint))  # an unknown preset fails here, not in the engine
        try:
            api_keys = load_api_keys(FLAGS.api_key_file) if FLAGS.api_key_file is not None else ()
        except ValueError as e:
            raise ValueError(f"--api_key_file: {e}") from None
        security = SecurityConfig(tls_cert_file=FLAGS.tls_cert_file, tls_key_file=FLAGS.tls_key_file,
                                  tls_client_ca_file=FLAGS.tls_client_ca_file, api_keys=api_keys)
        config = ServerConfig(
            model_name=FLAGS.checkpoint + (" (random weights)" if is_preset(FLAGS.checkpoint) else ""),
            max_queue=FLAGS.max_queue, max_pending_tokens=FLAGS.max_pending_tokens,
            max_request_bytes=FLAGS.max_request_bytes, max_streams_per_connection=FLAGS.max_streams_per_connection,
            security=security,
        )
    except (ConfigError, ValueError) as e:
        xflags.usage_error(str(e))
    if config.security.api_keys and not config.security.tls:
        log.warning("API keys without TLS cross the network in the clear: add --tls_cert_file/--tls_key_file "
                    "unless a TLS proxy or a private network carries them")
    xflags.check_startup_flags()
    if FLAGS.drain_timeout_s < 0:
        xflags.usage_error(f"--drain_timeout_s={FLAGS.drain_timeout_s} must be >= 0")
    if not 0 < FLAGS.gil_switch_interval_ms <= 1000:
        xflags.usage_error(f"--gil_switch_interval_ms={FLAGS.gil_switch_interval_ms} must be in (0, 1000]")
    sys.setswitchinterval(FLAGS.gil_switch_interval_ms / 1e3)
    if FLAGS.startup == "progressive" and FLAGS.aot_dir:
        xflags.usage_error("--startup=progressive compiles its other programs while serving; --aot_dir has them "
                           "all built: drop one of the two")
    if FLAGS.http_port is not None:
        try:  # optional dependencies (not in every image): checked before the model loads
            import runtime.openai_api  # noqa: F401
        except ImportError as e:
            xflags.usage_error(f"--http_port needs starlette and uvicorn ({e}); pip install starlette uvicorn")
    from sharding import distributed

    cluster, mesh_config = xflags.join_cluster(dist, mesh_config)
    from runtime.startup import progressive_start

    load = _loader(FLAGS.checkpoint, ecfg, FLAGS.dtype, xflags.auto_num_seqs(), mesh_config, FLAGS.aot_dir,
                   FLAGS.executable_cache, FLAGS.compile_threads,
                   progressive=functools.partial(progressive_start, FLAGS.startup, aot_dir=FLAGS.aot_dir,
                                                 one_process=cluster is None))
    leader = None
    if cluster is not None and FLAGS.startup == "progressive":
        xflags.usage_error("--startup=progressive serves one process; several compile every program in step "
                           "before serving (drop --startup=progressive)")
    if cluster is not None:
        if not cluster.is_leader:
            grace = FLAGS.drain_timeout_s + 2 * dist.timeout_s + 10  # process 0 drains, then stops this one
            sys.exit(distributed.follow(cluster, lambda: load()[0], sigterm_grace_s=grace, report=_report_fatal))
        leader = distributed.Leader(cluster)
        load = _leader_loader(load, leader)
    code = asyncio.run(_serve(load, config, leader))
    if leader is not None:
        code = leader.finish(code)  # stops the others; exits at once unless 0
    _exit(code)


def _exit(code: int, compiles_timeout_s: float = 10.0) -> None:
    """Exits once a progressive start's background compiles have stopped. XLA compiling on
    a thread while the interpreter shuts down ended in a segfault (exit 139) after a clean
    drain on an H200 (2026-11-30); a compile still running after `compiles_timeout_s` is
    left behind by an exit that skips the interpreter's shutdown."""
    from runtime import aot

    if aot.stop_background(compiles_timeout_s):
        sys.exit(code)
    print(f"xlserve: exiting with background compiles still running (> {compiles_timeout_s:.0f} s)", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=xflags.parse_flags)

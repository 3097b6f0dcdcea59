"""grpc.aio front end: the xlserve.v1.Generation service, gRPC health and reflection,
over one engine thread that runs the same orchestrator loop as runtime.generate.

The OpenAI-compatible HTTP API (runtime/openai_api.py) is a second front end over the
same server: its handlers run on the same event loop and call the methods the gRPC
handlers call (check_serving, encode, chat_ids, make_request, admit, next_output,
collect, release), so both protocols share one admission, one batch, one set of checks
and messages; each translates only its own request and replies.

Threads and queues:
  event loop (grpc.aio)  The RPC handlers (and the HTTP API's, with --http_port). A
                         Generate call is parsed, validated and tokenized here, then
                         admitted (or refused at once), then put in the engine's
                         inbox; its handler awaits the request's own asyncio.Queue
                         and streams what arrives.
  engine thread          `EngineLoop` (runtime/engine_thread.py), the only code that
                         touches the orchestrator (and so the engine). It loads the
                         model and warms it up, then loops: drain the inbox (add,
                         abort, stop), run one orchestrator step, hand the step's
                         outputs to the event loop in one `call_soon_threadsafe`. It
                         never waits on the event loop; with no work it blocks on the
                         inbox.
  prometheus thread      /metrics on --metrics_port (runtime/metrics.py).

A request's life: admitted -> `Stream` registered (counted against --max_queue and
the token budget) -> the engine adds it -> outputs flow to its queue -> the final
event (an output with a finish reason, or an error status) removes the stream, so
every admitted request gets exactly one last message. A client that cancels, or
whose deadline passes, leaves the handler; its `finally` puts an abort in the inbox,
and the orchestrator frees the slot and pages before its next step. An Abort RPC
does the same, and the stream ends with FINISH_REASON_ABORT.

Admission: at most max_num_seqs + max_queue requests in flight and, with
--max_pending_tokens, at most that many prompt + max_tokens tokens among them;
beyond, RESOURCE_EXHAUSTED at once. Under KV-page pressure the scheduler preempts
the newest running request and recomputes it later (same tokens). Before admission,
two interceptors: API keys (runtime/auth.py; UNAUTHENTICATED, health exempt) and at
most --max_streams_per_connection generation calls per client connection
(runtime/limits.py; RESOURCE_EXHAUSTED); gRPC itself refuses a message over
--max_request_bytes (RESOURCE_EXHAUSTED).

Health (grpc.health.v1, service "" and xlserve.v1.Generation): NOT_SERVING until the
weights are loaded and warm-up is done, SERVING after, NOT_SERVING for good once
`drain()` starts (SIGTERM in runtime.serve): new requests get UNAVAILABLE, those in
flight have drain_timeout_s to finish before they are aborted; then the front ends
stop (`front_ends`), then gRPC, then the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime import limits
from runtime.auth import ApiKeyInterceptor, ApiKeys, SecurityConfig, tenant_of
from runtime.chat_template import ChatTemplateError
from runtime.engine_thread import EngineLoop, is_last
from runtime.metrics import ServerMetrics
from runtime.orchestrator import Orchestrator, Request, RequestError, RequestOutput
from runtime.proto import generation as pb
from runtime.sampling import SamplingError, SamplingParams

log = logging.getLogger(__name__)

Code = grpc.StatusCode
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "logprobs")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = ""  # reported by GetModelInfo
    max_queue: int = 128  # admitted requests beyond the decode slots
    max_pending_tokens: int = 0  # budget of prompt + max_tokens over requests in flight; 0: none
    # gRPC's own default; 4 MiB holds a 128k-token prompt as text or token ids.
    max_request_bytes: int = 4 * 1024 * 1024
    # Generate/GenerateUnary calls in flight per client connection (runtime/limits.py):
    # under the default admission of 8 slots + 128 waiting, so one connection cannot
    # take all of it. runtime.bench_serving spreads its load over connections to fit;
    # a proxy that multiplexes many users over one connection needs it raised.
    max_streams_per_connection: int = 64
    security: SecurityConfig = SecurityConfig()  # TLS and API keys (runtime/auth.py)

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.max_pending_tokens < 0:
            raise ValueError(f"max_pending_tokens={self.max_pending_tokens} must be >= 0 (0: no budget)")
        if not 1024 <= self.max_request_bytes < 2**31:
            raise ValueError(f"max_request_bytes={self.max_request_bytes} must be in [1024, 2**31) (gRPC's limit); "
                             f"the default is {4 * 1024 * 1024} (4 MiB)")
        if self.max_streams_per_connection < 1:
            raise ValueError(f"max_streams_per_connection={self.max_streams_per_connection} must be >= 1")


class RequestFailed(Exception):
    """A request refused before admission, or failed after it: the status code, what to
    change, and the request field at fault where there is one (`param`, in the
    GenerateRequest's names: the OpenAI front end reports it in its own names)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# --- the event loop side -----------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Stream:
    """An admitted request, as its handler sees it."""

    request_id: str
    queue: asyncio.Queue
    cost: int  # prompt + max_tokens: its share of the token budget
    logprobs: int | None  # what the request asked (None: no logprobs in the responses)


def _response(stream: Stream, out: RequestOutput, final: dict | None) -> "pb.GenerateResponse":
    r = pb.GenerateResponse(request_id=stream.request_id, token_ids=out.token_ids, text=out.text)
    if stream.logprobs is not None:
        r.logprobs.extend(out.logprobs)
        for top in out.top_logprobs:
            r.top_logprobs.add().top.extend(pb.TopLogprob(token_id=i, logprob=lp) for i, lp in top)
    if out.finished:
        r.finish_reason = pb.FinishReason.BY_NAME[out.finish_reason]
        r.usage.CopyFrom(pb.Usage(**final["usage"]))
        r.timings.CopyFrom(pb.Timings(**final["timings"]))
    return r


class GenerationServer:
    """The gRPC server: Generation service, health, reflection, engine thread, metrics.

    load: see `EngineLoop`; runs in the engine thread after `start()`.
    """

    def __init__(self, load: Callable[[], tuple[Any, Any]], config: ServerConfig = ServerConfig(), *,
                 metrics: ServerMetrics | None = None,
                 orchestrator_factory: Callable[..., Orchestrator] = Orchestrator, step_trace=None):
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.engine_loop = EngineLoop(load, post=self._post, on_ready=self._engine_ready, on_fatal=self._engine_fatal,
                                 metrics=self.metrics, orchestrator_factory=orchestrator_factory,
                                 step_trace=step_trace)
        self.health = health.aio.HealthServicer()
        self._streams: dict[str, Stream] = {}
        self._pending_tokens = 0
        self._tokenizer = self._ecfg = self._cfg = None  # set when the engine is ready
        self._sampling_defaults: dict = {}
        self._ready = False
        self._draining = False
        self.fatal: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self.streams_per_connection: limits.StreamsPerConnection | None = None  # set by start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: asyncio.Event | None = None  # set once ready or failed
        self._failed: asyncio.Event | None = None  # set when the engine fails for good
        self._idle: asyncio.Event | None = None  # set while no request is in flight
        self._stopped = False
        # Other front ends over this server (the OpenAI HTTP API, runtime/openai_api.py):
        # objects with `async stop(grace_s)`, stopped with it.
        self.front_ends: list = []

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, address: str = "[::]:0") -> int:
        """Binds `address` (port 0: any free port), starts serving (health NOT_SERVING)
        and starts loading the model in the engine thread. Returns the port."""
        self._loop = asyncio.get_running_loop()
        self._settled, self._idle, self._failed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._idle.set()
        for service in ("", pb.SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        cfg, security = self.config, self.config.security
        interceptors = []
        if security.api_keys:  # outermost: a call without a key reaches nothing else
            interceptors.append(ApiKeyInterceptor(
                ApiKeys(security.api_keys), lambda: self.metrics.rejected.labels(code="UNAUTHENTICATED").inc()))
        self.streams_per_connection = limits.StreamsPerConnection(
            cfg.max_streams_per_connection, (pb.method_path("Generate"), pb.method_path("GenerateUnary")),
            lambda: self.metrics.rejected.labels(code="RESOURCE_EXHAUSTED").inc(),
        )
        interceptors.append(self.streams_per_connection)
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.max_concurrent_streams", cfg.max_streams_per_connection + limits.TRANSPORT_STREAMS_HEADROOM),
        ])
        pb.add_generation_servicer(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (pb.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        if security.tls:
            port = self._server.add_secure_port(address, security.grpc_credentials())
        else:
            port = self._server.add_insecure_port(address)
        await self._server.start()
        self.engine_loop.start()
        return port

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Returns once the model is loaded and warm; raises what loading raised."""
        await asyncio.wait_for(self._settled.wait(), timeout)
        if self.fatal is not None:
            raise self.fatal

    async def wait_settled(self) -> None:
        """Returns once the model is loaded and warm, or loading failed (see `fatal`)."""
        await self._settled.wait()

    async def wait_failed(self) -> None:
        """Returns when the engine fails for good (`fatal` says why)."""
        await self._failed.wait()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def tokenizer(self):
        """The model's tokenizer once it is ready (None before, and for random weights)."""
        return self._tokenizer

    async def drain(self, timeout_s: float, *, grace_s: float = 5.0) -> None:
        """Stops admitting (UNAVAILABLE; health NOT_SERVING), lets the requests in flight
        finish for up to `timeout_s`, aborts what is left, then stops the server."""
        if not self._draining:
            self._draining = True
            self.metrics.ready.set(0)
            await self.health.enter_graceful_shutdown()
            log.info("draining: %d requests in flight, up to %.1f s", len(self._streams), timeout_s)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("drain timeout: aborting %d requests", len(self._streams))
                for rid in list(self._streams):
                    self.engine_loop.abort(rid, "drain")
                try:
                    await asyncio.wait_for(self._idle.wait(), grace_s)
                except asyncio.TimeoutError:
                    log.error("%d requests did not end after their abort", len(self._streams))
        await self.stop(grace_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops the front ends and the gRPC server (calls in flight get `grace_s` to send
        what is queued) and the engine thread."""
        if self._stopped:
            return
        self._stopped = True
        for front_end in self.front_ends:
            await front_end.stop(grace_s)
        if self._server is not None:
            await self._server.stop(grace_s)
        self.engine_loop.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.engine_loop.join, 60.0)
        self.metrics.close()

    def fail(self, exc: BaseException) -> None:
        """Marks the engine failed for good, from any thread: health NOT_SERVING, requests
        in flight end UNAVAILABLE, `wait_failed` returns (a multi-process run whose other
        process died: sharding/distributed.py)."""
        self._engine_fatal(exc)

    # --- engine thread -> event loop ---------------------------------------------------

    def _post(self, events: list) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _engine_ready(self, engine_loop: EngineLoop) -> None:
        if engine_loop.orc.tokenizer is not None:  # computed here, off the event loop (a vocabulary scan)
            engine_loop.orc.tokenizer.max_token_chars  # noqa: B018
        try:
            self._loop.call_soon_threadsafe(self._set_ready)
        except RuntimeError:
            pass

    def _engine_fatal(self, exc: BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._set_fatal, exc)
        except RuntimeError:
            pass

    def _set_ready(self) -> None:
        orc = self.engine_loop.orc
        self._tokenizer = orc.tokenizer
        self._ecfg = orc.engine.ecfg
        self._cfg = orc.engine.cfg
        self._sampling_defaults = dict(orc.engine.sampling_defaults)
        self._ready = True
        if not self._draining:
            self.metrics.ready.set(1)
            for service in ("", pb.SERVICE_NAME):
                asyncio.ensure_future(self.health.set(service, health_pb2.HealthCheckResponse.SERVING))
        self._settled.set()

    def _set_fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        self._ready = False
        self.metrics.ready.set(0)
        for service in ("", pb.SERVICE_NAME):
            asyncio.ensure_future(self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))
        # Requests still in flight will hear nothing more from the engine.
        self.metrics.failed.inc(len(self._streams))
        self._deliver([(rid, ("error", Code.UNAVAILABLE, f"the engine failed: {exc!r}")) for rid in self._streams])
        self._settled.set()
        self._failed.set()

    def _deliver(self, events: list) -> None:
        for rid, event in events:
            stream = self._streams.get(rid)
            if stream is None:  # ended already (an error raced the engine's last output)
                continue
            stream.queue.put_nowait(event)
            if is_last(event):
                del self._streams[rid]
                self._pending_tokens -= stream.cost
        if not self._streams:
            self._idle.set()

    # --- shared by both front ends (gRPC below, runtime/openai_api.py) --------------------
    # Validation, tokenization, admission, a stream's outputs and its abort: each front end
    # only translates its own request into these calls and their results into its replies.

    @property
    def serving(self) -> bool:
        """Loaded, warm, and admitting (not draining, not failed): health's SERVING."""
        return self._ready and not self._draining and self.fatal is None

    def count_refusal(self, code: grpc.StatusCode) -> None:
        self.metrics.rejected.labels(code=code.name).inc()

    def check_serving(self) -> None:
        if self._draining:
            raise RequestFailed(Code.UNAVAILABLE, "the server is shutting down (draining); send the request elsewhere")
        if self.fatal is not None:
            raise RequestFailed(Code.UNAVAILABLE, f"the server's engine failed: {self.fatal!r}")
        if not self._ready:
            raise RequestFailed(Code.UNAVAILABLE, "the server is loading the model (warming up); retry shortly")

    def _require_tokenizer(self, param: str) -> None:
        if self._tokenizer is None:
            raise RequestFailed(Code.FAILED_PRECONDITION,
                                "this server has no tokenizer (it serves random weights): send token_ids (to the "
                                "OpenAI API: a prompt of token ids)", param)

    def encode(self, text: str, *, add_special_tokens: bool, param: str = "text") -> list[int]:
        """Token ids of `text`, refusing at once a text too long to fit the context:
        tokenizing runs on the event loop, and megabytes of text would stall every stream."""
        self._require_tokenizer(param)
        # x4: normalization may shrink text first (NFKC composes up to 3 Hangul jamo into one).
        limit = self._ecfg.max_model_len * self._tokenizer.max_token_chars * 4
        if len(text) > limit:
            raise RequestFailed(Code.INVALID_ARGUMENT,
                                f"the text has {len(text)} characters; no more than {limit} can fit the context of "
                                f"{self._ecfg.max_model_len} tokens; shorten it", param)
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def chat_ids(self, messages: list[dict], *, add_generation_prompt: bool = True, param: str = "chat") -> list[int]:
        """Token ids of `messages` (dicts with role and content) rendered with the model's
        chat template."""
        self._require_tokenizer(param)
        if not messages:
            raise RequestFailed(Code.INVALID_ARGUMENT, "the chat has no messages", param)
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:  # the model's template is broken: not the client's to fix
            log.error("chat template failure: %s", e)
            raise RequestFailed(Code.INTERNAL, f"{e}; the server's chat template needs fixing") from None
        except ValueError as e:
            raise RequestFailed(Code.INVALID_ARGUMENT, str(e), param) from None
        return self.encode(text, add_special_tokens=False, param=param)

    def check_token_ids(self, ids, what: str) -> None:
        vocab = self._cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise RequestFailed(Code.INVALID_ARGUMENT, f"{what} {bad[:5]} are out of range [0, {vocab})", what)

    def make_request(self, prompt: Callable[[], list[int]], *, sampling: dict, max_tokens: int | None,
                     request_id: str = "", stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
                     ignore_eos: bool = False, cache_salt: str = "", tenant: str = "") -> Request:
        """The orchestrator's Request; RequestFailed says what is wrong.

        prompt: computes the prompt's token ids; called after the cheap checks (tokenizing
          a long text is not). sampling: the SamplingParams fields the client set; the
          others take the checkpoint's generation_config.json defaults. max_tokens: None
          for the rest of the context. tenant: the caller's API key's digest (with keys
          on), joined to the cache salt, so callers of different keys never share
          prefix-cached pages."""
        if problem := limits.request_problem(request_id, cache_salt, stop):
            raise RequestFailed(Code.INVALID_ARGUMENT, problem[1], problem[0])
        rid = request_id or uuid.uuid4().hex
        if rid in self._streams:
            raise RequestFailed(Code.ALREADY_EXISTS, f"request_id {rid!r} is in use by a request in flight",
                                "request_id")
        ids = prompt()
        try:
            params = SamplingParams(**(self._sampling_defaults | sampling))
        except SamplingError as e:  # its messages start with "field=value"
            raise RequestFailed(Code.INVALID_ARGUMENT, str(e), str(e).partition("=")[0]) from None
        limit = self._ecfg.max_model_len
        if max_tokens is not None:
            if max_tokens < 1:
                raise RequestFailed(Code.INVALID_ARGUMENT, f"max_tokens={max_tokens} must be at least 1", "max_tokens")
            if len(ids) + max_tokens > limit:
                raise RequestFailed(
                    Code.INVALID_ARGUMENT,
                    f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} exceeds "
                    f"the context of {limit} tokens; ask for at most {max(0, limit - len(ids))} tokens or shorten "
                    f"the prompt", "max_tokens",
                )
        else:
            max_tokens = max(1, limit - len(ids))  # the rest of the context (validate rejects a full one)
        if stop and self._tokenizer is None:
            raise RequestFailed(Code.FAILED_PRECONDITION, "stop strings need a tokenizer; this server has none", "stop")
        if any(not s for s in stop):
            raise RequestFailed(Code.INVALID_ARGUMENT, "a stop string is empty", "stop")
        self.check_token_ids(list(stop_token_ids), "stop_token_ids")
        request = Request(
            request_id=rid, prompt_ids=ids, sampling=params, max_tokens=max_tokens, stop=tuple(stop),
            stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
            cache_salt=f"{tenant}|{cache_salt}" if tenant else cache_salt,
        )
        try:
            # Reads only the engine's fixed sizes (and the ids in use: the stream dict
            # above is the authority on those), so it is safe off the engine thread.
            self.engine_loop.orc.validate(request)
        except RequestError as e:
            # What validate checks beyond the above: the logprobs asked, the stop ids, the prompt.
            message = str(e)
            param = ("logprobs" if message.startswith("logprobs=") else
                     "stop_token_ids" if "stop token ids" in message else "prompt")
            raise RequestFailed(Code.INVALID_ARGUMENT, message, param) from None
        return request

    def admit(self, requests: list[Request]) -> list[Stream]:
        """Admits `requests` together or none of them (the choices of one OpenAI call),
        registers their streams and hands them to the engine. RequestFailed: the server
        is full, or the token budget is."""
        costs = [len(r.prompt_ids) + r.max_tokens for r in requests]
        cap = self._ecfg.max_num_seqs + self.config.max_queue
        if len(self._streams) + len(requests) > cap:
            more = f", and this call asks for {len(requests)} at once" if len(requests) > 1 else ""
            raise RequestFailed(
                Code.RESOURCE_EXHAUSTED,
                f"the server is full: {len(self._streams)} requests in flight (max_num_seqs={self._ecfg.max_num_seqs} "
                f"running + max_queue={self.config.max_queue} waiting){more}; retry later",
            )
        budget, cost = self.config.max_pending_tokens, sum(costs)
        largest = max(range(len(requests)), key=costs.__getitem__)
        if budget and costs[largest] > budget:
            r = requests[largest]
            raise RequestFailed(
                Code.INVALID_ARGUMENT,
                f"the request needs {costs[largest]} tokens (prompt {len(r.prompt_ids)} + max_tokens "
                f"{r.max_tokens}), more than the server's whole budget (max_pending_tokens={budget}); "
                f"lower max_tokens", "max_tokens",
            )
        if budget and self._pending_tokens + cost > budget:
            raise RequestFailed(
                Code.RESOURCE_EXHAUSTED,
                f"the token budget is full: requests in flight hold {self._pending_tokens} of "
                f"max_pending_tokens={budget} and this one needs {cost}; retry later",
            )
        now = time.monotonic()
        streams = []
        for request, cost in zip(requests, costs):
            stream = Stream(request.request_id, asyncio.Queue(), cost, request.sampling.logprobs)
            self._streams[request.request_id] = stream
            self._pending_tokens += cost
            self.metrics.admitted.inc()
            self.engine_loop.submit(request, now)
            streams.append(stream)
        self._idle.clear()
        return streams

    async def next_output(self, stream: Stream) -> tuple[RequestOutput, dict | None]:
        """The stream's next output: every event waiting in its queue merged into one
        (a slow reader gets fewer, larger messages rather than a growing backlog).
        An error event raises RequestFailed with its status; outputs merged before it
        are dropped (the status is what the client needs)."""
        event = await stream.queue.get()
        if event[0] == "error":
            raise RequestFailed(event[1], event[2])
        out, final = event[1], event[2]
        while not out.finished and not stream.queue.empty():
            event = stream.queue.get_nowait()
            if event[0] == "error":
                raise RequestFailed(event[1], event[2])
            nxt, final = event[1], event[2]
            out = RequestOutput(
                out.request_id, out.token_ids + nxt.token_ids, out.text + nxt.text, out.logprobs + nxt.logprobs,
                out.top_logprobs + nxt.top_logprobs, nxt.finished, nxt.finish_reason, out.num_prompt_tokens,
            )
        return out, final

    async def collect(self, stream: Stream) -> tuple[RequestOutput, dict]:
        """The stream's whole output, once its last one came, and its final dict (usage,
        timings); RequestFailed as `next_output`."""
        whole = RequestOutput(stream.request_id, [], "", [], [])
        while not whole.finished:
            out, final = await self.next_output(stream)
            whole.token_ids += out.token_ids
            whole.text += out.text
            whole.logprobs += out.logprobs
            whole.top_logprobs += out.top_logprobs
            whole.finished, whole.finish_reason = out.finished, out.finish_reason
        return whole, final

    def release(self, stream: Stream, reason: str) -> None:
        """The handler is done with `stream`. If its last event has not come (the client
        left: a cancel, a deadline, a disconnect), the request is aborted: the
        orchestrator frees its slot and pages before its next step. `reason`: one of
        metrics.ABORT_REASONS."""
        if self._streams.get(stream.request_id) is stream:
            self.engine_loop.abort(stream.request_id, reason)

    # --- gRPC requests in, responses out -------------------------------------------------

    async def _refuse(self, context, code: grpc.StatusCode, message: str):
        self.count_refusal(code)
        await context.abort(code, message)

    async def _refuse_internal(self, context, what: str, exc: Exception):
        log.exception("%s failed", what)
        await self._refuse(context, Code.INTERNAL, f"the server failed while {what}: {exc!r}")

    def _prompt_ids(self, msg) -> list[int]:
        kind = msg.WhichOneof("input")
        if kind is None:
            raise RequestFailed(Code.INVALID_ARGUMENT, "the request has no input: set text, chat or token_ids")
        if kind == "text":
            if not msg.text:
                raise RequestFailed(Code.INVALID_ARGUMENT, "the input text is empty", "text")
            add = msg.add_special_tokens if msg.HasField("add_special_tokens") else True
            return self.encode(msg.text, add_special_tokens=add)
        if kind == "chat":
            return self._chat_ids(msg.chat)
        ids = list(msg.token_ids.ids)
        if not ids:
            raise RequestFailed(Code.INVALID_ARGUMENT, "token_ids is empty", "token_ids")
        self.check_token_ids(ids, "token_ids")
        return ids

    def _chat_ids(self, chat) -> list[int]:
        add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        return self.chat_ids([{"role": m.role, "content": m.content} for m in chat.messages],
                             add_generation_prompt=add_prompt)

    def _build_request(self, msg, tenant: str = "") -> Request:
        """The orchestrator's Request for a GenerateRequest (see `make_request`)."""
        sp = msg.sampling
        return self.make_request(
            lambda: self._prompt_ids(msg), request_id=msg.request_id,
            sampling={f: getattr(sp, f) for f in _SAMPLING_FIELDS if sp.HasField(f)},
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else None, stop=tuple(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos, cache_salt=msg.cache_salt,
            tenant=tenant,
        )

    async def _parse(self, raw: bytes, cls, context):
        try:
            return cls.FromString(raw)
        except UnicodeDecodeError as e:  # the pure-Python protobuf runtime's invalid UTF-8 (upb: DecodeError)
            message = f"a string field is not valid UTF-8 ({e.reason}); string fields take UTF-8 text only"
        except DecodeError as e:
            message = (f"{e}; string fields take UTF-8 text only" if "UTF-8" in str(e)
                       else f"{e}; send a serialized {cls.DESCRIPTOR.full_name}")
        await self._refuse(context, Code.INVALID_ARGUMENT, f"malformed {cls.DESCRIPTOR.name}: {message}")

    async def _open(self, raw: bytes, context) -> Stream:
        msg = await self._parse(raw, pb.GenerateRequest, context)
        try:
            self.check_serving()
            tenant = tenant_of(context.invocation_metadata()) if self.config.security.api_keys else ""
            [stream] = self.admit([self._build_request(msg, tenant)])
        except RequestFailed as r:
            await self._refuse(context, r.code, r.message)
        except Exception as e:  # noqa: BLE001 -- a fault of ours (tokenizer, template): this request alone
            await self._refuse_internal(context, "preparing the request", e)
        return stream

    def _leave(self, stream: Stream, context) -> None:
        """The handler ends: abort the request if it has not ended (client cancel, deadline)."""
        remaining = context.time_remaining()
        # A client whose deadline passes cancels the call itself, a little before the
        # server's copy of the deadline (sent as a timeout) runs out.
        self.release(stream, "deadline" if remaining is not None and remaining < 0.5 else "cancelled")

    # --- RPCs -------------------------------------------------------------------------

    async def Generate(self, raw: bytes, context):  # noqa: N802 -- gRPC method name
        stream = await self._open(raw, context)
        try:
            while True:
                try:
                    out, final = await self.next_output(stream)
                except RequestFailed as f:
                    await context.abort(f.code, f.message)
                yield _response(stream, out, final)
                if out.finished:
                    return
        finally:
            self._leave(stream, context)

    async def GenerateUnary(self, raw: bytes, context):  # noqa: N802
        stream = await self._open(raw, context)
        try:
            whole, final = await self.collect(stream)
        except RequestFailed as f:
            await context.abort(f.code, f.message)
        finally:
            self._leave(stream, context)
        return _response(stream, whole, final)

    async def Tokenize(self, raw: bytes, context):  # noqa: N802
        msg = await self._parse(raw, pb.TokenizeRequest, context)
        try:
            self.check_serving()
            if self._tokenizer is None:
                raise RequestFailed(Code.FAILED_PRECONDITION, "this server has no tokenizer (it serves random weights)")
            kind = msg.WhichOneof("input")
            if kind == "chat":
                ids = self._chat_ids(msg.chat)
            else:
                add = msg.add_special_tokens if msg.HasField("add_special_tokens") else True
                ids = self.encode(msg.text, add_special_tokens=add)
        except RequestFailed as r:
            await self._refuse(context, r.code, r.message)
        except Exception as e:  # noqa: BLE001 -- a fault of ours: this request alone
            await self._refuse_internal(context, "tokenizing", e)
        return pb.TokenizeResponse(token_ids=ids, tokens=[self._tokenizer.id_to_token(i) for i in ids])

    async def Detokenize(self, raw: bytes, context):  # noqa: N802
        msg = await self._parse(raw, pb.DetokenizeRequest, context)
        try:
            self.check_serving()
            if self._tokenizer is None:
                raise RequestFailed(Code.FAILED_PRECONDITION, "this server has no tokenizer (it serves random weights)")
            ids = list(msg.token_ids)
            # Ids of the model's vocabulary past the tokenizer's (padding rows) add no text.
            self.check_token_ids(ids, "token_ids")
            text = self._tokenizer.decode(ids, skip_special_tokens=msg.skip_special_tokens)
        except RequestFailed as r:
            await self._refuse(context, r.code, r.message)
        except Exception as e:  # noqa: BLE001 -- a fault of ours: this request alone
            await self._refuse_internal(context, "detokenizing", e)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, raw: bytes, context):  # noqa: N802
        await self._parse(raw, pb.GetModelInfoRequest, context)
        if not self._ready:
            await self._refuse(context, Code.UNAVAILABLE,
                               f"the server's engine failed: {self.fatal!r}" if self.fatal
                               else "the server is loading the model (warming up); retry shortly")
        return self.model_info()

    async def Abort(self, raw: bytes, context):  # noqa: N802
        msg = await self._parse(raw, pb.AbortRequest, context)
        if len(msg.request_id) > limits.MAX_REQUEST_ID_CHARS:
            # No request has such an id; echoed in NOT_FOUND, a long one would make the status
            # bigger than the client takes (it would see RESOURCE_EXHAUSTED from its transport).
            await self._refuse(context, Code.INVALID_ARGUMENT, f"request_id has {len(msg.request_id)} characters; "
                                                               f"at most {limits.MAX_REQUEST_ID_CHARS}")
        if msg.request_id not in self._streams:
            await context.abort(Code.NOT_FOUND, f"no request {msg.request_id!r} is in flight (unknown or finished)")
        self.engine_loop.abort(msg.request_id, "abort_rpc")
        return pb.AbortResponse()

    # --- model info -------------------------------------------------------------------

    def model_info(self) -> "pb.ModelInfo":
        cfg, ecfg, tok, orc = self._cfg, self._ecfg, self._tokenizer, self.engine_loop.orc
        load = self.engine_loop.load
        if tok is not None:
            special = dict(tok.special_tokens)
        else:
            special = {k: v for k, v in (("bos_token", cfg.bos_id), ("pad_token", cfg.pad_id)) if v is not None}
            if cfg.eos_ids:
                special["eos_token"] = cfg.eos_ids[0]
        return pb.ModelInfo(
            model=self.config.model_name,
            config=pb.ModelConfig(
                family=cfg.family, model_type=cfg.model_type, vocab_size=cfg.vocab_size, num_layers=cfg.num_layers,
                embed_dim=cfg.embed_dim, ffw_dim=cfg.ffw_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, max_position=cfg.max_position,
                json=json.dumps(dataclasses.asdict(cfg), default=str),
            ),
            max_model_len=ecfg.max_model_len,
            has_tokenizer=tok is not None,
            has_chat_template=bool(tok is not None and tok.chat_template),
            special_tokens=special,
            eos_token_ids=sorted(orc.eos_ids),
            sampling_defaults=self._sampling_defaults,
            capacity=pb.Capacity(
                max_num_seqs=ecfg.max_num_seqs, max_queue=self.config.max_queue,
                max_pending_tokens=self.config.max_pending_tokens, num_pages=orc.allocator.num_pages,
                page_size=ecfg.page_size, decode_steps_per_call=ecfg.decode_steps_per_call,
                num_top_logprobs=ecfg.num_top_logprobs,
                max_streams_per_connection=self.config.max_streams_per_connection,
                max_request_bytes=self.config.max_request_bytes,
                prefix_caching=orc.allocator.prefix_caching,
            ),
            load=pb.Load(
                num_running=load.num_running, num_waiting=load.num_waiting, num_in_flight=len(self._streams),
                num_pending_tokens=self._pending_tokens, num_pages_used=load.num_pages_used,
                num_pages_free=load.num_pages_free, num_preemptions=load.num_preemptions,
                num_compiles_since_ready=load.num_compiles_since_ready, draining=self._draining,
            ),
        )

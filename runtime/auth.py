"""Who may talk to the server: TLS (optionally mutual) and API keys.

  TLS       --tls_cert_file + --tls_key_file serve gRPC (and /metrics) over TLS;
            --tls_client_ca_file also requires every client to present a certificate
            signed by that CA (mutual TLS). A plaintext client cannot connect at all: its
            calls fail with UNAVAILABLE, as with any gRPC server that speaks only TLS.
  API keys  --api_key_file (one key per line; blank lines and # comments ignored). Every
            call must carry the metadata `authorization: Bearer <key>`, else
            UNAUTHENTICATED. gRPC health stays open, so load balancers need no key;
            reflection and the Prometheus /metrics endpoint need the key like the
            Generation service.

The checks keep only SHA-256 digests of the keys and compare a presented key's digest
with hmac.compare_digest against every accepted one, so the time a check takes says
nothing about how much of a key was right (nor its length). No message, log line or
repr carries a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Callable, Iterable

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open without a key: load balancers probe it
_BEARER = "bearer "


class _Encrypted(Exception):
    pass


def _no_passphrase():
    raise _Encrypted


def check_key_text(key: str) -> str | None:
    """Why `key` cannot be an API key (it travels as an HTTP/2 header value), or None."""
    if not key:
        return "the API key is empty"
    if not all("!" <= c <= "~" for c in key):
        return "an API key must be printable ASCII without spaces"
    return None


def load_api_keys(path: str) -> tuple[str, ...]:
    """The keys in `path`: one per line; blank lines and lines starting with # are
    skipped. Raises ValueError (naming the file and line, never a key) when the file
    is missing, unreadable, holds no key, or a key cannot be sent as a header."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    keys = []
    for n, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        problem = check_key_text(key)
        if problem:
            raise ValueError(f"{path}, line {n}: {problem}")
        keys.append(key)
    if not keys:
        raise ValueError(f"the API key file {path!r} holds no key: put one key per line (# starts a comment)")
    return tuple(keys)


class ApiKeys:
    """The accepted keys, as digests; `check` judges an `authorization` value."""

    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

    def check(self, authorization: str | None) -> str | None:
        """None if `authorization` is 'Bearer <an accepted key>', else why not: "missing",
        "malformed" or "invalid" (the keys of GRPC_MESSAGES and HTTP_MESSAGES)."""
        if authorization is None:
            return "missing"
        if authorization[: len(_BEARER)].lower() != _BEARER:
            return "malformed"
        digest = hashlib.sha256(authorization[len(_BEARER):].strip().encode()).digest()
        ok = False
        for accepted in self._digests:  # no early exit: every key is compared
            ok |= hmac.compare_digest(digest, accepted)
        return None if ok else "invalid"


# What a refused client is told, by transport; never what it sent.
GRPC_MESSAGES = {
    "missing": "this server requires an API key: send the metadata 'authorization: Bearer <key>' "
               "(runtime.client: --api_key or the XLSERVE_API_KEY environment variable)",
    "malformed": "the authorization metadata must be 'Bearer <key>'",
    "invalid": "the API key is not valid for this server",
}
HTTP_MESSAGES = {
    "missing": "this server requires an API key: send the header 'Authorization: Bearer <key>'",
    "malformed": "the Authorization header must be 'Bearer <key>'",
    "invalid": "the API key is not valid for this server",
}


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """TLS files and API keys; validated on construction (the files are read and
    parsed, so a bad path or PEM fails at start-up, not at the first connection)."""

    tls_cert_file: str | None = None  # PEM certificate chain of the server
    tls_key_file: str | None = None  # its PEM private key (unencrypted)
    tls_client_ca_file: str | None = None  # PEM CA(s): require client certificates signed by them (mTLS)
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # empty: no key needed

    def __post_init__(self):
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("give both tls_cert_file and tls_key_file (the server's certificate and its key)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for i, key in enumerate(self.api_keys):
            problem = check_key_text(key)
            if problem:
                raise ValueError(f"API key #{i + 1}: {problem}")
        if self.tls:
            self.server_ssl_context()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same certificate for an HTTPS server (/metrics); raises ValueError naming
        the file when one is missing or not the PEM it should be."""
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r}: no such file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file, password=_no_passphrase)
        except _Encrypted:
            raise ValueError(f"tls_key_file={self.tls_key_file!r} is encrypted; gRPC needs an unencrypted PEM key "
                             f"(openssl pkey -in KEY -out PLAIN)") from None
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_cert_file={self.tls_cert_file!r} and tls_key_file={self.tls_key_file!r} are not a "
                             f"PEM certificate chain and its private key ({e})") from None
        if self.tls_client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.tls_client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"tls_client_ca_file={self.tls_client_ca_file!r} holds no PEM CA certificate "
                                 f"({e})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials:
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        ca = read(self.tls_client_ca_file) if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials(
            [(read(self.tls_key_file), read(self.tls_cert_file))], root_certificates=ca,
            require_client_auth=ca is not None,
        )


def authorization_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def tenant_of(metadata) -> str:
    """A request's tenant for prefix caching: a digest of its API key (its bearer token),
    "" without one. Requests of different keys never share cached KV pages."""
    authorization = authorization_of(metadata)
    if authorization is None or authorization[: len(_BEARER)].lower() != _BEARER:
        return ""
    return hashlib.sha256(b"xlserve-tenant|" + authorization[len(_BEARER):].strip().encode()).hexdigest()[:32]


def _refusing_handler(handler: grpc.RpcMethodHandler, method: str, problem: str, on_refuse: Callable[[], None]):
    """A handler of `handler`'s kind (the server reads the request as that kind) that
    ends the call with UNAUTHENTICATED."""

    async def refuse(request, context):
        on_refuse()
        log.debug("%s from %s: API key %s", method, context.peer(), problem)  # never the key itself
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, GRPC_MESSAGES[problem])

    kinds = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kinds)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kinds)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kinds)
    return grpc.stream_stream_rpc_method_handler(refuse, **kinds)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health's without an accepted key (UNAUTHENTICATED);
    `on_refuse` counts them."""

    def __init__(self, keys: ApiKeys, on_refuse: Callable[[], None] = lambda: None):
        self.keys = keys
        self.on_refuse = on_refuse

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler  # None: an unknown method (UNIMPLEMENTED)
        problem = self.keys.check(authorization_of(handler_call_details.invocation_metadata))
        if problem is None:
            return handler
        return _refusing_handler(handler, handler_call_details.method, problem, self.on_refuse)


def wsgi_requiring_key(app, keys: ApiKeys):
    """`app` behind the same Bearer check: HTTP 401 without an accepted key."""

    def guarded(environ, start_response):
        problem = keys.check(environ.get("HTTP_AUTHORIZATION"))
        if problem is None:
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="xlserve metrics"')])
        return [f"{HTTP_MESSAGES[problem]}\n".encode()]

    return guarded

"""A throwaway PKI for the TLS tests, made with the `cryptography` package: a CA, a
server certificate for localhost, and client certificates from that CA and from another."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path) -> dict[str, str]:
    """ca.pem; server.pem/.key (SAN localhost, 127.0.0.1); client.pem/.key signed by the
    CA; rogue_client.pem/.key signed by another CA. Returns name -> path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder(subject_name=name(cn), issuer_name=name(cn), public_key=key.public_key(),
                                        serial_number=x509.random_serial_number(), **valid)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cert, key

    def leaf(issuer, cn, usage, san=None):
        issuer_cert, issuer_key = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder(subject_name=name(cn), issuer_name=issuer_cert.subject,
                                           public_key=key.public_key(), serial_number=x509.random_serial_number(),
                                           **valid)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    root, rogue = ca("xlserve test CA"), ca("rogue CA")
    server = leaf(root, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf(root, "client", ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = leaf(rogue, "rogue client", ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca.pem": _pem(root[0])}
    for stem, (cert, key) in (("server", server), ("client", client), ("rogue_client", rogue_client)):
        files[f"{stem}.pem"], files[f"{stem}.key"] = _pem(cert), _pem(key)
    paths = {}
    for filename, data in files.items():
        (directory / filename).write_bytes(data)
        paths[filename] = str(directory / filename)
    return paths

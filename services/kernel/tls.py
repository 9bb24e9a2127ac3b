"""Certificates for mTLS between the platform's processes.

A local certificate authority (``ca.pem``/``ca.key``) and, per identity, a certificate
``<identity>.pem`` with its key ``<identity>.key`` (ECDSA P-256, CN = the identity, SAN
DNS:localhost and IP:127.0.0.1), all in one directory (``.data/tls`` for `make run` and
`make test`). :func:`ensure` is idempotent: files that exist, parse, were signed by the CA
and are not about to expire are kept; anything else is (re)issued.

For a deployment (docker-compose.yml, deploy/k8s) ``python -m services.kernel.tls DIR
--domain ...`` issues the same files with the names the callers dial in each server's
certificate (:func:`deployment_names`) and copies, per identity, what that process needs
(``ca.pem``, ``<identity>.pem``, ``<identity>.key``; never ``ca.key``) into
``DIR/<identity>/``: the directory a container mounts as its EARN_TLS_DIR.

Who an identity is allowed to be (its role) is decided in one place,
``services.kernel.grpcserver.IDENTITY_ROLES``; this module only issues and loads files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "ca"
VALID_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=7)
LOCAL_NAMES = ("localhost",)  # and IP 127.0.0.1: in every certificate (health checks dial localhost)

# The DNS names (beyond LOCAL_NAMES) an identity's certificate carries: gRPC checks the
# name a caller dialled against the server certificate's subject alternative names.
Names = Callable[[str], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Credentials:
    """The PEM bytes a process needs: the CA to trust, its own certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes


def cert_path(directory: Path, identity: str) -> Path:
    return Path(directory) / f"{identity}.pem"


def key_path(directory: Path, identity: str) -> Path:
    return Path(directory) / f"{identity}.key"


def load(directory: Path | str, identity: str) -> Credentials:
    """The CA and ``identity``'s certificate and key from ``directory``; a clear error
    naming the file when one is missing."""
    directory = Path(directory)
    paths = (cert_path(directory, CA_NAME), cert_path(directory, identity), key_path(directory, identity))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: generate the certificates with `python -m services.devstack certs` "
                f"or set EARN_TLS_IDENTITY to an identity that has one"
            )
    return Credentials(*(path.read_bytes() for path in paths))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_before_utc <= _now() and cert.not_valid_after_utc - RENEW_BEFORE > _now()


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path(directory, CA_NAME).read_bytes())
        key = serialization.load_pem_private_key(key_path(directory, CA_NAME).read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _fresh(cert):
        return None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        return None
    return cert, key


def _issue_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "earn local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path(directory, CA_NAME), _key_pem(key))
    _write_public(cert_path(directory, CA_NAME), cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def deployment_names(identity: str, domains: Iterable[str] = ()) -> list[str]:
    """The host names callers dial ``identity`` by in a deployment: its compose service
    name (the identity, e.g. ``simple_earn``), its Kubernetes Service name (``-`` for
    ``_``: ``simple-earn``) and that name in each of ``domains`` (``simple-earn.earn.svc``)."""
    dashed = identity.replace("_", "-")
    names = [identity, dashed, *(f"{dashed}.{domain.strip('.')}" for domain in domains)]
    return list(dict.fromkeys(names))


def dns_names(cert: x509.Certificate) -> set[str]:
    """The DNS subject alternative names of ``cert``."""
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return set()


def _valid_leaf(directory: Path, identity: str, ca: x509.Certificate, names: Sequence[str] = ()) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path(directory, identity).read_bytes())
        key = serialization.load_pem_private_key(key_path(directory, identity).read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        return False
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not set(names) <= dns_names(cert):
        return False
    return _fresh(cert) and bool(common) and common[0].value == identity


def _issue_leaf(
    directory: Path, identity: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: Sequence[str] = ()
) -> None:
    dns = [x509.DNSName(name) for name in dict.fromkeys([*LOCAL_NAMES, *names])]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([*dns, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path(directory, identity), _key_pem(key))
    _write_public(cert_path(directory, identity), cert.public_bytes(serialization.Encoding.PEM))


def ensure(directory: Path | str, identities: Iterable[str] | None = None, names: Names | None = None) -> list[str]:
    """Make ``directory`` hold a valid CA and a valid certificate per identity (by default
    every identity of the kernel's table). ``names(identity)``: DNS names its certificate
    must carry besides localhost (a certificate without one of them is re-issued). Returns
    the identities (re)issued; a new CA re-issues every certificate."""
    if identities is None:
        from services.kernel.grpcserver import IDENTITY_ROLES

        identities = IDENTITY_ROLES
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    issued: list[str] = []
    loaded = _load_ca(directory)
    if loaded is None:
        loaded = _issue_ca(directory)
        issued.append(CA_NAME)
    ca, ca_key = loaded
    for identity in identities:
        wanted = names(identity) if names else ()
        if not _valid_leaf(directory, identity, ca, wanted):
            _issue_leaf(directory, identity, ca, ca_key, wanted)
            issued.append(identity)
    return issued


def split(directory: Path | str, identities: Iterable[str]) -> None:
    """Copy, per identity, the CA certificate and the identity's certificate and key into
    ``directory/<identity>/``: what one process mounts (the CA's key stays behind)."""
    directory = Path(directory)
    for identity in identities:
        target = directory / identity
        target.mkdir(mode=0o700, exist_ok=True)
        _write_public(cert_path(target, CA_NAME), cert_path(directory, CA_NAME).read_bytes())
        _write_public(cert_path(target, identity), cert_path(directory, identity).read_bytes())
        _write_private(key_path(target, identity), key_path(directory, identity).read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.kernel.tls DIR [--domain earn.svc] [--identity NAME]...``"""
    from services.kernel.grpcserver import IDENTITY_ROLES

    parser = argparse.ArgumentParser(
        prog="python -m services.kernel.tls",
        description="Issue (or keep, while valid) a CA and a certificate per identity in DIR, each server's "
        "certificate naming the hosts callers dial (the identity, its Kubernetes Service name and that name "
        "in each --domain), and copy each identity's files into DIR/<identity>/ for its container.",
    )
    parser.add_argument("directory", type=Path, help="where the CA and the certificates are kept (keep ca.key safe)")
    parser.add_argument("--domain", action="append", default=[], help="e.g. earn.svc (repeatable)")
    parser.add_argument("--identity", action="append", default=[], choices=sorted(IDENTITY_ROLES),
                        help="only these identities (repeatable; default: every identity)")
    args = parser.parse_args(argv)
    identities = args.identity or list(IDENTITY_ROLES)
    issued = ensure(args.directory, identities, names=lambda identity: deployment_names(identity, args.domain))
    split(args.directory, identities)
    print(f"{args.directory}: {'issued ' + ', '.join(issued) if issued else 'all certificates valid'}; "
          f"per identity in {args.directory}/<identity>/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

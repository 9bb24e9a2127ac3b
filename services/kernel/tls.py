"""Certificates for mTLS between the platform's processes.

A local certificate authority (``ca.pem``/``ca.key``) and, per identity, a certificate
``<identity>.pem`` with its key ``<identity>.key`` (ECDSA P-256, CN = the identity, SAN
DNS:localhost and IP:127.0.0.1), all in one directory (``.data/tls`` for `make run` and
`make test`). :func:`ensure` is idempotent: files that exist, parse, were signed by the CA
and are not about to expire are kept; anything else is (re)issued.

Who an identity is allowed to be (its role) is decided in one place,
``services.kernel.grpcserver.IDENTITY_ROLES``; this module only issues and loads files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
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


def _valid_leaf(directory: Path, identity: str, ca: x509.Certificate) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path(directory, identity).read_bytes())
        key = serialization.load_pem_private_key(key_path(directory, identity).read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        return False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _fresh(cert) and bool(names) and names[0].value == identity


def _issue_leaf(directory: Path, identity: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
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
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
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


def ensure(directory: Path | str, identities: Iterable[str] | None = None) -> list[str]:
    """Make ``directory`` hold a valid CA and a valid certificate per identity (by default
    every identity of the kernel's table). Returns the identities (re)issued; a new CA
    re-issues every certificate."""
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
        if not _valid_leaf(directory, identity, ca):
            _issue_leaf(directory, identity, ca, ca_key)
            issued.append(identity)
    return issued

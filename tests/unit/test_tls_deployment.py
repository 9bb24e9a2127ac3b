"""The certificates of a deployment (docker-compose.yml, deploy/k8s): issued by
`python -m services.kernel.tls DIR --domain ...`, each server certificate names the hosts
its callers dial (gRPC checks the dialled name against it), each identity's directory
holds only what its process mounts, and the containers' health check
(`python -m services.kernel.healthcheck`) speaks mTLS with them. An in-process gRPC
server with the health service stands in for a platform process (no database needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.kernel import grpcclient, tls
from services.kernel.config import REPO_ROOT
from services.kernel.grpcserver import IDENTITY_ROLES


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("deploy-tls")
    assert tls.main([str(directory), "--domain", "earn.svc"]) == 0
    return directory


def serve(directory: Path, identity: str) -> tuple[grpc.Server, int]:
    """A gRPC server with ``identity``'s certificate (from its own directory), requiring
    client certificates of the CA, serving the health service."""
    creds = tls.load(directory / identity, identity)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True)
    )
    server.start()
    return server, port


@pytest.fixture(scope="module")
def simple_earn(certs: Path) -> Iterator[int]:
    server, port = serve(certs, "simple_earn")
    yield port
    server.stop(None)


def check(certs: Path, port: int, dialled: str, caller: str = "scheduler") -> grpc.StatusCode:
    """Dial the server as if by host name ``dialled`` with ``caller``'s directory."""
    options = [("grpc.ssl_target_name_override", dialled)]
    with grpcclient.sync_channel(f"127.0.0.1:{port}", options, tls_dir=str(certs / caller), identity=caller) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def test_every_identity_gets_a_directory_with_its_files_only(certs: Path) -> None:
    for identity in IDENTITY_ROLES:
        files = sorted(p.name for p in (certs / identity).iterdir())
        assert files == sorted(["ca.pem", f"{identity}.pem", f"{identity}.key"]), identity
        assert (certs / identity / f"{identity}.key").stat().st_mode & 0o077 == 0, identity
        assert (certs / identity / f"{identity}.pem").read_bytes() == (certs / f"{identity}.pem").read_bytes()
    assert not (certs / "wallet" / "ca.key").exists()


def test_server_certificates_name_the_compose_and_kubernetes_hosts(certs: Path) -> None:
    cert = x509.load_pem_x509_certificate((certs / "simple_earn.pem").read_bytes())
    assert tls.dns_names(cert) == {"localhost", "simple_earn", "simple-earn", "simple-earn.earn.svc"}


@pytest.mark.parametrize("dialled", ["simple_earn", "simple-earn.earn.svc", "localhost"])
def test_callers_verify_the_server_by_the_name_they_dial(certs: Path, simple_earn: int, dialled: str) -> None:
    assert check(certs, simple_earn, dialled) == grpc.StatusCode.OK


def test_a_name_the_certificate_does_not_carry_is_refused(certs: Path, simple_earn: int) -> None:
    assert check(certs, simple_earn, "wallet.earn.svc") == grpc.StatusCode.UNAVAILABLE


def test_reissuing_keeps_valid_certificates_and_adds_a_new_domain(certs: Path, tmp_path: Path) -> None:
    before = (certs / "wallet.pem").read_bytes()
    assert tls.ensure(certs, ["wallet"], names=lambda i: tls.deployment_names(i, ["earn.svc"])) == []
    assert (certs / "wallet.pem").read_bytes() == before
    scratch = tmp_path / "tls"
    tls.ensure(scratch, ["wallet"])  # the local stack's certificates: localhost only
    assert tls.ensure(scratch, ["wallet"], names=lambda i: tls.deployment_names(i, ["earn.svc"])) == ["wallet"]
    assert "wallet.earn.svc" in tls.dns_names(x509.load_pem_x509_certificate((scratch / "wallet.pem").read_bytes()))


def test_the_container_health_check_speaks_mtls(certs: Path, simple_earn: int) -> None:
    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.kernel.healthcheck", f"localhost:{simple_earn}"],
            cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )

    done = run({"EARN_TLS_DIR": str(certs / "scheduler"), "EARN_TLS_IDENTITY": "scheduler"})
    assert done.returncode == 0, done.stderr
    plaintext = run({"EARN_TLS_DIR": "", "EARN_TLS_IDENTITY": ""})
    assert plaintext.returncode == 1, plaintext.stderr

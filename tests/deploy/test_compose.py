"""docker-compose.yml against the Compose specification's JSON schema (vendored in
deploy/schemas, with its source), and what the schema cannot know: every service
restarts and has a health check, every process of PROCESSES is a compose service (the
demo's price simulator and exchange generator only under the `demo` profile), every
process that serves gRPC listens on its port and is checked on the gRPC health service,
every process with metrics serves /metrics where Prometheus looks for it, the scheduler
gets the address of every product whose jobs it runs, Prometheus and Grafana get their
files, and every process talks mTLS: the one-shot `certs` service issues the
certificates into a volume, each process mounts its own identity's directory of it
read-only at EARN_TLS_DIR, sets EARN_TLS_IDENTITY and starts after `certs` succeeded."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import jsonschema
import pytest

from services.devstack.processes import PROCESSES
from services.kernel.config import REPO_ROOT
from services.kernel.grpcserver import IDENTITY_ROLES
from tests.deploy.tools import DEMO_ONLY, DEPLOY, NOT_DEPLOYED_YET, deployed_processes, load_yaml, scraped_jobs

SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # deploy/schemas/README.md
# Demo-only processes: in compose under the `demo` profile, not in Kubernetes (README).
DEMO = DEMO_ONLY
PLATFORM = scraped_jobs()
GRPC = {spec.name: spec.default_port for spec in PROCESSES if spec.port_env and spec.name not in NOT_DEPLOYED_YET}
# One-shot services: run to completion before the others (depends_on
# service_completed_successfully), restarted only on failure, no health check.
ONE_SHOT = {"certs"}
TLS_DIR = "/etc/earn/tls"


def compose() -> dict[str, Any]:
    return load_yaml(REPO_ROOT / "docker-compose.yml")


def errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_schema_is_the_vendored_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_follows_the_specification() -> None:
    assert errors(compose()) == []


@pytest.mark.parametrize("breakage", ["unknown key", "bad restart type", "bad port list"])
def test_the_schema_check_catches_mistakes(breakage: str) -> None:
    document = copy.deepcopy(compose())
    wallet = document["services"]["wallet"]
    if breakage == "unknown key":
        wallet["healthcheck"]["intervall"] = "10s"
    elif breakage == "bad restart type":
        wallet["restart"] = ["always"]
    else:
        wallet["ports"] = "50051:50051"
    assert errors(document)


def test_every_service_restarts_and_has_a_health_check() -> None:
    for name, service in compose()["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "on-failure" and "healthcheck" not in service, name
            continue
        assert service.get("restart") in {"unless-stopped", "always"}, name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_every_process_is_a_compose_service() -> None:
    services = compose()["services"]
    assert PLATFORM >= {"wallet", "simple_earn", "accrual", "scheduler", "launchpool", "candydrop", "market", "dual", "leverage"}
    for spec in [*deployed_processes(), *(s for s in PROCESSES if s.name in DEMO)]:
        assert spec.name in services, f"{spec.name} (services/devstack/processes.py) is not in docker-compose.yml"
        service = services[spec.name]
        assert service["command"] == ["python", "-m", spec.module], spec.name
        assert service.get("profiles", []) == (["demo"] if spec.name in DEMO else []), spec.name


def test_grpc_services_listen_on_their_port_and_are_health_checked() -> None:
    services = compose()["services"]
    for name, port in GRPC.items():
        service = services[name]
        assert service["environment"]["EARN_GRPC_PORT"] == str(port), name
        # Through the kernel's client (mTLS with the process's certificate), not insecure_channel.
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "services.kernel.healthcheck", f"localhost:{port}"], name


def test_callers_get_the_addresses_of_the_services_they_call() -> None:
    services = compose()["services"]
    for name in ("simple_earn", "launchpool", "candydrop", "dual", "leverage", "loan"):
        assert services[name]["environment"]["EARN_WALLET_ADDRESS"] == f"wallet:{GRPC['wallet']}", name
    for name in ("dual", "leverage", "loan"):
        assert services[name]["environment"]["EARN_MARKET_ADDRESS"] == f"market:{GRPC['market']}", name
        assert services[name]["depends_on"]["market"]["condition"] == "service_healthy", name
    scheduler = services["scheduler"]["environment"]
    for product in ("simple_earn", "launchpool", "candydrop", "dual", "leverage", "loan"):  # each enables its jobs
        assert scheduler[f"EARN_{product.upper()}_ADDRESS"] == f"{product}:{GRPC[product]}", product
    assert services["candydrop_generator"]["environment"]["EARN_CANDYDROP_ADDRESS"] == f"candydrop:{GRPC['candydrop']}"


def test_platform_processes_serve_metrics_where_prometheus_scrapes() -> None:
    services = compose()["services"]
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    for name in PLATFORM:
        env = services[name]["environment"]
        assert env["EARN_METRICS_PORT"] == "9100" and env["EARN_METRICS_HOST"] == "0.0.0.0", name
        (job,) = [j for j in scrape if j["job_name"] == name]
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [name] and sd["port"] == 9100


def test_prometheus_and_grafana_get_their_files() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(v.endswith(":/prometheus") for v in prometheus["volumes"])
    grafana = services["grafana"]
    assert any(v.endswith(":/var/lib/grafana") for v in grafana["volumes"])
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "${" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]  # from the environment, not the file


def test_certs_are_issued_once_before_every_process_into_a_volume() -> None:
    document = compose()
    certs = document["services"]["certs"]
    store = "/var/lib/earn-certs"
    assert certs["command"] == ["python", "-m", "services.kernel.tls", store]  # the project's issuer, per-identity copies
    assert certs["volumes"] == [f"tls:{store}"] and "tls" in document["volumes"]
    assert certs["image"] == document["services"]["wallet"]["image"]
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert f"chown 10001:10001 {store}" in dockerfile  # the volume takes the owner of the image's directory


def test_every_process_talks_mtls_with_its_own_certificate_only() -> None:
    services = compose()["services"]
    processes = [spec for spec in [*deployed_processes(), *(s for s in PROCESSES if s.name in DEMO)]]
    assert processes
    for spec in processes:
        service = services[spec.name]
        env = service["environment"]
        identity = spec.tls_identity or spec.name  # as services/devstack/processes.py sets it
        assert env["EARN_TLS_DIR"] == TLS_DIR, spec.name
        assert env["EARN_TLS_IDENTITY"] == identity and identity in IDENTITY_ROLES, spec.name
        assert service["depends_on"]["certs"] == {"condition": "service_completed_successfully"}, spec.name
        mounts = [v for v in service["volumes"] if isinstance(v, dict) and v.get("source") == "tls"]
        assert mounts == [{"type": "volume", "source": "tls", "target": TLS_DIR, "read_only": True,
                           "volume": {"subpath": identity}}], spec.name  # never the CA's key or another's
    # Nothing but `certs` mounts the whole volume (it holds the CA's key).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if name != "certs" and isinstance(volume, str):
                assert not volume.startswith("tls:"), name


def test_callers_dial_names_the_server_certificates_carry() -> None:
    from services.kernel.tls import deployment_names

    for name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if variable.endswith("_ADDRESS") and variable.startswith("EARN_"):
                host = value.split(":")[0]
                assert host in GRPC and host in IDENTITY_ROLES and host in deployment_names(host), f"{name} {variable}"
        test = service.get("healthcheck", {}).get("test", [])
        if "services.kernel.healthcheck" in test:
            host = test[-1].split(":")[0]
            assert host == "localhost" or host in GRPC, name

"""docker-compose.yml against the Compose specification's JSON schema (vendored in
deploy/schemas, with its source), and what the schema cannot know: every service
restarts and has a health check, every platform process serves /metrics where
Prometheus looks for it, and Prometheus and Grafana get their files."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import jsonschema
import pytest

from services.kernel.config import REPO_ROOT
from tests.deploy.tools import DEPLOY, load_yaml

SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # deploy/schemas/README.md
PLATFORM = {"wallet", "simple_earn", "accrual", "scheduler"}


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
        assert service.get("restart") in {"unless-stopped", "always"}, name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


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

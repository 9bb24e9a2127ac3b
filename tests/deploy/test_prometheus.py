"""Prometheus configuration and rules, checked with the real promtool: the scrape configs
load, the rules load, every alert has unit tests that show it firing, and the unit tests
pass. (That every metric they use exists: tests/integration/test_observability.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.deploy.tools import DEPLOY, load_yaml, run, scraped_jobs, tool

PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.test.yml"))
# Every deployed process with metrics (tests/deploy/tools.py: not the demo's simulators).
JOBS = scraped_jobs()


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in load_yaml(path)["groups"] for rule in group["rules"]]


def test_compose_scrape_config_is_valid() -> None:
    out = run(tool("promtool"), "check", "config", PROM / "prometheus.yml")
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out.stdout + out.stderr
    config = load_yaml(PROM / "prometheus.yml")
    assert {job["job_name"] for job in config["scrape_configs"]} == JOBS | {"prometheus"}
    assert JOBS >= {"launchpool", "candydrop", "market", "dual", "leverage"}


def test_every_job_is_watched_for_down_and_missing_targets() -> None:
    by_name = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    assert set(by_name["EarnTargetDown"].split('job=~"')[1].split('"')[0].split("|")) == JOBS
    for job in JOBS:
        assert f'absent(up{{job="{job}"}})' in by_name["EarnTargetMissing"], job


def test_kubernetes_scrape_config_is_valid_apart_from_discovery(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the discovery block is
    swapped for a static target here; the rest (relabelling, rule files) is checked."""
    config = load_yaml(PROM / "prometheus-k8s.yml")
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(PROM / "rules", tmp_path / "rules")
    run(tool("promtool"), "check", "config", tmp_path / "prometheus.yml")
    compose = load_yaml(PROM / "prometheus.yml")
    scheduler = next(job for job in compose["scrape_configs"] if job["job_name"] == "scheduler")
    assert config["scrape_configs"][0]["metric_relabel_configs"] == scheduler["metric_relabel_configs"]


def test_rules_load() -> None:
    run(tool("promtool"), "check", "rules", *RULE_FILES)


def test_every_alert_has_severity_summary_and_description() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]
    assert len({r["alert"] for r in alerts}) == len(alerts)


def test_every_alert_is_unit_tested_firing() -> None:
    fired = set()
    for path in TEST_FILES:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    missing = {r["alert"] for r in rules() if "alert" in r} - fired
    assert not missing, f"alerts without a unit test that shows them firing: {sorted(missing)}"


def test_rule_unit_tests_pass() -> None:
    assert TEST_FILES
    out = run(tool("promtool"), "test", "rules", *TEST_FILES, cwd=PROM / "tests")
    assert "SUCCESS" in out.stdout + out.stderr

"""Grafana: the dashboards are what deploy/grafana/generate.py writes, each one a valid
dashboard model (schemaVersion, unique ids, a grid that fits, every datasource the
provisioned one), with bounded labels only; the provisioning files agree with them and
with docker-compose.yml. (Every query returns series: tests/integration/test_observability.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from typing import Any

import pytest

from services.kernel.config import REPO_ROOT
from tests.deploy.tools import DEPLOY, load_yaml

GRAFANA = DEPLOY / "grafana"
FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "table", "gauge", "bargauge", "text"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}
# Labels a dashboard may group or name series by: bounded sets, never users or positions.
BOUNDED_LABELS = {
    "job", "instance", "pod", "grpc_service", "grpc_method", "grpc_code", "grpc_type", "schema", "partition",
    "type", "reason", "product", "asset", "outcome", "job_name", "status", "le",
    "pool", "pair", "topic", "direction", "underlying", "kind", "band",
}


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("earn_grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def datasource() -> dict[str, str]:
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    return {"type": ds["type"], "uid": ds["uid"]}


def dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, json.loads(path.read_text())) for path in FILES]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def test_dashboards_are_the_generators_output() -> None:
    rendered = generator().render()
    assert sorted(rendered) == [path.name for path in FILES]
    for path in FILES:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run .venv/bin/python deploy/grafana/generate.py"


def test_one_dashboard_per_area() -> None:
    tags = {tag for _, board in dashboards() for tag in board["tags"]}
    assert {"overview", "wallet", "simple_earn", "accrual", "jobs", "launchpool", "candydrop", "market", "dual", "leverage"} <= tags


def test_every_grpc_service_has_its_red_panels_and_the_overview_every_process() -> None:
    from tests.deploy.tools import scraped_jobs

    exprs = {name: [t["expr"] for p in panels(board) for t in p.get("targets", [])] for name, board in dashboards()}
    for service in ("Wallet", "SimpleEarn", "Launchpool", "CandyDrop", "Market", "Dual", "Leverage"):
        selector = f'grpc_service="earn.v1.{service}Service"'
        assert any(selector in e and "grpc_server_handled_total" in e for es in exprs.values() for e in es), service
        assert any(selector in e and "grpc_server_handling_seconds_bucket" in e for es in exprs.values() for e in es), service
    (targets,) = [e for e in exprs["earn-overview.json"] if e.startswith("up{")]
    jobs = set(targets.split('job=~"')[1].split('"')[0].split("|"))
    assert jobs == scraped_jobs()


@pytest.mark.parametrize("name", [path.name for path in FILES])
def test_dashboard_is_a_valid_grafana_model(name: str) -> None:
    board = json.loads((GRAFANA / "dashboards" / name).read_text())
    ds = datasource()
    for key in ("uid", "title", "tags", "timezone", "schemaVersion", "version", "panels", "templating", "annotations", "time", "refresh"):
        assert key in board, key
    assert isinstance(board["schemaVersion"], int) and 36 <= board["schemaVersion"] <= 41
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    assert board["panels"]

    ids = [p["id"] for p in panels(board)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), "panel ids must be unique"

    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        pos = panel["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in pos.values()), panel["title"]
        assert pos["h"] >= 1 and 1 <= pos["w"] <= 24 and pos["x"] >= 0 and pos["y"] >= 0 and pos["x"] + pos["w"] <= 24
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            assert pos["w"] == 24 and pos["h"] == 1
            continue
        assert panel["title"] and panel["datasource"] == ds, panel["title"]
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == ds and target["expr"].strip()

    variables = board["templating"]["list"]
    names = {v["name"] for v in variables}
    assert len(names) == len(variables)
    for variable in variables:
        if "datasource" in variable:
            assert variable["datasource"] == ds
    for panel in panels(board):
        for target in panel.get("targets", []):
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= names | GRAFANA_VARIABLES, f"{panel['title']}: undefined variables {used - names - GRAFANA_VARIABLES}"
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"] in (ds, {"type": "grafana", "uid": "-- Grafana --"})


def test_dashboards_have_unique_uids_and_titles() -> None:
    boards = [board for _, board in dashboards()]
    assert len({b["uid"] for b in boards}) == len(boards)
    assert len({b["title"] for b in boards}) == len(boards)


def test_queries_group_and_name_series_by_bounded_labels_only() -> None:
    for name, board in dashboards():
        for panel in panels(board):
            for target in panel.get("targets", []):
                grouped = {
                    label.strip()
                    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", target["expr"])
                    for label in clause.split(",") if label.strip()
                }
                legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
                assert grouped | legend <= BOUNDED_LABELS, f"{name} {panel['title']}: {(grouped | legend) - BOUNDED_LABELS}"


def test_provisioning_matches_compose() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "earn.yml")["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    compose = load_yaml(REPO_ROOT / "docker-compose.yml")
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (REPO_ROOT / source).resolve()
    assert mounts[provider["options"]["path"]] == (GRAFANA / "dashboards").resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]

"""Where the suite finds the deployment files and the pinned tools (`make tools` installs
them into build/tools; `make test` depends on it). A missing tool fails the test."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.kernel.config import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
TOOLS = REPO_ROOT / "build" / "tools"

# Processes of services/devstack/processes.py (PROCESSES) that are not deployed: the demo's
# price simulator and exchange generator (compose's `demo` profile only, never scraped, not
# on Kubernetes), and services whose deployment files have not been written yet (each
# listed with why: remove it when its compose service, manifest, scrape job, up alerts and
# dashboard land). Every other process must be in every deployment file.
DEMO_ONLY = frozenset({"market_simulator", "candydrop_generator"})
NOT_DEPLOYED_YET = frozenset({
})


def deployed_processes() -> list[Any]:
    """The ProcessSpecs every deployment file must carry (the demo's under a profile in compose only)."""
    from services.devstack.processes import PROCESSES

    return [spec for spec in PROCESSES if spec.name not in DEMO_ONLY | NOT_DEPLOYED_YET]


def scraped_jobs() -> set[str]:
    """Prometheus job names: every deployed process with a metrics listener."""
    return {spec.name for spec in deployed_processes() if spec.metrics_port_env}


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.is_file():
        pytest.fail(f"{path.relative_to(REPO_ROOT)} is missing: `make tools` installs it (`make test` does)")
    return str(path)


def run(*args: str | Path, cwd: Path = REPO_ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool; fail the test with its output unless it exits 0."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]

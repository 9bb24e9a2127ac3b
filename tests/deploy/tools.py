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

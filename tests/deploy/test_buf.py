"""The protobuf contracts: `buf lint` clean, and `buf breaking` (WIRE_JSON, protos/buf.yaml)
against the protos as they were before the last commit that changed a .proto file, from
the repository's own history, so the check means the same on a fresh clone in CI as here.
Uncommitted .proto changes are also checked against HEAD."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from services.kernel.config import REPO_ROOT
from tests.deploy.tools import run, tool

PROTOS = REPO_ROOT / "protos"
PROTO_FILES = ":(glob)protos/**/*.proto"


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"git {' '.join(args)}: {done.stderr.strip()} (the check needs the repository's history: a full clone)")
    return done.stdout.strip()


def baselines() -> list[str]:
    """Commits to compare the working tree's protos with."""
    last_change = git("log", "-1", "--format=%H", "--", PROTO_FILES)
    assert last_change, "no commit changed a .proto file"
    found = [git("rev-parse", f"{last_change}~1")]
    if git("status", "--porcelain", "--", PROTO_FILES):
        found.append(git("rev-parse", "HEAD"))
    return found


def test_lint() -> None:
    run(tool("buf"), "lint", cwd=PROTOS)


def test_no_wire_or_json_breaking_change_since_before_the_last_proto_change() -> None:
    for commit in baselines():
        run(tool("buf"), "breaking", "--against", f"{REPO_ROOT / '.git'}#ref={commit},subdir=protos", cwd=PROTOS)


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("string idempotency_key = 1;", "int64 idempotency_key = 1;", "FIELD_WIRE_JSON_COMPATIBLE_TYPE"),  # a field's type
        ("string idempotency_key = 1;", "string idempotency_key = 99;", "FIELD_NO_DELETE"),  # a field's number
        ("string idempotency_key = 1;", "string request_key = 1;", "FIELD_SAME_JSON_NAME"),  # a JSON name
    ],
)
def test_the_rules_catch_a_break(tmp_path: Path, old: str, new: str, rule: str) -> None:
    changed = tmp_path / "protos"
    shutil.copytree(PROTOS, changed)
    wallet = changed / "earn" / "v1" / "wallet.proto"
    text = wallet.read_text()
    assert old in text
    wallet.write_text(text.replace(old, new, 1))
    done = subprocess.run([tool("buf"), "breaking", "--against", str(PROTOS), "--error-format", "json"],
                          cwd=changed, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and rule in done.stdout, done.stdout + done.stderr

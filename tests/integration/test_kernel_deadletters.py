"""The kernel's dead-letter helper against each service's own ``dead_letters`` table, as
its migrations create it (Simple Earn's has an id and ``created_at`` and a unique
constraint; the others a primary key and ``parked_at``): a record is parked once per
(topic, partition, offset), the error cut to 2,000 characters, the bytes kept as they came."""

from __future__ import annotations

import re

import asyncpg
import pytest

from services.kernel import deadletters
from services.kernel.config import REPO_ROOT

pytestmark = pytest.mark.integration

SERVICES = ("simple_earn", "hodler", "candydrop", "loan", "launchpool", "market")


def table_definition(service: str) -> str:
    for path in sorted((REPO_ROOT / "services" / service / "migrations").glob("*.sql")):
        found = re.search(r"CREATE TABLE dead_letters \(.*?\n\);", path.read_text(), re.S)
        if found:
            return found.group(0)
    raise AssertionError(f"{service} has no dead_letters table")


@pytest.mark.parametrize("service", SERVICES)
async def test_park_once_per_record(stack, service: str) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(stack.settings.database_url)
    schema = f"dl_{service}"
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}")
        await conn.execute(table_definition(service))
        assert await deadletters.park(conn, "t.loan.actions", 2, 41, "DecodeError: " + "x" * 3000, b"\x07\xff") is True
        assert await deadletters.park(conn, "t.loan.actions", 2, 41, "again", b"other") is False  # a redelivery
        assert await deadletters.park(conn, "t.loan.actions", 3, 41, "other partition", b"") is True
        rows = await conn.fetch('SELECT topic, "partition", "offset", error, raw FROM dead_letters ORDER BY "partition"')
        assert [(r["topic"], r["partition"], r["offset"], bytes(r["raw"])) for r in rows] == [
            ("t.loan.actions", 2, 41, b"\x07\xff"), ("t.loan.actions", 3, 41, b"")]
        assert len(rows[0]["error"]) == deadletters.ERROR_MAX and rows[0]["error"].startswith("DecodeError: x")
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()

"""PostgreSQL: the asyncpg pool of a service and its SQL migrations.

Each service owns one schema. Its pool sets ``search_path`` to that schema, so the
service's SQL names its tables without a prefix and cannot reach another's by accident.

Migrations are plain SQL files applied in order by a small runner (no extra tool): the
kernel's own files (outbox, inbox, idempotency) first, then the service's. Each file runs
once, in its own transaction, under an advisory lock, and is recorded in
``<schema>.schema_migrations``. Files are never edited after they land; a change is a
new file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import asyncpg

from services.kernel.config import Settings

log = logging.getLogger(__name__)

KERNEL_MIGRATIONS = Path(__file__).parent / "migrations"
_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def _checked(schema: str) -> str:
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return schema


async def create_pool(settings: Settings, schema: str, **kwargs: object) -> asyncpg.Pool:
    """A pool whose connections work inside ``schema``."""
    kwargs.setdefault("min_size", settings.pg_pool_min)
    kwargs.setdefault("max_size", settings.pg_pool_max)
    pool = await asyncpg.create_pool(
        settings.database_url,
        server_settings={"search_path": _checked(schema), "application_name": schema},
        **kwargs,  # type: ignore[arg-type]
    )
    assert pool is not None
    return pool


def _files(directories: list[Path]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for directory in directories:
        for path in sorted(directory.glob("*.sql")):
            found.append((f"{directory.parent.name}/{path.name}", path))
    return found


async def migrate(settings: Settings, schema: str, directory: Path) -> list[str]:
    """Apply pending migrations of the kernel and of ``directory`` into ``schema``.

    Returns the versions applied now. Safe to run from several processes at once.
    """
    schema = _checked(schema)
    lock_key = int.from_bytes(hashlib.sha256(f"migrate:{schema}".encode()).digest()[:8], "big", signed=True)
    conn = await asyncpg.connect(settings.database_url)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, path in _files([KERNEL_MIGRATIONS, directory]):
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied_now.append(version)
                log.info("migration applied", extra={"schema": schema, "version": version})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
    finally:
        await conn.close()
    return applied_now

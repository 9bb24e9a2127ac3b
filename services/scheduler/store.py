"""Run records of the scheduler (asyncpg) and the per-job lock.

A run is keyed by (job, period). ``begin`` is the idempotent start: it creates the run,
or resumes a failed or interrupted one (attempts + 1), and returns None for a run that
already succeeded, which is never run again.

Only one process runs a given job at a time: ``job_lock`` takes a PostgreSQL session
advisory lock on a connection held for the whole run. A process that dies (SIGKILL, lost
host) loses its session and so the lock; its run is left 'running' and the next holder
of the lock resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.scheduler.domain import Cadence, Period

SCHEMA = "scheduler"
MIGRATIONS = Path(__file__).parent / "migrations"

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


@dataclass(frozen=True, slots=True)
class Run:
    job: str
    period: str
    cadence: Cadence
    boundary_hour: int
    status: str
    step: str
    triggered_by: str
    started_at: datetime
    finished_at: datetime | None
    attempts: int
    totals: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


_COLUMNS = "job, period, cadence, boundary_hour, status, step, triggered_by, started_at, finished_at, attempts, totals, error"


def _run(row: asyncpg.Record) -> Run:
    totals = row["totals"]
    return Run(
        job=row["job"],
        period=row["period"],
        cadence=Cadence(row["cadence"]),
        boundary_hour=row["boundary_hour"],
        status=row["status"],
        step=row["step"],
        triggered_by=row["triggered_by"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        totals=json.loads(totals) if isinstance(totals, str) else dict(totals or {}),
        error=row["error"],
    )


def lock_key(schema: str, job: str) -> int:
    return int.from_bytes(hashlib.sha256(f"scheduler:{schema}:{job}".encode()).digest()[:8], "big", signed=True)


@contextlib.asynccontextmanager
async def job_lock(pool: asyncpg.Pool, schema: str, job: str) -> AsyncIterator[asyncpg.Connection | None]:
    """Yield a connection holding the job's lock, or None when another process holds it."""
    key = lock_key(schema, job)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield None
            return
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):  # a broken connection released the lock already
                await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def ensure_start(conn: asyncpg.Connection, job: str, start_hour: int) -> int:
    """The unix hour a job's calendar begins at: fixed the first time the job is seen."""
    await conn.execute(
        "INSERT INTO job_starts (job, start_hour) VALUES ($1, $2) ON CONFLICT (job) DO NOTHING", job, start_hour
    )
    return await conn.fetchval("SELECT start_hour FROM job_starts WHERE job = $1", job)


async def get_start(conn: asyncpg.Connection | asyncpg.Pool, job: str) -> int | None:
    return await conn.fetchval("SELECT start_hour FROM job_starts WHERE job = $1", job)


async def last_succeeded(conn: asyncpg.Connection, job: str, cadence: Cadence) -> Period | None:
    boundary = await conn.fetchval(
        "SELECT max(boundary_hour) FROM job_runs WHERE job = $1 AND status = 'succeeded'", job
    )
    return None if boundary is None else Period(cadence, boundary - cadence.hours)


async def begin(conn: asyncpg.Connection, job: str, period: Period, triggered_by: str) -> Run | None:
    """Start or resume the run of (job, period); None if it already succeeded."""
    row = await conn.fetchrow(
        "INSERT INTO job_runs (job, period, cadence, boundary_hour, status, triggered_by, started_at, attempts)"
        " VALUES ($1, $2, $3, $4, 'running', $5, clock_timestamp(), 1)"
        " ON CONFLICT (job, period) DO UPDATE SET"
        "   status = 'running', triggered_by = EXCLUDED.triggered_by, started_at = EXCLUDED.started_at,"
        "   finished_at = NULL, attempts = job_runs.attempts + 1, error = NULL"
        " WHERE job_runs.status <> 'succeeded'"
        f" RETURNING {_COLUMNS}",
        job,
        period.id,
        period.cadence.value,
        period.boundary_hour,
        triggered_by,
    )
    return None if row is None else _run(row)


async def set_step(conn: asyncpg.Connection, job: str, period: str, step: str) -> None:
    await conn.execute(
        "UPDATE job_runs SET step = $3 WHERE job = $1 AND period = $2 AND status = 'running'", job, period, step
    )


async def succeed(conn: asyncpg.Connection, job: str, period: str, totals: Mapping[str, Any]) -> Run:
    row = await conn.fetchrow(
        "UPDATE job_runs SET status = 'succeeded', finished_at = clock_timestamp(), totals = $3::jsonb,"
        " step = '', error = NULL"
        f" WHERE job = $1 AND period = $2 AND status = 'running' RETURNING {_COLUMNS}",
        job,
        period,
        json.dumps(dict(totals), sort_keys=True),
    )
    if row is None:
        raise RuntimeError(f"run {job} {period} is not running: cannot record its success")
    return _run(row)


async def fail(conn: asyncpg.Connection, job: str, period: str, error: str, totals: Mapping[str, Any] | None = None) -> None:
    """Record a failed (or interrupted) run; ``step`` keeps where it stopped."""
    await conn.execute(
        "UPDATE job_runs SET status = 'failed', finished_at = clock_timestamp(), error = $3,"
        " totals = coalesce($4::jsonb, totals)"
        " WHERE job = $1 AND period = $2 AND status = 'running'",
        job,
        period,
        error[:4000],
        None if totals is None else json.dumps(dict(totals), sort_keys=True),
    )


async def get(conn: asyncpg.Connection | asyncpg.Pool, job: str, period: str) -> Run | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM job_runs WHERE job = $1 AND period = $2", job, period)
    return None if row is None else _run(row)


async def list_runs(conn: asyncpg.Connection | asyncpg.Pool, job: str | None = None, limit: int = 50) -> list[Run]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM job_runs WHERE $1::text IS NULL OR job = $1"
        " ORDER BY boundary_hour DESC, job LIMIT $2",
        job,
        limit,
    )
    return [_run(r) for r in rows]


async def last_success_times(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, datetime]:
    rows = await conn.fetch(
        "SELECT job, max(finished_at) AS at FROM job_runs WHERE status = 'succeeded' GROUP BY job"
    )
    return {r["job"]: r["at"] for r in rows}

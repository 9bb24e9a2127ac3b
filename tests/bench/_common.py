"""Plumbing shared by the benchmarks in tests/bench: the machine line, Prometheus scrapes,
CPU accounting per process (and per service's PostgreSQL backends), scratch databases
and topics, service processes. No measurements here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shlex
import sys
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import asyncpg

from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec
from services.kernel.config import Settings
from tests.conftest import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def header(title: str) -> None:
    """The command line, the machine and its load when the run starts."""
    print(title)
    print(f"command: {shlex.join([Path(sys.executable).name, '-m', 'tests.bench.' + Path(sys.argv[0]).stem, *sys.argv[1:]])}")
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} ({platform.python_implementation()}),"
        f" {platform.system()} {platform.release()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    sys.stdout.flush()


# ------------------------------------------------------------------ metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def scrape(url: str, timeout: float = 30.0) -> dict[str, float]:
    """A /metrics page as {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


def metric_sum(sample: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in sample.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


# ------------------------------------------------------------------ CPU accounting


def ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pids() -> Iterable[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


class CpuMeter:
    """CPU seconds (user + system) per component over a window, sampled every ``every`` s.

    Components: the given processes by pid, the PostgreSQL backends of ``database`` by
    application_name (each service's pool names itself after its schema), every other
    PostgreSQL process (checkpointer, WAL writer, other databases' sessions), the Kafka
    broker (java) and this benchmark process. Sampling, not two snapshots: asyncpg pools
    replace a connection after 50,000 queries, and an ended backend's CPU would be lost
    (at most the last ``every`` seconds of one are)."""

    def __init__(self, processes: Mapping[str, int], pool: asyncpg.Pool, database: str, every: float = 0.5) -> None:
        self.processes = {pid: name for name, pid in processes.items()}
        self.pool = pool
        self.database = database
        self.every = every
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self.labels: dict[int, str] = {}
        self.task: asyncio.Task[None] | None = None

    def _raw(self) -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        for pid in _pids():
            comm = "tracked" if pid in self.processes else _comm(pid)
            if comm in ("postgres", "java", "tracked") or pid == os.getpid():
                t = ticks(pid)
                if t is not None:
                    out[pid] = (comm, t)
        return out

    async def _sample(self) -> None:
        rows = await self.pool.fetch(
            "SELECT pid, application_name, backend_type FROM pg_stat_activity WHERE datname = $1", self.database
        )
        for r in rows:
            if r["application_name"]:
                self.labels[r["pid"]] = f"PostgreSQL backends of {r['application_name']}"
            elif r["pid"] not in self.labels:  # autovacuum workers; a backend starting up has no name yet
                self.labels[r["pid"]] = f"PostgreSQL {r['backend_type']}"
        self.last.update(self._raw())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._sample()

    async def begin(self) -> None:
        await self._sample()
        self.first = {pid: t for pid, (_, t) in self.last.items()}
        self.task = asyncio.create_task(self._loop())

    async def end(self) -> dict[str, float]:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._sample()
        totals: dict[str, float] = {}
        for pid, (comm, t) in self.last.items():
            delta = (t - self.first.get(pid, 0)) / CLK_TCK
            if pid in self.processes:
                label = self.processes[pid]
            elif pid == os.getpid():
                label = "benchmark process (producers, pollers)"
            elif comm == "java":
                label = "Kafka broker (java)"
            else:
                label = self.labels.get(pid, "PostgreSQL, other processes")
            totals[label] = totals.get(label, 0.0) + delta
        return totals


# ------------------------------------------------------------------ databases, topics


def admin_url(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[0] + "/postgres"


async def recreate_database(settings: Settings, name: str) -> None:
    conn = await asyncpg.connect(admin_url(settings))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(settings: Settings, name: str) -> None:
    conn = await asyncpg.connect(admin_url(settings))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def settle(conn: asyncpg.Connection, tables: Iterable[str]) -> str:
    """Make tables just loaded by COPY look like long-lived ones, which autovacuum has
    long since visited: hint bits set, the visibility map set (index-only scans fetch no
    heap page), statistics fresh. Returns a line with each table's share of all-visible
    pages, to print.

    Call it once no other transaction of the database is open: rows newer than the oldest
    open snapshot cannot be marked visible to all. And the local server commits
    asynchronously (synchronous_commit=off, see services/devstack/infra.py): VACUUM may
    not set a hint bit, so may not mark a page all-visible, until the WAL of the commit
    that wrote its rows is flushed. The flush is judged by the commit LSN of the rows'
    transaction id group (32 ids), which any later asynchronous commit of that group
    moves on: a VACUUM just after a COPY, or after another table's ANALYZE, left a table
    not all-visible. So each VACUUM follows a synchronous commit, which flushes the WAL up
    to it (a transaction that writes WAL: one that only takes a transaction id commits
    asynchronously whatever synchronous_commit says), and the ANALYZEs come last."""
    tables = list(tables)
    for table in tables:
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = on")
            await conn.execute("SELECT pg_logical_emit_message(true, 'earn.bench', 'settle')")
        await conn.execute(f"VACUUM {table}")
    shares = []
    for table in tables:
        await conn.execute(f"ANALYZE {table}")
        pages, visible = await conn.fetchrow(
            "SELECT relpages, relallvisible FROM pg_class WHERE oid = $1::regclass", table
        )
        if pages:
            shares.append(f"{table} {visible / pages:.0%}")
    if len(tables) > 6:  # many tables: name only those not all-visible
        short = [share for share in shares if not share.endswith(" 100%")]
        return (f"all-visible pages after VACUUM: 100% in {len(tables) - len(short)} of {len(tables)} tables"
                + (": " + ", ".join(short) if short else ""))
    return "all-visible pages after VACUUM: " + ", ".join(shares)


async def schema_tables(conn: asyncpg.Connection, schemas: Iterable[str]) -> list[str]:
    """Every table of ``schemas``, qualified, for ``settle``."""
    return await conn.fetchval(
        "SELECT coalesce(array_agg(format('%I.%I', n.nspname, c.relname) ORDER BY n.nspname, c.relname), '{}')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY($1::text[]) AND c.relkind = 'r'",
        list(schemas),
    )


# ------------------------------------------------------------------ processes


def spawn(name: str, env: Mapping[str, str], log_dir: Path, spec: ProcessSpec | None = None) -> ManagedProcess:
    spec = spec or next(s for s in PROCESSES if s.name == name)
    return ManagedProcess(
        spec,
        env,
        log_dir=log_dir,
        port=free_port() if spec.port_env else None,
        metrics_port=free_port() if spec.metrics_port_env else None,
        echo=False,
    )

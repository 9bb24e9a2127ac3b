"""Scheduler against the real PostgreSQL: run records, job lock, process loop, CLI.

Each test works in a schema of its own (EARN_SCHEDULER_SCHEMA), so the runs of one test
never meet another's. Tests named ``test_simple_earn_*`` run the jobs against the real
Simple Earn service (with the wallet and the accrual engine); the others need only
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest

from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec
from services.kernel import db
from services.kernel.clock import set_time
from services.kernel.config import REPO_ROOT
from services.scheduler import domain, store
from services.scheduler.domain import Cadence
from tests.conftest import GATEWAY, OPERATOR, SERVICE, Env, free_port, unique

T = TypeVar("T")


# ---- helpers ----


def now_hour() -> datetime:
    """The start of the current UTC hour: periods before it are over in the real world too."""
    return domain.hour_time(domain.unix_hour(datetime.now(UTC)))


def clock_at(moment: datetime) -> str:
    """A file clock standing at ``moment`` (services.kernel.clock), for the processes."""
    path = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    set_time(path, moment)
    return str(path)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60, proc: ManagedProcess | None = None) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if proc is not None and not proc.running():
            pytest.fail(f"{proc.name} exited ({proc.returncode}) while waiting for {what}; see {proc.logfile}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def schema(stack: Env) -> AsyncIterator[str]:
    name = f"scheduler_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pool(stack: Env, schema: str) -> AsyncIterator[asyncpg.Pool]:
    await db.migrate(stack.settings, schema, store.MIGRATIONS)
    created = await db.create_pool(stack.settings, schema, min_size=1, max_size=6)
    yield created
    await created.close()


async def runs(pool: asyncpg.Pool, job: str | None = None) -> list[store.Run]:
    return sorted(await store.list_runs(pool, job, 10000), key=lambda r: (r.job, r.boundary_hour))


def scheduler(stack: Env, schema: str, **env: str) -> ManagedProcess:
    defaults = {
        "EARN_SCHEDULER_SCHEMA": schema,
        "EARN_RETRY_SECONDS": "0.5",
        "EARN_MAX_SLEEP_SECONDS": "0.5",
        "EARN_RPC_TIMEOUT_SECONDS": "5",
        "EARN_PAYOUT_POLL_SECONDS": "0.1",
    }
    return stack.process("scheduler", **{**defaults, **env})


def dead_address() -> str:
    """A loopback port nothing listens on: every call fails UNAVAILABLE at once."""
    return f"127.0.0.1:{free_port()}"


def cli(stack: Env, schema: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.scheduler.cli", *args],
        env={**stack.env, "EARN_SCHEDULER_SCHEMA": schema, "COLUMNS": "200", **env},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


# ---- run records (store) ----


async def test_a_run_is_keyed_by_job_and_period_and_never_repeated_once_succeeded(pool: asyncpg.Pool) -> None:
    period = domain.parse_period(Cadence.DAILY, "2026-11-26")
    async with pool.acquire() as conn:
        first = await store.begin(conn, "job.a", period, "schedule")
        assert first is not None and (first.status, first.attempts, first.boundary_hour) == ("running", 1, period.boundary_hour)
        await store.set_step(conn, "job.a", period.id, "request_payout")
        await store.fail(conn, "job.a", period.id, "SimpleEarn.RequestPayout: UNAVAILABLE", {"product_ids": ["p1"]})
        failed = await store.get(conn, "job.a", period.id)
        assert failed is not None
        assert (failed.status, failed.step, failed.error) == ("failed", "request_payout", "SimpleEarn.RequestPayout: UNAVAILABLE")
        assert failed.finished_at is not None

        resumed = await store.begin(conn, "job.a", period, "cli")
        assert resumed is not None and (resumed.status, resumed.attempts, resumed.error, resumed.triggered_by) == ("running", 2, None, "cli")
        totals = {"items": 3, "paid": {"BTC": "0.00000123", "USDT": "12.500000"}}
        done = await store.succeed(conn, "job.a", period.id, totals)
        assert (done.status, done.attempts, done.totals) == ("succeeded", 2, totals)
        assert done.duration_seconds is not None and done.duration_seconds >= 0

        assert await store.begin(conn, "job.a", period, "schedule") is None  # never again
        again = await store.get(conn, "job.a", period.id)
        assert again == done
        # Another job's run of the same period is its own record.
        assert await store.begin(conn, "job.b", period, "schedule") is not None
        assert await store.last_succeeded(conn, "job.a", Cadence.DAILY) == period
        assert await store.last_succeeded(conn, "job.b", Cadence.DAILY) is None
    # Amounts stay decimal strings in the database, never floats.
    raw = await pool.fetchval("SELECT totals -> 'paid' ->> 'USDT' FROM job_runs WHERE job = 'job.a'")
    assert raw == "12.500000"


async def test_the_job_lock_admits_one_runner_and_dies_with_its_session(stack: Env, pool: asyncpg.Pool, schema: str) -> None:
    period = domain.parse_period(Cadence.HOURLY, "2026-11-26T13")
    holder = await asyncpg.connect(stack.settings.database_url, server_settings={"search_path": schema})
    holder_pid = holder.get_server_pid()
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", store.lock_key(schema, "job.k"))
        run = await store.begin(holder, "job.k", period, "schedule")
        assert run is not None and run.attempts == 1
        async with store.job_lock(pool, schema, "job.k") as conn:
            assert conn is None  # held by the "scheduler"
        async with store.job_lock(pool, schema, "other.job") as conn:
            assert conn is not None  # jobs do not block each other
    finally:
        holder.terminate()  # like SIGKILL: no unlock, no status update
    # The server ends the dead session (and frees its lock) as soon as it sees the socket
    # closed: asynchronously, so allow it a moment.
    deadline = time.monotonic() + 10
    while await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", holder_pid):
        assert time.monotonic() < deadline, "the terminated session is still alive"
        await asyncio.sleep(0.02)
    async with store.job_lock(pool, schema, "job.k") as conn:
        assert conn is not None
        stale = await store.get(conn, "job.k", period.id)
        assert stale is not None and stale.status == "running"  # left behind by the dead runner
        resumed = await store.begin(conn, "job.k", period, "schedule")
        assert resumed is not None and resumed.attempts == 2
        await store.succeed(conn, "job.k", period.id, {})
    assert [(r.period, r.status, r.attempts) for r in await runs(pool, "job.k")] == [(period.id, "succeeded", 2)]


async def test_a_jobs_start_is_fixed_when_first_seen(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await store.ensure_start(conn, "job.s", 500000) == 500000
        assert await store.ensure_start(conn, "job.s", 500100) == 500000  # a restart later skips nothing
        assert await store.get_start(conn, "job.s") == 500000
        assert await store.get_start(conn, "job.none") is None


# ---- the process, without Simple Earn: failures are recorded, order is kept ----


async def test_a_failing_period_is_retried_and_blocks_the_later_ones(stack: Env, pool: asyncpg.Pool, schema: str) -> None:
    now = now_hour() + timedelta(minutes=7)
    start = now_hour() - timedelta(hours=4)
    proc = scheduler(
        stack, schema,
        EARN_SIMPLE_EARN_ADDRESS=dead_address(), EARN_SCHEDULER_JOBS="ticks,simple_earn.maturity",
        EARN_SCHEDULER_START=iso(start), EARN_CLOCK_FILE=clock_at(now),
    )
    proc.start()
    try:
        async def retried() -> list[store.Run] | None:
            found = await runs(pool)
            retrying = len(found) == 2 and all(r.attempts >= 3 for r in found)
            # Seen between two attempts: at least one run rests as failed with its error.
            return found if retrying and any(r.status == "failed" for r in found) else None

        found = await eventually(retried, "both jobs to retry their first period", proc=proc)
        first = domain.first_period(Cadence.HOURLY, start)
        for run in found:
            # Only the first due period was ever started: periods run strictly in order.
            assert (run.period, run.status) in ((first.id, "failed"), (first.id, "running"))
            assert run.triggered_by == "schedule"
        failed = [r for r in found if r.status == "failed"]
        assert failed
        for row in failed:
            assert row.error and "UNAVAILABLE" in row.error and row.step in ("close_hour", "mature_due")

        assert proc.metrics_url
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode())
        assert 'earn_job_runs_total{job="ticks",status="failed"}' in body
        assert 'earn_job_duration_seconds_bucket{job="simple_earn.maturity"' in body
        assert 'earn_job_due_periods{job="ticks"} 4.0' in body
        assert await asyncio.to_thread(proc.stop, 20) == 0  # SIGTERM: clean exit
    finally:
        proc.kill()
    # Stopped cleanly: nothing left 'running'.
    assert await pool.fetchval("SELECT count(*) FROM job_runs WHERE status = 'running'") == 0


async def test_sigterm_during_a_step_lets_it_end_then_exits_cleanly(stack: Env, pool: asyncpg.Pool, schema: str) -> None:
    """A port that accepts connections but never answers (no server at all behind it) keeps
    the run inside its step until the call's deadline."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        now = now_hour() + timedelta(minutes=1)
        proc = scheduler(
            stack, schema,
            EARN_SIMPLE_EARN_ADDRESS=f"127.0.0.1:{silent.getsockname()[1]}", EARN_SCHEDULER_JOBS="ticks",
            EARN_SCHEDULER_START=iso(now - timedelta(hours=2)), EARN_CLOCK_FILE=clock_at(now),
            EARN_RPC_TIMEOUT_SECONDS="2",
        )
        proc.start()
        try:
            async def in_step() -> list[store.Run] | None:
                found = await runs(pool)
                return found if found and found[0].status == "running" and found[0].step == "close_hour" else None

            await eventually(in_step, "the first run to enter close_hour", proc=proc)
            assert await asyncio.to_thread(proc.stop, 20) == 0
        finally:
            proc.kill()
    finally:
        silent.close()
    [run] = await runs(pool)
    # The step in flight ended (deadline), then the run stopped: failed or interrupted, never 'running'.
    assert run.status == "failed" and run.finished_at is not None, run


# ---- the CLI ----


async def test_cli_list_preview_and_trigger_refusals(stack: Env, pool: asyncpg.Pool, schema: str) -> None:
    now = now_hour() + timedelta(minutes=30)
    start = now_hour() - timedelta(hours=3)
    env = {"EARN_SCHEDULER_START": iso(start), "EARN_SIMPLE_EARN_ADDRESS": dead_address()}
    first = domain.first_period(Cadence.HOURLY, start)

    listed = await asyncio.to_thread(cli, stack, schema, "list", **env)
    assert listed.returncode == 0, listed.stderr + listed.stdout
    assert "job runs (0)" in listed.stdout

    preview = await asyncio.to_thread(cli, stack, schema, "preview", "--job", "simple_earn.interest.hourly", "--now", iso(now), **env)
    assert preview.returncode == 0, preview.stderr + preview.stdout
    out = preview.stdout
    assert "due now: 3 period(s)" in out and first.id in out
    assert f"CloseHour(hour={first.boundary_hour})" in out
    assert f"RequestPayout(job='simple_earn.interest.hourly', period='{first.id}'" in out
    assert "per-user amounts: not available" in out and "PreviewPayout" in out and "UNAVAILABLE" in out
    # A dry run writes nothing.
    assert await pool.fetchval("SELECT count(*) FROM job_starts") == 0
    assert await pool.fetchval("SELECT count(*) FROM job_runs") == 0

    skip = await asyncio.to_thread(
        cli, stack, schema, "trigger", "--job", "ticks", "--period", first.next().id, "--now", iso(now), **env
    )
    assert skip.returncode == 3, skip.stdout + skip.stderr
    assert f"run {first.id} first" in skip.stdout

    future = domain.period_containing(Cadence.HOURLY, now)
    early = await asyncio.to_thread(cli, stack, schema, "trigger", "--job", "ticks", "--period", future.id, "--now", iso(now), **env)
    assert early.returncode == 3 and "not due" in early.stdout, early.stdout

    bad = await asyncio.to_thread(cli, stack, schema, "trigger", "--job", "ticks", "--period", "2026-11-26", **env)
    assert bad.returncode == 2 and "YYYY-MM-DDTHH" in bad.stdout, bad.stdout

    unknown = await asyncio.to_thread(cli, stack, schema, "preview", "--job", "nope", **env)
    assert unknown.returncode == 2 and "unknown job" in unknown.stdout

    # Simple Earn is down: the trigger runs, fails, and says why; the record shows it.
    down = await asyncio.to_thread(cli, stack, schema, "trigger", "--job", "ticks", "--period", first.id, "--now", iso(now), **env)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout, down.stdout
    as_json = await asyncio.to_thread(cli, stack, schema, "list", "--job", "ticks", "--json", **env)
    [record] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (record["period"], record["status"], record["triggered_by"]) == (first.id, "failed", "cli")

    # The job's lock held elsewhere (a running scheduler): the trigger refuses, it does not race.
    async with store.job_lock(pool, schema, "ticks") as conn:
        assert conn is not None
        busy = await asyncio.to_thread(cli, stack, schema, "trigger", "--job", "ticks", "--period", first.id, "--now", iso(now), **env)
    assert busy.returncode == 3 and "another process" in busy.stdout, busy.stdout


# ---- against the real Simple Earn ----
#
# Simple Earn over the session's wallet, and the accrual engine, which each test starts
# itself (the kill test needs it down at first). Products of both payout cadences exist,
# so every payout goes through the engine (a payout of no product completes at once).

ACCRUAL = ProcessSpec("accrual", "services.accrual.main", None, None, "EARN_METRICS_PORT", 9110)


def _spec(name: str, fallback: ProcessSpec | None = None) -> ProcessSpec:
    found = next((spec for spec in PROCESSES if spec.name == name), fallback)
    if found is None:
        pytest.fail(f"the scheduler's job tests run against the real {name}; it is not registered in PROCESSES")
    if importlib.util.find_spec(found.module) is None:
        pytest.fail(f"the scheduler's job tests run against the real {name}; module {found.module} does not exist yet")
    return found


@pytest.fixture(scope="module")
async def simple_earn(stack: Env, wallet_process: ManagedProcess) -> AsyncIterator[ManagedProcess]:
    proc = stack.spawn(_spec("simple_earn"), EARN_WALLET_ADDRESS=wallet_process.address or "")
    proc.start()
    try:
        await asyncio.to_thread(proc.wait_ready, 60)
        from earn.v1 import accrual_pb2, simple_earn_pb2, simple_earn_pb2_grpc

        async with grpcclient.channel(proc.address) as channel:
            stub = simple_earn_pb2_grpc.SimpleEarnServiceStub(channel)
            for cadence in (simple_earn_pb2.PAYOUT_CADENCE_HOURLY, simple_earn_pb2.PAYOUT_CADENCE_DAILY):
                await stub.CreateProduct(
                    simple_earn_pb2.CreateProductRequest(
                        idempotency_key=unique("sched-product"), product_id=unique("sched"), asset="BTC",
                        kind=simple_earn_pb2.PRODUCT_KIND_FLEXIBLE, tiers=[accrual_pb2.RateTier(up_to="", apr="0.05")],
                        min_subscription="0.001", payout_cadence=cadence,
                    ),
                    metadata=OPERATOR, timeout=30,
                )
        yield proc
    finally:
        proc.stop()


def _accrual(stack: Env) -> ManagedProcess:
    return stack.spawn(_spec("accrual", ACCRUAL))


async def _close_hour(address: str, hour: int) -> list[int]:
    from earn.v1 import simple_earn_pb2, simple_earn_pb2_grpc

    async with grpcclient.channel(address) as channel:
        reply = await simple_earn_pb2_grpc.SimpleEarnServiceStub(channel).CloseHour(
            simple_earn_pb2.CloseHourRequest(hour=hour), metadata=SERVICE, timeout=30
        )
    return list(reply.closed)


async def _payout_status(address: str, job: str, period: str) -> Any:
    from earn.v1 import simple_earn_pb2, simple_earn_pb2_grpc

    async with grpcclient.channel(address) as channel:
        return await simple_earn_pb2_grpc.SimpleEarnServiceStub(channel).GetPayoutStatus(
            simple_earn_pb2.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE, timeout=30
        )


async def test_simple_earn_catch_up_runs_every_job_in_order(stack: Env, simple_earn: ManagedProcess, pool: asyncpg.Pool, schema: str) -> None:
    address = simple_earn.address
    assert address
    now = now_hour() + timedelta(minutes=5)
    start = now_hour() - timedelta(hours=3)
    hourly_jobs = ("ticks", "simple_earn.maturity", "simple_earn.interest.hourly")
    accrual = _accrual(stack)
    accrual.start()
    proc = scheduler(stack, schema, EARN_SIMPLE_EARN_ADDRESS=address, EARN_SCHEDULER_JOBS=",".join(hourly_jobs),
                     EARN_SCHEDULER_START=iso(start), EARN_CLOCK_FILE=clock_at(now),
                     EARN_PAYOUT_TIMEOUT_SECONDS="120")
    proc.start()
    try:
        hourly = domain.due_periods(domain.Job("h", Cadence.HOURLY), None, now, start=start)
        assert len(hourly) == 3

        async def all_done() -> list[store.Run] | None:
            found = await runs(pool)
            return found if len(found) == 9 and all(r.status == "succeeded" for r in found) else None

        found = await eventually(all_done, "9 runs to succeed", timeout=240, proc=proc)
        assert await asyncio.to_thread(proc.stop, 20) == 0

        # The daily payout by the operator CLI, from yesterday on (the job's own start).
        daily = await asyncio.to_thread(
            cli, stack, schema, "catch-up", "--job", "simple_earn.interest.daily", "--now", iso(now),
            EARN_SIMPLE_EARN_ADDRESS=address, EARN_SCHEDULER_START=iso(now_hour() - timedelta(hours=24)),
            EARN_PAYOUT_POLL_SECONDS="0.1", EARN_PAYOUT_TIMEOUT_SECONDS="120",
        )
        yesterday = domain.period_containing(Cadence.DAILY, now_hour() - timedelta(hours=24))
        assert daily.returncode == 0, daily.stdout + daily.stderr
        assert f"1 run(s) succeeded simple_earn.interest.daily: {yesterday.id} .. {yesterday.id}" in daily.stdout.replace("\n", " ")

        found = await runs(pool)
        expected = {job: hourly for job in hourly_jobs} | {"simple_earn.interest.daily": [yesterday]}
        assert {r.job for r in found} == set(expected)
        for job, periods in expected.items():
            mine = [r for r in found if r.job == job]
            assert [(r.period, r.status, r.attempts) for r in mine] == [(p.id, "succeeded", 1) for p in periods]
            # Strictly in order: each period started after the previous one finished.
            for earlier, later in zip(mine, mine[1:]):
                assert earlier.finished_at is not None and earlier.finished_at <= later.started_at
        for run in found:
            if run.job.startswith("simple_earn.interest."):
                status = await _payout_status(address, run.job, run.period)
                assert status.complete
                assert run.totals["product_ids"]  # the products of the cadence were paid
                assert run.totals["items"] == status.items
                assert run.totals["paid"] == dict(status.paid)
            if run.job == "simple_earn.maturity":
                assert {"matured", "renewed"} <= set(run.totals)
        # Every hour before the last boundary is closed: closing again closes nothing.
        assert await _close_hour(address, hourly[-1].boundary_hour) == []
    finally:
        proc.kill()
        accrual.stop()


async def test_simple_earn_killed_run_resumes_and_completes_once(stack: Env, simple_earn: ManagedProcess, pool: asyncpg.Pool, schema: str) -> None:
    """SIGTERM, then SIGKILL, the scheduler while a payout is in flight (the accrual engine is
    down, so the payout cannot complete); restart it with the engine up: the run completes, once.
    Periods of their own (hours 7 and 6 before now), so no other test requested them."""
    address = simple_earn.address
    assert address
    now = now_hour() - timedelta(hours=5) + timedelta(minutes=5)
    start = now_hour() - timedelta(hours=7)
    env = dict(EARN_SIMPLE_EARN_ADDRESS=address, EARN_SCHEDULER_JOBS="simple_earn.interest.hourly",
               EARN_SCHEDULER_START=iso(start), EARN_CLOCK_FILE=clock_at(now),
               EARN_PAYOUT_TIMEOUT_SECONDS="300")
    periods = domain.due_periods(domain.Job("h", Cadence.HOURLY), None, now, start=start)
    assert len(periods) == 2
    first = periods[0]
    proc = scheduler(stack, schema, **env)
    proc.start()
    accrual = _accrual(stack)
    try:
        async def waiting() -> store.Run | None:
            run = await store.get(pool, "simple_earn.interest.hourly", first.id)
            return run if run and run.status == "running" and run.step == "await_payout" else None

        await eventually(waiting, f"{first.id} to wait for its payout", proc=proc)
        # SIGTERM while waiting: the wait is cut short, the run recorded interrupted, exit 0.
        assert await asyncio.to_thread(proc.stop, 20) == 0
        stopped = await store.get(pool, "simple_earn.interest.hourly", first.id)
        assert stopped is not None and stopped.status == "failed" and (stopped.error or "").startswith("interrupted:")
        assert stopped.step == "await_payout" and stopped.totals["product_ids"]

        proc = scheduler(stack, schema, **env)
        proc.start()
        await eventually(waiting, f"{first.id} to wait for its payout again", proc=proc)
        await asyncio.sleep(1)  # a few polls: still incomplete, since no engine runs
        proc.kill()  # SIGKILL mid-run
        stale = await store.get(pool, "simple_earn.interest.hourly", first.id)
        assert stale is not None and (stale.status, stale.step, stale.attempts) == ("running", "await_payout", 2)
        assert len(await runs(pool)) == 1  # the later period never started
        assert not (await _payout_status(address, "simple_earn.interest.hourly", first.id)).complete

        accrual.start()
        proc = scheduler(stack, schema, **env)
        proc.start()

        async def all_done() -> list[store.Run] | None:
            found = await runs(pool)
            return found if len(found) == len(periods) and all(r.status == "succeeded" for r in found) else None

        found = await eventually(all_done, "the catch-up to complete after the restart", timeout=240, proc=proc)
        assert [(r.period, r.attempts) for r in found] == [(first.id, 3), (periods[1].id, 1)]
        for run in found:
            status = await _payout_status(address, "simple_earn.interest.hourly", run.period)
            assert status.complete and run.totals["items"] == status.items and run.totals["paid"] == dict(status.paid)
        assert await asyncio.to_thread(proc.stop, 20) == 0
    finally:
        proc.kill()
        accrual.stop()


async def test_simple_earn_cli_preview_shows_per_user_amounts_and_totals(stack: Env, simple_earn: ManagedProcess, wallet_process: ManagedProcess, schema: str) -> None:
    """The CLI's preview of a payout not requested yet lists what each position would be
    paid (Simple Earn's PreviewPayout) and the totals. A period of its own (hours 10 to 9
    before now), which no other test requests; the positions' history is moved back in
    time in Simple Earn's tables (the preview reads only those)."""
    from decimal import Decimal

    from earn.v1 import accrual_pb2, simple_earn_pb2, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc

    address = simple_earn.address
    assert address and wallet_process.address
    start_hour = domain.unix_hour(now_hour()) - 12
    period = domain.period_containing(Cadence.HOURLY, now_hour() - timedelta(hours=10))
    users = [unique("prev") for _ in range(22)]
    principals = [Decimal(n + 1) / 10 for n in range(len(users))]
    async with grpcclient.channel(address) as channel, grpcclient.channel(wallet_process.address) as wchannel:
        earn = simple_earn_pb2_grpc.SimpleEarnServiceStub(channel)
        wallet = wallet_pb2_grpc.WalletServiceStub(wchannel)
        product = (await earn.CreateProduct(
            simple_earn_pb2.CreateProductRequest(
                idempotency_key=unique("prev-product"), product_id=unique("prev"), asset="BTC", kind=simple_earn_pb2.PRODUCT_KIND_FLEXIBLE,
                tiers=[accrual_pb2.RateTier(up_to="", apr="0.05")], min_subscription="0.001", payout_cadence=simple_earn_pb2.PAYOUT_CADENCE_HOURLY,
            ),
            metadata=OPERATOR, timeout=30,
        )).product
        for user, principal in zip(users, principals):
            await wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique("dep"), owner=user, asset="BTC", amount=str(principal)), metadata=OPERATOR)
            await earn.Subscribe(
                simple_earn_pb2.SubscribeRequest(idempotency_key=unique(), user_id=user, product_id=product.product_id, amount=str(principal)),
                metadata=GATEWAY, timeout=30,
            )
    # Move the product's rates and the positions' history back in time.
    conn = await asyncpg.connect(stack.settings.database_url, server_settings={"search_path": "simple_earn"})
    try:
        await conn.execute("UPDATE rate_history SET effective_hour = $1 WHERE product_id = $2", start_hour - 5, product.product_id)
        await conn.execute(
            "UPDATE principal_changes SET effective_hour = $1 WHERE position_id IN (SELECT id FROM positions WHERE product_id = $2)",
            start_hour, product.product_id,
        )
    finally:
        await conn.close()

    env = dict(EARN_SIMPLE_EARN_ADDRESS=address, EARN_SCHEDULER_START=iso(now_hour() - timedelta(hours=24)))
    out = await asyncio.to_thread(cli, stack, schema, "preview", "--job", "simple_earn.interest.hourly", "--period", period.id, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "payout status: not requested yet" in text
    # Each principal at 5% for the 3 hours [start, boundary) = hours 12 to 9 before now.
    hours = period.boundary_hour - start_hour
    assert hours == 3
    amounts = [(p * Decimal("0.05") * hours / 8760).quantize(Decimal("0.00000001"), rounding="ROUND_DOWN") for p in principals]
    lines = text.splitlines()
    for user, amount in zip(users[:20], amounts[:20]):  # the first 20 rows, in position order
        assert any(user in line and format(amount.normalize(), "f") in line for line in lines), (user, amount, text)
    assert not any(user in text for user in users[20:])
    assert "22 position(s)" in text and "... 2 more position(s)" in text, text
    assert f"total: BTC {format(sum(amounts).normalize(), 'f')}" in text, text  # every position, not only those shown
    assert product.product_id in text
    # A dry run: nothing requested, nothing recorded.
    status = await _payout_status_or_none(address, "simple_earn.interest.hourly", period.id)
    assert status is None


async def _payout_status_or_none(address: str, job: str, period: str) -> Any:
    try:
        return await _payout_status(address, job, period)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return None

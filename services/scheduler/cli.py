"""Operator CLI of the scheduler: `python -m services.scheduler.cli list|preview|trigger|catch-up`.

It uses the same settings (EARN_* variables), run records and job lock as the scheduler
process, so a trigger never races the scheduler: while one runs a job, the other refuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.kernel import db, logs
from services.kernel.config import load
from services.kernel.errors import DomainError
from services.scheduler import domain, store
from services.scheduler.jobs import (
    JOBS,
    JobError,
    JobSpec,
    Outcome,
    SchedulerSettings,
    SimpleEarn,
    enabled,
    job_spec,
    plan,
    run_due,
    run_period,
    totals_summary,
)

from earn.v1 import simple_earn_pb2

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Scheduler jobs: list runs, preview, trigger, catch up.")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="JSON logs of the runs on stderr")) -> None:
    """The CLI reports outcomes itself; the runner's logs only with --verbose."""
    if verbose:
        logs.configure("INFO")
    else:
        logging.disable(logging.CRITICAL)
console = Console()
T = TypeVar("T")

_STYLE = {"succeeded": "green", "failed": "red", "running": "yellow", "interrupted": "yellow", "skipped": "dim"}


def _at(now: str | None, settings: SchedulerSettings) -> datetime:
    """The time a command plans at: --now when given, else the clock."""
    return domain.parse_time(now, "--now") if now else settings.now()


def _run(work: Callable[[SchedulerSettings, asyncpg.Pool, asyncio.Event], Awaitable[T]]) -> T:
    """Run ``work`` with settings, a migrated pool and a stop flag set by Ctrl-C/SIGTERM."""

    async def main() -> T:
        settings = load(SchedulerSettings)
        await db.migrate(settings, settings.schema_name, store.MIGRATIONS)
        pool = await db.create_pool(settings, settings.schema_name, min_size=1, max_size=3)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await work(settings, pool, stop)
        finally:
            await pool.close()

    try:
        return asyncio.run(main())
    except DomainError as err:
        console.print(f"[red]error:[/red] {err.message}")
        raise typer.Exit(2) from None
    except (OSError, asyncpg.PostgresError) as err:
        console.print(f"[red]error:[/red] database at {load(SchedulerSettings).database_url}: {err}")
        raise typer.Exit(2) from None


def _spec(name: str) -> JobSpec:
    try:
        return job_spec(name)
    except DomainError as err:
        console.print(f"[red]error:[/red] {err.message}")
        raise typer.Exit(2) from None


def _time(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_runs(
    job: str | None = typer.Option(None, "--job", help="only this job"),
    limit: int = typer.Option(30, "--limit", min=1, max=10000, help="most recent runs first"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """Runs, most recent period first."""
    if job:
        _spec(job)

    async def work(settings: SchedulerSettings, pool: asyncpg.Pool, stop: asyncio.Event) -> list[store.Run]:
        return await store.list_runs(pool, job, limit)

    runs = _run(work)
    if as_json:
        for r in runs:
            print(json.dumps({
                "job": r.job, "period": r.period, "status": r.status, "attempts": r.attempts, "step": r.step,
                "triggered_by": r.triggered_by, "started_at": r.started_at.isoformat(),
                "finished_at": r.finished_at.isoformat() if r.finished_at else None, "totals": r.totals, "error": r.error,
            }))
        return
    table = Table(title=f"job runs ({len(runs)})", show_lines=False)
    for column in ("job", "period", "status", "tries", "by", "started (UTC)", "took", "totals", "error / step (--json: all)"):
        table.add_column(column, overflow="fold")
    for r in runs:
        duration = f"{r.duration_seconds:.1f} s" if r.duration_seconds is not None else ""
        note = r.error or (f"at {r.step}" if r.status == "running" and r.step else "")
        if len(note) > 80:
            note = note[:79] + "…"
        table.add_row(
            r.job, r.period, f"[{_STYLE.get(r.status, '')}]{r.status}[/]", str(r.attempts), r.triggered_by,
            _time(r.started_at), duration, totals_summary(r.totals), note,
        )
    console.print(table)


@app.command()
def preview(
    job: str = typer.Option(..., "--job", help="job name: " + ", ".join(JOBS)),
    period: str | None = typer.Option(None, "--period", help="YYYY-MM-DD (daily) or YYYY-MM-DDTHH (hourly); default: the next due"),
    now: str | None = typer.Option(None, "--now", help="ISO time to plan at (default: the clock)"),
) -> None:
    """Dry run: what is due, and what a run of the period would do. Changes nothing."""
    spec = _spec(job)

    async def work(settings: SchedulerSettings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        at = _at(now, settings)
        async with pool.acquire() as conn:
            current = await plan(conn, spec, settings, at, persist=False)
            target = domain.parse_period(spec.job.cadence, period) if period else (current.due[0] if current.due else None)
            run = await store.get(conn, spec.name, target.id) if target else None
        console.print(f"[bold]{spec.name}[/bold] ({spec.job.cadence.value}): {spec.summary}")
        console.print(f"  now {at.isoformat()}   first period {domain.first_period(spec.job.cadence, current.start).id}"
                      f"   last succeeded {current.last_done.id if current.last_done else '-'}")
        if current.due:
            shown = ", ".join(p.id for p in current.due[:5]) + (f", ... {current.due[-1].id}" if len(current.due) > 5 else "")
            console.print(f"  due now: {len(current.due)} period(s) in order: {shown}")
        else:
            nxt = current.last_done.next() if current.last_done else domain.first_period(spec.job.cadence, current.start)
            console.print(f"  nothing due; next: {nxt.id} at {nxt.boundary_time.isoformat()}")
        if target is None:
            return
        verdict = "would run"
        try:
            domain.check_trigger(spec.job, target, current.last_done, at, start=current.start)
        except domain.TriggerRefused as refused:
            verdict = f"[red]a trigger is refused:[/red] {refused}"
        console.print(f"\n[bold]{spec.name} {target.id}[/bold]: hours [{target.start_hour}, {target.boundary_hour})"
                      f" = [{domain.hour_time(target.start_hour).isoformat()},"
                      f" {target.boundary_time.isoformat()})")
        if run is not None:
            console.print(f"  record: {run.status}, attempt {run.attempts}, {totals_summary(run.totals) or 'no totals'}"
                          + (f", error: {run.error}" if run.error else ""))
        else:
            console.print("  record: none (never started)")
        console.print(f"  {verdict}")
        for index, step in enumerate(spec.steps, 1):
            console.print(f"  {index}. {step.describe(spec.job, target)}")
        if any(step.name == "request_payout" for step in spec.steps):
            await _preview_payout(settings, spec, target)

    _run(work)


PREVIEW_ROWS = 20
PREVIEW_PAGE = 1000


async def _preview_payout(settings: SchedulerSettings, spec: JobSpec, target: domain.Period) -> None:
    """Read-only: how far the payout got (once requested) and what it pays per position,
    from Simple Earn's PreviewPayout (all pages: the first rows are shown, the totals
    cover every position)."""
    client = SimpleEarn(settings)
    try:
        try:
            status = await client.call(
                "GetPayoutStatus", simple_earn_pb2.GetPayoutStatusRequest(job=spec.name, period=target.id)
            )
            paid = ", ".join(f"{a} {v}" for a, v in sorted(status.paid.items())) or "nothing"
            console.print(f"  payout status: {'complete' if status.complete else 'in progress'},"
                          f" {status.partitions_done}/{status.partitions} partitions, {status.items} items, paid {paid}")
        except JobError as err:
            requested = "NOT_FOUND" not in str(err)
            console.print(f"  payout status: {'unavailable (' + str(err) + ')' if requested else 'not requested yet'}")
        request = simple_earn_pb2.PreviewPayoutRequest(
            job=spec.name, period=target.id, boundary_hour=target.boundary_hour, cadence=_cadence(spec),
            page_size=PREVIEW_PAGE,
        )
        rows: list[Any] = []
        unreconciled: list[str] = []
        try:
            while True:
                reply = await client.call("PreviewPayout", request)
                rows.extend(reply.items[: max(0, PREVIEW_ROWS - len(rows))])
                unreconciled.extend(reply.unreconciled_position_ids)
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
        except JobError as err:
            console.print(f"  per-user amounts: not available ({err})")
            return
    finally:
        await client.close()
    products = ", ".join(reply.product_ids) or "none"
    console.print(f"  per-user amounts{' (already paid in part or in full)' if reply.requested else ''}:"
                  f" {reply.positions} position(s) of product(s) {products}")
    if rows:
        table = Table(show_lines=False)
        for column in ("user", "position", "product", "asset", "amount", "from (UTC)", "paid"):
            table.add_column(column, overflow="fold")
        for item in rows:
            table.add_row(item.user_id, item.position_id, item.product_id, item.asset, item.amount,
                          domain.hour_time(item.from_hour).strftime("%Y-%m-%dT%H:00Z"), "yes" if item.paid else "")
        console.print(table)
        if reply.positions > len(rows):
            console.print(f"  ... {reply.positions - len(rows)} more position(s)")
    totals = ", ".join(f"{asset} {amount}" for asset, amount in sorted(reply.totals.items())) or "nothing"
    console.print(f"  total: {totals}")
    if unreconciled:
        console.print(f"  [yellow]{len(unreconciled)} unreconciled position(s) (recorded payouts differ from their history):[/yellow]"
                      f" {', '.join(unreconciled[:20])}")


def _cadence(spec: JobSpec) -> int:
    return (simple_earn_pb2.PAYOUT_CADENCE_DAILY if spec.job.cadence is domain.Cadence.DAILY
            else simple_earn_pb2.PAYOUT_CADENCE_HOURLY)


class _Steps:
    """A rich progress bar over the steps of each period run."""

    def __init__(self, progress: Progress, spec: JobSpec) -> None:
        self.progress = progress
        self.spec = spec
        self.task: Any = None
        self.label = ""

    def period(self, period: domain.Period) -> None:
        self.label = f"{self.spec.name} {period.id}"
        self.task = self.progress.add_task(self.label, total=len(self.spec.steps))

    def step(self, index: int, total: int, name: str, state: str) -> None:
        if state == "start":
            self.progress.update(self.task, description=f"{self.label} [{name}]")
        else:
            self.progress.update(self.task, completed=index + 1, description=self.label)


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                    TimeElapsedColumn(), console=console)


def _report(spec: JobSpec, outcome: Outcome) -> None:
    style = _STYLE.get(outcome.status, "")
    totals = totals_summary(outcome.run.totals) if outcome.run else ""
    extra = f" attempt {outcome.run.attempts}" if outcome.run else ""
    console.print(f"[{style}]{outcome.status}[/] {spec.name} {outcome.period.id}{extra}"
                  + (f": {totals}" if totals else "") + (f" [red]{outcome.error}[/red]" if outcome.error else ""))


@app.command()
def trigger(
    job: str = typer.Option(..., "--job", help="job name: " + ", ".join(JOBS)),
    period: str = typer.Option(..., "--period", help="YYYY-MM-DD (daily) or YYYY-MM-DDTHH (hourly)"),
    now: str | None = typer.Option(None, "--now", help="ISO time to check due-ness at (default: the clock)"),
) -> None:
    """Run one period now, synchronously: only the job's next due period, never a succeeded one."""
    spec = _spec(job)

    async def work(settings: SchedulerSettings, pool: asyncpg.Pool, stop: asyncio.Event) -> Outcome:
        target = domain.parse_period(spec.job.cadence, period)
        at = _at(now, settings)
        async with store.job_lock(pool, settings.schema_name, spec.name) as conn:
            if conn is None:
                raise _Refused(f"{spec.name} is being run by another process (the scheduler?); try again shortly")
            current = await plan(conn, spec, settings, at)
            try:
                domain.check_trigger(spec.job, target, current.last_done, at, start=current.start)
            except domain.TriggerRefused as refused:
                raise _Refused(str(refused)) from None
            client = SimpleEarn(settings)
            try:
                with _progress() as progress:
                    steps = _Steps(progress, spec)
                    steps.period(target)
                    return await run_period(conn, spec, target, client, settings, triggered_by="cli", stop=stop,
                                            on_step=steps.step)
            finally:
                await client.close()

    try:
        outcome = _run(work)
    except _Refused as refused:
        console.print(f"[red]refused:[/red] {refused}")
        raise typer.Exit(3) from None
    _report(spec, outcome)
    if outcome.status != "succeeded":
        raise typer.Exit(1)


class _Refused(Exception):
    pass


@app.command("catch-up")
def catch_up(
    job: str | None = typer.Option(None, "--job", help="only this job (default: every job)"),
    now: str | None = typer.Option(None, "--now", help="ISO time to catch up to (default: the clock)"),
) -> None:
    """Run every due period of each job, in order, synchronously; stop a job at its first failure."""
    specs = [_spec(job)] if job else list(JOBS.values())

    async def work(settings: SchedulerSettings, pool: asyncpg.Pool, stop: asyncio.Event) -> bool:
        at = _at(now, settings)
        ok = True
        client = SimpleEarn(settings)
        try:
            for spec in specs:
                if stop.is_set():
                    return False
                if not job and not enabled(spec, settings):
                    continue  # e.g. launchpool jobs without EARN_LAUNCHPOOL_ADDRESS
                with _progress() as progress:
                    steps = _Steps(progress, spec)
                    outcomes = await run_due(pool, spec, client, settings, at, triggered_by="cli", stop=stop,
                                             on_period=steps.period, on_step=steps.step)
                if outcomes is None:
                    console.print(f"[yellow]busy[/yellow] {spec.name}: being run by another process (the scheduler?)")
                    ok = False
                    continue
                if not outcomes:
                    console.print(f"[dim]up to date[/dim] {spec.name}")
                for outcome in outcomes:
                    if outcome.status != "succeeded":
                        _report(spec, outcome)
                        ok = False
                succeeded = sum(o.status == "succeeded" for o in outcomes)
                if succeeded:
                    console.print(f"[green]{succeeded} run(s) succeeded[/green] {spec.name}: "
                                  f"{outcomes[0].period.id} .. {outcomes[succeeded - 1].period.id}")
        finally:
            await client.close()
        return ok

    if not _run(work):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

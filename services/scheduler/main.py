"""Scheduler process: `python -m services.scheduler.main`.

Migrates its schema, serves /metrics, then runs one loop per job: run every due period in
order, sleep until the next UTC hour boundary (or a shorter poll), again. A failed run
blocks only its own job (later periods wait) and is retried after ``retry_seconds``.

SIGTERM/SIGINT stop between steps: the run in progress is recorded as interrupted and
resumes at the next start. A SIGKILL leaves it 'running'; it resumes the same way, since
every step is idempotent and the job lock died with the process's database session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import asyncpg
from prometheus_client import start_http_server

from services.kernel import db, logs
from services.kernel.config import load
from services.scheduler import domain, store
from services.scheduler.jobs import LAST_SUCCESS, JobSpec, SchedulerSettings, SimpleEarn, run_due

log = logging.getLogger("services.scheduler")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))
    except TimeoutError:
        pass


async def job_loop(
    pool: asyncpg.Pool, spec: JobSpec, simple_earn: SimpleEarn, settings: SchedulerSettings, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        now = settings.now()
        wait = min(domain.seconds_until_next_boundary(now) + 0.05, settings.max_sleep_seconds)
        try:
            outcomes = await run_due(pool, spec, simple_earn, settings, now, triggered_by="schedule", stop=stop)
        except Exception:
            # Lost database, or a bug: the run (if any) is recorded failed by the runner; the
            # job retries, and earn_job_last_success_timestamp_seconds shows it is stuck.
            log.exception("job pass failed", extra={"job": spec.name})
            outcomes, wait = [], settings.retry_seconds
        if outcomes is None:
            log.debug("job locked by another process", extra={"job": spec.name})
        elif outcomes and outcomes[-1].status == "failed":
            wait = settings.retry_seconds  # retry the failed period; the later ones wait for it
        elif settings.catch_up_batch and len(outcomes) >= settings.catch_up_batch:
            wait = 0  # more to catch up
        if settings.clock_file:
            wait = min(wait, 1.0)  # a file clock jumps: look again soon
        await _sleep(stop, wait)


async def main() -> None:
    settings = load(SchedulerSettings)
    logs.configure(settings.log_level)
    specs = settings.selected_jobs()
    if settings.clock_file:
        log.warning("file clock: demo/test mode", extra={"now": settings.now().isoformat()})
    schema = settings.schema_name
    await db.migrate(settings, schema, store.MIGRATIONS)
    pool = await db.create_pool(settings, schema, min_size=1, max_size=len(specs) + 2)
    for job, at in (await store.last_success_times(pool)).items():
        LAST_SUCCESS.labels(job).set(at.timestamp())
    if settings.metrics_port:
        try:
            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        except OSError as err:
            raise SystemExit(
                f"scheduler: cannot serve /metrics on port {settings.metrics_port} ({err}); set EARN_METRICS_PORT"
            ) from err
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    simple_earn = SimpleEarn(settings)
    log.info(
        "scheduler running",
        extra={"jobs": [s.name for s in specs], "simple_earn": settings.simple_earn_address, "schema": schema,
               "metrics_port": settings.metrics_port},
    )
    started = time.monotonic()
    crashed = False
    tasks = [asyncio.create_task(job_loop(pool, spec, simple_earn, settings, stop), name=spec.name) for spec in specs]
    try:
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in tasks and task.exception() is not None:
                log.error("job loop crashed", exc_info=task.exception(), extra={"job": task.get_name()})
                crashed = True
                stop.set()
        # Each loop ends at its next step boundary (runs record themselves as interrupted).
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results):
            if isinstance(result, BaseException):
                crashed = True
                log.error("job loop ended with an error", exc_info=result, extra={"job": task.get_name()})
    finally:
        for task in tasks:
            task.cancel()
        await simple_earn.close()
        await pool.close()
        log.info("scheduler stopped", extra={"uptime_seconds": round(time.monotonic() - started, 1)})
    if crashed:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())

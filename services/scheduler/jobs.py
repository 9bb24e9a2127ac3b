"""The scheduler's jobs, their steps, and the runner that executes one period of one job.

Every step is idempotent on the server side (CloseHour, RequestPayout per (job, period),
GetPayoutStatus, MatureDue), so a run interrupted anywhere, by an error, SIGTERM or
SIGKILL, is simply run again from its first step: nothing is paid twice.

Jobs:
- ``ticks`` (hourly): CloseHour(boundary): the accrual engine's watermark.
- ``simple_earn.interest.daily`` / ``.hourly``: CloseHour(boundary), RequestPayout, then
  wait for GetPayoutStatus to report the payout complete; totals are recorded.
- ``simple_earn.maturity`` (hourly): MatureDue(until = boundary time).
- ``launchpool.rewards.hourly`` (hourly; only where ``EARN_LAUNCHPOOL_ADDRESS`` is set):
  Launchpool's CloseRewardHour(boundary), RequestRewardPayout (the pools due at the
  boundary: hourly pools while they run, pools paid at the end at their end), then wait
  for GetRewardPayoutStatus to report it complete.
- ``dual.settlement`` (hourly; only where ``EARN_DUAL_ADDRESS`` is set): Dual
  Investment's SettleDualPlans(until = boundary time): every plan whose settlement time
  has passed is settled at the market's TWAP and paid once per subscription; a plan
  whose prices are missing fails the run (with the market's reason) and is retried.
- ``leverage.settlement`` (hourly; only where ``EARN_LEVERAGE_ADDRESS`` is set): Smart
  Leverage's SettleLeveragePositions(until = boundary time): every position whose maturity
  has passed is settled at the market's TWAP and paid once; positions whose prices are
  missing fail the run (with the market's reason) and are retried.
- ``loan.hours`` (hourly; only where ``EARN_LOAN_ADDRESS`` is set): Crypto Loan's
  StartLoanHour(boundary): the hour that starts at the boundary is published to every
  partition of the engine's loan input, which charges it into every open loan's debt;
  then every fixed-term loan due by the boundary is settled from its collateral (once).
- ``candydrop.distribution`` (hourly; only where ``EARN_CANDYDROP_ADDRESS`` is set):
  CandyDrop's DistributePrizes(boundary): the period whose boundary is a campaign's end
  distributes it (and any ended campaign not paid yet), paying through the wallet.
- ``hodler.distribution`` (hourly, each period run 15 minutes after its boundary; only
  where ``EARN_HODLER_ADDRESS`` is set): HODLer Airdrop's DistributeAirdrops(boundary):
  every airdrop that ended by the boundary and is not paid yet, once HODLer has applied
  every wallet event (else the run fails and is retried).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
from services.kernel import grpcclient
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.kernel.config import Settings
from services.scheduler import domain, store
from services.scheduler.domain import Cadence, Job, Period

from earn.v1 import candydrop_pb2, candydrop_pb2_grpc, launchpool_pb2, launchpool_pb2_grpc, simple_earn_pb2, simple_earn_pb2_grpc
from earn.v1 import dual_pb2, dual_pb2_grpc
from earn.v1 import leverage_pb2, leverage_pb2_grpc
from earn.v1 import loan_pb2, loan_pb2_grpc
from earn.v1 import hodler_pb2, hodler_pb2_grpc

log = logging.getLogger(__name__)


class SchedulerSettings(Settings):
    """Settings of the scheduler process and its CLI (EARN_* variables)."""

    model_config = SettingsConfigDict(env_prefix="EARN_", extra="ignore", frozen=True, populate_by_name=True)

    metrics_port: int = 9111  # EARN_METRICS_PORT; 0: no /metrics listener
    metrics_host: str = "127.0.0.1"
    simple_earn_address: str = "127.0.0.1:50052"
    # Launchpool's address; empty: the launchpool jobs are not run.
    launchpool_address: str = ""
    # Dual Investment's address; empty: the dual jobs are not run.
    dual_address: str = ""
    # Smart Leverage's address; empty: the leverage jobs are not run.
    leverage_address: str = ""
    # Crypto Loan's address; empty: the loan jobs are not run.
    loan_address: str = ""
    # CandyDrop's address; empty: the candydrop jobs are not run.
    candydrop_address: str = ""
    # HODLer Airdrop's address; empty: the hodler jobs are not run.
    hodler_address: str = ""
    # Sent as `authorization: Bearer <token>`; its role must be allowed the job RPCs.
    service_token: str = "dev-service"
    # Own schema; tests give each scheduler its own.
    schema_name: str = Field(default=store.SCHEMA, validation_alias="EARN_SCHEDULER_SCHEMA")
    # Where a job without history begins (ISO 8601 with offset); empty: when first seen.
    start: str | None = Field(default=None, validation_alias="EARN_SCHEDULER_START")
    # Comma-separated job names to run; empty: all.
    jobs: str = Field(default="", validation_alias="EARN_SCHEDULER_JOBS")
    rpc_timeout_seconds: float = 30.0
    payout_poll_seconds: float = 0.5
    payout_timeout_seconds: float = 600.0
    # After a failed run, wait this long before retrying the job (other jobs go on).
    retry_seconds: float = 30.0
    # Longest sleep of the loop (it also wakes at every hour boundary).
    max_sleep_seconds: float = 60.0
    # At most this many periods of one job per pass (a long outage is caught up in slices).
    catch_up_batch: int = 1000

    def now(self) -> datetime:
        return self.clock.now()

    def start_time(self, now: datetime) -> datetime:
        return domain.parse_time(self.start, "EARN_SCHEDULER_START") if self.start else now

    def selected_jobs(self) -> list[JobSpec]:
        names = [n.strip() for n in self.jobs.split(",") if n.strip()]
        unknown = [n for n in names if n not in JOBS]
        if unknown:
            raise SystemExit(f"scheduler: unknown job(s) in EARN_SCHEDULER_JOBS: {', '.join(unknown)}; known: {', '.join(JOBS)}")
        if names and self.launchpool_address == "" and any(n.startswith("launchpool.") for n in names):
            raise SystemExit("scheduler: the launchpool jobs need EARN_LAUNCHPOOL_ADDRESS")
        if names and self.dual_address == "" and any(n.startswith("dual.") for n in names):
            raise SystemExit("scheduler: the dual jobs need EARN_DUAL_ADDRESS")
        if names and self.leverage_address == "" and any(n.startswith("leverage.") for n in names):
            raise SystemExit("scheduler: the leverage jobs need EARN_LEVERAGE_ADDRESS")
        if names and self.loan_address == "" and any(n.startswith("loan.") for n in names):
            raise SystemExit("scheduler: the loan jobs need EARN_LOAN_ADDRESS")
        if names and self.candydrop_address == "" and any(n.startswith("candydrop.") for n in names):
            raise SystemExit("scheduler: the candydrop jobs need EARN_CANDYDROP_ADDRESS")
        if names and self.hodler_address == "" and any(n.startswith("hodler.") for n in names):
            raise SystemExit("scheduler: the hodler jobs need EARN_HODLER_ADDRESS")
        return [JOBS[n] for n in names] if names else [s for s in JOBS.values() if enabled(s, self)]


# ---- metrics (exposed by the scheduler process) ----

LAST_SUCCESS = Gauge(
    "earn_job_last_success_timestamp_seconds", "Unix time at which a run of the job last succeeded.", ["job"]
)
DURATION = Histogram(
    "earn_job_duration_seconds",
    "Duration of job runs (each attempt).",
    ["job"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
RUNS = Counter("earn_job_runs_total", "Job runs by outcome (succeeded, failed, interrupted).", ["job", "status"])
PENDING = Gauge("earn_job_due_periods", "Periods of the job due and not yet succeeded.", ["job"])


# ---- errors ----


class JobError(Exception):
    """A step failed; the run is recorded failed and retried later from its first step."""


class Interrupted(Exception):
    """Asked to stop (SIGTERM) between steps; the run resumes at the next start."""


# ---- Simple Earn ----


class SimpleEarn:
    """The job RPCs of Simple Earn, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.simple_earn_address)
        self.stub = simple_earn_pb2_grpc.SimpleEarnServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds
            )
        except grpc.aio.AioRpcError as err:
            raise JobError(
                f"SimpleEarn.{method} at {self.settings.simple_earn_address}: {err.code().name}: {err.details()}"
            ) from None

    async def close(self) -> None:
        await self.channel.close()


# ---- jobs ----


@dataclass
class Context:
    """What a step sees: the period, Simple Earn, the stop flag, and the totals so far."""

    job: Job
    period: Period
    simple_earn: SimpleEarn
    settings: SchedulerSettings
    stop: asyncio.Event
    totals: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    name: str
    # What the step will do, for previews and progress bars.
    describe: Callable[[Job, Period], str]
    run: Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class JobSpec:
    job: Job
    summary: str
    steps: tuple[Step, ...]

    @property
    def name(self) -> str:
        return self.job.name


def _hour(hour: int) -> str:
    return domain.hour_time(hour).strftime("%Y-%m-%dT%H:00Z")


async def _close_hour(ctx: Context) -> None:
    reply = await ctx.simple_earn.call("CloseHour", simple_earn_pb2.CloseHourRequest(hour=ctx.period.boundary_hour))
    ctx.totals["closed_hours"] = [int(h) for h in reply.closed]


CLOSE_HOUR = Step(
    "close_hour",
    lambda job, p: f"CloseHour(hour={p.boundary_hour}): close every hour before {_hour(p.boundary_hour)}",
    _close_hour,
)


def _cadence(job: Job) -> int:
    return simple_earn_pb2.PAYOUT_CADENCE_DAILY if job.cadence is Cadence.DAILY else simple_earn_pb2.PAYOUT_CADENCE_HOURLY


async def _request_payout(ctx: Context) -> None:
    reply = await ctx.simple_earn.call(
        "RequestPayout",
        simple_earn_pb2.RequestPayoutRequest(
            job=ctx.job.name, period=ctx.period.id, boundary_hour=ctx.period.boundary_hour, cadence=_cadence(ctx.job)
        ),
    )
    ctx.totals["product_ids"] = sorted(reply.product_ids)


async def _await_payout(ctx: Context) -> None:
    """Poll GetPayoutStatus until complete, at most ``payout_timeout_seconds``."""
    request = simple_earn_pb2.GetPayoutStatusRequest(job=ctx.job.name, period=ctx.period.id)
    deadline = time.monotonic() + ctx.settings.payout_timeout_seconds
    while True:
        status = await ctx.simple_earn.call("GetPayoutStatus", request)
        ctx.totals.update(
            partitions=status.partitions,
            partitions_done=status.partitions_done,
            items=int(status.items),
            paid={asset: str(Decimal(amount)) for asset, amount in sorted(status.paid.items())},
        )
        if status.complete:
            return
        if time.monotonic() >= deadline:
            raise JobError(
                f"payout {ctx.job.name} {ctx.period.id} not complete after {ctx.settings.payout_timeout_seconds:.0f} s:"
                f" {status.partitions_done}/{status.partitions} partitions done, {status.items} items;"
                " is the accrual engine running and consuming? The run is retried (the payout is idempotent)"
            )
        try:  # a short poll interval, cut short by a stop request
            await asyncio.wait_for(ctx.stop.wait(), ctx.settings.payout_poll_seconds)
        except TimeoutError:
            continue
        raise Interrupted(f"stopped while waiting for payout {ctx.job.name} {ctx.period.id}")


REQUEST_PAYOUT = Step(
    "request_payout",
    lambda job, p: (
        f"RequestPayout(job={job.name!r}, period={p.id!r}, boundary_hour={p.boundary_hour}, cadence={job.cadence.value}):"
        f" pay interest accrued before {_hour(p.boundary_hour)} not paid yet"
    ),
    _request_payout,
)
AWAIT_PAYOUT = Step(
    "await_payout",
    lambda job, p: f"GetPayoutStatus(job={job.name!r}, period={p.id!r}) until complete; record items and paid per asset",
    _await_payout,
)


async def _mature_due(ctx: Context) -> None:
    until = Timestamp()
    until.FromDatetime(ctx.period.boundary_time)
    reply = await ctx.simple_earn.call("MatureDue", simple_earn_pb2.MatureDueRequest(until=until))
    ctx.totals.update(matured=reply.matured, renewed=reply.renewed)


MATURE_DUE = Step(
    "mature_due",
    lambda job, p: f"MatureDue(until={_hour(p.boundary_hour)}): mature every fixed-term position whose term ended before it",
    _mature_due,
)

# ---- Launchpool ----


class Launchpool:
    """Launchpool's job RPCs, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.launchpool_address)
        self.stub = launchpool_pb2_grpc.LaunchpoolServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"Launchpool.{method} at {self.settings.launchpool_address}: {err.code().name}: {err.details()}") from None


_LAUNCHPOOL_CLIENTS: dict[tuple[int, str], Launchpool] = {}


def _launchpool(ctx: Context) -> Launchpool:
    """One client per event loop and address (the runner's Context carries Simple Earn's)."""
    if not ctx.settings.launchpool_address:
        raise JobError("EARN_LAUNCHPOOL_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.launchpool_address)
    client = _LAUNCHPOOL_CLIENTS.get(key)
    if client is None:
        client = _LAUNCHPOOL_CLIENTS[key] = Launchpool(ctx.settings)
    return client


async def _lp_close_hour(ctx: Context) -> None:
    reply = await _launchpool(ctx).call("CloseRewardHour", launchpool_pb2.CloseRewardHourRequest(hour=ctx.period.boundary_hour))
    ctx.totals["closed_hours"] = [int(h) for h in reply.closed]


async def _lp_request_payout(ctx: Context) -> None:
    reply = await _launchpool(ctx).call(
        "RequestRewardPayout",
        launchpool_pb2.RequestRewardPayoutRequest(job=ctx.job.name, period=ctx.period.id, boundary_hour=ctx.period.boundary_hour),
    )
    ctx.totals["pool_ids"] = sorted(reply.pool_ids)


async def _lp_await_payout(ctx: Context) -> None:
    request = launchpool_pb2.GetRewardPayoutStatusRequest(job=ctx.job.name, period=ctx.period.id)
    deadline = time.monotonic() + ctx.settings.payout_timeout_seconds
    while True:
        status = await _launchpool(ctx).call("GetRewardPayoutStatus", request)
        ctx.totals.update(
            partitions=status.partitions, partitions_done=status.partitions_done, items=int(status.items),
            paid={asset: str(Decimal(amount)) for asset, amount in sorted(status.paid.items())},
        )
        if status.complete:
            return
        if time.monotonic() >= deadline:
            raise JobError(
                f"Launchpool payout {ctx.job.name} {ctx.period.id} not complete after {ctx.settings.payout_timeout_seconds:.0f} s:"
                f" {status.partitions_done}/{status.partitions} partitions done; is the accrual engine running? The run is retried"
            )
        try:
            await asyncio.wait_for(ctx.stop.wait(), ctx.settings.payout_poll_seconds)
        except TimeoutError:
            continue
        raise Interrupted(f"stopped while waiting for payout {ctx.job.name} {ctx.period.id}")


LP_CLOSE_HOUR = Step(
    "close_reward_hour",
    lambda job, p: f"Launchpool CloseRewardHour(hour={p.boundary_hour}): close every hour before {_hour(p.boundary_hour)}",
    _lp_close_hour,
)
LP_REQUEST_PAYOUT = Step(
    "request_reward_payout",
    lambda job, p: f"Launchpool RequestRewardPayout(job={job.name!r}, period={p.id!r}, boundary_hour={p.boundary_hour}): pay the pools due",
    _lp_request_payout,
)
LP_AWAIT_PAYOUT = Step(
    "await_reward_payout",
    lambda job, p: f"Launchpool GetRewardPayoutStatus(job={job.name!r}, period={p.id!r}) until complete",
    _lp_await_payout,
)

# ---- CandyDrop ----


class CandyDrop:
    """CandyDrop's job RPC, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.candydrop_address)
        self.stub = candydrop_pb2_grpc.CandyDropServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"CandyDrop.{method} at {self.settings.candydrop_address}: {err.code().name}: {err.details()}") from None


_CANDYDROP_CLIENTS: dict[tuple[int, str], CandyDrop] = {}


def _candydrop(ctx: Context) -> CandyDrop:
    if not ctx.settings.candydrop_address:
        raise JobError("EARN_CANDYDROP_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.candydrop_address)
    client = _CANDYDROP_CLIENTS.get(key)
    if client is None:
        client = _CANDYDROP_CLIENTS[key] = CandyDrop(ctx.settings)
    return client


async def _cd_distribute(ctx: Context) -> None:
    reply = await _candydrop(ctx).call(
        "DistributePrizes",
        candydrop_pb2.DistributePrizesRequest(job=ctx.job.name, period=ctx.period.id, boundary_hour=ctx.period.boundary_hour),
    )
    paid: dict[str, Decimal] = {}
    for c in reply.campaigns:
        paid[c.prize_asset] = paid.get(c.prize_asset, Decimal(0)) + Decimal(c.paid)
    ctx.totals.update(
        campaign_ids=sorted(c.campaign_id for c in reply.campaigns), items=sum(c.winners for c in reply.campaigns),
        paid={asset: str(amount) for asset, amount in sorted(paid.items())},
    )


CD_DISTRIBUTE = Step(
    "distribute_prizes",
    lambda job, p: f"CandyDrop DistributePrizes(job={job.name!r}, period={p.id!r}, boundary_hour={p.boundary_hour}): pay every campaign ended by {_hour(p.boundary_hour)}",
    _cd_distribute,
)

# ---- HODLer Airdrop ----


class Hodler:
    """HODLer Airdrop's job RPC, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.hodler_address)
        self.stub = hodler_pb2_grpc.HodlerServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"Hodler.{method} at {self.settings.hodler_address}: {err.code().name}: {err.details()}") from None


_HODLER_CLIENTS: dict[tuple[int, str], Hodler] = {}


def _hodler(ctx: Context) -> Hodler:
    if not ctx.settings.hodler_address:
        raise JobError("EARN_HODLER_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.hodler_address)
    client = _HODLER_CLIENTS.get(key)
    if client is None:
        client = _HODLER_CLIENTS[key] = Hodler(ctx.settings)
    return client


async def _hd_distribute(ctx: Context) -> None:
    reply = await _hodler(ctx).call(
        "DistributeAirdrops",
        hodler_pb2.DistributeAirdropsRequest(job=ctx.job.name, period=ctx.period.id, boundary_hour=ctx.period.boundary_hour),
    )
    paid: dict[str, Decimal] = {}
    for a in reply.airdrops:
        paid[a.reward_asset] = paid.get(a.reward_asset, Decimal(0)) + Decimal(a.paid)
    ctx.totals.update(
        airdrop_ids=sorted(a.airdrop_id for a in reply.airdrops), items=sum(a.winners for a in reply.airdrops),
        paid={asset: str(amount) for asset, amount in sorted(paid.items())},
    )


HD_DISTRIBUTE = Step(
    "distribute_airdrops",
    lambda job, p: f"Hodler DistributeAirdrops(job={job.name!r}, period={p.id!r}, boundary_hour={p.boundary_hour}): pay every airdrop ended by {_hour(p.boundary_hour)}",
    _hd_distribute,
)

# ---- Dual Investment ----


class Dual:
    """Dual Investment's job RPC, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.dual_address)
        self.stub = dual_pb2_grpc.DualServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"Dual.{method} at {self.settings.dual_address}: {err.code().name}: {err.details()}") from None


_DUAL_CLIENTS: dict[tuple[int, str], Dual] = {}


def _dual(ctx: Context) -> Dual:
    if not ctx.settings.dual_address:
        raise JobError("EARN_DUAL_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.dual_address)
    client = _DUAL_CLIENTS.get(key)
    if client is None:
        client = _DUAL_CLIENTS[key] = Dual(ctx.settings)
    return client


async def _dual_settle(ctx: Context) -> None:
    until = Timestamp()
    until.FromDatetime(ctx.period.boundary_time)
    reply = await _dual(ctx).call("SettleDualPlans", dual_pb2.SettleDualPlansRequest(until=until))
    failed = [p for p in reply.plans if p.status == dual_pb2.DUAL_PLAN_STATUS_FAILED]
    ctx.totals.update(
        plan_ids=sorted(p.plan_id for p in reply.plans), items=sum(p.subscriptions_settled for p in reply.plans),
        paid={asset: str(Decimal(amount)) for asset, amount in sorted(reply.paid.items())},
        failed={p.plan_id: p.failure_reason for p in failed},
    )
    if failed:
        raise JobError("; ".join(f"plan {p.plan_id}: {p.failure_reason}" for p in failed) + " (the run is retried)")


DUAL_SETTLE = Step(
    "settle_dual_plans",
    lambda job, p: f"Dual SettleDualPlans(until={_hour(p.boundary_hour)}): settle and pay every plan whose settlement time has passed",
    _dual_settle,
)

# ---- Smart Leverage ----


class Leverage:
    """Smart Leverage's job RPC, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.leverage_address)
        self.stub = leverage_pb2_grpc.LeverageServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"Leverage.{method} at {self.settings.leverage_address}: {err.code().name}: {err.details()}") from None


_LEVERAGE_CLIENTS: dict[tuple[int, str], Leverage] = {}


def _leverage(ctx: Context) -> Leverage:
    if not ctx.settings.leverage_address:
        raise JobError("EARN_LEVERAGE_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.leverage_address)
    client = _LEVERAGE_CLIENTS.get(key)
    if client is None:
        client = _LEVERAGE_CLIENTS[key] = Leverage(ctx.settings)
    return client


async def _leverage_settle(ctx: Context) -> None:
    until = Timestamp()
    until.FromDatetime(ctx.period.boundary_time)
    reply = await _leverage(ctx).call("SettleLeveragePositions", leverage_pb2.SettleLeveragePositionsRequest(until=until))
    ctx.totals.update(items=reply.settled, paid={asset: str(Decimal(amount)) for asset, amount in sorted(reply.paid.items())},
                      failed=[f.reason for f in reply.failures])
    if reply.failures:
        raise JobError("; ".join(f"{f.pair} maturing {f.maturity.ToJsonString()}: {f.reason}" for f in reply.failures) + " (the run is retried)")


LEVERAGE_SETTLE = Step(
    "settle_leverage_positions",
    lambda job, p: f"Leverage SettleLeveragePositions(until={_hour(p.boundary_hour)}): settle and pay every position whose maturity has passed",
    _leverage_settle,
)

# ---- Crypto Loan ----


class LoanClient:
    """Crypto Loan's job RPC, with the service token and a deadline on every call."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.channel = grpcclient.channel(settings.loan_address)
        self.stub = loan_pb2_grpc.LoanServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {settings.service_token}"),)

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.settings.rpc_timeout_seconds)
        except grpc.aio.AioRpcError as err:
            raise JobError(f"Loan.{method} at {self.settings.loan_address}: {err.code().name}: {err.details()}") from None


_LOAN_CLIENTS: dict[tuple[int, str], LoanClient] = {}


async def _loan_hour(ctx: Context) -> None:
    if not ctx.settings.loan_address:
        raise JobError("EARN_LOAN_ADDRESS is not set")
    key = (id(asyncio.get_running_loop()), ctx.settings.loan_address)
    client = _LOAN_CLIENTS.get(key)
    if client is None:
        client = _LOAN_CLIENTS[key] = LoanClient(ctx.settings)
    await client.call("StartLoanHour", loan_pb2.StartLoanHourRequest(hour=ctx.period.boundary_hour))


LOAN_HOUR = Step(
    "start_loan_hour",
    lambda job, p: f"Loan StartLoanHour(hour={p.boundary_hour}): the engine charges that hour's interest into every open loan",
    _loan_hour,
)

JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(Job("ticks", Cadence.HOURLY), "close each hour for the accrual engine", (CLOSE_HOUR,)),
        JobSpec(
            Job("simple_earn.interest.daily", Cadence.DAILY),
            "Simple Earn interest payout at 00:00 UTC for the previous 24 hours",
            (CLOSE_HOUR, REQUEST_PAYOUT, AWAIT_PAYOUT),
        ),
        JobSpec(
            Job("simple_earn.interest.hourly", Cadence.HOURLY),
            "Simple Earn interest payout of hourly-payout products",
            (CLOSE_HOUR, REQUEST_PAYOUT, AWAIT_PAYOUT),
        ),
        JobSpec(Job("simple_earn.maturity", Cadence.HOURLY), "Simple Earn fixed-term maturities", (MATURE_DUE,)),
        JobSpec(
            Job("launchpool.rewards.hourly", Cadence.HOURLY),
            "Launchpool rewards: every hour's reward of hourly pools, everything unpaid at a pool's end",
            (LP_CLOSE_HOUR, LP_REQUEST_PAYOUT, LP_AWAIT_PAYOUT),
        ),
        JobSpec(
            Job("dual.settlement", Cadence.HOURLY),
            "Dual Investment settlement: plans whose settlement time passed, at the market's TWAP, paid once per subscription",
            (DUAL_SETTLE,),
        ),
        JobSpec(
            Job("leverage.settlement", Cadence.HOURLY),
            "Smart Leverage settlement: positions whose maturity passed, at the market's TWAP, paid once per position",
            (LEVERAGE_SETTLE,),
        ),
        JobSpec(
            Job("loan.hours", Cadence.HOURLY),
            "Crypto Loan: each hour's start published to the engine, which charges the hour into every open loan's debt",
            (LOAN_HOUR,),
        ),
        JobSpec(
            Job("candydrop.distribution", Cadence.HOURLY),
            "CandyDrop prizes: every campaign that ended by the period's boundary, paid once",
            (CD_DISTRIBUTE,),
        ),
        JobSpec(
            # 15 minutes after the boundary: HODLer pays an airdrop only once its window
            # closed EARN_SETTLE_SECONDS (10 minutes) ago, so the run at the boundary
            # would leave an airdrop ending there to the next hour.
            Job("hodler.distribution", Cadence.HOURLY, delay=timedelta(minutes=15)),
            "HODLer Airdrop rewards: every airdrop that ended by the period's boundary, split by time-weighted average holding, paid once",
            (HD_DISTRIBUTE,),
        ),
    )
}


def enabled(spec: JobSpec, settings: SchedulerSettings) -> bool:
    """Whether a job runs with these settings (the launchpool and candydrop jobs need their address)."""
    if spec.name.startswith("candydrop."):
        return bool(settings.candydrop_address)
    if spec.name.startswith("hodler."):
        return bool(settings.hodler_address)
    if spec.name.startswith("dual."):
        return bool(settings.dual_address)
    if spec.name.startswith("leverage."):
        return bool(settings.leverage_address)
    if spec.name.startswith("loan."):
        return bool(settings.loan_address)
    return not spec.name.startswith("launchpool.") or bool(settings.launchpool_address)


def job_spec(name: str) -> JobSpec:
    try:
        return JOBS[name]
    except KeyError:
        raise domain.InvalidArgument("job", f"unknown job {name!r}; known: {', '.join(JOBS)}") from None


# ---- the runner ----

# Called as (step index, step count, step name, state) with state "start" or "done".
StepListener = Callable[[int, int, str, str], None]


@dataclass(frozen=True)
class Outcome:
    period: Period
    status: str  # "succeeded", "skipped" (already succeeded), "failed", "interrupted"
    run: store.Run | None = None
    error: str | None = None


async def run_period(
    conn: asyncpg.Connection,
    spec: JobSpec,
    period: Period,
    simple_earn: SimpleEarn,
    settings: SchedulerSettings,
    *,
    triggered_by: str,
    stop: asyncio.Event,
    on_step: StepListener | None = None,
) -> Outcome:
    """Run (or resume) one period of one job. The caller holds the job's lock on ``conn``."""
    run = await store.begin(conn, spec.name, period, triggered_by)
    if run is None:
        return Outcome(period, "skipped", await store.get(conn, spec.name, period.id))
    log.info("run started", extra={"job": spec.name, "period": period.id, "attempt": run.attempts, "by": triggered_by})
    ctx = Context(spec.job, period, simple_earn, settings, stop)
    started = time.perf_counter()
    total = len(spec.steps)
    try:
        for index, step in enumerate(spec.steps):
            if stop.is_set():
                raise Interrupted(f"stopped before step {step.name}")
            await store.set_step(conn, spec.name, period.id, step.name)
            if on_step:
                on_step(index, total, step.name, "start")
            await step.run(ctx)
            if on_step:
                on_step(index, total, step.name, "done")
    except (JobError, Interrupted) as err:
        status = "interrupted" if isinstance(err, Interrupted) else "failed"
        message = f"{status}: {err}" if status == "interrupted" else str(err)
        await store.fail(conn, spec.name, period.id, message, ctx.totals)
        DURATION.labels(spec.name).observe(time.perf_counter() - started)
        RUNS.labels(spec.name, status).inc()
        (log.info if status == "interrupted" else log.error)(
            "run " + status, extra={"job": spec.name, "period": period.id, "error": str(err)}
        )
        return Outcome(period, status, await store.get(conn, spec.name, period.id), str(err))
    except BaseException as err:
        # Unexpected (a bug, a lost database): record it if we still can, then let it out.
        # Cancelled (the process is going down hard): left 'running', resumed at the next start.
        if not isinstance(err, asyncio.CancelledError):
            RUNS.labels(spec.name, "failed").inc()
            try:
                await store.fail(conn, spec.name, period.id, f"unexpected: {err!r}", ctx.totals)
            except Exception:
                log.exception("cannot record the failed run", extra={"job": spec.name, "period": period.id})
        raise
    done = await store.succeed(conn, spec.name, period.id, ctx.totals)
    DURATION.labels(spec.name).observe(time.perf_counter() - started)
    RUNS.labels(spec.name, "succeeded").inc()
    LAST_SUCCESS.labels(spec.name).set(time.time())
    log.info("run succeeded", extra={"job": spec.name, "period": period.id, "totals": ctx.totals})
    return Outcome(period, "succeeded", done)


@dataclass(frozen=True)
class Plan:
    """Where a job stands: its first period, last success, and what is due now."""

    spec: JobSpec
    now: datetime
    start: datetime
    last_done: Period | None
    due: list[Period]


async def plan(
    conn: asyncpg.Connection,
    spec: JobSpec,
    settings: SchedulerSettings,
    now: datetime,
    *,
    limit: int | None = None,
    persist: bool = True,
) -> Plan:
    """The job's due periods at ``now``; with ``persist``, its start is fixed the first time it is seen."""
    wanted = domain.unix_hour(settings.start_time(now))
    if persist:
        start_hour = await store.ensure_start(conn, spec.name, wanted)
    else:
        stored = await store.get_start(conn, spec.name)
        start_hour = wanted if stored is None else stored
    start = domain.hour_time(start_hour)
    last_done = await store.last_succeeded(conn, spec.name, spec.job.cadence)
    due = domain.due_periods(spec.job, last_done, now, start=start, limit=limit)
    return Plan(spec, now, start, last_done, due)


async def run_due(
    pool: asyncpg.Pool,
    spec: JobSpec,
    simple_earn: SimpleEarn,
    settings: SchedulerSettings,
    now: datetime,
    *,
    triggered_by: str,
    stop: asyncio.Event,
    on_period: Callable[[Period], None] | None = None,
    on_step: StepListener | None = None,
) -> list[Outcome] | None:
    """Run every due period of the job in order, stopping at the first that does not succeed.

    None: another process holds the job's lock (it is running the job now).
    """
    async with store.job_lock(pool, settings.schema_name, spec.name) as conn:
        if conn is None:
            return None
        current = await plan(conn, spec, settings, now, limit=settings.catch_up_batch)
        PENDING.labels(spec.name).set(len(current.due))
        outcomes: list[Outcome] = []
        for index, period in enumerate(current.due):
            if stop.is_set():
                break
            if on_period:
                on_period(period)
            outcome = await run_period(
                conn, spec, period, simple_earn, settings, triggered_by=triggered_by, stop=stop, on_step=on_step
            )
            outcomes.append(outcome)
            PENDING.labels(spec.name).set(len(current.due) - index - (outcome.status in ("succeeded", "skipped")))
            if outcome.status not in ("succeeded", "skipped"):
                break
        return outcomes


def totals_summary(totals: Mapping[str, Any]) -> str:
    """One line for tables and logs."""
    parts = []
    if "items" in totals:
        parts.append(f"items {totals['items']}")
    for asset, amount in (totals.get("paid") or {}).items():
        parts.append(f"{asset} {amount}")
    if "matured" in totals:
        parts.append(f"matured {totals['matured']} renewed {totals.get('renewed', 0)}")
    if totals.get("closed_hours"):
        hours = totals["closed_hours"]
        parts.append(f"closed {len(hours)} h")
    return ", ".join(parts)

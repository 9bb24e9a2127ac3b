"""Launchpool gRPC servicer: validate and convert, call the wallet, one transaction per write.

Every write validates the whole request before touching anything (bad input writes
nothing), then runs under its client idempotency key. The wallet patterns are Simple
Earn's:

- Stake: wallet first, then record. The hold's key is derived from the client key and
  the request's fingerprint, so a retry reuses the same hold; a precondition that fails
  after the hold (cap raced by another stake) claims the hold 'abandoned' and releases
  it before the error returns; a hold id is claimed either by a stake or abandoned,
  never both, and a retry that meets its abandoned hold places a fresh one.
- Unstake: record first, then wallet. The transaction decides which holds give back how
  much and writes those releases (keys derived from the change id); they run right after
  the commit and, after a crash, from the background sweeper.
- Rewards: the engine's PayoutBatch is recorded (reward rows, batch row, inbox) and then
  paid by one wallet BulkCredit keyed by the batch, from ``launchpool``'s EXPENSE
  account; a redelivery rebuilds the same credit from the recorded rows.

A gateway acts for the ``user_id`` it names; a stake is (user, pool), so nothing of
another user can be named.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from services.kernel import events, idempotency, inbox, outbox, paging, peers
from services.kernel.clock import full_hour_field, micros, unix_hour
from services.kernel.config import Settings
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.money import check_amount_column, format_amount, parse_amount, parse_decimal, scale_of
from services.kernel.peers import Peer
from services.kernel.topics import CATALOGUE
from services.launchpool import domain, metrics, store
from services.launchpool.domain import PayoutMode

from earn.v1 import accrual_pb2, launchpool_pb2 as lp, launchpool_pb2_grpc, wallet_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.LaunchpoolService"
HOLDER = "launchpool"
PAYOUT_CONSUMER = "launchpool.payouts"
PARTITIONS = CATALOGUE[store.TOPIC].partitions
MAX_HOLD_ATTEMPTS = 5

_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateProject": frozenset({OPERATOR}),
        "SetTradingVolume": frozenset({OPERATOR, SERVICE}),
        "GetProject": _QUERY,
        "ListProjects": _QUERY,
        "ListStakes": _QUERY,
        "ListRewards": _QUERY,
        "Stake": frozenset({GATEWAY}),
        "Unstake": frozenset({GATEWAY}),
        "CloseRewardHour": frozenset({SERVICE}),
        "RequestRewardPayout": frozenset({SERVICE}),
        "GetRewardPayoutStatus": frozenset({SERVICE, OPERATOR}),
    }.items()
}

_MODE = {lp.LAUNCHPOOL_PAYOUT_MODE_HOURLY: PayoutMode.HOURLY, lp.LAUNCHPOOL_PAYOUT_MODE_AT_END: PayoutMode.AT_END}
_MODE_OUT = {v: k for k, v in _MODE.items()}
_STATUS = {
    lp.PROJECT_STATUS_UPCOMING: domain.ProjectStatus.UPCOMING,
    lp.PROJECT_STATUS_ACTIVE: domain.ProjectStatus.ACTIVE,
    lp.PROJECT_STATUS_ENDED: domain.ProjectStatus.ENDED,
}
_STATUS_OUT = {v: k for k, v in _STATUS.items()}

M = TypeVar("M", bound=Message)


def derived_key(prefix: str, *parts: object) -> str:
    """A deterministic wallet idempotency key of Launchpool's (``lp:<prefix>:...``)."""
    return idempotency.derived_key("lp", prefix, *parts)


def _prices(raw: Any) -> dict[str, Decimal]:
    out = {}
    for asset, text in sorted(raw.items()):
        scale_of(asset, "prices")
        out[asset] = parse_decimal(text, f"prices[{asset}]", scale=18)
    return out


class LaunchpoolApi(launchpool_pb2_grpc.LaunchpoolServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings, wallet: Peer) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet

    # ---- helpers ---------------------------------------------------------------------

    async def _write(self, method: str, request: Message, response_type: type[M], work: Callable[[asyncpg.Connection], Awaitable[M]]) -> M:
        return await idempotency.write_once(self.pool, method=method, request=request, response_type=response_type, work=work)

    async def drive_releases(self) -> int:
        return await peers.release_holds(self.wallet, await store.pending_releases(self.pool), lambda release_id: store.release_done(self.pool, release_id))

    def _project_message(self, row: asyncpg.Record, pools: list[asyncpg.Record], prices: dict[str, Decimal]) -> lp.Project:
        now = self.settings.clock.now()
        state = domain.status(row["start_hour"], row["end_hour"], now.timestamp() / 3600)
        message = lp.Project(
            project_id=row["project_id"], reward_asset=row["reward_asset"], payout_mode=_MODE_OUT[PayoutMode(row["payout_mode"])],
            status=_STATUS_OUT[state],
        )
        message.start_time.FromDatetime(datetime.fromtimestamp(row["start_hour"] * 3600, UTC))
        message.end_time.FromDatetime(datetime.fromtimestamp(row["end_hour"] * 3600, UTC))
        message.created_at.FromDatetime(row["created_at"])
        for p in pools:
            hourly = domain.hourly_reward(p["total_reward"], row["start_hour"], row["end_hour"])
            per_unit = domain.reward_per_unit_per_year(hourly, p["staked"])
            apr = domain.estimated_apr(per_unit, prices.get(row["reward_asset"]), prices.get(p["stake_asset"]))
            message.pools.add(
                pool_id=p["pool_id"], project_id=row["project_id"], stake_asset=p["stake_asset"], reward_asset=row["reward_asset"],
                total_reward=format_amount(p["total_reward"]), hourly_reward=domain.display(hourly), min_stake=format_amount(p["min_stake"]),
                max_stake=format_amount(p["max_stake"]), pool_cap="" if p["pool_cap"] is None else format_amount(p["pool_cap"]),
                newcomer_only=p["newcomer_only"],
                cap_tiers=[lp.CapTier(min_volume=format_amount(t.min_volume), max_stake=format_amount(t.max_stake)) for t in store.cap_tiers(p)],
                total_staked=format_amount(p["staked"]),
                left_cap="" if p["pool_cap"] is None else format_amount(max(p["pool_cap"] - p["staked"], Decimal(0))),
                reward_per_unit_per_year="" if per_unit is None else domain.display(per_unit),
                estimated_apr="" if apr is None else domain.display(apr), stakers=p["stakers"],
            )
        return message

    async def _project(self, conn: Any, project_id: str, prices: dict[str, Decimal]) -> lp.Project:
        row = await store.project(conn, project_id)
        return self._project_message(row, await store.pools_of(conn, [project_id]), prices)

    # ---- operator --------------------------------------------------------------------

    async def CreateProject(self, request: lp.CreateProjectRequest, context: grpc.aio.ServicerContext) -> lp.CreateProjectResponse:
        idempotency.check_key(request.idempotency_key)
        project_id = domain.check_id(request.project_id, "project_id")
        if not request.reward_asset:
            raise InvalidArgument("reward_asset", "is required")
        reward_asset = request.reward_asset
        scale_of(reward_asset, "reward_asset")
        start_hour = unix_hour(full_hour_field(request, "start_time"))
        end_hour = unix_hour(full_hour_field(request, "end_time"))
        mode = PayoutMode.HOURLY if request.payout_mode == 0 else _MODE.get(request.payout_mode)
        if mode is None:
            raise InvalidArgument("payout_mode", f"unknown value {request.payout_mode}")
        now_hour = unix_hour(self.settings.clock.now())
        domain.check_window(start_hour, end_hour, now_hour)
        if start_hour < now_hour:
            raise InvalidArgument("start_time", "must not be before the current hour")
        if len(request.pools) > domain.MAX_POOLS:
            raise InvalidArgument("pools", f"at most {domain.MAX_POOLS} pools")
        pools = [domain.parse_pool(p, reward_asset, f"pools[{i}]") for i, p in enumerate(request.pools)]
        domain.check_pools(pools)

        async def work(conn: asyncpg.Connection) -> lp.CreateProjectResponse:
            at = self.settings.clock.now()
            clash = await store.insert_project(conn, project_id, reward_asset, start_hour, end_hour, mode, pools, at)
            if clash is not None:
                raise AlreadyExists(clash)
            await outbox.enqueue(conn, self.settings, store.PRODUCER, at,
                                 [store.pool_set_event(project_id, reward_asset, start_hour, end_hour, p) for p in pools])
            return lp.CreateProjectResponse(project=await self._project(conn, project_id, {}))

        return await self._write("CreateProject", request, lp.CreateProjectResponse, work)

    async def SetTradingVolume(self, request: lp.SetTradingVolumeRequest, context: grpc.aio.ServicerContext) -> lp.SetTradingVolumeResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        value = parse_decimal(request.volume, "volume", scale=domain.VOLUME_SCALE, allow_zero=True)

        async def work(conn: asyncpg.Connection) -> lp.SetTradingVolumeResponse:
            await store.set_volume(conn, user, value, self.settings.clock.now())
            return lp.SetTradingVolumeResponse(user_id=user, volume=format_amount(value))

        return await self._write("SetTradingVolume", request, lp.SetTradingVolumeResponse, work)

    # ---- queries ---------------------------------------------------------------------

    async def GetProject(self, request: lp.GetProjectRequest, context: grpc.aio.ServicerContext) -> lp.GetProjectResponse:
        project_id = domain.check_id(request.project_id, "project_id")
        prices = _prices(request.prices)
        return lp.GetProjectResponse(project=await self._project(self.pool, project_id, prices))

    async def ListProjects(self, request: lp.ListProjectsRequest, context: grpc.aio.ServicerContext) -> lp.ListProjectsResponse:
        wanted = None
        if request.status:
            wanted = _STATUS.get(request.status)
            if wanted is None:
                raise InvalidArgument("status", f"unknown value {request.status}")
        prices = _prices(request.prices)
        rows = await store.projects(self.pool)
        pools = await store.pools_of(self.pool, [r["project_id"] for r in rows])
        by_project: dict[str, list[asyncpg.Record]] = {}
        for p in pools:
            by_project.setdefault(p["project_id"], []).append(p)
        response = lp.ListProjectsResponse()
        for row in rows:
            message = self._project_message(row, by_project.get(row["project_id"], []), prices)
            if wanted is None or message.status == _STATUS_OUT[wanted]:
                response.projects.append(message)
        return response

    async def ListStakes(self, request: lp.ListStakesRequest, context: grpc.aio.ServicerContext) -> lp.ListStakesResponse:
        user = scoped_user(request.user_id)
        project_id = domain.check_id(request.project_id, "project_id") if request.project_id else ""
        size = paging.page_size(request.page_size)
        rows = await store.list_stakes(self.pool, user, project_id, paging.after(request.page_token, "s"), size + 1)
        response = lp.ListStakesResponse()
        for r in rows[:size]:
            response.stakes.append(await store.stake_message(self.pool, r))
        if len(rows) > size:
            response.next_page_token = paging.token("s", rows[size - 1]["id"])
        return response

    async def ListRewards(self, request: lp.ListRewardsRequest, context: grpc.aio.ServicerContext) -> lp.ListRewardsResponse:
        user = scoped_user(request.user_id)
        pool_id = domain.check_id(request.pool_id, "pool_id") if request.pool_id else ""
        size = paging.page_size(request.page_size)
        rows = await store.list_rewards(self.pool, user, pool_id, paging.after(request.page_token, "r"), size + 1)
        response = lp.ListRewardsResponse()
        for r in rows[:size]:
            record = response.records.add(
                reward_id=str(r["id"]), stake_id=str(r["stake_id"]), pool_id=r["pool_id"], reward_asset=r["reward_asset"],
                amount=format_amount(r["amount"]), from_hour=r["from_hour"], to_hour=r["to_hour"], period=r["period"],
            )
            record.paid_at.FromDatetime(r["created_at"])
        if len(rows) > size:
            response.next_page_token = paging.token("r", rows[size - 1]["id"])
        return response

    # ---- user writes -----------------------------------------------------------------

    async def _check_stake(self, conn: Any, p: asyncpg.Record, user: str, amount: Decimal, current: Decimal, at: datetime) -> None:
        cap = domain.personal_cap(p["max_stake"], store.cap_tiers(p), await store.volume(conn, user))
        domain.check_stake(
            pool_id=p["pool_id"], asset=p["stake_asset"], amount=amount, current=current, minimum=p["min_stake"], cap=cap,
            pool_cap=p["pool_cap"], pool_staked=p["staked"], now_us=micros(at), start_hour=p["start_hour"], end_hour=p["end_hour"],
            newcomer_only=p["newcomer_only"],
            newcomer=(not p["newcomer_only"]) or await store.is_newcomer(conn, user, p["project_id"]),
        )

    async def Stake(self, request: lp.StakeRequest, context: grpc.aio.ServicerContext) -> lp.StakeResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        pool_id = domain.check_id(request.pool_id, "pool_id")
        p = await store.pool(self.pool, pool_id)
        amount = parse_amount(request.amount, p["stake_asset"], "amount")
        if (stored := await idempotency.replay(self.pool, "Stake", request, lp.StakeResponse)) is not None:
            return stored
        existing = await store.stake_of(self.pool, user, pool_id)
        await self._check_stake(self.pool, p, user, amount, existing["amount"] if existing else Decimal(0), self.settings.clock.now())

        async def abandoned(hold_id: int) -> bool:
            return await store.hold_state(self.pool, hold_id) == "abandoned"

        hold_id = await peers.place_hold(
            self.wallet, "lp:stake", "Stake", request, owner=user, asset=p["stake_asset"], amount=amount,
            holder=HOLDER, reference=f"launchpool:stake:{pool_id}", abandoned=abandoned, attempts=MAX_HOLD_ATTEMPTS,
        )

        async def work(conn: asyncpg.Connection) -> lp.StakeResponse:
            await store.accrual_clock(conn, self.settings.clock)
            row = await store.pool(conn, pool_id, lock=True)
            at = self.settings.clock.now()  # read after the pool's lock: a pool's changes are in time order
            current = await store.stake_of(conn, user, pool_id, lock=True)
            await self._check_stake(conn, row, user, amount, current["amount"] if current else Decimal(0), at)
            stake = await store.ensure_stake(conn, user, pool_id, at)
            if not await store.claim_hold(conn, hold_id, stake["id"], amount, at):
                raise FailedPrecondition("idempotency_key: the funds of this request were returned; retry with a new key")
            at_us = micros(at)
            change_id = await store.change_stake(conn, stake, amount, at, at_us)
            await outbox.enqueue(conn, self.settings, store.PRODUCER, at, [store.stake_event(pool_id, stake["id"], user, amount, at_us)])
            updated = await store.stake_of(conn, user, pool_id)
            response = lp.StakeResponse(stake=await store.stake_message(conn, updated), change_id=str(change_id))
            response.effective_at.FromDatetime(at)
            return response

        try:
            response = await self._write("Stake", request, lp.StakeResponse, work)
        except FailedPrecondition as err:
            async with self.pool.acquire() as conn, conn.transaction():
                abandoned = await store.abandon_hold(conn, hold_id, amount, err.message)
            if abandoned:
                await self.drive_releases()
            raise
        metrics.amount(metrics.STAKED, pool_id, p["stake_asset"], amount)
        return response

    async def Unstake(self, request: lp.UnstakeRequest, context: grpc.aio.ServicerContext) -> lp.UnstakeResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        pool_id = domain.check_id(request.pool_id, "pool_id")
        p = await store.pool(self.pool, pool_id)
        amount = parse_amount(request.amount, p["stake_asset"], "amount") if request.amount else None
        if (stored := await idempotency.replay(self.pool, "Unstake", request, lp.UnstakeResponse)) is not None:
            await self.drive_releases()
            return stored
        taken: list[Decimal] = []

        async def work(conn: asyncpg.Connection) -> lp.UnstakeResponse:
            await store.accrual_clock(conn, self.settings.clock)
            row = await store.pool(conn, pool_id, lock=True)
            at = self.settings.clock.now()
            stake = await store.stake_of(conn, user, pool_id, lock=True)
            current: Decimal = stake["amount"] if stake else Decimal(0)
            value = current if amount is None else amount
            domain.check_unstake(asset=row["stake_asset"], amount=value, current=current, minimum=row["min_stake"])
            assert stake is not None
            at_us = micros(at)
            change_id = await store.change_stake(conn, stake, -value, at, at_us)
            left = value
            for hold_id, remaining in await store.holds_newest_first(conn, stake["id"]):
                take = min(left, remaining)
                if take <= 0:
                    break
                await store.reduce_hold(conn, hold_id, take)
                await store.schedule_release(conn, derived_key("unstake", change_id, hold_id), hold_id, take, "unstake")
                left -= take
            if left != 0:
                raise RuntimeError(f"stake {stake['id']}: holds short by {left}")
            await outbox.enqueue(conn, self.settings, store.PRODUCER, at, [store.stake_event(pool_id, stake["id"], user, -value, at_us)])
            taken.append(value)
            updated = await store.stake_of(conn, user, pool_id)
            response = lp.UnstakeResponse(stake=await store.stake_message(conn, updated), change_id=str(change_id))
            response.effective_at.FromDatetime(at)
            return response

        response = await self._write("Unstake", request, lp.UnstakeResponse, work)
        for value in taken:
            metrics.amount(metrics.UNSTAKED, pool_id, p["stake_asset"], value)
        await self.drive_releases()
        return response

    # ---- jobs ------------------------------------------------------------------------

    async def CloseRewardHour(self, request: lp.CloseRewardHourRequest, context: grpc.aio.ServicerContext) -> lp.CloseRewardHourResponse:
        if request.hour <= 0:
            raise InvalidArgument("hour", "must be a positive unix hour")
        async with self.pool.acquire() as conn, conn.transaction():
            at = await store.watermark_clock(conn, self.settings.clock)
            hours = await outbox.close_hours(
                conn, self.settings, store.PRODUCER, store.TOPIC, request.hour, at, store.last_closed_hour, store.set_last_closed_hour,
            )
            return lp.CloseRewardHourResponse(closed=hours)

    async def RequestRewardPayout(self, request: lp.RequestRewardPayoutRequest, context: grpc.aio.ServicerContext) -> lp.RequestRewardPayoutResponse:
        job = domain.check_job(request.job)
        period = domain.check_period(request.period)
        if request.boundary_hour <= 0:
            raise InvalidArgument("boundary_hour", "must be a positive unix hour")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", store.WATERMARK_LOCK)
            at = self.settings.clock.now()
            existing = await store.payout_request(conn, job, period)
            if existing is not None:
                if existing["boundary_hour"] != request.boundary_hour:
                    raise AlreadyExists(f"period: {job} {period} was requested with boundary_hour {existing['boundary_hour']}")
                return lp.RequestRewardPayoutResponse(pool_ids=existing["pool_ids"])
            if request.boundary_hour > unix_hour(at):
                raise FailedPrecondition(f"boundary_hour: {request.boundary_hour} is after the current hour")
            closed = await store.last_closed_hour(conn)
            if closed is None or closed < request.boundary_hour:
                raise FailedPrecondition(f"boundary_hour: hours before {request.boundary_hour} are not closed yet; call CloseRewardHour first")
            pool_ids = await store.payout_pools(conn, request.boundary_hour)
            await store.insert_payout_request(conn, job, period, request.boundary_hour, pool_ids, at)
            if pool_ids:
                message = accrual_pb2.PayoutRequested(job=job, period=period, boundary_hour=request.boundary_hour, product_ids=pool_ids)
                await outbox.enqueue(conn, self.settings, store.PRODUCER, at, outbox.broadcast(store.TOPIC, f"payout:{job}:{period}", message))
            return lp.RequestRewardPayoutResponse(pool_ids=pool_ids)

    async def GetRewardPayoutStatus(self, request: lp.GetRewardPayoutStatusRequest, context: grpc.aio.ServicerContext) -> lp.GetRewardPayoutStatusResponse:
        job = domain.check_job(request.job)
        period = domain.check_period(request.period)
        requested = await store.payout_request(self.pool, job, period)
        if requested is None:
            raise NotFound(f"period: no payout {job} {period} was requested")
        done, items, paid = await store.payout_status(self.pool, requested["id"])
        return lp.GetRewardPayoutStatusResponse(
            partitions=PARTITIONS, partitions_done=done, items=items,
            paid={asset: format_amount(value) for asset, value in sorted(paid.items())},
            complete=done >= PARTITIONS or not requested["pool_ids"],
        )

    # ---- payouts (consumer of launchpool.payouts) --------------------------------------

    async def apply_payout(self, raw: bytes, skipped: list[str] | None = None) -> str:
        """Pay one PayoutBatch exactly once: "paid" or "duplicate". An unreadable record or
        one naming no requested payout raises (DecodeError, ValueError, InvalidArgument)
        having written nothing; items that are not stakes of that user and pool are left
        out and described in ``skipped``."""
        env = events.parse(raw)
        batch = events.unwrap(env, accrual_pb2.PayoutBatch)
        job = domain.check_job(batch.job)
        period = domain.check_period(batch.period)
        requested = await store.payout_request(self.pool, job, period)
        if requested is None:
            raise ValueError(f"no payout {job} {period} was requested")
        n = len(batch.position_ids)
        for name in ("user_ids", "amounts", "from_hours"):
            if len(getattr(batch, name)) != n:
                raise InvalidArgument(name, f"has {len(getattr(batch, name))} entries for {n} items")
        pool_id, asset = batch.product_id, batch.asset
        if n:
            pool_id = domain.check_id(pool_id, "product_id")
            if not asset:
                raise InvalidArgument("asset", "is required")
            scale_of(asset)
            check_amount_column(list(batch.amounts), asset)
        digest = hashlib.sha256(env.payload).digest()
        fresh: list[tuple[str, Decimal]] | None = None  # the credits, when this delivery recorded them
        recorded = await store.batch(self.pool, requested["id"], batch.partition, batch.sequence)
        if recorded is None:
            problems: list[str] = []
            ids: list[int] = []
            for i, text in enumerate(batch.position_ids):
                try:
                    ids.append(domain.check_stake_id(text, f"position_ids[{i}]"))
                except InvalidArgument as err:
                    ids.append(0)
                    problems.append(err.message)
            known = await store.stakes_by_id(self.pool, [i for i in ids if i]) if n else {}
            keep = []
            for i in range(n):
                if ids[i] and known.get(ids[i]) == (batch.user_ids[i], pool_id):
                    keep.append(i)
                elif ids[i]:
                    problems.append(f"position_ids[{i}]: stake {ids[i]} is not user {batch.user_ids[i][:64]}'s in pool {pool_id}")
            at = self.settings.clock.now()
            async with self.pool.acquire() as conn, conn.transaction():
                if await inbox.first_time(conn, PAYOUT_CONSUMER, env.event_id):
                    batch_id = await conn.fetchval(
                        'INSERT INTO payout_batches (payout_id, "partition", sequence, last, pool_id, asset, digest, items, total)'
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0) ON CONFLICT DO NOTHING RETURNING id",
                        requested["id"], batch.partition, batch.sequence, batch.last, pool_id or None, asset or None, digest,
                    )
                    if batch_id is not None and keep:
                        rows = await conn.fetch(
                            "INSERT INTO rewards (stake_id, payout_id, batch_id, amount, from_hour, to_hour, created_at)"
                            " SELECT s, $2, $3, a, f, $4, $5 FROM unnest($1::bigint[], $6::numeric[], $7::bigint[]) AS u(s, a, f)"
                            " ON CONFLICT (stake_id, payout_id) DO NOTHING RETURNING id, stake_id, amount",
                            [ids[i] for i in keep], requested["id"], batch_id, batch.boundary_hour, at,
                            [Decimal(batch.amounts[i]) for i in keep], [batch.from_hours[i] for i in keep],
                        )
                        if len(rows) != len(keep):
                            problems.append(f"{len(keep) - len(rows)} item(s) paid by this payout before")
                        await conn.execute(
                            "UPDATE payout_batches SET items = $2, total = $3 WHERE id = $1", batch_id, len(rows), sum((r["amount"] for r in rows), Decimal(0)),
                        )
                        fresh = [(known[r["stake_id"]][0], r["amount"]) for r in sorted(rows, key=lambda r: r["id"])]
                    elif batch_id is not None:
                        fresh = []
            recorded = await store.batch(self.pool, requested["id"], batch.partition, batch.sequence)
            if recorded is None:
                log.error("payout event applied before, but its batch is not recorded", extra={"event_id": env.event_id})
                return "duplicate"
            if problems and skipped is not None:
                skipped.extend(problems)
        if bytes(recorded["digest"]) != digest:
            raise InvalidArgument(
                "sequence", f"batch {job} {period} partition {batch.partition} sequence {batch.sequence} was delivered before with other items",
            )
        if recorded["posted_at"] is not None:
            return "duplicate"
        posting_id = None
        # The credit is rebuilt from the recorded rows on a redelivery; in the rows' order
        # either way (the wallet's key answers a repeat only for the same request).
        credits = fresh if fresh is not None else await store.batch_credits(self.pool, recorded["id"])
        if credits:
            request = wallet_pb2.BulkCreditRequest(
                idempotency_key=derived_key("payout", job, period, batch.partition, batch.sequence), asset=recorded["asset"],
                source=wallet_pb2.AccountRef(owner=HOLDER, kind=wallet_pb2.ACCOUNT_KIND_EXPENSE),
                reference=f"launchpool:reward:{recorded['pool_id']}:{period}",
            )
            request.owners.extend(u for u, _ in credits)
            request.amounts.extend(format_amount(a) for _, a in credits)
            posting_id = (await self.wallet.call("BulkCredit", request)).posting_id
        posted = await self.pool.fetchval(
            "UPDATE payout_batches SET posted_at = $2, posting_id = $3 WHERE id = $1 AND posted_at IS NULL RETURNING true",
            recorded["id"], self.settings.clock.now(), posting_id,
        )
        if posted and credits:
            metrics.amount(metrics.REWARDS_PAID, recorded["pool_id"], recorded["asset"], recorded["total"])
        return "paid" if posted else "duplicate"


"""Crypto Loan gRPC servicer: validate and convert, call the wallet and the market, and
apply the engine's margin calls and liquidations.

Every write (borrow, repay, add or remove collateral, a liquidation) has the same shape:

1. Validate the request, read the loan under its per-loan lock (a PostgreSQL advisory
   lock, so one write per loan at a time in any replica), charge the loan's interest
   through the current hour (``domain.charge_hours``), compute the new state with the
   pure domain and the index prices (Market.GetIndex, at most ``max_index_age_seconds``
   old), and check the user's funds: any refusal writes nothing.
2. Record the operation (``loan_ops``: the wallet calls and the new state) and commit.
3. Make the wallet calls, each keyed from the operation's key (``loan:<op>:<n>``).
4. One transaction applies the new state (version + 1), the history row, the
   idempotency key's response and a ``LoanStateChanged`` through the outbox (topic
   ``loan.ltv``, key = loan id, for the engine).

A crash between 2 and 4 leaves a pending operation: the same request again, or the
service's sweep, makes the same wallet calls (answered from their keys) and applies it.
A wallet refusal in 3 (a race the check in 1 did not see) undoes the holds it placed and
marks the operation failed; the request gets the wallet's FAILED_PRECONDITION.

Wallet accounts: the lending desk is ``loan`` (TREASURY per asset: it lends from there,
principal comes back there, sold collateral goes there; FEE_INCOME: the interest).
Collateral is held in the user's wallet (holder ``loan``) and captured only by a
liquidation.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from services.dual.api import Client, market_client, wallet_client
from services.kernel import idempotency, outbox
from services.kernel.config import ServiceSettings
from services.kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.money import format_amount, parse_amount, parse_decimal, scale_of
from services.loan import domain, metrics, store
from services.loan.domain import Collateral, Levels, Loan
from services.market.domain import micros

from earn.v1 import loan_pb2 as ln, loan_pb2_grpc, market_pb2, wallet_pb2

__all__ = ["ROLES", "SERVICE_NAME", "LoanApi", "LoanSettings", "market_client", "wallet_client"]

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.LoanService"
HOLDER = "loan"
DESK = "loan"
STATE_TOPIC = "loan.ltv"
ACTION_TOPIC = "loan.actions"
MAX_COLLATERAL_ASSETS = 5
_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "SetLoanAsset": frozenset({OPERATOR}),
        "SetLoanCollateralAsset": frozenset({OPERATOR}),
        "ListLoanAssets": _QUERY,
        "GetLoan": _QUERY,
        "ListLoans": _QUERY,
        "ListLoanInterest": _QUERY,
        "ListLoanLtvHistory": _QUERY,
        "ListLoanEvents": _QUERY,
        "Borrow": frozenset({GATEWAY}),
        "RepayLoan": frozenset({GATEWAY}),
        "AddLoanCollateral": frozenset({GATEWAY}),
        "RemoveLoanCollateral": frozenset({GATEWAY}),
        "StartLoanHour": frozenset({SERVICE}),
    }.items()
}

_TERM = {ln.LOAN_TERM_FLEXIBLE: "flexible", ln.LOAN_TERM_FIXED_7_DAYS: "fixed_7_days", ln.LOAN_TERM_FIXED_30_DAYS: "fixed_30_days"}
_TERM_OUT = {v: k for k, v in _TERM.items()}
_TERM_DAYS = {"fixed_7_days": 7, "fixed_30_days": 30}
_STATUS_OUT = {"open": ln.LOAN_STATUS_OPEN, "repaid": ln.LOAN_STATUS_REPAID, "liquidated": ln.LOAN_STATUS_LIQUIDATED,
               "matured": ln.LOAN_STATUS_MATURED}
_STATUS_IN = {v: k for k, v in _STATUS_OUT.items()}
_KIND_OUT = {"margin_call": ln.LOAN_EVENT_KIND_MARGIN_CALL, "rearmed": ln.LOAN_EVENT_KIND_REARMED, "liquidation": ln.LOAN_EVENT_KIND_LIQUIDATION,
             "maturity": ln.LOAN_EVENT_KIND_MATURITY}
_KIND_IN = {v: k for k, v in _KIND_OUT.items()}
# What the engine's actions may carry (a maturity is the service's own, at the hour job).
_ACTION_KINDS = {k: v for k, v in _KIND_IN.items() if v != "maturity"}
_WALLET_TYPES = {
    "PlaceHold": wallet_pb2.PlaceHoldRequest, "ReleaseHold": wallet_pb2.ReleaseHoldRequest,
    "CaptureHold": wallet_pb2.CaptureHoldRequest, "Transfer": wallet_pb2.TransferRequest,
}


class LoanSettings(ServiceSettings):
    grpc_port: int = 50058
    metrics_port: int = 9109
    wallet_address: str = "127.0.0.1:50051"
    market_address: str = "127.0.0.1:50055"
    service_token: str = "dev-service"
    max_index_age_seconds: float = 120.0
    sweep_seconds: float = 5.0
    # A pending operation older than this is completed by the sweep.
    pending_grace_seconds: float = 30.0
    initial_ltv: Decimal = Decimal("0.7")
    margin_call_ltv: Decimal = Decimal("0.8")
    liquidation_ltv: Decimal = Decimal("0.9")
    liquidation_fee: Decimal = Decimal("0.02")
    rearm_band: Decimal = Decimal("0.01")
    # Tests only: SIGKILL this process after the wallet calls of this many operations and
    # before they are applied (0: never).
    crash_after_wallet: int = 0


def _ts(at_us: int) -> Timestamp:
    t = Timestamp()
    t.FromMicroseconds(at_us)
    return t


def _fraction_text(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def _ltv_text(value: Fraction | None) -> str:
    if value is None:
        return ""
    six = value * 10**6
    q, r = divmod(six.numerator, six.denominator)
    if 2 * r > six.denominator or (2 * r == six.denominator and q % 2):
        q += 1
    return format_amount(Decimal(q).scaleb(-6))


def _loan_id_text(value: str, field: str = "loan_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > 64 or not value.startswith("ln-") or not all(c in "0123456789abcdef" for c in value[3:]):
        raise InvalidArgument(field, "must be a loan id (ln- and hex digits)")
    return value


def _lock_key(loan_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"loan:{loan_id}".encode()).digest()[:8], "big", signed=True)


def _account(owner: str, kind: int) -> wallet_pb2.AccountRef:
    return wallet_pb2.AccountRef(owner=owner, kind=kind)


def _decided_fields(plan: dict[str, Any]) -> dict[str, str]:
    """The response fields an operation decided besides the loan (a repayment's
    ``interest_paid`` and ``principal_paid``), as recorded in its plan. A repayment
    recorded before the plan kept them: read from its transfer steps (keys ending in
    ``:interest`` and ``:principal``; a part not paid has no step)."""
    if "response" in plan:
        return dict(plan["response"])
    if plan.get("method") != "RepayLoan":
        return {}
    paid = {"interest_paid": "0", "principal_paid": "0"}
    for step in plan["steps"]:
        if step["call"] == "Transfer":
            req = wallet_pb2.TransferRequest.FromString(base64.b64decode(step["req"]))
            part = req.idempotency_key.rsplit(":", 1)[-1]
            if part in ("interest", "principal"):
                paid[f"{part}_paid"] = req.transfer.amount
    return paid


class LoanApi(loan_pb2_grpc.LoanServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: LoanSettings, wallet: Client, market: Client) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self.market = market
        self._applied = 0
        self.levels = Levels(
            Fraction(settings.initial_ltv), Fraction(settings.margin_call_ltv), Fraction(settings.liquidation_ltv),
            Fraction(settings.liquidation_fee), Fraction(settings.rearm_band),
        )
        self.levels.check()

    def _now_us(self) -> int:
        return micros(self.settings.clock.now())

    # ---- helpers -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, loan_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(loan_id))
            try:
                yield conn
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(loan_id))
                except Exception:  # noqa: BLE001
                    # The session is gone (PostgreSQL restarted, the connection lost or
                    # already released): its advisory lock went with it. The error that
                    # brought us here (a lost database: UNAVAILABLE, retry with the same
                    # key) is the answer, not this one (INTERNAL); a session that might
                    # still hold the lock is closed, never handed back to the pool.
                    with contextlib.suppress(Exception):
                        conn.terminate()

    async def _prices(self, assets: set[str], now_us: int) -> dict[str, Fraction]:
        out: dict[str, Fraction] = {}
        for asset in sorted(assets - {domain.VALUATION_ASSET}):
            pair = f"{asset}/{domain.VALUATION_ASSET}"
            try:
                reply = await self.market.call("GetIndex", market_pb2.GetIndexRequest(pair=pair, at=_ts(now_us)))
            except NotFound as err:
                raise FailedPrecondition(f"price: {err.message}") from None
            at_us = micros(reply.event_time.ToDatetime(tzinfo=UTC))
            if (now_us - at_us) / 1e6 > self.settings.max_index_age_seconds:
                raise FailedPrecondition(f"price: the latest {pair} index is {(now_us - at_us) / 1e6:.0f} s old; retry later")
            out[asset] = Fraction(Decimal(reply.price))
        return out

    async def _funding(self, owner: str, asset: str) -> Decimal:
        reply = await self.wallet.call("GetBalances", wallet_pb2.GetBalancesRequest(owner=owner, asset=asset))
        return sum((Decimal(b.balance) for b in reply.balances if b.kind == wallet_pb2.ACCOUNT_KIND_FUNDING), Decimal(0))

    async def _treasury(self, asset: str) -> Decimal:
        reply = await self.wallet.call("GetBalances", wallet_pb2.GetBalancesRequest(owner=DESK, asset=asset))
        return sum((Decimal(b.balance) for b in reply.balances if b.kind == wallet_pb2.ACCOUNT_KIND_TREASURY), Decimal(0))

    def _loan_message(self, row: asyncpg.Record, coll: list[asyncpg.Record], ltv: Fraction | None = None) -> ln.Loan:
        scale = scale_of(row["loan_asset"])
        m = ln.Loan(
            loan_id=row["loan_id"], user_id=row["user_id"], loan_asset=row["loan_asset"], term=_TERM_OUT[row["term"]],
            hourly_rate=format_amount(row["hourly_rate"]), principal=format_amount(domain.from_units(int(row["principal_units"]), scale)),
            interest=format_amount(domain.from_units(int(row["interest_units"]), scale)), status=_STATUS_OUT[row["status"]],
            borrowed_at=_ts(row["borrowed_us"]), version=row["version"], ltv=_ltv_text(ltv),
            initial_ltv=format_amount(row["initial_ltv"]), margin_call_ltv=format_amount(row["margin_call_ltv"]),
            liquidation_ltv=format_amount(row["liquidation_ltv"]),
        )
        if row["due_us"] is not None:
            m.due_at.CopyFrom(_ts(row["due_us"]))
        for c in coll:
            m.collateral.append(ln.LoanCollateral(
                asset=c["asset"], amount=format_amount(domain.from_units(int(c["amount_units"]), scale_of(c["asset"]))),
                discount=format_amount(c["discount"]),
            ))
        return m

    @staticmethod
    def _money(row: asyncpg.Record, coll: list[asyncpg.Record]) -> Loan:
        scale = scale_of(row["loan_asset"])
        return Loan(
            row["loan_asset"], scale, int(row["principal_units"]), int(row["interest_units"]), Fraction(row["hourly_rate"]),
            row["start_hour"], row["charged_through"], exact_interest=Fraction(row["carry_e10"], 10**10), charged_units=0,
            collateral=[Collateral(c["asset"], scale_of(c["asset"]), int(c["amount_units"]), Fraction(c["discount"])) for c in coll],
        )

    def _levels_of(self, row: asyncpg.Record) -> Levels:
        return Levels(Fraction(row["initial_ltv"]), Fraction(row["margin_call_ltv"]), Fraction(row["liquidation_ltv"]),
                      Fraction(row["liquidation_fee"]), Fraction(row["rearm_band"]))

    @staticmethod
    def _carry_e10(money: Loan) -> int:
        carry = (money.exact_interest - money.charged_units) * 10**10
        assert carry.denominator == 1, "the carry is a whole number of 10^-10 units (rates have at most 10 digits)"
        return carry.numerator

    def _state_event(self, row: dict[str, Any], coll: list[tuple[str, int, Decimal]]) -> ln.LoanStateChanged:
        event = ln.LoanStateChanged(
            loan_id=row["loan_id"], user_id=row["user_id"], version=row["version"], status=_STATUS_OUT[row["status"]],
            loan_asset=row["loan_asset"], principal_units=str(row["principal_units"]), interest_units=str(row["interest_units"]),
            interest_carry_e10=row["carry_e10"], hourly_rate=format_amount(Decimal(row["hourly_rate"])), start_hour=row["start_hour"],
            charged_through=row["charged_through"],
            collateral=[ln.LoanCollateral(asset=a, amount=str(u), discount=format_amount(Decimal(d))) for a, u, d in coll],
            margin_call_ltv=str(row["margin_call_ltv"]), liquidation_ltv=str(row["liquidation_ltv"]), rearm_band=str(row["rearm_band"]),
            initial_ltv=str(row["initial_ltv"]), liquidation_fee=str(row["liquidation_fee"]),
        )
        if row.get("due_us") is not None:  # a fixed term: the engine stops charging at its due time, like charge_until
            event.due_at.CopyFrom(_ts(row["due_us"]))
        return event

    # ---- the write machinery ---------------------------------------------------------------

    async def _execute(self, op_key: str, plan: dict[str, Any]) -> list[Any]:
        """The operation's wallet calls, in order; refused: undo the holds placed, fail it."""
        replies: list[Any] = []
        for step in plan["steps"]:
            request = _WALLET_TYPES[step["call"]].FromString(base64.b64decode(step["req"]))
            try:
                replies.append(await self.wallet.call(step["call"], request))
            except (FailedPrecondition, NotFound) as err:
                for done, reply in zip(plan["steps"], replies):
                    if done["call"] == "PlaceHold":
                        await self.wallet.call("ReleaseHold", wallet_pb2.ReleaseHoldRequest(
                            idempotency_key=f"loan:undo:{reply.hold.hold_id}", hold_id=reply.hold.hold_id))
                await store.fail_op(self.pool, op_key, err.message)
                raise FailedPrecondition(f"wallet refused: {err.message}") from None
        self._applied += 1
        if self._applied == self.settings.crash_after_wallet:
            log.warning("EARN_CRASH_AFTER_WALLET reached: killing this process (tests only)")
            os.kill(os.getpid(), signal.SIGKILL)
        return replies

    async def _apply(self, conn: asyncpg.Connection, op_key: str, plan: dict[str, Any], replies: list[Any]) -> None:
        """Write the operation's new state (inside the caller's transaction)."""
        s = plan["state"]
        now_us = plan["at_us"]
        if plan.get("new"):
            await store.insert_loan(conn, s)
        else:
            if not await store.update_loan(conn, s):
                raise FailedPrecondition(f"loan_id: loan {s['loan_id']} changed meanwhile; retry")
        await store.set_collateral(conn, s["loan_id"], [(a, u, Decimal(d), i) for i, (a, u, d) in enumerate(s["collateral"])])
        for step, reply in zip(plan["steps"], replies):
            if step["call"] == "PlaceHold":
                await store.add_hold(conn, s["loan_id"], reply.hold.asset, int(reply.hold.hold_id), step["units"])
            elif step["call"] in ("ReleaseHold", "CaptureHold"):
                await store.take_from_hold(conn, int(step["hold_id"]), step["units"])
        await store.add_history(conn, s["loan_id"], s["version"], now_us, plan["cause"], s["principal_units"], s["interest_units"],
                                Decimal(plan["ltv"]) if plan.get("ltv") else None)
        if plan.get("event"):
            await store.add_event(conn, s["loan_id"], plan["event"])
        await store.op_done(conn, op_key)
        event = self._state_event(s, [(a, u, Decimal(d)) for a, u, d in s["collateral"]])
        await outbox.enqueue(conn, self.settings, "loan", datetime.now(UTC), [outbox.Outgoing(STATE_TOPIC, s["loan_id"], event)])

    async def _write(self, conn: asyncpg.Connection, *, key: str, method: str, request: Any, response_type: Any, plan: dict[str, Any],
                     respond: Any) -> Any:
        """Record, call the wallet, apply with the key's response (under the loan's lock)."""
        plan["method"], plan["request"] = method, base64.b64encode(request.SerializeToString(deterministic=True)).decode()
        plan["request_type"] = type(request).__name__
        await store.insert_op(conn, key, plan["state"]["loan_id"], method, json.dumps(plan), plan["at_us"])
        replies = await self._execute(key, plan)
        async with conn.transaction():
            async def work() -> Any:
                await self._apply(conn, key, plan, replies)
                return await respond(conn)

            return await idempotency.once(conn, key=key, method=method, request=request, response_type=response_type, work=work)

    async def _resume(self, conn: asyncpg.Connection, op: asyncpg.Record) -> None:
        """Complete a pending operation (after a crash): the same wallet calls, then apply."""
        plan = json.loads(op["plan"])
        replies = await self._execute(op["op_key"], plan)
        if plan["method"] in ("Liquidate", "Mature"):
            async with conn.transaction():
                await self._apply(conn, op["op_key"], plan, replies)
            return
        request = getattr(ln, plan["request_type"]).FromString(base64.b64decode(plan["request"]))
        response_type = getattr(ln, plan["method"] + "Response")
        async with conn.transaction():

            async def work() -> Any:
                await self._apply(conn, op["op_key"], plan, replies)
                loan = await store.loan(conn, plan["state"]["loan_id"])
                return response_type(loan=self._loan_message(loan, await store.collateral(conn, loan["loan_id"])), **_decided_fields(plan))

            await idempotency.once(conn, key=op["op_key"], method=plan["method"], request=request, response_type=response_type, work=work)

    async def sweep(self) -> int:
        """Complete the operations left pending longer than the grace period."""
        done = 0
        for op in await store.pending_ops(self.pool, self._now_us() - int(self.settings.pending_grace_seconds * 1e6)):
            try:
                async with self._locked(op["loan_id"]) as conn:
                    fresh = await store.op(conn, op["op_key"])
                    if fresh is None or fresh["status"] != "pending":
                        continue
                    await self._resume(conn, fresh)
                    done += 1
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("completing a pending loan operation failed", extra={"op": op["op_key"]})
        return done

    def _state(self, row: asyncpg.Record | None, base: dict[str, Any], money: Loan, version: int, status: str) -> dict[str, Any]:
        s = dict(base) if row is None else {k: (v if not isinstance(v, Decimal) else str(v)) for k, v in dict(row).items()}
        s.update(
            principal_units=money.principal, interest_units=money.interest, carry_e10=self._carry_e10(money),
            charged_through=money.charged_through, version=version, status=status,
            collateral=[[c.asset, c.amount, str(Decimal(c.discount.numerator) / Decimal(c.discount.denominator))] for c in money.collateral],
        )
        return s

    async def _pending_first(self, conn: asyncpg.Connection, key: str, method: str, request: Any) -> None:
        """A pending operation under this key (a crash, or a concurrent retry): complete it."""
        op = await store.op(conn, key)
        if op is None:
            return
        plan = json.loads(op["plan"])
        if plan["method"] != method or base64.b64decode(plan["request"]) != request.SerializeToString(deterministic=True):
            raise AlreadyExists(f"idempotency_key: {key!r} was already used for a different request")
        if op["status"] == "failed":
            raise FailedPrecondition(f"wallet refused: {op['reason']}")
        if op["status"] == "pending":
            await self._resume(conn, op)

    # ---- operator --------------------------------------------------------------------------

    async def SetLoanAsset(self, request: ln.SetLoanAssetRequest, context: grpc.aio.ServicerContext) -> ln.SetLoanAssetResponse:
        idempotency.check_key(request.idempotency_key)
        a = request.asset
        scale_of(a.asset, "asset.asset")
        rate = parse_decimal(a.hourly_rate, "asset.hourly_rate", scale=domain.RATE_SCALE, allow_zero=True)
        fixed7 = parse_decimal(a.fixed_7_days_hourly_rate, "asset.fixed_7_days_hourly_rate", scale=domain.RATE_SCALE, allow_zero=True) \
            if a.fixed_7_days_hourly_rate else None
        fixed30 = parse_decimal(a.fixed_30_days_hourly_rate, "asset.fixed_30_days_hourly_rate", scale=domain.RATE_SCALE, allow_zero=True) \
            if a.fixed_30_days_hourly_rate else None
        for name, r in (("hourly_rate", rate), ("fixed_7_days_hourly_rate", fixed7), ("fixed_30_days_hourly_rate", fixed30)):
            if r is not None and r > Decimal("0.01"):
                raise InvalidArgument(f"asset.{name}", "at most 0.01 per hour")
        minimum = parse_amount(a.min_borrow, a.asset, "asset.min_borrow")
        maximum = parse_amount(a.max_borrow, a.asset, "asset.max_borrow")
        if maximum < minimum:
            raise InvalidArgument("asset.max_borrow", "must be at least min_borrow")

        async def work(conn: asyncpg.Connection) -> ln.SetLoanAssetResponse:
            await store.upsert_loan_asset(conn, a.asset, rate, fixed7, fixed30, minimum, maximum, self.settings.clock.now())
            return ln.SetLoanAssetResponse(asset=store.loan_asset_message(await store.loan_asset(conn, a.asset)))

        return await idempotency.write_once(self.pool, method="SetLoanAsset", request=request, response_type=ln.SetLoanAssetResponse, work=work)

    async def SetLoanCollateralAsset(self, request: ln.SetLoanCollateralAssetRequest, context: grpc.aio.ServicerContext) -> ln.SetLoanCollateralAssetResponse:
        idempotency.check_key(request.idempotency_key)
        c = request.collateral
        scale_of(c.asset, "collateral.asset")
        discount = parse_decimal(c.discount, "collateral.discount", scale=domain.DISCOUNT_SCALE)
        if discount > 1:
            raise InvalidArgument("collateral.discount", "at most 1 (the share of the value that counts)")

        async def work(conn: asyncpg.Connection) -> ln.SetLoanCollateralAssetResponse:
            await store.upsert_collateral_asset(conn, c.asset, discount, self.settings.clock.now())
            return ln.SetLoanCollateralAssetResponse(collateral=ln.LoanCollateralAsset(asset=c.asset, discount=format_amount(discount)))

        return await idempotency.write_once(
            self.pool, method="SetLoanCollateralAsset", request=request, response_type=ln.SetLoanCollateralAssetResponse, work=work
        )

    # ---- queries ---------------------------------------------------------------------------

    async def ListLoanAssets(self, request: ln.ListLoanAssetsRequest, context: grpc.aio.ServicerContext) -> ln.ListLoanAssetsResponse:
        assets, coll = await store.loan_assets(self.pool), await store.collateral_assets(self.pool)
        return ln.ListLoanAssetsResponse(
            assets=[store.loan_asset_message(r) for r in assets],
            collateral=[ln.LoanCollateralAsset(asset=r["asset"], discount=format_amount(r["discount"])) for r in coll],
        )

    async def _user_loan(self, user: str, loan_id_text: str) -> asyncpg.Record:
        loan_id = _loan_id_text(loan_id_text)
        row = await store.loan(self.pool, loan_id)
        if row is None or (user and row["user_id"] != user):
            raise NotFound(f"loan_id: no loan {loan_id}" + (f" of user {user}" if user else ""))
        return row

    async def _current_ltv(self, row: asyncpg.Record, coll: list[asyncpg.Record]) -> Fraction | None:
        if row["status"] != "open":
            return None
        money = self._money(row, coll)
        domain.charge_hours(money, domain.hour_of(self._now_us()))
        try:
            prices = await self._prices({c.asset for c in money.collateral} | {money.loan_asset}, self._now_us())
        except FailedPrecondition:
            return None
        return domain.ltv(money, prices)

    async def GetLoan(self, request: ln.GetLoanRequest, context: grpc.aio.ServicerContext) -> ln.GetLoanResponse:
        user = scoped_user(request.user_id)
        row = await self._user_loan(user, request.loan_id)
        coll = await store.collateral(self.pool, row["loan_id"])
        return ln.GetLoanResponse(loan=self._loan_message(row, coll, await self._current_ltv(row, coll)))

    async def ListLoans(self, request: ln.ListLoansRequest, context: grpc.aio.ServicerContext) -> ln.ListLoansResponse:
        user = scoped_user(request.user_id)
        status = ""
        if request.status:
            if request.status not in _STATUS_IN:
                raise InvalidArgument("status", f"unknown value {request.status}")
            status = _STATUS_IN[request.status]
        size = min(request.page_size or 50, 200)
        after = _loan_id_text(request.page_token, "page_token") if request.page_token else ""
        rows = await store.list_loans(self.pool, user, status, after, size + 1)
        out = ln.ListLoansResponse()
        for r in rows[:size]:
            coll = await store.collateral(self.pool, r["loan_id"])
            out.loans.append(self._loan_message(r, coll, await self._current_ltv(r, coll)))
        if len(rows) > size:
            out.next_page_token = rows[size - 1]["loan_id"]
        return out

    async def ListLoanInterest(self, request: ln.ListLoanInterestRequest, context: grpc.aio.ServicerContext) -> ln.ListLoanInterestResponse:
        """Derived from the principal history: hour h is charged on the principal after
        the last change before h's start; the exact interest floored with the carry."""
        user = scoped_user(request.user_id)
        row = await self._user_loan(user, request.loan_id)
        history = await store.history(self.pool, row["loan_id"])
        scale = scale_of(row["loan_asset"])
        end_us = row["closed_us"] if row["closed_us"] is not None else self._now_us()
        if row["due_us"] is not None:
            end_us = min(end_us, row["due_us"])  # a fixed term charges no hour after its due time
        last_hour = domain.hour_of(end_us)
        rate = Fraction(row["hourly_rate"])
        exact, charged, i, principal = Fraction(0), 0, 0, 0
        out = ln.ListLoanInterestResponse()
        for hour in range(row["start_hour"], last_hour + 1):
            while i < len(history) and history[i]["at_us"] < hour * domain.HOUR_US:
                principal = int(history[i]["principal_units"])
                i += 1
            if principal == 0:
                break
            exact += principal * rate
            now = exact.numerator // exact.denominator
            out.records.append(ln.LoanInterestRecord(
                hour=hour, hour_start=_ts(hour * domain.HOUR_US), principal=format_amount(domain.from_units(principal, scale)),
                amount=format_amount(domain.from_units(now - charged, scale)),
            ))
            charged = now
        out.total = format_amount(domain.from_units(charged, scale))
        return out

    async def ListLoanLtvHistory(self, request: ln.ListLoanLtvHistoryRequest, context: grpc.aio.ServicerContext) -> ln.ListLoanLtvHistoryResponse:
        user = scoped_user(request.user_id)
        row = await self._user_loan(user, request.loan_id)
        points = [(h["at_us"], h["ltv"], h["cause"]) for h in await store.history(self.pool, row["loan_id"]) if h["ltv"] is not None]
        points += [(e["at_us"], e["ltv"], e["kind"]) for e in await store.events(self.pool, row["loan_id"], "")]
        points.sort(key=lambda p: p[0])
        return ln.ListLoanLtvHistoryResponse(points=[ln.LoanLtvPoint(at=_ts(a), ltv=_ltv_text(Fraction(v)), cause=c) for a, v, c in points])

    async def ListLoanEvents(self, request: ln.ListLoanEventsRequest, context: grpc.aio.ServicerContext) -> ln.ListLoanEventsResponse:
        user = scoped_user(request.user_id)
        row = await self._user_loan(user, request.loan_id)
        kind = ""
        if request.kind:
            if request.kind not in _KIND_IN:
                raise InvalidArgument("kind", f"unknown value {request.kind}")
            kind = _KIND_IN[request.kind]
        out = ln.ListLoanEventsResponse()
        for e in await store.events(self.pool, row["loan_id"], kind):
            rec = ln.LoanEventRecord(loan_id=e["loan_id"], kind=_KIND_OUT[e["kind"]], ltv=_ltv_text(Fraction(e["ltv"])), at=_ts(e["at_us"]))
            detail = json.loads(e["detail"]) if e["detail"] else {}
            for s in detail.get("sales", []):
                rec.sales.append(ln.LoanSale(asset=s["asset"], sold=s["sold"], returned=s["returned"], index_price=s["price"]))
            rec.debt_repaid, rec.surplus, rec.shortfall = detail.get("debt_repaid", ""), detail.get("surplus", ""), detail.get("shortfall", "")
            out.events.append(rec)
        return out

    # ---- user writes -----------------------------------------------------------------------

    def _collateral_in(self, item: ln.LoanCollateralAmount, field: str) -> tuple[str, Decimal]:
        if not item.asset:
            raise InvalidArgument(f"{field}.asset", "is required")
        scale_of(item.asset, f"{field}.asset")
        return item.asset, parse_amount(item.amount, item.asset, f"{field}.amount")

    async def Borrow(self, request: ln.BorrowRequest, context: grpc.aio.ServicerContext) -> ln.BorrowResponse:
        key = idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        if not request.loan_asset:
            raise InvalidArgument("loan_asset", "is required")
        scale = scale_of(request.loan_asset, "loan_asset")
        amount = parse_amount(request.amount, request.loan_asset, "amount")
        if request.term not in _TERM:
            raise InvalidArgument("term", "is required (LOAN_TERM_FLEXIBLE, LOAN_TERM_FIXED_7_DAYS or LOAN_TERM_FIXED_30_DAYS)"
                                  if not request.term else f"unknown value {request.term}")
        term = _TERM[request.term]
        if not request.collateral:
            raise InvalidArgument("collateral", "at least one collateral asset is required")
        if len(request.collateral) > MAX_COLLATERAL_ASSETS:
            raise InvalidArgument("collateral", f"at most {MAX_COLLATERAL_ASSETS} assets")
        wanted: list[tuple[str, Decimal]] = []
        for i, item in enumerate(request.collateral):
            asset, value = self._collateral_in(item, f"collateral[{i}]")
            if asset in (a for a, _ in wanted):
                raise InvalidArgument(f"collateral[{i}].asset", f"{asset} is listed twice")
            if asset == request.loan_asset:
                raise InvalidArgument(f"collateral[{i}].asset", "must differ from the loan asset")
            wanted.append((asset, value))
        stored = await idempotency.replay(self.pool, "Borrow", request, ln.BorrowResponse, key=key)
        if stored is not None:
            return stored
        loan_id = "ln-" + hashlib.sha256(f"{user}:{key}".encode()).hexdigest()[:20]
        async with self._locked(loan_id) as conn:
            await self._pending_first(conn, key, "Borrow", request)
            stored = await idempotency.replay(self.pool, "Borrow", request, ln.BorrowResponse, key=key)
            if stored is not None:
                return stored
            la = await store.loan_asset(conn, request.loan_asset)
            if la is None:
                raise FailedPrecondition(f"loan_asset: {request.loan_asset} is not offered for loans")
            if amount < la["min_borrow"] or amount > la["max_borrow"]:
                raise FailedPrecondition(f"amount: must be {format_amount(la['min_borrow'])} to {format_amount(la['max_borrow'])} {request.loan_asset}")
            rate = {"flexible": la["hourly_rate"], "fixed_7_days": la["fixed_7_days_hourly_rate"], "fixed_30_days": la["fixed_30_days_hourly_rate"]}[term]
            if rate is None:
                raise FailedPrecondition(f"term: {term} loans of {request.loan_asset} are not offered")
            discounts = {r["asset"]: r["discount"] for r in await store.collateral_assets(conn)}
            collateral = []
            for i, (asset, value) in enumerate(wanted):
                if asset not in discounts:
                    raise FailedPrecondition(f"collateral[{i}].asset: {asset} is not accepted as collateral")
                collateral.append(Collateral(asset, scale_of(asset), domain.units(value, scale_of(asset)), Fraction(discounts[asset])))
            now_us = self._now_us()
            money = Loan(request.loan_asset, scale, domain.units(amount, scale), 0, Fraction(rate), domain.start_hour(now_us),
                         domain.start_hour(now_us) - 1, collateral=collateral)
            prices = await self._prices({a for a, _ in wanted} | {request.loan_asset}, now_us)
            ltv = domain.check_borrow(money, prices, self.levels)
            for i, (asset, value) in enumerate(wanted):
                if await self._funding(user, asset) < value:
                    raise FailedPrecondition(f"collateral[{i}].amount: insufficient funds: {user} has less than {format_amount(value)} {asset}")
            if await self._treasury(request.loan_asset) < amount:
                raise FailedPrecondition(f"amount: the lending desk cannot lend {format_amount(amount)} {request.loan_asset} now")
            base = {
                "loan_id": loan_id, "user_id": user, "loan_asset": request.loan_asset, "term": term, "hourly_rate": str(rate),
                "start_hour": money.start_hour, "initial_ltv": str(self.settings.initial_ltv),
                "margin_call_ltv": str(self.settings.margin_call_ltv), "liquidation_ltv": str(self.settings.liquidation_ltv),
                "liquidation_fee": str(self.settings.liquidation_fee), "rearm_band": str(self.settings.rearm_band),
                "borrowed_us": now_us, "due_us": now_us + _TERM_DAYS[term] * 86_400_000_000 if term in _TERM_DAYS else None, "closed_us": None,
            }
            steps = []
            for c in collateral:
                steps.append({"call": "PlaceHold", "units": c.amount, "req": base64.b64encode(wallet_pb2.PlaceHoldRequest(
                    idempotency_key=f"loan:{loan_id}:hold:{c.asset}", owner=user, asset=c.asset,
                    amount=format_amount(domain.from_units(c.amount, c.scale)), holder=HOLDER, reference=f"loan:collateral:{loan_id}",
                ).SerializeToString()).decode()})
            steps.append({"call": "Transfer", "req": base64.b64encode(wallet_pb2.TransferRequest(
                idempotency_key=f"loan:{loan_id}:disburse", transfer=wallet_pb2.TransferSpec(
                    asset=request.loan_asset, source=_account(DESK, wallet_pb2.ACCOUNT_KIND_TREASURY),
                    destination=_account(user, wallet_pb2.ACCOUNT_KIND_FUNDING), amount=format_amount(amount), reference=f"loan:borrow:{loan_id}"),
            ).SerializeToString()).decode()})
            plan = {"new": True, "at_us": now_us, "cause": "borrow", "ltv": str(ltv.numerator / Decimal(ltv.denominator)), "steps": steps,
                    "state": self._state(None, base, money, 1, "open")}

            async def respond(c: asyncpg.Connection) -> ln.BorrowResponse:
                row = await store.loan(c, loan_id)
                return ln.BorrowResponse(loan=self._loan_message(row, await store.collateral(c, loan_id), ltv))

            response = await self._write(conn, key=key, method="Borrow", request=request, response_type=ln.BorrowResponse, plan=plan, respond=respond)
        metrics.BORROWED.labels(request.loan_asset).inc(float(amount))
        return response

    async def _open_loan(self, conn: asyncpg.Connection, user: str, loan_id: str) -> tuple[asyncpg.Record, list[asyncpg.Record], Loan]:
        row = await store.loan(conn, loan_id)
        if row is None or row["user_id"] != user:
            raise NotFound(f"loan_id: no loan {loan_id} of user {user}")
        if row["status"] != "open":
            raise FailedPrecondition(f"loan_id: loan {loan_id} is {row['status']}")
        coll = await store.collateral(conn, loan_id)
        money = self._money(row, coll)
        domain.charge_until(money, self._now_us(), row["due_us"])
        return row, coll, money

    def _release_steps(self, loan_id: str, op: str, holds: list[asyncpg.Record], asset: str | None, units: int | None) -> list[dict[str, Any]]:
        """Release ``units`` of ``asset`` from its holds (newest first), or everything."""
        steps = []
        left = units
        for h in sorted(holds, key=lambda h: -h["hold_id"]):
            if asset is not None and h["asset"] != asset:
                continue
            remaining = int(h["remaining"])
            take = remaining if left is None else min(left, remaining)
            if take <= 0:
                continue
            steps.append({"call": "ReleaseHold", "hold_id": h["hold_id"], "units": take, "req": base64.b64encode(wallet_pb2.ReleaseHoldRequest(
                idempotency_key=f"loan:{op}:release:{h['hold_id']}", hold_id=str(h["hold_id"]),
                amount=format_amount(domain.from_units(take, scale_of(h["asset"]))),
            ).SerializeToString()).decode()})
            if left is not None:
                left -= take
                if left == 0:
                    break
        return steps

    async def RepayLoan(self, request: ln.RepayLoanRequest, context: grpc.aio.ServicerContext) -> ln.RepayLoanResponse:
        key = idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        loan_id = _loan_id_text(request.loan_id)
        stored = await idempotency.replay(self.pool, "RepayLoan", request, ln.RepayLoanResponse, key=key)
        if stored is not None:
            return stored
        async with self._locked(loan_id) as conn:
            await self._pending_first(conn, key, "RepayLoan", request)
            stored = await idempotency.replay(self.pool, "RepayLoan", request, ln.RepayLoanResponse, key=key)
            if stored is not None:
                return stored
            row, coll, money = await self._open_loan(conn, user, loan_id)
            amount = parse_amount(request.amount, money.loan_asset, "amount")
            units_ = domain.units(amount, money.scale)
            repayment = domain.repay(money, units_)
            if await self._funding(user, money.loan_asset) < amount:
                raise FailedPrecondition(f"amount: insufficient funds: {user} has less than {format_amount(amount)} {money.loan_asset}")
            now_us = self._now_us()
            op = hashlib.sha256(f"{loan_id}:{key}".encode()).hexdigest()[:16]
            steps = []
            for part, units_part, kind in (("interest", repayment.interest_paid, wallet_pb2.ACCOUNT_KIND_FEE_INCOME),
                                           ("principal", repayment.principal_paid, wallet_pb2.ACCOUNT_KIND_TREASURY)):
                if units_part:
                    steps.append({"call": "Transfer", "req": base64.b64encode(wallet_pb2.TransferRequest(
                        idempotency_key=f"loan:{loan_id}:{op}:{part}", transfer=wallet_pb2.TransferSpec(
                            asset=money.loan_asset, source=_account(user, wallet_pb2.ACCOUNT_KIND_FUNDING), destination=_account(DESK, kind),
                            amount=format_amount(domain.from_units(units_part, money.scale)), reference=f"loan:repay:{loan_id}"),
                    ).SerializeToString()).decode()})
            status = "open"
            ltv: Fraction | None = None
            if repayment.closed:
                status = "repaid"
                steps += self._release_steps(loan_id, op, await store.holds(conn, loan_id), None, None)
                money.collateral = [Collateral(c.asset, c.scale, 0, c.discount) for c in money.collateral]
            else:
                ltv = domain.ltv(money, await self._prices({c.asset for c in money.collateral} | {money.loan_asset}, now_us))
            state = self._state(row, {}, money, row["version"] + 1, status)
            state["closed_us"] = now_us if repayment.closed else None
            # The amounts are decided here and stored with the operation (``response``), so
            # every answer (this one, a replay by key, one completed after a crash) has them.
            plan = {"at_us": now_us, "cause": "repay", "ltv": str(ltv.numerator / Decimal(ltv.denominator)) if ltv is not None else None,
                    "steps": steps, "state": state, "response": {
                        "interest_paid": format_amount(domain.from_units(repayment.interest_paid, money.scale)),
                        "principal_paid": format_amount(domain.from_units(repayment.principal_paid, money.scale))}}

            async def respond(c: asyncpg.Connection) -> ln.RepayLoanResponse:
                r = await store.loan(c, loan_id)
                return ln.RepayLoanResponse(loan=self._loan_message(r, await store.collateral(c, loan_id), ltv), **_decided_fields(plan))

            response = await self._write(conn, key=key, method="RepayLoan", request=request, response_type=ln.RepayLoanResponse, plan=plan, respond=respond)
        metrics.REPAID.labels(money.loan_asset).inc(float(amount))
        return response

    async def _collateral_change(self, request: Any, method: str, response_type: Any, add: bool) -> Any:
        key = idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        loan_id = _loan_id_text(request.loan_id)
        asset, amount = self._collateral_in(request.collateral, "collateral")
        stored = await idempotency.replay(self.pool, method, request, response_type, key=key)
        if stored is not None:
            return stored
        async with self._locked(loan_id) as conn:
            await self._pending_first(conn, key, method, request)
            stored = await idempotency.replay(self.pool, method, request, response_type, key=key)
            if stored is not None:
                return stored
            row, coll, money = await self._open_loan(conn, user, loan_id)
            scale = scale_of(asset)
            units_ = domain.units(amount, scale)
            now_us = self._now_us()
            op = hashlib.sha256(f"{loan_id}:{key}".encode()).hexdigest()[:16]
            prices_for = {c.asset for c in money.collateral} | {money.loan_asset} | ({asset} if add else set())
            if add:
                if asset == money.loan_asset:
                    raise InvalidArgument("collateral.asset", "must differ from the loan asset")
                discounts = {r["asset"]: r["discount"] for r in await store.collateral_assets(conn)}
                existing = next((c for c in money.collateral if c.asset == asset), None)
                if existing is None:
                    if asset not in discounts:
                        raise FailedPrecondition(f"collateral.asset: {asset} is not accepted as collateral")
                    if len(money.collateral) >= MAX_COLLATERAL_ASSETS:
                        raise FailedPrecondition(f"collateral.asset: a loan has at most {MAX_COLLATERAL_ASSETS} collateral assets")
                    money.collateral.append(Collateral(asset, scale, units_, Fraction(discounts[asset])))
                else:
                    money.collateral = [Collateral(c.asset, c.scale, c.amount + units_, c.discount) if c.asset == asset else c for c in money.collateral]
                if await self._funding(user, asset) < amount:
                    raise FailedPrecondition(f"collateral.amount: insufficient funds: {user} has less than {format_amount(amount)} {asset}")
                ltv = domain.ltv(money, await self._prices(prices_for, now_us))
                steps = [{"call": "PlaceHold", "units": units_, "req": base64.b64encode(wallet_pb2.PlaceHoldRequest(
                    idempotency_key=f"loan:{loan_id}:{op}:hold", owner=user, asset=asset, amount=format_amount(amount), holder=HOLDER,
                    reference=f"loan:collateral:{loan_id}").SerializeToString()).decode()}]
                cause = "add_collateral"
            else:
                ltv = domain.remove_collateral(money, asset, units_, await self._prices(prices_for, now_us), self._levels_of(row))
                steps = self._release_steps(loan_id, op, await store.holds(conn, loan_id), asset, units_)
                cause = "remove_collateral"
            plan = {"at_us": now_us, "cause": cause, "ltv": str(ltv.numerator / Decimal(ltv.denominator)), "steps": steps,
                    "state": self._state(row, {}, money, row["version"] + 1, "open")}

            async def respond(c: asyncpg.Connection) -> Any:
                return response_type(loan=self._loan_message(await store.loan(c, loan_id), await store.collateral(c, loan_id), ltv))

            return await self._write(conn, key=key, method=method, request=request, response_type=response_type, plan=plan, respond=respond)

    async def AddLoanCollateral(self, request: ln.AddLoanCollateralRequest, context: grpc.aio.ServicerContext) -> ln.AddLoanCollateralResponse:
        return await self._collateral_change(request, "AddLoanCollateral", ln.AddLoanCollateralResponse, add=True)

    async def RemoveLoanCollateral(self, request: ln.RemoveLoanCollateralRequest, context: grpc.aio.ServicerContext) -> ln.RemoveLoanCollateralResponse:
        return await self._collateral_change(request, "RemoveLoanCollateral", ln.RemoveLoanCollateralResponse, add=False)

    # ---- the hour job ----------------------------------------------------------------------

    async def StartLoanHour(self, request: ln.StartLoanHourRequest, context: grpc.aio.ServicerContext) -> ln.StartLoanHourResponse:
        if request.hour <= 0:
            raise InvalidArgument("hour", "is required (unix hours, > 0)")
        if request.hour > domain.hour_of(self._now_us()):
            raise FailedPrecondition(f"hour: {request.hour} has not started yet")
        from earn.v1 import accrual_pb2

        async with self.pool.acquire() as conn, conn.transaction():
            if await store.hour_started(conn, request.hour):
                await outbox.enqueue(conn, self.settings, "loan", datetime.now(UTC),
                                     outbox.broadcast(STATE_TOPIC, f"hour:{request.hour}", accrual_pb2.HourClosed(hour=request.hour)))
        await self.mature_due_loans(request.hour * domain.HOUR_US)
        return ln.StartLoanHourResponse()

    # ---- the engine's actions --------------------------------------------------------------

    @staticmethod
    def _read_actions(raw: bytes) -> tuple[list[ln.LoanLtvAction], list[str]]:
        """The record's actions and their kinds, every field the service reads checked
        before anything is applied; ValueError for a record that cannot be read (the
        consumer parks it in dead_letters)."""
        from services.kernel import events

        try:
            env = events.parse(raw)
            if env.type == ln.LoanActions.DESCRIPTOR.full_name:
                batch = list(events.unwrap(env, ln.LoanActions).actions)
            else:
                batch = [events.unwrap(env, ln.LoanLtvAction)]
        except DecodeError as err:
            raise ValueError(f"not a loan action: {err}") from None
        kinds = []
        good: set[tuple[bool, str]] = set()  # (is a price, text) checked already: a batch's actions share their prices
        for action in batch:
            kind = _ACTION_KINDS.get(action.kind)
            if kind is None:
                raise ValueError(f"unknown action kind {action.kind}")
            for what, text in [("ltv", action.ltv), *((f"price of {a}", p) for a, p in action.prices.items())]:
                if (what != "ltv", text) in good:
                    continue
                good.add((what != "ltv", text))
                try:
                    value = Fraction(text)
                except (ValueError, ZeroDivisionError):
                    raise ValueError(f"action on {action.loan_id!r}: {what} {text!r} is not a number") from None
                if value < 0 or (what != "ltv" and value == 0):
                    raise ValueError(f"action on {action.loan_id!r}: {what} {text!r} is out of range")
            if action.HasField("price_time"):
                try:
                    action.price_time.ToDatetime(tzinfo=UTC)
                except (ValueError, OverflowError):
                    raise ValueError(f"action on {action.loan_id!r}: price_time is out of range") from None
            kinds.append(kind)
        return batch, kinds

    async def apply_action(self, raw: bytes) -> str:
        """One record of loan.actions: a LoanActions batch (what the engine sends) or a
        single LoanLtvAction (older records). Each action is applied idempotently: a margin
        call or a re-arm recorded once (the loan, kind, version and sequence; a batch's in
        one transaction); a liquidation executed once per loan, at the version judged."""
        batch, kinds = self._read_actions(raw)
        now_us = self._now_us()
        rows = []
        for action, kind in zip(batch, kinds):
            if kind != "liquidation":
                ltv = Fraction(action.ltv)
                rows.append({"loan_id": action.loan_id, "kind": kind, "version": action.version, "seq": action.seq,
                             "ltv": str(ltv.numerator / Decimal(ltv.denominator)), "at_us": now_us,
                             "price_us": micros(action.price_time.ToDatetime(tzinfo=UTC)) if action.HasField("price_time") else None})
        outcome = "duplicate"
        if rows:
            async with self.pool.acquire() as conn, conn.transaction():
                new = await store.add_events(conn, rows)
            done_us = micros(datetime.now(UTC))
            for r in new:
                metrics.ACTIONS.labels(r["kind"]).inc()
                if r["price_us"] is not None:
                    metrics.LATENCY.labels(r["kind"]).observe(max(0.0, (done_us - r["price_us"]) / 1e6))
            if new:
                outcome = new[-1]["kind"]
        for action, kind in zip(batch, kinds):
            if kind == "liquidation":
                outcome = await self._liquidate(action)
        return outcome

    async def _liquidate(self, action: ln.LoanLtvAction) -> str:
        """A liquidation trigger: executed once per loan, only at the version judged."""
        price_us = micros(action.price_time.ToDatetime(tzinfo=UTC)) if action.HasField("price_time") else None
        ltv = Fraction(action.ltv)
        now_us = self._now_us()
        async with self._locked(action.loan_id) as conn:
            op_key = f"loan:liquidate:{action.loan_id}"
            op = await store.op(conn, op_key)
            if op is not None:
                if op["status"] == "pending":
                    await self._resume(conn, op)
                return "duplicate"
            row = await store.loan(conn, action.loan_id)
            if row is None:
                return "unknown_loan"
            if row["status"] != "open" or row["version"] != action.version:
                return "stale"
            coll = await store.collateral(conn, action.loan_id)
            money = self._money(row, coll)
            at_hour = domain.hour_of(price_us) if price_us is not None else domain.hour_of(now_us)
            through = max(at_hour, action.charged_through)
            if row["due_us"] is not None:
                through = min(through, domain.hour_of(row["due_us"]))
            domain.charge_hours(money, through)
            prices = {a: Fraction(p) for a, p in action.prices.items()}
            result = domain.liquidate(money, prices, Fraction(row["liquidation_fee"]))
            ltv_dec = str(ltv.numerator / Decimal(ltv.denominator))
            await self._close(conn, row, money, result, op_key=op_key, method="Liquidate", tag="liq", status="liquidated",
                              event={"kind": "liquidation", "version": action.version, "ltv": ltv_dec, "at_us": now_us, "price_us": price_us},
                              now_us=now_us, closed_us=now_us)
        metrics.ACTIONS.labels("liquidation").inc()
        if price_us is not None:
            metrics.LATENCY.labels("liquidation").observe(max(0.0, (micros(datetime.now(UTC)) - price_us) / 1e6))
        return "liquidation"

    async def _close(self, conn: asyncpg.Connection, row: asyncpg.Record, money: Loan, result: domain.Liquidation, *, op_key: str,
                     method: str, tag: str, status: str, event: dict[str, Any], now_us: int, closed_us: int) -> None:
        """Close a loan from its collateral (a liquidation, a maturity; under the loan's
        lock): capture the sold part of the holds into the desk's treasury, release the
        rest, pay the surplus; recorded as operation ``op_key`` first, so a crash in
        between is completed with the same wallet keys (``loan:<loan>:<tag>:...``)."""
        loan_id = row["loan_id"]
        holds = await store.holds(conn, loan_id)
        steps: list[dict[str, Any]] = []
        for sale in result.sales:
            left = sale.sold
            for h in sorted(holds, key=lambda h: h["hold_id"]):
                if h["asset"] != sale.asset or left == 0:
                    continue
                take = min(left, int(h["remaining"]))
                if take:
                    steps.append({"call": "CaptureHold", "hold_id": h["hold_id"], "units": take, "req": base64.b64encode(wallet_pb2.CaptureHoldRequest(
                        idempotency_key=f"loan:{loan_id}:{tag}:capture:{h['hold_id']}", hold_id=str(h["hold_id"]),
                        amount=format_amount(domain.from_units(take, scale_of(sale.asset))),
                        destination=_account(DESK, wallet_pb2.ACCOUNT_KIND_TREASURY)).SerializeToString()).decode()})
                    left -= take
        captured = {s["hold_id"]: s["units"] for s in steps}
        for h in holds:
            rest = int(h["remaining"]) - captured.get(h["hold_id"], 0)
            if rest > 0:
                steps.append({"call": "ReleaseHold", "hold_id": h["hold_id"], "units": rest, "req": base64.b64encode(wallet_pb2.ReleaseHoldRequest(
                    idempotency_key=f"loan:{loan_id}:{tag}:release:{h['hold_id']}", hold_id=str(h["hold_id"]),
                    amount=format_amount(domain.from_units(rest, scale_of(h["asset"])))).SerializeToString()).decode()})
        if result.surplus:
            steps.append({"call": "Transfer", "req": base64.b64encode(wallet_pb2.TransferRequest(
                idempotency_key=f"loan:{loan_id}:{tag}:surplus", transfer=wallet_pb2.TransferSpec(
                    asset=money.loan_asset, source=_account(DESK, wallet_pb2.ACCOUNT_KIND_TREASURY),
                    destination=_account(row["user_id"], wallet_pb2.ACCOUNT_KIND_FUNDING),
                    amount=format_amount(domain.from_units(result.surplus, money.scale)), reference=f"loan:{event['kind']}:{loan_id}"),
            ).SerializeToString()).decode()})
        detail = {
            "sales": [{"asset": s.asset, "sold": format_amount(domain.from_units(s.sold, scale_of(s.asset))),
                       "returned": format_amount(domain.from_units(s.returned, scale_of(s.asset))),
                       "price": format_amount(Decimal(s.price.numerator) / Decimal(s.price.denominator))} for s in result.sales],
            "debt_repaid": format_amount(domain.from_units(result.debt_repaid, money.scale)),
            "surplus": format_amount(domain.from_units(result.surplus, money.scale)),
            "shortfall": format_amount(domain.from_units(result.shortfall, money.scale)),
        }
        money.principal, money.interest = 0, 0
        money.collateral = [Collateral(c.asset, c.scale, 0, c.discount) for c in money.collateral]
        state = self._state(row, {}, money, row["version"] + 1, status)
        state["closed_us"] = closed_us
        plan = {"at_us": now_us, "cause": event["kind"], "ltv": event["ltv"], "steps": steps, "state": state,
                "event": {**event, "detail": detail}, "method": method, "request": "", "request_type": ""}
        await store.insert_op(conn, op_key, loan_id, method, json.dumps(plan), now_us)
        replies = await self._execute(op_key, plan)
        async with conn.transaction():
            await self._apply(conn, op_key, plan, replies)

    # ---- fixed terms at their due time -----------------------------------------------------

    async def mature_due_loans(self, until_us: int) -> int:
        """Settle every open fixed-term loan due by ``until_us`` from its collateral, at the
        index of its due time without a fee (domain.settle_at_maturity); once per loan
        (operation ``loan:mature:<loan>``; a pending one is completed). A loan whose price
        is missing fails the call, which the hour job retries."""
        settled = 0
        for loan_id in await store.due_loans(self.pool, until_us):
            async with self._locked(loan_id) as conn:
                op_key = f"loan:mature:{loan_id}"
                op = await store.op(conn, op_key)
                if op is not None:
                    if op["status"] == "pending":
                        await self._resume(conn, op)
                    continue
                row = await store.loan(conn, loan_id)
                if row is None or row["status"] != "open" or row["due_us"] is None or row["due_us"] > until_us:
                    continue  # repaid or liquidated meanwhile
                coll = await store.collateral(conn, loan_id)
                money = self._money(row, coll)
                due_us = row["due_us"]
                prices = await self._prices({c.asset for c in money.collateral} | {money.loan_asset}, due_us)
                result = domain.settle_at_maturity(money, prices, due_us)
                ltv = domain.ltv(money, prices)
                now_us = self._now_us()
                ltv_dec = str(ltv.numerator / Decimal(ltv.denominator))
                await self._close(conn, row, money, result, op_key=op_key, method="Mature", tag="mat", status="matured",
                                  event={"kind": "maturity", "version": row["version"], "ltv": ltv_dec, "at_us": now_us, "price_us": due_us},
                                  now_us=now_us, closed_us=due_us)
            metrics.ACTIONS.labels("maturity").inc()
            settled += 1
        return settled

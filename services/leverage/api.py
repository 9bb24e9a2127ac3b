"""Smart Leverage gRPC servicer: validate and convert, call the wallet and the market.

- Quote (gateway, idempotency key): the entry price P0 is the index in force now (from
  Market.GetIndex, at most ``max_index_age_seconds`` old), the breakeven price from the
  product's fee; stored with its expiry (now + ``quote_validity_seconds`` on the service's
  clock).
- Subscribe (gateway, idempotent by (user, quote id)): the quote must be the user's, not
  expired, and the current index within 5% of P0. The principal is held in the wallet
  (holder ``leverage``, key derived from the quote), then the position is recorded under
  the quote's row lock. A hold of a quote that expired without a position is abandoned
  and released by a background sweep; a hold is used or released, never both.
- Settlement (SettleLeveragePositions, service role: the scheduler's job
  ``leverage.settlement``): per (pair, maturity, window) of due positions, the price is
  the market's TWAP over [maturity - window, maturity). Missing prices fail those
  positions with the market's reason and nothing moves. Otherwise one transaction fixes
  the price and every position's payoff (status settling); then per position the hold is
  captured into the product's treasury, the payout (the payoff capped at the treasury's
  balance) is fixed, and transferred to the user; every wallet call is keyed by the
  position, so a run killed anywhere and run again pays exactly once.
- Early redemption (gateway, idempotency key): the same, at the index in force now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from datetime import UTC
from decimal import Decimal

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.kernel import idempotency, paging
from services.kernel.clock import whole_seconds_us
from services.kernel.config import ServiceSettings
from services.kernel.errors import AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.ids import parse_serial
from services.kernel.money import format_amount, parse_amount, parse_decimal, scale_of
from services.kernel.peers import Peer, Unavailable
from services.leverage import domain, metrics, store
from services.leverage.domain import CloseKind, Direction, Status
from services.market.domain import iso, micros, parse_pair

from earn.v1 import leverage_pb2 as lv, leverage_pb2_grpc, market_pb2, wallet_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.LeverageService"
HOLDER = "leverage"
_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateLeverageProduct": frozenset({OPERATOR}),
        "GetLeverageProduct": _QUERY,
        "ListLeverageProducts": _QUERY,
        "GetLeveragePosition": _QUERY,
        "ListLeveragePositions": _QUERY,
        "RequestLeverageQuote": frozenset({GATEWAY}),
        "SubscribeLeverage": frozenset({GATEWAY}),
        "RedeemLeverageEarly": frozenset({GATEWAY}),
        "SettleLeveragePositions": frozenset({SERVICE}),
    }.items()
}

_DIRECTION = {lv.LEVERAGE_DIRECTION_LONG: Direction.LONG, lv.LEVERAGE_DIRECTION_SHORT: Direction.SHORT}
_DIRECTION_OUT = {v: k for k, v in _DIRECTION.items()}
_STATUS_OUT = {
    Status.OPEN: lv.LEVERAGE_POSITION_STATUS_OPEN, Status.SETTLING: lv.LEVERAGE_POSITION_STATUS_SETTLING,
    Status.SETTLED: lv.LEVERAGE_POSITION_STATUS_SETTLED, Status.FAILED: lv.LEVERAGE_POSITION_STATUS_FAILED,
}
_STATUS_IN = {v: k for k, v in _STATUS_OUT.items()}
_KIND_OUT = {CloseKind.MATURITY: lv.LEVERAGE_CLOSE_KIND_MATURITY, CloseKind.EARLY: lv.LEVERAGE_CLOSE_KIND_EARLY}


class LeverageSettings(ServiceSettings):
    grpc_port: int = 50057
    metrics_port: int = 9108
    wallet_address: str = "127.0.0.1:50051"
    market_address: str = "127.0.0.1:50055"
    # Sent to the wallet and the market as `authorization: Bearer <token>` (service role).
    service_token: str = "dev-service"
    # How long a quote may be subscribed, on the service's clock.
    quote_validity_seconds: float = 10.0
    # A quote or an early redemption needs an index tick at most this old.
    max_index_age_seconds: float = 120.0
    release_sweep_seconds: float = 5.0
    # Tests only: SIGKILL this process right after the wallet paid this many positions and
    # before they are recorded settled (0: never). Makes a half-done settlement certain.
    crash_after_payouts: int = 0
    # Tests only: SIGKILL this process right after a subscription's hold is placed and
    # before its position is recorded (the hold is then released by the sweep).
    crash_after_hold: bool = False


def _ts(at_us: int) -> Timestamp:
    t = Timestamp()
    t.FromMicroseconds(at_us)
    return t


def _direction(value: int) -> Direction:
    if value not in _DIRECTION:
        raise InvalidArgument("direction", "is required (LEVERAGE_DIRECTION_LONG or LEVERAGE_DIRECTION_SHORT)" if not value
                              else f"unknown value {value}")
    return _DIRECTION[value]


class LeverageApi(leverage_pb2_grpc.LeverageServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: LeverageSettings, wallet: Peer, market: Peer) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self.market = market
        self._pay_lock = asyncio.Lock()  # one payout at a time: the treasury cap reads the balance it pays from
        self._exposure_labels: set[tuple[str, str]] = set()
        self._payouts = 0

    def _now_us(self) -> int:
        return micros(self.settings.clock.now())

    # ---- messages --------------------------------------------------------------------

    @staticmethod
    def _product_message(row: asyncpg.Record) -> lv.LeverageProduct:
        p = store.product_of(row)
        message = lv.LeverageProduct(
            product_id=p.product_id, pair=p.pair, max_leverage=format_amount(p.max_leverage), fee_rate=format_amount(p.fee_rate),
            min_principal=format_amount(p.min_principal), max_principal=format_amount(p.max_principal), max_term_hours=p.max_term_hours,
            window_seconds=p.window_seconds, treasury_owner=domain.treasury_owner(p.product_id),
        )
        message.created_at.FromDatetime(row["created_at"])
        return message

    @staticmethod
    def _quote_message(row: asyncpg.Record) -> lv.LeverageQuote:
        return lv.LeverageQuote(
            quote_id=row["quote_id"], user_id=row["user_id"], product_id=row["product_id"], direction=_DIRECTION_OUT[Direction(row["direction"])],
            leverage=format_amount(row["leverage"]), principal=format_amount(row["principal"]), maturity=_ts(row["maturity_us"]),
            index_price=format_amount(row["index_price"]), index_time=_ts(row["index_us"]), entry_price=format_amount(row["entry_price"]),
            breakeven_price=format_amount(row["breakeven_price"]), expires_at=_ts(row["expires_us"]),
        )

    @staticmethod
    def _position_message(row: asyncpg.Record) -> lv.LeveragePosition:
        message = lv.LeveragePosition(
            position_id=str(row["id"]), user_id=row["user_id"], product_id=row["product_id"], quote_id=row["quote_id"],
            pair=f"{row['base_asset']}/{row['quote_asset']}", direction=_DIRECTION_OUT[Direction(row["direction"])],
            leverage=format_amount(row["leverage"]), principal=format_amount(row["principal"]), entry_price=format_amount(row["entry_price"]),
            breakeven_price=format_amount(row["breakeven_price"]), maturity=_ts(row["maturity_us"]), opened_at=_ts(row["opened_us"]),
            status=_STATUS_OUT[Status(row["status"])], failure_reason=row["failure_reason"] or "",
        )
        if row["settlement_price"] is not None:
            s = message.settlement
            s.kind = _KIND_OUT[CloseKind(row["close_kind"])]
            s.settlement_price = format_amount(row["settlement_price"])
            s.payoff = format_amount(row["payoff"])
            if row["payout"] is not None:
                s.payout = format_amount(row["payout"])
                s.capped = row["payout"] < row["payoff"]
            if row["settled_at"] is not None:
                s.settled_at.FromDatetime(row["settled_at"])
        return message

    async def refresh_exposure(self) -> None:
        """The exposure gauge from the store: open notional per (underlying, direction)."""
        rows = await store.exposure(self.pool)
        seen = set()
        for r in rows:
            seen.add((r["base_asset"], r["direction"]))
            metrics.EXPOSURE.labels(r["base_asset"], r["direction"]).set(float(r["notional"]))
        for labels in self._exposure_labels - seen:
            metrics.EXPOSURE.labels(*labels).set(0)
        self._exposure_labels |= seen

    # ---- operator --------------------------------------------------------------------

    async def CreateLeverageProduct(self, request: lv.CreateLeverageProductRequest, context: grpc.aio.ServicerContext) -> lv.CreateLeverageProductResponse:
        idempotency.check_key(request.idempotency_key)
        product_id = domain.check_id(request.product_id, "product_id")
        pair = parse_pair(request.pair)
        max_leverage = parse_decimal(request.max_leverage, "max_leverage", scale=domain.LEVERAGE_SCALE)
        fee = parse_decimal(request.fee_rate, "fee_rate", scale=domain.FEE_SCALE, allow_zero=True)
        minimum = parse_amount(request.min_principal, pair.quote, "min_principal")
        maximum = parse_amount(request.max_principal, pair.quote, "max_principal")
        domain.check_product(max_leverage, fee, minimum, maximum)
        term = request.max_term_hours or domain.DEFAULT_TERM_HOURS
        if term > domain.MAX_TERM_HOURS:
            raise InvalidArgument("max_term_hours", f"at most {domain.MAX_TERM_HOURS} (0: {domain.DEFAULT_TERM_HOURS})")
        window = request.window_seconds or domain.DEFAULT_WINDOW_SECONDS
        if not domain.MIN_WINDOW_SECONDS <= window <= domain.MAX_WINDOW_SECONDS:
            raise InvalidArgument("window_seconds", f"must be {domain.MIN_WINDOW_SECONDS} to {domain.MAX_WINDOW_SECONDS} (0: {domain.DEFAULT_WINDOW_SECONDS})")
        product = domain.Product(product_id, pair.base, pair.quote, max_leverage, fee, minimum, maximum, term, window)

        async def work(conn: asyncpg.Connection) -> lv.CreateLeverageProductResponse:
            if not await store.insert_product(conn, product, self.settings.clock.now()):
                raise AlreadyExists(f"product_id: product {product_id} exists")
            return lv.CreateLeverageProductResponse(product=self._product_message(await store.product(conn, product_id)))

        return await idempotency.write_once(
            self.pool, method="CreateLeverageProduct", request=request, response_type=lv.CreateLeverageProductResponse, work=work
        )

    # ---- queries ---------------------------------------------------------------------

    async def GetLeverageProduct(self, request: lv.GetLeverageProductRequest, context: grpc.aio.ServicerContext) -> lv.GetLeverageProductResponse:
        product_id = domain.check_id(request.product_id, "product_id")
        return lv.GetLeverageProductResponse(product=self._product_message(await store.product(self.pool, product_id)))

    async def ListLeverageProducts(self, request: lv.ListLeverageProductsRequest, context: grpc.aio.ServicerContext) -> lv.ListLeverageProductsResponse:
        base = quote = ""
        if request.pair:
            pair = parse_pair(request.pair)
            base, quote = pair.base, pair.quote
        rows = await store.products(self.pool, base, quote)
        return lv.ListLeverageProductsResponse(products=[self._product_message(r) for r in rows])

    async def _user_position(self, user: str, position_id_text: str) -> asyncpg.Record:
        if not position_id_text:
            raise InvalidArgument("position_id", "is required")
        position_id = parse_serial(position_id_text, "position_id")
        row = await store.position(self.pool, position_id)
        if row is None or (user and row["user_id"] != user):
            raise NotFound(f"position_id: no position {position_id}" + (f" of user {user}" if user else ""))
        return row

    async def GetLeveragePosition(self, request: lv.GetLeveragePositionRequest, context: grpc.aio.ServicerContext) -> lv.GetLeveragePositionResponse:
        user = scoped_user(request.user_id)
        return lv.GetLeveragePositionResponse(position=self._position_message(await self._user_position(user, request.position_id)))

    async def ListLeveragePositions(self, request: lv.ListLeveragePositionsRequest, context: grpc.aio.ServicerContext) -> lv.ListLeveragePositionsResponse:
        user = scoped_user(request.user_id)
        product_id = domain.check_id(request.product_id, "product_id") if request.product_id else ""
        status = ""
        if request.status:
            if request.status not in _STATUS_IN:
                raise InvalidArgument("status", f"unknown value {request.status}")
            status = _STATUS_IN[request.status].value
        size = paging.page_size(request.page_size)
        rows = await store.list_positions(self.pool, user, product_id, status, paging.after(request.page_token, "lp"), size + 1)
        response = lv.ListLeveragePositionsResponse(positions=[self._position_message(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.token("lp", rows[size - 1]["id"])
        return response

    # ---- the index -------------------------------------------------------------------

    async def _index(self, pair: str, now_us: int) -> tuple[Decimal, int]:
        """The index in force now, refused when older than the allowed age."""
        try:
            reply = await self.market.call("GetIndex", market_pb2.GetIndexRequest(pair=pair, at=_ts(now_us)))
        except NotFound as err:
            raise FailedPrecondition(f"index: {err.message}") from None
        at_us = micros(reply.event_time.ToDatetime(tzinfo=UTC))
        age = (now_us - at_us) / 1_000_000
        if age > self.settings.max_index_age_seconds:
            raise FailedPrecondition(
                f"index: the latest {pair} index is from {iso(at_us)}, {age:.0f} s old (more than {self.settings.max_index_age_seconds:.0f} s); retry later"
            )
        return Decimal(reply.price), at_us

    # ---- user writes -----------------------------------------------------------------

    async def RequestLeverageQuote(self, request: lv.RequestLeverageQuoteRequest, context: grpc.aio.ServicerContext) -> lv.RequestLeverageQuoteResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        product_id = domain.check_id(request.product_id, "product_id")
        direction = _direction(request.direction)
        leverage = parse_decimal(request.leverage, "leverage", scale=domain.LEVERAGE_SCALE)
        maturity_us = whole_seconds_us(request, "maturity")
        product = store.product_of(await store.product(self.pool, product_id))
        principal = parse_amount(request.principal, product.quote, "principal")
        domain.check_leverage(product, leverage)
        now_us = self._now_us()
        domain.check_maturity(product, maturity_us, now_us)
        domain.check_principal(product, principal)
        method = "RequestLeverageQuote"
        if (done := await idempotency.replay(self.pool, method, request, lv.RequestLeverageQuoteResponse)) is not None:
            return done  # a retry answers from the key, without asking the market again
        index, index_us = await self._index(product.pair, now_us)
        entry = index  # 0% from the index, within the 5% band
        quote = {
            "quote_id": f"lq-{uuid.uuid4().hex[:20]}", "user_id": user, "product_id": product_id, "direction": direction.value,
            "leverage": leverage, "principal": principal, "maturity_us": maturity_us, "index_price": index, "index_us": index_us,
            "entry_price": entry, "breakeven_price": domain.breakeven(direction, entry, product.fee_rate, scale_of(product.quote)),
            "quoted_us": now_us, "expires_us": now_us + int(self.settings.quote_validity_seconds * 1_000_000),
        }

        async def work(conn: asyncpg.Connection) -> lv.RequestLeverageQuoteResponse:
            return lv.RequestLeverageQuoteResponse(quote=self._quote_message(await store.insert_quote(conn, quote)))

        response = await idempotency.write_once(self.pool, method=method, request=request, response_type=lv.RequestLeverageQuoteResponse, work=work)
        metrics.QUOTES.labels(product.base, direction.value).inc()
        return response

    async def SubscribeLeverage(self, request: lv.SubscribeLeverageRequest, context: grpc.aio.ServicerContext) -> lv.SubscribeLeverageResponse:
        user = domain.check_user_id(request.user_id)
        quote_id = domain.check_id(request.quote_id, "quote_id")
        key = f"leverage:subscribe:{user}:{quote_id}"
        method = "SubscribeLeverage"
        if (done := await idempotency.replay(self.pool, method, request, lv.SubscribeLeverageResponse, key=key, field="quote_id", shown=quote_id)) is not None:
            return done
        q = await store.quote(self.pool, quote_id)
        if q is None or q["user_id"] != user:
            raise NotFound(f"quote_id: no quote {quote_id} of user {user}")
        now_us = self._now_us()
        if now_us >= q["expires_us"]:
            raise FailedPrecondition(f"quote_id: quote {quote_id} expired at {iso(q['expires_us'])}; request a new quote")
        product = store.product_of(await store.product(self.pool, q["product_id"]))
        if q["maturity_us"] - product.window_seconds * 1_000_000 <= now_us:
            raise FailedPrecondition(f"quote_id: the settlement window of quote {quote_id} has started; request a new quote")
        index, _ = await self._index(product.pair, now_us)
        if not domain.within_entry_band(q["entry_price"], index):
            raise FailedPrecondition(
                f"quote_id: the index {format_amount(index)} moved more than 5% from the entry price {format_amount(q['entry_price'])}; request a new quote"
            )
        reply = await self.wallet.call(
            "PlaceHold",
            wallet_pb2.PlaceHoldRequest(
                idempotency_key=f"leverage:hold:{quote_id}", owner=user, asset=product.quote, amount=format_amount(q["principal"]),
                holder=HOLDER, reference=f"leverage:subscribe:{product.product_id}:{quote_id}",
            ),
        )
        hold_id = int(reply.hold.hold_id)
        await store.quote_held(self.pool, quote_id, hold_id)
        if self.settings.crash_after_hold:
            log.warning("EARN_CRASH_AFTER_HOLD: killing this process (tests only)")
            os.kill(os.getpid(), signal.SIGKILL)

        async def work() -> lv.SubscribeLeverageResponse:
            locked = await store.quote(conn, quote_id, lock=True)
            if locked is None or locked["hold_state"] not in ("held", "none"):
                raise FailedPrecondition(f"quote_id: quote {quote_id} expired and its funds were returned; request a new quote")
            row = await store.insert_position(conn, locked, product, hold_id, now_us) or await store.position_of_quote(conn, quote_id)
            return lv.SubscribeLeverageResponse(position=self._position_message(row))

        async with self.pool.acquire() as conn, conn.transaction():
            response = await idempotency.once(conn, key=key, method=method, request=request, response_type=lv.SubscribeLeverageResponse, work=work)
        metrics.amount(metrics.SUBSCRIBED, q["principal"], product.quote, q["direction"])
        await self.refresh_exposure()
        return response

    async def release_abandoned(self) -> int:
        """Release the holds of quotes that expired without a position."""
        async with self.pool.acquire() as conn, conn.transaction():
            await store.abandon_expired_holds(conn, self._now_us() - 60 * 1_000_000)
        done = 0
        for r in await store.abandoned_holds(self.pool):
            try:
                await self.wallet.call("ReleaseHold", wallet_pb2.ReleaseHoldRequest(idempotency_key=f"leverage:release:{r['quote_id']}", hold_id=str(r["hold_id"])))
            except DomainError as err:
                log.error("releasing an abandoned hold failed; will retry", extra={"quote_id": r["quote_id"], "error": err.message})
                continue
            await store.hold_released(self.pool, r["quote_id"])
            done += 1
        return done

    async def RedeemLeverageEarly(self, request: lv.RedeemLeverageEarlyRequest, context: grpc.aio.ServicerContext) -> lv.RedeemLeverageEarlyResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        row = await self._user_position(user, request.position_id)
        method = "RedeemLeverageEarly"
        # A retry does not decide again (it finishes the payment below, if still due).
        if await idempotency.replay(self.pool, method, request, lv.RedeemLeverageEarlyResponse) is None:
            now_us = self._now_us()
            if row["status"] != Status.OPEN.value:
                raise FailedPrecondition(f"position_id: position {row['id']} is {row['status']}; only an open position can be redeemed early")
            if now_us >= row["maturity_us"]:
                raise FailedPrecondition(f"position_id: position {row['id']} has matured; it is settled on the TWAP by the settlement job")
            price, _ = await self._index(f"{row['base_asset']}/{row['quote_asset']}", now_us)
            payoff = domain.payoff(Direction(row["direction"]), row["principal"], row["leverage"], row["breakeven_price"], price, scale_of(row["quote_asset"]))
        else:
            price, payoff = Decimal(0), Decimal(0)

        async def work(conn: asyncpg.Connection) -> lv.RedeemLeverageEarlyResponse:
            locked = await store.position(conn, row["id"], lock=True)
            assert locked is not None
            if locked["settlement_price"] is not None:
                raise FailedPrecondition(f"position_id: position {row['id']} is {locked['status']}; only an open position can be redeemed early")
            await store.fix_early(conn, row["id"], price, payoff)
            return lv.RedeemLeverageEarlyResponse(position=self._position_message(await store.position(conn, row["id"])))

        await idempotency.write_once(self.pool, method=method, request=request, response_type=lv.RedeemLeverageEarlyResponse, work=work)
        await self.refresh_exposure()
        fixed = await store.position(self.pool, row["id"])
        assert fixed is not None
        if fixed["status"] != Status.SETTLED.value:
            await self._pay_or_fail(fixed)
        return lv.RedeemLeverageEarlyResponse(position=self._position_message(await store.position(self.pool, row["id"])))

    # ---- settlement (the scheduler) ----------------------------------------------------

    async def SettleLeveragePositions(self, request: lv.SettleLeveragePositionsRequest, context: grpc.aio.ServicerContext) -> lv.SettleLeveragePositionsResponse:
        until_us = whole_seconds_us(request, "until")
        now_us = self._now_us()
        if until_us > now_us:
            raise FailedPrecondition(f"until: {request.until.ToJsonString()} is after now")
        response = lv.SettleLeveragePositionsResponse()
        for g in await store.due_groups(self.pool, until_us):
            pair = f"{g['base_asset']}/{g['quote_asset']}"
            start, end = g["maturity_us"] - g["window_seconds"] * 1_000_000, g["maturity_us"]
            try:
                twap = await self.market.call("GetTwap", market_pb2.GetTwapRequest(pair=pair, start=_ts(start), end=_ts(end)))
            except (FailedPrecondition, NotFound, Unavailable) as err:
                reason = f"settlement price unavailable: {err.message}"
                await store.fail_group(self.pool, g, reason)
                metrics.FAILURES.labels("prices").inc()
                log.error("leverage settlement failed", extra={"pair": pair, "maturity": iso(end), "reason": reason})
                response.failures.append(lv.LeverageSettleFailure(pair=pair, maturity=_ts(end), positions=g["n"], reason=reason))
                continue
            price = Decimal(twap.twap)
            scale = scale_of(g["quote_asset"])
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await store.group_positions(conn, g)
                records = [
                    (r["id"], domain.payoff(Direction(r["direction"]), r["principal"], r["leverage"], r["breakeven_price"], price, scale))
                    for r in rows
                ]
                await store.fix_maturity(conn, records, price, twap.ticks)
        await self.refresh_exposure()
        paid: dict[str, Decimal] = {}
        for p in await store.to_pay(self.pool, until_us):
            outcome = await self._pay_or_fail(p)
            if isinstance(outcome, str):
                response.failures.append(lv.LeverageSettleFailure(
                    pair=f"{p['base_asset']}/{p['quote_asset']}", maturity=_ts(p["maturity_us"]), positions=1, reason=outcome,
                ))
            else:
                response.settled += 1
                paid[p["quote_asset"]] = paid.get(p["quote_asset"], Decimal(0)) + outcome
        for asset, total in sorted(paid.items()):
            response.paid[asset] = format_amount(total)
        return response

    async def _pay_or_fail(self, p: asyncpg.Record) -> Decimal | str:
        """Pay one position whose payoff is fixed; the amount paid, or the failure reason."""
        try:
            return await self._pay(p)
        except (FailedPrecondition, Unavailable, NotFound) as err:
            reason = f"payout of position {p['id']} failed: {err.message}"
            await store.fail_position(self.pool, p["id"], reason)
            metrics.FAILURES.labels("wallet").inc()
            log.error("leverage payout failed", extra={"position": p["id"], "reason": reason})
            return reason

    async def _pay(self, p: asyncpg.Record) -> Decimal:
        """Capture the hold into the product's treasury, fix the payout (the payoff capped at
        the treasury's balance), pay it, mark settled; every wallet step keyed by the position."""
        owner = domain.treasury_owner(p["product_id"])
        treasury = wallet_pb2.AccountRef(owner=owner, kind=wallet_pb2.ACCOUNT_KIND_TREASURY)
        async with self._pay_lock:
            await self.wallet.call(
                "CaptureHold",
                wallet_pb2.CaptureHoldRequest(idempotency_key=f"leverage:capture:{p['id']}", hold_id=str(p["hold_id"]), destination=treasury),
            )
            payout = p["payout"]
            if payout is None:
                balances = await self.wallet.call("GetBalances", wallet_pb2.GetBalancesRequest(owner=owner, asset=p["quote_asset"]))
                held = sum((Decimal(b.balance) for b in balances.balances if b.kind == wallet_pb2.ACCOUNT_KIND_TREASURY), Decimal(0))
                payout = await store.set_payout(self.pool, p["id"], domain.capped(p["payoff"], held))
            if payout > 0:
                try:
                    await self.wallet.call(
                        "Transfer",
                        wallet_pb2.TransferRequest(
                            idempotency_key=f"leverage:payout:{p['id']}",
                            transfer=wallet_pb2.TransferSpec(
                                asset=p["quote_asset"], source=treasury,
                                destination=wallet_pb2.AccountRef(owner=p["user_id"], kind=wallet_pb2.ACCOUNT_KIND_FUNDING),
                                amount=format_amount(payout), reference=f"leverage:settlement:{p['product_id']}:{p['id']}",
                            ),
                        ),
                    )
                except FailedPrecondition as err:  # refused: nothing moved, the next attempt caps again
                    await store.clear_payout(self.pool, p["id"], f"payout of position {p['id']} failed: {err.message}")
                    raise
                self._payouts += 1
                if self._payouts == self.settings.crash_after_payouts:
                    log.warning("EARN_CRASH_AFTER_PAYOUTS reached: killing this process (tests only)")
                    os.kill(os.getpid(), signal.SIGKILL)
        if await store.mark_settled(self.pool, p["id"], self.settings.clock.now()):
            metrics.amount(metrics.PAID, payout, p["quote_asset"])
            outcome = "zero" if payout == 0 else ("capped" if payout < p["payoff"] else "paid")
            metrics.SETTLED.labels(p["close_kind"] or "maturity", outcome).inc()
        return payout

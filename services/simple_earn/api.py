"""Simple Earn gRPC servicer: validate and convert, call the wallet, one transaction per
write (a product's concurrent Subscribes, and its Redeems, one per batch: group commit).

Every write validates the whole request before touching anything (bad input writes
nothing), then runs under its client idempotency key (``idempotency.write_once``; in a
batch, ``idempotency.claim_many``).

Cross-service consistency (the wallet is another process; its calls cannot join our
PostgreSQL transaction), two patterns, each crash-safe:

1. Wallet first, then record (Subscribe, MatureDue, payouts). The wallet request's
   idempotency key is derived deterministically from what we are doing (the client's key
   and request fingerprint, the position id, the payout batch id), so repeating the
   whole operation after a crash reuses the same hold or transfer instead of moving
   money twice. The record transaction then stores the wallet ids together with the
   outbox events and the client key. If it fails after the hold was placed (crash,
   database error), the client's retry with the same key completes it. If it fails on a
   precondition detected after the hold (quota raced), the hold is claimed 'abandoned'
   and released (by a deterministic key) before the error returns; a hold id is
   claimed either 'used' by a position or 'abandoned', never both (serialised by an
   advisory lock per hold), and a retry that meets its abandoned hold places a fresh one
   under the next attempt number.

2. Record first, then wallet (Redeem, and the release of abandoned holds). The
   transaction decides which holds give how much back and writes those releases to
   ``wallet_releases`` (keys derived from the redemption id) with the records and
   events; the releases run right after the commit and, after a crash, from the
   background sweeper. Redemption state never waits for the wallet; the funds follow.

Users: a gateway acts for the ``user_id`` of the request. Acting on a position of
another user answers NOT_FOUND, exactly like an unknown id, so position ids of other users
cannot be probed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from services.kernel import events, idempotency, outbox, paging, peers
from services.kernel.clock import optional_timestamp_field, timestamp_field
from services.kernel.config import Settings
from services.kernel.groupcommit import GroupCommit
from services.kernel.errors import AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, scoped_user
from services.kernel.peers import Peer
from services.kernel.money import format_amount, parse_amount, parse_decimal, scale_of
from services.kernel.topics import CATALOGUE
from services.simple_earn import domain, metrics, store
from services.simple_earn.domain import Cadence, Kind, Limits, PositionStatus, Status

from earn.v1 import accrual_pb2, simple_earn_pb2, simple_earn_pb2_grpc, wallet_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "earn.v1.SimpleEarnService"
HOLDER = "simple_earn"
MATURITY_JOB = store.MATURITY_JOB

_QUERY = frozenset({GATEWAY, OPERATOR, SERVICE})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "CreateProduct": frozenset({OPERATOR}),
        "UpdateProduct": frozenset({OPERATOR}),
        "SetProductRates": frozenset({OPERATOR}),
        "GetProduct": _QUERY,
        "ListProducts": _QUERY,
        "ListRateHistory": _QUERY,
        "ListPositions": _QUERY,
        "ListSubscriptions": _QUERY,
        "ListRedemptions": _QUERY,
        "ListInterest": _QUERY,
        "Subscribe": frozenset({GATEWAY}),
        "Redeem": frozenset({GATEWAY}),
        "SetAutoSubscribe": frozenset({GATEWAY}),
        "CloseHour": frozenset({SERVICE}),
        "RequestPayout": frozenset({SERVICE}),
        "GetPayoutStatus": frozenset({SERVICE, OPERATOR}),
        "PreviewPayout": frozenset({SERVICE, OPERATOR}),
        "MatureDue": frozenset({SERVICE}),
    }.items()
}

MAX_HOLD_ATTEMPTS = 5
# Subscribes of one product recorded in one transaction at most.
SUBSCRIBE_BATCH = 256
# Redeems of one product in one transaction at most (each with its savepoint).
REDEEM_BATCH = 64
# PayoutBatch field 7: the items of the format before columns (reserved since).
_LEGACY_PAYOUT_ITEMS = 7
# Reinvestment holds placed at once per batch.
REINVEST_CONCURRENCY = 16
ACCRUAL_PARTITIONS = CATALOGUE[store.TOPIC].partitions

M = TypeVar("M", bound=Message)


class _HoldAbandoned(FailedPrecondition):
    """A Subscribe's hold that an earlier attempt of the request abandoned: Subscribe
    places the next attempt's hold and records again (the client never sees this)."""


@dataclass(frozen=True, slots=True)
class _Subscription:
    """A Subscribe whose hold is placed, waiting for its product's next record batch."""

    request: simple_earn_pb2.SubscribeRequest
    order: domain.Order
    hold_id: int


@dataclass(frozen=True, slots=True)
class _Redemption:
    """A validated Redeem waiting for its product's next batch; ``work`` records it."""

    request: simple_earn_pb2.RedeemRequest
    work: Callable[[asyncpg.Connection, datetime, store.Product], Awaitable[simple_earn_pb2.RedeemResponse]]


_KIND = {simple_earn_pb2.PRODUCT_KIND_FLEXIBLE: Kind.FLEXIBLE, simple_earn_pb2.PRODUCT_KIND_FIXED: Kind.FIXED}
_STATUS = {simple_earn_pb2.PRODUCT_STATUS_ACTIVE: Status.ACTIVE, simple_earn_pb2.PRODUCT_STATUS_PAUSED: Status.PAUSED}
_CADENCE = {simple_earn_pb2.PAYOUT_CADENCE_DAILY: Cadence.DAILY, simple_earn_pb2.PAYOUT_CADENCE_HOURLY: Cadence.HOURLY}


def derived_key(prefix: str, *parts: object) -> str:
    """A deterministic wallet idempotency key of Simple Earn's (``se:<prefix>:...``)."""
    return idempotency.derived_key("se", prefix, *parts)


def _redemption_release_prefix(redemption_id: str) -> str:
    """The start of the wallet keys of one redemption's releases (``derived_key("red", ...)``)."""
    return f"se:red:{redemption_id}:"


# A preview page scans at most this many positions (positions owed nothing are skipped,
# so a page may come back short, with a token to go on).
PREVIEW_SCAN_LIMIT = 10 * paging.MAX_PAGE


def _preview_token(scope: str, last_id: int, totals: dict[str, Decimal], count: int) -> str:
    data = {"s": scope, "a": last_id, "t": {asset: format_amount(v) for asset, v in sorted(totals.items())}, "n": count}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def _preview_cursor(token: str, scope: str) -> tuple[int, dict[str, Decimal], int]:
    """(last position id, running totals, running count) of a preview page token issued
    for the same job, period, boundary and cadence."""
    if not token:
        return 0, {}, 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(data, dict) or data.get("s") != scope:
            raise ValueError
        last_id, count, raw = data["a"], data["n"], data["t"]
        if not isinstance(last_id, int) or not isinstance(count, int) or not 0 <= last_id < 2**63 or not 0 <= count < 2**63 or not isinstance(raw, dict):
            raise ValueError
        totals = {}
        for asset, value in raw.items():
            totals[asset] = parse_decimal(value, "page_token", scale=scale_of(asset), allow_zero=True)
        return last_id, totals, count
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, InvalidArgument):
        raise InvalidArgument("page_token", "is not a token this service issued for this preview") from None


def _time(request: Any) -> tuple[datetime | None, datetime | None]:
    if not request.HasField("time"):
        return None, None
    t = request.time
    start = optional_timestamp_field(t, "from", name="time.from")
    end = optional_timestamp_field(t, "to", name="time.to")
    if start is not None and end is not None and start >= end:
        raise InvalidArgument("time", "from must be before to")
    return start, end


def _tiers(raw: Any, asset: str) -> domain.Tiers:
    return domain.parse_tiers(raw, asset)


def _enum(table: dict[int, Any], value: int, field: str, *, required: bool = True) -> Any:
    if value == 0 and not required:
        return None
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(field, "is required" if value == 0 else f"unknown value {value}") from None


class SimpleEarnApi(simple_earn_pb2_grpc.SimpleEarnServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings, wallet: Peer) -> None:
        self.pool = pool
        self.settings = settings
        self.wallet = wallet
        self._payout_ids: dict[tuple[str, str], int] = {}
        # One product's Subscribes record together (group commit): its row is locked once per batch.
        self._subscriptions: GroupCommit[str, _Subscription, simple_earn_pb2.SubscribeResponse] = GroupCommit(
            self._record_subscriptions, max_items=SUBSCRIBE_BATCH
        )
        # And its Redeems: each in its own savepoint of the batch's transaction.
        self._redemptions: GroupCommit[str, _Redemption, simple_earn_pb2.RedeemResponse] = GroupCommit(
            self._record_redemptions, max_items=REDEEM_BATCH
        )

    # ---- helpers ---------------------------------------------------------------------

    async def _write(self, method: str, request: Message, response_type: type[M], work: Callable[[asyncpg.Connection], Awaitable[M]]) -> M:
        return await idempotency.write_once(self.pool, method=method, request=request, response_type=response_type, work=work)

    async def _payout_id(self, job: str, period: str) -> int:
        """The small id interest records carry for (job, period); cached (it never changes)."""
        found = self._payout_ids.get((job, period))
        if found is None:
            if len(self._payout_ids) > 10_000:
                self._payout_ids.clear()
            found = self._payout_ids[(job, period)] = await store.payout_id(self.pool, job, period)
        return found

    async def drive_releases(self, keys: list[str] | None = None, prefix: str | None = None) -> int:
        """Execute the wallet releases committed and not yet confirmed: all of them (the
        sweep), or only those of ``keys`` or ``prefix`` (a Redeem drives its own, so
        concurrent Redeems do not each resend every pending release). Safe to run
        concurrently and repeatedly: each release has its own deterministic wallet key."""
        pending = await store.pending_releases(self.pool, keys=keys, prefix=prefix)
        return await peers.release_holds(self.wallet, pending, lambda release_id: store.release_done(self.pool, release_id))

    async def _abandon(self, hold_id: int, amount: Decimal, reason: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            abandoned = await store.abandon_hold(conn, hold_id, amount, reason)
        if abandoned:
            log.warning("hold abandoned and released", extra={"hold_id": hold_id, "reason": reason})
            await self.drive_releases()

    # ---- products --------------------------------------------------------------------

    async def CreateProduct(self, request: simple_earn_pb2.CreateProductRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.CreateProductResponse:
        idempotency.check_key(request.idempotency_key)
        product_id = domain.check_product_id(request.product_id)
        if not request.asset:
            raise InvalidArgument("asset", "is required")
        asset = request.asset
        scale_of(asset)
        kind = _enum(_KIND, request.kind, "kind")
        tiers = _tiers(request.tiers, asset)
        limits = domain.check_limits(
            Limits(
                parse_amount(request.min_subscription, asset, "min_subscription"),
                domain.parse_optional_amount(request.max_per_user, asset, "max_per_user"),
                domain.parse_optional_amount(request.quota, asset, "quota"),
            )
        )
        if kind is Kind.FIXED:
            if not 1 <= request.term_days <= domain.MAX_TERM_DAYS:
                raise InvalidArgument("term_days", f"a fixed-term product needs 1 to {domain.MAX_TERM_DAYS} days")
            if request.payout_cadence != simple_earn_pb2.PAYOUT_CADENCE_UNSPECIFIED:
                raise InvalidArgument("payout_cadence", "a fixed-term product pays at maturity; leave it unspecified")
            cadence = Cadence.DAILY
        else:
            if request.term_days:
                raise InvalidArgument("term_days", "applies to fixed-term products only")
            if request.early_redeem_allowed:
                raise InvalidArgument("early_redeem_allowed", "applies to fixed-term products only (flexible ones redeem any time)")
            cadence = _enum(_CADENCE, request.payout_cadence, "payout_cadence", required=False) or Cadence.DAILY

        async def work(conn: asyncpg.Connection) -> simple_earn_pb2.CreateProductResponse:
            at = await store.accrual_clock(conn, self.settings.clock) if kind is Kind.FLEXIBLE else self.settings.clock.now()
            product = store.Product(
                product_id, asset, kind, Status.ACTIVE, tiers, limits, Decimal(0), request.term_days, request.early_redeem_allowed, cadence, at
            )
            if not await store.insert_product(conn, product):
                raise AlreadyExists(f"product_id: product {product_id} already exists")
            if kind is Kind.FLEXIBLE:
                effective = domain.next_full_hour(at)
                await store.set_rates(conn, product_id, tiers, effective, at)
                await outbox.enqueue(conn, self.settings, store.PRODUCER, at, store.rates_event(product, tiers, effective))
            return simple_earn_pb2.CreateProductResponse(product=store.product_message(product))

        return await self._write("CreateProduct", request, simple_earn_pb2.CreateProductResponse, work)

    async def UpdateProduct(self, request: simple_earn_pb2.UpdateProductRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.UpdateProductResponse:
        idempotency.check_key(request.idempotency_key)
        product_id = domain.check_product_id(request.product_id)
        current = await store.get_product(self.pool, product_id)
        status = _enum(_STATUS, request.status, "status", required=False)
        minimum = domain.parse_optional_amount(request.min_subscription, current.asset, "min_subscription")
        maximum = domain.parse_optional_amount(request.max_per_user, current.asset, "max_per_user")
        quota = domain.parse_optional_amount(request.quota, current.asset, "quota")
        if status is None and minimum is None and maximum is None and quota is None:
            raise InvalidArgument("status", "nothing to update: set status, min_subscription, max_per_user or quota")

        async def work(conn: asyncpg.Connection) -> simple_earn_pb2.UpdateProductResponse:
            at = self.settings.clock.now()
            p = await store.get_product(conn, product_id, lock=True)
            limits = domain.check_limits(
                Limits(
                    p.limits.min_subscription if minimum is None else minimum,
                    p.limits.max_per_user if maximum is None else maximum,
                    p.limits.quota if quota is None else quota,
                )
            )
            await store.update_product(conn, product_id, status or p.status, limits, at)
            return simple_earn_pb2.UpdateProductResponse(product=store.product_message(await store.get_product(conn, product_id)))

        return await self._write("UpdateProduct", request, simple_earn_pb2.UpdateProductResponse, work)

    async def SetProductRates(self, request: simple_earn_pb2.SetProductRatesRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.SetProductRatesResponse:
        idempotency.check_key(request.idempotency_key)
        product_id = domain.check_product_id(request.product_id)
        current = await store.get_product(self.pool, product_id)
        tiers = _tiers(request.tiers, current.asset)
        if current.kind is not Kind.FLEXIBLE:
            raise FailedPrecondition(f"product {product_id} is fixed-term: its rates are locked in at subscription and cannot change")

        async def work(conn: asyncpg.Connection) -> simple_earn_pb2.SetProductRatesResponse:
            at = await store.accrual_clock(conn, self.settings.clock)
            p = await store.get_product(conn, product_id, lock=True)
            effective = domain.next_full_hour(at)
            await store.set_rates(conn, product_id, tiers, effective, at)
            await outbox.enqueue(conn, self.settings, store.PRODUCER, at, store.rates_event(p, tiers, effective))
            return simple_earn_pb2.SetProductRatesResponse(
                product=store.product_message(await store.get_product(conn, product_id)), effective_hour=effective
            )

        return await self._write("SetProductRates", request, simple_earn_pb2.SetProductRatesResponse, work)

    async def GetProduct(self, request: simple_earn_pb2.GetProductRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.GetProductResponse:
        product_id = domain.check_product_id(request.product_id)
        return simple_earn_pb2.GetProductResponse(product=store.product_message(await store.get_product(self.pool, product_id)))

    async def ListProducts(self, request: simple_earn_pb2.ListProductsRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListProductsResponse:
        if request.asset:
            scale_of(request.asset)
        return simple_earn_pb2.ListProductsResponse(products=[store.product_message(p) for p in await store.list_products(self.pool, request.asset)])

    async def ListRateHistory(self, request: simple_earn_pb2.ListRateHistoryRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListRateHistoryResponse:
        product_id = domain.check_product_id(request.product_id)
        await store.get_product(self.pool, product_id)
        response = simple_earn_pb2.ListRateHistoryResponse()
        for effective, tiers, changed_at in await store.rate_history(self.pool, product_id):
            change = response.changes.add(effective_hour=effective, tiers=store.tier_messages(tiers))
            change.changed_at.FromDatetime(changed_at)
        return response

    # ---- user writes -----------------------------------------------------------------

    async def Subscribe(self, request: simple_earn_pb2.SubscribeRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.SubscribeResponse:
        """Hold the funds in the wallet, then record the subscription.

        Crash story: the wallet hold key is derived from the client key and the request
        fingerprint, so a retry of the same request reuses the same hold. If our
        transaction fails after the hold was placed (crash, database down), the hold waits
        for the client's retry with the same key, which records it. A precondition that
        fails after the hold (quota or limit raced by a concurrent subscription) abandons
        and releases the hold before the error is returned.

        The record joins the product's next batch (``_record_subscriptions``): concurrent
        Subscribes of one product share one transaction and one lock of its row.
        """
        key = idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        product_id = domain.check_product_id(request.product_id)
        product, user_total, key_row = await store.subscribe_context(self.pool, product_id, user, key)
        amount = parse_amount(request.amount, product.asset, "amount")
        if product.kind is Kind.FLEXIBLE and request.auto_renew:
            raise InvalidArgument("auto_renew", "applies to fixed-term products only")
        if product.kind is Kind.FIXED and request.auto_subscribe:
            raise InvalidArgument("auto_subscribe", "applies to flexible products only")
        if (stored := idempotency.stored_response(key_row, "Subscribe", request, simple_earn_pb2.SubscribeResponse)) is not None:
            return stored
        # Refuse before touching the wallet when the state already forbids it.
        domain.check_subscription(
            product_id=product_id, asset=product.asset, status=product.status, limits=product.limits, amount=amount,
            user_total=user_total, subscribed=product.subscribed,
        )
        order = domain.Order(user, amount, request.auto_subscribe, request.auto_renew)
        # Whether a hold was abandoned by an earlier attempt is checked in the record
        # batch, under the hold's lock: then the next attempt places a new hold.
        for attempt in range(MAX_HOLD_ATTEMPTS):
            hold_id = await peers.place_hold(
                self.wallet, "se:sub", "Subscribe", request, owner=user, asset=product.asset, amount=amount, holder=HOLDER,
                reference=f"simple_earn:subscribe:{product_id}", abandoned=None, attempts=attempt + 1, first_attempt=attempt,
            )
            try:
                return await self._subscriptions.submit(product_id, _Subscription(request, order, hold_id))
            except _HoldAbandoned:
                continue
            except DomainError as err:
                await self._abandon(hold_id, amount, f"Subscribe {key}: {err.message}")
                raise
        raise FailedPrecondition(peers.TOO_MANY_ATTEMPTS)

    async def _open_batch(
        self, conn: asyncpg.Connection, method: str, requests: list[Message], response_type: type[Message], product_id: str
    ) -> tuple[list[object], list[int], datetime, store.Product]:
        """The start of a product's record batch (group commit), in the lock order of a
        single write: the clients' keys claimed (``idempotency.claim_many``: the outcome of
        each request, None for those this batch does), the indexes claimed, the accrual
        clock and the product row locked."""
        outcomes: list[object] = await idempotency.claim_many(conn, method, requests, response_type)
        claimed = [k for k, claim in enumerate(outcomes) if claim is None]
        at = await store.accrual_clock(conn, self.settings.clock)
        return outcomes, claimed, at, await store.get_product(conn, product_id, lock=True)

    async def _record_subscriptions(self, product_id: str, batch: list[_Subscription]) -> list[simple_earn_pb2.SubscribeResponse | DomainError]:
        """The record transaction of a batch of one product's Subscribes (group commit,
        ``GroupCommit``): the product row locked once for all of them, each decided as if
        they came one after another (``domain.plan_subscriptions``), the accepted ones
        written in one statement. A refused Subscribe gets its own error and stores
        nothing; its hold is abandoned by its caller, as before."""
        metrics.SUBSCRIBE_BATCH.observe(len(batch))
        async with self.pool.acquire() as conn, conn.transaction():
            outcomes, claimed, at, p = await self._open_batch(conn, "Subscribe", [s.request for s in batch], simple_earn_pb2.SubscribeResponse, product_id)
            users = sorted({batch[k].order.user_id for k in claimed})
            flexible = p.kind is Kind.FLEXIBLE
            open_rows = await store.open_flexible_positions(conn, product_id, users) if flexible and users else {}
            abandoned = await store.lock_holds(conn, [batch[k].hold_id for k in claimed])
            for k in claimed:
                if batch[k].hold_id in abandoned:
                    outcomes[k] = _HoldAbandoned(f"hold {batch[k].hold_id} was abandoned by an earlier attempt")
            todo = [k for k in claimed if outcomes[k] is None]
            plan = domain.plan_subscriptions(
                product_id=product_id, asset=p.asset, kind=p.kind, status=p.status, limits=p.limits, subscribed=p.subscribed,
                user_totals=await store.user_totals(conn, product_id, users) if users else {},
                open_flexible={user: row["id"] for user, row in open_rows.items()}, orders=[batch[k].order for k in todo],
            )
            start = domain.next_full_hour(at)
            matures = None if flexible else domain.maturity_hour(start, p.term_days)
            new_ids = await store.new_position_ids(conn, len(plan.new_positions))
            positions: dict[int, dict[str, Any]] = {row["id"]: dict(row) for row in open_rows.values()}
            positions.update((i, store.new_position_row(i, owner, p, start, matures, at)) for i, owner in zip(new_ids, plan.new_positions))
            accepted: list[tuple[int, int]] = []  # (batch index, position id)
            for k, placed in zip(todo, plan.outcomes, strict=True):
                if isinstance(placed, DomainError):
                    outcomes[k] = placed
                else:
                    accepted.append((k, placed.existing_id if placed.existing_id is not None else new_ids[placed.new_index]))
            if accepted:
                responses = await self._write_subscriptions(conn, p, batch, accepted, positions, set(new_ids), start, matures, at)
                for (k, _), response in zip(accepted, responses, strict=True):
                    outcomes[k] = response
            await idempotency.forget(conn, [batch[k].request.idempotency_key for k in claimed if isinstance(outcomes[k], DomainError)])
        for k, _ in accepted:
            metrics.amount(metrics.SUBSCRIBED, product_id, p.asset, batch[k].order.amount)
        return idempotency.with_duplicates(outcomes)  # type: ignore[return-value]  # every item decided above

    async def _write_subscriptions(
        self, conn: asyncpg.Connection, p: store.Product, batch: list[_Subscription], accepted: list[tuple[int, int]],
        positions: dict[int, dict[str, Any]], new_ids: set[int], start: int, matures: int | None, at: datetime,
    ) -> list[simple_earn_pb2.SubscribeResponse]:
        """Write a batch's accepted Subscribes and answer each with its position as it is
        right after it (a position two of them share shows the first one's principal in
        the first answer)."""
        before = {i: row["principal"] for i, row in positions.items()}
        responses: list[simple_earn_pb2.SubscribeResponse] = []
        events: list[outbox.Outgoing] = []
        for k, position_id in accepted:
            s, row = batch[k], positions[position_id]
            row["principal"] += s.order.amount
            row["auto_subscribe"] = row["auto_subscribe"] or s.order.auto_subscribe
            if p.kind is Kind.FIXED:
                row["auto_renew"] = s.order.auto_renew
            responses.append(simple_earn_pb2.SubscribeResponse(position=store.position_message(row), accrues_from_hour=start))
            if p.kind is Kind.FLEXIBLE:
                events.append(store.position_changed(row, [(start, s.order.amount)]))
        new = [i for i in positions if i in new_ids]
        grown = [i for i in positions if i not in new_ids and positions[i]["principal"] != before[i]]
        rows = store.SubscriptionRows(
            new_ids=new, new_users=[positions[i]["user_id"] for i in new], new_principals=[positions[i]["principal"] for i in new],
            new_auto_subscribe=[positions[i]["auto_subscribe"] for i in new], new_auto_renew=[positions[i]["auto_renew"] for i in new],
            grown_ids=grown, grown_deltas=[positions[i]["principal"] - before[i] for i in grown],
            grown_auto_subscribe=[positions[i]["auto_subscribe"] for i in grown],
            position_ids=[i for _, i in accepted], user_ids=[batch[k].order.user_id for k, _ in accepted],
            amounts=[batch[k].order.amount for k, _ in accepted], hold_ids=[batch[k].hold_id for k, _ in accepted],
        )
        subscription_ids = await store.record_subscriptions(conn, p, rows, start, matures, at)
        for (k, _), response in zip(accepted, responses):
            response.subscription_id = str(subscription_ids[batch[k].hold_id])
        await outbox.enqueue(conn, self.settings, store.PRODUCER, at, events)
        await idempotency.store_responses(conn, [(batch[k].request.idempotency_key, r) for (k, _), r in zip(accepted, responses)])
        return responses

    async def Redeem(self, request: simple_earn_pb2.RedeemRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.RedeemResponse:
        """Record the redemption (records, principal changes, events and the releases to
        make) in one transaction, then release the holds in the wallet (newest first)."""
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        position_id = domain.check_position_id(request.position_id)
        position = await store.redeem_context(self.pool, position_id, user, request.idempotency_key)
        amount = parse_amount(request.amount, position["asset"], "amount") if request.amount else None
        stored = idempotency.stored_response(position, "Redeem", request, simple_earn_pb2.RedeemResponse)
        if stored is not None:
            await self.drive_releases(prefix=_redemption_release_prefix(stored.redemption_id))
            return stored
        redeemed: list[tuple[str, str, Decimal]] = []  # filled when the work runs (not on a replay)
        releases: list[str] = []  # the wallet keys of this redemption's releases

        async def work(conn: asyncpg.Connection, at: datetime, p: store.Product) -> simple_earn_pb2.RedeemResponse:
            row = await store.get_position(conn, position_id, user, lock=True)
            if row["status"] != PositionStatus.ACTIVE:
                raise FailedPrecondition(f"position {position_id} is {row['status']}: nothing left to redeem")
            principal: Decimal = row["principal"]
            value = principal if amount is None else amount
            hour = domain.unix_hour(at)
            forfeited = False
            if p.kind is Kind.FLEXIBLE:
                changes = await store.principal_changes(conn, position_id)
                split = domain.split_redemption(value, principal, domain.accruing_at(changes, hour))
                deltas = domain.redemption_changes(hour, split)
            else:
                if value != principal:
                    raise InvalidArgument("amount", "a fixed-term position is redeemed whole: leave amount empty or give the whole principal")
                matures = domain.hour_start(row["matures_hour"])
                if at >= matures:
                    raise FailedPrecondition(f"position {position_id} matured at {matures.isoformat()}: it is paid out by maturity")
                if not p.early_redeem_allowed:
                    raise FailedPrecondition(
                        f"product {p.product_id} does not allow early redemption: position {position_id} matures at {matures.isoformat()}"
                    )
                forfeited = True
                deltas = [(hour, -value)]
            takes = domain.take_from_holds(value, await store.holds_newest_first(conn, position_id))
            for effective, delta in deltas:
                await store.add_principal(conn, position_id, p.product_id, delta, effective, at)
            redemption_id = await store.insert_redemption(conn, row, value, "user", forfeited, at)
            redeemed.append((p.product_id, p.asset, value))
            for hold_id, take in takes:
                await store.reduce_hold(conn, hold_id, take)
                key = derived_key("red", redemption_id, hold_id)
                await store.schedule_release(conn, key, hold_id, take, "redemption")
                releases.append(key)
            full = value == principal
            if full:
                await store.close_position(conn, position_id, PositionStatus.REDEEMED, hour, at)
            if p.kind is Kind.FLEXIBLE:
                await outbox.enqueue(
                    conn, self.settings, store.PRODUCER, at, [store.position_changed(row, deltas, hour if full else 0)]
                )
            updated = await store.get_position(conn, position_id, None)
            return simple_earn_pb2.RedeemResponse(
                position=store.position_message(updated), redemption_id=str(redemption_id), interest_forfeited=forfeited
            )

        response = await self._redemptions.submit(position["product_id"], _Redemption(request, work))
        for product, asset, value in redeemed:
            metrics.amount(metrics.REDEEMED, product, asset, value)
        if redeemed:
            await self.drive_releases(releases)
        else:  # another call with the same key did the work while this one waited
            await self.drive_releases(prefix=_redemption_release_prefix(response.redemption_id))
        return response

    async def _record_redemptions(self, product_id: str, batch: list[_Redemption]) -> list[simple_earn_pb2.RedeemResponse | DomainError]:
        """The transaction of a batch of one product's Redeems (group commit): the product
        row locked once, then each Redeem's work in its own savepoint, in arrival order;
        a refused one is rolled back to its savepoint and stores nothing."""
        metrics.REDEEM_BATCH.observe(len(batch))
        async with self.pool.acquire() as conn, conn.transaction():
            outcomes, claimed, at, p = await self._open_batch(conn, "Redeem", [r.request for r in batch], simple_earn_pb2.RedeemResponse, product_id)
            for k in claimed:
                try:
                    async with conn.transaction():
                        outcomes[k] = await batch[k].work(conn, at, p)
                except DomainError as refused:
                    outcomes[k] = refused
            await idempotency.store_responses(conn, [(batch[k].request.idempotency_key, outcomes[k]) for k in claimed if not isinstance(outcomes[k], DomainError)])
            await idempotency.forget(conn, [batch[k].request.idempotency_key for k in claimed if isinstance(outcomes[k], DomainError)])
        return idempotency.with_duplicates(outcomes)  # type: ignore[return-value]  # every item decided above

    async def SetAutoSubscribe(self, request: simple_earn_pb2.SetAutoSubscribeRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.SetAutoSubscribeResponse:
        idempotency.check_key(request.idempotency_key)
        user = domain.check_user_id(request.user_id)
        position_id = domain.check_position_id(request.position_id)
        await store.get_position(self.pool, position_id, user)

        async def work(conn: asyncpg.Connection) -> simple_earn_pb2.SetAutoSubscribeResponse:
            at = self.settings.clock.now()
            row = await store.get_position(conn, position_id, user, lock=True)
            if row["kind"] != Kind.FLEXIBLE:
                raise FailedPrecondition(f"position {position_id} is fixed-term: auto_renew is chosen at subscription; auto-subscribe is for flexible positions")
            if row["status"] != PositionStatus.ACTIVE:
                raise FailedPrecondition(f"position {position_id} is {row['status']}")
            await store.set_auto_subscribe(conn, position_id, request.enabled, at)
            return simple_earn_pb2.SetAutoSubscribeResponse(position=store.position_message(await store.get_position(conn, position_id, None)))

        return await self._write("SetAutoSubscribe", request, simple_earn_pb2.SetAutoSubscribeResponse, work)

    # ---- queries ---------------------------------------------------------------------

    async def ListPositions(self, request: simple_earn_pb2.ListPositionsRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListPositionsResponse:
        user = scoped_user(request.user_id)
        product_id = domain.check_product_id(request.product_id) if request.product_id else ""
        size = paging.page_size(request.page_size)
        rows = await store.list_positions(self.pool, user, product_id, paging.after(request.page_token, "p"), size + 1)
        response = simple_earn_pb2.ListPositionsResponse(positions=[store.position_message(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.token("p", rows[size - 1]["id"])
        return response

    async def ListSubscriptions(self, request: simple_earn_pb2.ListSubscriptionsRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListSubscriptionsResponse:
        user = scoped_user(request.user_id)
        start, end = _time(request)
        size = paging.page_size(request.page_size)
        rows = await store.list_records(self.pool, "subscriptions", user, start, end, paging.after(request.page_token, "s"), size + 1)
        response = simple_earn_pb2.ListSubscriptionsResponse()
        for r in rows[:size]:
            item = response.subscriptions.add(
                subscription_id=str(r["id"]), position_id=str(r["position_id"]), user_id=r["user_id"], product_id=r["product_id"],
                amount=format_amount(r["amount"]), source=r["source"],
            )
            item.created_at.FromDatetime(r["created_at"])
        if len(rows) > size:
            response.next_page_token = paging.token("s", rows[size - 1]["id"])
        return response

    async def ListRedemptions(self, request: simple_earn_pb2.ListRedemptionsRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListRedemptionsResponse:
        user = scoped_user(request.user_id)
        start, end = _time(request)
        size = paging.page_size(request.page_size)
        rows = await store.list_records(self.pool, "redemptions", user, start, end, paging.after(request.page_token, "r"), size + 1)
        response = simple_earn_pb2.ListRedemptionsResponse()
        for r in rows[:size]:
            item = response.redemptions.add(
                redemption_id=str(r["id"]), position_id=str(r["position_id"]), user_id=r["user_id"], product_id=r["product_id"],
                amount=format_amount(r["amount"]), source=r["source"], interest_forfeited=r["interest_forfeited"],
            )
            item.created_at.FromDatetime(r["created_at"])
        if len(rows) > size:
            response.next_page_token = paging.token("r", rows[size - 1]["id"])
        return response

    async def ListInterest(self, request: simple_earn_pb2.ListInterestRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.ListInterestResponse:
        """Payout records, or with ``hourly`` the exact accrual of each hour of one position,
        derived from its principal history and the product's rate history (or its locked
        tiers). Hourly records cover hours that have ended; the time filter selects hours
        by their start."""
        user = scoped_user(request.user_id)
        position_id = domain.check_position_id(request.position_id) if request.position_id else None
        start, end = _time(request)
        size = paging.page_size(request.page_size)
        response = simple_earn_pb2.ListInterestResponse()
        if not request.hourly:
            rows, go_on = await store.list_interest(self.pool, user, position_id, start, end, paging.after(request.page_token, "i"), size + 1)
            for r in rows[:size]:
                response.records.add(
                    position_id=str(r["position_id"]), product_id=r["product_id"], asset=r["asset"], amount=format_amount(r["amount"]),
                    from_hour=r["from_hour"], to_hour=r["to_hour"], period=r["period"], reinvested=r["reinvested"],
                )
            if len(rows) > size:
                response.next_page_token = paging.token("i", rows[size - 1]["id"])
            elif go_on is not None:  # a listing of everything stopped its walk early: a short page, go on
                response.next_page_token = paging.token("i", go_on)
            return response
        if position_id is None:
            raise InvalidArgument("position_id", "is required when hourly is set")
        row = await store.get_position(self.pool, position_id, user or None)
        changes = await store.principal_changes(self.pool, position_id)
        if row["kind"] == Kind.FIXED:
            rates = [(row["accrues_from_hour"], store.tiers_from_json(row["fixed_tiers"]))]
        else:
            rates = [(h, t) for h, t, _ in await store.rate_history(self.pool, row["product_id"])]
        first = min((h for h, _ in changes), default=row["accrues_from_hour"])
        last = domain.unix_hour(self.settings.clock.now())  # hours before the current one have ended
        for bound in (row["closed_from_hour"], row["matures_hour"]):
            if bound is not None:
                last = min(last, bound)
        if start is not None:
            first = max(first, -(-int(start.timestamp()) // 3600))
        if end is not None:
            last = min(last, -(-int(end.timestamp()) // 3600))
        first = max(first, paging.after(request.page_token, "h"))
        records: list[tuple[int, Decimal, Decimal]] = []
        cursor = first
        while cursor < last and len(records) <= size:
            chunk_end = min(last, cursor + 24 * 31)
            records.extend(domain.hourly_records(changes, rates, cursor, chunk_end))
            cursor = chunk_end
        for hour, _, accrued in records[:size]:
            response.records.add(
                position_id=str(position_id), product_id=row["product_id"], asset=row["asset"], amount=format_amount(accrued),
                from_hour=hour, to_hour=hour + 1,
            )
        if len(records) > size:
            response.next_page_token = paging.token("h", records[size][0])
        return response

    # ---- jobs ------------------------------------------------------------------------

    async def CloseHour(self, request: simple_earn_pb2.CloseHourRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.CloseHourResponse:
        """Publish HourClosed for every hour after the last closed one up to ``hour`` (the
        first call closes only ``hour``), under the EXCLUSIVE watermark lock: every accrual
        write committed before is before the ticks in every partition. Idempotent."""
        if request.hour <= 0:
            raise InvalidArgument("hour", "must be a positive unix hour")
        async with self.pool.acquire() as conn, conn.transaction():
            at = await store.watermark_clock(conn, self.settings.clock)
            hours = await outbox.close_hours(
                conn, self.settings, store.PRODUCER, store.TOPIC, request.hour, at, store.last_closed_hour, store.set_last_closed_hour,
            )
            return simple_earn_pb2.CloseHourResponse(closed=hours)

    async def RequestPayout(self, request: simple_earn_pb2.RequestPayoutRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.RequestPayoutResponse:
        """Publish PayoutRequested for the flexible products of ``cadence`` to every
        partition. Idempotent per (job, period); the same (job, period) with another
        boundary or cadence is refused."""
        job = domain.check_job(request.job)
        period = domain.check_period(request.period)
        if request.boundary_hour <= 0:
            raise InvalidArgument("boundary_hour", "must be a positive unix hour")
        cadence = _enum(_CADENCE, request.cadence, "cadence")
        async with self.pool.acquire() as conn, conn.transaction():
            at = await store.accrual_clock(conn, self.settings.clock)
            if request.boundary_hour > domain.unix_hour(at):
                raise FailedPrecondition(f"boundary_hour: {request.boundary_hour} is after the current hour")
            product_ids = await store.flexible_products(conn, cadence)
            if not await store.insert_payout_request(conn, job, period, request.boundary_hour, cadence, product_ids, at):
                existing = await store.payout_request(conn, job, period)
                assert existing is not None
                if existing["boundary_hour"] != request.boundary_hour or existing["cadence"] != cadence.value:
                    raise AlreadyExists(
                        f"period: {job} {period} was requested with boundary_hour {existing['boundary_hour']} and cadence {existing['cadence']}"
                    )
                return simple_earn_pb2.RequestPayoutResponse(product_ids=existing["product_ids"])
            if product_ids:  # an empty list would mean "all products" to the engine
                message = accrual_pb2.PayoutRequested(job=job, period=period, boundary_hour=request.boundary_hour, product_ids=product_ids)
                await outbox.enqueue(conn, self.settings, store.PRODUCER, at, outbox.broadcast(store.TOPIC, f"payout:{job}:{period}", message))
            return simple_earn_pb2.RequestPayoutResponse(product_ids=product_ids)

    async def GetPayoutStatus(self, request: simple_earn_pb2.GetPayoutStatusRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.GetPayoutStatusResponse:
        job = domain.check_job(request.job)
        period = domain.check_period(request.period)
        requested = await store.payout_request(self.pool, job, period)
        if requested is None:
            raise NotFound(f"period: no payout {job} {period} was requested")
        done, items, paid = await store.payout_status(self.pool, job, period)
        return simple_earn_pb2.GetPayoutStatusResponse(
            partitions=ACCRUAL_PARTITIONS,
            partitions_done=done,
            items=items,
            paid={asset: format_amount(value) for asset, value in sorted(paid.items())},
            complete=done >= ACCRUAL_PARTITIONS or not requested["product_ids"],
        )

    async def PreviewPayout(self, request: simple_earn_pb2.PreviewPayoutRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.PreviewPayoutResponse:
        """What a payout would pay, read-only, derived exactly like the accrual engine pays
        (see :func:`domain.preview_payout`) from each position's principal history, its
        product's rate history and the payouts recorded so far. Items this payout already
        paid show the recorded amount. Running totals travel in the page token, so every
        page costs the same and the last one carries the payout's totals.

        As exact as the records it reads: a payout the engine made whose batch is not
        consumed yet here is not known, and changes after the call are not foreseen."""
        job = domain.check_job(request.job)
        period = domain.check_period(request.period)
        if request.boundary_hour <= 0:
            raise InvalidArgument("boundary_hour", "must be a positive unix hour")
        cadence = _enum(_CADENCE, request.cadence, "cadence")
        size = paging.page_size(request.page_size)
        boundary = request.boundary_hour
        scope = hashlib.sha256(f"{job}\0{period}\0{boundary}\0{cadence.value}".encode()).hexdigest()[:16]
        after, totals, count = _preview_cursor(request.page_token, scope)
        requested = await store.payout_request(self.pool, job, period)
        if requested is not None:
            if requested["boundary_hour"] != boundary or requested["cadence"] != cadence.value:
                raise FailedPrecondition(
                    f"period: {job} {period} was requested with boundary_hour {requested['boundary_hour']} and cadence {requested['cadence']}"
                )
            product_ids = list(requested["product_ids"])
        else:
            async with self.pool.acquire() as conn:
                product_ids = await store.flexible_products(conn, cadence)
        response = simple_earn_pb2.PreviewPayoutResponse(product_ids=product_ids, requested=requested is not None)
        indices: dict[str, Any] = {}
        last_id, exhausted, scanned = after, not product_ids, 0
        while not exhausted and len(response.items) < size and scanned < PREVIEW_SCAN_LIMIT:
            rows = await store.preview_positions(self.pool, product_ids, last_id, size)
            ids = [r["id"] for r in rows]
            changes = await store.changes_of(self.pool, ids)
            so_far = await store.payouts_so_far(self.pool, ids, job, period)
            recorded = await store.recorded_payouts(self.pool, ids, job, period)
            exhausted = len(rows) < size
            for n, r in enumerate(rows):
                last_id, scanned = r["id"], scanned + 1
                done = recorded.get(r["id"])
                if done is not None:
                    amount, from_hour = done["amount"], done["from_hour"]
                else:
                    if r["product_id"] not in indices:
                        history = await store.rate_history(self.pool, r["product_id"])
                        indices[r["product_id"]] = domain.rate_index((h, t) for h, t, _ in history)
                    before = so_far.get(r["id"])
                    preview = domain.preview_payout(
                        indices[r["product_id"]], changes.get(r["id"], []), boundary,
                        None if before is None else before.last_boundary, scale_of(r["asset"]),
                    )
                    if preview is None:
                        continue
                    if before is not None and preview.paid_before != before.paid:
                        log.warning(
                            "recorded payouts differ from the interest derived from the history",
                            extra={"position": r["id"], "recorded": str(before.paid), "derived": str(preview.paid_before)},
                        )
                        response.unreconciled_position_ids.append(str(r["id"]))
                    amount, from_hour = preview.amount, preview.from_hour
                if amount <= 0:
                    continue
                response.items.add(
                    position_id=str(r["id"]), user_id=r["user_id"], product_id=r["product_id"], asset=r["asset"],
                    amount=format_amount(amount), from_hour=from_hour, paid=done is not None,
                )
                totals[r["asset"]] = totals.get(r["asset"], Decimal(0)) + amount
                count += 1
                if len(response.items) >= size:
                    exhausted = exhausted and n == len(rows) - 1
                    break
        for asset, total in sorted(totals.items()):
            response.totals[asset] = format_amount(total)
        response.positions = count
        if not exhausted:
            response.next_page_token = _preview_token(scope, last_id, totals, count)
        return response

    # ---- payouts (consumer of accrual.payouts) -----------------------------------------

    async def apply_payout(self, raw: bytes, skipped: list[str] | None = None) -> str:
        """Pay one PayoutBatch (one product's items, in columns) exactly once. Returns what
        happened (for logs and tests): "paid" or "duplicate". A record that cannot be
        parsed or whose batch is invalid raises (DecodeError, ValueError, InvalidArgument)
        having written nothing. Items that cannot be paid (not a position of that user,
        product and asset; a bad id or amount; paid before) are left out: nothing is
        paid for them, and they are described in ``skipped`` when given, so the consumer
        parks the record for a look.

        Record first, then the wallet (the pattern of Redeem). One transaction checks
        every item against ``positions``, then records the items (as arrays, a few
        payout_items rows per batch), the items left out and why, the reinvestment
        decision, the event id (inbox) and the batch row under its natural key (job,
        period, partition, sequence); an item whose position another batch of the payout
        recorded is left out (the recording statement runs under a lock per payout and
        product). Then one wallet BulkCredit pays exactly the recorded items, keyed by the
        batch; the reinvestment holds follow, keyed by (job, period, position); a last
        transaction marks the batch posted (its partition done if it is the last) and adds
        the reinvested interest to the positions.

        A redelivery, in the same envelope or re-emitted, finds the batch row: posted ->
        "duplicate"; recorded but not posted (a crash or a wallet outage in between) -> the
        same credit and holds again, rebuilt from the row and the columns, which the wallet
        answers from their keys. A batch delivered again with other items than the first
        time is refused (parked) and pays nothing more. Until the wallet confirms, the
        interest records are visible but the batch counts in no GetPayoutStatus total.
        """
        env = events.parse(raw)
        batch = events.unwrap(env, accrual_pb2.PayoutBatch)
        job = domain.check_job(batch.job)
        period = domain.check_period(batch.period)
        if any(f.field_number == _LEGACY_PAYOUT_ITEMS for f in UnknownFieldSet(batch)):
            raise ValueError("PayoutBatch with items (field 7): the format before columns; this build pays only columns")
        n = len(batch.position_ids)
        product_id, asset = batch.product_id, batch.asset
        if n or product_id or asset:
            product_id = domain.check_product_id(product_id)
            if not asset:
                raise InvalidArgument("asset", "is required")
            scale_of(asset)
        if len(batch.from_hours) != n:
            raise InvalidArgument("from_hours", f"has {len(batch.from_hours)} entries for {n} items")
        position_ids, user_ids, amounts = list(batch.position_ids), list(batch.user_ids), list(batch.amounts)
        batch_key = (job, period, batch.partition, batch.sequence)
        digest = hashlib.sha256(env.payload).digest()

        recorded = await store.payout_batch(self.pool, *batch_key)
        if recorded is None:
            columns = domain.check_payout_columns(position_ids, user_ids, amounts, asset) if n else domain.PayoutColumns("", "", "", None, {})
            from_hours = list(batch.from_hours)
            if columns.kept is not None:
                from_hours = [from_hours[i] for i in columns.kept]
            recorded = await store.record_payout_batch(
                self.pool, job=job, period=period, payout=await self._payout_id(job, period), partition=batch.partition,
                sequence=batch.sequence, last=batch.last,
                product_id=product_id, asset=asset, boundary_hour=batch.boundary_hour, digest=digest, at=self.settings.clock.now(),
                consumer=domain.PAYOUT_CONSUMER, event_id=env.event_id, position_ids=columns.position_ids, user_ids=columns.user_ids,
                amounts=columns.amounts, from_hours=from_hours, sent=columns.kept, excluded=sorted(columns.problems),
                problems="\n".join(columns.problems[i] for i in sorted(columns.problems)) or None,
            )
            if recorded is None:  # recorded meanwhile by a concurrent delivery
                recorded = await store.payout_batch(self.pool, *batch_key)
                if recorded is None:
                    log.error("payout event applied before, but its batch is not recorded", extra={"event_id": env.event_id, "job": job, "period": period})
                    return "duplicate"
        if recorded.digest and recorded.digest != digest:
            raise InvalidArgument(
                "sequence",
                f"batch {job} {period} partition {batch.partition} sequence {batch.sequence} was delivered before with other items;"
                " it is paid as first delivered and this delivery pays nothing",
            )
        if recorded.posted:
            return "duplicate"

        keep = None if not recorded.excluded else [i for i in range(n) if i not in recorded.excluded]
        posting_id = None
        if recorded.items:
            owners, values = domain.bulk_credits(user_ids, amounts, keep)
            request = wallet_pb2.BulkCreditRequest(
                idempotency_key=derived_key("payout", *batch_key), asset=asset,
                source=wallet_pb2.AccountRef(owner=HOLDER, kind=wallet_pb2.ACCOUNT_KIND_EXPENSE),
                reference=f"simple_earn:interest:{product_id}:{period}",
            )
            request.owners.extend(owners)
            request.amounts.extend(values)
            posting_id = (await self.wallet.call("BulkCredit", request)).posting_id
        holds = await self._reinvestment_holds(job, period, asset, recorded, position_ids, user_ids, amounts)
        posted, reinvested, abandoned = await self._post_batch(batch_key, product_id, posting_id, holds)
        if posted:
            metrics.amount(metrics.INTEREST_PAID, product_id, asset, recorded.paid)
            for value in reinvested:
                metrics.amount(metrics.SUBSCRIBED, product_id, asset, value)
            if recorded.problems:
                log.error("payout items left out", extra={"job": job, "period": period, "partition": batch.partition, "sequence": batch.sequence, "problems": recorded.problems[:2000]})
        if skipped is not None and recorded.problems:
            skipped.extend(recorded.problems.split("\n"))
        if abandoned:
            await self.drive_releases()
        return "paid" if posted else "duplicate"

    async def _reinvestment_holds(
        self, job: str, period: str, asset: str, recorded: store.RecordedBatch, position_ids: list[str], user_ids: list[str], amounts: list[str]
    ) -> dict[int, tuple[int, Decimal]]:
        """Hold the paid interest of the positions decided to reinvest (the decision was
        recorded with the batch, before any wallet call): position -> (hold id, amount).
        Keys are derived from (job, period, position), so a redelivery gets the same holds.
        A hold the wallet refuses (the user spent the interest meanwhile) is skipped."""
        if not recorded.reinvest:
            return {}
        wanted = {str(p) for p in recorded.reinvest}
        where = {pid: i for i, pid in enumerate(position_ids) if pid in wanted and i not in recorded.excluded}

        async def place(position_id: int) -> tuple[int, tuple[int, Decimal]] | None:
            i = where[str(position_id)]
            try:
                reply = await self.wallet.call(
                    "PlaceHold",
                    wallet_pb2.PlaceHoldRequest(
                        idempotency_key=derived_key("reinvest", job, period, position_id), owner=user_ids[i], asset=asset,
                        amount=amounts[i], holder=HOLDER, reference=f"simple_earn:reinvest:{position_id}",
                    ),
                )
            except FailedPrecondition as err:
                log.warning("reinvestment skipped", extra={"position": position_id, "error": err.message})
                return None
            return position_id, (int(reply.hold.hold_id), Decimal(amounts[i]))

        holds: dict[int, tuple[int, Decimal]] = {}
        ordered = list(recorded.reinvest)
        for start in range(0, len(ordered), REINVEST_CONCURRENCY):
            for placed in await asyncio.gather(*(place(p) for p in ordered[start:start + REINVEST_CONCURRENCY])):
                if placed is not None:
                    holds[placed[0]] = placed[1]
        return holds

    async def _post_batch(
        self, batch_key: tuple[str, str, int, int], product_id: str, posting_id: str | None, holds: dict[int, tuple[int, Decimal]]
    ) -> tuple[bool, list[Decimal], bool]:
        """The wallet confirmed the batch's credit: mark it posted and reinvest. Returns
        (posted now, amounts reinvested, holds abandoned). Once per batch: the batch row's
        update decides, so a concurrent delivery reinvests nothing twice."""
        if not holds:
            posted = await store.post_payout_batch(self.pool, *batch_key, posting_id, self.settings.clock.now())
            return posted, [], False
        reinvested: list[Decimal] = []
        abandoned = False
        job, period = batch_key[0], batch_key[1]
        payout = await self._payout_id(job, period)
        async with self.pool.acquire() as conn, conn.transaction():
            at = await store.accrual_clock(conn, self.settings.clock)
            await store.get_product(conn, product_id, lock=True)  # products before positions, like every writer
            if not await store.post_payout_batch(conn, *batch_key, posting_id, at):
                return False, [], False
            effective = domain.next_full_hour(at)
            outgoing = []
            for position_id in sorted(holds):
                hold_id, amount = holds[position_id]
                current = await store.get_position(conn, position_id, None, lock=True)
                if current["status"] == PositionStatus.ACTIVE and await store.claim_hold(conn, hold_id, position_id, amount, at):
                    await store.mark_reinvested(conn, payout, position_id)
                    await store.add_principal(conn, position_id, product_id, amount, effective, at)
                    await store.insert_subscription(conn, position_id, current["user_id"], product_id, amount, "auto_subscribe", hold_id, at)
                    outgoing.append(store.position_changed(current, [(effective, amount)]))
                    reinvested.append(amount)
                else:
                    abandoned |= await store.abandon_hold(conn, hold_id, amount, f"reinvest {job} {period}: position {position_id} not reinvestable")
            if outgoing:
                await outbox.enqueue(conn, self.settings, store.PRODUCER, at, outgoing)
        return True, reinvested, abandoned

    # ---- fixed-term maturity ---------------------------------------------------------

    async def MatureDue(self, request: simple_earn_pb2.MatureDueRequest, context: grpc.aio.ServicerContext) -> simple_earn_pb2.MatureDueResponse:
        until = timestamp_field(request, "until")
        if until > self.settings.clock.now():
            raise InvalidArgument("until", "must not be in the future")
        matured = renewed = 0
        for position_id in await store.due_positions(self.pool, domain.unix_hour(until)):
            outcome = await self._mature(position_id)
            matured += outcome in ("matured", "renewed")
            renewed += outcome == "renewed"
        return simple_earn_pb2.MatureDueResponse(matured=matured, renewed=renewed)

    async def _mature(self, position_id: int) -> str:
        """Pay a fixed-term position at maturity: interest = principal x locked tiers x
        hours(accrual start .. maturity) / 8760, truncated to the asset's scale, from the
        simple_earn EXPENSE account to the user's funding; the principal holds released.

        Auto-renew (decided by the position's own flag only, so a repeat after a crash takes
        the same path): the interest is paid to funding and the principal released, then
        one hold of principal + interest is placed for the new position, which accrues from
        the old maturity on (no gap) with the product's tiers. If that hold cannot be placed
        (the user spent the funds in between), the position simply matures.

        Every wallet call has a key derived from the position id and comes before the
        record transaction: after a crash the next MatureDue repeats them harmlessly and
        records. A position is matured once (row lock and status check).
        """
        row = await store.get_position(self.pool, position_id, None)
        if row["status"] != PositionStatus.ACTIVE:
            return "skipped"
        tiers = store.tiers_from_json(row["fixed_tiers"])
        principal: Decimal = row["principal"]
        interest = domain.fixed_interest(principal, tiers, row["matures_hour"] - row["accrues_from_hour"], row["asset"])
        holds = await store.position_holds(self.pool, position_id)
        user, asset = row["user_id"], row["asset"]
        if interest > 0:
            await self.wallet.call(
                "Transfer",
                wallet_pb2.TransferRequest(
                    idempotency_key=derived_key("mature", position_id, "interest"),
                    transfer=wallet_pb2.TransferSpec(
                        asset=asset,
                        source=wallet_pb2.AccountRef(owner=HOLDER, kind=wallet_pb2.ACCOUNT_KIND_EXPENSE),
                        destination=wallet_pb2.AccountRef(owner=user, kind=wallet_pb2.ACCOUNT_KIND_FUNDING),
                        amount=format_amount(interest),
                        reference=f"simple_earn:maturity:{position_id}",
                    ),
                ),
            )
        for hold_id, remaining in holds:
            await self.wallet.call(
                "ReleaseHold",
                wallet_pb2.ReleaseHoldRequest(idempotency_key=derived_key("mature", position_id, "release", hold_id), hold_id=str(hold_id), amount=format_amount(remaining)),
            )
        new_hold: int | None = None
        renewal = principal + interest
        if row["auto_renew"]:
            try:
                reply = await self.wallet.call(
                    "PlaceHold",
                    wallet_pb2.PlaceHoldRequest(
                        idempotency_key=derived_key("mature", position_id, "renew"), owner=user, asset=asset,
                        amount=format_amount(renewal), holder=HOLDER, reference=f"simple_earn:renew:{position_id}",
                    ),
                )
                new_hold = int(reply.hold.hold_id)
            except FailedPrecondition as err:
                log.warning("auto-renew skipped", extra={"position": position_id, "error": err.message})

        outcome = await self._record_maturity(row, interest, holds, new_hold, renewal)
        if outcome != "skipped":
            metrics.amount(metrics.INTEREST_PAID, row["product_id"], asset, interest)
            if outcome == "renewed":
                metrics.amount(metrics.SUBSCRIBED, row["product_id"], asset, renewal)
            else:
                metrics.amount(metrics.REDEEMED, row["product_id"], asset, principal)
        return outcome

    async def _record_maturity(
        self, row: asyncpg.Record, interest: Decimal, holds: list[tuple[int, Decimal]], new_hold: int | None, renewal: Decimal
    ) -> str:
        """The record transaction of :meth:`_mature`: "matured", "renewed" or "skipped"."""
        position_id, user, principal = row["id"], row["user_id"], row["principal"]
        async with self.pool.acquire() as conn, conn.transaction():
            at = self.settings.clock.now()
            p = await store.get_product(conn, row["product_id"], lock=True)
            current = await store.get_position(conn, position_id, None, lock=True)
            if current["status"] != PositionStatus.ACTIVE:
                return "skipped"
            await store.insert_maturity_interest(
                conn, position_id=position_id, amount=interest, from_hour=current["accrues_from_hour"], to_hour=current["matures_hour"],
                reinvested=new_hold is not None, at=at,
            )
            for hold_id, remaining in holds:
                await store.reduce_hold(conn, hold_id, remaining)
            await store.add_principal(conn, position_id, p.product_id, -principal, current["matures_hour"], at)
            await store.close_position(conn, position_id, PositionStatus.MATURED, current["matures_hour"], at)
            if new_hold is None:
                await store.insert_redemption(conn, current, principal, "maturity", False, at)
                return "matured"
            start = current["matures_hour"]
            new_id = await store.insert_position(
                conn, user_id=user, product=p, auto_subscribe=False, auto_renew=True, fixed_tiers=p.tiers,
                accrues_from_hour=start, matures_hour=domain.maturity_hour(start, p.term_days), at=at, renewed_from=position_id,
            )
            if not await store.claim_hold(conn, new_hold, new_id, renewal, at):
                raise RuntimeError(f"renewal hold {new_hold} of position {position_id} was abandoned")
            await store.add_principal(conn, new_id, p.product_id, renewal, start, at)
            await store.insert_subscription(conn, new_id, user, p.product_id, renewal, "auto_renew", new_hold, at)
            return "renewed"

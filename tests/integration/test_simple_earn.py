"""Simple Earn through gRPC: real wallet and simple_earn processes, real PostgreSQL and Kafka."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from earn.v1 import accrual_pb2, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec
from services.kernel import events, idempotency
from services.kernel.clock import set_time
from services.kernel.config import Settings
from services.kernel.money import EXACT, truncate
from services.kernel.topics import topic_name
from tests.conftest import eventually, GATEWAY, OPERATOR, SERVICE, unique

FUNDING = wallet_pb2.ACCOUNT_KIND_FUNDING
HOLD = wallet_pb2.ACCOUNT_KIND_HOLD
EXPENSE = wallet_pb2.ACCOUNT_KIND_EXPENSE
FLEX = se.PRODUCT_KIND_FLEXIBLE
FIXED = se.PRODUCT_KIND_FIXED


@pytest.fixture(scope="module")
async def earn(earn_process: ManagedProcess) -> AsyncIterator[simple_earn_pb2_grpc.SimpleEarnServiceStub]:
    async with grpcclient.channel(earn_process.address) as channel:
        yield simple_earn_pb2_grpc.SimpleEarnServiceStub(channel)


@pytest.fixture(scope="module")
def wallet(wallet_channel: grpc.aio.Channel) -> wallet_pb2_grpc.WalletServiceStub:
    return wallet_pb2_grpc.WalletServiceStub(wallet_channel)


@pytest.fixture(scope="module")
async def earn_db(stack, earn_process: ManagedProcess) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack.settings.database_url, server_settings={"search_path": "simple_earn"}, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


TABLES = (
    "products", "rate_history", "positions", "principal_changes", "position_holds", "abandoned_holds", "subscriptions",
    "redemptions", "wallet_releases", "closed_hours", "payout_requests", "payout_batches", "payout_partitions", "interest",
    "idempotency_keys", "dead_letters",
)


async def snapshot(earn_db: asyncpg.Pool, wallet_db: asyncpg.Pool) -> tuple:
    """Everything a write could change, here and in the wallet."""
    mine = [await earn_db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES]
    mine.append(await earn_db.fetchval("SELECT coalesce(sum(principal), 0) FROM positions"))
    mine.append(await earn_db.fetchval("SELECT coalesce(sum(subscribed), 0) FROM products"))
    theirs = await wallet_db.fetchrow("SELECT (SELECT count(*) FROM postings), (SELECT coalesce(sum(remaining), 0) FROM holds)")
    return (*mine, *theirs)


async def deposit(wallet, owner: str, amount: str, asset: str = "BTC") -> None:
    await wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique("dep"), owner=owner, asset=asset, amount=amount), metadata=OPERATOR)


async def balance(wallet, owner: str, kind: int = FUNDING, asset: str = "BTC") -> Decimal:
    reply = await wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=owner, asset=asset), metadata=GATEWAY)
    return sum((Decimal(b.balance) for b in reply.balances if b.kind == kind), Decimal(0))


def tiers(*pairs: tuple[str, str]) -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to=u, apr=a) for u, a in pairs]


TIERS = tiers(("5", "0.08"), ("", "0.03"))


async def create(earn, kind: int = FLEX, **fields) -> se.Product:
    request = se.CreateProductRequest(
        idempotency_key=unique(), product_id=fields.pop("product_id", unique("p")), asset=fields.pop("asset", "BTC"), kind=kind,
        tiers=fields.pop("tiers", TIERS), min_subscription=fields.pop("min_subscription", "0.001"), **fields,
    )
    return (await earn.CreateProduct(request, metadata=OPERATOR)).product


async def subscribe(earn, user: str, product_id: str, amount: str, **fields) -> se.SubscribeResponse:
    return await earn.Subscribe(
        se.SubscribeRequest(idempotency_key=fields.pop("key", unique()), user_id=user, product_id=product_id, amount=amount, **fields),
        metadata=GATEWAY,
    )


async def redeem(earn, user: str, position_id: str, amount: str = "", key: str | None = None) -> se.RedeemResponse:
    return await earn.Redeem(se.RedeemRequest(idempotency_key=key or unique(), user_id=user, position_id=position_id, amount=amount), metadata=GATEWAY)


async def read_accrual(stack, until: Callable[[list[tuple[int, int, str, object]]], bool], timeout: float = 30) -> list[tuple[int, int, str, object]]:
    """Every event of simple_earn.accrual from the start, as (partition, offset, type, payload)."""
    topic = topic_name(stack.settings, "simple_earn.accrual")
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, int, str, object]] = []
    types = {m.DESCRIPTOR.full_name: m for m in (accrual_pb2.PositionChanged, accrual_pb2.ProductRatesSet, accrual_pb2.HourClosed, accrual_pb2.PayoutRequested)}
    try:
        partitions = [TopicPartition(topic, p) for p in range(6)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        while not until(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"accrual events incomplete: {len(out)} read")
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for r in records:
                    env = events.parse(r.value)
                    out.append((tp.partition, r.offset, env.type, events.unwrap(env, types[env.type])))
    finally:
        await consumer.stop()
    return out


def now_hour() -> int:
    return int(time.time()) // 3600


async def expect(code: grpc.StatusCode, call, *words: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in (err.value.details() or ""), err.value.details()
    return err.value.details() or ""


# ---- products -----------------------------------------------------------------------


async def test_create_product_publishes_rates_and_refuses_bad_input(stack, earn, earn_db, wallet_db) -> None:
    p = await create(earn, quota="100", max_per_user="10")
    assert p.status == se.PRODUCT_STATUS_ACTIVE and p.left_quota == "100" and p.payout_cadence == se.PAYOUT_CADENCE_DAILY
    assert [(t.up_to, t.apr) for t in p.tiers] == [("5", "0.08"), ("", "0.03")]
    history = await earn.ListRateHistory(se.ListRateHistoryRequest(product_id=p.product_id), metadata=GATEWAY)
    effective = history.changes[0].effective_hour
    assert len(history.changes) == 1 and effective == history.changes[0].changed_at.seconds // 3600 + 1

    rates = await earn.SetProductRates(se.SetProductRatesRequest(idempotency_key=unique(), product_id=p.product_id, tiers=tiers(("", "0.05"))), metadata=OPERATOR)
    assert rates.effective_hour >= effective and [t.apr for t in rates.product.tiers] == ["0.05"]
    events_seen = await read_accrual(
        stack, lambda evs: len([e for e in evs if e[2] == "earn.v1.ProductRatesSet" and e[3].product_id == p.product_id]) == 12
    )
    per_partition = {e[0] for e in events_seen if e[2] == "earn.v1.ProductRatesSet" and e[3].product_id == p.product_id}
    assert per_partition == set(range(6))

    before = await snapshot(earn_db, wallet_db)
    good = dict(idempotency_key=unique(), product_id=unique("p"), asset="BTC", kind=FLEX, tiers=TIERS, min_subscription="1")
    bad = [
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"product_id": "bad id"}, "product_id"),
        ({"asset": "NOPE"}, "asset"),
        ({"kind": se.PRODUCT_KIND_UNSPECIFIED}, "kind"),
        ({"tiers": tiers(("5", "0.08"))}, "tiers[0].up_to"),
        ({"tiers": tiers(("5", "0.08"), ("3", "0.01"), ("", "0"))}, "tiers[1].up_to"),
        ({"tiers": tiers(("", "-1"))}, "tiers[0].apr"),
        ({"min_subscription": "0.000000001"}, "min_subscription"),
        ({"min_subscription": "0"}, "min_subscription"),
        ({"max_per_user": "0.5"}, "max_per_user"),
        ({"quota": "1e3"}, "quota"),
        ({"term_days": 30}, "term_days"),
        ({"kind": FIXED, "term_days": 0}, "term_days"),
        ({"kind": FIXED, "term_days": 7, "payout_cadence": se.PAYOUT_CADENCE_HOURLY}, "payout_cadence"),
        ({"early_redeem_allowed": True}, "early_redeem_allowed"),
    ]
    for override, field in bad:
        await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.CreateProduct(se.CreateProductRequest(**{**good, **override}), metadata=OPERATOR), field)
    await expect(grpc.StatusCode.ALREADY_EXISTS, earn.CreateProduct(se.CreateProductRequest(**{**good, "product_id": p.product_id}), metadata=OPERATOR), "product_id")
    await expect(grpc.StatusCode.PERMISSION_DENIED, earn.CreateProduct(se.CreateProductRequest(**good), metadata=GATEWAY))
    await expect(grpc.StatusCode.UNAUTHENTICATED, earn.GetProduct(se.GetProductRequest(product_id=p.product_id)))
    await expect(grpc.StatusCode.NOT_FOUND, earn.GetProduct(se.GetProductRequest(product_id="missing"), metadata=GATEWAY), "product_id")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        earn.UpdateProduct(se.UpdateProductRequest(idempotency_key=unique(), product_id=p.product_id, quota="-1"), metadata=OPERATOR),
        "quota",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        earn.UpdateProduct(se.UpdateProductRequest(idempotency_key=unique(), product_id=p.product_id), metadata=OPERATOR),
        "nothing to update",
    )
    await expect(
        grpc.StatusCode.NOT_FOUND,
        earn.UpdateProduct(se.UpdateProductRequest(idempotency_key=unique(), product_id="missing", quota="1"), metadata=OPERATOR),
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        earn.SetProductRates(se.SetProductRatesRequest(idempotency_key=unique(), product_id=p.product_id, tiers=[]), metadata=OPERATOR),
        "tiers",
    )
    fixed = await create(earn, FIXED, term_days=7)
    before = await snapshot(earn_db, wallet_db)
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        earn.SetProductRates(se.SetProductRatesRequest(idempotency_key=unique(), product_id=fixed.product_id, tiers=TIERS), metadata=OPERATOR),
        "fixed-term",
    )
    assert await snapshot(earn_db, wallet_db) == before


# ---- subscribe / redeem -------------------------------------------------------------


async def test_flexible_subscribe_and_redeem_move_funds_and_publish_changes(stack, earn, wallet) -> None:
    p = await create(earn)
    user = unique("u")
    await deposit(wallet, user, "10")
    key = unique()
    first = await subscribe(earn, user, p.product_id, "3", key=key, auto_subscribe=True)
    again = await subscribe(earn, user, p.product_id, "3", key=key, auto_subscribe=True)
    assert again == first  # the retry returns the first result and moves nothing
    await expect(grpc.StatusCode.ALREADY_EXISTS, subscribe(earn, user, p.product_id, "4", key=key, auto_subscribe=True), "idempotency_key")
    second = await subscribe(earn, user, p.product_id, "2")
    position = second.position
    assert position.position_id == first.position.position_id and position.principal == "5" and position.auto_subscribe
    assert second.accrues_from_hour == first.accrues_from_hour or second.accrues_from_hour == first.accrues_from_hour + 1
    assert await balance(wallet, user) == 5 and await balance(wallet, user, HOLD) == 5

    partial = await redeem(earn, user, position.position_id, "1.5")
    assert partial.position.principal == "3.5" and not partial.interest_forfeited
    assert await balance(wallet, user) == Decimal("6.5") and await balance(wallet, user, HOLD) == Decimal("3.5")
    full = await redeem(earn, user, position.position_id)
    assert full.position.principal == "0" and full.position.status == se.POSITION_STATUS_REDEEMED
    await eventually(lambda: balance(wallet, user))
    assert await balance(wallet, user) == 10 and await balance(wallet, user, HOLD) == 0
    product = (await earn.GetProduct(se.GetProductRequest(product_id=p.product_id), metadata=GATEWAY)).product
    assert product.subscribed == "0"

    def done(evs: list) -> bool:
        return len([e for e in evs if e[2] == "earn.v1.PositionChanged" and e[3].position_id == position.position_id]) == 4

    changes = [e[3] for e in await read_accrual(stack, done) if e[2] == "earn.v1.PositionChanged" and e[3].position_id == position.position_id]
    hour = first.accrues_from_hour
    signed = [(c.effective_hour, Decimal(c.delta)) for ch in changes for c in ch.changes]
    assert signed[:2] == [(hour, Decimal(3)), (second.accrues_from_hour, Decimal(2))]
    assert sum(d for _, d in signed) == 0
    assert changes[-1].closed_from_hour in (hour - 1, hour)
    if second.accrues_from_hour == hour:  # same hour: everything redeemed was still pending
        assert signed[2:] == [(hour, Decimal("-1.5")), (hour, Decimal("-3.5"))]

    subs = await earn.ListSubscriptions(se.ListSubscriptionsRequest(user_id=user), metadata=GATEWAY)
    assert [s.amount for s in subs.subscriptions] == ["3", "2"]
    reds = await earn.ListRedemptions(se.ListRedemptionsRequest(user_id=user, page_size=1), metadata=GATEWAY)
    assert [r.amount for r in reds.redemptions] == ["1.5"] and reds.next_page_token
    reds2 = await earn.ListRedemptions(se.ListRedemptionsRequest(user_id=user, page_token=reds.next_page_token), metadata=GATEWAY)
    assert [r.amount for r in reds2.redemptions] == ["3.5"] and not reds2.next_page_token
    # A new subscription after a full redemption opens a new position.
    third = await subscribe(earn, user, p.product_id, "1")
    assert third.position.position_id != position.position_id


async def test_limits_quota_pause_and_funds_refuse_and_write_nothing(earn, wallet, earn_db, wallet_db) -> None:
    p = await create(earn, min_subscription="1", max_per_user="5", quota="8")
    alice, bob, poor = unique("alice"), unique("bob"), unique("poor")
    for u in (alice, bob):
        await deposit(wallet, u, "20")
    await deposit(wallet, poor, "1.5")
    await subscribe(earn, alice, p.product_id, "4")
    before = await snapshot(earn_db, wallet_db)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, subscribe(earn, alice, p.product_id, "0.5"), "min_subscription")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, subscribe(earn, alice, p.product_id, "2"), "1 BTC left for this user")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, subscribe(earn, bob, p.product_id, "5"), "left quota", "4 BTC")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, subscribe(earn, poor, p.product_id, "2"), f"insufficient funds in {poor}/BTC/funding: short by 0.5 BTC")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, subscribe(earn, bob, p.product_id, "1.000000001"), "amount")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, subscribe(earn, "", p.product_id, "1"), "user_id")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, subscribe(earn, bob, p.product_id, "1", auto_renew=True), "auto_renew")
    await expect(grpc.StatusCode.NOT_FOUND, subscribe(earn, bob, "missing", "1"), "product_id")
    await expect(grpc.StatusCode.NOT_FOUND, redeem(earn, bob, "999999999"), "position_id")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, redeem(earn, bob, "abc"), "position_id")
    positions = await earn.ListPositions(se.ListPositionsRequest(user_id=alice, product_id=p.product_id), metadata=GATEWAY)
    mine = positions.positions[0].position_id
    # Another user's position is NOT_FOUND, like an unknown one.
    await expect(grpc.StatusCode.NOT_FOUND, redeem(earn, bob, mine), "position_id")
    await expect(grpc.StatusCode.FAILED_PRECONDITION, redeem(earn, alice, mine, "4.1"), "exceeds")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.ListPositions(se.ListPositionsRequest(), metadata=GATEWAY), "user_id")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.ListPositions(se.ListPositionsRequest(user_id=alice, page_size=1001), metadata=GATEWAY), "page_size")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.ListPositions(se.ListPositionsRequest(user_id=alice, page_token="zz"), metadata=GATEWAY), "page_token")
    assert await snapshot(earn_db, wallet_db) == before

    await earn.UpdateProduct(se.UpdateProductRequest(idempotency_key=unique(), product_id=p.product_id, status=se.PRODUCT_STATUS_PAUSED), metadata=OPERATOR)
    before = await snapshot(earn_db, wallet_db)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, subscribe(earn, bob, p.product_id, "1"), f"product {p.product_id} is paused")
    assert await snapshot(earn_db, wallet_db) == before
    # Redemption works while paused; then resume with a bigger quota.
    await redeem(earn, alice, mine, "1")
    updated = await earn.UpdateProduct(
        se.UpdateProductRequest(idempotency_key=unique(), product_id=p.product_id, status=se.PRODUCT_STATUS_ACTIVE, quota="10"), metadata=OPERATOR
    )
    assert updated.product.left_quota == "7" and updated.product.subscribed == "3"
    await subscribe(earn, bob, p.product_id, "5")
    assert await balance(wallet, bob) == 15


async def test_quota_race_releases_the_losers_holds(earn, wallet, earn_db, wallet_db) -> None:
    p = await create(earn, min_subscription="1", quota="3")
    users = [unique("racer") for _ in range(6)]
    for u in users:
        await deposit(wallet, u, "2")
    keys = {u: unique() for u in users}
    results = await asyncio.gather(*(subscribe(earn, u, p.product_id, "1", key=keys[u]) for u in users), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 3 and len(refused) == 3
    assert all(r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in refused)

    async def settled() -> None:
        balances = [await balance(wallet, u) for u in users]
        assert sorted(balances) == [1, 1, 1, 2, 2, 2]
        assert sum([await balance(wallet, u, HOLD) for u in users]) == 3

    await eventually(settled)
    assert await earn_db.fetchval("SELECT count(*) FROM wallet_releases WHERE done_at IS NULL") == 0

    # The losers retry with their keys once there is room: a hold released by the first
    # attempt is never used again, the retry places the next one (the client sees none of it).
    losers = [u for u, r in zip(users, results) if isinstance(r, BaseException)]
    await earn.UpdateProduct(se.UpdateProductRequest(idempotency_key=unique(), product_id=p.product_id, status=se.PRODUCT_STATUS_ACTIVE, quota="6"), metadata=OPERATOR)
    retried = await asyncio.gather(*(subscribe(earn, u, p.product_id, "1", key=keys[u]) for u in losers))
    assert [r.position.principal for r in retried] == ["1"] * 3
    assert len({r.position.position_id for r in retried}) == 3

    async def all_in() -> None:
        assert [await balance(wallet, u) for u in users] == [1] * 6 and [await balance(wallet, u, HOLD) for u in users] == [1] * 6

    await eventually(all_in)
    claimed = await earn_db.fetch(
        "SELECT h.hold_id, a.hold_id IS NOT NULL AS abandoned FROM position_holds h JOIN positions x ON x.id = h.position_id"
        " LEFT JOIN abandoned_holds a ON a.hold_id = h.hold_id WHERE x.product_id = $1", p.product_id,
    )
    assert len(claimed) == 6 and not any(r["abandoned"] for r in claimed)


async def test_a_retry_whose_first_hold_was_abandoned_places_the_next_one(earn, wallet, earn_db) -> None:
    p = await create(earn)
    user = unique("u")
    await deposit(wallet, user, "5")
    request = se.SubscribeRequest(idempotency_key=unique(), user_id=user, product_id=p.product_id, amount="2")
    # The first attempt placed its hold (the wallet key Subscribe derives), failed after it,
    # and Simple Earn abandoned and released that hold.
    base = hashlib.sha256(request.idempotency_key.encode() + b"\0" + idempotency.fingerprint("Subscribe", request)).hexdigest()[:40]
    first = await wallet.PlaceHold(
        wallet_pb2.PlaceHoldRequest(idempotency_key=f"se:sub:{base}:0", owner=user, asset="BTC", amount="2", holder="simple_earn",
                                   reference=f"simple_earn:subscribe:{p.product_id}"), metadata=SERVICE
    )
    await earn_db.execute("INSERT INTO abandoned_holds (hold_id, reason) VALUES ($1, 'an earlier attempt failed')", int(first.hold.hold_id))
    await wallet.ReleaseHold(wallet_pb2.ReleaseHoldRequest(idempotency_key=unique(), hold_id=first.hold.hold_id, amount="2"), metadata=SERVICE)

    answer = await earn.Subscribe(request, metadata=GATEWAY)
    assert answer.position.principal == "2"
    assert await earn.Subscribe(request, metadata=GATEWAY) == answer
    used = await earn_db.fetch("SELECT h.hold_id FROM position_holds h JOIN positions x ON x.id = h.position_id WHERE x.user_id = $1", user)
    assert [r["hold_id"] for r in used] != [int(first.hold.hold_id)] and len(used) == 1
    assert (await balance(wallet, user), await balance(wallet, user, HOLD)) == (3, 2)


async def test_concurrent_subscribes_of_one_product_record_together_as_if_one_after_another(earn, wallet, earn_db) -> None:
    """A hot product's Subscribes are recorded in batches (group commit): the same result
    as one at a time, every answer the position as it was right after that Subscribe."""
    p = await create(earn, min_subscription="1", max_per_user="12", quota="100")
    busy, newcomer, capped = unique("busy"), unique("new"), unique("capped")
    for u in (busy, newcomer, capped):
        await deposit(wallet, u, "50")
    opened = await subscribe(earn, busy, p.product_id, "2")
    calls = [subscribe(earn, busy, p.product_id, "1", auto_subscribe=(i == 3)) for i in range(6)]
    calls += [subscribe(earn, newcomer, p.product_id, str(i + 1)) for i in range(3)]
    calls += [subscribe(earn, capped, p.product_id, "5") for _ in range(4)]  # at most 12 each: two fit
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 2 and all(r.code() == grpc.StatusCode.FAILED_PRECONDITION and "left for this user" in r.details() for r in refused)
    ok = [r for r in results if not isinstance(r, BaseException)]
    by_user: dict[str, list[se.SubscribeResponse]] = {}
    for r in ok:
        by_user.setdefault(r.position.user_id, []).append(r)
    # One open position per user; the answers step through its principal one Subscribe at a time.
    for user, start, steps in ((busy, Decimal(2), [Decimal(1)] * 6), (newcomer, Decimal(0), None), (capped, Decimal(0), [Decimal(5)] * 2)):
        answers = by_user[user]
        assert len({a.position.position_id for a in answers}) == 1
        principals = sorted(Decimal(a.position.principal) for a in answers)
        if steps is None:  # 1, 2 and 3 in some order: running sums of a permutation
            assert principals[-1] == 6 and len(set(principals)) == 3
        else:
            assert principals == [start + sum(steps[: i + 1]) for i in range(len(steps))]
    assert by_user[busy][0].position.position_id == opened.position.position_id
    assert len({a.subscription_id for a in ok}) == len(ok) == 11
    # The one that asked for auto-subscribe and every answer after it show it on.
    busy_answers = sorted(by_user[busy], key=lambda a: Decimal(a.position.principal))
    flags = [a.position.auto_subscribe for a in busy_answers]
    assert flags == sorted(flags) and flags[-1]

    positions = {
        u: (await earn.ListPositions(se.ListPositionsRequest(user_id=u, product_id=p.product_id), metadata=GATEWAY)).positions
        for u in (busy, newcomer, capped)
    }
    assert [(x.principal, x.auto_subscribe) for x in positions[busy]] == [("8", True)]
    assert [x.principal for x in positions[newcomer]] == ["6"] and [x.principal for x in positions[capped]] == ["10"]
    assert max((a for a in by_user[newcomer]), key=lambda a: Decimal(a.position.principal)).position == positions[newcomer][0]
    product = (await earn.GetProduct(se.GetProductRequest(product_id=p.product_id), metadata=GATEWAY)).product
    assert product.subscribed == "24"
    rows = await earn_db.fetchrow(
        "SELECT (SELECT sum(delta) FROM principal_changes c JOIN positions x ON x.id = c.position_id WHERE x.product_id = $1) AS changes,"
        " (SELECT sum(amount) FROM position_holds h JOIN positions x ON x.id = h.position_id WHERE x.product_id = $1) AS held,"
        " (SELECT count(*) FROM subscriptions WHERE product_id = $1) AS subscriptions,"
        " (SELECT open_positions FROM products WHERE product_id = $1) AS open_positions",
        p.product_id,
    )
    assert (rows["changes"], rows["held"], rows["subscriptions"], rows["open_positions"]) == (24, 24, 12, 3)

    async def settled() -> None:
        assert [await balance(wallet, u) for u in (busy, newcomer, capped)] == [42, 44, 40]
        assert [await balance(wallet, u, HOLD) for u in (busy, newcomer, capped)] == [8, 6, 10]

    await eventually(settled)


async def test_one_key_sent_concurrently_subscribes_once(earn, wallet, earn_db) -> None:
    p = await create(earn)
    user = unique("u")
    await deposit(wallet, user, "10")
    key = unique()
    same = await asyncio.gather(*(subscribe(earn, user, p.product_id, "1", key=key) for _ in range(4)))
    assert all(r == same[0] for r in same)
    other = await asyncio.gather(
        subscribe(earn, user, p.product_id, "2", key=key), subscribe(earn, user, p.product_id, "3", key=key), return_exceptions=True
    )
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.ALREADY_EXISTS for r in other)

    async def settled() -> None:
        assert await balance(wallet, user) == 9 and await balance(wallet, user, HOLD) == 1

    await eventually(settled)
    assert await earn_db.fetchval("SELECT count(*) FROM subscriptions WHERE user_id = $1", user) == 1


async def test_concurrent_redeems_of_one_product_record_together_and_refused_ones_store_nothing(earn, wallet, earn_db) -> None:
    p = await create(earn)
    users = [unique("r") for _ in range(5)]
    positions = {}
    for u in users:
        await deposit(wallet, u, "10")
        positions[u] = (await subscribe(earn, u, p.product_id, "4")).position.position_id
    first, second = users[0], users[1]
    key = unique()
    calls = [redeem(earn, first, positions[first], "1") for _ in range(3)]  # three partial Redeems of one position
    calls += [redeem(earn, second, positions[second], "1", key=key) for _ in range(2)]  # one key sent twice
    calls += [redeem(earn, u, positions[u]) for u in users[2:4]]  # whole
    calls += [redeem(earn, users[4], positions[users[4]], "5"), redeem(earn, users[4], positions[first], "1")]  # too much; not theirs
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, se.RedeemResponse) for r in results[:7])
    assert sorted(r.position.principal for r in results[:3]) == ["1", "2", "3"]
    assert results[3] == results[4]
    assert [r.position.status for r in results[5:7]] == [se.POSITION_STATUS_REDEEMED] * 2
    assert isinstance(results[7], grpc.aio.AioRpcError) and results[7].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(results[8], grpc.aio.AioRpcError) and results[8].code() == grpc.StatusCode.NOT_FOUND
    product = (await earn.GetProduct(se.GetProductRequest(product_id=p.product_id), metadata=GATEWAY)).product
    assert product.subscribed == str(1 + 3 + 0 + 0 + 4)
    assert await earn_db.fetchval("SELECT count(*) FROM redemptions WHERE product_id = $1", p.product_id) == 6

    async def settled() -> None:
        expected = {first: (9, 1), second: (7, 3), users[2]: (10, 0), users[3]: (10, 0), users[4]: (6, 4)}
        for u, (funding, held) in expected.items():
            assert (await balance(wallet, u), await balance(wallet, u, HOLD)) == (funding, held), u

    await eventually(settled)


async def test_concurrent_fixed_term_subscribes_each_open_their_own_position(earn, wallet) -> None:
    p = await create(earn, kind=FIXED, term_days=7)
    user = unique("u")
    await deposit(wallet, user, "10")
    answers = await asyncio.gather(*(subscribe(earn, user, p.product_id, str(i + 1), auto_renew=i % 2 == 0) for i in range(4)))
    assert sorted((a.position.principal, a.position.auto_renew) for a in answers) == [("1", True), ("2", False), ("3", True), ("4", False)]
    assert len({a.position.position_id for a in answers}) == 4
    listed = (await earn.ListPositions(se.ListPositionsRequest(user_id=user, product_id=p.product_id), metadata=GATEWAY)).positions
    assert sorted(x.position_id for x in listed) == sorted(a.position.position_id for a in answers)
    assert {x.position_id: x for x in listed} == {a.position.position_id: a.position for a in answers}


async def test_fixed_early_redemption_allowed_or_forbidden(earn, wallet, earn_db, wallet_db) -> None:
    locked = await create(earn, FIXED, term_days=30)
    loose = await create(earn, FIXED, term_days=30, early_redeem_allowed=True)
    user = unique("u")
    await deposit(wallet, user, "10")
    a = await subscribe(earn, user, locked.product_id, "2", auto_renew=True)
    assert a.position.auto_renew and [t.apr for t in a.position.fixed_tiers] == ["0.08", "0.03"]
    assert a.position.matures_at.seconds == (a.accrues_from_hour + 30 * 24) * 3600
    await expect(grpc.StatusCode.INVALID_ARGUMENT, subscribe(earn, user, locked.product_id, "1", auto_subscribe=True), "auto_subscribe")
    b1 = await subscribe(earn, user, loose.product_id, "3")
    b2 = await subscribe(earn, user, loose.product_id, "1")
    assert b1.position.position_id != b2.position.position_id  # each fixed subscription is its own position
    before = await snapshot(earn_db, wallet_db)
    await expect(grpc.StatusCode.FAILED_PRECONDITION, redeem(earn, user, a.position.position_id), "does not allow early redemption")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, redeem(earn, user, b1.position.position_id, "1"), "redeemed whole")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        earn.SetAutoSubscribe(se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=user, position_id=a.position.position_id, enabled=True), metadata=GATEWAY),
        "fixed-term",
    )
    assert await snapshot(earn_db, wallet_db) == before
    out = await redeem(earn, user, b1.position.position_id)
    assert out.interest_forfeited and out.position.status == se.POSITION_STATUS_REDEEMED
    await eventually(lambda: balance(wallet, user))
    assert await balance(wallet, user) == Decimal(7) and await balance(wallet, user, HOLD) == Decimal(3)


# ---- the accrual watermark and payouts --------------------------------------------------


async def test_close_hour_ticks_every_partition_after_earlier_changes(stack, earn, wallet, earn_db, wallet_db) -> None:
    p = await create(earn)
    user = unique("u")
    await deposit(wallet, user, "1")
    sub = await subscribe(earn, user, p.product_id, "1")
    hour = now_hour()
    await expect(grpc.StatusCode.FAILED_PRECONDITION, earn.CloseHour(se.CloseHourRequest(hour=hour + 1), metadata=SERVICE), "has not ended")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.CloseHour(se.CloseHourRequest(hour=0), metadata=SERVICE), "hour")
    await expect(grpc.StatusCode.PERMISSION_DENIED, earn.CloseHour(se.CloseHourRequest(hour=hour), metadata=GATEWAY))
    first = await earn.CloseHour(se.CloseHourRequest(hour=hour - 3), metadata=SERVICE)
    assert list(first.closed) == [hour - 3]  # the first call closes only its hour
    closed = await earn.CloseHour(se.CloseHourRequest(hour=hour), metadata=SERVICE)
    assert list(closed.closed) == [hour - 2, hour - 1, hour]
    assert list((await earn.CloseHour(se.CloseHourRequest(hour=hour), metadata=SERVICE)).closed) == []
    assert list((await earn.CloseHour(se.CloseHourRequest(hour=hour - 1), metadata=SERVICE)).closed) == []

    def complete(evs: list) -> bool:
        return len([e for e in evs if e[2] == "earn.v1.HourClosed" and e[3].hour == hour]) == 6

    evs = await read_accrual(stack, complete)
    ticks = {}
    for partition, offset, kind, payload in evs:
        if kind == "earn.v1.HourClosed":
            ticks.setdefault(partition, []).append((payload.hour, offset))
    for partition in range(6):
        assert [h for h, _ in ticks[partition]] == [hour - 3, hour - 2, hour - 1, hour]  # in order, once each
    change = next(e for e in evs if e[2] == "earn.v1.PositionChanged" and e[3].position_id == sub.position.position_id)
    assert change[1] < dict(ticks[change[0]])[hour - 3]


async def test_request_payout_is_idempotent_per_job_and_period(stack, earn) -> None:
    hourly = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    job, period, boundary = "simple_earn.interest", f"T{uuid.uuid4().hex[:8]}", now_hour()
    request = se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY)
    first = await earn.RequestPayout(request, metadata=SERVICE)
    assert hourly.product_id in first.product_ids
    assert await earn.RequestPayout(request, metadata=SERVICE) == first
    await expect(
        grpc.StatusCode.ALREADY_EXISTS,
        earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary - 1, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE),
        "boundary_hour",
    )
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary), metadata=SERVICE), "cadence")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.RequestPayout(se.RequestPayoutRequest(job="", period=period, boundary_hour=1, cadence=1), metadata=SERVICE), "job")
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        earn.RequestPayout(se.RequestPayoutRequest(job=job, period="future", boundary_hour=boundary + 2, cadence=1), metadata=SERVICE),
        "boundary_hour",
    )
    await expect(grpc.StatusCode.NOT_FOUND, earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period="nope"), metadata=SERVICE))
    evs = await read_accrual(stack, lambda evs: len([e for e in evs if e[2] == "earn.v1.PayoutRequested" and e[3].period == period]) >= 6)
    mine = [e for e in evs if e[2] == "earn.v1.PayoutRequested" and e[3].period == period]
    assert sorted(e[0] for e in mine) == list(range(6))
    assert all(list(e[3].product_ids) == list(first.product_ids) and e[3].boundary_hour == boundary for e in mine)


def payout_batch(
    job: str, period: str, boundary: int, partition: int, product_id: str = "", *items: tuple[str, str, str, int],
    sequence: int = 0, last: bool = True, asset: str = "BTC",
) -> accrual_pb2.PayoutBatch:
    """A PayoutBatch as the engine emits it: one product, the items in columns, from
    (position id, user id, amount, from hour)."""
    batch = accrual_pb2.PayoutBatch(
        job=job, period=period, boundary_hour=boundary, partition=partition, sequence=sequence, last=last,
        product_id=product_id, asset=asset if items or product_id else "",
    )
    for position_id, user_id, amount, from_hour in items:
        batch.position_ids.append(position_id)
        batch.user_ids.append(user_id)
        batch.amounts.append(amount)
        batch.from_hours.append(from_hour)
    return batch


async def _produce(stack, batch: accrual_pb2.PayoutBatch, envelope: bytes | None = None) -> bytes:
    raw = envelope or events.wrap(batch, key=f"{batch.job}:{batch.period}:{batch.partition}", producer="accrual", occurred_at=datetime.now(UTC)).SerializeToString()
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name(stack.settings, "accrual.payouts"), raw, partition=batch.partition)
    finally:
        await producer.stop()
    return raw


async def test_payout_batch_is_paid_exactly_once_and_reinvests(stack, earn, wallet, earn_db) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    saver, compounder = unique("saver"), unique("comp")
    for u in (saver, compounder):
        await deposit(wallet, u, "10")
    a = (await subscribe(earn, saver, p.product_id, "7")).position
    b = (await subscribe(earn, compounder, p.product_id, "2", auto_subscribe=True)).position
    job, period, boundary = "simple_earn.interest", f"P{uuid.uuid4().hex[:8]}", now_hour()
    await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
    expense_before = await balance(wallet, "simple_earn", EXPENSE)

    batches = [payout_batch(job, period, boundary, q) for q in range(6)]  # the last batch of a partition may be empty
    first = payout_batch(
        job, period, boundary, 1, p.product_id, (a.position_id, saver, "0.00123456", boundary - 24), (b.position_id, compounder, "0.0001", boundary - 24),
        last=False,
    )
    batches[1] = payout_batch(job, period, boundary, 1, sequence=1)  # partition 1's last batch, empty
    # Three deliveries of one batch, applied at once (a partition's batches before its last
    # one are applied a few at a time), then the partition's last batch.
    raw = await _produce(stack, first)
    await _produce(stack, first, raw)  # the same envelope again
    await _produce(stack, first)  # the same batch in a new envelope (engine re-ran)
    await _produce(stack, batches[1])

    async def paid() -> None:
        assert await balance(wallet, saver) == Decimal("3.00123456")
        assert await earn_db.fetchval("SELECT count(*) FROM interest i JOIN payouts o ON o.id = i.payout_id WHERE o.period = $1", period) == 2
        # The batch counts once the wallet confirmed its credit (and the reinvestment is done).
        status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert status.partitions_done == 1

    await eventually(paid)
    status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
    assert (status.partitions, status.partitions_done, status.items, dict(status.paid), status.complete) == (6, 1, 2, {"BTC": "0.00133456"}, False)
    for q in (0, 2, 3, 4, 5):
        await _produce(stack, batches[q])

    async def complete() -> None:
        s = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert s.complete and s.partitions_done == 6

    await eventually(complete)
    await asyncio.sleep(1.5)  # any late duplicate would have been applied by now
    assert await balance(wallet, saver) == Decimal("3.00123456")
    assert await balance(wallet, "simple_earn", EXPENSE) == expense_before - Decimal("0.00133456")
    # The compounder's interest went back into the position.
    assert await balance(wallet, compounder) == 8 and await balance(wallet, compounder, HOLD) == Decimal("2.0001")
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=compounder), metadata=GATEWAY)
    assert listed.positions[0].principal == "2.0001" and listed.positions[0].interest_paid == "0.0001"
    records = await earn.ListInterest(se.ListInterestRequest(user_id=compounder), metadata=GATEWAY)
    assert [(r.amount, r.period, r.reinvested, r.to_hour) for r in records.records] == [("0.0001", period, True, boundary)]
    subs = await earn.ListSubscriptions(se.ListSubscriptionsRequest(user_id=compounder), metadata=GATEWAY)
    assert [(s.amount, s.source) for s in subs.subscriptions] == [("2", "user"), ("0.0001", "auto_subscribe")]
    evs = await read_accrual(stack, lambda evs: len([e for e in evs if e[2] == "earn.v1.PositionChanged" and e[3].position_id == b.position_id]) >= 2)
    reinvested = [e[3] for e in evs if e[2] == "earn.v1.PositionChanged" and e[3].position_id == b.position_id][1]
    assert [c.delta for c in reinvested.changes] == ["0.0001"]


async def test_unreadable_payout_records_are_parked_and_later_batches_still_pay(stack, earn, wallet, earn_db, earn_process) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    user = unique("u")
    await deposit(wallet, user, "1")
    position = (await subscribe(earn, user, p.product_id, "1")).position
    job, period, boundary = "simple_earn.interest", f"D{uuid.uuid4().hex[:8]}", now_hour()
    partition = 3
    topic = topic_name(stack.settings, "accrual.payouts")
    dead_before = await earn_db.fetchval("SELECT count(*) FROM dead_letters")

    garbage = b"\xff\xfe not a protobuf envelope"
    await _produce(stack, accrual_pb2.PayoutBatch(partition=partition), garbage)
    bad_job = accrual_pb2.PayoutBatch(job="bad job!", period=period, boundary_hour=boundary, partition=partition, last=True)
    bad_raw = await _produce(stack, bad_job)
    wrong_type = events.wrap(accrual_pb2.HourClosed(hour=1), key="x", producer="accrual", occurred_at=datetime.now(UTC)).SerializeToString()
    await _produce(stack, accrual_pb2.PayoutBatch(partition=partition), wrong_type)
    # A batch of the format before columns (items in field 7): parked, never taken for an empty batch.
    legacy_env = events.wrap(payout_batch(job, period, boundary, partition, sequence=7), key="x", producer="accrual", occurred_at=datetime.now(UTC))
    legacy_env.payload += bytes([7 << 3 | 2, 2, 10, 0])
    legacy = legacy_env.SerializeToString()
    await _produce(stack, accrual_pb2.PayoutBatch(partition=partition), legacy)

    # Paid in part: the unknown position is parked for a look, the good item is paid.
    good = payout_batch(
        job, period, boundary, partition, p.product_id, (position.position_id, user, "0.00000123", boundary - 1), ("999999999", user, "0.5", boundary - 1)
    )
    good_raw = await _produce(stack, good)

    async def paid() -> None:
        assert await balance(wallet, user) == Decimal("0.00000123")
        assert await earn_db.fetchval("SELECT count(*) FROM dead_letters") == dead_before + 5

    await eventually(paid, timeout=30)
    # A partition's records are applied a few at a time: parked in any order, listed by offset.
    rows = await earn_db.fetch('SELECT topic, "partition", "offset", error, raw FROM dead_letters WHERE "partition" = $1 ORDER BY "offset" DESC LIMIT 5', partition)
    rows = rows[::-1]
    assert [bytes(r["raw"]) for r in rows] == [garbage, bad_raw, wrong_type, legacy, good_raw]
    assert all(r["topic"] == topic and r["partition"] == partition for r in rows)
    offsets = [r["offset"] for r in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    assert "DecodeError" in rows[0]["error"] and "job" in rows[1]["error"] and "HourClosed" in rows[2]["error"]
    assert "field 7" in rows[3]["error"]
    assert "999999999" in rows[4]["error"] and "1 item(s) not paid" in rows[4]["error"]
    recorded = await earn_db.fetch("SELECT position_id, amount FROM interest i JOIN payouts o ON o.id = i.payout_id WHERE o.period = $1", period)
    assert [(str(r["position_id"]), r["amount"]) for r in recorded] == [(position.position_id, Decimal("0.00000123"))]

    samples = await asyncio.to_thread(metric_samples, earn_process)
    assert samples[("earn_simple_earn_dead_letters_total", (("reason", "unreadable"),))] >= 4
    assert samples[("earn_simple_earn_dead_letters_total", (("reason", "items_skipped"),))] >= 1
    assert samples[("earn_simple_earn_payout_batches_total", (("outcome", "dead_letter"),))] >= 4
    assert samples[("earn_simple_earn_interest_paid_total", (("asset", "BTC"), ("product", p.product_id)))] == pytest.approx(0.00000123)


async def test_payout_batch_pays_only_items_that_match_a_position_once_even_when_redelivered(stack, earn, wallet, earn_db, earn_process) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    other = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    alice, bob, carol, dave, eve = (unique(n) for n in ("alice", "bob", "carol", "dave", "eve"))
    for u in (alice, bob, carol, dave, eve):
        await deposit(wallet, u, "1")
    a = (await subscribe(earn, alice, p.product_id, "1")).position
    b = (await subscribe(earn, bob, p.product_id, "1", auto_subscribe=True)).position
    c = (await subscribe(earn, carol, other.product_id, "1")).position
    d = (await subscribe(earn, dave, p.product_id, "1")).position
    e = (await subscribe(earn, eve, p.product_id, "1")).position
    job, period, boundary, partition = "simple_earn.interest", f"M{uuid.uuid4().hex[:8]}", now_hour(), 4
    await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
    expense_before = await balance(wallet, "simple_earn", EXPENSE)
    mallory = unique("mallory")
    batch = payout_batch(
        job, period, boundary, partition, p.product_id,
        (a.position_id, alice, "0.000001", boundary - 24),
        (c.position_id, carol, "0.3", boundary - 24),  # carol's position is of another product
        (d.position_id, mallory, "0.4", boundary - 24),  # dave's position, named for another user
        ("999999998", alice, "0.5", boundary - 24),  # no such position
        (b.position_id, bob, "0.000002", boundary - 24),
        (e.position_id, eve, "0.000000001", boundary - 24),  # more fraction digits than BTC has
        (a.position_id, alice, "0.000001", boundary - 24),  # listed twice
    )
    raw = await _produce(stack, batch)

    async def paid() -> None:
        assert await balance(wallet, alice) == Decimal("0.000001")
        assert await balance(wallet, bob, HOLD) == Decimal("1.000002")  # credited, then reinvested
        assert (await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)).partitions_done == 1
        assert await earn_db.fetchval("SELECT count(*) FROM dead_letters WHERE raw = $1", raw) == 1

    await eventually(paid, timeout=30)
    dead = await earn_db.fetchrow('SELECT error, raw FROM dead_letters WHERE raw = $1', raw)
    assert dead is not None and dead["error"].startswith("5 item(s) not paid")
    for culprit in (c.position_id, d.position_id, "999999998", e.position_id):
        assert culprit in dead["error"]
    assert "listed more than once" in dead["error"] and mallory in dead["error"]

    async def state() -> tuple:
        rows = await earn_db.fetch(
            "SELECT position_id, amount, reinvested FROM interest i JOIN payouts o ON o.id = i.payout_id WHERE o.period = $1 ORDER BY position_id", period
        )
        funds = [await balance(wallet, u, kind) for u in (alice, bob, carol, dave, eve, mallory) for kind in (FUNDING, HOLD)]
        return [(str(r["position_id"]), r["amount"], r["reinvested"]) for r in rows], funds, await balance(wallet, "simple_earn", EXPENSE)

    first = await state()
    assert first[0] == sorted([(a.position_id, Decimal("0.000001"), False), (b.position_id, Decimal("0.000002"), True)], key=lambda r: int(r[0]))
    # (funding, hold) of alice, bob, carol, dave, eve and mallory
    assert first[1] == [Decimal("0.000001"), 1, 0, Decimal("1.000002"), 0, 1, 0, 1, 0, 1, 0, 0]
    assert first[2] == expense_before - Decimal("0.000003")
    status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
    assert (status.partitions_done, status.items, dict(status.paid)) == (1, 2, {"BTC": "0.000003"})
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=alice), metadata=GATEWAY)
    assert [(x.position_id, x.interest_paid) for x in listed.positions] == [(a.position_id, "0.000001")]
    for who, pos in ((carol, c), (dave, d), (eve, e)):
        listed = await earn.ListPositions(se.ListPositionsRequest(user_id=who), metadata=GATEWAY)
        assert [x.interest_paid for x in listed.positions] == ["0"], who
        assert not (await earn.ListInterest(se.ListInterestRequest(user_id=who), metadata=GATEWAY)).records
    records = await earn.ListInterest(se.ListInterestRequest(user_id=bob), metadata=GATEWAY)
    assert [(r.position_id, r.product_id, r.asset, r.amount, r.reinvested) for r in records.records] == [(b.position_id, p.product_id, "BTC", "0.000002", True)]

    # Redelivered: the same envelope, and the same batch in a new envelope. Then the same
    # batch key with other items (parked: paid as first delivered).
    before = await asyncio.to_thread(metric_samples, earn_process)
    duplicates = before.get(("earn_simple_earn_payout_batches_total", (("outcome", "duplicate"),)), 0)
    await _produce(stack, batch, raw)
    await _produce(stack, batch)
    changed = payout_batch(job, period, boundary, partition, p.product_id, (d.position_id, dave, "0.4", boundary - 24))
    changed_raw = await _produce(stack, changed)

    async def seen() -> None:
        samples = await asyncio.to_thread(metric_samples, earn_process)
        assert samples.get(("earn_simple_earn_payout_batches_total", (("outcome", "duplicate"),)), 0) == duplicates + 2
        assert await earn_db.fetchval("SELECT error FROM dead_letters WHERE raw = $1", changed_raw) is not None

    await eventually(seen, timeout=30)
    assert "delivered before with other items" in await earn_db.fetchval("SELECT error FROM dead_letters WHERE raw = $1", changed_raw)
    await asyncio.sleep(1.0)  # the release sweeper and any late duplicate had their chance
    assert await state() == first
    status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
    assert (status.partitions_done, status.items, dict(status.paid)) == (1, 2, {"BTC": "0.000003"})


async def test_a_position_paid_by_one_batch_is_left_out_of_another_batch_of_the_payout(stack, earn, wallet, earn_db) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    ann, ben = unique("ann"), unique("ben")
    for u in (ann, ben):
        await deposit(wallet, u, "1")
    a = (await subscribe(earn, ann, p.product_id, "1")).position
    b = (await subscribe(earn, ben, p.product_id, "1")).position
    job, period, boundary = "simple_earn.interest", f"O{uuid.uuid4().hex[:8]}", now_hour()
    await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
    await _produce(stack, payout_batch(job, period, boundary, 5, p.product_id, (a.position_id, ann, "0.00000011", boundary - 1), last=False))
    # A second batch of the same payout names ann's position again (the engine should
    # never): her item is left out (paid before), ben's is paid.
    second = payout_batch(
        job, period, boundary, 5, p.product_id, (a.position_id, ann, "0.00000011", boundary - 1), (b.position_id, ben, "0.00000022", boundary - 1),
        sequence=1,
    )
    raw = await _produce(stack, second)

    async def paid() -> None:
        status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert (status.partitions_done, status.items, dict(status.paid)) == (1, 2, {"BTC": "0.00000033"})
        assert await earn_db.fetchval("SELECT count(*) FROM dead_letters WHERE raw = $1", raw) == 1

    await eventually(paid)
    assert (await balance(wallet, ann), await balance(wallet, ben)) == (Decimal("0.00000011"), Decimal("0.00000022"))
    error = await earn_db.fetchval("SELECT error FROM dead_letters WHERE raw = $1", raw)
    assert error == f"1 item(s) not paid: position {a.position_id}: paid before by another batch of {job} {period}"


async def test_a_position_paid_in_one_partition_is_left_out_of_a_batch_of_another(stack, earn, wallet, earn_db) -> None:
    # Items are stored per batch (payout_items), not one row per item: the check that a
    # position is paid once per payout looks at every partition's batches, not only its own.
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    ann, ben = unique("ann"), unique("ben")
    for u in (ann, ben):
        await deposit(wallet, u, "1")
    a = (await subscribe(earn, ann, p.product_id, "1")).position
    b = (await subscribe(earn, ben, p.product_id, "1")).position
    job, period, boundary = "simple_earn.interest", f"Q{uuid.uuid4().hex[:8]}", now_hour()
    await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
    await _produce(stack, payout_batch(job, period, boundary, 1, p.product_id, (a.position_id, ann, "0.00000011", boundary - 1)))

    async def first() -> None:
        assert (await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)).partitions_done == 1

    await eventually(first)
    other = payout_batch(
        job, period, boundary, 3, p.product_id, (a.position_id, ann, "0.00000011", boundary - 1), (b.position_id, ben, "0.00000022", boundary - 1),
    )
    raw = await _produce(stack, other)

    async def paid() -> None:
        status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert (status.partitions_done, status.items, dict(status.paid)) == (2, 2, {"BTC": "0.00000033"})
        assert await earn_db.fetchval("SELECT count(*) FROM dead_letters WHERE raw = $1", raw) == 1

    await eventually(paid)
    assert (await balance(wallet, ann), await balance(wallet, ben)) == (Decimal("0.00000011"), Decimal("0.00000022"))
    error = await earn_db.fetchval("SELECT error FROM dead_letters WHERE raw = $1", raw)
    assert error == f"1 item(s) not paid: position {a.position_id}: paid before by another batch of {job} {period}"
    records = await earn.ListInterest(se.ListInterestRequest(user_id=ann), metadata=GATEWAY)
    assert [(r.position_id, r.amount, r.period) for r in records.records] == [(a.position_id, "0.00000011", period)]
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=ann), metadata=GATEWAY)
    assert [x.interest_paid for x in listed.positions] == ["0.00000011"]


async def test_a_user_with_two_positions_in_a_batch_gets_one_credit_of_their_sum(stack, earn, wallet, earn_db) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    user = unique("twice")
    await deposit(wallet, user, "2")
    closed = (await subscribe(earn, user, p.product_id, "1")).position
    await redeem(earn, user, closed.position_id)  # closed, still owed its interest
    await eventually(lambda: balance(wallet, user))
    opened = (await subscribe(earn, user, p.product_id, "1")).position
    assert opened.position_id != closed.position_id
    job, period, boundary = "simple_earn.interest", f"W{uuid.uuid4().hex[:8]}", now_hour()
    await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
    before = await balance(wallet, user)
    # The wallet takes distinct owners only: this pays, only if the two items become one credit.
    await _produce(stack, payout_batch(
        job, period, boundary, 0, p.product_id, (closed.position_id, user, "0.00000005", boundary - 3), (opened.position_id, user, "0.00000007", boundary - 1),
    ))

    async def paid() -> None:
        status = await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert (status.partitions_done, status.items, dict(status.paid)) == (1, 2, {"BTC": "0.00000012"})

    await eventually(paid)
    assert await balance(wallet, user) == before + Decimal("0.00000012")
    records = await earn.ListInterest(se.ListInterestRequest(user_id=user), metadata=GATEWAY)
    assert sorted((r.position_id, r.amount, r.from_hour) for r in records.records) == sorted(
        [(closed.position_id, "0.00000005", boundary - 3), (opened.position_id, "0.00000007", boundary - 1)]
    )
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=user), metadata=GATEWAY)
    assert {x.position_id: x.interest_paid for x in listed.positions} == {closed.position_id: "0.00000005", opened.position_id: "0.00000007"}


async def test_interest_of_everyone_is_listed_once_in_order_page_by_page(stack, earn, wallet, earn_db) -> None:
    p = await create(earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
    users = [unique("lister") for _ in range(3)]
    positions = []
    for u in users:
        await deposit(wallet, u, "1")
        positions.append((await subscribe(earn, u, p.product_id, "1")).position)
    job, boundary = "simple_earn.interest", now_hour()
    periods = [f"L{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for period in periods:
        await earn.RequestPayout(se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY), metadata=SERVICE)
        await _produce(stack, payout_batch(job, period, boundary, 2, p.product_id, *((x.position_id, x.user_id, "0.00000001", boundary - 1) for x in positions)))

    async def paid() -> None:
        for period in periods:
            assert (await earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)).partitions_done == 1

    await eventually(paid)
    seen: list[tuple[str, str]] = []
    request = se.ListInterestRequest(page_size=2)
    while True:  # everyone's records (an operator's listing), two per page
        reply = await earn.ListInterest(request, metadata=OPERATOR)
        seen.extend((r.position_id, r.period) for r in reply.records)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert len(seen) == len(set(seen)) == await earn_db.fetchval("SELECT count(*) FROM interest")
    mine = [x for x in seen if x[1] in periods]
    assert mine == [(x.position_id, period) for period in periods for x in sorted(positions, key=lambda x: int(x.position_id))]
    recent = await earn.ListInterest(se.ListInterestRequest(position_id=positions[0].position_id), metadata=OPERATOR)
    assert [(r.period, r.amount, r.product_id, r.asset) for r in recent.records] == [(period, "0.00000001", p.product_id, "BTC") for period in periods]


# ---- fixed-term maturity ------------------------------------------------------------


async def test_mature_due_pays_exact_interest_once_and_renews(earn, wallet, earn_db) -> None:
    product = await create(earn, FIXED, term_days=2, tiers=tiers(("1", "0.1"), ("", "0.05")))
    plain, renewing = unique("plain"), unique("renew")
    for u in (plain, renewing):
        await deposit(wallet, u, "10")
    a = (await subscribe(earn, plain, product.product_id, "3.5")).position
    b = (await subscribe(earn, renewing, product.product_id, "1.25", auto_renew=True)).position
    # Time travel for the test: the positions started accruing 48 hours before the last full hour.
    end = now_hour()
    await earn_db.execute(
        "UPDATE positions SET accrues_from_hour = $1, matures_hour = $2 WHERE id = ANY($3::bigint[])", end - 48, end, [int(a.position_id), int(b.position_id)]
    )
    await earn_db.execute(
        "UPDATE principal_changes SET effective_hour = $1 WHERE position_id = ANY($2::bigint[])", end - 48, [int(a.position_id), int(b.position_id)]
    )
    future = Timestamp()
    future.FromSeconds(int(time.time()) + 3600)
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.MatureDue(se.MatureDueRequest(until=future), metadata=SERVICE), "until")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, earn.MatureDue(se.MatureDueRequest(), metadata=SERVICE), "until")
    until = Timestamp()
    until.FromSeconds(int(time.time()))
    out = await earn.MatureDue(se.MatureDueRequest(until=until), metadata=SERVICE)
    assert out.matured >= 2 and out.renewed >= 1
    assert (await earn.MatureDue(se.MatureDueRequest(until=until), metadata=SERVICE)).matured == 0

    with localcontext(EXACT):
        expect_a = truncate((1 * Decimal("0.1") + Decimal("2.5") * Decimal("0.05")) * 48 / 8760, 8)
        expect_b = truncate((1 * Decimal("0.1") + Decimal("0.25") * Decimal("0.05")) * 48 / 8760, 8)
    assert expect_a == Decimal("0.00123287")
    assert await balance(wallet, plain) == 10 + expect_a and await balance(wallet, plain, HOLD) == 0
    assert await balance(wallet, renewing) == Decimal("8.75") and await balance(wallet, renewing, HOLD) == Decimal("1.25") + expect_b
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=renewing), metadata=GATEWAY)
    old, new = listed.positions
    assert old.status == se.POSITION_STATUS_MATURED and old.interest_paid == str(expect_b)
    assert new.status == se.POSITION_STATUS_ACTIVE and Decimal(new.principal) == Decimal("1.25") + expect_b and new.auto_renew
    assert new.matures_at.seconds == (end + 48) * 3600
    reds = await earn.ListRedemptions(se.ListRedemptionsRequest(user_id=plain), metadata=GATEWAY)
    assert [(r.amount, r.source) for r in reds.redemptions] == [("3.5", "maturity")]
    hourly = await earn.ListInterest(se.ListInterestRequest(user_id=plain, position_id=a.position_id, hourly=True, page_size=10), metadata=GATEWAY)
    assert len(hourly.records) == 10 and hourly.next_page_token
    with localcontext(EXACT):
        assert Decimal(hourly.records[0].amount) == (1 * Decimal("0.1") + Decimal("2.5") * Decimal("0.05")) / 8760
    rest = await earn.ListInterest(
        se.ListInterestRequest(user_id=plain, position_id=a.position_id, hourly=True, page_size=1000, page_token=hourly.next_page_token), metadata=GATEWAY
    )
    assert len(rest.records) == 38 and not rest.next_page_token
    with localcontext(EXACT):
        assert truncate(sum(Decimal(r.amount) for r in [*hourly.records, *rest.records]), 8) == expect_a


async def test_auto_subscribe_switch_and_bad_queries_write_nothing(earn, wallet, earn_db, wallet_db) -> None:
    p = await create(earn)
    user = unique("u")
    await deposit(wallet, user, "1")
    position = (await subscribe(earn, user, p.product_id, "1")).position
    assert not position.auto_subscribe
    switch = se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=user, position_id=position.position_id, enabled=True)
    assert (await earn.SetAutoSubscribe(switch, metadata=GATEWAY)).position.auto_subscribe
    assert (await earn.SetAutoSubscribe(switch, metadata=GATEWAY)).position.auto_subscribe  # replay
    before = await snapshot(earn_db, wallet_db)
    calls = [
        (grpc.StatusCode.NOT_FOUND, earn.SetAutoSubscribe(se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id="other", position_id=position.position_id), metadata=GATEWAY)),
        (grpc.StatusCode.INVALID_ARGUMENT, earn.SetAutoSubscribe(se.SetAutoSubscribeRequest(idempotency_key="", user_id=user, position_id=position.position_id), metadata=GATEWAY)),
        (grpc.StatusCode.ALREADY_EXISTS, earn.SetAutoSubscribe(se.SetAutoSubscribeRequest(idempotency_key=switch.idempotency_key, user_id=user, position_id=position.position_id), metadata=GATEWAY)),
        (grpc.StatusCode.INVALID_ARGUMENT, earn.ListInterest(se.ListInterestRequest(user_id=user, hourly=True), metadata=GATEWAY)),
        (grpc.StatusCode.INVALID_ARGUMENT, earn.ListProducts(se.ListProductsRequest(asset="NOPE"), metadata=GATEWAY)),
        (grpc.StatusCode.NOT_FOUND, earn.ListRateHistory(se.ListRateHistoryRequest(product_id="missing"), metadata=GATEWAY)),
        (grpc.StatusCode.INVALID_ARGUMENT, earn.GetPayoutStatus(se.GetPayoutStatusRequest(job="", period="x"), metadata=SERVICE)),
        (grpc.StatusCode.PERMISSION_DENIED, earn.GetPayoutStatus(se.GetPayoutStatusRequest(job="j", period="x"), metadata=GATEWAY)),
        (grpc.StatusCode.PERMISSION_DENIED, earn.Subscribe(se.SubscribeRequest(idempotency_key=unique(), user_id=user, product_id=p.product_id, amount="1"), metadata=OPERATOR)),
    ]
    t_from, t_to = Timestamp(), Timestamp()
    t_from.FromSeconds(2000)
    t_to.FromSeconds(1000)
    calls.append((grpc.StatusCode.INVALID_ARGUMENT, earn.ListSubscriptions(se.ListSubscriptionsRequest(user_id=user, time=se.TimeFilter(**{"from": t_from, "to": t_to})), metadata=GATEWAY)))
    for code, call in calls:
        await expect(code, call)
    assert await snapshot(earn_db, wallet_db) == before
    listed = await earn.ListSubscriptions(se.ListSubscriptionsRequest(user_id=user, time=se.TimeFilter(**{"from": t_to})), metadata=GATEWAY)
    assert len(listed.subscriptions) == 1
    products = await earn.ListProducts(se.ListProductsRequest(asset="BTC"), metadata=GATEWAY)
    assert p.product_id in {x.product_id for x in products.products}


# ---- payout preview, business metrics, dead letters ---------------------------------------

ACCRUAL = ProcessSpec("accrual", "services.accrual.main", None, None, "EARN_METRICS_PORT", 9110)
HOURLY_JOB = "simple_earn.interest.hourly"


def metric_samples(proc: ManagedProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The process's /metrics as {(sample name, sorted labels): value}."""
    assert proc.metrics_url
    body = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


@dataclass
class World:
    """Simple Earn with a file clock, its own database and topics, and an accrual engine
    (over the module's wallet): time moves by the test, so interest really accrues."""

    clock: Path
    earn: simple_earn_pb2_grpc.SimpleEarnServiceStub
    db: asyncpg.Pool
    process: ManagedProcess

    def move(self, moment: datetime) -> None:
        set_time(self.clock, moment)


@asynccontextmanager
async def world(stack, wallet_process: ManagedProcess, start: datetime) -> AsyncIterator[World]:
    name = f"w{uuid.uuid4().hex[:6]}"
    settings = Settings(pg_database=f"{stack.settings.pg_database}_{name}", topic_prefix=f"{stack.settings.topic_prefix}{name}.")
    admin = await asyncpg.connect(stack.settings.database_url.rsplit("/", 1)[0] + "/postgres")
    await admin.execute(f'CREATE DATABASE "{settings.pg_database}"')
    clock = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    set_time(clock, start)
    env = {"EARN_PG_DATABASE": settings.pg_database, "EARN_TOPIC_PREFIX": settings.topic_prefix, "EARN_CLOCK_FILE": str(clock)}
    processes: list[ManagedProcess] = []
    pool = None
    try:
        earn_proc = stack.spawn(
            next(spec for spec in PROCESSES if spec.name == "simple_earn"), **env,
            EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_RELEASE_SWEEP_SECONDS="1", EARN_POSITIONS_GAUGE_SECONDS="0.2",
        )
        processes.append(earn_proc)
        earn_proc.start()
        await asyncio.to_thread(earn_proc.wait_ready, 60)
        engine = stack.spawn(ACCRUAL, **env)
        processes.append(engine)
        engine.start()
        pool = await asyncpg.create_pool(settings.database_url, server_settings={"search_path": "simple_earn"}, min_size=1, max_size=4)
        async with grpcclient.channel(earn_proc.address) as channel:
            yield World(clock, simple_earn_pb2_grpc.SimpleEarnServiceStub(channel), pool, earn_proc)
    finally:
        if pool is not None:
            await pool.close()
        for proc in reversed(processes):
            proc.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{settings.pg_database}" WITH (FORCE)')
        await admin.close()


async def preview_all(earn, job: str, period: str, boundary: int, page_size: int = 0) -> tuple[dict[str, se.PayoutPreviewItem], se.PreviewPayoutResponse]:
    """Every item of a payout preview, page by page, and the last page."""
    request = se.PreviewPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY, page_size=page_size)
    items: dict[str, se.PayoutPreviewItem] = {}
    while True:
        reply = await earn.PreviewPayout(request, metadata=OPERATOR)
        for item in reply.items:
            assert item.position_id not in items  # pages never repeat a position
            items[item.position_id] = item
        if not reply.next_page_token:
            return items, reply
        request.page_token = reply.next_page_token


async def pay(w: World, job: str, period: str, boundary: int) -> dict[str, tuple[str, int]]:
    """Close the hours, request the payout, wait for the engine's batches to be paid;
    returns {position: (amount, from_hour)} of the items that paid something."""
    await w.earn.CloseHour(se.CloseHourRequest(hour=boundary), metadata=SERVICE)
    request = se.RequestPayoutRequest(job=job, period=period, boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY)
    await w.earn.RequestPayout(request, metadata=SERVICE)

    async def complete() -> None:
        status = await w.earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=job, period=period), metadata=SERVICE)
        assert status.complete

    await eventually(complete, timeout=180)
    rows = await w.db.fetch(
        "SELECT position_id, amount, from_hour FROM interest i JOIN payouts o ON o.id = i.payout_id WHERE o.job = $1 AND o.period = $2 AND amount > 0", job, period
    )
    return {str(r["position_id"]): (format(r["amount"].normalize(), "f"), r["from_hour"]) for r in rows}


def canonical(amount: str) -> str:
    return format(Decimal(amount).normalize(), "f")


async def test_preview_payout_equals_what_the_engine_then_pays_and_metrics_show_the_workload(stack, wallet, wallet_process) -> None:
    h0 = int(datetime(2030, 6, 1, tzinfo=UTC).timestamp()) // 3600

    def at(hours: int, minutes: int) -> datetime:
        return datetime.fromtimestamp(h0 * 3600, UTC) + timedelta(hours=hours, minutes=minutes)

    async with world(stack, wallet_process, at(0, 20)) as w:
        p = await create(w.earn, payout_cadence=se.PAYOUT_CADENCE_HOURLY)
        daily = await create(w.earn, tiers=tiers(("", "0.05")))
        alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
        for user, amount in ((alice, "20"), (bob, "5"), (carol, "2")):
            await deposit(wallet, user, amount)
        a = (await subscribe(w.earn, alice, p.product_id, "7")).position
        b = (await subscribe(w.earn, bob, p.product_id, "2", auto_subscribe=True)).position
        c = (await subscribe(w.earn, carol, p.product_id, "1")).position
        await subscribe(w.earn, alice, daily.product_id, "3")

        # Hour 2: new rates from hour 3, a partial redemption (stops accruing from hour 2)
        # and a top-up (accrues from hour 3).
        w.move(at(2, 30))
        await w.earn.SetProductRates(
            se.SetProductRatesRequest(idempotency_key=unique(), product_id=p.product_id, tiers=tiers(("2", "0.1"), ("", "0.04"))), metadata=OPERATOR
        )
        await redeem(w.earn, alice, a.position_id, "1.5")
        await subscribe(w.earn, carol, p.product_id, "0.123")

        w.move(at(4, 5))
        boundary = h0 + 4
        before = [await w.db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES]
        items, last = await preview_all(w.earn, HOURLY_JOB, "p1", boundary, page_size=2)
        assert [await w.db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES] == before  # read-only
        assert set(items) == {a.position_id, b.position_id, c.position_id}  # the daily product is not in it
        assert not last.requested and list(last.product_ids) == [p.product_id] and last.positions == 3
        assert not last.unreconciled_position_ids
        # Independently: alice holds 7 in hour 1, then 5.5 from hour 2; rates change at hour 3.
        with localcontext(EXACT):
            exact_a = ((5 * Decimal("0.08") + 2 * Decimal("0.03")) + (5 * Decimal("0.08") + Decimal("0.5") * Decimal("0.03"))
                       + (2 * Decimal("0.1") + Decimal("3.5") * Decimal("0.04"))) / 8760
        assert Decimal(items[a.position_id].amount) == truncate(exact_a, 8)
        assert all(i.from_hour == h0 + 1 and not i.paid for i in items.values())

        paid = await pay(w, HOURLY_JOB, "p1", boundary)
        assert paid == {pid: (canonical(i.amount), i.from_hour) for pid, i in items.items()}
        status = await w.earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=HOURLY_JOB, period="p1"), metadata=SERVICE)
        assert dict(last.totals) == dict(status.paid)
        # Once paid, the preview shows what was recorded.
        again, again_last = await preview_all(w.earn, HOURLY_JOB, "p1", boundary)
        assert again_last.requested and all(i.paid for i in again.values())
        assert {pid: i.amount for pid, i in again.items()} == {pid: i.amount for pid, i in items.items()}

        # Round 2: the carry of the first payout and bob's reinvestment (from hour 5) count.
        w.move(at(7, 10))
        boundary2 = h0 + 7
        items2, last2 = await preview_all(w.earn, HOURLY_JOB, "p2", boundary2, page_size=1)
        assert all(i.from_hour == boundary for i in items2.values()) and not last2.unreconciled_position_ids
        paid2 = await pay(w, HOURLY_JOB, "p2", boundary2)
        assert paid2 == {pid: (canonical(i.amount), i.from_hour) for pid, i in items2.items()}
        status2 = await w.earn.GetPayoutStatus(se.GetPayoutStatusRequest(job=HOURLY_JOB, period="p2"), metadata=SERVICE)
        assert dict(last2.totals) == dict(status2.paid)

        # Business metrics of the workload (a process of its own: the values are exact).
        interest_paid = sum(Decimal(i.amount) for i in (*items.values(), *items2.values()))
        reinvested = Decimal(items[b.position_id].amount) + Decimal(items2[b.position_id].amount)
        product, btc = ("product", p.product_id), ("asset", "BTC")

        async def shown() -> None:
            samples = await asyncio.to_thread(metric_samples, w.process)
            assert samples[("earn_simple_earn_subscribed_total", (btc, product))] == pytest.approx(float(Decimal("10.123") + reinvested))
            assert samples[("earn_simple_earn_subscribed_total", (btc, ("product", daily.product_id)))] == 3
            assert samples[("earn_simple_earn_redeemed_total", (btc, product))] == 1.5
            assert samples[("earn_simple_earn_interest_paid_total", (btc, product))] == pytest.approx(float(interest_paid))
            assert samples[("earn_simple_earn_positions_open", (product,))] == 3
            assert samples[("earn_simple_earn_positions_open", (("product", daily.product_id),))] == 1
            assert samples[("earn_simple_earn_payout_batches_total", (("outcome", "paid"),))] >= 2
            assert not any("user" in dict(labels) for _, labels in samples)  # no user ids in labels

        await eventually(shown)
        await redeem(w.earn, carol, c.position_id)

        async def closed() -> None:
            samples = await asyncio.to_thread(metric_samples, w.process)
            assert samples[("earn_simple_earn_positions_open", (product,))] == 2
            assert samples[("earn_simple_earn_redeemed_total", (btc, product))] == pytest.approx(1.5 + 1.123)

        await eventually(closed)


async def test_preview_payout_refuses_bad_input(earn, earn_db, wallet_db) -> None:
    boundary = now_hour()
    good = dict(job=HOURLY_JOB, period=f"V{uuid.uuid4().hex[:8]}", boundary_hour=boundary, cadence=se.PAYOUT_CADENCE_HOURLY)
    before = await snapshot(earn_db, wallet_db)
    reply = await earn.PreviewPayout(se.PreviewPayoutRequest(**good), metadata=SERVICE)
    assert not reply.requested and not reply.next_page_token
    other_scope = await earn.PreviewPayout(se.PreviewPayoutRequest(**{**good, "page_size": 1}), metadata=SERVICE)
    for override, code, field in [
        ({"job": ""}, grpc.StatusCode.INVALID_ARGUMENT, "job"),
        ({"period": "no spaces"}, grpc.StatusCode.INVALID_ARGUMENT, "period"),
        ({"boundary_hour": 0}, grpc.StatusCode.INVALID_ARGUMENT, "boundary_hour"),
        ({"cadence": se.PAYOUT_CADENCE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "cadence"),
        ({"page_size": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
        ({"page_token": "zz"}, grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ]:
        await expect(code, earn.PreviewPayout(se.PreviewPayoutRequest(**{**good, **override}), metadata=OPERATOR), field)
    if other_scope.next_page_token:  # a token of one preview is refused by another
        await expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            earn.PreviewPayout(se.PreviewPayoutRequest(**{**good, "period": "other", "page_token": other_scope.next_page_token}), metadata=OPERATOR),
            "page_token",
        )
    await expect(grpc.StatusCode.PERMISSION_DENIED, earn.PreviewPayout(se.PreviewPayoutRequest(**good), metadata=GATEWAY))
    assert await snapshot(earn_db, wallet_db) == before
    await earn.RequestPayout(se.RequestPayoutRequest(**good), metadata=SERVICE)
    await expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        earn.PreviewPayout(se.PreviewPayoutRequest(**{**good, "boundary_hour": boundary - 1}), metadata=OPERATOR),
        "was requested with boundary_hour",
    )
    assert (await earn.PreviewPayout(se.PreviewPayoutRequest(**good), metadata=OPERATOR)).requested

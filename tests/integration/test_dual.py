"""Dual Investment subscriptions under concurrency, against live wallet, market and dual
processes: a quota raced by many users is never exceeded, an order id sent twice at once
with different amounts makes one subscription, ten identical retries at once make one;
and no hold is left behind by a request that lost (every user's held balance equals
what their subscriptions hold)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
from services.kernel import grpcclient
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import dual_pb2 as du, dual_pb2_grpc, wallet_pb2 as wp, wallet_pb2_grpc
from services.devstack.processes import ManagedProcess
from tests.conftest import GATEWAY, OPERATOR, eventually, unique


@pytest.fixture(scope="module")
def market_process(stack) -> ManagedProcess:  # type: ignore[no-untyped-def]
    proc = stack.process("market")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dual_process(stack, wallet_process: ManagedProcess, market_process: ManagedProcess) -> ManagedProcess:  # type: ignore[no-untyped-def]
    proc = stack.process("dual", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_MARKET_ADDRESS=market_process.address or "",
                         EARN_RELEASE_SWEEP_SECONDS="1")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def dual(dual_process: ManagedProcess) -> AsyncIterator[dual_pb2_grpc.DualServiceStub]:
    async with grpcclient.channel(dual_process.address) as channel:
        yield dual_pb2_grpc.DualServiceStub(channel)


def settle_in(hours: int) -> Timestamp:
    t = Timestamp()
    now = datetime.now(UTC)
    t.FromDatetime(now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours))
    return t


async def plan(dual: dual_pb2_grpc.DualServiceStub, quota: str, maximum: str = "10") -> str:
    plan_id = unique("dp")
    await dual.CreateDualPlan(du.CreateDualPlanRequest(
        idempotency_key=unique(), plan_id=plan_id, base_asset="BTC", quote_asset="USDT", direction=du.DUAL_DIRECTION_SELL_HIGH, strike="70000",
        apr="0.2", settlement_time=settle_in(24), min_amount="0.01", max_per_user=maximum, quota=quota,
    ), metadata=OPERATOR)
    return plan_id


async def held(wallet: wallet_pb2_grpc.WalletServiceStub, user: str) -> Decimal:
    reply = await wallet.GetBalances(wp.GetBalancesRequest(owner=user, asset="BTC"), metadata=GATEWAY)
    return sum((Decimal(b.balance) for b in reply.balances if b.kind == wp.ACCOUNT_KIND_HOLD), Decimal(0))


async def outcome(call) -> tuple[grpc.StatusCode, object]:  # type: ignore[no-untyped-def]
    try:
        return grpc.StatusCode.OK, await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()


async def test_concurrent_subscriptions_keep_the_quota_and_leave_no_hold(dual, wallet_channel) -> None:  # type: ignore[no-untyped-def]
    wallet = wallet_pb2_grpc.WalletServiceStub(wallet_channel)
    users = [unique(f"u{i}") for i in range(12)]
    for u in users:
        await wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=u, asset="BTC", amount="2"), metadata=OPERATOR)

    # 12 users race for a quota of 1 BTC with 0.3 each: exactly three fit.
    quota_plan = await plan(dual, "1")
    results = await asyncio.gather(*(outcome(dual.SubscribeDual(
        du.SubscribeDualRequest(client_order_id="o-1", user_id=u, plan_id=quota_plan, amount="0.3"), metadata=GATEWAY)) for u in users))
    codes = [c for c, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 3, results
    assert all(c == grpc.StatusCode.FAILED_PRECONDITION and "quota" in str(d) for c, d in results if c != grpc.StatusCode.OK), results
    got = await dual.GetDualPlan(du.GetDualPlanRequest(plan_id=quota_plan), metadata=GATEWAY)
    assert (got.plan.subscribed, got.plan.left_quota) == ("0.9", "0.1")

    # One order id, two different amounts at once: one subscription, the other ALREADY_EXISTS.
    other = await plan(dual, "100")
    u = users[0]
    results = await asyncio.gather(*(outcome(dual.SubscribeDual(
        du.SubscribeDualRequest(client_order_id="same", user_id=u, plan_id=other, amount=a), metadata=GATEWAY)) for a in ("0.11", "0.12")))
    assert sorted(c.name for c, _ in results) == ["ALREADY_EXISTS", "OK"], results
    # Ten identical retries at once: one subscription.
    request = du.SubscribeDualRequest(client_order_id="retry", user_id=users[1], plan_id=other, amount="0.5")
    results = await asyncio.gather(*(outcome(dual.SubscribeDual(request, metadata=GATEWAY)) for _ in range(10)))
    assert {c for c, _ in results} == {grpc.StatusCode.OK} and len({r.subscription.subscription_id for _, r in results}) == 1  # type: ignore[attr-defined]

    async def holds_match() -> None:
        for user in users:
            listed = await dual.ListDualSubscriptions(du.ListDualSubscriptionsRequest(user_id=user), metadata=GATEWAY)
            assert await held(wallet, user) == sum((Decimal(s.amount) for s in listed.subscriptions), Decimal(0)), user

    await eventually(holds_match, timeout=20)

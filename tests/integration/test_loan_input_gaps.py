"""The engine's price forwarder (agent ``loan_prices``: market.prices -> every partition
of loan.ltv) reads what faust's stream skipped through its ``InputGuard``, like the
engine's other agents (tests/integration/test_accrual_input_gaps.py): a tick whose
delivery the stream drops (EARN_DROP_INPUT, as faust may) is forwarded when the next tick
of its partition reveals the gap, or by the watchdog when no tick follows; so the margin
call and the liquidation it causes do not wait for a later tick."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from datetime import UTC
from decimal import Decimal

import grpc
import pytest

from earn.v1 import loan_pb2 as ln, market_pb2 as mk, wallet_pb2 as wp
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.conftest import GATEWAY, OPERATOR, SERVICE, eventually, unique
from tests.integration.test_loan_e2e import HOLD, World, at, world

pytestmark = pytest.mark.integration

PAIR = market_domain.parse_pair("BTC/USDT")


async def tick_on_partition_0(w: World, price: str, minutes: float) -> int:
    """A BTC tick on market.prices partition 0 (the forwarder's offsets are counted there);
    returns its offset once the market has stored it."""
    moment = at(minutes)
    meta = await w.producer.send_and_wait(w.topic, tick_envelope(PAIR, Decimal(price), moment, "exchange", uuid.uuid4()),
                                          key=PAIR.name.encode(), partition=0)

    async def stored() -> None:
        try:
            reply = await w.market.GetIndex(mk.GetIndexRequest(pair="BTC/USDT"), metadata=SERVICE)
        except grpc.aio.AioRpcError as err:
            raise AssertionError(err.details()) from None
        assert reply.event_time.ToDatetime(tzinfo=UTC) >= moment

    await eventually(stored, timeout=30)
    return meta.offset


async def test_ticks_the_forwarders_stream_dropped_still_act(stack) -> None:  # type: ignore[no-untyped-def]
    # market.prices partition 0 of a fresh prefix: 60,000 at offset 0, the margin-call tick
    # at 1 (dropped, revealed by the tick at 2), the crash at 3 (dropped, the last one:
    # the watchdog reads it after 3 s of an idle stream)
    drops = "loan_prices/0:1,loan_prices/0:3"
    async with world(stack, "loangaps", {"EARN_DROP_INPUT": drops, "EARN_STALL_SECONDS": "3"}) as w:
        await w.open_desk("100000")
        await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner="bob", asset="BTC", amount="1"), metadata=OPERATOR)
        assert await tick_on_partition_0(w, "60000", 9) == 0
        # 39,900 on 1 BTC counted 95%: 70%; margin call at 52,500, liquidation at 46,666.67
        bob = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="bob", loan_asset="USDT", amount="39900",
                                                    collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")], term=ln.LOAN_TERM_FLEXIBLE),
                                   metadata=GATEWAY)).loan

        assert await tick_on_partition_0(w, "52400", 11) == 1  # dropped by the stream
        assert await tick_on_partition_0(w, "53000", 12) == 2  # 79.2%: above the re-arm line, no action of its own
        calls = await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL])
        assert calls[0].ltv == str(round(Decimal(39900) / (Decimal(52400) * Decimal("0.95")), 6))

        assert await tick_on_partition_0(w, "45000", 13) == 3  # dropped, and no tick follows
        events = await w.wait_events("bob", bob.loan_id, [ln.LOAN_EVENT_KIND_MARGIN_CALL, ln.LOAN_EVENT_KIND_LIQUIDATION])
        assert Decimal(events[1].sales[0].index_price) == 45000
        assert await w.balance("bob", "BTC", HOLD) == 0

        engine = w.processes["accrual"]
        assert engine.running(), f"engine died; see {engine.logfile}"
        assert engine.metrics_url
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(engine.metrics_url, timeout=5).read().decode())
        for found_by in ("next_message", "stall"):
            assert f'earn_accrual_input_gaps_total{{agent="loan_prices",found_by="{found_by}"}} 1.0' in metrics, found_by

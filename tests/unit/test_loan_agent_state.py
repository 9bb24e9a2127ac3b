"""The loan agent's table: what a restart rebuilds equals what the agent held.

The agent runs here on a dict instead of the faust table (``LoanEngine(None, ...)``) with a
recording output: real envelopes in, the table's records out. A second engine over the
same dict is a restart.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from earn.v1 import loan_pb2
from services.accrual.loan_agent import ARMING_BUCKETS, LoanEngine, arming_bucket
from services.kernel import events
from services.market import domain as market_domain
from services.market.simulator import tick_envelope

START = datetime(2031, 5, 1, 12, tzinfo=UTC)
BTC = market_domain.parse_pair("BTC/USDT")


class Output:
    def __init__(self) -> None:
        self.actions: list[loan_pb2.LoanLtvAction] = []

    async def send(self, *, key: bytes, value: bytes, partition: int) -> None:
        self.actions.extend(events.unwrap(events.parse(value), loan_pb2.LoanActions).actions)


def state(loan_id: str, debt_usdt: int, version: int = 1, open_: bool = True) -> bytes:
    """A USDT loan against 1 BTC: margin call at BTC = debt / 0.8, liquidation at debt / 0.9."""
    msg = loan_pb2.LoanStateChanged(
        loan_id=loan_id, user_id=f"u-{loan_id}", version=version,
        status=loan_pb2.LOAN_STATUS_OPEN if open_ else loan_pb2.LOAN_STATUS_REPAID, loan_asset="USDT",
        principal_units=str(debt_usdt * 10**6), interest_units="0", interest_carry_e10=0, hourly_rate="0.000005", start_hour=10**9,
        charged_through=10**9 - 1, margin_call_ltv="0.8", liquidation_ltv="0.9", rearm_band="0.01", initial_ltv="0.7",
        liquidation_fee="0.02", collateral=[loan_pb2.LoanCollateral(asset="BTC", amount="100000000", discount="1")],
    )
    return events.wrap(msg, key=loan_id, producer="test", occurred_at=START).SerializeToString()


def tick(price: int, seconds: int) -> bytes:
    return tick_envelope(BTC, Decimal(price), START + timedelta(seconds=seconds), "test")


def arming(engine: LoanEngine, partition: int = 0) -> dict[str, tuple[bool, bool, int]]:
    return {loan_id: (w.armed, w.liquidation_sent, w.seq) for loan_id, w in engine.monitor(partition).loans.items()}


def run(engine: LoanEngine, inputs: list[bytes], first_offset: int = 0) -> None:
    async def go() -> None:
        for offset, value in enumerate(inputs, first_offset):
            await engine.apply(0, offset, value)
    asyncio.run(go())


def test_a_restart_rebuilds_every_loans_arming_from_the_buckets() -> None:
    table: dict[str, Any] = {}
    engine = LoanEngine(None, Output(), 6)
    engine.table = table
    # 300 loans with margin-call prices from 50,000 to 79,900 USDT (debt 40,000 to 63,920)
    loans = [f"L{i:03d}" for i in range(300)]
    run(engine, [tick(100_000, 0)] + [state(loan_id, 40_000 + 80 * i) for i, loan_id in enumerate(loans)])
    run(engine, [tick(70_000, 1), tick(78_000, 2), tick(60_000, 3), tick(100_000, 4), tick(65_000, 5)], first_offset=301)
    run(engine, [state(loans[7], 0, version=2, open_=False)], first_offset=306)  # repaid: it leaves the monitor and its bucket
    held = arming(engine)
    assert loans[7] not in held
    assert sum(1 for a in held.values() if a[2] > 0) > 100  # many loans were called and re-armed
    assert any(a[1] for a in held.values())  # some liquidations were sent
    assert {k for k in table if k.startswith("a:")} == set()  # no per-loan arming record
    buckets = [k for k in table if k.startswith("b:0:")]
    assert 0 < len(buckets) <= ARMING_BUCKETS
    assert not any(loans[7] in json.loads(table[k]) for k in buckets)

    restarted = LoanEngine(None, Output(), 6)
    restarted.table = table
    assert arming(restarted) == held
    # the next tick judges both the same way
    before = Output()
    engine.output = before
    after = Output()
    restarted.output = after
    run(engine, [tick(90_000, 6)], first_offset=307)
    run(restarted, [tick(90_000, 6)], first_offset=307)
    assert [(a.loan_id, a.kind, a.seq) for a in before.actions] == [(a.loan_id, a.kind, a.seq) for a in after.actions]
    assert before.actions


def test_per_loan_arming_records_move_into_their_buckets() -> None:
    table: dict[str, Any] = {}
    engine = LoanEngine(None, Output(), 6)
    engine.table = table
    run(engine, [tick(100_000, 0), state("A", 60_000), state("B", 60_000), state("C", 40_000)])
    # as an engine before the buckets kept it: A called once (sequence 1), B called and re-armed (2)
    for key in [k for k in table if k.startswith("b:")]:
        del table[key]
    table["a:0:A"], table["a:0:B"] = "00:1", "10:2"
    table["a:0:gone"] = "00:1"  # a loan no longer open
    restarted = LoanEngine(None, Output(), 6)
    restarted.table = table
    assert arming(restarted) == {"A": (False, False, 1), "B": (True, False, 2), "C": (True, False, 0)}
    assert not [k for k in table if k.startswith("a:")]
    assert json.loads(table[f"b:0:{arming_bucket('A')}"])["A"] == "00:1"
    assert json.loads(table[f"b:0:{arming_bucket('B')}"])["B"] == "10:2"
    again = LoanEngine(None, Output(), 6)
    again.table = table
    assert arming(again) == arming(restarted)

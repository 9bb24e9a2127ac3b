"""What the loan service reads from a loan.actions record before applying anything: a
record it cannot read raises ValueError (the consumer parks it in dead_letters)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from earn.v1 import loan_pb2 as ln
from services.kernel import events
from services.loan.api import LoanApi


def record(*actions: ln.LoanLtvAction) -> bytes:
    return events.wrap(ln.LoanActions(actions=list(actions)), key="ltv-0", producer="test", occurred_at=datetime.now(UTC)).SerializeToString()


def action(**fields: object) -> ln.LoanLtvAction:
    base: dict[str, object] = {"loan_id": "ln-01", "version": 3, "kind": ln.LOAN_EVENT_KIND_MARGIN_CALL, "ltv": "4/5", "prices": {"BTC": "37500.5"}}
    return ln.LoanLtvAction(**{**base, **fields})


def test_a_batch_is_read_with_its_kinds() -> None:
    batch, kinds = LoanApi._read_actions(record(action(), action(kind=ln.LOAN_EVENT_KIND_LIQUIDATION, ltv="9/10"),
                                                action(kind=ln.LOAN_EVENT_KIND_REARMED, ltv="0.78")))
    assert kinds == ["margin_call", "liquidation", "rearmed"] and [a.version for a in batch] == [3, 3, 3]
    single = events.wrap(action(), key="k", producer="test", occurred_at=datetime.now(UTC)).SerializeToString()
    assert LoanApi._read_actions(single)[1] == ["margin_call"]  # an older record: one LoanLtvAction


@pytest.mark.parametrize(("raw", "says"), [
    (b"\x07 not a protobuf \xff", "not a loan action"),
    (events.wrap(ln.LoanStateChanged(loan_id="ln-01"), key="k", producer="t", occurred_at=datetime.now(UTC)).SerializeToString(), "not a"),
    (record(action(kind=ln.LOAN_EVENT_KIND_MATURITY)), "unknown action kind"),
    (record(action(), action(ltv="")), "ltv '' is not a number"),
    (record(action(ltv="1/0")), "is not a number"),
    (record(action(ltv="-1/2")), "out of range"),
    (record(action(prices={"BTC": "abc"})), "price of BTC 'abc' is not a number"),
    (record(action(prices={"BTC": "0"})), "out of range"),
])
def test_unreadable_records_raise_value_error(raw: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        LoanApi._read_actions(raw)


def test_a_price_time_out_of_range_is_unreadable() -> None:
    a = action()
    a.price_time.seconds = 10**15
    with pytest.raises(ValueError, match="price_time"):
        LoanApi._read_actions(record(a))

"""A repayment's answer fields come from its recorded operation: the amounts decided with
it (``response``), or, for an operation recorded before they were kept, its transfers."""

from __future__ import annotations

import base64

from earn.v1 import wallet_pb2
from services.loan.api import _decided_fields


def _transfer(key: str, amount: str) -> dict[str, str]:
    req = wallet_pb2.TransferRequest(idempotency_key=key, transfer=wallet_pb2.TransferSpec(asset="USDT", amount=amount))
    return {"call": "Transfer", "req": base64.b64encode(req.SerializeToString()).decode()}


def _release(key: str) -> dict[str, str]:
    req = wallet_pb2.ReleaseHoldRequest(idempotency_key=key, hold_id="7", amount="1")
    return {"call": "ReleaseHold", "req": base64.b64encode(req.SerializeToString()).decode()}


def test_recorded_amounts_are_the_answer() -> None:
    plan = {"method": "RepayLoan", "steps": [_transfer("loan:ln-1:ab:interest", "9")],
            "response": {"interest_paid": "0.15", "principal_paid": "99.85"}}
    assert _decided_fields(plan) == {"interest_paid": "0.15", "principal_paid": "99.85"}


def test_older_repayment_amounts_from_its_transfers() -> None:
    both = {"method": "RepayLoan", "steps": [_transfer("loan:ln-1:ab:interest", "0.1495"), _transfer("loan:ln-1:ab:principal", "199.8505"),
                                             _release("loan:ab:release:7")]}
    assert _decided_fields(both) == {"interest_paid": "0.1495", "principal_paid": "199.8505"}
    principal_only = {"method": "RepayLoan", "steps": [_transfer("loan:ln-1:ab:principal", "50")]}
    assert _decided_fields(principal_only) == {"interest_paid": "0", "principal_paid": "50"}


def test_other_operations_answer_with_the_loan_only() -> None:
    for method in ("Borrow", "AddLoanCollateral", "RemoveLoanCollateral", "Liquidate", "Mature"):
        assert _decided_fields({"method": method, "steps": [_transfer("loan:ln-1:disburse", "10")]}) == {}

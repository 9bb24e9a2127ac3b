"""The kernel's wallet-hold steps of a client write (services.kernel.peers): ``place_hold``
(Simple Earn's Subscribe, Launchpool's Stake, Dual's SubscribeDual) keeps the wallet keys
those services always derived, skips holds the service abandoned and gives up after the
attempts; ``release_holds`` (the release sweeps) confirms what the wallet released and
leaves a refused release for the next sweep."""

from __future__ import annotations

import asyncio
import hashlib
from decimal import Decimal
from typing import Any

import pytest

from earn.v1 import launchpool_pb2, wallet_pb2
from services.kernel import idempotency, peers
from services.kernel.errors import FailedPrecondition


class FakeWallet:
    def __init__(self, refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[tuple[str, Any]] = []
        self.refuse = refuse

    async def call(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        if request.idempotency_key in self.refuse:
            raise FailedPrecondition("refused")
        if method == "PlaceHold":
            return wallet_pb2.PlaceHoldResponse(hold=wallet_pb2.Hold(hold_id=str(100 + len(self.calls))))
        return wallet_pb2.ReleaseHoldResponse()


def _stake() -> launchpool_pb2.StakeRequest:
    return launchpool_pb2.StakeRequest(idempotency_key="k-1", user_id="u1", pool_id="p1", amount="12.5")


def test_hold_keys_are_the_services_keys_and_abandoned_holds_are_skipped() -> None:
    request, wallet = _stake(), FakeWallet()
    abandoned = {101}

    async def is_abandoned(hold_id: int) -> bool:
        return hold_id in abandoned

    hold_id = asyncio.run(peers.place_hold(
        wallet, "lp:stake", "Stake", request, owner="u1", asset="BNB", amount=Decimal("12.5"), holder="launchpool",
        reference="launchpool:stake:p1", abandoned=is_abandoned,
    ))
    base = hashlib.sha256(b"k-1\0" + idempotency.fingerprint("Stake", request)).hexdigest()[:40]
    assert hold_id == 102
    assert [r.idempotency_key for _, r in wallet.calls] == [f"lp:stake:{base}:0", f"lp:stake:{base}:1"]
    first = wallet.calls[0][1]
    assert (first.owner, first.asset, first.amount, first.holder, first.reference) == ("u1", "BNB", "12.5", "launchpool", "launchpool:stake:p1")


def test_hold_gives_up_after_the_attempts_with_the_services_words() -> None:
    async def always(hold_id: int) -> bool:
        return True

    wallet = FakeWallet()
    with pytest.raises(FailedPrecondition, match="client_order_id: this order failed"):
        asyncio.run(peers.place_hold(
            wallet, "dual:hold", "SubscribeDual", _stake(), key="dual:subscribe:u1:o1", owner="u1", asset="BNB", amount=Decimal(1),
            holder="dual", reference="r", abandoned=always, attempts=3,
            refused="client_order_id: this order failed too many times; retry with a new client order id",
        ))
    assert len(wallet.calls) == 3
    assert all(r.idempotency_key.startswith("dual:hold:") for _, r in wallet.calls)


def test_release_holds_confirms_what_the_wallet_released() -> None:
    rows = [{"id": 1, "key": "se:red:a", "hold_id": 7, "amount": Decimal("1.50")}, {"id": 2, "key": "se:red:b", "hold_id": 8, "amount": Decimal(2)}]
    wallet, confirmed = FakeWallet(refuse={"se:red:a"}), []

    async def done(release_id: int) -> None:
        confirmed.append(release_id)

    assert asyncio.run(peers.release_holds(wallet, rows, done)) == 1
    assert confirmed == [2]
    assert [(r.idempotency_key, r.hold_id, r.amount) for _, r in wallet.calls] == [("se:red:a", "7", "1.5"), ("se:red:b", "8", "2")]

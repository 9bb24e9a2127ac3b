"""Wallet rules as pure functions: accounts, transfers, holds. No I/O.

An account is (owner, asset, kind). A transfer moves a positive amount of one asset
from a source account to a destination account: every movement is balanced, so per
asset all balances sum to zero. User accounts and funded system accounts never go
negative; only the external world and product expense accounts may.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from services.kernel.errors import FailedPrecondition, InsufficientFunds, InvalidArgument
from services.kernel.money import format_amount, parse_amount, scale_of


class Kind(StrEnum):
    FUNDING = "funding"
    HOLD = "hold"
    EXTERNAL = "external"
    EXPENSE = "expense"
    TREASURY = "treasury"
    REWARD_POOL = "reward_pool"
    FEE_INCOME = "fee_income"


USER_KINDS = frozenset({Kind.FUNDING, Kind.HOLD})
MAY_GO_NEGATIVE = frozenset({Kind.EXTERNAL, Kind.EXPENSE})

MAX_BATCH = 10_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
_REFERENCE = re.compile(r"[\x20-\x7e]{0,128}")


@dataclass(frozen=True, slots=True, order=True)
class AccountKey:
    owner: str
    asset: str
    kind: Kind

    def __str__(self) -> str:
        return f"{self.owner}/{self.asset}/{self.kind.value}"

    @property
    def may_go_negative(self) -> bool:
        return self.kind in MAY_GO_NEGATIVE


@dataclass(frozen=True, slots=True)
class Order:
    """A validated transfer to apply."""

    asset: str
    source: AccountKey
    destination: AccountKey
    amount: Decimal
    reference: str


@dataclass(frozen=True, slots=True)
class Applied:
    order: Order
    source_after: Decimal
    destination_after: Decimal


def check_name(value: str, field: str) -> str:
    """Owners and holders: 1-64 of letters, digits and ``_ . : @ -``."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _NAME.fullmatch(value):
        raise InvalidArgument(field, "must be 1 to 64 characters of letters, digits and _ . : @ - (starting with a letter or digit)")
    return value


def check_reference(value: str, field: str = "reference") -> str:
    if not _REFERENCE.fullmatch(value):
        raise InvalidArgument(field, "must be at most 128 printable ASCII characters")
    return value


def check_asset(asset: str, field: str = "asset") -> str:
    if not asset:
        raise InvalidArgument(field, "is required")
    scale_of(asset, field)
    return asset


def order(
    *,
    asset: str,
    source: tuple[str, Kind | None],
    destination: tuple[str, Kind | None],
    amount: str,
    reference: str,
    field: str = "transfer",
    hold_allowed: bool = False,
) -> Order:
    """Validate one transfer request. Hold accounts move only through holds."""
    check_asset(asset, f"{field}.asset")
    keys = []
    for side, (owner, kind) in (("source", source), ("destination", destination)):
        check_name(owner, f"{field}.{side}.owner")
        if kind is None:
            raise InvalidArgument(f"{field}.{side}.kind", "is required")
        if kind is Kind.HOLD and not hold_allowed:
            raise InvalidArgument(f"{field}.{side}.kind", "hold accounts move only through PlaceHold, ReleaseHold and CaptureHold")
        keys.append(AccountKey(owner, asset, kind))
    if keys[0] == keys[1]:
        raise InvalidArgument(f"{field}.destination", "must differ from the source account")
    value = parse_amount(amount, asset, f"{field}.amount")
    return Order(asset, keys[0], keys[1], value, check_reference(reference, f"{field}.reference"))


def apply(balances: Mapping[AccountKey, Decimal], orders: Iterable[Order]) -> tuple[dict[AccountKey, Decimal], list[Applied]]:
    """Apply orders in sequence to the current balances; all or nothing.

    Raises InsufficientFunds naming the first account that would go negative and by how
    much. Returns the new balances of every touched account and each order's results.
    """
    current = dict(balances)
    applied: list[Applied] = []
    for item in orders:
        source = current.get(item.source, Decimal(0)) - item.amount
        if source < 0 and not item.source.may_go_negative:
            raise InsufficientFunds(str(item.source), item.asset, format_amount(-source))
        current[item.source] = source
        destination = current.get(item.destination, Decimal(0)) + item.amount
        current[item.destination] = destination
        applied.append(Applied(item, source, destination))
    return current, applied


# A batch at least this large that only credits users' funding accounts from one account
# allowed to go negative (a product's expense, the external world) is a bulk credit.
BULK_CREDIT_MIN = 64


def bulk_credit_source(orders: list[Order]) -> AccountKey | None:
    """The common source when ``orders`` are a bulk credit (a payout), else None.

    A bulk credit cannot overdraw anything: its source may go negative and its
    destinations only receive. So its destinations need no lock and no balance check,
    and the wallet records their credits as pending instead of rewriting each balance.
    """
    if len(orders) < BULK_CREDIT_MIN:
        return None
    source = orders[0].source
    if not source.may_go_negative:
        return None
    seen: set[AccountKey] = set()
    for item in orders:
        if item.source != source or item.destination.kind is not Kind.FUNDING or item.destination in seen:
            return None
        seen.add(item.destination)
    return source


@dataclass(frozen=True, slots=True)
class HoldState:
    hold_id: int
    owner: str
    asset: str
    amount: Decimal
    remaining: Decimal


def settle_amount(hold: HoldState, requested: str, field: str = "amount") -> Decimal:
    """How much a release or capture moves: everything that remains when ``requested``
    is empty, else the requested amount, which may not exceed what remains."""
    if hold.remaining == 0:
        raise FailedPrecondition(f"hold {hold.hold_id} is closed: nothing remains held")
    if not requested:
        return hold.remaining
    value = parse_amount(requested, hold.asset, field)
    if value > hold.remaining:
        raise FailedPrecondition(
            f"{field}: {format_amount(value)} exceeds the {format_amount(hold.remaining)} {hold.asset} that remains held"
        )
    return value

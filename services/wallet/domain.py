"""Wallet rules as pure functions: accounts, transfers, holds. No I/O.

An account is (owner, asset, kind). A transfer moves a positive amount of one asset
from a source account to a destination account: every movement is balanced, so per
asset all balances sum to zero. User accounts and funded system accounts never go
negative; only the external world and product expense accounts may.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from services.kernel import columns
from services.kernel.errors import FailedPrecondition, InsufficientFunds, InvalidArgument
from services.kernel.money import check_amount_column, format_amount, parse_amount, scale_of


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
_NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}"
_REFERENCE_RULE = r"[\x20-\x7e]{0,128}"
_NAME = re.compile(_NAME_RULE)
_REFERENCE = re.compile(_REFERENCE_RULE)
_NAME_COLUMN = columns.pattern(_NAME_RULE)
_REFERENCE_COLUMN = columns.pattern(_REFERENCE_RULE)


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


@dataclass(frozen=True, slots=True)
class BulkCredit:
    """A payout in columns: ``source`` credits the funding account of ``owners[i]`` with
    ``amounts[i]`` (a decimal string in the strict grammar, > 0) for every i.

    It cannot overdraw anything: its source may go negative and its destinations only
    receive. So the wallet debits the source once, by the total, and records the credits
    as they are, without resolving, locking or rewriting any user's account; they count
    in every balance at once and are folded into the history later (``store``).
    """

    asset: str
    source: AccountKey
    owners: list[str]
    amounts: list[str]
    # One per owner, or empty: then ``reference`` is every credit's reference.
    references: list[str]
    reference: str

    def reference_column(self) -> list[str]:
        """Every credit's reference, one per owner."""
        return self.references or [self.reference] * len(self.owners)


def bulk_credit(
    *,
    asset: str,
    source: tuple[str, Kind | None],
    owners: Sequence[str],
    amounts: Sequence[str],
    references: Sequence[str],
    reference: str,
) -> BulkCredit:
    """Validate a bulk credit column by column: one pass per column, no object per credit
    (a 5,000-credit payout checks in about a millisecond). The first broken rule is
    refused naming its field, and its index for a column (``amounts[17]``)."""
    check_asset(asset)
    owner, kind = source
    check_name(owner, "source.owner")
    if kind is None:
        raise InvalidArgument("source.kind", "is required")
    if kind not in MAY_GO_NEGATIVE:
        allowed = " or ".join(sorted(k.value for k in MAY_GO_NEGATIVE))
        raise InvalidArgument("source.kind", f"must be an account that may go negative ({allowed}); a {kind.value} account may not")
    count = len(owners)
    if count == 0:
        raise InvalidArgument("owners", "must hold at least one owner")
    if count > MAX_BATCH:
        raise InvalidArgument("owners", f"at most {MAX_BATCH} credits per request; got {count}")
    owners, amounts, references = list(owners), list(amounts), list(references)
    if len(amounts) != count:
        raise InvalidArgument("amounts", f"has {len(amounts)} entries for {count} owners: one amount per owner")
    if len(references) not in (0, count):
        raise InvalidArgument(
            "references", f"has {len(references)} entries for {count} owners: one per owner, or none (then reference applies to each)"
        )
    columns.check(owners, _NAME_COLUMN, check_name, "owners")
    if len(set(owners)) != count:
        first: dict[str, int] = {}
        for i, name in enumerate(owners):
            if name in first:
                raise InvalidArgument(f"owners[{i}]", f"{name!r} is already credited at owners[{first[name]}]: owners must be distinct")
            first[name] = i
    check_amount_column(amounts, asset, "amounts")
    columns.check(references, _REFERENCE_COLUMN, check_reference, "references")
    check_reference(reference)
    return BulkCredit(asset, AccountKey(owner, asset, kind), owners, amounts, references, reference)


# A batch at least this large that only credits distinct users' funding accounts from one
# account allowed to go negative is stored as a bulk credit (see BulkCredit).
BULK_CREDIT_MIN = 64


def as_bulk_credit(orders: list[Order]) -> BulkCredit | None:
    """``orders`` as a BulkCredit when they are one (and at least BULK_CREDIT_MIN), else None."""
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
    references = [o.reference for o in orders]
    return BulkCredit(
        source.asset,
        source,
        [o.destination.owner for o in orders],
        [format_amount(o.amount) for o in orders],
        references if any(references) else [],
        "",
    )


@dataclass(frozen=True, slots=True)
class HoldState:
    hold_id: int
    owner: str
    asset: str
    amount: Decimal
    remaining: Decimal
    holder: str = ""


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

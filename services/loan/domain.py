"""Crypto Loan rules, pure: LTV, hourly interest into the debt, repayment order, collateral
removal, and liquidation. No I/O, no protobuf.

PRODUCT_RULES.md ("Crypto Loan"), exactly:
- LTV = (principal + unpaid interest) x loan price / sum(collateral x price x discount);
- initial LTV 70% (borrowing and removing collateral must stay at or below), margin call
  80%, liquidation 90%, liquidation fee 2% (all loan configuration, these are defaults);
- interest hourly from the next full hour, a started hour counting as full;
- repay: interest first, then principal; a full repay returns all collateral.

Choices (README, "Crypto Loan"):
- Prices are values in the valuation asset (USDT): an asset's price is the index of
  ``<ASSET>/USDT``, USDT itself is 1. A collateral's ``discount`` is the share of its value
  that counts (0.95 counts 95%; the haircut is 5%).
- A started hour counts as full, so hour ``h`` (``[h, h+1)`` in unix hours) is charged at
  its start, on the principal outstanding at that moment, for every hour from the hour
  after the borrowing (``start_hour``) on. A repayment inside hour ``h`` therefore pays
  hour ``h``'s interest too, and a loan closed inside hour ``h`` owes nothing for ``h+1``.
- Interest is exact (fractions) and enters the debt truncated to the loan asset's scale,
  the remainder carried: after any number of hours the interest charged is the exact
  total rounded down (``charged = floor(exact)``), so the debt is always a whole number of
  units and no value is created or lost. The service and the engine compute the same
  charges from the same facts, so neither waits for the other.
- Liquidation sells just enough collateral, asset by asset in the loan's collateral order,
  each at its index price less the fee (``unit value = price x (1 - fee) / loan price``);
  the amount sold of an asset is rounded up to its scale (never less than needed), the
  proceeds above the debt go back to the user in the loan asset (rounded down), the rest
  of the collateral is returned. If all collateral does not cover the debt, the shortfall
  is bad debt carried by the lending treasury (recorded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction

from services.kernel.errors import FailedPrecondition, InvalidArgument
from services.kernel.ids import check_user_id as check_user_id

HOUR_US = 3_600 * 1_000_000
VALUATION_ASSET = "USDT"
DEFAULT_INITIAL_LTV = Fraction(70, 100)
DEFAULT_MARGIN_CALL_LTV = Fraction(80, 100)
DEFAULT_LIQUIDATION_LTV = Fraction(90, 100)
DEFAULT_LIQUIDATION_FEE = Fraction(2, 100)
# A margin call is re-armed once the LTV is below the margin-call level minus this band.
DEFAULT_REARM_BAND = Fraction(1, 100)
FIXED_TERMS_DAYS = (7, 30)
RATE_SCALE = 10  # fraction digits of an hourly rate
DISCOUNT_SCALE = 4

def units(value: Decimal | Fraction, scale: int) -> int:
    """An amount at ``scale`` as an integer number of units (exact; refuses a finer one)."""
    scaled = Fraction(value) * 10**scale
    if scaled.denominator != 1:
        raise ValueError(f"{value} has more than {scale} fraction digits")
    return scaled.numerator


def from_units(n: int, scale: int) -> Decimal:
    return Decimal(n).scaleb(-scale)


def floor_units(value: Fraction, scale: int) -> int:
    scaled = value * 10**scale
    return scaled.numerator // scaled.denominator


def ceil_units(value: Fraction, scale: int) -> int:
    scaled = value * 10**scale
    return -((-scaled.numerator) // scaled.denominator)


def price_of(asset: str, prices: Mapping[str, Fraction]) -> Fraction:
    """The asset's value in the valuation asset; refuses an asset without a price."""
    if asset == VALUATION_ASSET:
        return Fraction(1)
    try:
        price = Fraction(prices[asset])
    except KeyError:
        raise FailedPrecondition(f"price: no index for {asset}/{VALUATION_ASSET}") from None
    if price <= 0:
        raise FailedPrecondition(f"price: the index of {asset}/{VALUATION_ASSET} is not positive")
    return price


@dataclass(frozen=True, slots=True)
class Levels:
    initial: Fraction = DEFAULT_INITIAL_LTV
    margin_call: Fraction = DEFAULT_MARGIN_CALL_LTV
    liquidation: Fraction = DEFAULT_LIQUIDATION_LTV
    fee: Fraction = DEFAULT_LIQUIDATION_FEE
    rearm_band: Fraction = DEFAULT_REARM_BAND

    def check(self) -> None:
        if not 0 < self.initial < self.margin_call < self.liquidation < 1:
            raise InvalidArgument("levels", "need 0 < initial < margin call < liquidation < 1")
        if not 0 <= self.fee < 1 - self.liquidation:
            raise InvalidArgument("liquidation_fee", "must be at least 0 and below 1 - the liquidation LTV")
        if not 0 <= self.rearm_band < self.margin_call - self.initial:
            raise InvalidArgument("rearm_band", "must be at least 0 and below the gap between margin call and initial LTV")


@dataclass(frozen=True, slots=True)
class Collateral:
    asset: str
    scale: int
    amount: int  # units
    discount: Fraction  # the share of the value that counts, 0 < d <= 1


@dataclass(slots=True)
class Loan:
    """A loan's money state, every amount in units of its asset."""

    loan_asset: str
    scale: int
    principal: int
    interest: int  # unpaid interest already in the debt
    hourly_rate: Fraction
    start_hour: int  # the first hour charged
    charged_through: int  # the last hour charged (start_hour - 1: none yet)
    exact_interest: Fraction = Fraction(0)  # every hour's exact interest, in units
    charged_units: int = 0  # floor(exact_interest): what entered the debt
    collateral: list[Collateral] = field(default_factory=list)

    @property
    def debt(self) -> int:
        return self.principal + self.interest

    def copy(self) -> Loan:
        return replace(self, collateral=list(self.collateral))


def start_hour(borrowed_us: int) -> int:
    """The next full hour after the borrowing: the first hour charged."""
    return borrowed_us // HOUR_US + 1


def hour_of(at_us: int) -> int:
    return at_us // HOUR_US


def charge_hours(loan: Loan, through_hour: int) -> int:
    """Charge every hour not charged yet up to ``through_hour`` (inclusive), each on the
    principal at its start (which is the current principal: a principal change first
    charges the hours up to its own). Returns the units added to the debt."""
    added = 0
    first = max(loan.charged_through + 1, loan.start_hour)
    for _ in range(first, through_hour + 1):
        if loan.principal == 0:
            break
        loan.exact_interest += loan.principal * loan.hourly_rate
        charged = loan.exact_interest.numerator // loan.exact_interest.denominator
        added += charged - loan.charged_units
        loan.charged_units = charged
    loan.interest += added
    loan.charged_through = max(loan.charged_through, through_hour)
    return added


def collateral_value(collateral: Sequence[Collateral], prices: Mapping[str, Fraction]) -> Fraction:
    """sum(collateral x price x discount), in the valuation asset."""
    return sum((Fraction(c.amount, 10**c.scale) * price_of(c.asset, prices) * c.discount for c in collateral), Fraction(0))


def ltv_of(debt_units: int, scale: int, loan_asset: str, collateral: Sequence[Collateral], prices: Mapping[str, Fraction]) -> Fraction:
    value = collateral_value(collateral, prices)
    debt = Fraction(debt_units, 10**scale) * price_of(loan_asset, prices)
    if value == 0:
        return Fraction(0) if debt == 0 else Fraction(10**9)
    return debt / value


def ltv(loan: Loan, prices: Mapping[str, Fraction]) -> Fraction:
    return ltv_of(loan.debt, loan.scale, loan.loan_asset, loan.collateral, prices)


def check_borrow(loan: Loan, prices: Mapping[str, Fraction], levels: Levels) -> Fraction:
    """The initial LTV check: at or below the initial level."""
    value = ltv(loan, prices)
    if value > levels.initial:
        raise FailedPrecondition(
            f"amount: the LTV would be {percent(value)}, above the initial LTV of {percent(levels.initial)}; borrow less or add collateral"
        )
    return value


def percent(value: Fraction) -> str:
    """A ratio as a percentage with 2 decimals, rounded down (for messages)."""
    hundredths = floor_units(value * 100, 2)
    return f"{hundredths // 100}.{hundredths % 100:02d}%"


@dataclass(frozen=True, slots=True)
class Repayment:
    interest_paid: int
    principal_paid: int
    closed: bool


def repay(loan: Loan, amount_units: int) -> Repayment:
    """Interest first, then principal; an amount above the debt is refused (call
    ``charge_hours`` through the current hour first)."""
    if amount_units <= 0:
        raise InvalidArgument("amount", "must be greater than zero")
    if amount_units > loan.debt:
        raise FailedPrecondition(
            f"amount: {from_units(amount_units, loan.scale)} is more than the debt of {from_units(loan.debt, loan.scale)} {loan.loan_asset}"
        )
    interest_paid = min(amount_units, loan.interest)
    principal_paid = amount_units - interest_paid
    loan.interest -= interest_paid
    loan.principal -= principal_paid
    return Repayment(interest_paid, principal_paid, loan.debt == 0)


def remove_collateral(loan: Loan, asset: str, amount_units: int, prices: Mapping[str, Fraction], levels: Levels) -> Fraction:
    """Take ``amount_units`` of ``asset`` out; refused if the LTV after would exceed the
    initial level. Returns the LTV after."""
    for i, c in enumerate(loan.collateral):
        if c.asset == asset:
            if amount_units > c.amount:
                raise FailedPrecondition(f"amount: more than the {from_units(c.amount, c.scale)} {asset} pledged")
            after = [*loan.collateral[:i], replace(c, amount=c.amount - amount_units), *loan.collateral[i + 1 :]]
            value = ltv_of(loan.debt, loan.scale, loan.loan_asset, after, prices)
            if value > levels.initial:
                raise FailedPrecondition(
                    f"amount: the LTV would be {percent(value)}, above the initial LTV of {percent(levels.initial)}"
                )
            loan.collateral = after
            return value
    raise FailedPrecondition(f"asset: the loan has no {asset} collateral")


@dataclass(frozen=True, slots=True)
class Sale:
    asset: str
    sold: int  # units of the collateral asset sold
    returned: int  # units of it returned to the user
    price: Fraction  # the index used (valuation asset)
    proceeds: Fraction  # exact, in loan-asset units


@dataclass(frozen=True, slots=True)
class Liquidation:
    sales: tuple[Sale, ...]
    debt_repaid: int  # loan-asset units covered by the sales
    surplus: int  # loan-asset units paid back to the user (proceeds above the debt, floored)
    shortfall: int  # loan-asset units not covered (bad debt)


def liquidate(loan: Loan, prices: Mapping[str, Fraction], fee: Fraction) -> Liquidation:
    """Sell just enough collateral at index x (1 - fee), in the loan's collateral order."""
    loan_price = price_of(loan.loan_asset, prices)
    need = Fraction(loan.debt)  # loan-asset units
    sales = []
    proceeds_total = Fraction(0)
    for c in loan.collateral:
        price = price_of(c.asset, prices)
        # value of one unit of the collateral, in loan-asset units
        unit_value = price * (1 - fee) / loan_price * Fraction(10**loan.scale, 10**c.scale)
        remaining = need - proceeds_total
        if remaining <= 0 or unit_value == 0:
            sales.append(Sale(c.asset, 0, c.amount, price, Fraction(0)))
            continue
        wanted = -((-remaining.numerator * unit_value.denominator) // (remaining.denominator * unit_value.numerator))  # ceil(remaining / unit_value)
        sold = min(c.amount, wanted)
        proceeds = sold * unit_value
        proceeds_total += proceeds
        sales.append(Sale(c.asset, sold, c.amount - sold, price, proceeds))
    if proceeds_total >= need:
        excess = proceeds_total - need
        return Liquidation(tuple(sales), loan.debt, excess.numerator // excess.denominator, 0)
    covered = proceeds_total.numerator // proceeds_total.denominator
    return Liquidation(tuple(sales), covered, 0, loan.debt - covered)


def charge_until(loan: Loan, now_us: int, due_us: int | None) -> int:
    """Charge the hours started by ``now_us``; a fixed-term loan stops at its due time
    (hours starting after it are not charged, even while its settlement is pending)."""
    end = now_us if due_us is None else min(now_us, due_us)
    return charge_hours(loan, hour_of(end))


def settle_at_maturity(loan: Loan, prices: Mapping[str, Fraction], due_us: int) -> Liquidation:
    """A fixed-term loan not repaid by its due time: every hour started by then charged
    (a started hour counts as full), then the debt repaid from the collateral at the
    index of the due time without a fee: just enough sold, asset by asset in the loan's
    order (rounded up to the asset's scale), the proceeds above the debt paid back
    (floored), the rest returned; a shortfall is bad debt."""
    charge_hours(loan, hour_of(due_us))
    return liquidate(loan, prices, Fraction(0))


# ---- triggers: the prices at which a loan crosses a level --------------------------------


def trigger_price(loan_debt_value: Fraction, level: Fraction, others_value: Fraction, amount: Fraction, discount: Fraction) -> Fraction | None:
    """The price of one collateral asset at which the LTV equals ``level``, the other
    collateral and the loan's price fixed: debt_value / level = others + amount x p x d.
    None when no positive price reaches it (the others alone are enough: never crosses)."""
    if amount == 0 or discount == 0:
        return None
    p = (loan_debt_value / level - others_value) / (amount * discount)
    return p if p > 0 else None

"""The accrual engine's LTV monitor for Crypto Loans, pure: no faust, no Kafka, no protobuf.

It joins index prices with the open loans of one input partition and says when a loan
crosses a level (``services.loan.domain`` holds the formulas):

- **Margin call**: the LTV reaches the margin-call level (``>=``). One action per
  crossing: the loan is then *disarmed* and re-armed only once its LTV is below the
  margin-call level minus the re-arm band (default 1 point: 79% for 80%), so a price
  jittering around the level calls once, not on every tick.
- **Liquidation**: the LTV reaches the liquidation level. One action per loan state
  (the loan's ``version``, which the loan service increases on every change): the
  service liquidates by loan id and only at that version, so a trigger that raced a
  repayment is dropped there and the new state is judged again here.
- **Interest**: every hour tick charges the hour into each open loan's debt (the same
  rule the service applies, ``domain.charge_hours``) and judges the loan again.

Cost per price tick: O(log n + k) for the n loans that depend on that price alone and the
k of them that cross, plus every loan that depends on several prices. Per asset there
are two sorted lists of integer keys:

- ``down``: for each loan whose LTV rises when this asset's price falls (one collateral
  asset with a price, the loan asset the valuation asset), the price at or below which
  its next action fires: the margin-call price while armed, the liquidation price
  once called. A tick at price p takes the suffix of keys >= p (a slice; no loan below
  it is touched).
- ``up``: for called loans, the price above which they are re-armed; a tick takes the
  prefix of keys < p.

Keys are ``floor(trigger x 10^18)``: a price has at most 18 fraction digits, so
``p <= trigger`` exactly when ``p x 10^18 <= key``, and the lists compare integers. The
taken loans are judged with the exact LTV (fractions) and put back with their new keys.
Loans that depend on more than one price (several priced collateral assets, or a loan
asset with a price) cannot be ordered by one price: they sit in a set per asset and are
judged on every tick of any of their assets (O(such loans) per tick; a trigger per asset
given the others would move whenever the others move, which costs the same).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction

from services.loan import domain
from services.loan.domain import Collateral, Levels, Loan

KEY_SCALE = 18
_KEY = 10**KEY_SCALE


class Kind(str, Enum):
    MARGIN_CALL = "margin_call"
    LIQUIDATION = "liquidation"
    REARMED = "rearmed"


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    loan_id: str
    user_id: str
    version: int
    ltv: Fraction
    prices: tuple[tuple[str, Fraction], ...]  # the prices the LTV was judged at
    debt: int  # loan-asset units, interest included
    charged_through: int


@dataclass(slots=True)
class Watched:
    loan_id: str
    user_id: str
    version: int
    money: Loan
    levels: Levels
    armed: bool = True
    liquidation_sent: bool = False
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (list, asset, key)

    def priced_assets(self) -> set[str]:
        assets = {c.asset for c in self.money.collateral if c.amount > 0}
        assets.add(self.money.loan_asset)
        assets.discard(domain.VALUATION_ASSET)
        return assets


def price_key(price: Fraction) -> int:
    """A tick's price as an integer key; refuses more than 18 fraction digits."""
    scaled = price * _KEY
    if scaled.denominator != 1:
        raise ValueError(f"price {price} has more than {KEY_SCALE} fraction digits")
    return scaled.numerator


class LtvMonitor:
    def __init__(self) -> None:
        self.loans: dict[str, Watched] = {}
        self.prices: dict[str, Fraction] = {}
        self.price_times: dict[str, int] = {}
        self.down: dict[str, list[tuple[int, str]]] = {}
        self.up: dict[str, list[tuple[int, str]]] = {}
        self.multi: dict[str, set[str]] = {}
        self.hour = 0  # the last hour charged
        self.judged = 0  # loans judged so far (the cost, for tests and the benchmark)

    # ---- the index ----------------------------------------------------------------------

    def _unindex(self, w: Watched) -> None:
        for which, asset, key in w.entries:
            if which == "multi":
                self.multi[asset].discard(w.loan_id)
                continue
            book = (self.down if which == "down" else self.up)[asset]
            i = bisect_left(book, (key, w.loan_id))
            if i < len(book) and book[i] == (key, w.loan_id):
                del book[i]
        w.entries = []

    def _index(self, w: Watched) -> None:
        """File the loan under its next triggers (it must be judged at current prices)."""
        if w.liquidation_sent:
            return
        assets = w.priced_assets()
        if len(assets) != 1 or w.money.loan_asset != domain.VALUATION_ASSET:
            for asset in assets:
                self.multi.setdefault(asset, set()).add(w.loan_id)
                w.entries.append(("multi", asset, 0))
            return
        (asset,) = assets
        m = w.money
        debt_value = Fraction(m.debt, 10**m.scale)
        others = domain.collateral_value([c for c in m.collateral if c.asset != asset], self.prices)
        amount = sum((Fraction(c.amount, 10**c.scale) for c in m.collateral if c.asset == asset), Fraction(0))
        discount = next(c.discount for c in m.collateral if c.asset == asset)
        if len([c for c in m.collateral if c.asset == asset]) > 1:  # the same asset twice: judge it fully
            self.multi.setdefault(asset, set()).add(w.loan_id)
            w.entries.append(("multi", asset, 0))
            return
        level = w.levels.margin_call if w.armed else w.levels.liquidation
        down = domain.trigger_price(debt_value, level, others, amount, discount)
        if down is not None:
            key = (down * _KEY).numerator // (down * _KEY).denominator
            insort(self.down.setdefault(asset, []), (key, w.loan_id))
            w.entries.append(("down", asset, key))
        if not w.armed:
            rearm = domain.trigger_price(debt_value, w.levels.margin_call - w.levels.rearm_band, others, amount, discount)
            if rearm is not None:
                key = (rearm * _KEY).numerator // (rearm * _KEY).denominator
                insort(self.up.setdefault(asset, []), (key, w.loan_id))
                w.entries.append(("up", asset, key))

    # ---- judging -------------------------------------------------------------------------

    def _judge(self, w: Watched) -> list[Action]:
        """Compare the exact LTV with the levels; the actions due (and the new arming)."""
        if w.liquidation_sent:
            return []
        self.judged += 1
        assets = w.priced_assets()
        if any(a not in self.prices for a in assets):
            return []  # not every price known yet: nothing to judge
        value = domain.ltv(w.money, self.prices)
        out = []
        if w.armed and value >= w.levels.margin_call:
            w.armed = False
            out.append(self._action(Kind.MARGIN_CALL, w, value, assets))
        elif not w.armed and value < w.levels.margin_call - w.levels.rearm_band:
            w.armed = True
            out.append(self._action(Kind.REARMED, w, value, assets))
        if value >= w.levels.liquidation:
            w.liquidation_sent = True
            out.append(self._action(Kind.LIQUIDATION, w, value, assets))
        return out

    def _action(self, kind: Kind, w: Watched, value: Fraction, assets: Iterable[str]) -> Action:
        return Action(kind, w.loan_id, w.user_id, w.version, value, tuple(sorted((a, self.prices[a]) for a in assets)),
                      w.money.debt, w.money.charged_through)

    def _rejudge(self, w: Watched) -> list[Action]:
        self._unindex(w)
        actions = self._judge(w)
        self._index(w)
        return actions

    # ---- inputs --------------------------------------------------------------------------

    def upsert(self, loan_id: str, user_id: str, version: int, money: Loan, levels: Levels, *, open_: bool = True) -> list[Action]:
        """A loan's state from the service (a newer version replaces an older one; an
        older or equal one is ignored). A closed or liquidated loan leaves the monitor."""
        current = self.loans.get(loan_id)
        if current is not None and version <= current.version:
            return []
        if current is not None:
            self._unindex(current)
        if not open_:
            self.loans.pop(loan_id, None)
            return []
        w = Watched(loan_id, user_id, version, money, levels)
        if current is not None:
            w.armed = current.armed  # a called loan stays called until its LTV recovers
        if self.hour:
            domain.charge_hours(money, self.hour)
        self.loans[loan_id] = w
        actions = self._judge(w)
        self._index(w)
        return actions

    def price(self, asset: str, price: Fraction, at_us: int) -> list[Action]:
        """An index tick of ``<asset>/USDT``; an older tick than the last one is ignored."""
        if at_us < self.price_times.get(asset, -1) or price <= 0:
            return []
        p = price_key(price)
        self.prices[asset] = price
        self.price_times[asset] = at_us
        touched: dict[str, Watched] = {}
        book = self.down.get(asset)
        if book:
            i = bisect_left(book, (p, ""))
            for _, loan_id in book[i:]:
                touched[loan_id] = self.loans[loan_id]
            del book[i:]
        book = self.up.get(asset)
        if book:
            j = bisect_left(book, (p, ""))
            # keys < p, and not equal: key == p means the price sits exactly on the re-arm line
            for _, loan_id in book[:j]:
                touched[loan_id] = self.loans[loan_id]
            del book[:j]
        for loan_id in self.multi.get(asset, ()):
            touched[loan_id] = self.loans[loan_id]
        actions: list[Action] = []
        for loan_id in sorted(touched):
            actions += self._rejudge(touched[loan_id])
        return actions

    def hour_started(self, hour: int) -> list[Action]:
        """Hour ``hour`` has started: charge it into every open loan's debt (O(loans))."""
        if hour <= self.hour:
            return []
        self.hour = hour
        actions: list[Action] = []
        for loan_id in sorted(self.loans):
            w = self.loans[loan_id]
            if domain.charge_hours(w.money, hour):
                actions += self._rejudge(w)
        return actions

    def ltv(self, loan_id: str) -> Fraction | None:
        w = self.loans.get(loan_id)
        if w is None or any(a not in self.prices for a in w.priced_assets()):
            return None
        return domain.ltv(w.money, self.prices)


def band_of(value: Fraction, levels: Levels) -> str:
    """The LTV band a loan is in (the metric's label)."""
    if value >= levels.liquidation:
        return "liquidation"
    if value >= levels.margin_call:
        return "margin_call"
    if value > levels.initial:
        return "above_initial"
    return "healthy"


__all__ = ["Action", "Collateral", "Kind", "LtvMonitor", "band_of", "price_key"]

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
  rule the service applies, ``domain.charge_until``: a fixed-term loan is charged only
  for the hours started by its due time, even while its settlement is pending) and
  judges the loan again.

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
from typing import Any
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
    seq: int  # the loan's count of margin calls and re-arms (tells two crossings at one version apart)


@dataclass(slots=True)
class Watched:
    loan_id: str
    user_id: str
    version: int
    money: Loan
    levels: Levels
    armed: bool = True
    due_us: int | None = None  # a fixed term's due time (None: open-ended)
    liquidation_sent: bool = False
    seq: int = 0
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (list, asset, key)
    # A loan that depends on one price only: that asset, and its trigger keys (margin
    # call, liquidation, re-arm; None: never reached) derived from the debt and collateral.
    simple: str | None = None
    keys: tuple[int | None, int | None, int | None] = (None, None, None)
    coef: Fraction = Fraction(0)  # amount x discount of the priced collateral
    others: Fraction = Fraction(0)  # value of the unpriced (valuation-asset) collateral
    # Simple loans: the price keys of the LTV bands (liquidation, near liquidation, margin
    # call: at or below; above initial: strictly below), derived when first counted after
    # a change of the debt or collateral (None: not derived yet).
    band_keys: tuple[int | None, int | None, int | None, int | None] | None = None

    def priced_assets(self) -> set[str]:
        assets = {c.asset for c in self.money.collateral if c.amount > 0}
        assets.add(self.money.loan_asset)
        assets.discard(domain.VALUATION_ASSET)
        return assets


def charge(w: Watched, hour: int) -> int:
    """Hour ``hour`` has started: charge the loan's hours not charged yet by the service's
    rule (``domain.charge_until``), so a fixed-term loan stops at its due time. Returns
    the units added to the debt."""
    return domain.charge_until(w.money, hour * domain.HOUR_US, w.due_us)


def _key(trigger: Fraction | None) -> int | None:
    if trigger is None:
        return None
    scaled = trigger * _KEY
    return scaled.numerator // scaled.denominator


def prepare(w: Watched) -> None:
    """Derive the loan's trigger keys when it depends on one collateral price only (the
    loan asset the valuation asset, one priced collateral asset once): then its LTV
    against that price is decided by integer comparisons, exactly."""
    m = w.money
    assets = w.priced_assets()
    priced = [c for c in m.collateral if c.asset != domain.VALUATION_ASSET and c.amount > 0]
    w.simple = None
    w.band_keys = None
    if len(assets) != 1 or m.loan_asset != domain.VALUATION_ASSET or len(priced) != 1:
        return
    c = priced[0]
    w.simple = c.asset
    w.coef = Fraction(c.amount, 10**c.scale) * c.discount
    w.others = domain.collateral_value([x for x in m.collateral if x.asset == domain.VALUATION_ASSET], {})
    debt_value = Fraction(m.debt, 10**m.scale)
    amount = Fraction(c.amount, 10**c.scale)
    lv = w.levels
    w.keys = (
        _key(domain.trigger_price(debt_value, lv.margin_call, w.others, amount, c.discount)),
        _key(domain.trigger_price(debt_value, lv.liquidation, w.others, amount, c.discount)),
        _key(domain.trigger_price(debt_value, lv.margin_call - lv.rearm_band, w.others, amount, c.discount)),
    )


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
        self.price_keys: dict[str, int] = {}
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

    def _index(self, w: Watched, batch: dict[tuple[str, str], list[tuple[int, str]]] | None = None) -> None:
        """File the loan under its next triggers (it must be judged at current prices);
        with ``batch``, the sorted entries are collected there and merged by the caller."""
        if w.liquidation_sent:
            return
        if w.simple is None:
            for asset in w.priced_assets():
                self.multi.setdefault(asset, set()).add(w.loan_id)
                w.entries.append(("multi", asset, 0))
            return
        asset = w.simple
        mc, liq, rearm = w.keys
        down = mc if w.armed else liq
        if down is not None:
            if batch is None:
                insort(self.down.setdefault(asset, []), (down, w.loan_id))
            else:
                batch.setdefault(("down", asset), []).append((down, w.loan_id))
            w.entries.append(("down", asset, down))
        if not w.armed and rearm is not None:
            if batch is None:
                insort(self.up.setdefault(asset, []), (rearm, w.loan_id))
            else:
                batch.setdefault(("up", asset), []).append((rearm, w.loan_id))
            w.entries.append(("up", asset, rearm))

    # ---- judging -------------------------------------------------------------------------

    def _judge(self, w: Watched) -> list[Action]:
        """Compare the exact LTV with the levels; the actions due (and the new arming)."""
        if w.liquidation_sent:
            return []
        self.judged += 1
        if w.simple is not None:
            return self._judge_simple(w)
        assets = w.priced_assets()
        if any(a not in self.prices for a in assets):
            return []  # not every price known yet: nothing to judge
        value = domain.ltv(w.money, self.prices)
        lv = w.levels
        return self._transitions(w, value >= lv.margin_call, value < lv.margin_call - lv.rearm_band, value >= lv.liquidation,
                                 lambda: value, assets)

    def _judge_simple(self, w: Watched) -> list[Action]:
        """The same decisions by integer comparisons with the loan's trigger keys."""
        asset = w.simple
        assert asset is not None
        price = self.prices.get(asset)
        if price is None:
            return []
        p = self.price_keys[asset]
        mc, liq, rearm = w.keys

        def value() -> Fraction:  # debt / (coef x price + others), one normalisation instead of four
            m, c, o = w.money, w.coef, w.others
            pn, pd = price.numerator, price.denominator
            return Fraction(m.debt * c.denominator * pd * o.denominator,
                            10**m.scale * (c.numerator * pn * o.denominator + o.numerator * c.denominator * pd))

        return self._transitions(w, mc is not None and p <= mc, rearm is None or p > rearm, liq is not None and p <= liq, value, (asset,))

    def _transitions(self, w: Watched, at_call: bool, below_rearm: bool, at_liquidation: bool, value: Any, assets: Iterable[str]) -> list[Action]:
        out = []
        if w.armed and at_call:
            w.armed = False
            w.seq += 1
            out.append(self._action(Kind.MARGIN_CALL, w, value(), assets))
        elif not w.armed and below_rearm and not at_call:
            w.armed = True
            w.seq += 1
            out.append(self._action(Kind.REARMED, w, value(), assets))
        if at_liquidation:
            w.liquidation_sent = True
            out.append(self._action(Kind.LIQUIDATION, w, value(), assets))
        return out

    def _action(self, kind: Kind, w: Watched, value: Fraction, assets: Iterable[str]) -> Action:
        return Action(kind, w.loan_id, w.user_id, w.version, value, tuple(sorted((a, self.prices[a]) for a in assets)),
                      w.money.debt, w.money.charged_through, w.seq)

    def _rejudge(self, w: Watched) -> list[Action]:
        self._unindex(w)
        actions = self._judge(w)
        self._index(w)
        return actions

    # ---- inputs --------------------------------------------------------------------------

    def upsert(self, loan_id: str, user_id: str, version: int, money: Loan, levels: Levels, *, open_: bool = True,
               due_us: int | None = None) -> list[Action]:
        """A loan's state from the service (a newer version replaces an older one; an
        older or equal one is ignored). A closed or liquidated loan leaves the monitor.
        ``due_us``: a fixed-term loan's due time, after which no hour is charged."""
        current = self.loans.get(loan_id)
        if current is not None and version <= current.version:
            return []
        if current is not None:
            self._unindex(current)
        if not open_:
            self.loans.pop(loan_id, None)
            return []
        w = Watched(loan_id, user_id, version, money, levels, due_us=due_us)
        if current is not None:
            w.armed = current.armed  # a called loan stays called until its LTV recovers
            w.seq = current.seq
        if self.hour:
            charge(w, self.hour)
        prepare(w)
        self.loans[loan_id] = w
        actions = self._judge(w)
        self._index(w)
        return actions

    def restore(self, loan_id: str, user_id: str, version: int, money: Loan, levels: Levels, armed: bool, liquidation_sent: bool,
                seq: int, due_us: int | None = None) -> None:
        """A loan as it was saved (after a restart): filed under its triggers, not judged
        (it was judged before it was saved; the next input judges it again)."""
        w = Watched(loan_id, user_id, version, money, levels, armed=armed, liquidation_sent=liquidation_sent, seq=seq, due_us=due_us)
        prepare(w)
        self.loans[loan_id] = w
        self._index(w)

    def price(self, asset: str, price: Fraction, at_us: int) -> list[Action]:
        """An index tick of ``<asset>/USDT``; an older tick than the last one is ignored."""
        if at_us < self.price_times.get(asset, -1) or price <= 0:
            return []
        p = price_key(price)
        self.prices[asset] = price
        self.price_keys[asset] = p
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
        batch: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for loan_id in sorted(touched):
            w = touched[loan_id]
            self._unindex(w)
            actions += self._judge(w)
            self._index(w, batch)
        for (which, name), items in batch.items():  # one merge per list (two sorted runs), not an insertion per loan
            book = (self.down if which == "down" else self.up).setdefault(name, [])
            book.extend(items)
            book.sort()
        return actions

    def hour_started(self, hour: int) -> list[Action]:
        """Hour ``hour`` has started: charge it into every open loan's debt (O(loans))."""
        if hour <= self.hour:
            return []
        self.hour = hour
        actions: list[Action] = []
        for loan_id in sorted(self.loans):
            w = self.loans[loan_id]
            if charge(w, hour):
                self._unindex(w)
                prepare(w)
                actions += self._rejudge(w)
        return actions

    def bands(self) -> dict[str, int]:
        """Open loans per LTV band at the current prices (band_of, exactly)."""
        counts = dict.fromkeys(BANDS, 0)
        self.count_bands(list(self.loans.values()), counts)
        return counts

    def count_bands(self, loans: Iterable[Watched], counts: dict[str, int]) -> None:
        """Add ``loans`` to ``counts`` by LTV band: a one-price loan by integer comparisons
        of the price key with its band keys (derived once per debt or collateral change),
        the others by their LTV. A loan no longer watched is left out."""
        for w in loans:
            if self.loans.get(w.loan_id) is not w:
                continue
            asset = w.simple
            if asset is None:
                value = self.ltv(w.loan_id)
                if value is not None:
                    counts[band_of(value, w.levels)] += 1
                continue
            p = self.price_keys.get(asset)
            if p is None:
                continue
            keys = w.band_keys
            if keys is None:
                keys = w.band_keys = _band_keys(w)
            liq, near, mc, initial = keys
            if liq is not None and p <= liq:
                counts["liquidation"] += 1
            elif near is not None and p <= near:
                counts["near_liquidation"] += 1
            elif mc is not None and p <= mc:
                counts["margin_call"] += 1
            elif initial is not None and p < initial:
                counts["above_initial"] += 1
            else:
                counts["healthy"] += 1

    def ltv(self, loan_id: str) -> Fraction | None:
        w = self.loans.get(loan_id)
        if w is None or any(a not in self.prices for a in w.priced_assets()):
            return None
        return domain.ltv(w.money, self.prices)


BANDS = ("healthy", "above_initial", "margin_call", "near_liquidation", "liquidation")


def _band_keys(w: Watched) -> tuple[int | None, int | None, int | None, int | None]:
    """A one-price loan's LTV is at or over a level exactly when the price is at or below
    the level's trigger T (the LTV falls as the price rises): price key <= floor(T x 10^18).
    Over the initial level (strictly): price < T, key < ceil(T x 10^18)."""
    m = w.money
    debt_value = Fraction(m.debt, 10**m.scale)
    lv = w.levels

    def trigger(level: Fraction) -> Fraction | None:  # domain.trigger_price with coef = amount x discount
        p = (debt_value / level - w.others) / w.coef
        return p if p > 0 else None

    initial = trigger(lv.initial)
    ceil_initial = None
    if initial is not None:
        scaled = initial * _KEY
        ceil_initial = -((-scaled.numerator) // scaled.denominator)
    mc, liq, _ = w.keys  # the margin-call and liquidation keys are the monitor's own triggers
    return liq, _key(trigger((lv.margin_call + lv.liquidation) / 2)), mc, ceil_initial


def band_of(value: Fraction, levels: Levels) -> str:
    """The LTV band a loan is in (the metric's label): healthy (at or below the initial
    level), above_initial, margin_call (the lower half of margin call to liquidation),
    near_liquidation (the upper half) and liquidation (not yet executed)."""
    if value >= levels.liquidation:
        return "liquidation"
    if value >= (levels.margin_call + levels.liquidation) / 2:
        return "near_liquidation"  # the upper half of the margin-call range (85% to 90% by default)
    if value >= levels.margin_call:
        return "margin_call"
    if value > levels.initial:
        return "above_initial"
    return "healthy"


__all__ = ["BANDS", "Action", "Collateral", "Kind", "LtvMonitor", "band_of", "price_key"]

"""The engine's LTV monitor (services/accrual/loan.py) against a brute-force reference
that judges every loan at every tick with the exact LTV: the same margin calls (one per
crossing, re-armed below the band), re-arms and liquidations (once per loan state), on
random price paths over single- and multi-collateral loans; and a tick judges only the
loans that cross (plus multi-price ones), not all of them."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings, strategies as st

from services.accrual.loan import BANDS, Kind, LtvMonitor, band_of
from services.loan import domain
from services.loan.domain import Collateral, Levels, Loan

LEVELS = Levels()


def loan_money(debt_units: int, collateral: list[Collateral]) -> Loan:
    return Loan("USDT", 6, debt_units, 0, Fraction(0), 10**9, 10**9 - 1, collateral=collateral)


class Reference:
    """Every loan, every tick, exact LTV, the hysteresis state machine."""

    def __init__(self) -> None:
        self.loans: dict[str, Loan] = {}
        self.armed: dict[str, bool] = {}
        self.liquidated: set[str] = set()

    def judge(self, prices: dict[str, Fraction]) -> list[tuple[str, str]]:
        out = []
        for loan_id in sorted(self.loans):
            if loan_id in self.liquidated:
                continue
            m = self.loans[loan_id]
            assets = {c.asset for c in m.collateral} - {"USDT"}
            if any(a not in prices for a in assets):
                continue
            v = domain.ltv(m, prices)
            if self.armed[loan_id] and v >= LEVELS.margin_call:
                self.armed[loan_id] = False
                out.append((Kind.MARGIN_CALL.value, loan_id))
            elif not self.armed[loan_id] and v < LEVELS.margin_call - LEVELS.rearm_band:
                self.armed[loan_id] = True
                out.append((Kind.REARMED.value, loan_id))
            if v >= LEVELS.liquidation:
                self.liquidated.add(loan_id)
                out.append((Kind.LIQUIDATION.value, loan_id))
        return out


loan_st = st.tuples(
    st.integers(1, 10**11),  # debt, USDT units
    st.lists(st.tuples(st.sampled_from(["BTC", "ETH", "USDT"]), st.integers(1, 10**9), st.sampled_from([10000, 9500, 9000, 5000])),
             min_size=1, max_size=3, unique_by=lambda t: t[0]),
)
tick_st = st.tuples(st.sampled_from(["BTC", "ETH"]), st.integers(1, 4000))


@settings(max_examples=200, deadline=None)
@given(loans=st.lists(loan_st, min_size=1, max_size=12), ticks=st.lists(tick_st, min_size=1, max_size=40))
def test_monitor_matches_brute_force(loans: list, ticks: list) -> None:
    monitor, ref = LtvMonitor(), Reference()
    prices: dict[str, Fraction] = {}
    scales = {"BTC": 8, "ETH": 18, "USDT": 6}
    for n, (debt, coll) in enumerate(loans):
        c = [Collateral(a, scales[a], max(1, amount * 10 ** scales[a] // 10**8), Fraction(d, 10**4)) for a, amount, d in coll]
        loan_id = f"L{n:03d}"
        ref.loans[loan_id] = loan_money(debt, c)
        ref.armed[loan_id] = True
        got = sorted((a.kind.value, a.loan_id) for a in monitor.upsert(loan_id, "u", 1, loan_money(debt, list(c)), LEVELS))
        assert got == sorted(ref.judge(prices))
    for t, (asset, cents) in enumerate(ticks):
        price = Fraction(cents * 10, 1)  # 10 to 40,000 USDT
        prices[asset] = price
        got = sorted((a.kind.value, a.loan_id) for a in monitor.price(asset, price, t))
        assert got == sorted(ref.judge(prices))
        # the LTV bands (by keys for one-price loans) against the exact LTV of every loan
        expected = dict.fromkeys(BANDS, 0)
        for loan_id, w in monitor.loans.items():
            if all(a in prices for a in w.priced_assets()):
                expected[band_of(domain.ltv(ref.loans[loan_id], prices), LEVELS)] += 1
        assert monitor.bands() == expected


def test_one_margin_call_per_crossing_and_a_tick_touches_only_crossing_loans() -> None:
    monitor = LtvMonitor()
    # 1,000 loans of 1 BTC counted 100%, debts 1,000 .. 50,950 USDT: margin call at debt / 0.8
    for i in range(1000):
        debt = (1000 + 50 * i) * 10**6
        monitor.upsert(f"L{i:04d}", "u", 1, loan_money(debt, [Collateral("BTC", 8, 10**8, Fraction(1))]), LEVELS)
    monitor.price("BTC", Fraction(100_000), 0)
    before = monitor.judged
    # price to 62,500: the margin call price of debt 50,000 (i = 980) and above; 20 loans
    calls = [a for a in monitor.price("BTC", Fraction(62_500), 1) if a.kind is Kind.MARGIN_CALL]
    assert [a.loan_id for a in calls] == [f"L{i:04d}" for i in range(980, 1000)]
    assert monitor.judged - before == 20
    # jitter just around the level: nothing (re-armed only below 79%)
    for t, p in enumerate(["62499.99", "62500.01", "62450", "62600", "63000"], start=2):
        assert [a for a in monitor.price("BTC", Fraction(p), t) if a.kind is Kind.MARGIN_CALL] == []
    # a recovery below 79% for the loan of debt 50,000: price above 63,291.139...
    acts = monitor.price("BTC", Fraction(63_300), 10)
    assert ("rearmed", "L0980") in {(a.kind.value, a.loan_id) for a in acts}
    acts = monitor.price("BTC", Fraction(62_500), 11)
    assert ("margin_call", "L0980") in {(a.kind.value, a.loan_id) for a in acts}
    # the crash: liquidation of every loan at or over 90%, once
    acts = monitor.price("BTC", Fraction(50_000), 12)
    liq = sorted(a.loan_id for a in acts if a.kind is Kind.LIQUIDATION)
    assert liq == [f"L{i:04d}" for i in range(1000) if (1000 + 50 * i) * 10 >= 50_000 * 9]
    assert [a for a in monitor.price("BTC", Fraction(40_000), 13) if a.kind is Kind.LIQUIDATION and a.loan_id in liq] == []


def test_interest_charged_each_hour_can_cross() -> None:
    monitor = LtvMonitor()
    m = Loan("USDT", 6, 79_990 * 10**6, 0, Fraction(1, 10**3), 100, 99, collateral=[Collateral("BTC", 8, 10**8, Fraction(1))])
    monitor.price("BTC", Fraction(100_000), 0)
    assert monitor.upsert("L1", "u", 1, m, LEVELS) == []
    acts = monitor.hour_started(100)  # 79.99 USDT of interest: 80,069.99 / 100,000
    assert [a.kind for a in acts] == [Kind.MARGIN_CALL]
    assert acts[0].debt == 79_990 * 10**6 + 79_990_000


def test_bands_at_their_exact_boundaries() -> None:
    """42,840 USDT on 1 BTC counted 100%: 70% at 61,200, 80% at 53,550, 85% (near
    liquidation) at 50,400, 90% at 47,600; a level reached belongs to the band above it,
    except the initial level (at 70% a loan is healthy)."""
    monitor = LtvMonitor()
    monitor.upsert("L1", "u", 1, loan_money(42_840 * 10**6, [Collateral("BTC", 8, 10**8, Fraction(1))]), LEVELS)
    for t, (price, band) in enumerate([("61200", "healthy"), ("61199.99", "above_initial"), ("53550.01", "above_initial"),
                                       ("53550", "margin_call"), ("50400.01", "margin_call"), ("50400", "near_liquidation"),
                                       ("47600.01", "near_liquidation"), ("47600", "liquidation")]):
        monitor.price("BTC", Fraction(price), t)
        assert monitor.bands() == {**dict.fromkeys(BANDS, 0), band: 1}, price
        assert band_of(monitor.ltv("L1") or Fraction(0), LEVELS) == band

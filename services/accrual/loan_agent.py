"""The Crypto Loan agent of the accrual engine: LTV monitoring in the stream.

Two faust agents, installed by the engine's ``main`` next to the Launchpool one:

- ``loan_prices`` reads ``market.prices`` (the index ticks) through its own ``InputGuard``
  and copies each ``<ASSET>/USDT`` tick into *every* partition of ``loan.ltv`` (like the
  hour ticks), with an event id derived from the tick's and the partition: each
  partition then sees prices, loan states and hour starts in one order, and its LTV
  decisions are a function of its input. A tick faust's stream skips is read directly
  (revealed by the next tick of its partition, or by the watchdog when none follows), so
  it is forwarded at once rather than its action waiting for the next tick; the next
  offset per ``market.prices`` partition is kept in the agent's table
  ``loan_price_offsets`` (as many partitions as market.prices).
- ``loan`` reads ``loan.ltv`` through the engine's ``InputGuard`` (messages faust's stream
  skips are read directly): ``LoanStateChanged`` (key = loan id; the newest version
  replaces the loan), ``HourClosed`` (hour ``hour`` started: charge it into every open
  loan's debt) and the copied ``PriceTick`` s. The pure ``LtvMonitor``
  (``services.accrual.loan``) says which loans cross; their ``LoanLtvAction`` s go to
  ``loan.actions`` (key = loan id), then the loans' new arming is written to the table.

State: table ``loan_state`` (``l:<partition>:<loan_id>`` -> the loan's money, levels,
arming, sequence; ``m:<partition>`` -> the partition's prices and hour), changelog kept
forever and created before the worker starts. The monitor of a partition is rebuilt
from the table when the partition is first seen after a (re)start or rebalance.

At-least-once: a crash after an action was sent and before the table write re-sends it
on replay; the loan service records an action once per (loan, kind, version, sequence)
and executes a liquidation once per loan, at the version judged.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from earn.v1 import accrual_pb2, loan_pb2, market_pb2
from services.accrual.delivery import InputGuard, InputReader, parse_drops
from services.accrual.loan import Action, Kind, LtvMonitor, band_of
from services.kernel import events, money
from services.kernel.config import Settings
from services.kernel.topics import CATALOGUE, TopicSpec, topic_name
from services.loan import domain
from services.loan.domain import Collateral, Levels, Loan

log = logging.getLogger(__name__)

INPUT = "loan.ltv"
PRICES = "market.prices"
OUTPUT = "loan.actions"
PRODUCER = "accrual"
TABLE = "loan_state"
PRICE_TABLE = "loan_price_offsets"  # loan_prices' next input offset per market.prices partition
BANDS_EVERY = 10.0  # seconds between two recounts of a partition's LTV bands (a recount judges every loan)
CHANGELOG_CONFIGS = {"cleanup.policy": "compact", "retention.ms": "-1", "min.compaction.lag.ms": str(24 * 3600 * 1000)}

EVENTS = Counter("earn_accrual_loan_events_total", "Loan input events processed, by type", ["type"])
SKIPPED = Counter("earn_accrual_loan_events_skipped_total", "Loan input events skipped, by reason", ["reason"])
ACTIONS = Counter("earn_accrual_loan_actions_total", "Margin calls, re-arms and liquidation triggers emitted", ["kind"])
BANDS = Gauge("earn_accrual_loans_by_ltv_band", "Open loans per LTV band (healthy, above_initial, margin_call, near_liquidation, liquidation), per partition",
              ["band", "partition"])
TICK_TO_ACTION = Histogram(
    "earn_accrual_loan_tick_to_action_seconds", "From a price tick's event time to its last action sent by the engine",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_KIND = {Kind.MARGIN_CALL: loan_pb2.LOAN_EVENT_KIND_MARGIN_CALL, Kind.REARMED: loan_pb2.LOAN_EVENT_KIND_REARMED,
         Kind.LIQUIDATION: loan_pb2.LOAN_EVENT_KIND_LIQUIDATION}
_TYPES = {
    loan_pb2.LoanStateChanged.DESCRIPTOR.full_name: loan_pb2.LoanStateChanged,
    accrual_pb2.HourClosed.DESCRIPTOR.full_name: accrual_pb2.HourClosed,
    market_pb2.PriceTick.DESCRIPTOR.full_name: market_pb2.PriceTick,
}


def changelog_topics(app_id: str) -> list[TopicSpec]:
    lag = int(CHANGELOG_CONFIGS["min.compaction.lag.ms"])
    return [TopicSpec(f"{app_id}-{TABLE}-changelog", partitions=CATALOGUE[INPUT].partitions, retention_ms=-1, compacted=True,
                      min_compaction_lag_ms=lag),
            TopicSpec(f"{app_id}-{PRICE_TABLE}-changelog", partitions=CATALOGUE[PRICES].partitions, retention_ms=-1, compacted=True,
                      min_compaction_lag_ms=lag)]


def _frac(text: str) -> Fraction:
    return Fraction(text)


def money_of(msg: loan_pb2.LoanStateChanged) -> tuple[Loan, Levels]:
    scale = money.scale_of(msg.loan_asset)
    loan = Loan(
        msg.loan_asset, scale, int(msg.principal_units), int(msg.interest_units), _frac(msg.hourly_rate), msg.start_hour,
        msg.charged_through, exact_interest=Fraction(msg.interest_carry_e10, 10**10), charged_units=0,
        collateral=[Collateral(c.asset, money.scale_of(c.asset), int(c.amount), _frac(c.discount)) for c in msg.collateral],
    )
    levels = Levels(_frac(msg.initial_ltv), _frac(msg.margin_call_ltv), _frac(msg.liquidation_ltv), _frac(msg.liquidation_fee),
                    _frac(msg.rearm_band))
    return loan, levels


def _dump(w: Any) -> str:
    m = w.money
    return json.dumps({
        "u": w.user_id, "v": w.version, "a": m.loan_asset, "s": m.scale, "p": m.principal, "i": m.interest, "r": str(m.hourly_rate),
        "sh": m.start_hour, "ct": m.charged_through, "x": str(m.exact_interest - m.charged_units),
        "c": [[c.asset, c.scale, c.amount, str(c.discount)] for c in m.collateral],
        "l": [str(x) for x in (w.levels.initial, w.levels.margin_call, w.levels.liquidation, w.levels.fee, w.levels.rearm_band)],
        "armed": w.armed, "liq": w.liquidation_sent, "seq": w.seq,
    }, separators=(",", ":"))


def _load(monitor: LtvMonitor, loan_id: str, raw: str) -> None:
    d = json.loads(raw)
    m = Loan(d["a"], d["s"], d["p"], d["i"], Fraction(d["r"]), d["sh"], d["ct"], exact_interest=Fraction(d["x"]), charged_units=0,
             collateral=[Collateral(a, s, n, Fraction(x)) for a, s, n, x in d["c"]])
    monitor.restore(loan_id, d["u"], d["v"], m, Levels(*(Fraction(x) for x in d["l"])), d["armed"], d["liq"], d["seq"])


class LoanEngine:
    def __init__(self, app: faust.App | None, output: Any, partitions: int) -> None:
        self.app, self.output, self.partitions = app, output, partitions
        if app is not None:
            self.table: Any = app.Table(TABLE, default=None, partitions=partitions, help="per partition: open loans and prices",
                                        schema=faust.Schema(key_type=str, value_type=str, key_serializer="raw", value_serializer="raw"),
                                        extra_topic_configs=CHANGELOG_CONFIGS)
            app.on_partitions_assigned.connect(self._forget)
            app.on_partitions_revoked.connect(self._forget)
        else:
            self.table = {}
        self.monitors: dict[int, LtvMonitor] = {}
        self._bands_at: dict[int, float] = {}

    async def _forget(self, *args: Any, **kwargs: Any) -> None:
        self.monitors.clear()

    def monitor(self, partition: int) -> LtvMonitor:
        found = self.monitors.get(partition)
        if found is None:
            found = self.monitors[partition] = LtvMonitor()
            meta = self.table.get(f"m:{partition}")
            if meta is not None:
                d = json.loads(meta if isinstance(meta, str) else meta.decode())
                found.hour = d["h"]
                for asset, (price, at) in d["p"].items():
                    found.prices[asset] = Fraction(price)
                    found.price_keys[asset] = (Fraction(price) * 10**18).numerator
                    found.price_times[asset] = at
            prefix = f"l:{partition}:"
            for key in list(self.table.keys()):
                key = key if isinstance(key, str) else key.decode()
                if key.startswith(prefix):
                    raw = self.table.get(key)
                    if raw is not None:
                        _load(found, key[len(prefix):], raw if isinstance(raw, str) else raw.decode())
        return found

    def _save_meta(self, partition: int, monitor: LtvMonitor) -> None:
        self.table[f"m:{partition}"] = json.dumps({"h": monitor.hour, "p": {a: [str(p), monitor.price_times[a]] for a, p in monitor.prices.items()}})

    def _save(self, partition: int, monitor: LtvMonitor, loan_ids: set[str]) -> None:
        for loan_id in sorted(loan_ids):
            w = monitor.loans.get(loan_id)
            key = f"l:{partition}:{loan_id}"
            if w is None:
                if self.table.get(key) is not None:
                    del self.table[key]
            else:
                self.table[key] = _dump(w)

    async def _send(self, actions: list[Action], price_time: datetime | None) -> None:
        for a in actions:
            msg = loan_pb2.LoanLtvAction(
                loan_id=a.loan_id, user_id=a.user_id, version=a.version, kind=_KIND[a.kind], ltv=f"{a.ltv.numerator}/{a.ltv.denominator}",
                prices={asset: str(Decimal(p.numerator) / Decimal(p.denominator)) for asset, p in a.prices}, debt_units=str(a.debt),
                charged_through=a.charged_through, seq=a.seq,
            )
            if price_time is not None:
                msg.price_time.FromDatetime(price_time)
            event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"earn-accrual-loan:{a.loan_id}:{a.kind.value}:{a.version}:{a.seq}")
            env = events.wrap(msg, key=a.loan_id, producer=PRODUCER, occurred_at=datetime.now(UTC), event_id=event_id)
            await self.output.send(key=a.loan_id.encode(), value=env.SerializeToString(deterministic=True))
            ACTIONS.labels(a.kind.value).inc()

    def _bands(self, partition: int, monitor: LtvMonitor) -> None:
        counts = {"healthy": 0, "above_initial": 0, "margin_call": 0, "near_liquidation": 0, "liquidation": 0}
        for loan_id, w in monitor.loans.items():
            value = monitor.ltv(loan_id)
            if value is not None:
                counts[band_of(value, w.levels)] += 1
        for band, n in counts.items():
            BANDS.labels(band, str(partition)).set(n)

    async def apply(self, partition: int, offset: int, value: bytes) -> None:
        try:
            env = events.parse(value)
            cls = _TYPES.get(env.type)
            if cls is None:
                SKIPPED.labels("unknown_type").inc()
                return
            msg = events.unwrap(env, cls)
        except Exception:  # noqa: BLE001 - a poison message must not stop the partition
            SKIPPED.labels("undecodable").inc()
            log.error("undecodable loan input skipped", extra={"partition": partition, "offset": offset})
            return
        EVENTS.labels(cls.__name__).inc()
        monitor = self.monitor(partition)
        price_time = None
        if isinstance(msg, loan_pb2.LoanStateChanged):
            try:
                loan, levels = money_of(msg)
            except Exception as err:  # noqa: BLE001
                SKIPPED.labels("invalid").inc()
                log.error("LoanStateChanged refused", extra={"loan_id": msg.loan_id, "error": str(err)})
                return
            before = set(monitor.loans)
            actions = monitor.upsert(msg.loan_id, msg.user_id, msg.version, loan, levels, open_=msg.status == loan_pb2.LOAN_STATUS_OPEN)
            touched = {msg.loan_id} | (before ^ set(monitor.loans))
        elif isinstance(msg, accrual_pb2.HourClosed):
            actions = monitor.hour_started(msg.hour)
            touched = set(monitor.loans)  # every open loan's debt grew
        else:
            base, _, quote = msg.pair.partition("/")
            if quote != domain.VALUATION_ASSET or not msg.price:
                SKIPPED.labels("pair").inc()
                return
            try:
                price = Fraction(money.parse_decimal(msg.price, "price", scale=18))
            except Exception:  # noqa: BLE001
                SKIPPED.labels("invalid").inc()
                return
            price_time = msg.event_time.ToDatetime(tzinfo=UTC)
            actions = monitor.price(base, price, msg.event_time.seconds * 1_000_000 + msg.event_time.nanos // 1000)
            touched = {a.loan_id for a in actions}
        await self._send(actions, price_time)
        if price_time is not None and actions:
            TICK_TO_ACTION.observe(max(0.0, time.time() - price_time.timestamp()))
        self._save(partition, monitor, touched)
        if not isinstance(msg, loan_pb2.LoanStateChanged):
            self._save_meta(partition, monitor)
        if (isinstance(msg, accrual_pb2.HourClosed) or actions) and time.monotonic() - self._bands_at.get(partition, 0.0) >= BANDS_EVERY:
            self._bands_at[partition] = time.monotonic()  # O(loans of the partition): at most every BANDS_EVERY seconds
            self._bands(partition, monitor)


def install(app: faust.App, settings: Settings) -> LoanEngine:
    """Add the loan table and the two agents to the accrual engine's faust app."""
    partitions = CATALOGUE[INPUT].partitions
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", internal=False)
    source = app.topic(topic_name(settings, INPUT), partitions=partitions, **raw)
    prices = app.topic(topic_name(settings, PRICES), partitions=CATALOGUE[PRICES].partitions, **raw)
    output = app.topic(topic_name(settings, OUTPUT), partitions=CATALOGUE[OUTPUT].partitions, **raw)
    engine = LoanEngine(app, output, partitions)
    stall = float(getattr(settings, "stall_seconds", 15.0))
    drops = str(getattr(settings, "drop_input", ""))
    guard = InputGuard("loan", engine.apply, InputReader(settings.kafka_bootstrap, topic_name(settings, INPUT), app.conf.id),
                       offsets=engine.table)
    guard.install(app, stall)
    guard.drop = parse_drops(drops, "loan")

    async def forward(partition: int, offset: int, value: bytes) -> None:
        """Copy one tick into every partition of loan.ltv (derived ids: a replay copies the same events)."""
        try:
            env = events.parse(value)
        except Exception:  # noqa: BLE001
            SKIPPED.labels("undecodable_tick").inc()
            return
        if env.type != market_pb2.PriceTick.DESCRIPTOR.full_name:
            return
        for p in range(partitions):
            copy = type(env)()
            copy.CopyFrom(env)
            copy.event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"earn-accrual-loan-tick:{env.event_id}:{p}"))
            await source.send(key=env.key.encode(), value=copy.SerializeToString(deterministic=True), partition=p, force=True)

    price_offsets = app.Table(PRICE_TABLE, default=None, partitions=CATALOGUE[PRICES].partitions,
                              help="per market.prices partition: the next offset the price forwarder expects",
                              schema=faust.Schema(key_type=str, value_type=str, key_serializer="raw", value_serializer="raw"),
                              extra_topic_configs=CHANGELOG_CONFIGS)
    forwarder = InputGuard("loan_prices", forward, InputReader(settings.kafka_bootstrap, topic_name(settings, PRICES), app.conf.id),
                           offsets=price_offsets)
    forwarder.install(app, stall)
    forwarder.drop = parse_drops(drops, "loan_prices")

    async def loan(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await guard.deliver(event.message.partition, event.message.offset, event.value)

    async def loan_prices(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await forwarder.deliver(event.message.partition, event.message.offset, event.value)

    app.agent(source, name="loan", concurrency=1)(loan)
    app.agent(prices, name="loan_prices", concurrency=1)(loan_prices)
    return engine

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
  replaces the loan; ``due_at`` for a fixed term), ``HourClosed`` (hour ``hour`` started:
  charge it into every open loan's debt, a fixed-term loan only for the hours started by
  its due time, as the service does) and the copied ``PriceTick`` s. The pure ``LtvMonitor``
  (``services.accrual.loan``) says which loans cross; their ``LoanLtvAction`` s go to
  ``loan.actions`` as ``LoanActions`` batches (one message per input message and
  partition, at most ``BATCH_MAX`` actions each, to the same partition of loan.actions),
  then the loans' new arming is written to the table.

State: table ``loan_state`` (``l:<partition>:<loan_id>`` -> the loan's money and levels,
written when they change: a loan state, an hour; ``b:<partition>:<bucket>`` -> the
arming of the bucket's loans, a JSON object ``{loan_id: "<armed><liquidation
sent>:<sequence>"}`` holding every loan whose arming is not the default, rewritten when an
action changes one of them, which is all a tick changes; ``m:<partition>`` -> the
partition's prices and hour), changelog kept forever and created before the worker
starts. The arming lives in ``ARMING_BUCKETS`` records per partition rather than one per
loan: a price crash that margin-calls 25,000 loans writes 256 records per partition, not
25,000 (each changelog record costs the engine about 20 µs, table write and produce).
The monitor of a partition is rebuilt from the table when the partition is first seen
after a (re)start or rebalance; per-loan arming records (``a:<partition>:<loan_id>``,
written before the buckets) are then moved into their buckets.

At-least-once: a crash after an action was sent and before the table write re-sends it
on replay; the loan service records an action once per (loan, kind, version, sequence)
and executes a liquidation once per loan, at the version judged.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
import zlib
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

import faust
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge, Histogram

from earn.v1 import accrual_pb2, loan_pb2, market_pb2
from services.accrual.delivery import InputGuard, InputReader, parse_drops
from services.accrual.loan import BANDS as BAND_NAMES, Action, Kind, LtvMonitor
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
BATCH_MAX = 1000  # actions per LoanActions message (well under the producer's 1 MB request)
BANDS_EVERY = 10.0  # seconds between two recounts of the LTV bands (a timer: integer comparisons per loan)
FREEZE_EVERY = 1000  # loan states between two settle_heap calls
ARMING_BUCKETS = 256  # arming records per partition (a price crash rewrites at most this many, not one per loan)
BANDS_CHUNK = 5000  # loans counted between two yields to the agents
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


def settle_heap() -> None:
    """Collect the garbage made since the last call, then move every object still alive
    out of the cyclic collector's reach (``gc.freeze``). The open loans are long-lived and
    free of reference cycles; left to CPython's collector, a full collection scans all of
    them (about 1 s with 100,000 loans), and it comes at whatever input triggers it, such
    as a price crash. Called after every ``FREEZE_EVERY`` loan states and after a
    partition's monitor is rebuilt, so each call scans only what came since the last."""
    gc.collect()
    gc.freeze()


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


def due_of(msg: loan_pb2.LoanStateChanged) -> int | None:
    """A fixed-term loan's due time in microseconds (None: open-ended, or a state written
    before the service sent it)."""
    return msg.due_at.ToMicroseconds() if msg.HasField("due_at") else None


def _dump(w: Any) -> str:
    m = w.money
    extra = {} if w.due_us is None else {"d": w.due_us}  # a fixed term's due time (absent: open-ended)
    return json.dumps({
        "u": w.user_id, "v": w.version, "a": m.loan_asset, "s": m.scale, "p": m.principal, "i": m.interest, "r": str(m.hourly_rate),
        "sh": m.start_hour, "ct": m.charged_through, "x": str(m.exact_interest - m.charged_units),
        "c": [[c.asset, c.scale, c.amount, str(c.discount)] for c in m.collateral],
        "l": [str(x) for x in (w.levels.initial, w.levels.margin_call, w.levels.liquidation, w.levels.fee, w.levels.rearm_band)],
        **extra,
    }, separators=(",", ":"))


DEFAULT_ARMING = "10:0"  # armed, no liquidation sent, sequence 0: a loan without an entry in its bucket


def _dump_arming(w: Any) -> str:
    return f"{int(w.armed)}{int(w.liquidation_sent)}:{w.seq}"


def arming_bucket(loan_id: str) -> int:
    """The arming record a loan's arming is kept in (a stable hash: the same after a restart)."""
    return zlib.crc32(loan_id.encode()) % ARMING_BUCKETS


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def _load(monitor: LtvMonitor, loan_id: str, raw: str, arming: str | None) -> None:
    d = json.loads(raw)
    m = Loan(d["a"], d["s"], d["p"], d["i"], Fraction(d["r"]), d["sh"], d["ct"], exact_interest=Fraction(d["x"]), charged_units=0,
             collateral=[Collateral(a, s, n, Fraction(x)) for a, s, n, x in d["c"]])
    if arming is not None:
        flags, _, seq = arming.partition(":")
        armed, liq, n = flags[0] == "1", flags[1] == "1", int(seq)
    else:  # the default (armed, nothing sent), or written before the arming had its own key
        armed, liq, n = d.get("armed", True), d.get("liq", False), d.get("seq", 0)
    monitor.restore(loan_id, d["u"], d["v"], m, Levels(*(Fraction(x) for x in d["l"])), armed, liq, n, due_us=d.get("d"))


class LoanEngine:
    def __init__(self, app: faust.App | None, output: Any, partitions: int) -> None:
        self.app, self.output, self.partitions = app, output, partitions
        self.output_partitions = CATALOGUE[OUTPUT].partitions
        if app is not None:
            self.table: Any = app.Table(TABLE, default=None, partitions=partitions, help="per partition: open loans and prices",
                                        schema=faust.Schema(key_type=str, value_type=str, key_serializer="raw", value_serializer="raw"),
                                        extra_topic_configs=CHANGELOG_CONFIGS)
            app.on_partitions_assigned.connect(self._forget)
            app.on_partitions_revoked.connect(self._forget)
        else:
            self.table = {}
        self.monitors: dict[int, LtvMonitor] = {}
        self.armings: dict[int, dict[int, dict[str, str]]] = {}  # partition -> bucket -> loan -> arming (not the default)
        self._banded: set[int] = set()  # partitions whose band gauges this worker set
        self._young = 0  # loan states applied since the heap was last settled

    async def _forget(self, *args: Any, **kwargs: Any) -> None:
        self.monitors.clear()
        self.armings.clear()

    def monitor(self, partition: int) -> LtvMonitor:
        found = self.monitors.get(partition)
        if found is None:
            found = self.monitors[partition] = LtvMonitor()
            meta = self.table.get(f"m:{partition}")
            if meta is not None:
                d = json.loads(_text(meta))
                found.hour = d["h"]
                for asset, (price, at) in d["p"].items():
                    found.prices[asset] = Fraction(price)
                    found.price_keys[asset] = (Fraction(price) * 10**18).numerator
                    found.price_times[asset] = at
            states, legacy = f"l:{partition}:", f"a:{partition}:"
            loans: set[str] = set()
            moved: dict[str, str] = {}  # per-loan arming records, written before the buckets
            buckets = self.armings[partition] = {}
            for key in list(self.table.keys()):
                key = _text(key)
                if key.startswith(states):
                    loans.add(key[len(states):])
                elif key.startswith(legacy):
                    moved[key[len(legacy):]] = key
                elif key.startswith(f"b:{partition}:"):
                    raw = self.table.get(key)
                    if raw is not None:
                        buckets[int(key.rpartition(":")[2])] = json.loads(_text(raw))
            dirty = set()
            for loan_id, key in moved.items():
                raw, bucket = self.table.get(key), arming_bucket(loan_id)
                if raw is not None and loan_id in loans and loan_id not in buckets.get(bucket, {}):  # a bucket's entry is newer
                    buckets.setdefault(bucket, {})[loan_id] = _text(raw)
                    dirty.add(bucket)
            self._write_buckets(partition, dirty)
            for key in moved.values():
                del self.table[key]
            for loan_id in sorted(loans):
                raw = self.table.get(f"{states}{loan_id}")
                if raw is not None:
                    _load(found, loan_id, _text(raw), buckets.get(arming_bucket(loan_id), {}).get(loan_id))
            settle_heap()
        return found

    def _save_meta(self, partition: int, monitor: LtvMonitor) -> None:
        self.table[f"m:{partition}"] = json.dumps({"h": monitor.hour, "p": {a: [str(p), monitor.price_times[a]] for a, p in monitor.prices.items()}})

    def _save(self, partition: int, monitor: LtvMonitor, loan_ids: set[str], arming_of: set[str] | None = None) -> None:
        """Money and levels of each loan (a loan state, an hour), and the arming of those
        in ``arming_of`` (None: all of them); a loan no longer watched is removed."""
        gone = set()
        for loan_id in sorted(loan_ids):
            w = monitor.loans.get(loan_id)
            key = f"l:{partition}:{loan_id}"
            if w is None:
                gone.add(loan_id)
                if self.table.get(key) is not None:
                    del self.table[key]
            else:
                self.table[key] = _dump(w)
        self._save_arming(partition, monitor, loan_ids if arming_of is None else arming_of | gone)

    def _save_arming(self, partition: int, monitor: LtvMonitor, loan_ids: set[str]) -> None:
        """The arming of each loan into its bucket, each changed bucket written once (a loan
        no longer watched leaves its bucket)."""
        buckets = self.armings.setdefault(partition, {})
        dirty = set()
        for loan_id in loan_ids:
            w, bucket = monitor.loans.get(loan_id), arming_bucket(loan_id)
            entries = buckets.get(bucket)
            current = None if entries is None else entries.get(loan_id)
            if w is None:
                if current is not None:
                    del buckets[bucket][loan_id]
                    dirty.add(bucket)
                continue
            text = _dump_arming(w)
            if text != (DEFAULT_ARMING if current is None else current):
                buckets.setdefault(bucket, {})[loan_id] = text
                dirty.add(bucket)
        self._write_buckets(partition, dirty)

    def _write_buckets(self, partition: int, dirty: set[int]) -> None:
        buckets = self.armings[partition]
        for bucket in sorted(dirty):
            key, entries = f"b:{partition}:{bucket}", buckets.get(bucket)
            if entries:
                self.table[key] = json.dumps(entries, separators=(",", ":"))
            else:
                buckets.pop(bucket, None)
                if self.table.get(key) is not None:
                    del self.table[key]

    async def _send(self, partition: int, offset: int, actions: list[Action], price_time: datetime | None) -> None:
        """The actions as LoanActions batches to the same partition of loan.actions; the
        batch ids derive from the input message (a replay sends the same batches)."""
        if not actions:
            return
        stamp = None
        if price_time is not None:
            stamp = Timestamp()
            stamp.FromDatetime(price_time)
        texts: dict[str, tuple[Fraction, str]] = {}  # asset -> the last price seen and its text (one price per tick)
        out_partition = partition % self.output_partitions
        now = datetime.now(UTC)
        for chunk, start in enumerate(range(0, len(actions), BATCH_MAX)):
            batch = loan_pb2.LoanActions()
            for a in actions[start:start + BATCH_MAX]:
                prices = {}
                for asset, p in a.prices:
                    seen = texts.get(asset)
                    if seen is None or seen[0] is not p:
                        seen = texts[asset] = (p, str(Decimal(p.numerator) / Decimal(p.denominator)))
                    prices[asset] = seen[1]
                msg = batch.actions.add(
                    loan_id=a.loan_id, user_id=a.user_id, version=a.version, kind=_KIND[a.kind], ltv=f"{a.ltv.numerator}/{a.ltv.denominator}",
                    prices=prices, debt_units=str(a.debt), charged_through=a.charged_through, seq=a.seq,
                )
                if stamp is not None:
                    msg.price_time.CopyFrom(stamp)
            key = f"ltv-{partition}"
            event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"earn-accrual-loan-actions:{partition}:{offset}:{chunk}")
            env = events.wrap(batch, key=key, producer=PRODUCER, occurred_at=now, event_id=event_id)
            await self.output.send(key=key.encode(), value=env.SerializeToString(deterministic=True), partition=out_partition)
        kinds: dict[str, int] = {}
        for a in actions:
            kinds[a.kind.value] = kinds.get(a.kind.value, 0) + 1
        for kind, n in kinds.items():
            ACTIONS.labels(kind).inc(n)

    async def recount_bands(self) -> None:
        """The LTV band gauges of every partition this worker holds (a timer, every
        BANDS_EVERY seconds; off the input's path: it yields to the agents every
        BANDS_CHUNK loans); the gauges of partitions it no longer holds are removed."""
        for partition, monitor in list(self.monitors.items()):
            counts = dict.fromkeys(BAND_NAMES, 0)
            loans = list(monitor.loans.values())
            for start in range(0, len(loans), BANDS_CHUNK):
                monitor.count_bands(loans[start:start + BANDS_CHUNK], counts)
                await asyncio.sleep(0)
            if self.monitors.get(partition) is not monitor:
                continue  # revoked meanwhile
            for band, n in counts.items():
                BANDS.labels(band, str(partition)).set(n)
            self._banded.add(partition)
        for partition in self._banded - set(self.monitors):
            for band in BAND_NAMES:
                try:
                    BANDS.remove(band, str(partition))
                except KeyError:
                    pass
            self._banded.discard(partition)

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
            actions = monitor.upsert(msg.loan_id, msg.user_id, msg.version, loan, levels, open_=msg.status == loan_pb2.LOAN_STATUS_OPEN,
                                     due_us=due_of(msg))
            touched = {msg.loan_id}  # the only loan a state can add, change or remove
            self._young += 1
            if self._young >= FREEZE_EVERY:
                settle_heap()
                self._young = 0
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
        await self._send(partition, offset, actions, price_time)
        if price_time is not None and actions:
            TICK_TO_ACTION.observe(max(0.0, time.time() - price_time.timestamp()))
        if price_time is not None:
            self._save_arming(partition, monitor, touched)
        elif isinstance(msg, accrual_pb2.HourClosed):
            self._save(partition, monitor, touched, {a.loan_id for a in actions})  # every debt grew; few armings changed
        else:
            self._save(partition, monitor, touched)
        if not isinstance(msg, loan_pb2.LoanStateChanged):
            self._save_meta(partition, monitor)


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

    async def loan_bands() -> None:
        await engine.recount_bands()

    app.timer(interval=BANDS_EVERY, name="loan_bands")(loan_bands)
    app.agent(source, name="loan", concurrency=1)(loan)
    app.agent(prices, name="loan_prices", concurrency=1)(loan_prices)
    return engine

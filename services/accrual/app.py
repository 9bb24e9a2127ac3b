"""The accrual engine as a faust app: one agent over "simple_earn.accrual".

State lives in three changelog-backed tables (memory store, rebuilt from the changelogs
at start-up), every key prefixed with the input partition so partitions never share a
key (see ``services.accrual.domain`` for the state model and how redelivery is made
harmless). Values are JSON strings with decimal strings inside, never floats.

The engine is at-least-once (DEPENDENCY_NOTES: never exactly_once): faust flushes the
changelog producer before it commits input offsets, so after a crash the tables are at
or ahead of the committed offsets and the replayed suffix is filtered per record.
Payout batches are sent and their delivery awaited before the request's offset can be
committed; a replayed request re-emits the same batches (same key, sequence, items).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from decimal import Decimal
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from earn.v1 import accrual_pb2, events_pb2
from services.accrual import domain
from services.accrual.delivery import InputGuard, InputReader, parse_drops
from services.accrual.emit import PayoutEmitter
from services.kernel import events, money
from services.kernel.config import Settings
from services.kernel.errors import DomainError
from services.kernel.interest import parse_tiers
from services.kernel.topics import CATALOGUE, TopicSpec, topic_name

log = logging.getLogger(__name__)

INPUT = "simple_earn.accrual"
OUTPUT = "accrual.payouts"

EVENTS = Counter("earn_accrual_events_total", "Input events processed, by type", ["type"])
INDEX_UPDATES = Counter("earn_accrual_index_updates_total", "Rate index epochs set (per partition copy)")
TICK_TO_VISIBLE = Histogram(
    "earn_accrual_tick_to_visible_seconds",
    "Wall time from an HourClosed event's occurred_at to its processing",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
)
PAYOUT_ITEMS = Counter("earn_accrual_payout_items_total", "PayoutItems emitted (re-emissions included)")
PAYOUT_REQUESTS = Counter("earn_accrual_payout_requests_total", "PayoutRequested processed per partition")
LAG = Gauge("earn_accrual_consumer_lag", "Input messages not yet processed, per partition", ["partition"])
CHUNK = 5000  # positions settled between two yields to the event loop

SKIPPED = Counter("earn_accrual_events_skipped_total", "Input events skipped, by reason", ["reason"])

_TYPES = {
    accrual_pb2.ProductRatesSet.DESCRIPTOR.full_name: accrual_pb2.ProductRatesSet,
    accrual_pb2.PositionChanged.DESCRIPTOR.full_name: accrual_pb2.PositionChanged,
    accrual_pb2.HourClosed.DESCRIPTOR.full_name: accrual_pb2.HourClosed,
    accrual_pb2.PayoutRequested.DESCRIPTOR.full_name: accrual_pb2.PayoutRequested,
}

# Changelogs are compacted and must never lose a record while a worker recovers from
# them (faust-streaming issues 176 and 651): no time-based deletion, and recent records
# are not compacted for a day.
CHANGELOG_CONFIGS = {
    "cleanup.policy": "compact",
    "retention.ms": "-1",
    "min.compaction.lag.ms": str(24 * 3600 * 1000),
}


class AccrualSettings(Settings):
    metrics_port: int = 9110  # 0: no /metrics listener
    metrics_host: str = "127.0.0.1"
    app_id: str = "earn-accrual"
    # faust's web server (0: disabled).
    web_port: int = 0
    commit_interval: float = 2.0
    session_timeout: float = 10.0
    # The stream idle this long while an assigned input partition has messages past the
    # last one applied: they are read directly (the stream skipped them).
    stall_seconds: float = 15.0
    # Tests only: "partition:offset,..." of input messages the stream's delivery drops once
    # (as faust may), to prove they are read directly.
    drop_input: str = ""


TABLES = ("products", "positions", "partitions", "payouts")


def changelog_topics(settings: AccrualSettings) -> list[TopicSpec]:
    """The tables' changelog topics, to create before the worker starts: faust creates
    them itself, but a table written before the broker's metadata shows a new changelog's
    partitions crashes the agent (PartitionsMismatch: 0 partitions), again and again."""
    return [
        TopicSpec(
            f"{settings.app_id}-{table}-changelog",
            partitions=CATALOGUE[INPUT].partitions,
            retention_ms=-1,
            compacted=True,
            min_compaction_lag_ms=int(CHANGELOG_CONFIGS["min.compaction.lag.ms"]),
        )
        for table in TABLES
    ]


def app_id(settings: AccrualSettings) -> str:
    """The faust app id: consumer group and changelog topic names. Prefixed like the
    topics, so each test run (or deployment namespace) has its own."""
    return settings.topic_prefix + settings.app_id


class Engine:
    """The agent's logic over the tables and the in-memory books; one instance per app."""

    def __init__(self, app: faust.App, output: faust.TopicT, partitions: int) -> None:
        self.app = app
        self.output = output
        self.partitions = partitions
        table = dict(
            default=None,
            partitions=partitions,
            schema=faust.Schema(key_type=str, value_type=str, key_serializer="raw", value_serializer="raw"),
            extra_topic_configs=CHANGELOG_CONFIGS,
        )
        self.products = app.Table("products", help="per partition: product -> rate index", **table)
        self.positions = app.Table("positions", help="per partition: position ledgers", **table)
        self.partitions_meta = app.Table("partitions", help="per partition: the watermark", **table)
        self.payouts = app.Table("payouts", help="per partition: product -> recent payout requests", **table)
        self._index_cache: dict[str, tuple[str, domain.ProductState]] = {}
        self.books: dict[int, domain.Book] = {}
        self.input = InputGuard("accrual", self._apply, offsets=self.partitions_meta)
        app.on_partitions_assigned.connect(self._forget_books)
        app.on_partitions_revoked.connect(self._forget_books)

    @classmethod
    def in_memory(cls, output: Any, partitions: int) -> Engine:
        """The same logic over plain dicts instead of faust tables and an ``output``
        with faust's ``send`` signature: for benchmarks and tests without a broker."""
        engine = cls.__new__(cls)
        engine.app = None  # type: ignore[assignment]
        engine.output = output
        engine.partitions = partitions
        engine.products, engine.positions, engine.partitions_meta, engine.payouts = {}, {}, {}, {}
        engine._index_cache = {}
        engine.books = {}
        engine.input = InputGuard("accrual", engine._apply)
        return engine

    async def _forget_books(self, *args: Any, **kwargs: Any) -> None:
        """After a rebalance the tables are recovered from their changelogs: the books
        (derived, in memory) are rebuilt from them at the next payout."""
        self.books.clear()

    # -- table helpers

    @staticmethod
    def _get(table: Any, key: str) -> Any:
        raw = table.get(key)
        if raw is None:
            return None
        return json.loads(raw if isinstance(raw, str) else raw.decode())

    @staticmethod
    def _put(table: Any, key: str, value: Any) -> None:
        table[key] = json.dumps(value, separators=(",", ":"))

    def product(self, partition: int, product_id: str) -> domain.ProductState | None:
        key = domain.product_key(partition, product_id)
        raw = self.products.get(key)
        if raw is None:
            return None
        raw = raw if isinstance(raw, str) else raw.decode()
        cached = self._index_cache.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        state = domain.ProductState.from_dict(json.loads(raw))
        self._index_cache[key] = (raw, state)
        return state

    def product_ids(self, partition: int) -> list[str]:
        """Every product the partition knows (from its rates), positions or not: a
        payout request is recorded in each one's history."""
        prefix = f"{partition}:"
        keys = (k if isinstance(k, str) else k.decode() for k in list(self.products.keys()))
        return sorted(domain.split_product_key(k)[1] for k in keys if k.startswith(prefix))

    def history(self, partition: int, product_id: str) -> domain.PayoutHistory:
        data = self._get(self.payouts, domain.product_key(partition, product_id))
        return domain.PayoutHistory.from_list(data) if data else domain.PayoutHistory()

    def partition_state(self, partition: int) -> domain.PartitionState:
        data = self._get(self.partitions_meta, domain.partition_key(partition))
        return domain.PartitionState.from_dict(data) if data else domain.PartitionState()

    def watermark(self, partition: int) -> int:
        return self.partition_state(partition).hour

    def book(self, partition: int) -> domain.Book:
        """The partition's positions in memory, built from the table when missing."""
        book = self.books.get(partition)
        if book is None:
            book = self.books[partition] = domain.Book()
            prefix = f"{partition}:"
            for key in list(self.positions.keys()):
                key = key if isinstance(key, str) else key.decode()
                if key.startswith(prefix):
                    state = domain.PositionState.from_dict(self._get(self.positions, key))
                    book.put(self._view(partition, state, book))
            log.info("positions loaded into memory", extra={"partition": partition, "positions": len(book)})
        return book

    def _view(self, partition: int, state: domain.PositionState, book: domain.Book) -> domain.Position:
        product = self.product(partition, state.product_id)
        return domain.position_view(state, product.index if product else None, book.rates_version(state.product_id))

    # -- the agent

    async def handle(self, event: faust.types.EventT) -> None:
        await self.input.deliver(event.message.partition, event.message.offset, event.value)
        self._lag(event)

    async def _apply(self, partition: int, offset: int, value: bytes) -> None:
        try:
            env = events.parse(value)
        except Exception:  # noqa: BLE001 - a poison message must not stop the partition
            SKIPPED.labels("undecodable").inc()
            log.error("undecodable input message skipped", extra={"partition": partition, "offset": offset})
            return
        cls = _TYPES.get(env.type)
        if cls is None:
            SKIPPED.labels("unknown_type").inc()
            log.warning("unknown event type skipped", extra={"type": env.type, "event_id": env.event_id})
            return
        try:
            msg = events.unwrap(env, cls)
        except ValueError as err:
            SKIPPED.labels("bad_payload").inc()
            log.error("event refused", extra={"event_id": env.event_id, "error": str(err)})
            return
        EVENTS.labels(cls.__name__).inc()
        if isinstance(msg, accrual_pb2.ProductRatesSet):
            self.on_rates(partition, env, msg)
        elif isinstance(msg, accrual_pb2.PositionChanged):
            self.on_position(partition, offset, env, msg)
        elif isinstance(msg, accrual_pb2.HourClosed):
            self.on_hour_closed(partition, env, msg)
        else:
            await self.on_payout(partition, offset, env, msg)

    def _lag(self, event: faust.types.EventT) -> None:
        try:
            tp = event.message.tp
            high = self.app.consumer.highwater(tp)
            if high is not None:
                LAG.labels(str(tp.partition)).set(max(0, high - event.message.offset - 1))
        except Exception:  # noqa: BLE001 - a metric never breaks processing
            pass

    def on_rates(self, partition: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.ProductRatesSet) -> None:
        try:
            tiers = parse_tiers(msg.tiers, "tiers")
        except DomainError as err:
            SKIPPED.labels("invalid").inc()
            log.error("ProductRatesSet refused", extra={"event_id": env.event_id, "error": err.message})
            return
        state = self.product(partition, msg.product_id)
        state, changed = domain.apply_rates(state, msg.asset, msg.effective_hour, tiers)
        if changed:
            self._put(self.products, domain.product_key(partition, msg.product_id), state.to_dict())
            INDEX_UPDATES.inc()
            book = self.books.get(partition)
            if book is not None:
                book.rates_changed(msg.product_id, msg.effective_hour)
            wm = self.watermark(partition)
            if msg.effective_hour < wm:
                log.warning(
                    "rates set for an hour already closed: the next payout pays the difference (or waits for a debt)",
                    extra={"product_id": msg.product_id, "effective_hour": msg.effective_hour, "watermark": wm},
                )

    def on_position(
        self, partition: int, offset: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.PositionChanged
    ) -> None:
        key = domain.position_key(partition, msg.product_id, msg.position_id)
        data = self._get(self.positions, key)
        state = domain.PositionState.from_dict(data) if data else None
        try:
            changes = [domain.Change(c.effective_hour, _signed_decimal(c.delta)) for c in msg.changes]
            money.scale_of(msg.asset or (state.asset if state else ""), "asset")
        except DomainError as err:
            SKIPPED.labels("invalid").inc()
            log.error("PositionChanged refused", extra={"event_id": env.event_id, "error": err.message})
            return
        product = self.product(partition, msg.product_id)
        new = domain.apply_position_change(
            state,
            event_id=env.event_id,
            offset=offset,
            position_id=msg.position_id,
            product_id=msg.product_id,
            user_id=msg.user_id,
            asset=msg.asset,
            changes=changes,
            closed_from_hour=msg.closed_from_hour,
            index=product.index if product else None,
            history=self.history(partition, msg.product_id),
        )
        if new is None:
            SKIPPED.labels("duplicate").inc()
            return
        self._put(self.positions, key, new.to_dict())
        book = self.book(partition)
        book.put(self._view(partition, new, book))

    def on_hour_closed(self, partition: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.HourClosed) -> None:
        # O(1) here: the rate indices need no per-hour work (APR-hours at any hour are
        # computed from the epochs), so closing an hour costs nothing per position.
        state = self.partition_state(partition)
        if state.close_hour(msg.hour):
            self._put(self.partitions_meta, domain.partition_key(partition), state.to_dict())
        TICK_TO_VISIBLE.observe(max(0.0, time.time() - events.occurred_at(env).timestamp()))

    async def on_payout(
        self, partition: int, offset: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.PayoutRequested
    ) -> None:
        """Pay the partition's positions of the wanted products, product after product,
        in a deterministic order; batches leave as they fill. Nothing is written per
        position (see ``domain``) except the few closed and paid for good."""
        PAYOUT_REQUESTS.inc()
        watermark = self.watermark(partition)
        if msg.boundary_hour > watermark:
            log.warning(
                "payout boundary beyond the closed hours",
                extra={"job": msg.job, "period": msg.period, "boundary_hour": msg.boundary_hour, "watermark": watermark},
            )
        book = self.book(partition)
        wanted = set(msg.product_ids)
        seen: list[tuple[str, domain.ProductState, domain.PayoutHistory, domain.PayoutEntry | None, str]] = []
        for product_id in self.product_ids(partition):
            product = self.product(partition, product_id)
            if product is None or (wanted and product_id not in wanted):
                continue
            history = self.history(partition, product_id)
            entry, status = history.record(msg.job, msg.period, msg.boundary_hour, offset)
            seen.append((product_id, product, history, entry, status))
        # Published again by the upstream relay (another offset): re-emit exactly what the
        # first one emitted (same batches, same ids: sinks drop them, and a sink still
        # waiting for a partition's last batch gets it), and record nothing new.
        again = any(status == "duplicate" for *_, status in seen)
        if again:
            SKIPPED.labels("payout_duplicate").inc()
            log.warning("payout request published again: re-emitting what it paid", extra={"job": msg.job, "period": msg.period})
        plan: list[tuple[str, domain.ProductState, domain.PayoutEntry]] = []
        met_before: list[domain.PayoutEntry] = []
        for product_id, product, history, entry, status in seen:
            if again and status not in ("duplicate", "replay"):
                continue  # not part of the first request (e.g. a product added since)
            if status == "stale":
                SKIPPED.labels("payout_stale").inc()
                log.warning(
                    "payout boundary not after the product's last one: nothing to pay",
                    extra={"job": msg.job, "period": msg.period, "product_id": product_id, "boundary_hour": msg.boundary_hour},
                )
                continue
            if status == "new":
                self._put(self.payouts, domain.product_key(partition, product_id), history.to_list())
            assert entry is not None
            if status != "new":
                met_before.append(entry)
            plan.append((product_id, product, entry))
        # In the batches of its first time (the sink matches a batch by its sequence and
        # refuses one whose items changed), even when BATCH_SIZE changed since.
        batch_size = met_before[0].batch_size if met_before else domain.BATCH_SIZE
        emitter = PayoutEmitter(
            self.output, OUTPUT, partition, msg,
            key=domain.batch_key(msg.job, msg.period, partition), namespace="earn-accrual", batch_size=batch_size, items=PAYOUT_ITEMS,
        )
        for product_id, product, entry in plan:
            await self._pay_product(partition, book, product, product_id, domain.Payout(product, entry, offset, watermark), emitter)
        # The positions in memory are long-lived and free of reference cycles: keep them
        # out of the cyclic collector's scans (a full scan of millions costs seconds).
        gc.freeze()
        await emitter.finish()

    async def _pay_product(
        self, partition: int, book: domain.Book, product: domain.ProductState, product_id: str,
        payout: domain.Payout, emitter: PayoutEmitter,
    ) -> None:
        emitter.product(product_id, product.asset)
        version = book.rates_version(product_id)
        payout.rates_version = version

        def fresh(pos: domain.Position) -> domain.Position:
            if book.stale(pos):
                pos = self._view(partition, pos.state, book)
                book.put(pos)
            pos.rates_version = version
            return pos

        positions = book.ordered(product_id)
        for at in range(0, len(positions), CHUNK):
            paid = payout.run(positions[at : at + CHUNK], fresh)
            await emitter.extend(paid.position_ids, paid.user_ids, paid.amounts, paid.from_hours)
            for marker in paid.markers:
                self._put(self.positions, domain.position_key(partition, product_id, marker.position_id), marker.to_dict())
                book.put(self._view(partition, marker, book))
            for pos in paid.expired:
                del self.positions[domain.position_key(partition, product_id, pos.state.position_id)]
                book.remove(product_id, pos.state.position_id)
            for pos in paid.unrecoverable:
                SKIPPED.labels("unrecoverable_replay").inc()
                log.error(
                    "replayed payout reaches past the position's marks: not re-emitted",
                    extra={"position_id": pos.state.position_id, "job": payout.entry.job, "period": payout.entry.period},
                )
            await asyncio.sleep(0)  # keep heartbeats and the loop alive in big payouts


def _signed_decimal(text: str) -> Decimal:
    """A PrincipalChange delta: the strict amount grammar with an optional leading '-'."""
    negative = text.startswith("-")
    body = text[1:] if negative else text
    value = money.parse_decimal(body, "changes.delta", scale=18)
    return -value if negative else value


# aiokafka keeps one open batch per partition and one request in flight per broker, and a
# send whose batch is full waits until the request in flight returns: a payout's compute
# loop stalled once per full batch. A partition's payout is about 7 MB of PayoutBatches:
# in 4 MiB batches it leaves in two or three requests instead of eight, and the loop
# rarely waits. Requests may carry a batch per partition, up to the topics' 8 MiB.
PRODUCER_BATCH_BYTES = 4 * 1024 * 1024
PRODUCER_REQUEST_BYTES = CATALOGUE[OUTPUT].max_message_bytes


def create_app(settings: AccrualSettings) -> tuple[faust.App, Engine]:
    datadir = settings.data_dir / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id(settings),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        processing_guarantee="at_least_once",
        topic_replication_factor=1,
        topic_partitions=CATALOGUE[INPUT].partitions,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        # faust's 16 KiB batches made every output message larger than that (a LoanActions
        # of 1,000 actions is about 150 KB, a PayoutBatch more) wait a broker round trip
        # for the one before it (see PRODUCER_BATCH_BYTES).
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        producer_max_request_size=PRODUCER_REQUEST_BYTES,
        broker_commit_interval=settings.commit_interval,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=max(1.0, settings.session_timeout / 4),
        web_enabled=bool(settings.web_port),
        web_port=settings.web_port or 6066,
        web_host="127.0.0.1",
        autodiscover=False,
        # faust makes a directory even with the memory store (by default in the working
        # directory, and only its last part).
        datadir=str(datadir / app_id(settings)),
    )
    source = app.topic(
        topic_name(settings, INPUT),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=CATALOGUE[INPUT].partitions,
        internal=False,
    )
    output = app.topic(
        topic_name(settings, OUTPUT),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=CATALOGUE[OUTPUT].partitions,
        internal=False,
    )
    engine = Engine(app, output, CATALOGUE[INPUT].partitions)
    input_topic = topic_name(settings, INPUT)

    engine.input.reader = InputReader(settings.kafka_bootstrap, input_topic, app_id(settings))
    engine.input.install(app, settings.stall_seconds)
    engine.input.drop = parse_drops(settings.drop_input)

    async def accrue(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await engine.handle(event)

    app.agent(source, name="accrue", concurrency=1)(accrue)
    return app, engine


__all__ = ["AccrualSettings", "Engine", "app_id", "changelog_topics", "create_app"]

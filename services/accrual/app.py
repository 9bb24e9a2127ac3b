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
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from earn.v1 import accrual_pb2, events_pb2
from services.accrual import domain
from services.kernel import events, money
from services.kernel.config import Settings
from services.kernel.errors import DomainError
from services.kernel.interest import parse_tiers
from services.kernel.topics import CATALOGUE, topic_name

log = logging.getLogger(__name__)

INPUT = "simple_earn.accrual"
OUTPUT = "accrual.payouts"
PRODUCER = "accrual"

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


def app_id(settings: AccrualSettings) -> str:
    """The faust app id: consumer group and changelog topic names. Prefixed like the
    topics, so each test run (or deployment namespace) has its own."""
    return settings.topic_prefix + settings.app_id


class Engine:
    """The agent's logic over the three tables; one instance per app."""

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
        self.partitions_meta = app.Table(
            "partitions", help="per partition: watermark and recent payout requests", **table
        )
        self._index_cache: dict[str, tuple[str, domain.ProductState]] = {}

    # -- table helpers

    @staticmethod
    def _get(table: Any, key: str) -> dict[str, Any] | None:
        raw = table.get(key)
        if raw is None:
            return None
        return json.loads(raw if isinstance(raw, str) else raw.decode())

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

    def partition_state(self, partition: int) -> domain.PartitionState:
        data = self._get(self.partitions_meta, domain.partition_key(partition))
        return domain.PartitionState.from_dict(data) if data else domain.PartitionState()

    def save_partition_state(self, partition: int, state: domain.PartitionState) -> None:
        self.partitions_meta[domain.partition_key(partition)] = json.dumps(state.to_dict(), separators=(",", ":"))

    def watermark(self, partition: int) -> int:
        return self.partition_state(partition).hour

    # -- the agent

    async def handle(self, event: faust.types.EventT) -> None:
        partition, offset = event.message.partition, event.message.offset
        try:
            env = events.parse(event.value)
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
        self._lag(event)

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
            key = domain.product_key(partition, msg.product_id)
            self.products[key] = json.dumps(state.to_dict(), separators=(",", ":"))
            INDEX_UPDATES.inc()
            wm = self.watermark(partition)
            if msg.effective_hour < wm:
                log.warning(
                    "rates set for an hour already closed: positions settled past it keep their amounts",
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
        )
        if new is None:
            SKIPPED.labels("duplicate").inc()
            return
        self.positions[key] = json.dumps(new.to_dict(), separators=(",", ":"))

    def on_hour_closed(self, partition: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.HourClosed) -> None:
        # O(1) here: the rate indices need no per-hour work (APR-hours at any hour are
        # computed from the epochs), so closing an hour costs nothing per position.
        state = self.partition_state(partition)
        if state.close_hour(msg.hour):
            self.save_partition_state(partition, state)
        TICK_TO_VISIBLE.observe(max(0.0, time.time() - events.occurred_at(env).timestamp()))

    async def on_payout(
        self, partition: int, offset: int, env: events_pb2.EventEnvelope, msg: accrual_pb2.PayoutRequested
    ) -> None:
        PAYOUT_REQUESTS.inc()
        wanted = set(msg.product_ids)
        prefix = f"{partition}:"
        keys = []
        for key in list(self.positions.keys()):
            key = key if isinstance(key, str) else key.decode()
            if not key.startswith(prefix):
                continue
            _, product_id, position_id = domain.split_position_key(key)
            if wanted and product_id not in wanted:
                continue
            keys.append((position_id, product_id, key))
        keys.sort()
        meta = self.partition_state(partition)
        duplicate, changed = meta.register_request(msg.job, msg.period, offset)
        if changed:
            self.save_partition_state(partition, meta)
        if duplicate:
            log.warning("payout request seen before at another offset: re-emitting only", extra={"job": msg.job, "period": msg.period})
        watermark = meta.hour
        if msg.boundary_hour > watermark:
            log.warning(
                "payout boundary beyond the closed hours",
                extra={"job": msg.job, "period": msg.period, "boundary_hour": msg.boundary_hour, "watermark": watermark},
            )
        items: list[accrual_pb2.PayoutItem] = []
        for n, (position_id, product_id, key) in enumerate(keys):
            if n and n % 1000 == 0:
                await asyncio.sleep(0)  # keep heartbeats and the loop alive in big payouts
            data = self._get(self.positions, key)
            if data is None:
                continue
            state = domain.PositionState.from_dict(data)
            product = self.product(partition, product_id)
            try:
                result = domain.payout_position(
                    state,
                    product.index if product else None,
                    job=msg.job,
                    period=msg.period,
                    boundary_hour=msg.boundary_hour,
                    offset=offset,
                    watermark=watermark,
                    duplicate=duplicate,
                )
            except DomainError as err:
                log.error("position not paid", extra={"position_id": position_id, "error": err.message})
                continue
            if result.delete:
                del self.positions[key]
            elif result.state is not None:
                self.positions[key] = json.dumps(result.state.to_dict(), separators=(",", ":"))
            if result.item is not None:
                record = result.item
                items.append(
                    accrual_pb2.PayoutItem(
                        position_id=state.position_id,
                        product_id=state.product_id,
                        user_id=state.user_id,
                        asset=state.asset,
                        amount=money.format_amount(record.amount),
                        carry=money.format_amount(record.carry),
                        from_hour=record.from_hour,
                    )
                )
        await self.emit(partition, msg, items)

    async def emit(self, partition: int, msg: accrual_pb2.PayoutRequested, items: list[accrual_pb2.PayoutItem]) -> None:
        key = domain.batch_key(msg.job, msg.period, partition).encode()
        pending = []
        for seq, last, chunk in domain.batches(items):
            batch = accrual_pb2.PayoutBatch(
                job=msg.job,
                period=msg.period,
                boundary_hour=msg.boundary_hour,
                partition=partition,
                sequence=seq,
                last=last,
                items=chunk,
            )
            env = events.wrap(
                batch,
                key=key.decode(),
                producer=PRODUCER,
                occurred_at=datetime.now(UTC),
                event_id=_batch_event_id(msg.job, msg.period, partition, seq),
            )
            pending.append(
                await self.output.send(
                    key=key,
                    value=env.SerializeToString(deterministic=True),
                    partition=partition % _output_partitions(),
                    force=True,  # now, not at commit: delivery is awaited below
                )
            )
            PAYOUT_ITEMS.inc(len(chunk))
        # The request's offset may be committed only once its batches are in the log.
        await asyncio.gather(*pending)


def _output_partitions() -> int:
    return CATALOGUE[OUTPUT].partitions


def _batch_event_id(job: str, period: str, partition: int, seq: int) -> uuid.UUID:
    """A deterministic envelope id per (job, period, partition, sequence): a re-emitted
    batch carries the same event id, so inbox-based sinks drop it."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"earn-accrual:{job}:{period}:{partition}:{seq}")


def _signed_decimal(text: str) -> Decimal:
    """A PrincipalChange delta: the strict amount grammar with an optional leading '-'."""
    negative = text.startswith("-")
    body = text[1:] if negative else text
    value = money.parse_decimal(body, "changes.delta", scale=18)
    return -value if negative else value


def create_app(settings: AccrualSettings) -> tuple[faust.App, Engine]:
    app = faust.App(
        app_id(settings),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        processing_guarantee="at_least_once",
        topic_replication_factor=1,
        topic_partitions=CATALOGUE[INPUT].partitions,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=max(1.0, settings.session_timeout / 4),
        web_enabled=bool(settings.web_port),
        web_port=settings.web_port or 6066,
        web_host="127.0.0.1",
        autodiscover=False,
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

    async def accrue(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await engine.handle(event)

    app.agent(source, name="accrue", concurrency=1)(accrue)
    return app, engine


__all__ = ["AccrualSettings", "Engine", "app_id", "create_app"]

"""The Launchpool agent of the accrual engine: one faust agent over "launchpool.accrual",
its own tables, its payout batches to "launchpool.payouts". The logic is pure
(``services.accrual.launchpool``); this module keeps the state and moves the events.

State (changelog-backed tables, memory store, keys prefixed with the input partition so
partitions never share a key): ``lp_state`` holds both a pool's accumulator (its
hour-boundary values, its recent payouts; key ``p:<partition>:<pool>``) and each stake
(units, its open hour's partial integral or its settled reward, segments;
``s:<partition>:<pool>:<stake>``), ``lp_meta`` the partition's watermark. Values are JSON
with exact rationals as "numerator/denominator" strings. Whatever advances a pool past an
hour boundary (a stake change, a tick, a payout request) settles the stakes changed in
the closed hour and writes them, then (for a change) the changed stake, then the pool, to
the one changelog partition of its input partition, so after a crash the changelog holds
a prefix of these writes, never the pool without the stakes before it. Replayed, the
settled stakes are recognised (settling is done once per stake and hour) and so is a
changed stake whose record is there (its offset is ahead of the pool's): the pool is
brought up to it.

At-least-once: a pool's own events (schedule, stake changes) carry increasing offsets and
a pool skips offsets it has applied; a stake change the outbox relay published again
after a crash (the same event id at a later offset) is recognised by the ids each stake
keeps of its last changes and skipped; ticks are idempotent (advancing to a time already
passed does nothing); a payout request is recorded per (job, period) in the pool, and
seen again it re-emits the same batches (same ids: the sink drops them). Nothing is
written per stake by a payout. Input goes through the engine's ``InputGuard``
(``services.accrual.delivery``): messages faust's stream skips or leaves undelivered are
read from the topic directly.

Cost: a stake change is O(1) (the pool and that stake); a tick is O(pools of the
partition) plus the stakes changed in the closed hour (settled once each: O(1) amortised
per change); a payout is one pass over the pool's stakes in memory (built from the table
after a rebalance).
"""

from __future__ import annotations

import asyncio
import json
import logging
from fractions import Fraction
from typing import Any

import faust
from prometheus_client import Counter, Gauge

from earn.v1 import accrual_pb2, launchpool_pb2
from services.accrual import launchpool as lp
from services.accrual.delivery import InputGuard, InputReader
from services.accrual.emit import PayoutEmitter
from services.kernel import events, money
from services.kernel.config import Settings
from services.kernel.topics import CATALOGUE, TopicSpec, topic_name

log = logging.getLogger(__name__)

INPUT = "launchpool.accrual"
OUTPUT = "launchpool.payouts"
TABLES = ("lp_state", "lp_meta")
CHUNK = 5000

EVENTS = Counter("earn_accrual_launchpool_events_total", "Launchpool input events processed, by type", ["type"])
SKIPPED = Counter("earn_accrual_launchpool_events_skipped_total", "Launchpool input events skipped, by reason", ["reason"])
PAYOUT_ITEMS = Counter("earn_accrual_launchpool_payout_items_total", "Launchpool reward items emitted (re-emissions included)")
LAG = Gauge("earn_accrual_launchpool_consumer_lag", "Launchpool input messages not yet processed, per partition", ["partition"])

_TYPES = {
    launchpool_pb2.LaunchpoolPoolSet.DESCRIPTOR.full_name: launchpool_pb2.LaunchpoolPoolSet,
    launchpool_pb2.LaunchpoolStakeChanged.DESCRIPTOR.full_name: launchpool_pb2.LaunchpoolStakeChanged,
    accrual_pb2.HourClosed.DESCRIPTOR.full_name: accrual_pb2.HourClosed,
    accrual_pb2.PayoutRequested.DESCRIPTOR.full_name: accrual_pb2.PayoutRequested,
}

CHANGELOG_CONFIGS = {"cleanup.policy": "compact", "retention.ms": "-1", "min.compaction.lag.ms": str(24 * 3600 * 1000)}


def changelog_topics(app_id: str) -> list[TopicSpec]:
    """The tables' changelogs, created before the worker starts (see services.accrual.app)."""
    return [
        TopicSpec(f"{app_id}-{table}-changelog", partitions=CATALOGUE[INPUT].partitions, retention_ms=-1, compacted=True,
                  min_compaction_lag_ms=int(CHANGELOG_CONFIGS["min.compaction.lag.ms"]))
        for table in TABLES
    ]


def _signed_units(text: str) -> int:
    negative = text.startswith("-")
    value = money.parse_decimal(text[1:] if negative else text, "delta", scale=lp.STAKE_SCALE)
    units = int(value.scaleb(lp.STAKE_SCALE))
    return -units if negative else units


class LaunchpoolEngine:
    def __init__(self, app: faust.App, output: Any, partitions: int) -> None:
        self.app = app
        self.output = output
        self.partitions = partitions
        table = dict(
            default=None, partitions=partitions,
            schema=faust.Schema(key_type=str, value_type=str, key_serializer="raw", value_serializer="raw"),
            extra_topic_configs=CHANGELOG_CONFIGS,
        )
        self.state = app.Table("lp_state", help="per partition: Launchpool pool accumulators and stakes", **table)
        self.meta = app.Table("lp_meta", help="per partition: Launchpool watermark", **table)
        self._init()
        app.on_partitions_assigned.connect(self._forget)
        app.on_partitions_revoked.connect(self._forget)

    def _init(self) -> None:
        self.books: dict[tuple[int, str], lp.Book] = {}
        # Parsed pools by key, with the table value they were parsed from (or written as).
        self._pool_cache: dict[str, tuple[str, lp.Pool]] = {}
        # The pools of each partition (derived: one scan of the table after a rebalance).
        self._pool_ids: dict[int, set[str]] = {}

    @classmethod
    def in_memory(cls, output: Any, partitions: int) -> LaunchpoolEngine:
        """Plain dicts instead of faust tables (benchmarks, tests without a broker)."""
        engine = cls.__new__(cls)
        engine.app = None  # type: ignore[assignment]
        engine.output, engine.partitions = output, partitions
        engine.state, engine.meta = {}, {}
        engine._init()
        return engine

    async def _forget(self, *args: Any, **kwargs: Any) -> None:
        self.books.clear()
        self._pool_cache.clear()
        self._pool_ids.clear()

    # -- table helpers

    @staticmethod
    def _get(table: Any, key: str) -> Any:
        raw = table.get(key)
        if raw is None:
            return None
        return json.loads(raw if isinstance(raw, str) else raw.decode())

    def _set(self, table: Any, partition: int, key: str, raw: str) -> None:
        """Write a table value and its changelog record to the input partition's changelog
        partition, explicitly: faust derives that partition from the event being processed
        and refuses writes without one, but the input guard also applies messages it read
        directly (from a timer, outside the stream's iteration)."""
        if self.app is None:  # in memory
            table[key] = raw
            return
        table.data[key] = raw  # the store itself: no changelog send of its own
        table.send_changelog(partition, key, raw)

    def _put(self, table: Any, partition: int, key: str, value: Any) -> None:
        self._set(table, partition, key, json.dumps(value, separators=(",", ":")))

    def pool(self, partition: int, pool_id: str) -> lp.Pool | None:
        """The pool's state (parsed once per table value; the caller may mutate it and
        must then save it, or ``drop`` it)."""
        key = f"p:{partition}:{pool_id}"
        raw = self.state.get(key)
        if raw is None:
            return None
        raw = raw if isinstance(raw, str) else raw.decode()
        cached = self._pool_cache.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        pool = lp.Pool.from_dict(json.loads(raw))
        self._pool_cache[key] = (raw, pool)
        return pool

    def drop(self, partition: int, pool_id: str) -> None:
        self._pool_cache.pop(f"p:{partition}:{pool_id}", None)

    def save_pool(self, partition: int, pool: lp.Pool) -> None:
        key = f"p:{partition}:{pool.pool_id}"
        raw = json.dumps(pool.to_dict(), separators=(",", ":"))
        self._set(self.state, partition, key, raw)
        if partition in self._pool_ids:
            self._pool_ids[partition].add(pool.pool_id)
        self._pool_cache[key] = (raw, pool)

    def pool_ids(self, partition: int) -> list[str]:
        found = self._pool_ids.get(partition)
        if found is None:
            prefix = f"p:{partition}:"
            keys = (k if isinstance(k, str) else k.decode() for k in list(self.state.keys()))
            found = self._pool_ids[partition] = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        return sorted(found)

    def book(self, partition: int, pool_id: str) -> lp.Book:
        """The pool's stakes in memory, built from the table when missing."""
        found = self.books.get((partition, pool_id))
        if found is None:
            found = self.books[(partition, pool_id)] = lp.Book()
            prefix = f"s:{partition}:{pool_id}:"
            for key in list(self.state.keys()):
                key = key if isinstance(key, str) else key.decode()
                if key.startswith(prefix):
                    found.add(lp.Stake.from_dict(self._get(self.state, key)))
        return found

    def save_stakes(self, partition: int, pool_id: str, stakes: list[lp.Stake]) -> None:
        for stake in stakes:
            self._put(self.state, partition, f"s:{partition}:{pool_id}:{stake.stake_id}", stake.to_dict())

    def advance(self, partition: int, pool: lp.Pool, to: int) -> None:
        """Advance the pool (settling the stakes of the hours it closes) and write the
        settled stakes, then the pool."""
        if to <= pool.last_us:
            return
        settled = lp.advance(pool, self.book(partition, pool.pool_id), to)
        self.save_stakes(partition, pool.pool_id, settled)
        self.save_pool(partition, pool)

    def watermark(self, partition: int) -> int:
        data = self._get(self.meta, str(partition))
        return int(data["h"]) if data else 0

    # -- the agent

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
            log.error("undecodable launchpool input skipped", extra={"partition": partition, "offset": offset})
            return
        EVENTS.labels(cls.__name__).inc()
        if isinstance(msg, launchpool_pb2.LaunchpoolPoolSet):
            self.on_pool(partition, offset, msg)
        elif isinstance(msg, launchpool_pb2.LaunchpoolStakeChanged):
            self.on_stake(partition, offset, env.event_id, msg)
        elif isinstance(msg, accrual_pb2.HourClosed):
            self.on_hour(partition, msg.hour)
        else:
            await self.on_payout(partition, offset, msg)

    def on_pool(self, partition: int, offset: int, msg: launchpool_pb2.LaunchpoolPoolSet) -> None:
        if self.pool(partition, msg.pool_id) is not None:
            SKIPPED.labels("duplicate").inc()
            return
        try:
            scale = money.scale_of(msg.reward_asset)
            total = Fraction(money.parse_amount(msg.total_reward, msg.reward_asset, "total_reward"))
            if msg.end_hour <= msg.start_hour:
                raise ValueError("end before start")
        except Exception as err:  # noqa: BLE001
            SKIPPED.labels("invalid").inc()
            log.error("LaunchpoolPoolSet refused", extra={"pool_id": msg.pool_id, "error": str(err)})
            return
        start_us = msg.start_hour * lp.HOUR_US
        pool = lp.Pool(msg.pool_id, msg.reward_asset, scale, total, start_us, msg.end_hour * lp.HOUR_US, last_us=start_us, last_offset=offset)
        watermark = self.watermark(partition)
        if watermark:
            lp.advance(pool, lp.Book(), watermark * lp.HOUR_US)  # no stakes yet
        self.save_pool(partition, pool)

    def on_stake(self, partition: int, offset: int, event_id: str, msg: launchpool_pb2.LaunchpoolStakeChanged) -> None:
        pool = self.pool(partition, msg.pool_id)
        if pool is None:
            SKIPPED.labels("unknown_pool").inc()
            log.error("stake change for an unknown pool", extra={"pool_id": msg.pool_id, "offset": offset})
            return
        if offset <= pool.last_offset:
            SKIPPED.labels("duplicate").inc()
            return
        book = self.book(partition, msg.pool_id)
        stake = book.get(msg.stake_id)
        # The stake's record of this change reached the changelog and the pool's did not
        # (a crash between the writes): only the pool's part is applied.
        behind = stake is not None and stake.last_offset >= offset
        late = msg.at_micros < pool.last_us
        try:
            delta = _signed_units(msg.delta)
            writes = lp.apply_stake_change(
                pool, book, stake_id=msg.stake_id, user_id=msg.user_id, delta_units=delta, at_us=msg.at_micros, offset=offset, event_id=event_id,
            )
        except Exception as err:  # noqa: BLE001
            # Possibly changed in memory: read both again from the table.
            self.drop(partition, msg.pool_id)
            self.books.pop((partition, msg.pool_id), None)
            SKIPPED.labels("invalid").inc()
            log.error("stake change refused", extra={"pool_id": msg.pool_id, "offset": offset, "error": str(err)})
            return
        if writes is None:
            # Published again by the outbox relay (a crash between the broker's ack and
            # the relay's delete), at a later offset: applied once, by its event id.
            SKIPPED.labels("republished").inc()
            log.warning("stake change published again: applied once", extra={"pool_id": msg.pool_id, "offset": offset, "event_id": event_id})
            return
        if behind:
            SKIPPED.labels("pool_behind").inc()
        elif late:
            SKIPPED.labels("late").inc()  # counted; applied at the pool's time
            log.error("stake change before the pool's time", extra={"pool_id": msg.pool_id, "offset": offset})
        self.save_stakes(partition, msg.pool_id, writes)  # the stakes first, then the pool (see above)
        self.save_pool(partition, pool)

    def on_hour(self, partition: int, hour: int) -> None:
        if hour > self.watermark(partition):
            self._put(self.meta, partition, str(partition), {"h": hour})
        for pool_id in self.pool_ids(partition):
            pool = self.pool(partition, pool_id)
            if pool is not None:
                self.advance(partition, pool, hour * lp.HOUR_US)

    async def on_payout(self, partition: int, offset: int, msg: accrual_pb2.PayoutRequested) -> None:
        emitter = PayoutEmitter(
            self.output, OUTPUT, partition, msg,
            key=f"lp:{msg.job}:{msg.period}:{partition}", namespace="earn-accrual-launchpool", batch_size=lp.BATCH_SIZE, items=PAYOUT_ITEMS,
        )
        wanted = set(msg.product_ids)
        for pool_id in self.pool_ids(partition):
            if wanted and pool_id not in wanted:
                continue
            pool = self.pool(partition, pool_id)
            if pool is None:
                continue
            self.advance(partition, pool, msg.boundary_hour * lp.HOUR_US)
            entry, status = pool.record_payout(msg.job, msg.period, msg.boundary_hour, offset)
            if status == "stale" or entry is None:
                SKIPPED.labels("payout_stale").inc()
                continue
            if status == "duplicate":
                SKIPPED.labels("payout_duplicate").inc()
            self.save_pool(partition, pool)
            book = self.book(partition, pool_id)
            stakes = sorted(book.values(), key=lambda s: int(s.stake_id) if s.stake_id.isdigit() else 0)
            previous = pool.previous_boundary(entry)
            from_hour = previous if previous is not None else pool.start_hour
            emitter.product(pool_id, pool.asset)
            for at in range(0, len(stakes), CHUNK):
                for stake, units in lp.pay(pool, entry, stakes[at : at + CHUNK]):
                    await emitter.add(stake.stake_id, stake.user_id, lp.format_units(units, pool.scale), from_hour)
                await asyncio.sleep(0)
        await emitter.finish()


def install(app: faust.App, settings: Settings) -> LaunchpoolEngine:
    """Add the Launchpool tables and agent to the accrual engine's faust app."""
    partitions = CATALOGUE[INPUT].partitions
    source = app.topic(topic_name(settings, INPUT), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                       partitions=partitions, internal=False)
    output = app.topic(topic_name(settings, OUTPUT), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                       partitions=CATALOGUE[OUTPUT].partitions, internal=False)
    engine = LaunchpoolEngine(app, output, partitions)
    guard = InputGuard("launchpool", engine.apply, InputReader(settings.kafka_bootstrap, topic_name(settings, INPUT), app.conf.id),
                       offsets=engine.meta)
    guard.install(app, float(getattr(settings, "stall_seconds", 15.0)))

    async def launchpool(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            await guard.deliver(message.partition, message.offset, event.value)
            try:
                high = app.consumer.highwater(message.tp)
                if high is not None:
                    LAG.labels(str(message.partition)).set(max(0, high - message.offset - 1))
            except Exception:  # noqa: BLE001
                pass

    app.agent(source, name="launchpool", concurrency=1)(launchpool)
    return engine


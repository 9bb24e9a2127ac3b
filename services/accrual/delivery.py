"""Every input message applied, in order, although faust's stream may not deliver some.

faust-streaming 0.15.3 (at-least-once) can leave input messages undelivered: its fetcher
marks a message read even when a rebalance suspended the stream before delivering it,
then seeks past it and commits past it; after a restart it has also left a partition's
only waiting message undelivered. An agent therefore applies its input through an
``InputGuard``:

- It knows the next offset it expects per partition, and keeps it with the agent's state:
  an ``offsets`` table (changelog-backed, written with every message applied) says where
  the state is, so a worker that restarts (or takes a partition over) after the stream
  skipped a message and committed past it still sees the gap. Before the table has one,
  the group's committed offset when the partition is assigned (read before the stream
  starts) stands in.
- When the stream jumps ahead, the skipped messages are read straight from the topic
  (``InputReader``, clients of its own) and applied first.
- A skipped message may be the last of its partition, so no later message reveals it: a
  watchdog (a faust timer) reads every assigned partition's messages past the expected
  offset once the stream has delivered nothing for ``stall_seconds`` and no rebalance or
  recovery is under way.
- Messages read directly are not applied again if the stream delivers them after all
  (applying is idempotent anyway; this only saves the work).
- A message read directly is applied as the current event of its own partition (faust's
  tables find the changelog partition of a write from the current event; outside the
  stream's iteration there is none, and a table write raises).

Each run read directly counts in ``earn_accrual_input_gaps_total{agent, found_by}`` and
logs an ERROR line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust import streams as faust_streams
from prometheus_client import Counter

log = logging.getLogger(__name__)

# A range that cannot be read within this many seconds stops the worker (exit 70): a
# restart seeks to the committed offsets.
READ_TIMEOUT = 120.0

INPUT_GAPS = Counter(
    "earn_accrual_input_gaps_total", "Runs of input messages the stream did not deliver, read directly", ["agent", "found_by"]
)
READ_AGAIN = Counter(
    "earn_accrual_input_read_again_total", "Input messages delivered by the stream after being read directly (not applied)", ["agent"]
)

Apply = Callable[[int, int, bytes], Awaitable[None]]


class InputReader:
    """An input topic read outside faust's stream: the group's committed offsets, the
    partitions' ends, and ranges of messages."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self._consumer: AIOKafkaConsumer | None = None

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    def _tps(self, partitions: list[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in partitions]

    async def close(self, *args: Any, **kwargs: Any) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def committed(self, partitions: list[int]) -> dict[int, int]:
        """The group's committed offset per partition; the log start where none is."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            found = await admin.list_consumer_group_offsets(self.group, partitions=self._tps(partitions))
        finally:
            await admin.close()
        starts = await (await self._started()).beginning_offsets(self._tps(partitions))
        out = {}
        for tp in self._tps(partitions):
            meta = found.get(tp)
            out[tp.partition] = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
        return out

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        ends = await (await self._started()).end_offsets(self._tps(partitions))
        return {tp.partition: offset for tp, offset in ends.items()}

    async def read(self, partition: int, start: int, stop: int) -> list[tuple[int, bytes]]:
        """The messages [start, stop) of a partition, in order; exits the worker if they
        cannot be read in time."""
        consumer = await self._started()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + READ_TIMEOUT
        while (not out or out[-1][0] < stop - 1) and time.monotonic() < deadline:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if start <= record.offset < stop:
                    out.append((record.offset, record.value))
        if not out or out[-1][0] < stop - 1:
            log.critical("input messages could not be read: exiting for a restart",
                         extra={"topic": self.topic, "partition": partition, "from_offset": start, "to_offset": stop})
            os._exit(70)
        return out


class InputGuard:
    """One agent's input: ``deliver`` each message the stream hands over, ``watch`` from a
    timer. ``apply(partition, offset, value)`` is the agent's own (idempotent) logic.
    Without a reader (in-memory engines) it only applies."""

    def __init__(self, agent: str, apply: Apply, reader: InputReader | None = None, offsets: Any = None) -> None:
        self.agent, self.apply, self.reader = agent, apply, reader
        # The agent's table (or dict) where "offset:<partition>" is the next offset its
        # state expects; read once per partition after each rebalance (once recovered).
        self.offsets = offsets
        self.restored: set[int] = set()
        # Fault injection for tests (EARN_DROP_INPUT): (partition, offset) of messages
        # the stream delivers that are dropped once, as faust's stream may drop them.
        self.drop: set[tuple[int, int]] = set()
        self.next: dict[int, int] = {}
        self.read_directly: dict[int, range] = {}
        self.lock = asyncio.Lock()  # the stream and the watchdog apply in turn
        self.active = time.monotonic()  # the stream's last delivery (or a rebalance)

    def install(self, app: Any, stall_seconds: float) -> None:
        """Hook into a faust app: assignments, a watchdog timer, shutdown."""
        app.on_partitions_assigned.connect(self.on_assigned)
        app.on_partitions_revoked.connect(self.on_rebalance)
        if self.reader is not None:
            app.on_before_shutdown.connect(self.reader.close)

        async def watch_input() -> None:
            await self.watch(app, stall_seconds)

        app.timer(interval=max(1.0, stall_seconds / 3), name=f"watch_{self.agent}_input")(watch_input)

    async def on_rebalance(self, *args: Any, **kwargs: Any) -> None:
        self.active = time.monotonic()

    async def on_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        """Where each partition first assigned to this process starts: the group's
        committed offset, read before this generation's fetches, so a message the stream
        then skips (and commits past) shows as a gap. A partition seen before keeps its
        own next offset."""
        self.active = time.monotonic()
        self.restored.clear()  # the tables are recovered anew: read the offsets again
        if self.reader is None:
            return
        mine = sorted(tp.partition for tp in assigned if tp.topic == self.reader.topic and tp.partition not in self.next)
        if mine:
            for partition, offset in (await self.reader.committed(mine)).items():
                self.next.setdefault(partition, offset)

    async def deliver(self, partition: int, offset: int, value: bytes) -> None:
        self.active = time.monotonic()
        if (partition, offset) in self.drop:
            self.drop.discard((partition, offset))
            log.warning("input message dropped (EARN_DROP_INPUT)", extra={"agent": self.agent, "partition": partition, "offset": offset})
            return
        async with self.lock:
            if offset in self.read_directly.get(partition, range(0)):
                READ_AGAIN.labels(self.agent).inc()
                return
            self._restore(partition)
            expected = self.next.get(partition)
            if expected is not None and offset > expected and self.reader is not None:
                await self._read(partition, expected, offset, "next_message")
            await self.apply(partition, offset, value)
            self.next[partition] = max(offset + 1, self.next.get(partition, 0))
            self._record(partition)
            self.active = time.monotonic()

    def _restore(self, partition: int) -> None:
        """The state's own next offset overrides the committed one (the state may be
        ahead of the commits, or behind a commit past a skipped message)."""
        if self.offsets is None or partition in self.restored:
            return
        self.restored.add(partition)
        raw = self.offsets.get(f"offset:{partition}")
        if raw is not None:
            self.next[partition] = int(raw if isinstance(raw, str) else raw.decode())

    def _record(self, partition: int) -> None:
        if self.offsets is not None:
            self.offsets[f"offset:{partition}"] = str(self.next[partition])

    async def watch(self, app: Any, stall_seconds: float) -> None:
        """Read what an idle stream has left undelivered on the assigned partitions."""
        if self.reader is None or time.monotonic() - self.active < stall_seconds:
            return
        if app.unassigned and not (app.rebalancing or app.in_recovery):
            # No partition at all since the last rebalance, for longer than a stall: seen
            # after a broker SIGKILL, when the group rebalanced before the restarted broker
            # knew the topics ("Ignoring missing topic") and faust never rebalanced again.
            # Nothing would ever be consumed; exit so the supervisor restarts the worker
            # (run at most as many workers as the input topics have partitions).
            log.critical("no input partition assigned after a rebalance: exiting for a restart",
                         extra={"agent": self.agent, "topic": self.reader.topic})
            os._exit(70)
        if app.rebalancing or app.in_recovery or app.unassigned:
            return
        mine = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == self.reader.topic)
        if not mine:
            return
        ends = await self.reader.end_offsets(mine)
        async with self.lock:
            if time.monotonic() - self.active < stall_seconds:
                return
            for partition in mine:
                self._restore(partition)
                if partition not in self.next:
                    continue
                start, stop = self.next[partition], ends.get(partition, 0)
                if stop > start:
                    await self._read(partition, start, stop, "stall")

    async def _read(self, partition: int, start: int, stop: int, found_by: str) -> None:
        assert self.reader is not None
        INPUT_GAPS.labels(self.agent, found_by).inc()
        log.error(
            "input messages not delivered by the stream: reading them directly",
            extra={"agent": self.agent, "partition": partition, "from_offset": start, "to_offset": stop, "found_by": found_by},
        )
        for missing, value in await self.reader.read(partition, start, stop):
            event = _DirectEvent(self.reader.topic, partition, missing)
            token = faust_streams._current_event.set(weakref.ref(event))  # type: ignore[arg-type]
            try:
                await self.apply(partition, missing, value)
                self.next[partition] = missing + 1
                self._record(partition)
            finally:
                faust_streams._current_event.reset(token)
        self.read_directly[partition] = range(start, stop)


class _DirectEvent:
    """What faust's tables read of the current event, for a message read directly."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.message = SimpleNamespace(
            topic=topic, partition=partition, offset=offset, timestamp=time.time(), tp=TopicPartition(topic, partition)
        )


def parse_drops(text: str, agent: str = "accrual") -> set[tuple[int, int]]:
    """``"0:12,3:7"`` -> {(0, 12), (3, 7)} (EARN_DROP_INPUT): the drops of ``agent``. An
    item without a prefix is the accrual agent's; ``loan_prices/1:4`` is agent
    loan_prices' (partition 1, offset 4 of its input)."""
    out = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        owner, _, where = item.rpartition("/")
        if (owner or "accrual") != agent:
            continue
        partition, _, offset = where.partition(":")
        out.add((int(partition), int(offset)))
    return out


__all__ = ["INPUT_GAPS", "InputGuard", "InputReader", "parse_drops"]

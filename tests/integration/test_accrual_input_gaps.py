"""Input messages faust's stream did not deliver are read straight from the topic (the
engine's ``InputGuard`` with an ``InputReader`` against the real broker): a gap revealed by the next message,
a tail that no later message reveals (the stall watchdog), and where a partition starts
when first assigned (the group's committed offset). The engine's logic runs in memory
(``Engine.in_memory``); its output must equal the output of an engine that was given
every message."""

from __future__ import annotations

import asyncio
import copy
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from earn.v1 import accrual_pb2
from services.accrual.app import INPUT, AccrualSettings, Engine
from services.accrual.delivery import InputReader
from services.kernel import topics
from services.kernel.config import Settings
from services.kernel.topics import topic_name
from tests.conftest import Env
from tests.integration.test_accrual_engine import (
    PARTITIONS,
    Collected,
    collect,
    periods_of,
    produce,
    reference,
    scenario,
    settings_with,
    start,
)
from tests.unit.test_accrual_engine_memory import Sink, feed, log_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def published(stack: Env) -> tuple[Settings, list[list[bytes]]]:
    """A scenario's input logs published to an input topic of their own."""
    settings = Settings(pg_database=stack.settings.pg_database, topic_prefix=f"{stack.settings.topic_prefix}gaps{uuid.uuid4().hex[:6]}.")
    topics.ensure_topics(settings, [INPUT])
    logs = log_of(scenario(seed=7, positions=40, hours=30, payouts_every=6))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for p, log in enumerate(logs):
            for value in log:
                await producer.send(topic_name(settings, INPUT), value, partition=p)
        await producer.flush()
    finally:
        await producer.stop()
    return settings, logs


@pytest.fixture
async def readers() -> AsyncIterator[list[InputReader]]:
    """The readers a test opened, closed after it."""
    opened: list[InputReader] = []
    yield opened
    for reader in opened:
        await reader.close()


@pytest.fixture
def engine_on(readers: list[InputReader]) -> Callable[..., tuple[Engine, Sink]]:
    def make(settings: Settings, group: str = "gaps-test") -> tuple[Engine, Sink]:
        sink = Sink()
        engine = Engine.in_memory(sink, PARTITIONS)
        engine.input.reader = InputReader(settings.kafka_bootstrap, topic_name(settings, INPUT), group)
        readers.append(engine.input.reader)
        return engine, sink

    return make


def app_of(engine: Engine) -> SimpleNamespace:
    """What the watchdog reads of the faust app: every partition assigned, no rebalance."""
    assert engine.input.reader is not None
    topic = engine.input.reader.topic
    assigned = {TopicPartition(topic, p) for p in range(PARTITIONS)}
    return SimpleNamespace(rebalancing=False, in_recovery=False, unassigned=False, consumer=SimpleNamespace(assignment=lambda: assigned))


async def everything(logs: list[list[bytes]]) -> Sink:
    sink = Sink()
    await feed(Engine.in_memory(sink, PARTITIONS), logs, [0] * PARTITIONS, [len(log) for log in logs])
    assert sink.items and sink.last
    return sink


async def test_a_gap_revealed_by_the_next_message_is_read_directly(published: tuple[Settings, list[list[bytes]]], engine_on: Callable[..., tuple[Engine, Sink]]) -> None:
    settings, logs = published
    expected = await everything(logs)
    engine, sink = engine_on(settings)
    ends = [len(log) for log in logs]
    # The stream delivers each partition's first third, skips the second, delivers the rest.
    thirds = [end // 3 for end in ends]
    engine.input.next = {p: 0 for p in range(PARTITIONS)}
    await feed(engine, logs, [0] * PARTITIONS, thirds)
    skip_to = [2 * t for t in thirds]
    await feed(engine, logs, skip_to, ends)
    assert (sink.items, sink.last) == (expected.items, expected.last)
    assert not sink.conflicts
    assert engine.input.read_directly == {p: range(thirds[p], skip_to[p]) for p in range(PARTITIONS)}


async def test_a_tail_no_message_reveals_is_read_once_the_stream_is_idle(published: tuple[Settings, list[list[bytes]]], engine_on: Callable[..., tuple[Engine, Sink]]) -> None:
    settings, logs = published
    expected = await everything(logs)
    engine, sink = engine_on(settings)
    ends = [len(log) for log in logs]
    tails = [end - 1 - p % 3 for p, end in enumerate(ends)]  # 1 to 3 messages never delivered
    engine.input.next = {p: 0 for p in range(PARTITIONS)}
    await feed(engine, logs, [0] * PARTITIONS, tails)
    assert sink.last != expected.last  # the last payout requests were not seen

    app = app_of(engine)
    await engine.input.watch(app, stall_seconds=60)  # the stream delivered just now: not idle
    assert engine.input.next == dict(enumerate(tails))
    app.rebalancing = True
    engine.input.active -= 120
    await engine.input.watch(app, stall_seconds=60)  # idle, but a rebalance is under way
    assert engine.input.next == dict(enumerate(tails))

    app.rebalancing = False
    await engine.input.watch(app, stall_seconds=60)
    assert (sink.items, sink.last) == (expected.items, expected.last)
    assert engine.input.next == dict(enumerate(ends))
    assert engine.input.read_directly == {p: range(tails[p], ends[p]) for p in range(PARTITIONS)}

    # If the stream delivers them after all, they are not applied twice.
    tables = copy.deepcopy((engine.products, engine.positions, engine.partitions_meta, engine.payouts))
    items = dict(sink.items)
    await feed(engine, logs, tails, ends)
    assert (engine.products, engine.positions, engine.partitions_meta, engine.payouts) == tables
    assert sink.items == items and not sink.conflicts


async def test_a_partition_first_assigned_starts_at_the_groups_committed_offset(published: tuple[Settings, list[list[bytes]]], engine_on: Callable[..., tuple[Engine, Sink]]) -> None:
    settings, _ = published
    group = f"gaps-{uuid.uuid4().hex[:8]}"
    topic = topic_name(settings, INPUT)
    committer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await committer.start()
    try:
        committer.assign([TopicPartition(topic, 1)])
        await committer.commit({TopicPartition(topic, 1): OffsetAndMetadata(5, "")})
    finally:
        await committer.stop()
    engine, _ = engine_on(settings, group)
    engine.input.next = {2: 3}  # seen before by this process: kept
    await engine.input.on_assigned(None, {TopicPartition(topic, p) for p in range(PARTITIONS)} | {TopicPartition("other", 0)})
    assert engine.input.next == {0: 0, 1: 5, 2: 3, 3: 0, 4: 0, 5: 0}


async def test_the_engine_process_applies_what_its_stream_dropped(stack: Env) -> None:
    """A real engine process (faust tables, changelogs) whose stream delivery drops
    messages (EARN_DROP_INPUT, as faust may): the last message of two partitions, which no
    later message reveals, and one in the middle of a third. The payouts still equal the
    reference to the unit."""
    settings, env = settings_with(stack, "drops.")
    await asyncio.to_thread(topics.ensure_topics, settings, [INPUT, "accrual.payouts"])
    steps = scenario(seed=11, positions=60, hours=48, payouts_every=12)
    ends = [len(log) for log in log_of(steps)]
    await produce(settings, steps)
    drops = {(0, ends[0] - 1), (1, ends[1] - 1), (2, ends[2] // 2)}
    env |= {"EARN_DROP_INPUT": ",".join(f"{p}:{o}" for p, o in sorted(drops)), "EARN_STALL_SECONDS": "3"}
    engine = start(stack, env)
    try:
        got = await collect(settings, periods_of(steps), Collected(), timeout=120)
        assert engine.running(), f"engine died; see {engine.logfile}"
        assert engine.metrics_url
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(engine.metrics_url, timeout=5).read().decode())
    finally:
        engine.stop()
    expected = reference(steps)
    assert not got.conflicts
    assert got.items == expected
    for found_by in ("stall", "next_message"):
        assert f'earn_accrual_input_gaps_total{{agent="accrual",found_by="{found_by}"}}' in metrics


async def test_a_restarted_engine_reads_what_the_stream_skipped_and_committed_past(stack: Env) -> None:
    """The stream drops partition 0's last payout request and commits past it; the worker
    is then SIGKILLed before its watchdog acts. The next worker finds the group's
    committed offset past that message, but its state's own offset (kept in the table)
    says the message was never applied: it is read, and the payouts equal the reference."""
    settings, env = settings_with(stack, "skipkill.")
    await asyncio.to_thread(topics.ensure_topics, settings, [INPUT, "accrual.payouts"])
    steps = scenario(seed=12, positions=40, hours=36, payouts_every=12)
    offset, last_request = 0, None
    for step in steps:
        if step.partition in (None, 0):
            if isinstance(step.payload, accrual_pb2.PayoutRequested):
                last_request = offset
            offset += 1
    assert last_request is not None
    await produce(settings, steps)
    group = settings.topic_prefix + AccrualSettings().app_id
    first = start(stack, env | {"EARN_DROP_INPUT": f"0:{last_request}", "EARN_STALL_SECONDS": "600"})
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            deadline = asyncio.get_running_loop().time() + 120
            tp = TopicPartition(topic_name(settings, INPUT), 0)
            while True:
                found = await admin.list_consumer_group_offsets(group, partitions=[tp])
                if tp in found and found[tp].offset > last_request:
                    break  # committed past the message the stream dropped
                assert asyncio.get_running_loop().time() < deadline, "the first worker never committed past the drop"
                assert first.running(), f"engine died; see {first.logfile}"
                await asyncio.sleep(0.5)
        finally:
            await admin.close()
    finally:
        first.kill()
    second = start(stack, env | {"EARN_STALL_SECONDS": "3"})
    try:
        got = await collect(settings, periods_of(steps), Collected(), timeout=120)
        assert second.running(), f"engine died; see {second.logfile}"
    finally:
        second.stop()
    assert not got.conflicts
    assert got.items == reference(steps)

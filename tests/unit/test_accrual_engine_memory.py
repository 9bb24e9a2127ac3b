"""The accrual engine's logic in memory (``Engine.in_memory``: plain dicts instead of
faust tables, no broker) over random input logs, checked to the unit against the
hour-by-hour reference of the integration tests; then crashes: a second engine starts
from the first one's tables (ahead of its committed offsets, as after a SIGKILL) and
replays from the committed offsets. Items must be identical and complete."""

from __future__ import annotations

import asyncio
import copy
import uuid
import zlib
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earn.v1 import accrual_pb2
from services.accrual import domain
from services.accrual.app import Engine
from services.kernel import events
from tests.integration.test_accrual_engine import PARTITIONS, Step, reference, scenario


class Sink:
    """The output topic: items per (period, position); conflicting re-emissions noted."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], tuple[str, int]] = {}
        self.conflicts: list[str] = []
        self.last: set[tuple[str, int]] = set()

    async def send(self, *, key: bytes, value: bytes, partition: int, force: bool) -> asyncio.Future[None]:
        batch = events.unwrap(events.parse(value), accrual_pb2.PayoutBatch)
        assert len(batch.position_ids) == len(batch.user_ids) == len(batch.amounts) == len(batch.from_hours)
        if batch.last:
            self.last.add((batch.period, batch.partition))
        for position_id, amount, from_hour in zip(batch.position_ids, batch.amounts, batch.from_hours, strict=True):
            key_ = (batch.period, position_id)
            if key_ in self.items and self.items[key_] != (amount, from_hour):
                self.conflicts.append(f"{key_}: {self.items[key_]} then {(amount, from_hour)}")
            self.items.setdefault(key_, (amount, from_hour))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def log_of(steps: list[Step]) -> list[list[bytes]]:
    """Each partition's input log (envelopes), as the relay would publish them."""
    logs: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    for step in steps:
        for p in range(PARTITIONS) if step.partition is None else [step.partition]:
            env = events.wrap(step.payload, key=step.key, producer="t", occurred_at=datetime.now(UTC), event_id=uuid.UUID(step.event_ids[p]))
            logs[p].append(env.SerializeToString())
    return logs


async def feed(engine: Engine, logs: list[list[bytes]], start: list[int], stop: list[int]) -> None:
    """Round-robin over partitions (like one worker's interleaving) from ``start`` to ``stop``."""
    at = list(start)
    while any(at[p] < stop[p] for p in range(PARTITIONS)):
        for p in range(PARTITIONS):
            for _ in range(3):
                if at[p] < stop[p]:
                    message = SimpleNamespace(partition=p, offset=at[p], tp=None)
                    await engine.handle(SimpleNamespace(value=logs[p][at[p]], message=message))  # type: ignore[arg-type]
                    at[p] += 1


def tables_of(engine: Engine) -> Engine:
    """A new engine on a copy of ``engine``'s tables, its memory empty: a restart."""
    fresh = Engine.in_memory(engine.output, PARTITIONS)
    fresh.products, fresh.positions = copy.deepcopy(engine.products), copy.deepcopy(engine.positions)
    fresh.partitions_meta, fresh.payouts = copy.deepcopy(engine.partitions_meta), copy.deepcopy(engine.payouts)
    return fresh


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), every=st.sampled_from([1, 6, 24]), crashes=st.lists(st.tuples(st.floats(0.05, 0.95), st.floats(0, 1)), max_size=3))
def test_engine_in_memory_matches_the_reference_through_crashes(seed: int, every: int, crashes: list[tuple[float, float]]) -> None:
    steps = scenario(seed=seed, positions=80, hours=72, payouts_every=every)
    expected = reference(steps)
    logs = log_of(steps)
    ends = [len(log) for log in logs]

    async def run() -> Sink:
        sink = Sink()
        engine = Engine.in_memory(sink, PARTITIONS)
        committed = [0] * PARTITIONS
        for where, lag in sorted(crashes):
            # Process up to `where`, crash with offsets committed `lag` of the way behind.
            reached = [max(committed[p], int(ends[p] * where)) for p in range(PARTITIONS)]
            await feed(engine, logs, committed, reached)
            committed = [c + int((r - c) * (1 - lag)) for c, r in zip(committed, reached, strict=True)]
            engine = tables_of(engine)
            await feed(engine, logs, committed, reached)  # the replayed suffix
            committed = reached
        await feed(engine, logs, committed, ends)
        return sink

    sink = asyncio.run(run())
    assert not sink.conflicts, sink.conflicts[:3]
    assert {(period, part) for period, _ in expected for part in range(PARTITIONS)} <= sink.last | {(p, q) for p in [] for q in []} or not expected
    missing = sorted(set(expected) - set(sink.items))
    extra = sorted(set(sink.items) - set(expected))
    assert not missing and not extra, (missing[:3], extra[:3])
    wrong = [(k, sink.items[k], v) for k, v in expected.items() if sink.items[k] != v]
    assert not wrong, wrong[:3]


class Batches:
    """The output topic: each PayoutBatch as (period, partition, sequence, last, position ids)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int, bool, tuple[str, ...]]] = []

    async def send(self, *, key: bytes, value: bytes, partition: int, force: bool) -> asyncio.Future[None]:
        b = events.unwrap(events.parse(value), accrual_pb2.PayoutBatch)
        self.sent.append((b.period, b.partition, b.sequence, b.last, tuple(b.position_ids)))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def test_a_request_met_again_is_emitted_in_the_batches_of_its_first_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payout request replayed after a restart (its offset not committed) by a build whose
    BATCH_SIZE changed: its batches come out as the first time, sequence by sequence (the
    sink refuses a sequence it knows with other items); a new request takes the new size."""
    h0, at = 490_000, datetime.now(UTC)

    def wrap(msg, key: str) -> bytes:  # type: ignore[no-untyped-def]
        return events.wrap(msg, key=key, producer="t", occurred_at=at).SerializeToString()

    ids = [str(i) for i in range(1, 400) if zlib.crc32(str(i).encode()) % PARTITIONS == 0][:10]
    log = [wrap(accrual_pb2.ProductRatesSet(product_id="p", asset="USDT", effective_hour=h0, tiers=[accrual_pb2.RateTier(apr="0.1")]), "product:p")]
    log += [
        wrap(accrual_pb2.PositionChanged(position_id=i, product_id="p", user_id=f"u{i}", asset="USDT",
                                         changes=[accrual_pb2.PrincipalChange(effective_hour=h0, delta="1000")]), i)
        for i in ids
    ]
    log.append(wrap(accrual_pb2.HourClosed(hour=h0 + 48), "tick"))
    first_request = len(log)
    log.append(wrap(accrual_pb2.PayoutRequested(job="j", period="d1", boundary_hour=h0 + 24, product_ids=["p"]), "payout"))
    log.append(wrap(accrual_pb2.PayoutRequested(job="j", period="d2", boundary_hour=h0 + 48, product_ids=["p"]), "payout"))

    async def run(engine: Engine, start: int, stop: int) -> None:
        for offset in range(start, stop):
            message = SimpleNamespace(partition=0, offset=offset, tp=None)
            await engine.handle(SimpleNamespace(value=log[offset], message=message))  # type: ignore[arg-type]

    async def play() -> None:
        monkeypatch.setattr(domain, "BATCH_SIZE", 3)
        engine = Engine.in_memory(Batches(), PARTITIONS)
        await run(engine, 0, first_request + 1)
        first = list(engine.output.sent)
        assert [(s, last, len(p)) for _, _, s, last, p in first] == [(0, False, 3), (1, False, 3), (2, False, 3), (3, True, 1)]

        monkeypatch.setattr(domain, "BATCH_SIZE", 4)  # the next build
        restarted = tables_of(engine)
        restarted.output = Batches()
        await run(restarted, first_request, len(log))  # the first request again, then a new one
        assert [b for b in restarted.output.sent if b[0] == "d1"] == first
        assert [(s, last, len(p)) for period, _, s, last, p in restarted.output.sent if period == "d2"] == [(0, False, 4), (1, False, 4), (2, True, 2)]

    asyncio.run(play())

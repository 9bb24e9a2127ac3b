"""The accrual engine as a process against the real broker: input envelopes produced
directly, payout batches checked to the unit against an independent reference (exact
fractions, hour by hour), then the same under SIGKILL and restart."""

from __future__ import annotations

import asyncio
import random
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from earn.v1 import accrual_pb2
from services.accrual import domain
from services.devstack.processes import ManagedProcess, ProcessSpec
from services.kernel import events, topics
from services.kernel.config import Settings
from services.kernel.money import ASSET_SCALES
from services.kernel.topics import topic_name
from tests.conftest import Env

pytestmark = pytest.mark.integration

ENGINE = ProcessSpec("accrual", "services.accrual.main", None, None, "EARN_METRICS_PORT", 9110)
PARTITIONS = 6
JOB = "simple_earn.interest"
H0 = 492_000  # a unix hour (2026)

# ------------------------------------------------------------------ the scenario


def tiers(*pairs: tuple[str, str]) -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to=u, apr=a) for u, a in pairs]


def partition_of(position_id: str) -> int:
    return zlib.crc32(position_id.encode()) % PARTITIONS


@dataclass
class Step:
    """One input fact: broadcast (rates, ticks, payout requests) or one position change."""

    payload: object
    key: str
    partition: int | None  # None: to every partition
    # One envelope id per partition copy, fixed: a step appended twice is a duplicate
    # publication by the upstream outbox relay (same ids), which must change nothing.
    event_ids: list[str] = field(default_factory=lambda: [str(uuid.uuid4()) for _ in range(PARTITIONS)])


@dataclass
class RefPosition:
    product: str
    asset: str
    user: str
    changes: list[tuple[int, Fraction]] = field(default_factory=list)
    paid: Fraction = Fraction(0)
    paid_through: int | None = None
    closed_from: int = 0
    dropped: bool = False


def scenario(seed: int, positions: int, hours: int, payouts_every: int) -> list[Step]:
    rnd = random.Random(seed)
    steps: list[Step] = []
    products = {"p-btc": "BTC", "p-usdt": "USDT", "p-eth": "ETH"}

    def rates(product: str, hour: int, tier_list) -> None:
        steps.append(Step(accrual_pb2.ProductRatesSet(product_id=product, asset=products[product], effective_hour=hour, tiers=tier_list), product, None))

    rates("p-btc", H0, tiers(("5", "0.08"), ("", "0.03")))
    rates("p-usdt", H0, tiers(("", "0.1234")))
    rates("p-eth", H0 + 2, tiers(("1", "0.05"), ("10", "0.02"), ("", "0")))
    pending_rates = {
        H0 + 20: ("p-btc", tiers(("2", "0.1"), ("", "0.01"))),  # bracket change
        H0 + 40: ("p-btc", tiers(("2", "0.12"), ("", "0.015"))),  # same brackets, new APRs
        H0 + 30: ("p-usdt", tiers(("1000", "0.2"), ("", "0.05"))),
    }
    balances: dict[str, Fraction] = {}
    owners = {f"pos-{seed}-{i:04d}": rnd.choice(list(products)) for i in range(positions)}
    payout_n = 0
    for hour in range(H0, H0 + hours):
        for eff, (product, tl) in list(pending_rates.items()):
            if eff - 1 == hour:  # announced the hour before it takes effect
                rates(product, eff, tl)
        for pid, product in list(owners.items()):
            if rnd.random() > 0.06:
                continue
            bal = balances.get(pid, Fraction(0))
            scale = min(ASSET_SCALES[products[product]], 8)
            if bal > 0 and rnd.random() < 0.35:
                delta = -bal if rnd.random() < 0.5 else -Fraction(rnd.randint(1, 10**scale), 10**scale) * bal
                delta = Fraction(int(delta * 10**scale), 10**scale)
                eff = hour  # a redemption stops accrual from its own hour
            else:
                delta = Fraction(rnd.randint(1, 20 * 10**scale), 10**scale)
                eff = hour + 1  # a subscription accrues from the next full hour
            if delta == 0:
                continue
            if rnd.random() < 0.1 and delta > 0:
                eff = max(H0, hour - rnd.randint(1, 30))  # late: the relay lagged
            balances[pid] = bal + delta
            closed = eff if balances[pid] == 0 else 0
            change = accrual_pb2.PrincipalChange(effective_hour=eff, delta=_fmt(delta))
            steps.append(
                Step(
                    accrual_pb2.PositionChanged(
                        position_id=pid, product_id=product, user_id=f"u-{pid[-2:]}", asset=products[product],
                        changes=[change], closed_from_hour=closed,
                    ),
                    pid,
                    partition_of(pid),
                )
            )
            if closed:
                del owners[pid]  # a closed position does not reopen (a new id would)
        # The relay re-publishes some recent facts (after a crash of its own).
        if rnd.random() < 0.2:
            recent = [st for st in steps[-40:] if not isinstance(st.payload, accrual_pb2.ProductRatesSet)]
            steps.extend(rnd.sample(recent, min(len(recent), 3)))
        steps.append(Step(accrual_pb2.HourClosed(hour=hour + 1), "tick", None))
        if (hour + 1 - H0) % payouts_every == 0:
            payout_n += 1
            wanted = [] if payout_n % 2 else ["p-btc", "p-eth", "p-usdt"]
            steps.append(Step(accrual_pb2.PayoutRequested(job=JOB, period=f"d{payout_n}", boundary_hour=hour + 1, product_ids=wanted), "payout", None))
    return steps


def _fmt(value: Fraction) -> str:
    sign = "-" if value < 0 else ""
    value = abs(value)
    whole, rest = divmod(value.numerator, value.denominator)
    digits = ""
    while rest:
        rest *= 10
        d, rest = divmod(rest, value.denominator)
        digits += str(d)
        assert len(digits) <= 18
    return f"{sign}{whole}" + (f".{digits}" if digits else "")


# ------------------------------------------------------------------ the reference


def reference(steps: list[Step]) -> dict[tuple[str, str], tuple[str, int]]:
    """(period, position) -> (amount, from_hour), computed hour by hour with fractions."""
    rate_facts: dict[str, list[tuple[int, list[tuple[Fraction | None, Fraction]]]]] = {}
    positions: dict[str, RefPosition] = {}
    out: dict[tuple[str, str], tuple[str, int]] = {}

    def tiers_at(product: str, hour: int):
        best = None
        for eff, tl in rate_facts.get(product, []):
            if eff <= hour and (best is None or eff >= best[0]):
                best = (eff, tl)
        return best[1] if best else None

    def hour_interest(product: str, principal: Fraction, hour: int) -> Fraction:
        tl = tiers_at(product, hour)
        if tl is None or principal <= 0:
            return Fraction(0)
        total, low = Fraction(0), Fraction(0)
        for up, apr in tl:
            high = principal if up is None else min(principal, up)
            if high > low:
                total += (high - low) * apr
            if up is None:
                break
            low = up
        return total / 8760

    seen: set[int] = set()
    for step in steps:
        if id(step) in seen:
            continue  # a duplicate publication
        seen.add(id(step))
        msg = step.payload
        if isinstance(msg, accrual_pb2.ProductRatesSet):
            rate_facts.setdefault(msg.product_id, []).append(
                (msg.effective_hour, [(Fraction(t.up_to) if t.up_to else None, Fraction(t.apr)) for t in msg.tiers])
            )
        elif isinstance(msg, accrual_pb2.PositionChanged):
            pos = positions.setdefault(msg.position_id, RefPosition(msg.product_id, msg.asset, msg.user_id))
            pos.changes += [(c.effective_hour, Fraction(c.delta)) for c in msg.changes]
            pos.closed_from = msg.closed_from_hour or pos.closed_from
        elif isinstance(msg, accrual_pb2.PayoutRequested):
            for pid, pos in sorted(positions.items()):
                if pos.dropped or (msg.product_ids and pos.product not in msg.product_ids):
                    continue
                merged: dict[int, Fraction] = {}
                for h, d in pos.changes:
                    merged[h] = merged.get(h, Fraction(0)) + d
                earning = [h for h, d in merged.items() if d]
                closed = bool(pos.closed_from) and pos.closed_from <= msg.boundary_hour
                if pos.paid_through is None and (not earning or min(earning) >= msg.boundary_hour):
                    # Not started yet (no item); opened and closed in one hour: forgotten.
                    pos.dropped = closed and not earning
                    continue
                first = min(earning)
                until = max(msg.boundary_hour, pos.paid_through or 0)
                exact = sum(
                    (hour_interest(pos.product, sum((d for h, d in pos.changes if h <= hour), Fraction(0)), hour) for hour in range(first, until)),
                    Fraction(0),
                )
                unit = Fraction(1, 10 ** ASSET_SCALES[pos.asset])
                due = (exact // unit) * unit - pos.paid
                from_hour = pos.paid_through if pos.paid_through is not None else first
                pos.paid += due
                pos.paid_through = until
                if due > 0:  # only positive amounts are emitted
                    out[(msg.period, pid)] = (_fmt(due), from_hour)
                # Closed and paid through its closing hour: the engine forgets it.
                pos.dropped = closed
    return out


# ------------------------------------------------------------------ plumbing


async def produce(settings: Settings, steps: list[Step], pace: float = 0.0) -> None:
    # Idempotent, like the outbox relay: retries under load neither reorder nor duplicate
    # the input (the engine relies on per-partition order).
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5, enable_idempotence=True)
    await producer.start()
    name = topic_name(settings, "simple_earn.accrual")
    try:
        for i, step in enumerate(steps):
            parts = range(PARTITIONS) if step.partition is None else [step.partition]
            for p in parts:
                env = events.wrap(
                    step.payload, key=step.key, producer="test", occurred_at=datetime.now(UTC),
                    event_id=uuid.UUID(step.event_ids[p]),
                )
                await producer.send(name, env.SerializeToString(), key=step.key.encode(), partition=p)
            if pace and i % 20 == 0:
                await producer.flush()
                await asyncio.sleep(pace)
        await producer.flush()
    finally:
        await producer.stop()


@dataclass
class Collected:
    items: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    last_seen: set[tuple[str, int]] = field(default_factory=set)
    batches: int = 0


async def collect(settings: Settings, periods: set[str], into: Collected, timeout: float) -> Collected:
    consumer = AIOKafkaConsumer(
        topic_name(settings, "accrual.payouts"),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"check-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    want = {(p, part) for p in periods for part in range(PARTITIONS)}
    try:
        async def drain() -> None:
            while not want <= into.last_seen:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        batch = events.unwrap(events.parse(record.value), accrual_pb2.PayoutBatch)
                        assert record.key == f"{batch.job}:{batch.period}:{batch.partition}".encode()
                        assert len(batch.position_ids) <= domain.BATCH_SIZE
                        assert len(batch.user_ids) == len(batch.amounts) == len(batch.from_hours) == len(batch.position_ids)
                        into.batches += 1
                        if batch.last:
                            into.last_seen.add((batch.period, batch.partition))
                        for position_id, amount, from_hour in zip(batch.position_ids, batch.amounts, batch.from_hours):
                            key = (batch.period, position_id)
                            value = (amount, from_hour)
                            assert partition_of(position_id) == batch.partition
                            if key in into.items:
                                into.duplicates += 1
                                if into.items[key] != value:
                                    into.conflicts.append(f"{key}: {into.items[key]} then {value}")
                            else:
                                into.items[key] = value

        await asyncio.wait_for(drain(), timeout)
    finally:
        await consumer.stop()
    return into


def settings_with(stack: Env, prefix: str) -> tuple[Settings, dict[str, str]]:
    full = stack.settings.topic_prefix + prefix
    return Settings(pg_database=stack.settings.pg_database, topic_prefix=full), {"EARN_TOPIC_PREFIX": full}


def periods_of(steps: list[Step]) -> set[str]:
    return {s.payload.period for s in steps if isinstance(s.payload, accrual_pb2.PayoutRequested)}


def start(stack: Env, env: dict[str, str]) -> ManagedProcess:
    proc = stack.spawn(ENGINE, **env)
    proc.start()
    return proc


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("seed,positions,hours,every", [(1, 60, 96, 24), (2, 400, 120, 12)])
async def test_payouts_match_the_reference_to_the_unit(stack: Env, seed: int, positions: int, hours: int, every: int) -> None:
    settings, env = settings_with(stack, f"acc1-{seed}.")
    await asyncio.to_thread(topics.ensure_topics, settings, ["simple_earn.accrual", "accrual.payouts"])
    steps = scenario(seed=seed, positions=positions, hours=hours, payouts_every=every)
    expected = reference(steps)
    engine = start(stack, env)
    try:
        await produce(settings, steps)
        got = await collect(settings, periods_of(steps), Collected(), timeout=120)
        assert engine.running(), f"engine died; see {engine.logfile}"
        assert engine.metrics_url
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(engine.metrics_url, timeout=5).read().decode())
        assert 'earn_accrual_events_total{type="HourClosed"}' in metrics
        assert "earn_accrual_payout_items_total" in metrics and "earn_accrual_tick_to_visible_seconds_count" in metrics
        assert "earn_accrual_consumer_lag{" in metrics
    finally:
        engine.stop()
    assert not got.conflicts
    missing = sorted(set(expected) - set(got.items))
    extra = sorted(set(got.items) - set(expected))
    assert not missing and not extra, (missing[:5], extra[:5])
    wrong = [(k, got.items[k], expected[k]) for k in expected if got.items[k] != expected[k]]
    assert not wrong, wrong[:5]
    assert sum(Fraction(a) for a, _ in expected.values()) > 0


async def test_sigkill_and_restart_pay_the_same(stack: Env) -> None:
    settings, env = settings_with(stack, "acc2.")
    await asyncio.to_thread(topics.ensure_topics, settings, ["simple_earn.accrual", "accrual.payouts"])
    steps = scenario(seed=2, positions=400, hours=120, payouts_every=12)
    expected = reference(steps)
    periods = periods_of(steps)
    engine = start(stack, env)
    got = Collected()
    try:
        feeder = asyncio.create_task(produce(settings, steps, pace=0.01))
        # Kill it mid-stream, twice, each time once it has shown progress.
        for kills in range(2):
            seen = Collected()
            partial = asyncio.create_task(collect(settings, periods, seen, timeout=120))
            while not partial.done() and len(seen.items) < (kills + 1) * len(expected) // 4:
                await asyncio.sleep(0.1)
            partial.cancel()
            engine.kill()
            engine = start(stack, env)
        await feeder
        await collect(settings, periods, got, timeout=180)
        assert engine.running(), f"engine died; see {engine.logfile}"
    finally:
        engine.stop()
    print(f"kill test: {got.batches} batches read, {got.duplicates} re-emitted items (all identical)")
    assert not got.conflicts, got.conflicts[:5]
    assert set(got.items) == set(expected)
    wrong = [(k, got.items[k], expected[k]) for k in expected if got.items[k] != expected[k]]
    assert not wrong, wrong[:5]

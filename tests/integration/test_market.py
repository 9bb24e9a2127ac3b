"""Market service through Kafka and gRPC only: ticks published on market.prices (as the
exchange would) are stored once (the same event twice, another event for the same
(pair, time)); GetIndex; GetTwap checked exactly against a reference; a window with a
gap is refused naming the gap, then answered after BackfillPrices; a CSV replayed twice;
the seeded simulator's ticks reach the index."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import grpc
from services.kernel import grpcclient
import pytest
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import market_pb2 as mk, market_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel.config import REPO_ROOT
from services.market import domain
from services.market.simulator import tick_envelope
from tests.conftest import GATEWAY, OPERATOR, SERVICE, eventually, unique

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
BTC = domain.parse_pair("BTC/USDT")
ETH = domain.parse_pair("ETH/USDT")


def ts(moment: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(moment)
    return t


@pytest.fixture(scope="module")
def market_process(stack) -> ManagedProcess:  # type: ignore[no-untyped-def]
    proc = stack.process("market", EARN_MAX_GAP_SECONDS="60")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def market(market_process: ManagedProcess) -> AsyncIterator[market_pb2_grpc.MarketServiceStub]:
    async with grpcclient.channel(market_process.address) as channel:
        yield market_pb2_grpc.MarketServiceStub(channel)


@pytest.fixture(scope="module")
async def producer(stack, market_process) -> AsyncIterator[AIOKafkaProducer]:  # type: ignore[no-untyped-def]
    p = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True)
    await p.start()
    yield p
    await p.stop()


async def publish(stack, producer: AIOKafkaProducer, pair: domain.Pair, ticks: list[tuple[datetime, str]], event_ids: list[uuid.UUID] | None = None) -> None:  # type: ignore[no-untyped-def]
    topic = stack.settings.topic_prefix + "market.prices"
    for i, (moment, price) in enumerate(ticks):
        raw = tick_envelope(pair, Decimal(price), moment, "exchange", event_ids[i] if event_ids else None)
        await producer.send(topic, raw, key=pair.name.encode())
    await producer.flush()


async def found(call):  # type: ignore[no-untyped-def]
    """The reply, or an assertion (retried by ``eventually``) while the data is not there yet."""
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}") from None


def ref_twap(ticks: list[tuple[datetime, str]], start: datetime, end: datetime) -> Decimal:
    points = sorted(ticks)
    total = Fraction(0)
    for i, (at, price) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(at, start), min(nxt, end)
        if hi > lo:
            total += Fraction(Decimal(price)) * Fraction(int((hi - lo) / timedelta(microseconds=1)))
    exact = total / int((end - start) / timedelta(microseconds=1))
    return Decimal(round(exact * 10**6)).scaleb(-6)


async def test_ticks_index_twap_gap_and_backfill(stack, market, producer) -> None:  # type: ignore[no-untyped-def]
    # One tick every 20 s from T0 - 40 s to T0 + 30 min, with prices that vary; ETH gets a hole.
    btc = [(T0 + timedelta(seconds=20 * i - 40), f"{60000 + (i * 37) % 101}.{i % 7}") for i in range(93)]
    ids = [uuid.uuid4() for _ in btc]
    await publish(stack, producer, BTC, btc, ids)
    await publish(stack, producer, BTC, btc[:5], ids[:5])  # redelivered: the same events
    await publish(stack, producer, BTC, [(btc[6][0], "1")])  # another event for a stored (pair, time): first kept
    eth = [(T0 + timedelta(seconds=30 * i), "3000.25") for i in range(61) if not 20 <= i < 25]
    await publish(stack, producer, ETH, eth)

    async def last_arrived() -> None:
        reply = await found(market.GetIndex(mk.GetIndexRequest(pair="ETH/USDT"), metadata=GATEWAY))
        assert reply.event_time.ToDatetime(tzinfo=UTC) == eth[-1][0]
        reply = await found(market.GetIndex(mk.GetIndexRequest(pair="BTC/USDT"), metadata=SERVICE))
        assert (reply.price, reply.event_time.ToDatetime(tzinfo=UTC), reply.source) == (btc[-1][1], btc[-1][0], "exchange")

    await eventually(last_arrived, timeout=30)
    at = await market.GetIndex(mk.GetIndexRequest(pair="BTC/USDT", at=ts(btc[6][0] + timedelta(seconds=5))), metadata=GATEWAY)
    assert at.price == btc[6][1]

    start, end = T0, T0 + timedelta(minutes=30)
    reply = await market.GetTwap(mk.GetTwapRequest(pair="BTC/USDT", start=ts(start), end=ts(end)), metadata=SERVICE)
    assert Decimal(reply.twap) == ref_twap(btc, start, end)
    assert reply.ticks == 1 + sum(1 for t, _ in btc if start < t < end)
    assert reply.max_gap_seconds == 20

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await market.GetTwap(mk.GetTwapRequest(pair="ETH/USDT", start=ts(start), end=ts(end)), metadata=SERVICE)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    hole_from, hole_to = T0 + timedelta(seconds=30 * 19), T0 + timedelta(seconds=30 * 25)
    assert f"no tick between {domain.iso(domain.micros(hole_from))} and {domain.iso(domain.micros(hole_to))}" in err.value.details()

    fill = [(T0 + timedelta(seconds=30 * i), "3000.75") for i in range(20, 25)]
    request = mk.BackfillPricesRequest(idempotency_key=unique(), pair="ETH/USDT", ticks=[mk.BackfillTick(price=p, event_time=ts(t)) for t, p in fill])
    done = await market.BackfillPrices(request, metadata=OPERATOR)
    assert (done.inserted, done.already_stored) == (5, 0)
    assert await market.BackfillPrices(request, metadata=OPERATOR) == done  # same key: same answer
    reply = await market.GetTwap(mk.GetTwapRequest(pair="ETH/USDT", start=ts(start), end=ts(end)), metadata=SERVICE)
    assert Decimal(reply.twap) == ref_twap(eth + fill, start, end)


async def test_csv_replay_twice_stores_once(stack, market, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = T0 + timedelta(days=1)
    rows = [(base + timedelta(seconds=10 * i), f"{2000 + i}.5") for i in range(40)]
    path = tmp_path / "prices.csv"
    path.write_text("time,pair,price\n" + "".join(f"{t.isoformat()},ETH/USDT,{p}\n" for t, p in reversed(rows)))
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "services.market.replay", str(path)], cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "published 40 ticks" in done.stdout

    async def replayed() -> None:
        reply = await found(market.GetTwap(mk.GetTwapRequest(pair="ETH/USDT", start=ts(rows[0][0]), end=ts(rows[-1][0] + timedelta(seconds=10))), metadata=GATEWAY))
        assert (Decimal(reply.twap), reply.ticks) == (ref_twap(rows, rows[0][0], rows[-1][0] + timedelta(seconds=10)), 40)

    await eventually(replayed, timeout=30)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,pair,price\n2026-01-01T00:00:00Z,ETH/USDT,1e3\n")
    done = subprocess.run([sys.executable, "-m", "services.market.replay", str(bad)], cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "line 2: price:" in done.stderr, done.stderr


async def test_the_simulator_feeds_the_index(stack, market) -> None:  # type: ignore[no-untyped-def]
    sim = stack.process("market_simulator", EARN_SIM_PAIRS="BTC/USDC=50000", EARN_SIM_INTERVAL_SECONDS="0.2", EARN_SIM_SEED="3")
    sim.start()
    try:
        async def ticking() -> None:
            reply = await found(market.GetIndex(mk.GetIndexRequest(pair="BTC/USDC"), metadata=GATEWAY))
            assert reply.source == "simulator" and Decimal(reply.price) > 0

        await eventually(ticking, timeout=30)
    finally:
        sim.stop()

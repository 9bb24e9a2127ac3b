"""Price simulator: `python -m services.market.simulator` (started by `make run`).

A seeded geometric random walk per pair (drift and volatility per year, like a price
model), one tick per pair every ``EARN_SIM_INTERVAL_SECONDS``, published to
``market.prices`` exactly as the exchange's feed would (EventEnvelope with a PriceTick,
key = pair). The walk uses floats internally; what leaves is a decimal string quantized
(rounded half even) to the pair's price scale, never below one unit of it.

Settings (EARN_*): SIM_PAIRS ("BTC/USDT=60000,ETH/USDT=3000"), SIM_SEED, SIM_DRIFT
(0.0), SIM_VOLATILITY (0.6), SIM_INTERVAL_SECONDS (1.0).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import uuid
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, start_http_server

from services.kernel import events, logs, topics
from services.kernel.config import Settings, load
from services.kernel.money import format_amount
from services.market import domain

from earn.v1 import market_pb2

log = logging.getLogger(__name__)

TOPIC = "market.prices"
YEAR_SECONDS = 365 * 86400
PUBLISHED = Counter("earn_market_simulator_ticks_total", "Ticks the simulator published.", ["pair"])


class SimulatorSettings(Settings):
    metrics_port: int = 9107
    metrics_host: str = "127.0.0.1"
    sim_pairs: str = "BTC/USDT=60000,ETH/USDT=3000"
    sim_seed: int = 42
    sim_drift: float = 0.0
    sim_volatility: float = 0.6
    sim_interval_seconds: float = 1.0

    def pairs(self) -> list[tuple[domain.Pair, Decimal]]:
        out = []
        for item in self.sim_pairs.split(","):
            if not item.strip():
                continue
            name, _, start = item.strip().partition("=")
            pair = domain.parse_pair(name, "EARN_SIM_PAIRS")
            out.append((pair, domain.parse_price(start, pair, "EARN_SIM_PAIRS")))
        return out


def quantize(value: float, scale: int) -> Decimal:
    quantum = Decimal(1).scaleb(-scale)
    return max(Decimal(repr(value)).quantize(quantum, rounding=ROUND_HALF_EVEN), quantum)


class Walk:
    """One pair's seeded geometric random walk."""

    def __init__(self, rng: random.Random, start: Decimal, drift: float, volatility: float, step_seconds: float, scale: int) -> None:
        self.rng = rng
        self.value = float(start)
        self.scale = scale
        dt = step_seconds / YEAR_SECONDS
        self.mu = (drift - volatility**2 / 2) * dt
        self.sigma = volatility * math.sqrt(dt)

    def step(self) -> Decimal:
        self.value *= math.exp(self.mu + self.sigma * self.rng.gauss(0.0, 1.0))
        return quantize(self.value, self.scale)


def walk(*, seed: int, start: Decimal, drift: float, volatility: float, steps: int, step_seconds: float, scale: int) -> list[Decimal]:
    """The first ``steps`` prices of a walk (the simulator's series for one pair and seed)."""
    w = Walk(random.Random(seed), start, drift, volatility, step_seconds, scale)
    return [w.step() for _ in range(steps)]


def tick_envelope(pair: domain.Pair, price: Decimal, moment: datetime, source: str, event_id: uuid.UUID | None = None) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    tick = market_pb2.PriceTick(pair=pair.name, price=format_amount(price), event_time=stamp, source=source)
    return events.wrap(tick, key=pair.name, producer=source, occurred_at=moment, event_id=event_id).SerializeToString()


async def run(settings: SimulatorSettings, stop: asyncio.Event) -> None:
    pairs = settings.pairs()
    await asyncio.to_thread(topics.ensure_topics, settings, [TOPIC])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    topic = topics.topic_name(settings, TOPIC)
    # One generator per pair, each seeded from the seed and the pair: adding a pair does not change the others.
    walks = [
        (pair, Walk(random.Random(f"{settings.sim_seed}:{pair.name}"), start, settings.sim_drift, settings.sim_volatility,
                    settings.sim_interval_seconds, pair.price_scale))
        for pair, start in pairs
    ]
    log.info("simulator running", extra={"pairs": [p.name for p, _ in pairs], "topic": topic, "seed": settings.sim_seed})
    last: datetime | None = None
    try:
        while not stop.is_set():
            now = settings.clock.now()
            if last is None or now > last:  # a frozen file clock publishes nothing new
                for pair, w in walks:
                    await producer.send_and_wait(topic, tick_envelope(pair, w.step(), now, "simulator"), key=pair.name.encode())
                    PUBLISHED.labels(pair.name).inc()
                last = now
            try:
                await asyncio.wait_for(stop.wait(), settings.sim_interval_seconds)
            except TimeoutError:
                pass
    finally:
        await producer.stop()


async def main() -> None:
    settings = load(SimulatorSettings)
    logs.configure(settings.log_level)
    if settings.metrics_port:
        try:
            start_http_server(settings.metrics_port, addr=settings.metrics_host)
        except OSError as err:
            raise SystemExit(f"market simulator: cannot serve /metrics on port {settings.metrics_port} ({err}); set EARN_METRICS_PORT") from err
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)


if __name__ == "__main__":
    asyncio.run(main())

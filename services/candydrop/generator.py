"""A small exchange-event generator for demos: `python -m services.candydrop.generator`.

`make run` starts it next to CandyDrop. It creates a demo campaign for the current day
(CreateCampaign with a fixed key per day, so a restart finds it), registers a few demo
users, then publishes seeded spot and futures fills and deposits for them at a steady
rate to exchange.trades and exchange.deposits (keyed by user, idempotent producer), so
the campaign's progress moves while you watch:

    grpcurl -cacert .data/tls/ca.pem -cert .data/tls/tool.pem -key .data/tls/tool.key -H 'authorization: Bearer dev-gateway' \
      -d '{"campaign_id":"demo-2026-11-26","user_id":"demo-0"}' \
      127.0.0.1:50054 earn.v1.CandyDropService/GetProgress

Settings: EARN_GENERATOR_SEED (default 7), EARN_GENERATOR_RATE (events per second,
default 5), EARN_GENERATOR_USERS (default 5), EARN_GENERATOR_LIMIT (stop after that many
events; 0: run until stopped), EARN_CANDYDROP_ADDRESS.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
from services.kernel import grpcclient
from aiokafka import AIOKafkaProducer
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.kernel import logs, topics
from services.kernel.clock import hour_start, unix_hour
from services.kernel.config import Settings, load

from earn.v1 import candydrop_pb2 as cd, candydrop_pb2_grpc, exchange_pb2

log = logging.getLogger("services.candydrop.generator")


class GeneratorSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="EARN_", extra="ignore", frozen=True, populate_by_name=True)

    candydrop_address: str = "127.0.0.1:50054"
    operator_token: str = "dev-operator"
    gateway_token: str = "dev-gateway"
    seed: int = Field(default=7, validation_alias="EARN_GENERATOR_SEED")
    rate: float = Field(default=5.0, validation_alias="EARN_GENERATOR_RATE")
    users: int = Field(default=5, validation_alias="EARN_GENERATOR_USERS")
    limit: int = Field(default=0, validation_alias="EARN_GENERATOR_LIMIT")


def demo_campaign(campaign_id: str, start_hour: int) -> cd.CreateCampaignRequest:
    request = cd.CreateCampaignRequest(
        idempotency_key=f"generator:{campaign_id}", campaign_id=campaign_id, prize_asset="USDT", prize_pool="10000",
        pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA, per_user_cap="4000",
        tasks=[
            cd.CandyTask(task_id="spot", kind=cd.CANDY_TASK_KIND_SPOT_VOLUME, asset="USDT", threshold="1000", candies=10, max_completions=100),
            cd.CandyTask(task_id="futures", kind=cd.CANDY_TASK_KIND_FUTURES_VOLUME, asset="USDT", threshold="5000", candies=20, max_completions=50),
            cd.CandyTask(task_id="deposit", kind=cd.CANDY_TASK_KIND_DEPOSIT, asset="USDT", threshold="500", candies=5, max_completions=20),
            cd.CandyTask(task_id="first-deposit", kind=cd.CANDY_TASK_KIND_FIRST_DEPOSIT, candies=50, max_completions=1),
        ],
    )
    request.start_time.FromDatetime(hour_start(start_hour))
    request.end_time.FromDatetime(hour_start(start_hour + 24))
    return request


def event(rng: random.Random, n: int, run: str, user: str, first: bool, at: datetime) -> tuple[str, exchange_pb2.ExchangeEvent]:
    """One seeded event: a deposit (the user's first one is flagged), else a fill."""
    event_id = f"gen-{run}-{n}"
    roll = rng.random()
    message = exchange_pb2.ExchangeEvent()
    if first or roll < 0.1:
        d = message.deposit
        d.event_id, d.user_id, d.asset, d.first_deposit = event_id, user, "USDT", first
        d.amount = str(Decimal(rng.randint(10_00, 2_000_00)) / 100)
        d.event_time.FromDatetime(at)
        return "exchange.deposits", message
    if roll < 0.3:
        f = message.futures_trade
        f.event_id, f.user_id, f.contract, f.settle_asset = event_id, user, "BTCUSDT-PERP", "USDT"
        f.notional = str(Decimal(rng.randint(100_00, 20_000_00)) / 100)
        f.event_time.FromDatetime(at)
        return "exchange.trades", message
    s = message.spot_trade
    s.event_id, s.user_id, s.base_asset, s.quote_asset = event_id, user, "BTC", "USDT"
    quote = Decimal(rng.randint(5_00, 3_000_00)) / 100
    s.quote_amount, s.base_amount = str(quote), str((quote / Decimal(60000)).quantize(Decimal("0.00000001")))
    s.event_time.FromDatetime(at)
    return "exchange.trades", message


async def prepare(settings: GeneratorSettings, stop: asyncio.Event) -> tuple[str, list[str]]:
    """Create today's demo campaign and register the demo users (retrying until CandyDrop answers)."""
    now = settings.clock.now()
    campaign_id = f"demo-{now:%Y-%m-%d}"
    users = [f"demo-{i}" for i in range(settings.users)]
    start_hour = unix_hour(datetime(now.year, now.month, now.day, tzinfo=UTC))
    start_hour = max(start_hour, unix_hour(now))  # a campaign may not start before the current hour
    delay = 0.5
    while not stop.is_set():
        try:
            async with grpcclient.channel(settings.candydrop_address) as channel:
                stub = candydrop_pb2_grpc.CandyDropServiceStub(channel)
                operator = (("authorization", f"Bearer {settings.operator_token}"),)
                gateway = (("authorization", f"Bearer {settings.gateway_token}"),)
                try:
                    await stub.CreateCampaign(demo_campaign(campaign_id, start_hour), metadata=operator, timeout=10)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                for user in users:
                    await stub.Register(
                        cd.RegisterRequest(idempotency_key=f"generator:{campaign_id}:{user}", user_id=user, campaign_id=campaign_id),
                        metadata=gateway, timeout=10,
                    )
                return campaign_id, users
        except grpc.aio.AioRpcError as err:
            log.warning("candydrop not ready; retrying", extra={"code": err.code().name, "details": err.details()})
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
    return campaign_id, users


async def run(settings: GeneratorSettings, stop: asyncio.Event) -> int:
    """Publish events until stopped or ``settings.limit``; returns how many were sent."""
    await asyncio.to_thread(topics.ensure_topics, settings, ["exchange.trades", "exchange.deposits"])
    campaign_id, users = await prepare(settings, stop)
    rng = random.Random(settings.seed)
    run_id = f"{settings.seed}-{int(time.time())}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all", client_id="candydrop-generator")
    await producer.start()
    sent = 0
    deposited: set[str] = set()
    interval = 1.0 / settings.rate if settings.rate > 0 else 0.0
    next_at = time.monotonic()
    log.info("generator publishing", extra={"campaign": campaign_id, "users": users, "rate": settings.rate, "seed": settings.seed})
    try:
        while not stop.is_set() and (settings.limit <= 0 or sent < settings.limit):
            user = rng.choice(users)
            first = user not in deposited
            deposited.add(user)
            at = settings.clock.now() + timedelta(microseconds=sent % 1000)
            topic, message = event(rng, sent, run_id, user, first, at)
            await producer.send_and_wait(topics.topic_name(settings, topic), message.SerializeToString(), key=user.encode())
            sent += 1
            if sent % 100 == 0:
                log.info("generator progress", extra={"sent": sent, "campaign": campaign_id})
            next_at += interval
            wait = next_at - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except TimeoutError:
                    pass
    finally:
        await producer.stop()
    return sent


async def main() -> None:
    settings = load(GeneratorSettings)
    logs.configure(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sent = await run(settings, stop)
    log.info("generator stopped", extra={"sent": sent})
    if settings.limit > 0:
        return
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())

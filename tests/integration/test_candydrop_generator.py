"""The demo event generator (what `make run` starts next to CandyDrop), briefly: it
creates the day's demo campaign, registers its users and publishes a bounded number of
seeded events; CandyDrop counts them (the campaign gains candies)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from services.kernel import grpcclient
import pytest

from earn.v1 import candydrop_pb2 as cd, candydrop_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel.config import REPO_ROOT
from tests.conftest import GATEWAY, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def candydrop_process(stack) -> Iterator[ManagedProcess]:  # type: ignore[no-untyped-def]
    proc = stack.process("candydrop", EARN_WALLET_ADDRESS="127.0.0.1:1")  # counting needs no wallet
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


async def test_generator_feeds_a_live_demo_campaign(stack, candydrop_process: ManagedProcess) -> None:  # type: ignore[no-untyped-def]
    campaign_id = f"demo-{datetime.now(UTC):%Y-%m-%d}"  # the generator's (a run across midnight would miss it)
    env = {**stack.env, "EARN_CANDYDROP_ADDRESS": candydrop_process.address or "", "EARN_GENERATOR_LIMIT": "40",
           "EARN_GENERATOR_RATE": "200", "EARN_GENERATOR_USERS": "3", "EARN_GENERATOR_SEED": "3"}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.candydrop.generator"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    async with grpcclient.channel(candydrop_process.address) as channel:
        stub = candydrop_pb2_grpc.CandyDropServiceStub(channel)

        async def counted() -> None:
            campaign = (await stub.GetCampaign(cd.GetCampaignRequest(campaign_id=campaign_id), metadata=GATEWAY)).campaign
            assert campaign.participants == 3
            assert campaign.total_candies > 0
            progress = await stub.GetProgress(cd.GetProgressRequest(campaign_id=campaign_id, user_id="demo-0"), metadata=GATEWAY)
            assert progress.registered

        await eventually(counted, timeout=30)


async def test_unreadable_events_are_parked_and_count_nothing(stack, candydrop_process: ManagedProcess) -> None:  # type: ignore[no-untyped-def]
    """A record that is no ExchangeEvent and one with a bad amount land in
    candydrop.dead_letters (with the rule broken); the consumer goes on."""
    import asyncpg
    from aiokafka import AIOKafkaProducer

    from earn.v1 import exchange_pb2

    bad_amount = exchange_pb2.ExchangeEvent(spot_trade=exchange_pb2.SpotTrade(
        event_id="bad-1", user_id="demo-0", base_asset="BTC", quote_asset="USDT", base_amount="1", quote_amount="1e5",
    ))
    bad_amount.spot_trade.event_time.GetCurrentTime()
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap)
    await producer.start()
    try:
        for value in (b"\xff\xfe not a protobuf", bad_amount.SerializeToString()):
            await producer.send_and_wait(stack.settings.topic_prefix + "exchange.trades", value, key=b"demo-0")
    finally:
        await producer.stop()
    db = await asyncpg.connect(stack.settings.database_url, server_settings={"search_path": "candydrop"})
    try:
        async def parked() -> None:
            errors = [r["error"] for r in await db.fetch("SELECT error FROM dead_letters ORDER BY \"offset\"")]
            assert len(errors) == 2, errors
            assert errors[1].startswith("spot_trade.quote_amount:"), errors

        await eventually(parked, timeout=30)
    finally:
        await db.close()

"""CandyDrop's settlement delay (EARN_SETTLE_SECONDS): a campaign is distributed only
that long after its end, by the first DistributePrizes after it; before, the call pays
nothing and the campaign stays ENDED. A campaign nobody joined distributes nothing
(no wallet call: this CandyDrop has no wallet)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.kernel import grpcclient
import pytest

from earn.v1 import candydrop_pb2 as cd, candydrop_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel.clock import set_time
from tests.conftest import GATEWAY, OPERATOR, SERVICE, unique

pytestmark = pytest.mark.integration

H0 = int(datetime(2032, 3, 3, tzinfo=UTC).timestamp()) // 3600


def at(hours: int, minutes: int = 0) -> datetime:
    return datetime.fromtimestamp(H0 * 3600, UTC) + timedelta(hours=hours, minutes=minutes)


@pytest.fixture(scope="module")
def clock() -> Path:
    path = Path(tempfile.mkdtemp(prefix="clock-")) / "now"
    set_time(path, at(0, 30))
    return path


@pytest.fixture(scope="module")
def candydrop_process(stack, clock: Path) -> Iterator[ManagedProcess]:  # type: ignore[no-untyped-def]
    proc = stack.process("candydrop", EARN_WALLET_ADDRESS="127.0.0.1:1", EARN_SETTLE_SECONDS="600", EARN_CLOCK_FILE=str(clock))
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


async def test_a_campaign_waits_for_its_settlement_delay(candydrop_process: ManagedProcess, clock: Path) -> None:
    campaign_id = unique("cmp")
    request = cd.CreateCampaignRequest(
        idempotency_key=unique(), campaign_id=campaign_id, prize_asset="USDT", prize_pool="100", pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA,
        tasks=[cd.CandyTask(task_id="spot", kind=cd.CANDY_TASK_KIND_SPOT_VOLUME, asset="USDT", threshold="10", candies=1, max_completions=1)],
    )
    request.start_time.FromDatetime(at(1))
    request.end_time.FromDatetime(at(2))
    async with grpcclient.channel(candydrop_process.address) as channel:
        api = candydrop_pb2_grpc.CandyDropServiceStub(channel)
        await api.CreateCampaign(request, metadata=OPERATOR)

        async def status() -> int:
            return (await api.GetCampaign(cd.GetCampaignRequest(campaign_id=campaign_id), metadata=GATEWAY)).campaign.status

        set_time(clock, at(2, 5))  # ended 5 minutes ago: not yet
        reply = await api.DistributePrizes(cd.DistributePrizesRequest(job="candydrop.distribution", period="p1", boundary_hour=H0 + 2), metadata=SERVICE)
        assert list(reply.campaigns) == [] and await status() == cd.CAMPAIGN_STATUS_ENDED
        set_time(clock, at(3, 0))  # the next hourly run
        reply = await api.DistributePrizes(cd.DistributePrizesRequest(job="candydrop.distribution", period="p2", boundary_hour=H0 + 3), metadata=SERVICE)
        assert [c.campaign_id for c in reply.campaigns] == [campaign_id]
        assert reply.campaigns[0].paid == "0" and reply.campaigns[0].winners == 0
        assert await status() == cd.CAMPAIGN_STATUS_DISTRIBUTED
        again = await api.DistributePrizes(cd.DistributePrizesRequest(job="candydrop.distribution", period="p2", boundary_hour=H0 + 3), metadata=SERVICE)
        assert again == reply  # the same (job, period) answers the same

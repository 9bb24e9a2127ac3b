"""CandyDrop end to end, through gRPC and Kafka only: two campaigns (pro rata with a
per-user cap; fixed prize per candy whose demand passes the pool), every task kind,
registrations before and during a campaign, an unregistered user, Simple Earn
subscriptions (counted from Simple Earn's position events), and seeded exchange events
(spot and futures fills, deposits, first deposits) before, inside and after the windows,
published out of order by event time with duplicates (the same event id again). Every
task's progress, every candy count, every prize record and every wallet balance is
checked to the unit against a reference computed here with fractions.

Then the same scenario again with kills: CandyDrop (its consumer) SIGKILLed between and
during the event bursts; during each distribution CandyDrop kills itself right after the
wallet paid a chunk of prizes and before recording it (EARN_CRASH_AFTER_CHUNKS; chunks
of two prizes), and the scheduler's CLI is SIGKILLed at a random moment. The candies,
the prizes and every balance must be the same as in the calm run: nothing lost, nothing
paid twice. EARN_CHAOS_SEED replays a run.

Time is a file clock shared by the services and the scheduler; the test moves it."""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from aiokafka import AIOKafkaProducer

from earn.v1 import accrual_pb2, candydrop_pb2 as cd, candydrop_pb2_grpc, exchange_pb2, simple_earn_pb2 as se, simple_earn_pb2_grpc
from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.kernel.money import format_amount
from tests.conftest import GATEWAY, OPERATOR, eventually, unique
from tests.integration import _world

pytestmark = pytest.mark.integration

H0 = int(datetime(2031, 7, 7, tzinfo=UTC).timestamp()) // 3600
JOB = "candydrop.distribution"
SCALES = {"BTC": 8, "USDT": 6, "ETH": 18}
FUNDING, EXPENSE = wallet_pb2.ACCOUNT_KIND_FUNDING, wallet_pb2.ACCOUNT_KIND_EXPENSE
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hal")
REGISTERED = {  # user -> minutes after H0 (frank never registers)
    "alice": 20, "bob": 20, "carol": 20, "erin": 20, "gina": 20, "hal": 20, "dave": 90,
}


def at(hours: int, minutes: int = 0, seconds: float = 0) -> datetime:
    return datetime.fromtimestamp(H0 * 3600, UTC) + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def ts(moment: datetime):  # type: ignore[no-untyped-def]
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromDatetime(moment)
    return t


# ---- the campaigns and the reference ---------------------------------------------------


@dataclass(frozen=True)
class RefTask:
    task_id: str
    kind: str  # spot, futures, deposit, first, earn
    asset: str  # "" any
    threshold: Fraction | None
    candies: int
    limit: int


@dataclass
class RefCampaign:
    name: str
    prize_asset: str
    pool: Fraction
    fixed: Fraction | None  # prize per candy, or None: pro rata
    cap: Fraction | None
    start: datetime
    end: datetime
    tasks: list[RefTask]

    def progress(self, events: list[dict], registered: dict[str, datetime]) -> dict[str, dict[str, Fraction]]:
        """user -> task -> counted amount, from the events (each id once)."""
        out: dict[str, dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
        seen = set()
        for e in events:
            if e["id"] in seen:
                continue
            seen.add(e["id"])
            user, when = e["user"], e["time"]
            if user not in registered or when < registered[user] or not (self.start <= when < self.end):
                continue
            for t in self.tasks:
                if t.kind == "first":
                    if e["kind"] == "deposit" and e["first"] and (not t.asset or t.asset == e["asset"]) and (t.threshold is None or e["amount"] >= t.threshold):
                        out[user][t.task_id] = Fraction(1)
                elif t.kind == e["kind"] and t.asset == e["asset"]:
                    out[user][t.task_id] += e["amount"]
        return out

    def candies(self, progress: dict[str, dict[str, Fraction]]) -> dict[str, int]:
        out = {}
        for user, tasks in progress.items():
            total = 0
            for t in self.tasks:
                value = tasks.get(t.task_id, Fraction(0))
                done = (1 if value >= 1 else 0) if t.kind == "first" else int(value // t.threshold)  # type: ignore[operator]
                total += min(done, t.limit) * t.candies
            out[user] = total
        return out

    def prizes(self, candies: dict[str, int]) -> dict[str, Decimal]:
        holders = {u: c for u, c in candies.items() if c > 0}
        if self.fixed is not None:
            want = {u: min(self.fixed * c, self.cap) if self.cap is not None else self.fixed * c for u, c in holders.items()}
            total = sum(want.values(), Fraction(0))
            factor = min(Fraction(1), self.pool / total) if total else Fraction(1)
            exact = {u: w * factor for u, w in want.items()}
        else:  # sort by candies; cap the first k; the smallest k that fits
            users = sorted(holders, key=lambda u: -holders[u])
            exact = {}
            for k in range(len(users) + 1):
                rest = users[k:]
                left = self.pool - (self.cap or 0) * k
                weight = sum(holders[u] for u in rest)
                if self.cap is None or not rest or left * holders[rest[0]] / weight <= self.cap:
                    exact = {u: self.cap for u in users[:k]}
                    exact.update({u: left * holders[u] / weight for u in rest})
                    break
        scale = 10 ** SCALES[self.prize_asset]
        return {u: Decimal(v.numerator * scale // v.denominator) / scale for u, v in exact.items()}  # type: ignore[union-attr]


def campaigns() -> dict[str, RefCampaign]:
    return {
        "A": RefCampaign("A", "USDT", Fraction(1000), None, Fraction(400), at(1), at(3), [
            RefTask("spot", "spot", "USDT", Fraction(100), 2, 5),
            RefTask("futures", "futures", "USDT", Fraction(1000), 7, 3),
            RefTask("deposit", "deposit", "BTC", Fraction(1, 10), 1, 10),
            RefTask("first", "first", "", None, 50, 1),
            RefTask("earn", "earn", "BTC", Fraction(1, 2), 3, 2),
        ]),
        "B": RefCampaign("B", "BTC", Fraction(1, 100), Fraction(1, 10000), Fraction(4, 1000), at(1), at(4), [
            RefTask("spot", "spot", "USDT", Fraction(50), 1, 100),
            RefTask("deposit", "deposit", "USDT", Fraction(10), 1, 50),
            RefTask("first", "first", "USDT", Fraction(20), 5, 1),
        ]),
    }


_KIND = {"spot": cd.CANDY_TASK_KIND_SPOT_VOLUME, "futures": cd.CANDY_TASK_KIND_FUTURES_VOLUME, "deposit": cd.CANDY_TASK_KIND_DEPOSIT,
         "first": cd.CANDY_TASK_KIND_FIRST_DEPOSIT, "earn": cd.CANDY_TASK_KIND_SIMPLE_EARN_SUBSCRIPTION}


def _text(value: Fraction) -> str:
    """An exact decimal string (the values here have terminating expansions)."""
    return format_amount(Decimal(value.numerator) / Decimal(value.denominator))


def create_request(c: RefCampaign, campaign_id: str) -> cd.CreateCampaignRequest:
    return cd.CreateCampaignRequest(
        idempotency_key=unique(), campaign_id=campaign_id, prize_asset=c.prize_asset, prize_pool=_text(c.pool),
        pool_kind=cd.PRIZE_POOL_KIND_FIXED_PER_CANDY if c.fixed is not None else cd.PRIZE_POOL_KIND_PRO_RATA,
        prize_per_candy=_text(c.fixed) if c.fixed is not None else "", per_user_cap=_text(c.cap) if c.cap is not None else "",
        start_time=ts(c.start), end_time=ts(c.end),
        tasks=[cd.CandyTask(task_id=t.task_id, kind=_KIND[t.kind], asset=t.asset, threshold=_text(t.threshold) if t.threshold else "",
                            candies=t.candies, max_completions=t.limit) for t in c.tasks],
    )


def exchange_events(seed: int) -> list[dict]:
    """Seeded facts from 00:30 to 04:30: fills and deposits of every user."""
    rng = random.Random(seed)
    out: list[dict] = []
    firsts = set()
    for n in range(160):
        user = rng.choice(USERS)
        when = at(0, 30) + timedelta(seconds=rng.randint(0, 4 * 3600))
        roll = rng.random()
        if roll < 0.45:
            asset = "USDT" if rng.random() < 0.85 else "ETH"
            out.append(dict(id=f"spot-{seed}-{n}", kind="spot", user=user, asset=asset, amount=Fraction(rng.randint(100, 30000), 100), time=when, first=False))
        elif roll < 0.65:
            out.append(dict(id=f"fut-{seed}-{n}", kind="futures", user=user, asset="USDT", amount=Fraction(rng.randint(1000, 300000), 100), time=when, first=False))
        else:
            asset = rng.choice(["BTC", "BTC", "USDT", "USDT", "ETH"])
            amount = Fraction(rng.randint(100, 20_000_000), 10**8) if asset == "BTC" else Fraction(rng.randint(100, 5000), 100) if asset == "USDT" else Fraction(rng.randint(1, 10**6), 10**6)
            first = user not in firsts
            firsts.add(user)
            out.append(dict(id=f"dep-{seed}-{n}", kind="deposit", user=user, asset=asset, amount=amount, time=when, first=first))
    return out


def to_message(e: dict, users: dict[str, str]) -> tuple[str, bytes]:
    m = exchange_pb2.ExchangeEvent()
    amount = _text(e["amount"])
    if e["kind"] == "spot":
        m.spot_trade.CopyFrom(exchange_pb2.SpotTrade(event_id=e["id"], user_id=users[e["user"]], base_asset="BTC", quote_asset=e["asset"],
                                                     base_amount="0.001", quote_amount=amount, event_time=ts(e["time"])))
        return "exchange.trades", m.SerializeToString()
    if e["kind"] == "futures":
        m.futures_trade.CopyFrom(exchange_pb2.FuturesTrade(event_id=e["id"], user_id=users[e["user"]], contract="BTCUSDT-PERP",
                                                           settle_asset=e["asset"], notional=amount, event_time=ts(e["time"])))
        return "exchange.trades", m.SerializeToString()
    m.deposit.CopyFrom(exchange_pb2.ExchangeDeposit(event_id=e["id"], user_id=users[e["user"]], asset=e["asset"], amount=amount,
                                                    first_deposit=e["first"], event_time=ts(e["time"])))
    return "exchange.deposits", m.SerializeToString()


# ---- processes -------------------------------------------------------------------------


@dataclass(kw_only=True)
class World(_world.World):
    candydrop: candydrop_pb2_grpc.CandyDropServiceStub
    earn: simple_earn_pb2_grpc.SimpleEarnServiceStub
    producer: AIOKafkaProducer
    prefix: str

    async def restart_candydrop(self, **env: str) -> None:
        await self.restart("candydrop", **env)

    async def catch_up(self, crash_after_chunks: int = 0) -> None:
        if self.chaos is not None:
            await self.crash_after_paid_chunks("candydrop", crash_after_chunks)
            if self.chaos.random() < 0.7:  # and the CLI killed at a random moment
                await self.kill_cli_at_random(0.3, 2.0)
        await self.caught_up()

    async def publish(self, items: list[tuple[str, bytes, str]]) -> None:
        for topic, value, key in items:
            await self.producer.send_and_wait(self.prefix + topic, value, key=key.encode())


@asynccontextmanager
async def world(stack, name: str, chaos: random.Random | None = None) -> AsyncIterator[World]:  # type: ignore[no-untyped-def]
    async with _world.stage(stack, name, at(0, 10)) as s:
        await s.start("wallet")
        wallet = s.address("wallet")
        await asyncio.gather(s.start("simple_earn", EARN_WALLET_ADDRESS=wallet), s.start("candydrop", EARN_WALLET_ADDRESS=wallet, EARN_CREDIT_CHUNK="2"))
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True, acks="all")
        try:
            await producer.start()
            async with s.channels("candydrop", "simple_earn", "wallet") as (c1, c2, c3):
                yield World(
                    **s.world(JOB, chaos, EARN_CANDYDROP_ADDRESS=s.address("candydrop")), candydrop=candydrop_pb2_grpc.CandyDropServiceStub(c1),
                    earn=simple_earn_pb2_grpc.SimpleEarnServiceStub(c2), wallet=wallet_pb2_grpc.WalletServiceStub(c3), producer=producer,
                    prefix=s.prefix,
                )
        finally:
            await producer.stop()


async def balance(w: World, owner: str, asset: str, kind: int = FUNDING) -> Decimal:
    return await w.balance(owner, asset, kind)


# ---- the scenario ----------------------------------------------------------------------


@dataclass
class Outcome:
    prizes: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (campaign, user) -> amount
    candies: dict[tuple[str, str], int] = field(default_factory=dict)
    kills: int = 0


async def scenario(w: World, seed: int) -> Outcome:
    api = w.candydrop
    users = {n: unique(n) for n in USERS}
    ref = campaigns()
    ids = {k: unique(f"cmp{k}") for k in ref}
    for k, c in ref.items():
        reply = await api.CreateCampaign(create_request(c, ids[k]), metadata=OPERATOR)
        assert reply.campaign.status == cd.CAMPAIGN_STATUS_UPCOMING
    # Simple Earn: a BTC product; every user funded.
    product = unique("btc")
    await w.earn.CreateProduct(se.CreateProductRequest(
        idempotency_key=unique(), product_id=product, asset="BTC", kind=se.PRODUCT_KIND_FLEXIBLE,
        tiers=[accrual_pb2.RateTier(up_to="", apr="0.05")], min_subscription="0.001",
    ), metadata=OPERATOR)
    for user in USERS:
        await w.wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=users[user], asset="BTC", amount="5"), metadata=OPERATOR)

    registered: dict[str, datetime] = {}
    subscriptions: list[dict] = []

    async def subscribe(moment: datetime, user: str, amount: str) -> None:
        w.move(moment)
        await w.earn.Subscribe(se.SubscribeRequest(idempotency_key=unique(), user_id=users[user], product_id=product, amount=amount), metadata=GATEWAY)
        subscriptions.append(dict(id=unique("se"), kind="earn", user=user, asset="BTC", amount=Fraction(amount), time=moment, first=False))

    async def register(moment: datetime, user: str) -> None:
        w.move(moment)
        for k in ref:
            reply = await api.Register(cd.RegisterRequest(idempotency_key=unique(), user_id=users[user], campaign_id=ids[k]), metadata=GATEWAY)
            assert reply.registered_at.ToDatetime(tzinfo=UTC) == moment
        registered[user] = moment

    for user, minutes in sorted(REGISTERED.items(), key=lambda kv: kv[1]):
        if minutes <= 20:
            await register(at(0, minutes), user)
    await subscribe(at(0, 25), "carol", "0.6")  # before the start: not counted
    await subscribe(at(1, 15), "alice", "0.7")
    await subscribe(at(1, 20), "dave", "0.5")  # before dave registers: not counted
    await register(at(1, 30), "dave")
    # Registering again answers the first registration.
    again = await api.Register(cd.RegisterRequest(idempotency_key=unique(), user_id=users["dave"], campaign_id=ids["A"]), metadata=GATEWAY)
    assert again.registered_at.ToDatetime(tzinfo=UTC) == at(1, 30)
    await subscribe(at(1, 40), "bob", "0.3")
    await subscribe(at(2, 0), "alice", "0.4")
    await subscribe(at(2, 10), "dave", "1.2")
    await subscribe(at(3, 30), "erin", "2")  # after A's end

    # Exchange events: out of order by event time, a quarter of them delivered twice.
    events = exchange_events(seed)
    rng = random.Random(seed + 1)
    wire = [(*to_message(e, users), users[e["user"]]) for e in events]
    wire += [rng.choice(wire) for _ in range(len(wire) // 4)]
    rng.shuffle(wire)
    assert sorted(events, key=lambda e: e["time"]) != events  # out of order
    w.move(at(2, 20))
    chunks = [wire[i:i + 40] for i in range(0, len(wire), 40)]
    restarts = 0
    for i, chunk in enumerate(chunks):
        await w.publish(chunk)
        if w.chaos is not None and restarts < 2 and (i == 1 or w.chaos.random() < 0.4):  # once at least
            await asyncio.sleep(w.chaos.uniform(0, 1.0))  # the consumer killed while it counts
            await w.restart_candydrop()
            restarts += 1

    everything = events + subscriptions
    expected_progress = {k: c.progress(everything, registered) for k, c in ref.items()}
    expected_candies = {k: c.candies(expected_progress[k]) for k, c in ref.items()}
    expected_prizes = {k: c.prizes(expected_candies[k]) for k, c in ref.items()}
    assert all(expected_candies[k] for k in ref), expected_candies

    async def counted() -> None:
        for k, c in ref.items():
            for user in USERS:
                reply = await api.GetProgress(cd.GetProgressRequest(campaign_id=ids[k], user_id=users[user]), metadata=GATEWAY)
                assert reply.registered == (user in registered)
                want = expected_progress[k].get(user, {})
                got = {t.task_id: Fraction(Decimal(t.progress)) for t in reply.tasks}
                assert got == {t.task_id: want.get(t.task_id, Fraction(0)) for t in c.tasks}, (k, user, got, dict(want))
                assert reply.candies == expected_candies[k].get(user, 0), (k, user)
                assert Decimal(reply.estimated_prize) == expected_prizes[k].get(user, Decimal(0)), (k, user)

    await eventually(counted, timeout=90)
    campaign_a = (await api.GetCampaign(cd.GetCampaignRequest(campaign_id=ids["A"]), metadata=GATEWAY)).campaign
    assert campaign_a.status == cd.CAMPAIGN_STATUS_ACTIVE and campaign_a.participants == len(REGISTERED)
    assert campaign_a.total_candies == sum(expected_candies["A"].values())
    active = await api.ListCampaigns(cd.ListCampaignsRequest(status=cd.CAMPAIGN_STATUS_ACTIVE, page_size=1), metadata=GATEWAY)
    assert len(active.campaigns) == 1 and active.next_page_token
    active = await api.ListCampaigns(cd.ListCampaignsRequest(status=cd.CAMPAIGN_STATUS_ACTIVE, page_token=active.next_page_token), metadata=GATEWAY)
    assert len(active.campaigns) == 1 and not active.next_page_token
    assert Decimal(campaign_a.estimated_value_per_candy) == (Decimal(1000) / campaign_a.total_candies).quantize(Decimal(10) ** -18, rounding="ROUND_DOWN")

    before = {(u, a): await balance(w, users[u], a) for u in USERS for a in ("USDT", "BTC")}
    # A ends at 03:00: the job's period 02:00-03:00 distributes it; B is still running.
    w.move(at(3, 5))
    await w.catch_up(crash_after_chunks=1)
    # A is distributed, B still runs: a fill of 02:30 arriving now counts for B only (A's
    # progress froze when its prizes were recorded).
    late = dict(id=f"late-{seed}", kind="spot", user="alice", asset="USDT", amount=Fraction(12345, 100), time=at(2, 30), first=False)
    frozen = await api.GetProgress(cd.GetProgressRequest(campaign_id=ids["A"], user_id=users["alice"]), metadata=GATEWAY)
    await w.publish([(*to_message(late, users), users["alice"])])
    expected_progress["B"] = ref["B"].progress(everything + [late], registered)
    expected_candies["B"] = ref["B"].candies(expected_progress["B"])
    expected_prizes["B"] = ref["B"].prizes(expected_candies["B"])

    async def counted_late() -> None:
        reply = await api.GetProgress(cd.GetProgressRequest(campaign_id=ids["B"], user_id=users["alice"]), metadata=GATEWAY)
        assert {t.task_id: Fraction(Decimal(t.progress)) for t in reply.tasks}["spot"] == expected_progress["B"]["alice"]["spot"]

    await eventually(counted_late, timeout=60)
    assert await api.GetProgress(cd.GetProgressRequest(campaign_id=ids["A"], user_id=users["alice"]), metadata=GATEWAY) == frozen
    w.move(at(4, 5))
    await w.catch_up(crash_after_chunks=2)

    outcome = Outcome(kills=w.kills)
    for k, c in ref.items():
        campaign = (await api.GetCampaign(cd.GetCampaignRequest(campaign_id=ids[k]), metadata=GATEWAY)).campaign
        assert campaign.status == cd.CAMPAIGN_STATUS_DISTRIBUTED
        paid = sum(expected_prizes[k].values(), Decimal(0))
        winners = [u for u, v in expected_prizes[k].items() if v > 0]
        assert Decimal(campaign.distributed) == paid and campaign.winners == len(winners)
        pool = Decimal(c.pool.numerator) / c.pool.denominator
        assert paid <= pool
        if not (c.cap is not None and all(Decimal(c.cap.numerator) / c.cap.denominator == v for v in expected_prizes[k].values())):
            assert (pool - paid) * 10 ** SCALES[c.prize_asset] < len(winners)  # only dust is left
        # The campaign's prize account paid exactly the prizes, once.
        assert await balance(w, f"candydrop:{ids[k]}", c.prize_asset, EXPENSE) == -paid
        prizes = await api.ListPrizes(cd.ListPrizesRequest(campaign_id=ids[k], page_size=100), metadata=OPERATOR)
        got = {r.user_id: Decimal(r.amount) for r in prizes.prizes}
        assert got == {users[u]: v for u, v in expected_prizes[k].items()}
        assert all(r.posting_id for r in prizes.prizes if Decimal(r.amount) > 0)
        for r in prizes.prizes:
            user = next(u for u in USERS if users[u] == r.user_id)
            outcome.prizes[(k, user)] = Decimal(r.amount)
            outcome.candies[(k, user)] = r.candies
            assert r.candies == expected_candies[k][user]
    for user in USERS:
        for asset in ("USDT", "BTC"):
            won = sum((outcome.prizes.get((k, user), Decimal(0)) for k, c in ref.items() if c.prize_asset == asset), Decimal(0))
            assert await balance(w, users[user], asset) == before[(user, asset)] + won, (user, asset)
    mine = await api.ListPrizes(cd.ListPrizesRequest(user_id=users["alice"]), metadata=GATEWAY)
    assert {r.user_id for r in mine.prizes} == {users["alice"]}
    return outcome


async def test_candydrop_end_to_end_and_with_kills(stack) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("EARN_CHAOS_SEED") or random.randrange(2**31))
    async with world(stack, "calm") as w:
        calm = await scenario(w, 11)
    async with world(stack, "chaos", random.Random(seed)) as w:
        chaos = await scenario(w, 11)
    print(f"chaos seed {seed}: {chaos.kills} kills")
    assert chaos.prizes == calm.prizes and chaos.candies == calm.candies, f"EARN_CHAOS_SEED={seed}"

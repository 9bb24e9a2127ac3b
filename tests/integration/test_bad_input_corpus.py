"""Issue 8: a corpus of malformed requests for every RPC of WalletService,
SimpleEarnService, LaunchpoolService, MarketService, DualService, CandyDropService and
LeverageService, against one live wallet, simple_earn, launchpool, market, dual, candydrop
and leverage, and the role table of the seven services tested method by method.

Each corpus row is (service, method, request builder, token, expected status, fragment
of the message). The request builder gets the ids made by the setup (a funded user, a
hold, products, positions, used idempotency keys). Every row must leave every table of
the services' schemas exactly as it was (row counts and an md5 of
each table's ordered content), and a test after the rows compares the whole run too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from services.kernel import grpcclient
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from earn.v1 import candydrop_pb2 as cd, candydrop_pb2_grpc
from earn.v1 import hodler_pb2 as hd, hodler_pb2_grpc
from earn.v1 import dual_pb2 as du, dual_pb2_grpc, market_pb2 as mk, market_pb2_grpc
from earn.v1 import leverage_pb2 as lv, leverage_pb2_grpc
from earn.v1 import loan_pb2 as lnp, loan_pb2_grpc
from earn.v1 import accrual_pb2, launchpool_pb2 as lp, launchpool_pb2_grpc, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2 as wp, wallet_pb2_grpc
from services.candydrop.api import ROLES as CANDYDROP_ROLES
from services.devstack.processes import ManagedProcess
from services.dual.api import ROLES as DUAL_ROLES
from services.hodler.api import ROLES as HODLER_ROLES
from services.launchpool.api import ROLES as LAUNCHPOOL_ROLES
from services.leverage.api import ROLES as LEVERAGE_ROLES
from services.loan.api import ROLES as LOAN_ROLES
from services.market.api import ROLES as MARKET_ROLES
from services.simple_earn.api import ROLES as EARN_ROLES
from services.wallet.api import ROLES as WALLET_ROLES
from tests.conftest import GATEWAY, OPERATOR, SERVICE, unique

FUNDING, HOLD, EXPENSE, TREASURY = (
    wp.ACCOUNT_KIND_FUNDING, wp.ACCOUNT_KIND_HOLD, wp.ACCOUNT_KIND_EXPENSE, wp.ACCOUNT_KIND_TREASURY,
)
FLEX, FIXED = se.PRODUCT_KIND_FLEXIBLE, se.PRODUCT_KIND_FIXED
NO_TOKEN: tuple = ()
BAD_TOKEN = (("authorization", "Bearer not-a-token"),)
NOT_BEARER = (("authorization", "dev-operator"),)
TOKENS = {"gateway": GATEWAY, "operator": OPERATOR, "service": SERVICE}

BIG = "a" * 10_240  # a 10 KB id, key, name or amount
BIG_DIGITS = "1" * 10_240
INVALID, NOT_FOUND, PRECONDITION, EXISTS = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
)
DENIED, UNAUTHENTICATED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


# ---- processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def earn_channel(earn_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(earn_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def launchpool_process(stack, wallet_process: ManagedProcess):  # type: ignore[no-untyped-def]
    proc = stack.process("launchpool", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_RELEASE_SWEEP_SECONDS="1")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def launchpool_channel(launchpool_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(launchpool_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def market_process(stack):  # type: ignore[no-untyped-def]
    proc = stack.process("market")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dual_process(stack, wallet_process: ManagedProcess, market_process: ManagedProcess):  # type: ignore[no-untyped-def]
    proc = stack.process("dual", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_MARKET_ADDRESS=market_process.address or "")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def market_channel(market_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(market_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
async def dual_channel(dual_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(dual_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def candydrop_process(stack, wallet_process: ManagedProcess):  # type: ignore[no-untyped-def]
    proc = stack.process("candydrop", EARN_WALLET_ADDRESS=wallet_process.address or "")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def candydrop_channel(candydrop_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(candydrop_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def hodler_process(stack, wallet_process: ManagedProcess):  # type: ignore[no-untyped-def]
    proc = stack.process("hodler", EARN_WALLET_ADDRESS=wallet_process.address or "")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def hodler_channel(hodler_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(hodler_process.address) as channel:
        yield channel


# Smart Leverage on a file clock held still: quotes made "earlier" in the setup are expired
# when the rows run, quotes made "now" are valid for 10 minutes.
LEVERAGE_QUOTE_VALIDITY = 600


@pytest.fixture(scope="module")
def leverage_clock(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services.kernel.clock import set_time

    path = tmp_path_factory.mktemp("leverage-clock") / "now"
    set_time(path, datetime.now(UTC).replace(microsecond=0))
    return path


@pytest.fixture(scope="module")
def leverage_process(stack, wallet_process: ManagedProcess, market_process: ManagedProcess, leverage_clock: Any):  # type: ignore[no-untyped-def]
    proc = stack.process(
        "leverage", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_MARKET_ADDRESS=market_process.address or "",
        EARN_CLOCK_FILE=str(leverage_clock), EARN_QUOTE_VALIDITY_SECONDS=str(LEVERAGE_QUOTE_VALIDITY), EARN_MAX_INDEX_AGE_SECONDS="86400",
    )
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def leverage_channel(leverage_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(leverage_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def loan_process(stack, wallet_process: ManagedProcess, market_process: ManagedProcess):  # type: ignore[no-untyped-def]
    proc = stack.process("loan", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_MARKET_ADDRESS=market_process.address or "",
                         EARN_MAX_INDEX_AGE_SECONDS="86400")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def loan_channel(loan_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpcclient.channel(loan_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
async def db(stack, wallet_process: ManagedProcess, earn_process: ManagedProcess, launchpool_process: ManagedProcess,
             market_process: ManagedProcess, dual_process: ManagedProcess, candydrop_process: ManagedProcess,
             leverage_process: ManagedProcess, loan_process: ManagedProcess, hodler_process: ManagedProcess) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def stubs(wallet_channel: grpc.aio.Channel, earn_channel: grpc.aio.Channel, launchpool_channel: grpc.aio.Channel,
          market_channel: grpc.aio.Channel, dual_channel: grpc.aio.Channel, candydrop_channel: grpc.aio.Channel,
          leverage_channel: grpc.aio.Channel, loan_channel: grpc.aio.Channel, hodler_channel: grpc.aio.Channel) -> dict[str, Any]:
    return {
        "wallet": wallet_pb2_grpc.WalletServiceStub(wallet_channel), "earn": simple_earn_pb2_grpc.SimpleEarnServiceStub(earn_channel),
        "lp": launchpool_pb2_grpc.LaunchpoolServiceStub(launchpool_channel),
        "mk": market_pb2_grpc.MarketServiceStub(market_channel), "dual": dual_pb2_grpc.DualServiceStub(dual_channel),
        "cd": candydrop_pb2_grpc.CandyDropServiceStub(candydrop_channel),
        "lev": leverage_pb2_grpc.LeverageServiceStub(leverage_channel),
        "loan": loan_pb2_grpc.LoanServiceStub(loan_channel),
        "hd": hodler_pb2_grpc.HodlerServiceStub(hodler_channel),
    }


# ---- snapshots ----------------------------------------------------------------------

SCHEMAS = ("wallet", "simple_earn", "launchpool", "market", "dual", "candydrop", "leverage", "loan", "hodler")
# No table is excluded: no RPC of the corpus may write anything, not even audit-like rows.
# The only tables written without an RPC are the outboxes (emptied by the relays), the
# inbox (the payout consumer) and bulk_credit_parts/transfers (the wallet's folder);
# `settled` waits until they are quiet before the first snapshot, and the setup makes no
# bulk credit and publishes no payout, so nothing moves them during the corpus. Reads
# that may write (ListTransfers folds an owner's unfolded bulk credits) find nothing to
# fold for the same reason.


async def snapshot(db: asyncpg.Pool) -> dict[str, tuple[int, str]]:
    """Per table of both schemas: (row count, md5 of its rows in text order)."""
    out: dict[str, tuple[int, str]] = {}
    tables = await db.fetch(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1::text[]) ORDER BY 1, 2", list(SCHEMAS)
    )
    assert len(tables) > 20, tables
    for t in tables:
        name = f'"{t["schemaname"]}"."{t["tablename"]}"'
        row = await db.fetchrow(f"SELECT count(*) AS n, md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) AS h FROM {name} x")
        out[name] = (row["n"], row["h"])
    return out


def changed(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]) -> dict[str, tuple[Any, Any]]:
    return {t: (before.get(t), after.get(t)) for t in sorted(set(before) | set(after)) if before.get(t) != after.get(t)}


async def settled(db: asyncpg.Pool, timeout: float = 30) -> dict[str, tuple[int, str]]:
    """A snapshot once the relays emptied the outboxes and nothing moved for 1.5 s."""
    deadline = time.monotonic() + timeout
    last = await snapshot(db)
    quiet_since = time.monotonic()
    while True:
        await asyncio.sleep(0.3)
        now = await snapshot(db)
        outboxes_empty = all(n == 0 for t, (n, _) in now.items() if t.endswith('"outbox"'))
        if now != last or not outboxes_empty:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 1.5:
            return now
        assert time.monotonic() < deadline, f"the databases do not settle: {changed(last, now)}"


# ---- setup --------------------------------------------------------------------------


@dataclass
class Ctx:
    """What the corpus rows refer to."""

    alice: str = ""  # funded: 10 BTC, 100 USDT; a hold, flexible and fixed positions
    bob: str = ""  # funded: 10 BTC; a flexible position
    poor: str = ""  # no funds at all
    hold_id: str = ""
    flex: str = ""  # BTC, min 0.001, max_per_user 5, quota 6 (1.9 subscribed)
    usdt: str = ""  # USDT flexible
    paused: str = ""
    fixed: str = ""  # BTC, 7 days, no early redemption
    alice_flex: str = ""
    alice_fixed: str = ""
    bob_flex: str = ""
    project: str = ""  # Launchpool: started this hour, 24 hours; pools below
    pool: str = ""  # USDT stake, min 10, max 100 (tier: volume >= 1000 -> 200), pool cap 100; alice staked 50
    newcomers: str = ""  # BTC stake, newcomers only (alice staked in another project)
    other_project: str = ""
    other_pool: str = ""  # alice staked 20 USDT here
    dual_plan: str = ""  # sell-high BTC/USDT, min 0.01, max 1 per user, quota 1.2; alice subscribed 0.5
    dual_sub: str = ""  # alice's subscription
    campaign: str = ""  # CandyDrop: started this hour, 24 hours, a spot task; alice registered
    lev_user: str = ""  # 100 USDT, then two positions of 20 (one redeemed early)
    lev_product: str = ""  # Smart Leverage on BTC/USDT: max leverage 20, principal 10 to 50 USDT
    lev_maturity: int = 0  # a valid maturity (unix seconds)
    lev_expired: str = ""  # alice's quote made before its validity ended
    lev_quote: str = ""  # alice's valid quote, subscribed: lev_position
    lev_poor_quote: str = ""  # poor's valid quote (no funds)
    lev_position: str = ""  # alice's open position
    lev_redeemed: str = ""  # alice's position redeemed early (keys["RedeemLeverageEarly"])
    loan_user: str = ""  # Crypto Loan: 1 BTC deposited; a USDT loan of 1,000 against 0.1 BTC (then 0.12, then 0.11; 100 repaid)
    loan_id: str = ""
    airdrop: str = ""  # HODLer: GT held, USDT reward, starts in two hours
    keys: dict[str, str] = field(default_factory=dict)  # method -> a key used once, successfully
    baseline: dict[str, tuple[int, str]] = field(default_factory=dict)
    requests: dict[str, Any] = field(default_factory=dict)  # method -> the request sent with keys[method]


def tiers(*pairs: tuple[str, str]) -> list[accrual_pb2.RateTier]:
    return [accrual_pb2.RateTier(up_to=u, apr=a) for u, a in pairs]


TIERS = tiers(("5", "0.08"), ("", "0.03"))


def spec(src: str, dst: str, amount: str, asset: str = "BTC", src_kind: int = FUNDING, dst_kind: int = FUNDING, reference: str = "") -> wp.TransferSpec:
    return wp.TransferSpec(
        asset=asset, source=wp.AccountRef(owner=src, kind=src_kind), destination=wp.AccountRef(owner=dst, kind=dst_kind),
        amount=amount, reference=reference,
    )


@pytest.fixture(scope="module")
async def ctx(stubs, db, leverage_clock) -> Ctx:
    wallet, earn = stubs["wallet"], stubs["earn"]
    c = Ctx(alice=unique("alice"), bob=unique("bob"), poor=unique("poor"))

    async def once(method: str, stub: Any, request: Any, metadata: tuple) -> Any:
        c.keys[method] = request.idempotency_key
        c.requests[method] = request
        return await getattr(stub, method)(request, metadata=metadata)

    await once("Deposit", wallet, wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="10"), OPERATOR)
    await wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount="100"), metadata=OPERATOR)
    await wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=c.bob, asset="BTC", amount="10"), metadata=OPERATOR)
    await once("Withdraw", wallet, wp.WithdrawRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount="1"), OPERATOR)
    await once("Transfer", wallet, wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "0.1")), SERVICE)
    await once("TransferBatch", wallet, wp.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(c.bob, c.alice, "0.1")]), SERVICE)
    placed = await once(
        "PlaceHold", wallet, wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="2", holder="corpus"), SERVICE
    )
    c.hold_id = placed.hold.hold_id
    await once("ReleaseHold", wallet, wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="0.1"), SERVICE)
    await once(
        "CaptureHold", wallet,
        wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="0.1", destination=wp.AccountRef(owner="corpus", kind=TREASURY)),
        SERVICE,
    )

    async def product(method: str | None = None, **fields: Any) -> str:
        request = se.CreateProductRequest(
            idempotency_key=unique(), product_id=unique("p"), asset=fields.pop("asset", "BTC"), kind=fields.pop("kind", FLEX),
            tiers=fields.pop("tiers", TIERS), min_subscription=fields.pop("min_subscription", "0.001"), **fields,
        )
        if method:
            await once(method, earn, request, OPERATOR)
        else:
            await earn.CreateProduct(request, metadata=OPERATOR)
        return request.product_id

    c.flex = await product("CreateProduct", max_per_user="5", quota="6")
    c.usdt = await product(asset="USDT")
    c.paused = await product()
    c.fixed = await product(kind=FIXED, term_days=7)
    await once("UpdateProduct", earn, se.UpdateProductRequest(idempotency_key=unique(), product_id=c.paused, status=se.PRODUCT_STATUS_PAUSED), OPERATOR)
    await once("SetProductRates", earn, se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.usdt, tiers=tiers(("", "0.05"))), OPERATOR)

    async def subscribe(user: str, product_id: str, amount: str, method: str | None = None) -> str:
        request = se.SubscribeRequest(idempotency_key=unique(), user_id=user, product_id=product_id, amount=amount)
        reply = await (once(method, earn, request, GATEWAY) if method else earn.Subscribe(request, metadata=GATEWAY))
        return reply.position.position_id

    c.alice_flex = await subscribe(c.alice, c.flex, "1", "Subscribe")
    c.alice_fixed = await subscribe(c.alice, c.fixed, "1")
    c.bob_flex = await subscribe(c.bob, c.flex, "1")
    await once("Redeem", earn, se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_flex, amount="0.1"), GATEWAY)
    await once(
        "SetAutoSubscribe", earn, se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_flex, enabled=True), GATEWAY
    )
    launch = stubs["lp"]
    hour = int(time.time()) // 3600

    async def project(method: str | None, pools: list[lp.RewardPoolSpec]) -> str:
        start = int(time.time()) // 3600  # live now, so it takes stakes; read right before the call, not at the top of the set-up
        request = lp.CreateProjectRequest(
            idempotency_key=unique(), project_id=unique("prj"), reward_asset="BTC", start_time=ts(start * 3600), end_time=ts((start + 24) * 3600),
            pools=pools,
        )
        await (once(method, launch, request, OPERATOR) if method else launch.CreateProject(request, metadata=OPERATOR))
        return request.project_id

    c.pool, c.newcomers, c.other_pool = unique("pool"), unique("pool"), unique("pool")
    c.project = await project("CreateProject", [
        lp.RewardPoolSpec(pool_id=c.pool, stake_asset="USDT", total_reward="1", min_stake="10", max_stake="100", pool_cap="100",
                          cap_tiers=[lp.CapTier(min_volume="1000", max_stake="200")]),
        lp.RewardPoolSpec(pool_id=c.newcomers, stake_asset="BTC", total_reward="1", min_stake="0.1", max_stake="1", newcomer_only=True),
    ])
    c.other_project = await project(None, [lp.RewardPoolSpec(pool_id=c.other_pool, stake_asset="USDT", total_reward="1", min_stake="1", max_stake="100")])
    await once("SetTradingVolume", launch, lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.bob, volume="5"), OPERATOR)
    await once("Stake", launch, lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="60"), GATEWAY)
    await launch.Stake(lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.other_pool, amount="20"), metadata=GATEWAY)
    await once("Unstake", launch, lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="10"), GATEWAY)
    market, dual = stubs["mk"], stubs["dual"]
    price_at = (hour - 2) * 3600
    await once("BackfillPrices", market, mk.BackfillPricesRequest(
        idempotency_key=unique(), pair="BTC/USDT", ticks=[mk.BackfillTick(price=f"6000{i}.5", event_time=ts(price_at + 60 * i)) for i in range(5)],
    ), OPERATOR)
    c.dual_plan = unique("dual")
    await once("CreateDualPlan", dual, du.CreateDualPlanRequest(
        idempotency_key=unique(), plan_id=c.dual_plan, base_asset="BTC", quote_asset="USDT", direction=du.DUAL_DIRECTION_SELL_HIGH, strike="60000",
        apr="0.1", settlement_time=ts((hour + 48) * 3600), min_amount="0.01", max_per_user="1", quota="1.2",
    ), OPERATOR)
    order = du.SubscribeDualRequest(client_order_id=unique("order"), user_id=c.alice, plan_id=c.dual_plan, amount="0.5")
    c.keys["SubscribeDual"], c.requests["SubscribeDual"] = order.client_order_id, order
    c.dual_sub = (await dual.SubscribeDual(order, metadata=GATEWAY)).subscription.subscription_id
    c.campaign = unique("cmp")
    await once("CreateCampaign", stubs["cd"], campaign_request(c.campaign), OPERATOR)
    await once("Register", stubs["cd"], cd.RegisterRequest(idempotency_key=unique(), user_id=c.alice, campaign_id=c.campaign), GATEWAY)
    await leverage_setup(c, stubs["lev"], wallet, once, leverage_clock)
    await loan_setup(c, stubs["loan"], wallet, once)
    c.airdrop = unique("air")
    await once("CreateAirdrop", stubs["hd"], airdrop_request(c.airdrop), OPERATOR)
    c.baseline = await settled(db)
    return c


async def leverage_setup(c: Ctx, lev: Any, wallet: Any, once: Any, clock: Any) -> None:
    from services.kernel.clock import set_time

    now = datetime.fromisoformat(clock.read_text().strip())
    c.lev_user = unique("levu")
    c.lev_product = unique("lev")
    await wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=c.lev_user, asset="USDT", amount="100"), metadata=OPERATOR)
    await once("CreateLeverageProduct", lev, lv.CreateLeverageProductRequest(
        idempotency_key=unique(), product_id=c.lev_product, pair="BTC/USDT", max_leverage="20", fee_rate="0.005", min_principal="10",
        max_principal="50",
    ), OPERATOR)
    c.lev_maturity = (int(now.timestamp()) // 3600 + 48) * 3600

    async def quote(user: str, method: str | None = None) -> str:
        request = lv.RequestLeverageQuoteRequest(
            idempotency_key=unique(), user_id=user, product_id=c.lev_product, direction=lv.LEVERAGE_DIRECTION_LONG, leverage="5", principal="20",
            maturity=ts(c.lev_maturity),
        )
        reply = await (once(method, lev, request, GATEWAY) if method else lev.RequestLeverageQuote(request, metadata=GATEWAY))
        return reply.quote.quote_id

    set_time(clock, now - timedelta(seconds=LEVERAGE_QUOTE_VALIDITY + 60))
    c.lev_expired = await quote(c.lev_user)
    set_time(clock, now)
    c.lev_quote = await quote(c.lev_user, "RequestLeverageQuote")
    c.lev_poor_quote = await quote(c.poor)
    redeemed_quote = await quote(c.lev_user)
    c.lev_position = (await lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id=c.lev_quote), metadata=GATEWAY)).position.position_id
    c.lev_redeemed = (await lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id=redeemed_quote), metadata=GATEWAY)).position.position_id
    redeemed = await once("RedeemLeverageEarly", lev, lv.RedeemLeverageEarlyRequest(
        idempotency_key=unique(), user_id=c.lev_user, position_id=c.lev_redeemed), GATEWAY)
    assert redeemed.position.status == lv.LEVERAGE_POSITION_STATUS_SETTLED, redeemed


async def loan_setup(c: Ctx, loan: Any, wallet: Any, once: Any) -> None:
    """Crypto Loan: USDT lent against BTC (counted 95%) at the BTC/USDT index backfilled above."""
    c.loan_user = unique("loanu")
    await once("SetLoanAsset", loan, lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(
        asset="USDT", hourly_rate="0.000005", min_borrow="10", max_borrow="100000")), OPERATOR)
    await once("SetLoanCollateralAsset", loan, lnp.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=lnp.LoanCollateralAsset(
        asset="BTC", discount="0.95")), OPERATOR)
    await wallet.Transfer(wp.TransferRequest(idempotency_key=unique(), transfer=spec("loan", "loan", "100000", "USDT", wp.ACCOUNT_KIND_EXTERNAL,
                                                                                      TREASURY)), metadata=OPERATOR)
    await wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner=c.loan_user, asset="BTC", amount="1"), metadata=OPERATOR)
    borrowed = await once("Borrow", loan, lnp.BorrowRequest(
        idempotency_key=unique(), user_id=c.loan_user, loan_asset="USDT", amount="1000",
        collateral=[lnp.LoanCollateralAmount(asset="BTC", amount="0.1")], term=lnp.LOAN_TERM_FLEXIBLE), GATEWAY)
    c.loan_id = borrowed.loan.loan_id
    await once("AddLoanCollateral", loan, lnp.AddLoanCollateralRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id,
                                                                       collateral=lnp.LoanCollateralAmount(asset="BTC", amount="0.02")), GATEWAY)
    await once("RemoveLoanCollateral", loan, lnp.RemoveLoanCollateralRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id,
                                                                             collateral=lnp.LoanCollateralAmount(asset="BTC", amount="0.01")), GATEWAY)
    await once("RepayLoan", loan, lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id, amount="100"), GATEWAY)


# ---- the corpus ---------------------------------------------------------------------

Build = Callable[[Ctx], Any]


@dataclass(frozen=True)
class Row:
    service: str  # "wallet" or "earn"
    method: str
    build: Build
    code: grpc.StatusCode
    fragment: str  # in the message: for INVALID_ARGUMENT, the field it names ("amount:")
    token: tuple = OPERATOR
    xfail: str = ""


ROWS: list[tuple[str, Row]] = []


def row(name: str, service: str, method: str, build: Build, code: grpc.StatusCode, fragment: str, token: tuple = OPERATOR, xfail: str = "") -> None:
    ROWS.append((f"{service}.{method}:{name}", Row(service, method, build, code, fragment, token, xfail)))


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def past(hours: int = 0) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(datetime.now(UTC) - timedelta(hours=hours))
    return t


# Bad decimal strings, each with the rule the parser names; every amount field gets them.
BAD_AMOUNTS = [
    ("negative", "-1"), ("zero", "0"), ("zero-fraction", "0.000"), ("exponent", "1e5"), ("exponent-upper", "1E-3"), ("nan", "NaN"),
    ("infinity", "Infinity"), ("inf", "inf"), ("empty", ""), ("space", " "), ("leading-space", " 1"), ("trailing-newline", "1\n"),
    ("plus", "+1"), ("comma", "1,5"), ("two-points", "1.0.0"), ("leading-zero", "01"), ("bare-point", ".5"), ("too-large", "1" * 21),
    ("10KB", BIG_DIGITS), ("arabic-digits", "١٢"), ("fullwidth", "１"),
]
# Too precise for the asset (BTC has 8 fraction digits, USDT 6).
TOO_PRECISE_BTC = "0.000000001"
TOO_PRECISE_USDT = "0.0000001"
# Idempotency keys that break the rule (1-128 printable ASCII, no spaces).
BAD_KEYS = [("empty", ""), ("space", " "), ("inner-space", "a b"), ("10KB", "k" * 10_240), ("129", "k" * 129), ("non-ascii", "clé"), ("newline", "k\n")]
# Ids that are not decimal ids; "²" is a digit to str.isdigit() but not to int().
BAD_IDS = [("empty", ""), ("letters", "abc"), ("negative", "-1"), ("exponent", "1e3"), ("spaces", " 1"), ("10KB", BIG_DIGITS),
           ("superscript", "²"), ("arabic-digit", "١"), ("too-long", "1" * 19)]
BAD_NAMES = [("empty", ""), ("10KB", BIG), ("space", "a b"), ("slash", "a/b"), ("leading-dash", "-a"), ("non-ascii", "é"), ("65", "a" * 65)]

# ---- wallet ----

for _n, _v in BAD_AMOUNTS:
    row(_n, "wallet", "Transfer", lambda c, v=_v: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, v)), INVALID, "transfer.amount:")
    row(_n, "wallet", "Deposit", lambda c, v=_v: wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount=v), INVALID, "amount:")
for _n, _v in BAD_KEYS:
    row(f"key-{_n}", "wallet", "Transfer", lambda c, v=_v: wp.TransferRequest(idempotency_key=v, transfer=spec(c.alice, c.bob, "1")), INVALID, "idempotency_key:")
    row(f"key-{_n}", "wallet", "PlaceHold", lambda c, v=_v: wp.PlaceHoldRequest(idempotency_key=v, owner=c.alice, asset="BTC", amount="1", holder="x"), INVALID, "idempotency_key:")
    row(f"key-{_n}", "wallet", "ReleaseHold", lambda c, v=_v: wp.ReleaseHoldRequest(idempotency_key=v, hold_id=c.hold_id), INVALID, "idempotency_key:")
    row(f"key-{_n}", "wallet", "CaptureHold", lambda c, v=_v: wp.CaptureHoldRequest(idempotency_key=v, hold_id=c.hold_id, destination=wp.AccountRef(owner="x", kind=TREASURY)), INVALID, "idempotency_key:")
for _n, _v in BAD_NAMES:
    row(f"owner-{_n}", "wallet", "Transfer", lambda c, v=_v: wp.TransferRequest(idempotency_key=unique(), transfer=spec(v, c.bob, "1")), INVALID, "transfer.source.owner:")
    row(f"owner-{_n}", "wallet", "Deposit", lambda c, v=_v: wp.DepositRequest(idempotency_key=unique(), owner=v, asset="BTC", amount="1"), INVALID, "owner:")
    row(f"owner-{_n}", "wallet", "GetBalances", lambda c, v=_v: wp.GetBalancesRequest(owner=v), INVALID, "owner:", GATEWAY)
    row(f"holder-{_n}", "wallet", "PlaceHold", lambda c, v=_v: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="1", holder=v), INVALID, "holder:")
for _n, _v in BAD_IDS:
    row(f"hold_id-{_n}", "wallet", "GetHold", lambda c, v=_v: wp.GetHoldRequest(hold_id=v), INVALID, "hold_id:", GATEWAY)
    row(f"hold_id-{_n}", "wallet", "ReleaseHold", lambda c, v=_v: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=v), INVALID, "hold_id:", SERVICE)
    row(f"hold_id-{_n}", "wallet", "CaptureHold", lambda c, v=_v: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=v, destination=wp.AccountRef(owner="x", kind=TREASURY)), INVALID, "hold_id:", SERVICE)
    if _v:
        row(f"posting_id-{_n}", "wallet", "ListTransfers", lambda c, v=_v: wp.ListTransfersRequest(posting_id=v), INVALID, "posting_id:", GATEWAY)

_W = [
    # Transfer
    ("too-precise", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, TOO_PRECISE_BTC)), INVALID, "transfer.amount:"),
    ("too-precise-usdt", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, TOO_PRECISE_USDT, "USDT")), INVALID, "transfer.amount:"),
    ("unknown-asset", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", "NOPE")), INVALID, "transfer.asset:"),
    ("lowercase-asset", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", "btc")), INVALID, "transfer.asset:"),
    ("10KB-asset", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", BIG)), INVALID, "transfer.asset:"),
    ("empty-asset", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", "")), INVALID, "transfer.asset:"),
    ("no-transfer", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique()), INVALID, "transfer:"),
    ("kind-unspecified", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", src_kind=0)), INVALID, "transfer.source.kind:"),
    ("kind-unknown", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", dst_kind=99)), INVALID, "transfer.destination.kind:"),
    ("to-hold", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.alice, "1", dst_kind=HOLD)), INVALID, "transfer.destination.kind:"),
    ("from-hold", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", src_kind=HOLD)), INVALID, "transfer.source.kind:"),
    ("same-account", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.alice, "1")), INVALID, "transfer.destination:"),
    ("10KB-reference", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", reference=BIG)), INVALID, "transfer.reference:"),
    ("non-ascii-reference", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1", reference="café")), INVALID, "transfer.reference:"),
    ("insufficient", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.alice, c.bob, "1000")), PRECONDITION, "insufficient funds"),
    ("poor-user", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(c.poor, c.bob, "0.00000001")), PRECONDITION, "insufficient funds"),
    ("treasury-overdraw", "Transfer", lambda c: wp.TransferRequest(idempotency_key=unique(), transfer=spec(unique("t"), c.bob, "1", src_kind=TREASURY)), PRECONDITION, "insufficient funds"),
    ("key-reused", "Transfer", lambda c: wp.TransferRequest(idempotency_key=c.keys["Transfer"], transfer=spec(c.alice, c.bob, "0.2")), EXISTS, "idempotency_key:"),
    ("key-of-deposit", "Transfer", lambda c: wp.TransferRequest(idempotency_key=c.keys["Deposit"], transfer=spec(c.alice, c.bob, "0.1")), EXISTS, "idempotency_key:"),
    # TransferBatch
    ("empty", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=unique()), INVALID, "transfers:"),
    ("too-many", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(c.alice, c.bob, "0.00000001")] * 10_001), INVALID, "transfers:"),
    ("second-bad", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(c.alice, c.bob, "1"), spec(c.alice, c.bob, "NaN")]), INVALID, "transfers[1].amount:"),
    ("second-asset", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(c.alice, c.bob, "1"), spec(c.alice, c.bob, "1", "DOGE2")]), INVALID, "transfers[1].asset:"),
    ("key-empty", "TransferBatch", lambda c: wp.TransferBatchRequest(transfers=[spec(c.alice, c.bob, "1")]), INVALID, "idempotency_key:"),
    ("last-overdraws", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=unique(), transfers=[spec(c.alice, c.bob, "1"), spec(c.alice, c.bob, "100")]), PRECONDITION, "insufficient funds"),
    ("key-reused", "TransferBatch", lambda c: wp.TransferBatchRequest(idempotency_key=c.keys["TransferBatch"], transfers=[spec(c.bob, c.alice, "0.2")]), EXISTS, "idempotency_key:"),
    # PlaceHold
    ("owner-empty", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), asset="BTC", amount="1", holder="x"), INVALID, "owner:"),
    ("asset-unknown", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="NOPE", amount="1", holder="x"), INVALID, "asset:"),
    ("asset-10KB", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset=BIG, amount="1", holder="x"), INVALID, "asset:"),
    ("amount-negative", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="-1", holder="x"), INVALID, "amount:"),
    ("amount-zero", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="0", holder="x"), INVALID, "amount:"),
    ("amount-nan", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="NaN", holder="x"), INVALID, "amount:"),
    ("amount-too-precise", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount=TOO_PRECISE_USDT, holder="x"), INVALID, "amount:"),
    ("reference-10KB", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="1", holder="x", reference=BIG), INVALID, "reference:"),
    ("insufficient", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="1000", holder="x"), PRECONDITION, "insufficient funds"),
    ("wrong-asset-funds", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=unique(), owner=c.bob, asset="USDT", amount="1", holder="x"), PRECONDITION, "insufficient funds"),
    ("key-reused", "PlaceHold", lambda c: wp.PlaceHoldRequest(idempotency_key=c.keys["PlaceHold"], owner=c.alice, asset="BTC", amount="3", holder="corpus"), EXISTS, "idempotency_key:"),
    # ReleaseHold
    ("unknown", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id="999999999"), NOT_FOUND, "hold_id:"),
    ("zero-id", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id="0"), NOT_FOUND, "hold_id:"),
    ("amount-too-precise", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount=TOO_PRECISE_BTC), INVALID, "amount:"),
    ("amount-zero", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="0"), INVALID, "amount:"),
    ("amount-nan", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="NaN"), INVALID, "amount:"),
    ("amount-exponent", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="1e-1"), INVALID, "amount:"),
    ("amount-space", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount=" "), INVALID, "amount:"),
    ("amount-exceeds", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="5"), PRECONDITION, "amount:"),
    ("key-reused", "ReleaseHold", lambda c: wp.ReleaseHoldRequest(idempotency_key=c.keys["ReleaseHold"], hold_id=c.hold_id, amount="0.2"), EXISTS, "idempotency_key:"),
    # CaptureHold
    ("unknown", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id="999999999", destination=wp.AccountRef(owner="x", kind=TREASURY)), NOT_FOUND, "hold_id:"),
    ("dest-owner-empty", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, destination=wp.AccountRef(kind=TREASURY)), INVALID, "destination.owner:"),
    ("dest-owner-10KB", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, destination=wp.AccountRef(owner=BIG, kind=TREASURY)), INVALID, "destination.owner:"),
    ("dest-kind-missing", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, destination=wp.AccountRef(owner="x")), INVALID, "destination.kind:"),
    ("dest-kind-hold", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, destination=wp.AccountRef(owner="x", kind=HOLD)), INVALID, "destination.kind:"),
    ("dest-kind-unknown", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, destination=wp.AccountRef(owner="x", kind=42)), INVALID, "destination.kind:"),
    ("amount-negative", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="-0.1", destination=wp.AccountRef(owner="x", kind=TREASURY)), INVALID, "amount:"),
    ("amount-infinity", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="Infinity", destination=wp.AccountRef(owner="x", kind=TREASURY)), INVALID, "amount:"),
    ("amount-exceeds", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=unique(), hold_id=c.hold_id, amount="1000", destination=wp.AccountRef(owner="x", kind=TREASURY)), PRECONDITION, "amount:"),
    ("key-reused", "CaptureHold", lambda c: wp.CaptureHoldRequest(idempotency_key=c.keys["CaptureHold"], hold_id=c.hold_id, amount="0.2", destination=wp.AccountRef(owner="corpus", kind=TREASURY)), EXISTS, "idempotency_key:"),
    # GetHold
    ("unknown", "GetHold", lambda c: wp.GetHoldRequest(hold_id="999999999"), NOT_FOUND, "hold_id:"),
    # Deposit
    ("too-precise", "Deposit", lambda c: wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount=TOO_PRECISE_BTC), INVALID, "amount:"),
    ("asset-empty", "Deposit", lambda c: wp.DepositRequest(idempotency_key=unique(), owner=c.alice, amount="1"), INVALID, "asset:"),
    ("asset-unknown", "Deposit", lambda c: wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="NOPE", amount="1"), INVALID, "asset:"),
    ("reference-10KB", "Deposit", lambda c: wp.DepositRequest(idempotency_key=unique(), owner=c.alice, asset="BTC", amount="1", reference=BIG), INVALID, "reference:"),
    ("key-10KB", "Deposit", lambda c: wp.DepositRequest(idempotency_key="k" * 10_240, owner=c.alice, asset="BTC", amount="1"), INVALID, "idempotency_key:"),
    ("key-reused", "Deposit", lambda c: wp.DepositRequest(idempotency_key=c.keys["Deposit"], owner=c.alice, asset="BTC", amount="11"), EXISTS, "idempotency_key:"),
    # Withdraw
    ("too-precise", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount=TOO_PRECISE_USDT), INVALID, "amount:"),
    ("negative", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount="-1"), INVALID, "amount:"),
    ("exponent", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount="1e1"), INVALID, "amount:"),
    ("owner-10KB", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=BIG, asset="USDT", amount="1"), INVALID, "owner:"),
    ("insufficient", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=c.alice, asset="USDT", amount="1000"), PRECONDITION, "insufficient funds"),
    ("poor-user", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=unique(), owner=c.poor, asset="BTC", amount="1"), PRECONDITION, "insufficient funds"),
    ("key-empty", "Withdraw", lambda c: wp.WithdrawRequest(owner=c.alice, asset="USDT", amount="1"), INVALID, "idempotency_key:"),
    ("key-reused", "Withdraw", lambda c: wp.WithdrawRequest(idempotency_key=c.keys["Withdraw"], owner=c.alice, asset="USDT", amount="2"), EXISTS, "idempotency_key:"),
    # GetBalances
    ("asset-unknown", "GetBalances", lambda c: wp.GetBalancesRequest(owner=c.alice, asset="NOPE"), INVALID, "asset:"),
    ("asset-10KB", "GetBalances", lambda c: wp.GetBalancesRequest(owner=c.alice, asset=BIG), INVALID, "asset:"),
    # ListTransfers
    ("page-size-1001", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_size=1001), INVALID, "page_size:"),
    ("page-size-max", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_size=2**32 - 1), INVALID, "page_size:"),
    ("token-garbage", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token="garbage"), INVALID, "page_token:"),
    ("token-10KB", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token="QUFB" * 2560), INVALID, "page_token:"),
    ("token-other-list", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token=base64.urlsafe_b64encode(b"p:1").decode()), INVALID, "page_token:"),
    ("token-negative", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token=base64.urlsafe_b64encode(b"t:-1").decode()), INVALID, "page_token:"),
    ("token-id-past-bigint", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token=base64.urlsafe_b64encode(b"t:" + b"9" * 30).decode()), INVALID, "page_token:"),
    ("token-not-utf8", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, page_token=base64.urlsafe_b64encode(b"\xff\xfe").decode()), INVALID, "page_token:"),
    ("owner-10KB", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=BIG), INVALID, "owner:"),
    ("asset-unknown", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, asset="NOPE"), INVALID, "asset:"),
    ("created-from-out-of-range", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, created_from=ts(10**15)), INVALID, "created_from:"),
    ("created-to-bad-nanos", "ListTransfers", lambda c: wp.ListTransfersRequest(owner=c.alice, created_to=Timestamp(seconds=1, nanos=10**9)), INVALID, "created_to:"),
    # GetLedgerTotals: no field to get wrong; a gateway may not read the totals.
    ("gateway", "GetLedgerTotals", lambda c: wp.GetLedgerTotalsRequest(), DENIED, "GetLedgerTotals", GATEWAY),
]
for _n, _m, _b, _code, _frag, *_tok in _W:
    _token = _tok[0] if _tok else (GATEWAY if _m in ("GetHold", "GetBalances", "ListTransfers") else OPERATOR)
    row(_n, "wallet", _m, _b, _code, _frag, _token)

# BulkCredit: columns.
def bulk(c: Ctx, **fields: Any) -> wp.BulkCreditRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), asset="BTC", source=wp.AccountRef(owner="corpus", kind=EXPENSE), owners=[c.alice, c.bob], amounts=["1", "2"])
    return wp.BulkCreditRequest(**{**base, **fields})


_B = [
    ("key-empty", {"idempotency_key": ""}, "idempotency_key:"),
    ("key-10KB", {"idempotency_key": "k" * 10_240}, "idempotency_key:"),
    ("asset-empty", {"asset": ""}, "asset:"),
    ("asset-unknown", {"asset": "NOPE"}, "asset:"),
    ("source-owner-empty", {"source": wp.AccountRef(kind=EXPENSE)}, "source.owner:"),
    ("source-owner-10KB", {"source": wp.AccountRef(owner=BIG, kind=EXPENSE)}, "source.owner:"),
    ("source-kind-missing", {"source": wp.AccountRef(owner="corpus")}, "source.kind:"),
    ("source-kind-funding", {"source": wp.AccountRef(owner="corpus", kind=FUNDING)}, "source.kind:"),
    ("source-kind-treasury", {"source": wp.AccountRef(owner="corpus", kind=TREASURY)}, "source.kind:"),
    ("no-owners", {"owners": [], "amounts": []}, "owners:"),
    ("too-many", {"owners": [f"u{i}" for i in range(10_001)], "amounts": ["1"] * 10_001}, "owners:"),
    ("amounts-short", {"amounts": ["1"]}, "amounts:"),
    ("references-count", {"references": ["a", "b", "c"]}, "references:"),
    ("duplicate-owner", {"owners": ["x", "x"]}, "owners[1]:"),
    ("owner-10KB", {"owners": ["x", BIG]}, "owners[1]:"),
    ("owner-newline", {"owners": ["x\ny", "z"]}, "owners[0]:"),
    ("amount-zero", {"amounts": ["1", "0"]}, "amounts[1]:"),
    ("amount-negative", {"amounts": ["-1", "1"]}, "amounts[0]:"),
    ("amount-exponent", {"amounts": ["1", "1e5"]}, "amounts[1]:"),
    ("amount-nan", {"amounts": ["NaN", "1"]}, "amounts[0]:"),
    ("amount-infinity", {"amounts": ["1", "Infinity"]}, "amounts[1]:"),
    ("amount-empty", {"amounts": ["1", ""]}, "amounts[1]:"),
    ("amount-space", {"amounts": ["1", "1 "]}, "amounts[1]:"),
    ("amount-too-precise", {"amounts": ["1", TOO_PRECISE_BTC]}, "amounts[1]:"),
    ("amount-10KB", {"amounts": ["1", BIG_DIGITS]}, "amounts[1]:"),
    ("amount-newline", {"amounts": ["1\n2", "1"]}, "amounts[0]:"),
    ("reference-10KB", {"reference": BIG}, "reference:"),
    ("references-10KB", {"references": ["a", BIG]}, "references[1]:"),
]
for _n, _f, _frag in _B:
    row(_n, "wallet", "BulkCredit", lambda c, f=_f: bulk(c, **f), INVALID, _frag, SERVICE)

# ---- simple_earn ----


def product(c: Ctx, **fields: Any) -> se.CreateProductRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), product_id=unique("p"), asset="BTC", kind=FLEX, tiers=TIERS, min_subscription="0.001")
    return se.CreateProductRequest(**{**base, **fields})


_CP = [
    ("key-empty", {"idempotency_key": ""}, INVALID, "idempotency_key:"),
    ("key-10KB", {"idempotency_key": "k" * 10_240}, INVALID, "idempotency_key:"),
    ("id-empty", {"product_id": ""}, INVALID, "product_id:"),
    ("id-10KB", {"product_id": BIG}, INVALID, "product_id:"),
    ("id-space", {"product_id": "bad id"}, INVALID, "product_id:"),
    ("asset-empty", {"asset": ""}, INVALID, "asset:"),
    ("asset-unknown", {"asset": "NOPE"}, INVALID, "asset:"),
    ("asset-10KB", {"asset": BIG}, INVALID, "asset:"),
    ("kind-missing", {"kind": 0}, INVALID, "kind:"),
    ("kind-unknown", {"kind": 7}, INVALID, "kind:"),
    ("tiers-empty", {"tiers": []}, INVALID, "tiers"),
    ("tiers-17", {"tiers": tiers(*[(str(i + 1), "0.01") for i in range(16)], ("", "0.01"))}, INVALID, "tiers:"),
    ("tier-bounded-last", {"tiers": tiers(("5", "0.08"))}, INVALID, "tiers[0].up_to:"),
    ("tier-descending", {"tiers": tiers(("5", "0.08"), ("3", "0.01"), ("", "0"))}, INVALID, "tiers[1].up_to:"),
    ("tier-apr-negative", {"tiers": tiers(("", "-1"))}, INVALID, "tiers[0].apr:"),
    ("tier-apr-nan", {"tiers": tiers(("", "NaN"))}, INVALID, "tiers[0].apr:"),
    ("tier-apr-exponent", {"tiers": tiers(("", "1e-2"))}, INVALID, "tiers[0].apr:"),
    ("tier-apr-empty", {"tiers": tiers(("", ""))}, INVALID, "tiers[0].apr:"),
    ("tier-apr-10KB", {"tiers": tiers(("", BIG_DIGITS))}, INVALID, "tiers[0].apr:"),
    ("tier-up-to-too-precise", {"tiers": tiers((TOO_PRECISE_BTC, "0.1"), ("", "0.01"))}, INVALID, "tiers[0].up_to:"),
    ("tier-up-to-infinity", {"tiers": tiers(("Infinity", "0.1"), ("", "0.01"))}, INVALID, "tiers[0].up_to:"),
    ("min-empty", {"min_subscription": ""}, INVALID, "min_subscription:"),
    ("min-zero", {"min_subscription": "0"}, INVALID, "min_subscription:"),
    ("min-negative", {"min_subscription": "-1"}, INVALID, "min_subscription:"),
    ("min-too-precise", {"min_subscription": TOO_PRECISE_BTC}, INVALID, "min_subscription:"),
    ("min-too-precise-usdt", {"asset": "USDT", "min_subscription": TOO_PRECISE_USDT}, INVALID, "min_subscription:"),
    ("min-nan", {"min_subscription": "NaN"}, INVALID, "min_subscription:"),
    ("min-space", {"min_subscription": " 1"}, INVALID, "min_subscription:"),
    ("max-below-min", {"min_subscription": "1", "max_per_user": "0.5"}, INVALID, "max_per_user:"),
    ("max-infinity", {"max_per_user": "Infinity"}, INVALID, "max_per_user:"),
    ("quota-exponent", {"quota": "1e3"}, INVALID, "quota:"),
    ("quota-zero", {"quota": "0"}, INVALID, "quota:"),
    ("quota-below-min", {"min_subscription": "2", "quota": "1"}, INVALID, "quota:"),
    ("flex-term", {"term_days": 30}, INVALID, "term_days:"),
    ("flex-early-redeem", {"early_redeem_allowed": True}, INVALID, "early_redeem_allowed:"),
    ("flex-cadence-unknown", {"payout_cadence": 9}, INVALID, "payout_cadence:"),
    ("fixed-no-term", {"kind": FIXED, "term_days": 0}, INVALID, "term_days:"),
    ("fixed-term-too-long", {"kind": FIXED, "term_days": 3651}, INVALID, "term_days:"),
    ("fixed-cadence", {"kind": FIXED, "term_days": 7, "payout_cadence": se.PAYOUT_CADENCE_HOURLY}, INVALID, "payout_cadence:"),
]
for _n, _f, _code, _frag in _CP:
    row(_n, "earn", "CreateProduct", lambda c, f=_f: product(c, **f), _code, _frag)
row("duplicate-id", "earn", "CreateProduct", lambda c: product(c, product_id=c.flex), EXISTS, "product_id:")
row("key-reused", "earn", "CreateProduct", lambda c: product(c, idempotency_key=c.keys["CreateProduct"], product_id=c.flex, min_subscription="0.002"), EXISTS, "idempotency_key:")
row("key-reused-other-method", "earn", "CreateProduct", lambda c: product(c, idempotency_key=c.keys["UpdateProduct"]), EXISTS, "idempotency_key:")


def update(c: Ctx, **fields: Any) -> se.UpdateProductRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), product_id=c.flex, quota="9")
    return se.UpdateProductRequest(**{**base, **fields})


_UP = [
    ("key-empty", {"idempotency_key": ""}, INVALID, "idempotency_key:"),
    ("id-empty", {"product_id": ""}, INVALID, "product_id:"),
    ("id-10KB", {"product_id": BIG}, INVALID, "product_id:"),
    ("unknown", {"product_id": "no-such-product"}, NOT_FOUND, "product_id:"),
    ("nothing", {"quota": ""}, INVALID, "status:"),
    ("status-unknown", {"status": 5}, INVALID, "status:"),
    ("min-nan", {"min_subscription": "NaN"}, INVALID, "min_subscription:"),
    ("min-zero", {"min_subscription": "0"}, INVALID, "min_subscription:"),
    ("max-too-precise", {"max_per_user": TOO_PRECISE_BTC}, INVALID, "max_per_user:"),
    ("quota-negative", {"quota": "-8"}, INVALID, "quota:"),
    ("quota-exponent", {"quota": "8e0"}, INVALID, "quota:"),
    ("quota-below-min", {"min_subscription": "3", "quota": "2"}, INVALID, "quota:"),
    ("max-below-min", {"quota": "", "min_subscription": "6"}, INVALID, "max_per_user:"),
]
for _n, _f, _code, _frag in _UP:
    row(_n, "earn", "UpdateProduct", lambda c, f=_f: update(c, **f), _code, _frag)
row("usdt-quota-too-precise", "earn", "UpdateProduct", lambda c: update(c, product_id=c.usdt, quota=TOO_PRECISE_USDT), INVALID, "quota:")
row("key-reused", "earn", "UpdateProduct", lambda c: update(c, idempotency_key=c.keys["UpdateProduct"], product_id=c.paused, quota="", status=se.PRODUCT_STATUS_ACTIVE), EXISTS, "idempotency_key:")

_SR = [
    ("key-empty", lambda c: se.SetProductRatesRequest(product_id=c.flex, tiers=TIERS), INVALID, "idempotency_key:"),
    ("id-10KB", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=BIG, tiers=TIERS), INVALID, "product_id:"),
    ("unknown", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id="no-such-product", tiers=TIERS), NOT_FOUND, "product_id:"),
    ("fixed", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.fixed, tiers=TIERS), PRECONDITION, "fixed-term"),
    ("tiers-empty", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.flex), INVALID, "tiers"),
    ("apr-negative", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.flex, tiers=tiers(("", "-0.1"))), INVALID, "tiers[0].apr:"),
    ("apr-infinity", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.flex, tiers=tiers(("", "Infinity"))), INVALID, "tiers[0].apr:"),
    ("up-to-too-precise-usdt", lambda c: se.SetProductRatesRequest(idempotency_key=unique(), product_id=c.usdt, tiers=tiers((TOO_PRECISE_USDT, "0.1"), ("", "0.01"))), INVALID, "tiers[0].up_to:"),
    ("key-reused", lambda c: se.SetProductRatesRequest(idempotency_key=c.keys["SetProductRates"], product_id=c.usdt, tiers=tiers(("", "0.06"))), EXISTS, "idempotency_key:"),
]
for _n, _b, _code, _frag in _SR:
    row(_n, "earn", "SetProductRates", _b, _code, _frag)

for _n, _v in [("empty", ""), ("10KB", BIG), ("space", "a b"), ("non-ascii", "é")]:
    row(f"id-{_n}", "earn", "GetProduct", lambda c, v=_v: se.GetProductRequest(product_id=v), INVALID, "product_id:", GATEWAY)
    row(f"id-{_n}", "earn", "ListRateHistory", lambda c, v=_v: se.ListRateHistoryRequest(product_id=v), INVALID, "product_id:", GATEWAY)
row("unknown", "earn", "GetProduct", lambda c: se.GetProductRequest(product_id="no-such-product"), NOT_FOUND, "product_id:", GATEWAY)
row("unknown", "earn", "ListRateHistory", lambda c: se.ListRateHistoryRequest(product_id="no-such-product"), NOT_FOUND, "product_id:", GATEWAY)
row("asset-unknown", "earn", "ListProducts", lambda c: se.ListProductsRequest(asset="NOPE"), INVALID, "asset:", GATEWAY)
row("asset-10KB", "earn", "ListProducts", lambda c: se.ListProductsRequest(asset=BIG), INVALID, "asset:", GATEWAY)
row("asset-lowercase", "earn", "ListProducts", lambda c: se.ListProductsRequest(asset="btc"), INVALID, "asset:", GATEWAY)

# Queries of a user's records: a gateway must name the user; pages and tokens.
_LISTS = {
    "ListPositions": (se.ListPositionsRequest, "s"),
    "ListSubscriptions": (se.ListSubscriptionsRequest, "p"),
    "ListRedemptions": (se.ListRedemptionsRequest, "p"),
    "ListInterest": (se.ListInterestRequest, "p"),
}
for _m, (_t, _other) in _LISTS.items():
    _kind = {"ListPositions": "p", "ListSubscriptions": "s", "ListRedemptions": "r", "ListInterest": "i"}[_m]
    row("gateway-no-user", "earn", _m, lambda c, t=_t: t(), INVALID, "user_id:", GATEWAY)
    row("user-10KB", "earn", _m, lambda c, t=_t: t(user_id=BIG), INVALID, "user_id:", GATEWAY)
    row("user-space", "earn", _m, lambda c, t=_t: t(user_id="a b"), INVALID, "user_id:", GATEWAY)
    row("page-size-1001", "earn", _m, lambda c, t=_t: t(user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY)
    row("page-size-max", "earn", _m, lambda c, t=_t: t(user_id=c.alice, page_size=2**32 - 1), INVALID, "page_size:", GATEWAY)
    row("token-garbage", "earn", _m, lambda c, t=_t: t(user_id=c.alice, page_token="!!!"), INVALID, "page_token:", GATEWAY)
    row("token-id-past-bigint", "earn", _m, lambda c, t=_t, k=_kind: t(user_id=c.alice, page_token=base64.urlsafe_b64encode(f"{k}:{'9' * 30}".encode()).decode()), INVALID, "page_token:", GATEWAY)
    row("token-10KB", "earn", _m, lambda c, t=_t: t(user_id=c.alice, page_token="QUFB" * 2560), INVALID, "page_token:", GATEWAY)
    row("token-other-list", "earn", _m, lambda c, t=_t, o=_other: t(user_id=c.alice, page_token=base64.urlsafe_b64encode(f"{o}:1".encode()).decode()), INVALID, "page_token:", GATEWAY)
    if _m != "ListPositions":
        row("time-reversed", "earn", _m, lambda c, t=_t: t(user_id=c.alice, time=se.TimeFilter(**{"from": past(1), "to": past(2)})), INVALID, "time:", GATEWAY)
        row("time-to-out-of-range", "earn", _m, lambda c, t=_t: t(user_id=c.alice, time=se.TimeFilter(to=ts(-10**13))), INVALID, "time.to:", GATEWAY)
        row("time-from-bad-nanos", "earn", _m, lambda c, t=_t: t(user_id=c.alice, time=se.TimeFilter(**{"from": Timestamp(seconds=1, nanos=-5)})), INVALID, "time.from:", GATEWAY)
row("product-10KB", "earn", "ListPositions", lambda c: se.ListPositionsRequest(user_id=c.alice, product_id=BIG), INVALID, "product_id:", GATEWAY)
for _n, _v in BAD_IDS:
    if _v:
        row(f"position-{_n}", "earn", "ListInterest", lambda c, v=_v: se.ListInterestRequest(user_id=c.alice, position_id=v), INVALID, "position_id:", GATEWAY)
row("hourly-no-position", "earn", "ListInterest", lambda c: se.ListInterestRequest(user_id=c.alice, hourly=True), INVALID, "position_id:", GATEWAY)
row("hourly-other-users-position", "earn", "ListInterest", lambda c: se.ListInterestRequest(user_id=c.alice, position_id=c.bob_flex, hourly=True), NOT_FOUND, "position_id:", GATEWAY)
row("hourly-unknown-position", "earn", "ListInterest", lambda c: se.ListInterestRequest(user_id=c.alice, position_id="99999999", hourly=True), NOT_FOUND, "position_id:", GATEWAY)
row("hourly-token-of-payouts", "earn", "ListInterest", lambda c: se.ListInterestRequest(user_id=c.alice, position_id=c.alice_flex, hourly=True, page_token=base64.urlsafe_b64encode(b"i:1").decode()), INVALID, "page_token:", GATEWAY)


def sub(c: Ctx, **fields: Any) -> se.SubscribeRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), user_id=c.alice, product_id=c.flex, amount="0.5")
    return se.SubscribeRequest(**{**base, **fields})


for _n, _v in BAD_AMOUNTS:
    row(f"amount-{_n}", "earn", "Subscribe", lambda c, v=_v: sub(c, amount=v), INVALID, "amount:", GATEWAY)
    if _v:  # empty: the whole principal
        row(f"amount-{_n}", "earn", "Redeem", lambda c, v=_v: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_flex, amount=v), INVALID, "amount:", GATEWAY)
for _n, _v in BAD_KEYS:
    row(f"key-{_n}", "earn", "Subscribe", lambda c, v=_v: sub(c, idempotency_key=v), INVALID, "idempotency_key:", GATEWAY)
    row(f"key-{_n}", "earn", "Redeem", lambda c, v=_v: se.RedeemRequest(idempotency_key=v, user_id=c.alice, position_id=c.alice_flex, amount="0.1"), INVALID, "idempotency_key:", GATEWAY)
    row(f"key-{_n}", "earn", "SetAutoSubscribe", lambda c, v=_v: se.SetAutoSubscribeRequest(idempotency_key=v, user_id=c.alice, position_id=c.alice_flex), INVALID, "idempotency_key:", GATEWAY)
for _n, _v in BAD_NAMES:
    row(f"user-{_n}", "earn", "Subscribe", lambda c, v=_v: sub(c, user_id=v), INVALID, "user_id:", GATEWAY)
    row(f"user-{_n}", "earn", "Redeem", lambda c, v=_v: se.RedeemRequest(idempotency_key=unique(), user_id=v, position_id=c.alice_flex), INVALID, "user_id:", GATEWAY)
for _n, _v in BAD_IDS + [("zero", "0"), ("leading-zero", "01")]:
    row(f"position-{_n}", "earn", "Redeem", lambda c, v=_v: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=v), INVALID, "position_id:", GATEWAY)
    row(f"position-{_n}", "earn", "SetAutoSubscribe", lambda c, v=_v: se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=c.alice, position_id=v), INVALID, "position_id:", GATEWAY)

_S = [
    # Subscribe
    ("too-precise", "Subscribe", lambda c: sub(c, amount=TOO_PRECISE_BTC), INVALID, "amount:"),
    ("too-precise-usdt", "Subscribe", lambda c: sub(c, product_id=c.usdt, amount=TOO_PRECISE_USDT), INVALID, "amount:"),
    ("product-empty", "Subscribe", lambda c: sub(c, product_id=""), INVALID, "product_id:"),
    ("product-10KB", "Subscribe", lambda c: sub(c, product_id=BIG), INVALID, "product_id:"),
    ("product-unknown", "Subscribe", lambda c: sub(c, product_id="no-such-product"), NOT_FOUND, "product_id:"),
    ("paused", "Subscribe", lambda c: sub(c, product_id=c.paused), PRECONDITION, "paused"),
    ("below-min", "Subscribe", lambda c: sub(c, amount="0.0001"), PRECONDITION, "min_subscription"),
    ("over-max-per-user", "Subscribe", lambda c: sub(c, amount="4.5"), PRECONDITION, "at most 5"),
    ("over-quota", "Subscribe", lambda c: sub(c, user_id=unique("u"), amount="4.5"), PRECONDITION, "left quota"),
    ("no-funds", "Subscribe", lambda c: sub(c, user_id=c.poor), PRECONDITION, "insufficient funds"),
    ("wrong-asset-funds", "Subscribe", lambda c: sub(c, user_id=c.bob, product_id=c.usdt, amount="1"), PRECONDITION, "insufficient funds"),
    ("auto-renew-flexible", "Subscribe", lambda c: sub(c, auto_renew=True), INVALID, "auto_renew:"),
    ("auto-subscribe-fixed", "Subscribe", lambda c: sub(c, product_id=c.fixed, auto_subscribe=True), INVALID, "auto_subscribe:"),
    ("key-reused", "Subscribe", lambda c: sub(c, idempotency_key=c.keys["Subscribe"], amount="2"), EXISTS, "idempotency_key:"),
    ("key-reused-other-user", "Subscribe", lambda c: sub(c, idempotency_key=c.keys["Subscribe"], user_id=c.bob, amount="1"), EXISTS, "idempotency_key:"),
    ("key-of-redeem", "Subscribe", lambda c: sub(c, idempotency_key=c.keys["Redeem"], amount="0.1"), EXISTS, "idempotency_key:"),
    # Redeem
    ("other-users-position", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.bob, position_id=c.alice_flex), NOT_FOUND, "position_id:"),
    ("other-users-position-amount", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.bob_flex, amount="0.1"), NOT_FOUND, "position_id:"),
    ("unknown", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id="99999999"), NOT_FOUND, "position_id:"),
    ("too-precise", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_flex, amount=TOO_PRECISE_BTC), INVALID, "amount:"),
    ("exceeds", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_flex, amount="100"), PRECONDITION, "amount"),
    ("fixed-part", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_fixed, amount="0.5"), INVALID, "amount:"),
    ("fixed-early", "Redeem", lambda c: se.RedeemRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_fixed), PRECONDITION, "early redemption"),
    ("key-reused", "Redeem", lambda c: se.RedeemRequest(idempotency_key=c.keys["Redeem"], user_id=c.alice, position_id=c.alice_flex, amount="0.2"), EXISTS, "idempotency_key:"),
    # SetAutoSubscribe
    ("other-users-position", "SetAutoSubscribe", lambda c: se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=c.bob, position_id=c.alice_flex, enabled=False), NOT_FOUND, "position_id:"),
    ("unknown", "SetAutoSubscribe", lambda c: se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=c.alice, position_id="99999999"), NOT_FOUND, "position_id:"),
    ("user-empty", "SetAutoSubscribe", lambda c: se.SetAutoSubscribeRequest(idempotency_key=unique(), position_id=c.alice_flex), INVALID, "user_id:"),
    ("fixed", "SetAutoSubscribe", lambda c: se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=c.alice, position_id=c.alice_fixed, enabled=True), PRECONDITION, "fixed-term"),
    ("key-reused", "SetAutoSubscribe", lambda c: se.SetAutoSubscribeRequest(idempotency_key=c.keys["SetAutoSubscribe"], user_id=c.alice, position_id=c.alice_flex, enabled=False), EXISTS, "idempotency_key:"),
]
for _n, _m, _b, _code, _frag in _S:
    row(_n, "earn", _m, _b, _code, _frag, GATEWAY)

def preview_token(*, job: str, period: str, boundary: int, cadence: str, last: int = 1, count: int = 0, totals: dict | None = None) -> str:
    """A preview page token of the right scope (as the service makes it) with chosen contents."""
    import hashlib

    scope = hashlib.sha256(f"{job}\0{period}\0{boundary}\0{cadence}".encode()).hexdigest()[:16]
    data = {"s": scope, "a": last, "t": totals or {}, "n": count}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


_J = [
    # CloseHour: only bad hours (a good one would close hours).
    ("zero", "CloseHour", lambda c: se.CloseHourRequest(), INVALID, "hour:"),
    ("negative", "CloseHour", lambda c: se.CloseHourRequest(hour=-5), INVALID, "hour:"),
    ("future", "CloseHour", lambda c: se.CloseHourRequest(hour=int(time.time()) // 3600 + 2), PRECONDITION, "hour:"),
    ("far-future", "CloseHour", lambda c: se.CloseHourRequest(hour=2**62), PRECONDITION, "hour:"),
    # RequestPayout
    ("job-empty", "RequestPayout", lambda c: se.RequestPayoutRequest(period="2026-11-26", boundary_hour=1, cadence=1), INVALID, "job:"),
    ("job-10KB", "RequestPayout", lambda c: se.RequestPayoutRequest(job=BIG, period="2026-11-26", boundary_hour=1, cadence=1), INVALID, "job:"),
    ("period-empty", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", boundary_hour=1, cadence=1), INVALID, "period:"),
    ("period-10KB", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period=BIG, boundary_hour=1, cadence=1), INVALID, "period:"),
    ("period-space", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026 11", boundary_hour=1, cadence=1), INVALID, "period:"),
    ("boundary-zero", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026-11-26", cadence=1), INVALID, "boundary_hour:"),
    ("boundary-negative", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026-11-26", boundary_hour=-1, cadence=1), INVALID, "boundary_hour:"),
    ("boundary-future", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026-11-26", boundary_hour=2**40, cadence=1), PRECONDITION, "boundary_hour:"),
    ("cadence-missing", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026-11-26", boundary_hour=1), INVALID, "cadence:"),
    ("cadence-unknown", "RequestPayout", lambda c: se.RequestPayoutRequest(job="daily", period="2026-11-26", boundary_hour=1, cadence=9), INVALID, "cadence:"),
    # GetPayoutStatus
    ("job-empty", "GetPayoutStatus", lambda c: se.GetPayoutStatusRequest(period="2026-11-26"), INVALID, "job:"),
    ("period-10KB", "GetPayoutStatus", lambda c: se.GetPayoutStatusRequest(job="daily", period=BIG), INVALID, "period:"),
    ("unknown", "GetPayoutStatus", lambda c: se.GetPayoutStatusRequest(job="daily", period="1999-01-01"), NOT_FOUND, "period:"),
    # PreviewPayout (read-only even when valid)
    ("job-empty", "PreviewPayout", lambda c: se.PreviewPayoutRequest(period="p", boundary_hour=1, cadence=1), INVALID, "job:"),
    ("period-non-ascii", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="é", boundary_hour=1, cadence=1), INVALID, "period:"),
    ("boundary-zero", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", cadence=1), INVALID, "boundary_hour:"),
    ("cadence-missing", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1), INVALID, "cadence:"),
    ("page-size-1001", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_size=1001), INVALID, "page_size:"),
    ("token-garbage", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token="%%%"), INVALID, "page_token:"),
    ("token-10KB", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token="QUFB" * 2560), INVALID, "page_token:"),
    ("token-of-a-list", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token=base64.urlsafe_b64encode(b"p:1").decode()), INVALID, "page_token:"),
    ("token-id-past-bigint", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token=preview_token(job="daily", period="p", boundary=1, cadence="daily", last=10**30)), INVALID, "page_token:"),
    ("token-negative-count", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token=preview_token(job="daily", period="p", boundary=1, cadence="daily", count=-1)), INVALID, "page_token:"),
    ("token-total-nan", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token=preview_token(job="daily", period="p", boundary=1, cadence="daily", totals={"BTC": "NaN"})), INVALID, "page_token:"),
    ("token-other-scope", "PreviewPayout", lambda c: se.PreviewPayoutRequest(job="daily", period="p", boundary_hour=1, cadence=1, page_token=base64.urlsafe_b64encode(json.dumps({"s": "x", "a": 1, "t": {}, "n": 0}).encode()).decode()), INVALID, "page_token:"),
    # MatureDue: only bad times (a good one would mature positions).
    ("until-missing", "MatureDue", lambda c: se.MatureDueRequest(), INVALID, "until:"),
    ("until-future", "MatureDue", lambda c: se.MatureDueRequest(until=ts(int(time.time()) + 3600)), INVALID, "until:"),
    ("until-out-of-range", "MatureDue", lambda c: se.MatureDueRequest(until=ts(10**15)), INVALID, "until:"),
    ("until-bad-nanos", "MatureDue", lambda c: se.MatureDueRequest(until=Timestamp(seconds=1, nanos=-1)), INVALID, "until:"),
]
for _n, _m, _b, _code, _frag in _J:
    row(_n, "earn", _m, _b, _code, _frag, SERVICE)

# ---- launchpool ----


def lp_project(c: Ctx, **fields: Any) -> lp.CreateProjectRequest:
    hour = int(time.time()) // 3600
    base: dict[str, Any] = dict(
        idempotency_key=unique(), project_id=unique("prj"), reward_asset="BTC", start_time=ts((hour + 1) * 3600), end_time=ts((hour + 5) * 3600),
        pools=[lp_pool()],
    )
    return lp.CreateProjectRequest(**{**base, **fields})


def lp_pool(**fields: Any) -> lp.RewardPoolSpec:
    base: dict[str, Any] = dict(pool_id=unique("pool"), stake_asset="USDT", total_reward="1", min_stake="1", max_stake="10")
    return lp.RewardPoolSpec(**{**base, **fields})


_NOW_HOUR = int(time.time()) // 3600
_LP_CREATE = [
    ("key-empty", {"idempotency_key": ""}, INVALID, "idempotency_key:"),
    ("key-10KB", {"idempotency_key": "k" * 10_240}, INVALID, "idempotency_key:"),
    ("id-empty", {"project_id": ""}, INVALID, "project_id:"),
    ("id-10KB", {"project_id": BIG}, INVALID, "project_id:"),
    ("id-space", {"project_id": "a b"}, INVALID, "project_id:"),
    ("reward-asset-empty", {"reward_asset": ""}, INVALID, "reward_asset:"),
    ("reward-asset-unknown", {"reward_asset": "NOPE"}, INVALID, "reward_asset:"),
    ("start-missing", {"start_time": None}, INVALID, "start_time:"),
    ("start-not-full-hour", {"start_time": ts((_NOW_HOUR + 1) * 3600 + 1)}, INVALID, "start_time:"),
    ("start-bad-nanos", {"start_time": Timestamp(seconds=(_NOW_HOUR + 1) * 3600, nanos=5)}, INVALID, "start_time:"),
    ("start-out-of-range", {"start_time": ts(10**15)}, INVALID, "start_time:"),
    ("start-in-the-past", {"start_time": ts((_NOW_HOUR - 2) * 3600)}, INVALID, "start_time:"),
    ("end-missing", {"end_time": None}, INVALID, "end_time:"),
    ("end-before-start", {"end_time": ts(_NOW_HOUR * 3600)}, INVALID, "end_time:"),
    ("end-past", {"start_time": ts((_NOW_HOUR - 30) * 3600), "end_time": ts((_NOW_HOUR - 1) * 3600)}, INVALID, "end_time:"),
    ("too-long", {"end_time": ts((_NOW_HOUR + 24 * 400) * 3600)}, INVALID, "end_time:"),
    ("mode-unknown", {"payout_mode": 9}, INVALID, "payout_mode:"),
    ("no-pools", {"pools": []}, INVALID, "pools:"),
    ("21-pools", {"pools": [lp_pool(stake_asset="USDT") for _ in range(21)]}, INVALID, "pools:"),
    ("pool-id-empty", {"pools": [lp_pool(pool_id="")]}, INVALID, "pools[0].pool_id:"),
    ("pool-id-10KB", {"pools": [lp_pool(pool_id=BIG)]}, INVALID, "pools[0].pool_id:"),
    ("stake-asset-empty", {"pools": [lp_pool(stake_asset="")]}, INVALID, "pools[0].stake_asset:"),
    ("stake-asset-unknown", {"pools": [lp_pool(stake_asset="NOPE")]}, INVALID, "pools[0].stake_asset:"),
    ("pool-id-twice", {"pools": [lp_pool(pool_id="same"), lp_pool(pool_id="same", stake_asset="BTC")]}, INVALID, "pools[1].pool_id:"),
    ("stake-coin-twice", {"pools": [lp_pool(), lp_pool()]}, INVALID, "pools[1].stake_asset:"),
    ("reward-too-precise", {"pools": [lp_pool(total_reward=TOO_PRECISE_BTC)]}, INVALID, "pools[0].total_reward:"),
    ("min-zero", {"pools": [lp_pool(min_stake="0")]}, INVALID, "pools[0].min_stake:"),
    ("min-too-precise", {"pools": [lp_pool(min_stake=TOO_PRECISE_USDT)]}, INVALID, "pools[0].min_stake:"),
    ("max-below-min", {"pools": [lp_pool(min_stake="5", max_stake="4")]}, INVALID, "pools[0].max_stake:"),
    ("cap-below-min", {"pools": [lp_pool(min_stake="5", pool_cap="4")]}, INVALID, "pools[0].pool_cap:"),
    ("cap-nan", {"pools": [lp_pool(pool_cap="NaN")]}, INVALID, "pools[0].pool_cap:"),
    ("tier-volume-negative", {"pools": [lp_pool(cap_tiers=[lp.CapTier(min_volume="-1", max_stake="5")])]}, INVALID, "pools[0].cap_tiers[0].min_volume:"),
    ("tier-volume-empty", {"pools": [lp_pool(cap_tiers=[lp.CapTier(max_stake="5")])]}, INVALID, "pools[0].cap_tiers[0].min_volume:"),
    ("tier-stake-below-min", {"pools": [lp_pool(min_stake="2", cap_tiers=[lp.CapTier(min_volume="0", max_stake="1")])]}, INVALID, "pools[0].cap_tiers[0].max_stake:"),
    ("tiers-not-increasing", {"pools": [lp_pool(cap_tiers=[lp.CapTier(min_volume="5", max_stake="5"), lp.CapTier(min_volume="5", max_stake="6")])]}, INVALID, "pools[0].cap_tiers[1].min_volume:"),
    ("21-tiers", {"pools": [lp_pool(cap_tiers=[lp.CapTier(min_volume=str(i), max_stake="5") for i in range(21)])]}, INVALID, "pools[0].cap_tiers:"),
]
for _n, _f, _code, _frag in _LP_CREATE:
    # A field given as None is left unset.
    row(_n, "lp", "CreateProject", lambda c, f=_f: _without(lp_project(c, **{k: v for k, v in f.items() if v is not None}), [k for k, v in f.items() if v is None]),
        _code, _frag)
for _n, _v in BAD_AMOUNTS:
    row(_n, "lp", "CreateProject", lambda c, v=_v: lp_project(c, pools=[lp_pool(total_reward=v)]), INVALID, "pools[0].total_reward:")
    row(_n, "lp", "Stake", lambda c, v=_v: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount=v), INVALID, "amount:", GATEWAY)
    if _v:  # empty means "all of it"
        row(_n, "lp", "Unstake", lambda c, v=_v: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount=v), INVALID, "amount:", GATEWAY)
for _n, _v in BAD_KEYS:
    row(f"key-{_n}", "lp", "Stake", lambda c, v=_v: lp.StakeRequest(idempotency_key=v, user_id=c.alice, pool_id=c.pool, amount="1"), INVALID, "idempotency_key:", GATEWAY)
    row(f"key-{_n}", "lp", "Unstake", lambda c, v=_v: lp.UnstakeRequest(idempotency_key=v, user_id=c.alice, pool_id=c.pool, amount="1"), INVALID, "idempotency_key:", GATEWAY)
    row(f"key-{_n}", "lp", "SetTradingVolume", lambda c, v=_v: lp.SetTradingVolumeRequest(idempotency_key=v, user_id=c.alice, volume="1"), INVALID, "idempotency_key:")
for _n, _v in BAD_NAMES:
    row(f"user-{_n}", "lp", "Stake", lambda c, v=_v: lp.StakeRequest(idempotency_key=unique(), user_id=v, pool_id=c.pool, amount="1"), INVALID, "user_id:", GATEWAY)
    row(f"pool-{_n}", "lp", "Stake", lambda c, v=_v: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=v, amount="1"), INVALID, "pool_id:", GATEWAY)
    row(f"pool-{_n}", "lp", "Unstake", lambda c, v=_v: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=v), INVALID, "pool_id:", GATEWAY)
    row(f"user-{_n}", "lp", "SetTradingVolume", lambda c, v=_v: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=v, volume="1"), INVALID, "user_id:")
    row(f"project-{_n}", "lp", "GetProject", lambda c, v=_v: lp.GetProjectRequest(project_id=v), INVALID, "project_id:", GATEWAY)


def _without(request: Any, fields: list[str]) -> Any:
    for name in fields:
        request.ClearField(name)
    return request


_LP = [
    ("key-reused", "CreateProject", lambda c: lp_project(c, idempotency_key=c.keys["CreateProject"]), EXISTS, "idempotency_key:", OPERATOR),
    ("project-exists", "CreateProject", lambda c: lp_project(c, project_id=c.project), EXISTS, "project_id:", OPERATOR),
    ("pool-exists", "CreateProject", lambda c: lp_project(c, pools=[lp_pool(pool_id=c.pool)]), EXISTS, "pools[0].pool_id:", OPERATOR),
    ("volume-negative", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.alice, volume="-1"), INVALID, "volume:", OPERATOR),
    ("volume-exponent", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.alice, volume="1e9"), INVALID, "volume:", OPERATOR),
    ("volume-too-precise", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.alice, volume="1.0000001"), INVALID, "volume:", SERVICE),
    ("volume-empty", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.alice), INVALID, "volume:", OPERATOR),
    ("key-reused", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=c.keys["SetTradingVolume"], user_id=c.bob, volume="6"), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "SetTradingVolume", lambda c: lp.SetTradingVolumeRequest(idempotency_key=unique(), user_id=c.alice, volume="1"), DENIED, "SetTradingVolume", GATEWAY),
    ("unknown", "GetProject", lambda c: lp.GetProjectRequest(project_id="no-such-project"), NOT_FOUND, "project_id:", GATEWAY),
    ("price-asset-unknown", "GetProject", lambda c: lp.GetProjectRequest(project_id=c.project, prices={"NOPE": "1"}), INVALID, "prices:", GATEWAY),
    ("price-nan", "GetProject", lambda c: lp.GetProjectRequest(project_id=c.project, prices={"BTC": "NaN"}), INVALID, "prices[BTC]:", GATEWAY),
    ("price-zero", "GetProject", lambda c: lp.GetProjectRequest(project_id=c.project, prices={"BTC": "0"}), INVALID, "prices[BTC]:", GATEWAY),
    ("status-unknown", "ListProjects", lambda c: lp.ListProjectsRequest(status=9), INVALID, "status:", GATEWAY),
    ("price-negative", "ListProjects", lambda c: lp.ListProjectsRequest(prices={"USDT": "-1"}), INVALID, "prices[USDT]:", GATEWAY),
    ("gateway-no-user", "ListStakes", lambda c: lp.ListStakesRequest(), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "ListStakes", lambda c: lp.ListStakesRequest(user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("project-space", "ListStakes", lambda c: lp.ListStakesRequest(user_id=c.alice, project_id="a b"), INVALID, "project_id:", GATEWAY),
    ("page-size-1001", "ListStakes", lambda c: lp.ListStakesRequest(user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-garbage", "ListStakes", lambda c: lp.ListStakesRequest(user_id=c.alice, page_token="garbage"), INVALID, "page_token:", GATEWAY),
    ("token-other-list", "ListStakes", lambda c: lp.ListStakesRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"r:1").decode()), INVALID, "page_token:", GATEWAY),
    ("token-past-bigint", "ListStakes", lambda c: lp.ListStakesRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"s:" + b"9" * 30).decode()), INVALID, "page_token:", OPERATOR),
    ("gateway-no-user", "ListRewards", lambda c: lp.ListRewardsRequest(), INVALID, "user_id:", GATEWAY),
    ("user-non-ascii", "ListRewards", lambda c: lp.ListRewardsRequest(user_id="é"), INVALID, "user_id:", GATEWAY),
    ("pool-10KB", "ListRewards", lambda c: lp.ListRewardsRequest(user_id=c.alice, pool_id=BIG), INVALID, "pool_id:", GATEWAY),
    ("page-size-max", "ListRewards", lambda c: lp.ListRewardsRequest(user_id=c.alice, page_size=2**32 - 1), INVALID, "page_size:", GATEWAY),
    ("token-other-list", "ListRewards", lambda c: lp.ListRewardsRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"s:1").decode()), INVALID, "page_token:", GATEWAY),
    # Stake
    ("too-precise", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount=TOO_PRECISE_USDT), INVALID, "amount:", GATEWAY),
    ("user-empty", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), pool_id=c.pool, amount="10"), INVALID, "user_id:", GATEWAY),
    ("unknown-pool", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id="no-such-pool", amount="10"), NOT_FOUND, "pool_id:", GATEWAY),
    ("below-minimum", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.bob, pool_id=c.pool, amount="9.999999"), PRECONDITION, "minimum", GATEWAY),
    ("over-personal-cap", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="51"), PRECONDITION, "personal cap", GATEWAY),
    ("over-pool-cap", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.bob, pool_id=c.pool, amount="60"), PRECONDITION, "pool cap", GATEWAY),
    ("not-a-newcomer", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.newcomers, amount="0.1"), PRECONDITION, "newcomers only", GATEWAY),
    ("insufficient", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.poor, pool_id=c.pool, amount="10"), PRECONDITION, "insufficient funds", GATEWAY),
    ("key-reused", "Stake", lambda c: lp.StakeRequest(idempotency_key=c.keys["Stake"], user_id=c.alice, pool_id=c.pool, amount="11"), EXISTS, "idempotency_key:", GATEWAY),
    ("operator", "Stake", lambda c: lp.StakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="10"), DENIED, "Stake", OPERATOR),
    # Unstake
    ("too-precise", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount=TOO_PRECISE_USDT), INVALID, "amount:", GATEWAY),
    ("unknown-pool", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id="no-such-pool"), NOT_FOUND, "pool_id:", GATEWAY),
    ("nothing-staked", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.bob, pool_id=c.pool), PRECONDITION, "nothing staked", GATEWAY),
    ("more-than-staked", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="50.000001"), PRECONDITION, "amount:", GATEWAY),
    ("below-minimum-left", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=unique(), user_id=c.alice, pool_id=c.pool, amount="45"), PRECONDITION, "below the minimum", GATEWAY),
    ("key-reused", "Unstake", lambda c: lp.UnstakeRequest(idempotency_key=c.keys["Unstake"], user_id=c.alice, pool_id=c.pool, amount="11"), EXISTS, "idempotency_key:", GATEWAY),
    # Jobs
    ("hour-zero", "CloseRewardHour", lambda c: lp.CloseRewardHourRequest(), INVALID, "hour:", SERVICE),
    ("hour-negative", "CloseRewardHour", lambda c: lp.CloseRewardHourRequest(hour=-5), INVALID, "hour:", SERVICE),
    ("hour-future", "CloseRewardHour", lambda c: lp.CloseRewardHourRequest(hour=2**40), PRECONDITION, "hour:", SERVICE),
    ("job-empty", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("job-10KB", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(job=BIG, period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("period-space", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(job="j", period="a b", boundary_hour=1), INVALID, "period:", SERVICE),
    ("boundary-zero", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(job="j", period="p"), INVALID, "boundary_hour:", SERVICE),
    ("boundary-future", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(job="j", period="p", boundary_hour=2**40), PRECONDITION, "boundary_hour:", SERVICE),
    ("hours-not-closed", "RequestRewardPayout", lambda c: lp.RequestRewardPayoutRequest(job="j", period="p", boundary_hour=_NOW_HOUR), PRECONDITION, "not closed", SERVICE),
    ("job-empty", "GetRewardPayoutStatus", lambda c: lp.GetRewardPayoutStatusRequest(period="p"), INVALID, "job:", OPERATOR),
    ("period-10KB", "GetRewardPayoutStatus", lambda c: lp.GetRewardPayoutStatusRequest(job="j", period=BIG), INVALID, "period:", SERVICE),
    ("unknown", "GetRewardPayoutStatus", lambda c: lp.GetRewardPayoutStatusRequest(job="j", period="1999-01-01"), NOT_FOUND, "period:", SERVICE),
]
for _n, _m, _b, _code, _frag, _tok in _LP:
    row(_n, "lp", _m, _b, _code, _frag, _tok)

# ---- market ----


def backfill(c: Ctx, **fields: Any) -> mk.BackfillPricesRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), pair="BTC/USDT", ticks=[mk.BackfillTick(price="60000", event_time=ts((_NOW_HOUR - 5) * 3600))])
    return mk.BackfillPricesRequest(**{**base, **fields})


def tick(price: str = "60000", seconds: int | None = None, **fields: Any) -> mk.BackfillTick:
    return mk.BackfillTick(price=price, event_time=ts((_NOW_HOUR - 5) * 3600 if seconds is None else seconds), **fields)


BAD_PAIRS = [("empty", ""), ("lower", "btc/usdt"), ("unknown", "BTC/NOPE"), ("same", "BTC/BTC"), ("dash", "BTC-USDT"), ("10KB", BIG), ("space", " BTC/USDT")]
for _n, _v in BAD_PAIRS:
    row(f"pair-{_n}", "mk", "GetIndex", lambda c, v=_v: mk.GetIndexRequest(pair=v), INVALID, "pair:", GATEWAY)
    row(f"pair-{_n}", "mk", "GetTwap", lambda c, v=_v: mk.GetTwapRequest(pair=v, start=ts(0), end=ts(60)), INVALID, "pair:", SERVICE)
    row(f"pair-{_n}", "mk", "BackfillPrices", lambda c, v=_v: backfill(c, pair=v), INVALID, "pair:")
for _n, _v in BAD_AMOUNTS:
    row(_n, "mk", "BackfillPrices", lambda c, v=_v: backfill(c, ticks=[tick(v)]), INVALID, "ticks[0].price:")
for _n, _v in BAD_KEYS:
    row(f"key-{_n}", "mk", "BackfillPrices", lambda c, v=_v: backfill(c, idempotency_key=v), INVALID, "idempotency_key:")
_MK = [
    ("no-data", "GetIndex", lambda c: mk.GetIndexRequest(pair="ETH/BTC"), NOT_FOUND, "pair:", GATEWAY),
    ("none-before", "GetIndex", lambda c: mk.GetIndexRequest(pair="BTC/USDT", at=ts(3600)), NOT_FOUND, "pair:", GATEWAY),
    ("at-out-of-range", "GetIndex", lambda c: mk.GetIndexRequest(pair="BTC/USDT", at=ts(10**15)), INVALID, "at:", GATEWAY),
    ("at-nanos", "GetIndex", lambda c: mk.GetIndexRequest(pair="BTC/USDT", at=Timestamp(seconds=3600, nanos=5)), INVALID, "at:", OPERATOR),
    ("start-missing", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", end=ts(60)), INVALID, "start:", SERVICE),
    ("end-missing", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts(60)), INVALID, "end:", SERVICE),
    ("end-before-start", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts(120), end=ts(60)), INVALID, "end:", SERVICE),
    ("empty-window", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts(120), end=ts(120)), INVALID, "end:", GATEWAY),
    ("window-too-long", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts(0), end=ts(8 * 86400)), INVALID, "end:", SERVICE),
    ("end-out-of-range", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts(0), end=ts(10**15)), INVALID, "end:", SERVICE),
    ("end-in-the-future", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts((_NOW_HOUR + 1) * 3600), end=ts((_NOW_HOUR + 2) * 3600)), PRECONDITION, "end:", SERVICE),
    ("no-ticks", "GetTwap", lambda c: mk.GetTwapRequest(pair="ETH/BTC", start=ts(3600), end=ts(7200)), PRECONDITION, "prices missing for ETH/BTC", SERVICE),
    ("gap", "GetTwap", lambda c: mk.GetTwapRequest(pair="BTC/USDT", start=ts((_NOW_HOUR - 2) * 3600), end=ts((_NOW_HOUR - 1) * 3600)), PRECONDITION, "prices missing for BTC/USDT", SERVICE),
    ("no-ticks", "BackfillPrices", lambda c: backfill(c, ticks=[]), INVALID, "ticks:", OPERATOR),
    ("10001-ticks", "BackfillPrices", lambda c: backfill(c, ticks=[tick(seconds=i) for i in range(10_001)]), INVALID, "ticks:", OPERATOR),
    ("too-precise", "BackfillPrices", lambda c: backfill(c, ticks=[tick(TOO_PRECISE_USDT)]), INVALID, "ticks[0].price:", OPERATOR),
    ("time-missing", "BackfillPrices", lambda c: backfill(c, ticks=[mk.BackfillTick(price="1")]), INVALID, "ticks[0].event_time:", OPERATOR),
    ("time-future", "BackfillPrices", lambda c: backfill(c, ticks=[tick(seconds=(_NOW_HOUR + 48) * 3600)]), INVALID, "ticks[0].event_time:", OPERATOR),
    ("time-out-of-range", "BackfillPrices", lambda c: backfill(c, ticks=[tick(seconds=10**15)]), INVALID, "ticks[0].event_time:", OPERATOR),
    ("time-twice", "BackfillPrices", lambda c: backfill(c, ticks=[tick(seconds=3600), tick("2", seconds=3600)]), INVALID, "ticks[1].event_time:", OPERATOR),
    ("later-tick-bad", "BackfillPrices", lambda c: backfill(c, ticks=[tick(seconds=3600), tick("-2", seconds=7200)]), INVALID, "ticks[1].price:", OPERATOR),
    ("source-upper", "BackfillPrices", lambda c: backfill(c, source="Exchange"), INVALID, "source:", OPERATOR),
    ("source-10KB", "BackfillPrices", lambda c: backfill(c, source=BIG), INVALID, "source:", OPERATOR),
    ("key-reused", "BackfillPrices", lambda c: backfill(c, idempotency_key=c.keys["BackfillPrices"]), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "BackfillPrices", lambda c: backfill(c), DENIED, "BackfillPrices", GATEWAY),
    ("service", "BackfillPrices", lambda c: backfill(c), DENIED, "BackfillPrices", SERVICE),
]
for _n, _m, _b, _code, _frag, _tok in _MK:
    row(_n, "mk", _m, _b, _code, _frag, _tok)

# ---- dual ----


def dual_plan(c: Ctx, **fields: Any) -> du.CreateDualPlanRequest:
    base: dict[str, Any] = dict(
        idempotency_key=unique(), plan_id=unique("dp"), base_asset="BTC", quote_asset="USDT", direction=du.DUAL_DIRECTION_SELL_HIGH, strike="60000",
        apr="0.1", settlement_time=ts((_NOW_HOUR + 24) * 3600), min_amount="0.01", max_per_user="1", quota="10",
    )
    return du.CreateDualPlanRequest(**{**base, **fields})


def dual_sub(c: Ctx, **fields: Any) -> du.SubscribeDualRequest:
    base: dict[str, Any] = dict(client_order_id=unique("o"), user_id=c.bob, plan_id=c.dual_plan, amount="0.1")
    return du.SubscribeDualRequest(**{**base, **fields})


_DUAL_CREATE = [
    ("plan-id-empty", {"plan_id": ""}, INVALID, "plan_id:"),
    ("plan-id-10KB", {"plan_id": BIG}, INVALID, "plan_id:"),
    ("plan-id-space", {"plan_id": "a b"}, INVALID, "plan_id:"),
    ("base-empty", {"base_asset": ""}, INVALID, "base_asset:"),
    ("base-unknown", {"base_asset": "NOPE"}, INVALID, "base_asset:"),
    ("quote-unknown", {"quote_asset": "usdt"}, INVALID, "quote_asset:"),
    ("same-assets", {"quote_asset": "BTC"}, INVALID, "quote_asset:"),
    ("direction-missing", {"direction": 0}, INVALID, "direction:"),
    ("direction-unknown", {"direction": 9}, INVALID, "direction:"),
    ("strike-too-precise", {"strike": TOO_PRECISE_USDT}, INVALID, "strike:"),
    ("apr-negative", {"apr": "-0.1"}, INVALID, "apr:"),
    ("apr-exponent", {"apr": "1e-2"}, INVALID, "apr:"),
    ("apr-too-precise", {"apr": "0.0000001"}, INVALID, "apr:"),
    ("apr-too-high", {"apr": "10.5"}, INVALID, "apr:"),
    ("apr-empty", {"apr": ""}, INVALID, "apr:"),
    ("settlement-missing", {"settlement_time": None}, INVALID, "settlement_time:"),
    ("settlement-not-full-hour", {"settlement_time": ts((_NOW_HOUR + 24) * 3600 + 60)}, INVALID, "settlement_time:"),
    ("settlement-nanos", {"settlement_time": Timestamp(seconds=(_NOW_HOUR + 24) * 3600, nanos=1)}, INVALID, "settlement_time:"),
    ("settlement-past", {"settlement_time": ts((_NOW_HOUR - 1) * 3600)}, INVALID, "settlement_time:"),
    ("settlement-too-far", {"settlement_time": ts((_NOW_HOUR + 24 * 400) * 3600)}, INVALID, "settlement_time:"),
    ("settlement-out-of-range", {"settlement_time": ts(10**15)}, INVALID, "settlement_time:"),
    ("window-too-short", {"window_seconds": 10}, INVALID, "window_seconds:"),
    ("window-too-long", {"window_seconds": 100_000}, INVALID, "window_seconds:"),
    ("window-past-now", {"window_seconds": 86_400, "settlement_time": ts((_NOW_HOUR + 2) * 3600)}, INVALID, "settlement_time:"),
    ("min-too-precise", {"min_amount": TOO_PRECISE_BTC}, INVALID, "min_amount:"),
    ("max-below-min", {"min_amount": "1", "max_per_user": "0.5"}, INVALID, "max_per_user:"),
    ("quota-below-min", {"min_amount": "1", "quota": "0.5"}, INVALID, "quota:"),
    ("buy-low-min-in-quote", {"direction": du.DUAL_DIRECTION_BUY_LOW, "min_amount": TOO_PRECISE_USDT}, INVALID, "min_amount:"),
]
for _n, _f, _code, _frag in _DUAL_CREATE:
    row(_n, "dual", "CreateDualPlan", lambda c, f=_f: _without(dual_plan(c, **{k: v for k, v in f.items() if v is not None}), [k for k, v in f.items() if v is None]),
        _code, _frag)
for _n, _v in BAD_AMOUNTS:
    row(_n, "dual", "CreateDualPlan", lambda c, v=_v: dual_plan(c, strike=v), INVALID, "strike:")
    for _field in ("min_amount", "max_per_user", "quota"):
        row(f"{_field}-{_n}", "dual", "CreateDualPlan", lambda c, v=_v, f=_field: dual_plan(c, **{f: v}), INVALID, f"{_field}:")
    row(_n, "dual", "SubscribeDual", lambda c, v=_v: dual_sub(c, amount=v), INVALID, "amount:", GATEWAY)
for _n, _v in BAD_KEYS:
    row(f"key-{_n}", "dual", "CreateDualPlan", lambda c, v=_v: dual_plan(c, idempotency_key=v), INVALID, "idempotency_key:")
for _n, _v in [("empty", ""), ("space", "a b"), ("65", "o" * 65), ("10KB", "o" * 10_240), ("non-ascii", "ordré"), ("newline", "o\n")]:
    row(f"order-{_n}", "dual", "SubscribeDual", lambda c, v=_v: dual_sub(c, client_order_id=v), INVALID, "client_order_id:", GATEWAY)
for _n, _v in BAD_NAMES:
    row(f"user-{_n}", "dual", "SubscribeDual", lambda c, v=_v: dual_sub(c, user_id=v), INVALID, "user_id:", GATEWAY)
    row(f"plan-{_n}", "dual", "SubscribeDual", lambda c, v=_v: dual_sub(c, plan_id=v), INVALID, "plan_id:", GATEWAY)
    row(f"plan-{_n}", "dual", "GetDualPlan", lambda c, v=_v: du.GetDualPlanRequest(plan_id=v), INVALID, "plan_id:", GATEWAY)
_DUAL = [
    ("plan-exists", "CreateDualPlan", lambda c: dual_plan(c, plan_id=c.dual_plan), EXISTS, "plan_id:", OPERATOR),
    ("key-reused", "CreateDualPlan", lambda c: dual_plan(c, idempotency_key=c.keys["CreateDualPlan"]), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "CreateDualPlan", lambda c: dual_plan(c), DENIED, "CreateDualPlan", GATEWAY),
    ("unknown", "GetDualPlan", lambda c: du.GetDualPlanRequest(plan_id="no-such-plan"), NOT_FOUND, "plan_id:", GATEWAY),
    ("status-unknown", "ListDualPlans", lambda c: du.ListDualPlansRequest(status=9), INVALID, "status:", GATEWAY),
    ("base-unknown", "ListDualPlans", lambda c: du.ListDualPlansRequest(base_asset="NOPE"), INVALID, "base_asset:", OPERATOR),
    ("quote-10KB", "ListDualPlans", lambda c: du.ListDualPlansRequest(quote_asset=BIG), INVALID, "quote_asset:", SERVICE),
    ("gateway-no-user", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(subscription_id=c.dual_sub), INVALID, "user_id:", GATEWAY),
    ("id-empty", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice), INVALID, "subscription_id:", GATEWAY),
    ("id-letters", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id="abc"), INVALID, "subscription_id:", GATEWAY),
    ("id-zero", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id="0"), INVALID, "subscription_id:", GATEWAY),
    ("id-negative", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id="-1"), INVALID, "subscription_id:", GATEWAY),
    ("id-past-bigint", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id=str(2**63)), INVALID, "subscription_id:", GATEWAY),
    ("id-10KB", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id=BIG_DIGITS), INVALID, "subscription_id:", GATEWAY),
    ("unknown", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.alice, subscription_id="999999999"), NOT_FOUND, "subscription_id:", GATEWAY),
    ("other-users", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id=c.bob, subscription_id=c.dual_sub), NOT_FOUND, "subscription_id:", GATEWAY),
    ("user-space", "GetDualSubscription", lambda c: du.GetDualSubscriptionRequest(user_id="a b", subscription_id=c.dual_sub), INVALID, "user_id:", GATEWAY),
    ("gateway-no-user", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("plan-space", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=c.alice, plan_id="a b"), INVALID, "plan_id:", GATEWAY),
    ("status-unknown", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=c.alice, status=9), INVALID, "status:", GATEWAY),
    ("page-size-1001", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-garbage", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=c.alice, page_token="garbage"), INVALID, "page_token:", GATEWAY),
    ("token-other-list", "ListDualSubscriptions", lambda c: du.ListDualSubscriptionsRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"s:1").decode()), INVALID, "page_token:", GATEWAY),
    ("unknown-plan", "SubscribeDual", lambda c: dual_sub(c, plan_id="no-such-plan"), NOT_FOUND, "plan_id:", GATEWAY),
    ("too-precise", "SubscribeDual", lambda c: dual_sub(c, amount=TOO_PRECISE_BTC), INVALID, "amount:", GATEWAY),
    ("below-minimum", "SubscribeDual", lambda c: dual_sub(c, amount="0.009"), PRECONDITION, "minimum", GATEWAY),
    ("over-per-user-maximum", "SubscribeDual", lambda c: dual_sub(c, user_id=c.alice, amount="0.6"), PRECONDITION, "per-user maximum", GATEWAY),
    ("over-quota", "SubscribeDual", lambda c: dual_sub(c, amount="0.8"), PRECONDITION, "quota", GATEWAY),
    ("insufficient", "SubscribeDual", lambda c: dual_sub(c, user_id=c.poor, amount="0.5"), PRECONDITION, "insufficient funds", GATEWAY),
    ("order-reused", "SubscribeDual", lambda c: dual_sub(c, user_id=c.alice, client_order_id=c.keys["SubscribeDual"], amount="0.4"), EXISTS, "client_order_id:", GATEWAY),
    ("operator", "SubscribeDual", lambda c: dual_sub(c), DENIED, "SubscribeDual", OPERATOR),
    ("until-missing", "SettleDualPlans", lambda c: du.SettleDualPlansRequest(), INVALID, "until:", SERVICE),
    ("until-nanos", "SettleDualPlans", lambda c: du.SettleDualPlansRequest(until=Timestamp(seconds=3600, nanos=1)), INVALID, "until:", SERVICE),
    ("until-out-of-range", "SettleDualPlans", lambda c: du.SettleDualPlansRequest(until=ts(10**15)), INVALID, "until:", SERVICE),
    ("until-future", "SettleDualPlans", lambda c: du.SettleDualPlansRequest(until=ts((_NOW_HOUR + 72) * 3600)), PRECONDITION, "until:", SERVICE),
    ("operator", "SettleDualPlans", lambda c: du.SettleDualPlansRequest(until=ts(3600)), DENIED, "SettleDualPlans", OPERATOR),
]
for _n, _m, _b, _code, _frag, _tok in _DUAL:
    row(_n, "dual", _m, _b, _code, _frag, _tok)

# ---- LeverageService ----


def lev_product(c: Ctx, **fields: Any) -> lv.CreateLeverageProductRequest:
    base: dict[str, Any] = dict(
        idempotency_key=unique(), product_id=unique("lp"), pair="BTC/USDT", max_leverage="20", fee_rate="0.005", min_principal="10",
        max_principal="1000",
    )
    return lv.CreateLeverageProductRequest(**{**base, **fields})


def lev_quote(c: Ctx, **fields: Any) -> lv.RequestLeverageQuoteRequest:
    base: dict[str, Any] = dict(
        idempotency_key=unique(), user_id=c.lev_user, product_id=c.lev_product, direction=lv.LEVERAGE_DIRECTION_LONG, leverage="5", principal="20",
        maturity=ts(c.lev_maturity),
    )
    return lv.RequestLeverageQuoteRequest(**{**base, **fields})


def _lev_without(request: Any, field_name: str) -> Any:
    request.ClearField(field_name)
    return request


_LEV: list[tuple[str, str, Build, grpc.StatusCode, str, tuple]] = [
    # CreateLeverageProduct
    ("key-empty", "CreateLeverageProduct", lambda c: lev_product(c, idempotency_key=""), INVALID, "idempotency_key:", OPERATOR),
    ("key-10KB", "CreateLeverageProduct", lambda c: lev_product(c, idempotency_key=BIG), INVALID, "idempotency_key:", OPERATOR),
    ("id-empty", "CreateLeverageProduct", lambda c: lev_product(c, product_id=""), INVALID, "product_id:", OPERATOR),
    ("id-space", "CreateLeverageProduct", lambda c: lev_product(c, product_id="a b"), INVALID, "product_id:", OPERATOR),
    ("id-10KB", "CreateLeverageProduct", lambda c: lev_product(c, product_id=BIG), INVALID, "product_id:", OPERATOR),
    ("pair-empty", "CreateLeverageProduct", lambda c: lev_product(c, pair=""), INVALID, "pair:", OPERATOR),
    ("pair-lower", "CreateLeverageProduct", lambda c: lev_product(c, pair="btc/usdt"), INVALID, "pair:", OPERATOR),
    ("pair-unknown", "CreateLeverageProduct", lambda c: lev_product(c, pair="NOPE/USDT"), INVALID, "pair:", OPERATOR),
    ("pair-same", "CreateLeverageProduct", lambda c: lev_product(c, pair="BTC/BTC"), INVALID, "pair:", OPERATOR),
    ("leverage-below-1", "CreateLeverageProduct", lambda c: lev_product(c, max_leverage="0.5"), INVALID, "max_leverage:", OPERATOR),
    ("leverage-over-100", "CreateLeverageProduct", lambda c: lev_product(c, max_leverage="100.01"), INVALID, "max_leverage:", OPERATOR),
    ("leverage-too-precise", "CreateLeverageProduct", lambda c: lev_product(c, max_leverage="2.125"), INVALID, "max_leverage:", OPERATOR),
    ("leverage-empty", "CreateLeverageProduct", lambda c: lev_product(c, max_leverage=""), INVALID, "max_leverage:", OPERATOR),
    ("fee-over-5pct", "CreateLeverageProduct", lambda c: lev_product(c, fee_rate="0.05001"), INVALID, "fee_rate:", OPERATOR),
    ("fee-negative", "CreateLeverageProduct", lambda c: lev_product(c, fee_rate="-0.01"), INVALID, "fee_rate:", OPERATOR),
    ("fee-exponent", "CreateLeverageProduct", lambda c: lev_product(c, fee_rate="1e-3"), INVALID, "fee_rate:", OPERATOR),
    ("fee-too-precise", "CreateLeverageProduct", lambda c: lev_product(c, fee_rate="0.0000001"), INVALID, "fee_rate:", OPERATOR),
    ("min-too-precise", "CreateLeverageProduct", lambda c: lev_product(c, min_principal=TOO_PRECISE_USDT), INVALID, "min_principal:", OPERATOR),
    ("max-below-min", "CreateLeverageProduct", lambda c: lev_product(c, min_principal="10", max_principal="5"), INVALID, "max_principal:", OPERATOR),
    ("term-too-long", "CreateLeverageProduct", lambda c: lev_product(c, max_term_hours=9000), INVALID, "max_term_hours:", OPERATOR),
    ("window-too-short", "CreateLeverageProduct", lambda c: lev_product(c, window_seconds=10), INVALID, "window_seconds:", OPERATOR),
    ("window-too-long", "CreateLeverageProduct", lambda c: lev_product(c, window_seconds=100_000), INVALID, "window_seconds:", OPERATOR),
    ("exists", "CreateLeverageProduct", lambda c: lev_product(c, product_id=c.lev_product), EXISTS, "product_id:", OPERATOR),
    ("key-reused", "CreateLeverageProduct", lambda c: lev_product(c, idempotency_key=c.keys["CreateLeverageProduct"]), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "CreateLeverageProduct", lambda c: lev_product(c), DENIED, "CreateLeverageProduct", GATEWAY),
    # queries
    ("id-empty", "GetLeverageProduct", lambda c: lv.GetLeverageProductRequest(), INVALID, "product_id:", GATEWAY),
    ("id-space", "GetLeverageProduct", lambda c: lv.GetLeverageProductRequest(product_id="a b"), INVALID, "product_id:", GATEWAY),
    ("unknown", "GetLeverageProduct", lambda c: lv.GetLeverageProductRequest(product_id="no-such-product"), NOT_FOUND, "product_id:", GATEWAY),
    ("pair-bad", "ListLeverageProducts", lambda c: lv.ListLeverageProductsRequest(pair="BTCUSDT"), INVALID, "pair:", GATEWAY),
    ("pair-10KB", "ListLeverageProducts", lambda c: lv.ListLeverageProductsRequest(pair=BIG), INVALID, "pair:", OPERATOR),
    ("gateway-no-user", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(position_id=c.lev_position), INVALID, "user_id:", GATEWAY),
    ("id-empty", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.lev_user), INVALID, "position_id:", GATEWAY),
    ("id-letters", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.lev_user, position_id="abc"), INVALID, "position_id:", GATEWAY),
    ("id-zero", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.lev_user, position_id="0"), INVALID, "position_id:", GATEWAY),
    ("id-past-bigint", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.lev_user, position_id=str(2**63)), INVALID, "position_id:", SERVICE),
    ("unknown", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.lev_user, position_id="999999999"), NOT_FOUND, "position_id:", GATEWAY),
    ("other-users", "GetLeveragePosition", lambda c: lv.GetLeveragePositionRequest(user_id=c.bob, position_id=c.lev_position), NOT_FOUND, "position_id:", GATEWAY),
    ("gateway-no-user", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("product-space", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(user_id=c.lev_user, product_id="a b"), INVALID, "product_id:", GATEWAY),
    ("status-unknown", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(user_id=c.lev_user, status=9), INVALID, "status:", GATEWAY),
    ("page-size-1001", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(user_id=c.lev_user, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-other-list", "ListLeveragePositions", lambda c: lv.ListLeveragePositionsRequest(user_id=c.lev_user, page_token=base64.urlsafe_b64encode(b"ds:1").decode()), INVALID, "page_token:", GATEWAY),
    # RequestLeverageQuote
    ("key-empty", "RequestLeverageQuote", lambda c: lev_quote(c, idempotency_key=""), INVALID, "idempotency_key:", GATEWAY),
    ("user-empty", "RequestLeverageQuote", lambda c: lev_quote(c, user_id=""), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "RequestLeverageQuote", lambda c: lev_quote(c, user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("product-unknown", "RequestLeverageQuote", lambda c: lev_quote(c, product_id="no-such-product"), NOT_FOUND, "product_id:", GATEWAY),
    ("direction-missing", "RequestLeverageQuote", lambda c: lev_quote(c, direction=0), INVALID, "direction:", GATEWAY),
    ("direction-unknown", "RequestLeverageQuote", lambda c: lev_quote(c, direction=9), INVALID, "direction:", GATEWAY),
    ("leverage-over-maximum", "RequestLeverageQuote", lambda c: lev_quote(c, leverage="20.01"), INVALID, "leverage:", GATEWAY),
    ("leverage-below-1", "RequestLeverageQuote", lambda c: lev_quote(c, leverage="0.99"), INVALID, "leverage:", GATEWAY),
    ("leverage-too-precise", "RequestLeverageQuote", lambda c: lev_quote(c, leverage="2.001"), INVALID, "leverage:", GATEWAY),
    ("leverage-negative", "RequestLeverageQuote", lambda c: lev_quote(c, leverage="-5"), INVALID, "leverage:", GATEWAY),
    ("principal-too-precise", "RequestLeverageQuote", lambda c: lev_quote(c, principal=TOO_PRECISE_USDT), INVALID, "principal:", GATEWAY),
    ("principal-below-minimum", "RequestLeverageQuote", lambda c: lev_quote(c, principal="9.99"), PRECONDITION, "minimum", GATEWAY),
    ("principal-over-maximum", "RequestLeverageQuote", lambda c: lev_quote(c, principal="50.000001"), PRECONDITION, "maximum", GATEWAY),
    ("maturity-missing", "RequestLeverageQuote", lambda c: _lev_without(lev_quote(c), "maturity"), INVALID, "maturity:", GATEWAY),
    ("maturity-not-full-hour", "RequestLeverageQuote", lambda c: lev_quote(c, maturity=ts(c.lev_maturity + 60)), INVALID, "maturity:", GATEWAY),
    ("maturity-nanos", "RequestLeverageQuote", lambda c: lev_quote(c, maturity=Timestamp(seconds=c.lev_maturity, nanos=1)), INVALID, "maturity:", GATEWAY),
    ("maturity-past", "RequestLeverageQuote", lambda c: lev_quote(c, maturity=ts(c.lev_maturity - 72 * 3600)), INVALID, "maturity:", GATEWAY),
    ("maturity-too-far", "RequestLeverageQuote", lambda c: lev_quote(c, maturity=ts(c.lev_maturity + 720 * 3600)), INVALID, "maturity:", GATEWAY),
    ("maturity-out-of-range", "RequestLeverageQuote", lambda c: lev_quote(c, maturity=ts(10**15)), INVALID, "maturity:", GATEWAY),
    ("key-reused", "RequestLeverageQuote", lambda c: lev_quote(c, idempotency_key=c.keys["RequestLeverageQuote"], leverage="6"), EXISTS, "idempotency_key:", GATEWAY),
    ("operator", "RequestLeverageQuote", lambda c: lev_quote(c), DENIED, "RequestLeverageQuote", OPERATOR),
    # SubscribeLeverage
    ("user-empty", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(quote_id=c.lev_quote), INVALID, "user_id:", GATEWAY),
    ("quote-empty", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user), INVALID, "quote_id:", GATEWAY),
    ("quote-space", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id="a b"), INVALID, "quote_id:", GATEWAY),
    ("quote-10KB", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id=BIG), INVALID, "quote_id:", GATEWAY),
    ("quote-unknown", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id="no-such-quote"), NOT_FOUND, "quote_id:", GATEWAY),
    ("other-users-quote", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.bob, quote_id=c.lev_poor_quote), NOT_FOUND, "quote_id:", GATEWAY),
    ("expired", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id=c.lev_expired), PRECONDITION, "expired", GATEWAY),
    ("insufficient", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.poor, quote_id=c.lev_poor_quote), PRECONDITION, "insufficient funds", GATEWAY),
    ("operator", "SubscribeLeverage", lambda c: lv.SubscribeLeverageRequest(user_id=c.lev_user, quote_id=c.lev_quote), DENIED, "SubscribeLeverage", OPERATOR),
    # RedeemLeverageEarly
    ("key-empty", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(user_id=c.lev_user, position_id=c.lev_position), INVALID, "idempotency_key:", GATEWAY),
    ("user-empty", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), position_id=c.lev_position), INVALID, "user_id:", GATEWAY),
    ("id-letters", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=c.lev_user, position_id="x1"), INVALID, "position_id:", GATEWAY),
    ("unknown", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=c.lev_user, position_id="999999999"), NOT_FOUND, "position_id:", GATEWAY),
    ("other-users", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=c.bob, position_id=c.lev_position), NOT_FOUND, "position_id:", GATEWAY),
    ("already-settled", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=c.lev_user, position_id=c.lev_redeemed), PRECONDITION, "only an open position", GATEWAY),
    ("key-reused", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=c.keys["RedeemLeverageEarly"], user_id=c.lev_user, position_id=c.lev_position), EXISTS, "idempotency_key:", GATEWAY),
    ("operator", "RedeemLeverageEarly", lambda c: lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=c.lev_user, position_id=c.lev_position), DENIED, "RedeemLeverageEarly", OPERATOR),
    # SettleLeveragePositions
    ("until-missing", "SettleLeveragePositions", lambda c: lv.SettleLeveragePositionsRequest(), INVALID, "until:", SERVICE),
    ("until-nanos", "SettleLeveragePositions", lambda c: lv.SettleLeveragePositionsRequest(until=Timestamp(seconds=3600, nanos=1)), INVALID, "until:", SERVICE),
    ("until-out-of-range", "SettleLeveragePositions", lambda c: lv.SettleLeveragePositionsRequest(until=ts(10**15)), INVALID, "until:", SERVICE),
    ("until-future", "SettleLeveragePositions", lambda c: lv.SettleLeveragePositionsRequest(until=ts((_NOW_HOUR + 72) * 3600)), PRECONDITION, "until:", SERVICE),
    ("operator", "SettleLeveragePositions", lambda c: lv.SettleLeveragePositionsRequest(until=ts(3600)), DENIED, "SettleLeveragePositions", OPERATOR),
]
for _name, _amount in BAD_AMOUNTS:
    _LEV.append((f"principal-{_name}", "RequestLeverageQuote", lambda c, a=_amount: lev_quote(c, principal=a), INVALID, "principal:", GATEWAY))
    _LEV.append((f"min-{_name}", "CreateLeverageProduct", lambda c, a=_amount: lev_product(c, min_principal=a), INVALID, "min_principal:", OPERATOR))
for _n, _m, _b, _code, _frag, _tok in _LEV:
    row(_n, "lev", _m, _b, _code, _frag, _tok)


# ---- CandyDropService ----

def campaign_request(campaign_id: str, **fields: Any) -> cd.CreateCampaignRequest:
    """A valid campaign from the next hour for 24 hours; ``fields`` replace parts of it.

    Not from this hour: the clock may pass the hour between building the request and the service reading it, and a
    row expecting another field's error would get ``start_time: must not be before the current hour``."""
    hour = int(time.time()) // 3600 + 1
    base: dict[str, Any] = dict(
        idempotency_key=unique(), campaign_id=campaign_id, prize_asset="USDT", prize_pool="1000", pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA,
        start_time=ts(hour * 3600), end_time=ts((hour + 24) * 3600),
        tasks=[cd.CandyTask(task_id="spot", kind=cd.CANDY_TASK_KIND_SPOT_VOLUME, asset="USDT", threshold="100", candies=1, max_completions=5)],
    )
    base.update(fields)
    return cd.CreateCampaignRequest(**base)


def task(**fields: Any) -> cd.CandyTask:
    base: dict[str, Any] = dict(task_id="t", kind=cd.CANDY_TASK_KIND_DEPOSIT, asset="BTC", threshold="0.1", candies=1, max_completions=1)
    base.update(fields)
    return cd.CandyTask(**base)


_CD_FIXED = cd.PRIZE_POOL_KIND_FIXED_PER_CANDY
_CD = [
    # CreateCampaign
    ("key-empty", "CreateCampaign", lambda c: campaign_request(unique("cmp"), idempotency_key=""), INVALID, "idempotency_key:", OPERATOR),
    ("id-empty", "CreateCampaign", lambda c: campaign_request(""), INVALID, "campaign_id:", OPERATOR),
    ("id-10KB", "CreateCampaign", lambda c: campaign_request(BIG), INVALID, "campaign_id:", OPERATOR),
    ("id-49-chars", "CreateCampaign", lambda c: campaign_request("c" * 49), INVALID, "campaign_id:", OPERATOR),
    ("id-space", "CreateCampaign", lambda c: campaign_request("a b"), INVALID, "campaign_id:", OPERATOR),
    ("asset-empty", "CreateCampaign", lambda c: campaign_request(unique("cmp"), prize_asset=""), INVALID, "prize_asset:", OPERATOR),
    ("asset-unknown", "CreateCampaign", lambda c: campaign_request(unique("cmp"), prize_asset="XYZ"), INVALID, "prize_asset:", OPERATOR),
    ("pool-too-precise", "CreateCampaign", lambda c: campaign_request(unique("cmp"), prize_pool=TOO_PRECISE_USDT), INVALID, "prize_pool:", OPERATOR),
    ("kind-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), pool_kind=0), INVALID, "pool_kind:", OPERATOR),
    ("kind-unknown", "CreateCampaign", lambda c: campaign_request(unique("cmp"), pool_kind=99), INVALID, "pool_kind:", OPERATOR),
    ("fixed-without-prize", "CreateCampaign", lambda c: campaign_request(unique("cmp"), pool_kind=_CD_FIXED), INVALID, "prize_per_candy:", OPERATOR),
    ("fixed-prize-zero", "CreateCampaign", lambda c: campaign_request(unique("cmp"), pool_kind=_CD_FIXED, prize_per_candy="0"), INVALID, "prize_per_candy:", OPERATOR),
    ("pro-rata-with-prize", "CreateCampaign", lambda c: campaign_request(unique("cmp"), prize_per_candy="1"), INVALID, "prize_per_candy:", OPERATOR),
    ("cap-negative", "CreateCampaign", lambda c: campaign_request(unique("cmp"), per_user_cap="-5"), INVALID, "per_user_cap:", OPERATOR),
    ("cap-too-precise", "CreateCampaign", lambda c: campaign_request(unique("cmp"), per_user_cap=TOO_PRECISE_USDT), INVALID, "per_user_cap:", OPERATOR),
    ("start-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=None), INVALID, "start_time:", OPERATOR),
    ("start-not-full-hour", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=ts((_NOW_HOUR + 1) * 3600 + 60)), INVALID, "start_time:", OPERATOR),
    ("start-nanos", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=Timestamp(seconds=(_NOW_HOUR + 1) * 3600, nanos=1)), INVALID, "start_time:", OPERATOR),
    ("start-year-10000", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=Timestamp(seconds=253402300800)), INVALID, "start_time:", OPERATOR),
    ("start-in-the-past", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=ts((_NOW_HOUR - 3) * 3600)), INVALID, "start_time:", OPERATOR),
    ("end-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), end_time=None), INVALID, "end_time:", OPERATOR),
    ("end-before-start", "CreateCampaign", lambda c: campaign_request(unique("cmp"), end_time=ts((_NOW_HOUR - 1) * 3600)), INVALID, "end_time:", OPERATOR),
    ("end-in-the-past", "CreateCampaign", lambda c: campaign_request(unique("cmp"), start_time=ts((_NOW_HOUR - 48) * 3600), end_time=ts((_NOW_HOUR - 24) * 3600)), INVALID, "end_time:", OPERATOR),
    ("longer-than-366-days", "CreateCampaign", lambda c: campaign_request(unique("cmp"), end_time=ts((_NOW_HOUR + 24 * 367) * 3600)), INVALID, "end_time:", OPERATOR),
    ("no-tasks", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[]), INVALID, "tasks:", OPERATOR),
    ("21-tasks", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(task_id=f"t{i}") for i in range(21)]), INVALID, "tasks:", OPERATOR),
    ("task-id-empty", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(task_id="")]), INVALID, "tasks[0].task_id:", OPERATOR),
    ("task-id-10KB", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(task_id=BIG)]), INVALID, "tasks[0].task_id:", OPERATOR),
    ("task-id-twice", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(), task()]), INVALID, "tasks[1].task_id:", OPERATOR),
    ("task-kind-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(kind=0)]), INVALID, "tasks[0].kind:", OPERATOR),
    ("task-kind-unknown", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(kind=42)]), INVALID, "tasks[0].kind:", OPERATOR),
    ("task-asset-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(asset="")]), INVALID, "tasks[0].asset:", OPERATOR),
    ("task-asset-unknown", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(asset="XYZ")]), INVALID, "tasks[0].asset:", OPERATOR),
    ("task-threshold-missing", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(threshold="")]), INVALID, "tasks[0].threshold:", OPERATOR),
    ("task-threshold-too-precise", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(threshold=TOO_PRECISE_BTC)]), INVALID, "tasks[0].threshold:", OPERATOR),
    ("task-candies-zero", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(candies=0)]), INVALID, "tasks[0].candies:", OPERATOR),
    ("task-candies-huge", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(candies=2**32 - 1)]), INVALID, "tasks[0].candies:", OPERATOR),
    ("task-completions-zero", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(max_completions=0)]), INVALID, "tasks[0].max_completions:", OPERATOR),
    ("first-deposit-twice", "CreateCampaign", lambda c: campaign_request(unique("cmp"), tasks=[task(kind=cd.CANDY_TASK_KIND_FIRST_DEPOSIT, max_completions=2)]), INVALID, "tasks[0].max_completions:", OPERATOR),
    ("exists", "CreateCampaign", lambda c: campaign_request(c.campaign), EXISTS, "campaign_id:", OPERATOR),
    ("key-reused", "CreateCampaign", lambda c: campaign_request(unique("cmp"), idempotency_key=c.keys["CreateCampaign"]), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "CreateCampaign", lambda c: campaign_request(unique("cmp")), DENIED, "CreateCampaign", GATEWAY),
    # Register
    ("key-empty", "Register", lambda c: cd.RegisterRequest(user_id=c.bob, campaign_id=c.campaign), INVALID, "idempotency_key:", GATEWAY),
    ("key-10KB", "Register", lambda c: cd.RegisterRequest(idempotency_key=BIG, user_id=c.bob, campaign_id=c.campaign), INVALID, "idempotency_key:", GATEWAY),
    ("user-empty", "Register", lambda c: cd.RegisterRequest(idempotency_key=unique(), campaign_id=c.campaign), INVALID, "user_id:", GATEWAY),
    ("user-space", "Register", lambda c: cd.RegisterRequest(idempotency_key=unique(), user_id="a b", campaign_id=c.campaign), INVALID, "user_id:", GATEWAY),
    ("campaign-empty", "Register", lambda c: cd.RegisterRequest(idempotency_key=unique(), user_id=c.bob), INVALID, "campaign_id:", GATEWAY),
    ("campaign-unknown", "Register", lambda c: cd.RegisterRequest(idempotency_key=unique(), user_id=c.bob, campaign_id="no-such-campaign"), NOT_FOUND, "campaign_id:", GATEWAY),
    ("key-reused", "Register", lambda c: cd.RegisterRequest(idempotency_key=c.keys["Register"], user_id=c.bob, campaign_id=c.campaign), EXISTS, "idempotency_key:", GATEWAY),
    ("operator", "Register", lambda c: cd.RegisterRequest(idempotency_key=unique(), user_id=c.bob, campaign_id=c.campaign), DENIED, "Register", OPERATOR),
    # Queries
    ("campaign-empty", "GetCampaign", lambda c: cd.GetCampaignRequest(), INVALID, "campaign_id:", GATEWAY),
    ("campaign-10KB", "GetCampaign", lambda c: cd.GetCampaignRequest(campaign_id=BIG), INVALID, "campaign_id:", GATEWAY),
    ("campaign-unknown", "GetCampaign", lambda c: cd.GetCampaignRequest(campaign_id="no-such-campaign"), NOT_FOUND, "campaign_id:", GATEWAY),
    ("status-unknown", "ListCampaigns", lambda c: cd.ListCampaignsRequest(status=77), INVALID, "status:", GATEWAY),
    ("page-size-max", "ListCampaigns", lambda c: cd.ListCampaignsRequest(page_size=2**32 - 1), INVALID, "page_size:", GATEWAY),
    ("token-garbage", "ListCampaigns", lambda c: cd.ListCampaignsRequest(page_token="%%%"), INVALID, "page_token:", GATEWAY),
    ("token-other-list", "ListCampaigns", lambda c: cd.ListCampaignsRequest(page_token=base64.urlsafe_b64encode(b"p:1").decode()), INVALID, "page_token:", GATEWAY),
    ("campaign-empty", "GetProgress", lambda c: cd.GetProgressRequest(user_id=c.alice), INVALID, "campaign_id:", GATEWAY),
    ("user-empty", "GetProgress", lambda c: cd.GetProgressRequest(campaign_id=c.campaign), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "GetProgress", lambda c: cd.GetProgressRequest(campaign_id=c.campaign, user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("campaign-unknown", "GetProgress", lambda c: cd.GetProgressRequest(campaign_id="no-such-campaign", user_id=c.alice), NOT_FOUND, "campaign_id:", GATEWAY),
    ("gateway-without-user", "ListPrizes", lambda c: cd.ListPrizesRequest(), INVALID, "user_id:", GATEWAY),
    ("campaign-bad", "ListPrizes", lambda c: cd.ListPrizesRequest(user_id=c.alice, campaign_id="a b"), INVALID, "campaign_id:", GATEWAY),
    ("page-size-max", "ListPrizes", lambda c: cd.ListPrizesRequest(user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-other-list", "ListPrizes", lambda c: cd.ListPrizesRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"c:1").decode()), INVALID, "page_token:", GATEWAY),
    ("token-past-bigint", "ListPrizes", lambda c: cd.ListPrizesRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"p:9223372036854775808").decode()), INVALID, "page_token:", OPERATOR),
    # DistributePrizes
    ("job-empty", "DistributePrizes", lambda c: cd.DistributePrizesRequest(period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("job-10KB", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job=BIG, period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("period-space", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job="j", period="a b", boundary_hour=1), INVALID, "period:", SERVICE),
    ("boundary-zero", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job="j", period="p"), INVALID, "boundary_hour:", SERVICE),
    ("boundary-negative", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job="j", period="p", boundary_hour=-3), INVALID, "boundary_hour:", SERVICE),
    ("boundary-future", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job="j", period="p", boundary_hour=_NOW_HOUR + 48), PRECONDITION, "boundary_hour:", SERVICE),
    ("operator", "DistributePrizes", lambda c: cd.DistributePrizesRequest(job="j", period="p", boundary_hour=1), DENIED, "DistributePrizes", OPERATOR),
]
for _name, _amount in BAD_AMOUNTS:
    _CD.append((f"pool-{_name}", "CreateCampaign", lambda c, a=_amount: campaign_request(unique("cmp"), prize_pool=a), INVALID, "prize_pool:", OPERATOR))
for _n, _m, _b, _code, _frag, _tok in _CD:
    row(_n, "cd", _m, _b, _code, _frag, _tok)


# ---- hodler ----


def airdrop_request(airdrop_id: str, **fields: Any) -> hd.CreateAirdropRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), airdrop_id=airdrop_id, hold_asset="GT", reward_asset="USDT", total="1000",
                                start_hour=_NOW_HOUR + 2, end_hour=_NOW_HOUR + 26, per_user_cap="500")
    return hd.CreateAirdropRequest(**{**base, **fields})


_HD: list[tuple[str, str, Build, grpc.StatusCode, str, tuple]] = [
    # CreateAirdrop
    ("key-empty", "CreateAirdrop", lambda c: airdrop_request(unique("air"), idempotency_key=""), INVALID, "idempotency_key:", OPERATOR),
    ("key-10KB", "CreateAirdrop", lambda c: airdrop_request(unique("air"), idempotency_key=BIG), INVALID, "idempotency_key:", OPERATOR),
    ("key-reused", "CreateAirdrop", lambda c: airdrop_request(unique("air"), idempotency_key=c.keys["CreateAirdrop"]), EXISTS, "idempotency_key:", OPERATOR),
    ("id-empty", "CreateAirdrop", lambda c: airdrop_request(""), INVALID, "airdrop_id:", OPERATOR),
    ("id-10KB", "CreateAirdrop", lambda c: airdrop_request(BIG), INVALID, "airdrop_id:", OPERATOR),
    ("id-space", "CreateAirdrop", lambda c: airdrop_request("a b"), INVALID, "airdrop_id:", OPERATOR),
    ("id-exists", "CreateAirdrop", lambda c: airdrop_request(c.airdrop), EXISTS, "airdrop_id:", OPERATOR),
    ("hold-asset-empty", "CreateAirdrop", lambda c: airdrop_request(unique("air"), hold_asset=""), INVALID, "hold_asset:", OPERATOR),
    ("hold-asset-unknown", "CreateAirdrop", lambda c: airdrop_request(unique("air"), hold_asset="NOPE"), INVALID, "hold_asset:", OPERATOR),
    ("hold-asset-10KB", "CreateAirdrop", lambda c: airdrop_request(unique("air"), hold_asset=BIG), INVALID, "hold_asset:", OPERATOR),
    ("reward-asset-empty", "CreateAirdrop", lambda c: airdrop_request(unique("air"), reward_asset=""), INVALID, "reward_asset:", OPERATOR),
    ("reward-asset-lower", "CreateAirdrop", lambda c: airdrop_request(unique("air"), reward_asset="usdt"), INVALID, "reward_asset:", OPERATOR),
    ("total-too-precise", "CreateAirdrop", lambda c: airdrop_request(unique("air"), total=TOO_PRECISE_USDT), INVALID, "total:", OPERATOR),
    ("start-zero", "CreateAirdrop", lambda c: airdrop_request(unique("air"), start_hour=0), INVALID, "start_hour:", OPERATOR),
    ("start-negative", "CreateAirdrop", lambda c: airdrop_request(unique("air"), start_hour=-5), INVALID, "start_hour:", OPERATOR),
    ("start-this-hour", "CreateAirdrop", lambda c: airdrop_request(unique("air"), start_hour=_NOW_HOUR), INVALID, "start_hour:", OPERATOR),
    ("start-in-the-past", "CreateAirdrop", lambda c: airdrop_request(unique("air"), start_hour=_NOW_HOUR - 48, end_hour=_NOW_HOUR - 24), INVALID, "start_hour:", OPERATOR),
    ("end-missing", "CreateAirdrop", lambda c: airdrop_request(unique("air"), end_hour=0), INVALID, "end_hour:", OPERATOR),
    ("end-equal-start", "CreateAirdrop", lambda c: airdrop_request(unique("air"), end_hour=_NOW_HOUR + 2), INVALID, "end_hour:", OPERATOR),
    ("longer-than-366-days", "CreateAirdrop", lambda c: airdrop_request(unique("air"), end_hour=_NOW_HOUR + 3 + 24 * 366), INVALID, "end_hour:", OPERATOR),
    ("end-int64-max", "CreateAirdrop", lambda c: airdrop_request(unique("air"), end_hour=2**63 - 1), INVALID, "end_hour:", OPERATOR),
    ("min-too-precise", "CreateAirdrop", lambda c: airdrop_request(unique("air"), min_average=TOO_PRECISE_BTC), INVALID, "min_average:", OPERATOR),
    ("cap-below-min", "CreateAirdrop", lambda c: airdrop_request(unique("air"), min_average="10", per_user_cap="5"), INVALID, "per_user_cap:", OPERATOR),
    ("cap-zero", "CreateAirdrop", lambda c: airdrop_request(unique("air"), per_user_cap="0"), INVALID, "per_user_cap:", OPERATOR),
    ("gateway", "CreateAirdrop", lambda c: airdrop_request(unique("air")), DENIED, "CreateAirdrop", GATEWAY),
    # queries
    ("airdrop-empty", "GetAirdrop", lambda c: hd.GetAirdropRequest(), INVALID, "airdrop_id:", GATEWAY),
    ("airdrop-10KB", "GetAirdrop", lambda c: hd.GetAirdropRequest(airdrop_id=BIG), INVALID, "airdrop_id:", GATEWAY),
    ("airdrop-unknown", "GetAirdrop", lambda c: hd.GetAirdropRequest(airdrop_id="no-such-airdrop"), NOT_FOUND, "airdrop_id:", GATEWAY),
    ("status-unknown", "ListAirdrops", lambda c: hd.ListAirdropsRequest(status=77), INVALID, "status:", GATEWAY),
    ("page-size-max", "ListAirdrops", lambda c: hd.ListAirdropsRequest(page_size=2**32 - 1), INVALID, "page_size:", GATEWAY),
    ("token-garbage", "ListAirdrops", lambda c: hd.ListAirdropsRequest(page_token="%%%"), INVALID, "page_token:", GATEWAY),
    ("token-other-list", "ListAirdrops", lambda c: hd.ListAirdropsRequest(page_token=base64.urlsafe_b64encode(b"r:1").decode()), INVALID, "page_token:", GATEWAY),
    ("airdrop-empty", "GetUserHolding", lambda c: hd.GetUserHoldingRequest(user_id=c.alice), INVALID, "airdrop_id:", GATEWAY),
    ("user-empty", "GetUserHolding", lambda c: hd.GetUserHoldingRequest(airdrop_id=c.airdrop), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "GetUserHolding", lambda c: hd.GetUserHoldingRequest(airdrop_id=c.airdrop, user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("airdrop-unknown", "GetUserHolding", lambda c: hd.GetUserHoldingRequest(airdrop_id="no-such-airdrop", user_id=c.alice), NOT_FOUND, "airdrop_id:", GATEWAY),
    ("airdrop-empty", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(user_id=c.alice), INVALID, "airdrop_id:", GATEWAY),
    ("user-empty", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(airdrop_id=c.airdrop), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(airdrop_id=c.airdrop, user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("airdrop-unknown", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(airdrop_id="no-such-airdrop", user_id=c.alice), NOT_FOUND, "airdrop_id:", GATEWAY),
    ("page-size-max", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(airdrop_id=c.airdrop, user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-other-list", "ListHourlyAverages", lambda c: hd.ListHourlyAveragesRequest(airdrop_id=c.airdrop, user_id=c.alice, page_token=base64.urlsafe_b64encode(b"r:1").decode()), INVALID, "page_token:", GATEWAY),
    ("airdrop-empty", "GetEstimate", lambda c: hd.GetEstimateRequest(), INVALID, "airdrop_id:", GATEWAY),
    ("airdrop-space", "GetEstimate", lambda c: hd.GetEstimateRequest(airdrop_id="a b"), INVALID, "airdrop_id:", GATEWAY),
    ("airdrop-unknown", "GetEstimate", lambda c: hd.GetEstimateRequest(airdrop_id="no-such-airdrop"), NOT_FOUND, "airdrop_id:", GATEWAY),
    ("gateway-without-user", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(), INVALID, "user_id:", GATEWAY),
    ("user-space", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(user_id="a b"), INVALID, "user_id:", GATEWAY),
    ("airdrop-bad", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(user_id=c.alice, airdrop_id="a b"), INVALID, "airdrop_id:", GATEWAY),
    ("page-size-max", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(user_id=c.alice, page_size=1001), INVALID, "page_size:", GATEWAY),
    ("token-other-list", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(user_id=c.alice, page_token=base64.urlsafe_b64encode(b"a:1").decode()), INVALID, "page_token:", GATEWAY),
    ("token-past-bigint", "ListAirdropRewards", lambda c: hd.ListAirdropRewardsRequest(page_token=base64.urlsafe_b64encode(b"r:9223372036854775808").decode()), INVALID, "page_token:", OPERATOR),
    # DistributeAirdrops
    ("job-empty", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("job-10KB", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job=BIG, period="p", boundary_hour=1), INVALID, "job:", SERVICE),
    ("period-space", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job="j", period="a b", boundary_hour=1), INVALID, "period:", SERVICE),
    ("boundary-zero", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job="j", period="p"), INVALID, "boundary_hour:", SERVICE),
    ("boundary-negative", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job="j", period="p", boundary_hour=-3), INVALID, "boundary_hour:", SERVICE),
    ("boundary-future", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job="j", period="p", boundary_hour=_NOW_HOUR + 48), PRECONDITION, "boundary_hour:", SERVICE),
    ("operator", "DistributeAirdrops", lambda c: hd.DistributeAirdropsRequest(job="j", period="p", boundary_hour=1), DENIED, "DistributeAirdrops", OPERATOR),
]
for _name, _amount in BAD_AMOUNTS:
    _HD.append((f"total-{_name}", "CreateAirdrop", lambda c, a=_amount: airdrop_request(unique("air"), total=a), INVALID, "total:", OPERATOR))
    if _name not in ("zero", "zero-fraction", "empty"):  # a zero minimum is allowed; empty: the default ("1")
        _HD.append((f"min-{_name}", "CreateAirdrop", lambda c, a=_amount: airdrop_request(unique("air"), min_average=a), INVALID, "min_average:", OPERATOR))
    if _name != "empty":  # empty: no cap
        _HD.append((f"cap-{_name}", "CreateAirdrop", lambda c, a=_amount: airdrop_request(unique("air"), per_user_cap=a), INVALID, "per_user_cap:", OPERATOR))
for _n, _m, _b, _code, _frag, _tok in _HD:
    row(_n, "hd", _m, _b, _code, _frag, _tok)


def borrow(c: Ctx, **fields: Any) -> lnp.BorrowRequest:
    base: dict[str, Any] = dict(idempotency_key=unique(), user_id=c.loan_user, loan_asset="USDT", amount="100",
                                collateral=[lnp.LoanCollateralAmount(asset="BTC", amount="0.01")], term=lnp.LOAN_TERM_FLEXIBLE)
    return lnp.BorrowRequest(**{**base, **fields})


def loan_coll(c: Ctx, method: str, asset: str = "BTC", amount: str = "0.001", **fields: Any) -> Any:
    cls = lnp.AddLoanCollateralRequest if method == "AddLoanCollateral" else lnp.RemoveLoanCollateralRequest
    base: dict[str, Any] = dict(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id, collateral=lnp.LoanCollateralAmount(asset=asset, amount=amount))
    return cls(**{**base, **fields})


def _btc(amount: str) -> list[Any]:
    return [lnp.LoanCollateralAmount(asset="BTC", amount=amount)]


_LOAN: list[tuple[str, str, Build, grpc.StatusCode, str, tuple]] = [
    # configuration
    ("key-empty", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(asset=lnp.LoanAsset(asset="USDT", hourly_rate="0.00001", min_borrow="1", max_borrow="2")), INVALID, "idempotency_key:", OPERATOR),
    ("asset-unknown", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="NOPE", hourly_rate="0", min_borrow="1", max_borrow="2")), INVALID, "asset.asset:", OPERATOR),
    ("rate-negative", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="-0.1", min_borrow="1", max_borrow="2")), INVALID, "asset.hourly_rate:", OPERATOR),
    ("rate-over-1pct", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="0.02", min_borrow="1", max_borrow="2")), INVALID, "asset.hourly_rate:", OPERATOR),
    ("rate-too-precise", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="0.00000000001", min_borrow="1", max_borrow="2")), INVALID, "asset.hourly_rate:", OPERATOR),
    ("fixed-exponent", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="0", fixed_7_days_hourly_rate="1e-5", min_borrow="1", max_borrow="2")), INVALID, "asset.fixed_7_days_hourly_rate:", OPERATOR),
    ("min-too-precise", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="0", min_borrow=TOO_PRECISE_USDT, max_borrow="2")), INVALID, "asset.min_borrow:", OPERATOR),
    ("max-below-min", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=unique(), asset=lnp.LoanAsset(asset="USDT", hourly_rate="0", min_borrow="5", max_borrow="2")), INVALID, "asset.max_borrow:", OPERATOR),
    ("key-reused", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(idempotency_key=c.keys["SetLoanAsset"], asset=lnp.LoanAsset(asset="USDT", hourly_rate="0.00001", min_borrow="1", max_borrow="2")), EXISTS, "idempotency_key:", OPERATOR),
    ("gateway", "SetLoanAsset", lambda c: lnp.SetLoanAssetRequest(), DENIED, "SetLoanAsset", GATEWAY),
    ("discount-over-1", "SetLoanCollateralAsset", lambda c: lnp.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=lnp.LoanCollateralAsset(asset="ETH", discount="1.01")), INVALID, "collateral.discount:", OPERATOR),
    ("discount-zero", "SetLoanCollateralAsset", lambda c: lnp.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=lnp.LoanCollateralAsset(asset="ETH", discount="0")), INVALID, "collateral.discount:", OPERATOR),
    ("discount-too-precise", "SetLoanCollateralAsset", lambda c: lnp.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=lnp.LoanCollateralAsset(asset="ETH", discount="0.12345")), INVALID, "collateral.discount:", OPERATOR),
    ("asset-unknown", "SetLoanCollateralAsset", lambda c: lnp.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=lnp.LoanCollateralAsset(asset="NOPE", discount="0.5")), INVALID, "collateral.asset:", OPERATOR),
    ("service", "SetLoanCollateralAsset", lambda c: lnp.SetLoanCollateralAssetRequest(), DENIED, "SetLoanCollateralAsset", SERVICE),
    # queries
    ("no-token", "ListLoanAssets", lambda c: lnp.ListLoanAssetsRequest(), UNAUTHENTICATED, "", NO_TOKEN),
    ("gateway-no-user", "GetLoan", lambda c: lnp.GetLoanRequest(loan_id=c.loan_id), INVALID, "user_id:", GATEWAY),
    ("id-empty", "GetLoan", lambda c: lnp.GetLoanRequest(user_id=c.loan_user), INVALID, "loan_id:", GATEWAY),
    ("id-bad", "GetLoan", lambda c: lnp.GetLoanRequest(user_id=c.loan_user, loan_id="ln-XYZ"), INVALID, "loan_id:", GATEWAY),
    ("id-10KB", "GetLoan", lambda c: lnp.GetLoanRequest(user_id=c.loan_user, loan_id=BIG), INVALID, "loan_id:", OPERATOR),
    ("unknown", "GetLoan", lambda c: lnp.GetLoanRequest(user_id=c.loan_user, loan_id="ln-00000000000000000000"), NOT_FOUND, "loan_id:", GATEWAY),
    ("other-users", "GetLoan", lambda c: lnp.GetLoanRequest(user_id=c.bob, loan_id=c.loan_id), NOT_FOUND, "loan_id:", GATEWAY),
    ("gateway-no-user", "ListLoans", lambda c: lnp.ListLoansRequest(), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "ListLoans", lambda c: lnp.ListLoansRequest(user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("status-unknown", "ListLoans", lambda c: lnp.ListLoansRequest(user_id=c.loan_user, status=9), INVALID, "status:", GATEWAY),
    ("token-bad", "ListLoans", lambda c: lnp.ListLoansRequest(user_id=c.loan_user, page_token="%%%"), INVALID, "page_token:", GATEWAY),
    ("id-empty", "ListLoanInterest", lambda c: lnp.ListLoanInterestRequest(user_id=c.loan_user), INVALID, "loan_id:", GATEWAY),
    ("other-users", "ListLoanInterest", lambda c: lnp.ListLoanInterestRequest(user_id=c.bob, loan_id=c.loan_id), NOT_FOUND, "loan_id:", GATEWAY),
    ("id-bad", "ListLoanLtvHistory", lambda c: lnp.ListLoanLtvHistoryRequest(user_id=c.loan_user, loan_id="1"), INVALID, "loan_id:", GATEWAY),
    ("gateway-no-user", "ListLoanLtvHistory", lambda c: lnp.ListLoanLtvHistoryRequest(loan_id=c.loan_id), INVALID, "user_id:", GATEWAY),
    ("kind-unknown", "ListLoanEvents", lambda c: lnp.ListLoanEventsRequest(user_id=c.loan_user, loan_id=c.loan_id, kind=9), INVALID, "kind:", GATEWAY),
    ("unknown", "ListLoanEvents", lambda c: lnp.ListLoanEventsRequest(user_id=c.loan_user, loan_id="ln-00000000000000000000"), NOT_FOUND, "loan_id:", GATEWAY),
    # Borrow
    ("key-empty", "Borrow", lambda c: borrow(c, idempotency_key=""), INVALID, "idempotency_key:", GATEWAY),
    ("key-10KB", "Borrow", lambda c: borrow(c, idempotency_key=BIG), INVALID, "idempotency_key:", GATEWAY),
    ("user-empty", "Borrow", lambda c: borrow(c, user_id=""), INVALID, "user_id:", GATEWAY),
    ("user-10KB", "Borrow", lambda c: borrow(c, user_id=BIG), INVALID, "user_id:", GATEWAY),
    ("asset-empty", "Borrow", lambda c: borrow(c, loan_asset=""), INVALID, "loan_asset:", GATEWAY),
    ("asset-unknown", "Borrow", lambda c: borrow(c, loan_asset="NOPE"), INVALID, "loan_asset:", GATEWAY),
    ("amount-too-precise", "Borrow", lambda c: borrow(c, amount=TOO_PRECISE_USDT), INVALID, "amount:", GATEWAY),
    ("term-missing", "Borrow", lambda c: borrow(c, term=0), INVALID, "term:", GATEWAY),
    ("term-unknown", "Borrow", lambda c: borrow(c, term=9), INVALID, "term:", GATEWAY),
    ("collateral-none", "Borrow", lambda c: borrow(c, collateral=[]), INVALID, "collateral:", GATEWAY),
    ("collateral-six", "Borrow", lambda c: borrow(c, collateral=[lnp.LoanCollateralAmount(asset=a, amount="1") for a in ("BTC", "ETH", "SOL", "BNB", "GT", "DOGE")]), INVALID, "collateral:", GATEWAY),
    ("collateral-twice", "Borrow", lambda c: borrow(c, collateral=_btc("0.01") + _btc("0.01")), INVALID, "collateral[1].asset:", GATEWAY),
    ("collateral-is-loan-asset", "Borrow", lambda c: borrow(c, collateral=[lnp.LoanCollateralAmount(asset="USDT", amount="1")]), INVALID, "collateral[0].asset:", GATEWAY),
    ("collateral-asset-empty", "Borrow", lambda c: borrow(c, collateral=[lnp.LoanCollateralAmount(amount="1")]), INVALID, "collateral[0].asset:", GATEWAY),
    ("collateral-too-precise", "Borrow", lambda c: borrow(c, collateral=_btc("0.000000001")), INVALID, "collateral[0].amount:", GATEWAY),
    ("collateral-not-accepted", "Borrow", lambda c: borrow(c, collateral=[lnp.LoanCollateralAmount(asset="ETH", amount="1")]), PRECONDITION, "not accepted", GATEWAY),
    ("asset-not-offered", "Borrow", lambda c: borrow(c, loan_asset="USDC"), PRECONDITION, "not offered", GATEWAY),
    ("term-not-offered", "Borrow", lambda c: borrow(c, term=lnp.LOAN_TERM_FIXED_30_DAYS), PRECONDITION, "term:", GATEWAY),
    ("below-minimum", "Borrow", lambda c: borrow(c, amount="9.99"), PRECONDITION, "amount:", GATEWAY),
    ("ltv-too-high", "Borrow", lambda c: borrow(c, amount="1000", collateral=_btc("0.01")), PRECONDITION, "initial LTV", GATEWAY),
    ("insufficient-collateral", "Borrow", lambda c: borrow(c, user_id=c.poor), PRECONDITION, "insufficient funds", GATEWAY),
    ("key-reused", "Borrow", lambda c: borrow(c, idempotency_key=c.keys["Borrow"], user_id=c.loan_user), EXISTS, "idempotency_key:", GATEWAY),
    ("operator", "Borrow", lambda c: borrow(c), DENIED, "Borrow", OPERATOR),
    # RepayLoan
    ("key-empty", "RepayLoan", lambda c: lnp.RepayLoanRequest(user_id=c.loan_user, loan_id=c.loan_id, amount="1"), INVALID, "idempotency_key:", GATEWAY),
    ("id-bad", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id="a b", amount="1"), INVALID, "loan_id:", GATEWAY),
    ("unknown", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id="ln-00000000000000000000", amount="1"), NOT_FOUND, "loan_id:", GATEWAY),
    ("other-users", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.bob, loan_id=c.loan_id, amount="1"), NOT_FOUND, "loan_id:", GATEWAY),
    ("amount-too-precise", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id, amount=TOO_PRECISE_USDT), INVALID, "amount:", GATEWAY),
    ("over-the-debt", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=unique(), user_id=c.loan_user, loan_id=c.loan_id, amount="5000"), PRECONDITION, "more than the debt", GATEWAY),
    ("key-reused", "RepayLoan", lambda c: lnp.RepayLoanRequest(idempotency_key=c.keys["RepayLoan"], user_id=c.loan_user, loan_id=c.loan_id, amount="1"), EXISTS, "idempotency_key:", GATEWAY),
    # collateral
    ("asset-empty", "AddLoanCollateral", lambda c: loan_coll(c, "AddLoanCollateral", asset=""), INVALID, "collateral.asset:", GATEWAY),
    ("amount-zero", "AddLoanCollateral", lambda c: loan_coll(c, "AddLoanCollateral", amount="0"), INVALID, "collateral.amount:", GATEWAY),
    ("not-accepted", "AddLoanCollateral", lambda c: loan_coll(c, "AddLoanCollateral", asset="ETH"), PRECONDITION, "not accepted", GATEWAY),
    ("insufficient", "AddLoanCollateral", lambda c: loan_coll(c, "AddLoanCollateral", amount="5"), PRECONDITION, "insufficient funds", GATEWAY),
    ("key-reused", "AddLoanCollateral", lambda c: loan_coll(c, "AddLoanCollateral", idempotency_key=c.keys["AddLoanCollateral"]), EXISTS, "idempotency_key:", GATEWAY),
    ("breaches-initial-ltv", "RemoveLoanCollateral", lambda c: loan_coll(c, "RemoveLoanCollateral", amount="0.09"), PRECONDITION, "initial LTV", GATEWAY),
    ("more-than-pledged", "RemoveLoanCollateral", lambda c: loan_coll(c, "RemoveLoanCollateral", amount="1"), PRECONDITION, "pledged", GATEWAY),
    ("not-pledged", "RemoveLoanCollateral", lambda c: loan_coll(c, "RemoveLoanCollateral", asset="ETH"), PRECONDITION, "no ETH collateral", GATEWAY),
    ("too-precise", "RemoveLoanCollateral", lambda c: loan_coll(c, "RemoveLoanCollateral", amount="0.000000001"), INVALID, "collateral.amount:", GATEWAY),
    ("key-reused", "RemoveLoanCollateral", lambda c: loan_coll(c, "RemoveLoanCollateral", idempotency_key=c.keys["RemoveLoanCollateral"]), EXISTS, "idempotency_key:", GATEWAY),
    # StartLoanHour
    ("hour-zero", "StartLoanHour", lambda c: lnp.StartLoanHourRequest(), INVALID, "hour:", SERVICE),
    ("hour-negative", "StartLoanHour", lambda c: lnp.StartLoanHourRequest(hour=-5), INVALID, "hour:", SERVICE),
    ("hour-future", "StartLoanHour", lambda c: lnp.StartLoanHourRequest(hour=_NOW_HOUR + 48), PRECONDITION, "hour:", SERVICE),
    ("gateway", "StartLoanHour", lambda c: lnp.StartLoanHourRequest(hour=1), DENIED, "StartLoanHour", GATEWAY),
]
for _name, _amount in BAD_AMOUNTS:
    _LOAN.append((f"amount-{_name}", "Borrow", lambda c, a=_amount: borrow(c, amount=a), INVALID, "amount:", GATEWAY))
for _n, _m, _b, _code, _frag, _tok in _LOAN:
    row(_n, "loan", _m, _b, _code, _frag, _tok)

# Rows that reveal a bug not fixed here: name -> reason (strict xfail).
KNOWN_BUGS: dict[str, str] = {}


def _param(name: str, r: Row) -> Any:
    reason = KNOWN_BUGS.get(name) or r.xfail
    return pytest.param(r, id=name, marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else [])


@pytest.fixture(scope="module")
def corpus_state() -> dict[str, Any]:
    return {}


async def test_setup_settles(ctx: Ctx, db, corpus_state) -> None:
    """The setup did what the rows assume, and the databases are quiet."""
    corpus_state["start"] = ctx.baseline
    assert ctx.hold_id and ctx.alice_flex and ctx.alice_fixed and ctx.bob_flex
    assert set(ctx.keys) >= {"Transfer", "TransferBatch", "PlaceHold", "ReleaseHold", "CaptureHold", "Deposit", "Withdraw",
                             "CreateProduct", "UpdateProduct", "SetProductRates", "Subscribe", "Redeem", "SetAutoSubscribe"}


@pytest.mark.parametrize("r", [_param(n, r) for n, r in ROWS])
async def test_bad_request(stubs, ctx: Ctx, db, r: Row) -> None:
    request = r.build(ctx)
    before = await snapshot(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stubs[r.service], r.method)(request, metadata=r.token, timeout=20)
    details = err.value.details() or ""
    assert err.value.code() == r.code, f"{err.value.code()}: {details[:300]}"
    assert r.fragment in details, details[:300]
    if r.code in (INVALID, NOT_FOUND, EXISTS) and r.fragment.endswith(":"):
        assert details.startswith(r.fragment), details[:300]  # the message names the field first
    assert len(details) < 2000, "the message echoes too much of the input"
    after = await snapshot(db)
    assert not changed(before, after), changed(before, after)


async def test_the_whole_corpus_wrote_nothing(db, ctx: Ctx) -> None:
    end = await snapshot(db)
    assert not changed(ctx.baseline, end), changed(ctx.baseline, end)


def test_the_corpus_covers_every_rpc() -> None:
    from earn.v1 import simple_earn_pb2, wallet_pb2

    covered = {(r.service, r.method) for _, r in ROWS}
    for service, descriptor in (("wallet", wallet_pb2.DESCRIPTOR.services_by_name["WalletService"]), ("earn", simple_earn_pb2.DESCRIPTOR.services_by_name["SimpleEarnService"]),
                                ("lp", lp.DESCRIPTOR.services_by_name["LaunchpoolService"]), ("mk", mk.DESCRIPTOR.services_by_name["MarketService"]),
                                ("dual", du.DESCRIPTOR.services_by_name["DualService"]), ("cd", cd.DESCRIPTOR.services_by_name["CandyDropService"]),
                                ("lev", lv.DESCRIPTOR.services_by_name["LeverageService"]), ("loan", lnp.DESCRIPTOR.services_by_name["LoanService"]),
                                ("hd", hd.DESCRIPTOR.services_by_name["HodlerService"])):
        missing = {m.name for m in descriptor.methods} - {m for s, m in covered if s == service}
        assert not missing, f"{service}: no corpus row for {sorted(missing)}"


# ---- the role table -----------------------------------------------------------------

# What DESIGN.md and README ("Roles") say, written independently of the ROLES maps.
G, O, S = "gateway", "operator", "service"
EXPECTED_ROLES = {
    "earn.v1.WalletService": {
        "Transfer": {S, O}, "TransferBatch": {S, O}, "BulkCredit": {S, O}, "PlaceHold": {S, O}, "ReleaseHold": {S, O},
        "CaptureHold": {S, O}, "GetHold": {G, S, O}, "Deposit": {O}, "Withdraw": {O}, "GetBalances": {G, S, O},
        "ListTransfers": {G, S, O}, "GetLedgerTotals": {O},
    },
    "earn.v1.SimpleEarnService": {
        "CreateProduct": {O}, "UpdateProduct": {O}, "SetProductRates": {O}, "GetProduct": {G, O, S}, "ListProducts": {G, O, S},
        "ListRateHistory": {G, O, S}, "ListPositions": {G, O, S}, "ListSubscriptions": {G, O, S}, "ListRedemptions": {G, O, S},
        "ListInterest": {G, O, S}, "Subscribe": {G}, "Redeem": {G}, "SetAutoSubscribe": {G}, "CloseHour": {S},
        "RequestPayout": {S}, "GetPayoutStatus": {S, O}, "PreviewPayout": {S, O}, "MatureDue": {S},
    },
    "earn.v1.LaunchpoolService": {
        "CreateProject": {O}, "SetTradingVolume": {O, S}, "GetProject": {G, O, S}, "ListProjects": {G, O, S}, "ListStakes": {G, O, S},
        "ListRewards": {G, O, S}, "Stake": {G}, "Unstake": {G}, "CloseRewardHour": {S}, "RequestRewardPayout": {S},
        "GetRewardPayoutStatus": {S, O},
    },
    "earn.v1.MarketService": {"GetIndex": {G, O, S}, "GetTwap": {G, O, S}, "BackfillPrices": {O}},
    "earn.v1.DualService": {
        "CreateDualPlan": {O}, "GetDualPlan": {G, O, S}, "ListDualPlans": {G, O, S}, "GetDualSubscription": {G, O, S},
        "ListDualSubscriptions": {G, O, S}, "SubscribeDual": {G}, "SettleDualPlans": {S},
    },
    "earn.v1.CandyDropService": {
        "CreateCampaign": {O}, "Register": {G}, "GetCampaign": {G, O, S}, "ListCampaigns": {G, O, S}, "GetProgress": {G, O, S},
        "ListPrizes": {G, O, S}, "DistributePrizes": {S},
    },
    "earn.v1.LeverageService": {
        "CreateLeverageProduct": {O}, "GetLeverageProduct": {G, O, S}, "ListLeverageProducts": {G, O, S}, "GetLeveragePosition": {G, O, S},
        "ListLeveragePositions": {G, O, S}, "RequestLeverageQuote": {G}, "SubscribeLeverage": {G}, "RedeemLeverageEarly": {G},
        "SettleLeveragePositions": {S},
    },
    "earn.v1.LoanService": {
        "SetLoanAsset": {O}, "SetLoanCollateralAsset": {O}, "ListLoanAssets": {G, O, S}, "GetLoan": {G, O, S}, "ListLoans": {G, O, S},
        "ListLoanInterest": {G, O, S}, "ListLoanLtvHistory": {G, O, S}, "ListLoanEvents": {G, O, S}, "Borrow": {G}, "RepayLoan": {G},
        "AddLoanCollateral": {G}, "RemoveLoanCollateral": {G}, "StartLoanHour": {S},
    },
    "earn.v1.HodlerService": {
        "CreateAirdrop": {O}, "GetAirdrop": {G, O, S}, "ListAirdrops": {G, O, S}, "GetUserHolding": {G, O, S}, "GetEstimate": {G, O, S},
        "ListHourlyAverages": {G, O, S}, "ListAirdropRewards": {G, O, S}, "DistributeAirdrops": {S},
    },
}


def _descriptors() -> list[Any]:
    from earn.v1 import simple_earn_pb2, wallet_pb2

    return [wallet_pb2.DESCRIPTOR.services_by_name["WalletService"], simple_earn_pb2.DESCRIPTOR.services_by_name["SimpleEarnService"],
            lp.DESCRIPTOR.services_by_name["LaunchpoolService"], mk.DESCRIPTOR.services_by_name["MarketService"],
            du.DESCRIPTOR.services_by_name["DualService"], cd.DESCRIPTOR.services_by_name["CandyDropService"],
            lv.DESCRIPTOR.services_by_name["LeverageService"], lnp.DESCRIPTOR.services_by_name["LoanService"],
            hd.DESCRIPTOR.services_by_name["HodlerService"]]


def test_every_rpc_of_the_protos_is_in_the_role_tables() -> None:
    """Deny by default would refuse an RPC missing from ROLES to everyone: a new RPC must be
    added to the table (and to EXPECTED_ROLES here) on purpose."""
    tables = {"earn.v1.WalletService": WALLET_ROLES, "earn.v1.SimpleEarnService": EARN_ROLES, "earn.v1.LaunchpoolService": LAUNCHPOOL_ROLES,
              "earn.v1.MarketService": MARKET_ROLES, "earn.v1.DualService": DUAL_ROLES, "earn.v1.CandyDropService": CANDYDROP_ROLES,
              "earn.v1.LeverageService": LEVERAGE_ROLES, "earn.v1.LoanService": LOAN_ROLES, "earn.v1.HodlerService": HODLER_ROLES}
    for descriptor in _descriptors():
        table = tables[descriptor.full_name]
        names = {f"{descriptor.full_name}/{m.name}" for m in descriptor.methods}
        assert names - set(table) == set(), f"RPCs missing from ROLES: {sorted(names - set(table))}"
        assert set(table) - names == set(), f"ROLES names methods the proto lacks: {sorted(set(table) - names)}"
        assert {m.name: set(EXPECTED_ROLES[descriptor.full_name][m.name]) for m in descriptor.methods} == {
            m.name: set(table[f"{descriptor.full_name}/{m.name}"]) for m in descriptor.methods
        }


def test_a_method_missing_from_the_table_is_denied_to_every_role() -> None:
    from services.kernel.errors import PermissionDenied
    from services.kernel.grpcserver import _Interceptor

    tokens = {"dev-gateway": G, "dev-operator": O, "dev-service": S}
    interceptor = _Interceptor({"earn.v1.WalletService/Transfer": frozenset({S})}, tokens)
    for token in tokens:
        with pytest.raises(PermissionDenied):
            interceptor._authorize("earn.v1.WalletService/Deposit", {"authorization": f"Bearer {token}"})
        with pytest.raises(PermissionDenied):  # an empty role set is no better than a missing one
            _Interceptor({"earn.v1.WalletService/Deposit": frozenset()}, tokens)._authorize(
                "earn.v1.WalletService/Deposit", {"authorization": f"Bearer {token}"}
            )
    assert interceptor._authorize("earn.v1.WalletService/Transfer", {"authorization": "Bearer dev-service"}).role == S


ROLE_CASES = [
    (service.full_name, m.name, caller)
    for service in _descriptors()
    for m in service.methods
    for caller in ("gateway", "operator", "service", "none", "unknown", "not-bearer")
]


@pytest.mark.parametrize("service,method,caller", ROLE_CASES, ids=[f"{s.split('.')[-1]}.{m}-{c}" for s, m, c in ROLE_CASES])
async def test_role_table(stubs, ctx: Ctx, service: str, method: str, caller: str) -> None:
    """Each RPC with each caller: an empty request (harmless: it names nothing to write, so
    an allowed caller gets past authorization and meets validation or reads); a refused
    caller gets UNAUTHENTICATED (no valid token) or PERMISSION_DENIED (a role not in the
    table), before anything else."""
    stub = stubs[{"WalletService": "wallet", "LaunchpoolService": "lp", "MarketService": "mk", "DualService": "dual",
                  "CandyDropService": "cd", "LeverageService": "lev", "LoanService": "loan", "HodlerService": "hd"}.get(service.split(".")[-1], "earn")]
    descriptor = next(d for d in _descriptors() if d.full_name == service).methods_by_name[method]
    from google.protobuf import message_factory

    request = message_factory.GetMessageClass(descriptor.input_type)()
    metadata = {"none": NO_TOKEN, "unknown": BAD_TOKEN, "not-bearer": NOT_BEARER, **TOKENS}[caller]
    try:
        await getattr(stub, method)(request, metadata=metadata, timeout=20)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        code = err.code()
    if caller in ("none", "unknown", "not-bearer"):
        assert code == UNAUTHENTICATED
    elif caller in EXPECTED_ROLES[service][method]:
        assert code not in (UNAUTHENTICATED, DENIED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), code
    else:
        assert code == DENIED


async def test_a_gateway_acts_only_for_the_user_named(stubs, ctx: Ctx, db) -> None:
    """The user-scoped checks beyond the role table: a gateway acting for bob sees none of
    alice's positions, records or hourly interest, and cannot act on them."""
    earn = stubs["earn"]
    before = await snapshot(db)
    listed = await earn.ListPositions(se.ListPositionsRequest(user_id=ctx.bob), metadata=GATEWAY)
    assert {p.position_id for p in listed.positions} == {ctx.bob_flex}
    assert {p.user_id for p in listed.positions} == {ctx.bob}
    subs = await earn.ListSubscriptions(se.ListSubscriptionsRequest(user_id=ctx.bob), metadata=GATEWAY)
    assert {s.user_id for s in subs.subscriptions} == {ctx.bob}
    reds = await earn.ListRedemptions(se.ListRedemptionsRequest(user_id=ctx.bob), metadata=GATEWAY)
    assert {r.user_id for r in reds.redemptions} <= {ctx.bob}
    interest = await earn.ListInterest(se.ListInterestRequest(user_id=ctx.bob, position_id=ctx.alice_flex), metadata=GATEWAY)
    assert list(interest.records) == []
    for call in (
        earn.ListInterest(se.ListInterestRequest(user_id=ctx.bob, position_id=ctx.alice_flex, hourly=True), metadata=GATEWAY),
        earn.Redeem(se.RedeemRequest(idempotency_key=unique(), user_id=ctx.bob, position_id=ctx.alice_flex), metadata=GATEWAY),
        earn.SetAutoSubscribe(se.SetAutoSubscribeRequest(idempotency_key=unique(), user_id=ctx.bob, position_id=ctx.alice_flex), metadata=GATEWAY),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == NOT_FOUND, err.value.details()
        # The same answer as an unknown id: nothing says the position exists.
        assert err.value.details() == f"position_id: no position {ctx.alice_flex} of user {ctx.bob}"
    assert not changed(before, await snapshot(db))


async def test_the_snapshot_sees_a_write(stubs, ctx: Ctx, db) -> None:
    """The control: one good request changes the snapshot (so an empty diff means something)."""
    before = await snapshot(db)
    await stubs["wallet"].Deposit(wp.DepositRequest(idempotency_key=unique(), owner=ctx.poor, asset="BTC", amount="0.00000001"), metadata=OPERATOR)
    diff = changed(before, await snapshot(db))
    assert {'"wallet"."postings"', '"wallet"."transfers"', '"wallet"."idempotency_keys"'} <= set(diff), diff

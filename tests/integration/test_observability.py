"""Dashboards and alerts against a live stack: every process of the platform (wallet,
Simple Earn, Launchpool, CandyDrop, market, Dual Investment, Smart Leverage, Crypto
Loan, accrual engine, scheduler) on free ports, a real Prometheus (build/tools) scraping them with the
scrape config and rules of deploy/prometheus, and a short workload (gRPC calls that
succeed and fail, a subscription, three hours closed and paid, one day's payout, an
unreadable input event; index ticks on market.prices as the exchange would send them and
a TWAP refused for missing data; a Launchpool stake and unstake paid hourly rewards; a
CandyDrop campaign with a registration, counted and not counted fills and an unreadable
one, distributed at its end; a Dual Investment plan subscribed and settled; a Smart
Leverage position redeemed early and one settled at maturity; unreadable records in the
launchpool engine's input and in its payouts; a Crypto Loan borrowed, partly repaid and
margin-called by the engine on an ETH tick, its hours started by the scheduler; a HODLer
airdrop on GT held, paid at its end). The demo's market_simulator and
candydrop_generator are not run: production has no such processes, and nothing scrapes
them. Then every query of every dashboard panel,
every alert expression and every recording rule must return series: no dashboard or
alert refers to a metric, or a label, that does not exist.

An alert fires only on trouble, so its expression is evaluated with each comparison made
a `bool` one (`x > 5` becomes `x > bool 5`) and `absent(x)` read as `x`: that keeps
exactly the series the alert watches. Counters that get their first sample only on a
failure (EVENT_ONLY) may return nothing, but must be declared by a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from services.kernel import grpcclient
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from earn.v1 import hodler_pb2 as hd, hodler_pb2_grpc
from earn.v1 import (
    accrual_pb2,
    candydrop_pb2 as cd,
    candydrop_pb2_grpc,
    dual_pb2 as du,
    dual_pb2_grpc,
    exchange_pb2,
    launchpool_pb2 as lp,
    launchpool_pb2_grpc,
    leverage_pb2 as lv,
    leverage_pb2_grpc,
    loan_pb2 as ln,
    loan_pb2_grpc,
    market_pb2 as mk,
    market_pb2_grpc,
    simple_earn_pb2 as se,
    simple_earn_pb2_grpc,
    wallet_pb2,
    wallet_pb2_grpc,
)
from services.devstack.processes import PROCESSES, ManagedProcess
from services.kernel.clock import set_time
from services.kernel.topics import topic_name
from services.market import domain as market_domain
from services.market.simulator import tick_envelope
from tests.conftest import GATEWAY, OPERATOR, SERVICE, Env, eventually, free_port, unique
from tests.deploy.tools import DEPLOY, scraped_jobs, tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROM = DEPLOY / "prometheus"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Grafana's variables, as the test reads them: the widest choice.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$product": ".*"}
# Counters whose first sample comes with a failure; a healthy run has none.
EVENT_ONLY = {
    "earn_simple_earn_dead_letters_total": "payout records parked for an operator",
    "earn_dual_settlement_failures_total": "a Dual Investment settlement attempt that failed (prices, wallet)",
    "earn_leverage_settlement_failures_total": "a Smart Leverage settlement attempt that failed (prices, wallet)",
}
# Labels that would name a user, a position, an account or a request: never on a metric.
FORBIDDEN_LABELS = {
    "user", "user_id", "owner", "position", "position_id", "account", "account_id", "hold_id",
    "posting_id", "idempotency_key", "event_id", "key",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
HOURLY_JOBS = (
    "ticks", "simple_earn.interest.hourly", "simple_earn.maturity",
    "launchpool.rewards.hourly", "dual.settlement", "leverage.settlement", "candydrop.distribution", "loan.hours",
    "hodler.distribution",
)


# ---- PromQL helpers ----------------------------------------------------------------------


def _outside_strings_and_braces(expr: str) -> list[tuple[int, int]]:
    """Spans of expr that are neither string literals nor label matchers."""
    spans, start, i, depth, quote = [], 0, 0, 0, ""
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
                if depth == 0:
                    start = i + 1
        elif ch in "\"'`":
            if depth == 0:
                spans.append((start, i))
            quote = ch
        elif ch == "{":
            if depth == 0:
                spans.append((start, i))
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                start = i + 1
        i += 1
    spans.append((start, len(expr)))
    return spans


def signal_of(expr: str) -> str:
    """An alert expression with every comparison a `bool` one and absent(x) read as x."""
    out, last = [], 0
    for start, end in _outside_strings_and_braces(expr):
        out.append(expr[last:start])
        part = expr[start:end]
        part = re.sub(r"(==|!=|>=|<=|>(?!=)|<(?!=))(?!\s*bool\b)", r"\1 bool", part)
        part = re.sub(r"\babsent\(", "(", part)
        part = re.sub(r"\babsent_over_time\(", "last_over_time(", part)
        out.append(part)
        last = end
    out.append(expr[last:])
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names an expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(match.group(0))
    return names


def grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in [p for top in board["panels"] for p in (top, *top.get("panels", []))]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} ({target['refId']})", grafana(target["expr"])))
    return found


def rules() -> list[dict[str, Any]]:
    return [r for path in sorted((PROM / "rules").glob("*.yml")) for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_signal_of_keeps_matchers_and_makes_comparisons_bool() -> None:
    assert signal_of('up{job!="x", a=~"b|c"} == 0') == 'up{job!="x", a=~"b|c"} == bool 0'
    assert signal_of("a > 1 and b >= bool 2 or c <= 3") == "a > bool 1 and b >= bool 2 or c <= bool 3"
    assert signal_of('absent(up{job="w"}) or absent(up{job="s"})') == '(up{job="w"}) or (up{job="s"})'
    assert metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) / on (job) y offset 30m > bool 5') == {"x_bucket", "y"}
    assert metric_names("earn:grpc_server_error_ratio:rate5m > 0.05 and time() - z > 1e3") == {"earn:grpc_server_error_ratio:rate5m", "z"}


# ---- the stack and Prometheus ------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        data = urllib.parse.urlencode(params).encode() if params else None
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", data=data, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def declared(self) -> set[str]:
        """Metric names the targets declare (# TYPE), samples or not. Scraped as
        OpenMetrics, a counter's family has no _total and a histogram's no _bucket."""
        names = set()
        for family, entries in self.api("metadata").items():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(entries[0]["type"], ())
            names |= {family, *(family + suffix for suffix in suffixes)}
        return names

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as err:  # a bad query is a 400 with the parser's message
            pytest.fail(f"Prometheus refused {expr!r}: {err.read().decode()}")
        assert data["resultType"] == "vector", expr
        return data["result"]


def start_prometheus(directory: Path, targets: dict[str, str]) -> Prometheus:
    """Prometheus with deploy/prometheus/prometheus.yml, its rules, and each job's
    discovery replaced by the address of the local process; every second."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    port = free_port()
    targets = {**targets, "prometheus": f"127.0.0.1:{port}"}
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM / "rules" / "*.yml")]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return prometheus
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"Prometheus did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def scraped(proc: ManagedProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert proc.metrics_url
    with urllib.request.urlopen(proc.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


async def workload(wallet: ManagedProcess, earn: ManagedProcess, stack: Env) -> None:
    """Calls that succeed and calls refused for each reason a caller can give; a product,
    a subscription and a partial redemption (accruing from the next hour); an unreadable
    event in the accrual engine's input."""
    async with grpcclient.channel(wallet.address or "") as wch, grpcclient.channel(earn.address or "") as ech:
        w = wallet_pb2_grpc.WalletServiceStub(wch)
        e = simple_earn_pb2_grpc.SimpleEarnServiceStub(ech)
        user = unique("obs")
        await w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="BTC", amount="100"), metadata=OPERATOR)
        await w.GetBalances(wallet_pb2.GetBalancesRequest(owner=user), metadata=GATEWAY)
        refused = [
            (w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="BTC", amount="1e3"), metadata=OPERATOR),
             grpc.StatusCode.INVALID_ARGUMENT),
            (w.GetBalances(wallet_pb2.GetBalancesRequest(owner=user)), grpc.StatusCode.UNAUTHENTICATED),
            (w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="BTC", amount="1"), metadata=GATEWAY),
             grpc.StatusCode.PERMISSION_DENIED),
        ]
        for call, code in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code
        product = (await e.CreateProduct(
            se.CreateProductRequest(
                idempotency_key=unique(), product_id=unique("obs-btc"), asset="BTC", kind=se.PRODUCT_KIND_FLEXIBLE,
                tiers=[accrual_pb2.RateTier(up_to="", apr="0.05")], min_subscription="0.001", payout_cadence=se.PAYOUT_CADENCE_HOURLY,
            ),
            metadata=OPERATOR,
        )).product.product_id
        position = (await e.Subscribe(
            se.SubscribeRequest(idempotency_key=unique(), user_id=user, product_id=product, amount="50"), metadata=GATEWAY,
        )).position.position_id
        await e.Redeem(se.RedeemRequest(idempotency_key=unique(), user_id=user, position_id=position, amount="10"), metadata=GATEWAY)
        await e.GetProduct(se.GetProductRequest(product_id=product), metadata=GATEWAY)
        with pytest.raises(grpc.aio.AioRpcError):
            await e.GetProduct(se.GetProductRequest(product_id=product))
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name(stack.settings, "simple_earn.accrual"), b"\xff not an envelope", key=b"x", partition=0)
    finally:
        await producer.stop()


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def products_workload(p: dict[str, ManagedProcess], stack: Env, start: datetime, now: datetime) -> None:
    """The newer products, at `now` (start + 20 min; the day ends at start + 3 h): index
    ticks every 30 s over the three hours, a TWAP refused; a Launchpool project over the
    three hours (stake, unstake); a CandyDrop campaign to the day's end (a registration, a
    fill that counts, one of a user in no campaign, an unreadable record); a Dual plan
    settled at start + 2 h (subscribed); a Smart Leverage product (a position redeemed
    early, one maturing at start + 2 h); unreadable records in launchpool.accrual and
    launchpool.payouts. The scheduler settles, pays and distributes once the clock moves."""
    day = start + timedelta(hours=3)
    channels = {name: grpcclient.channel(p[name].address or "") for name in ("wallet", "launchpool", "candydrop", "market", "dual", "leverage", "hodler")}
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        w = wallet_pb2_grpc.WalletServiceStub(channels["wallet"])
        market = market_pb2_grpc.MarketServiceStub(channels["market"])
        user, stranger = unique("obs-p"), unique("obs-x")
        for asset, amount in (("USDT", "100000"), ("BTC", "1")):
            await w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset=asset, amount=amount), metadata=OPERATOR)

        # Market: BTC/USDT every 30 s from before the start to after the day's end.
        pair = market_domain.parse_pair("BTC/USDT")
        prices = topic_name(stack.settings, "market.prices")
        moment = start - timedelta(minutes=5)
        while moment <= day + timedelta(minutes=10):
            await producer.send(prices, tick_envelope(pair, Decimal("60000"), moment, "exchange", uuid.uuid4()), key=pair.name.encode())
            moment += timedelta(seconds=30)
        await producer.flush()

        async def indexed() -> None:
            try:
                reply = await market.GetIndex(mk.GetIndexRequest(pair="BTC/USDT", at=ts(now)), metadata=SERVICE)
            except grpc.aio.AioRpcError as err:
                raise AssertionError(err.details()) from None
            assert reply.event_time.ToDatetime(tzinfo=UTC) >= now - timedelta(seconds=30)

        await eventually(indexed, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError):  # no prices at all in 2001: refused, counted per pair
            await market.GetTwap(mk.GetTwapRequest(pair="BTC/USDT", start=ts(datetime(2001, 1, 1, tzinfo=UTC)),
                                                   end=ts(datetime(2001, 1, 1, 1, tzinfo=UTC))), metadata=SERVICE)

        # Launchpool: hourly rewards over the three hours.
        pools = launchpool_pb2_grpc.LaunchpoolServiceStub(channels["launchpool"])
        pool = unique("obs-pool")
        await pools.CreateProject(lp.CreateProjectRequest(
            idempotency_key=unique(), project_id=unique("obs-proj"), reward_asset="BTC", start_time=ts(start), end_time=ts(day),
            payout_mode=lp.LAUNCHPOOL_PAYOUT_MODE_HOURLY,
            pools=[lp.RewardPoolSpec(pool_id=pool, stake_asset="USDT", total_reward="3", min_stake="10", max_stake="1000")],
        ), metadata=OPERATOR)
        await pools.Stake(lp.StakeRequest(idempotency_key=unique(), user_id=user, pool_id=pool, amount="100"), metadata=GATEWAY)
        await pools.Unstake(lp.UnstakeRequest(idempotency_key=unique(), user_id=user, pool_id=pool, amount="10"), metadata=GATEWAY)

        # CandyDrop: a campaign to the day's end.
        candy = candydrop_pb2_grpc.CandyDropServiceStub(channels["candydrop"])
        campaign = unique("obs-cd")
        await candy.CreateCampaign(cd.CreateCampaignRequest(
            idempotency_key=unique(), campaign_id=campaign, prize_asset="USDT", prize_pool="100", pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA,
            start_time=ts(start), end_time=ts(day),
            tasks=[cd.CandyTask(task_id="spot", kind=cd.CANDY_TASK_KIND_SPOT_VOLUME, asset="USDT", threshold="10", candies=1, max_completions=10)],
        ), metadata=OPERATOR)
        await candy.Register(cd.RegisterRequest(idempotency_key=unique(), user_id=user, campaign_id=campaign), metadata=GATEWAY)
        trades = topic_name(stack.settings, "exchange.trades")
        for who in (user, stranger):
            fill = exchange_pb2.ExchangeEvent(spot_trade=exchange_pb2.SpotTrade(
                event_id=unique("obs-fill"), user_id=who, base_asset="BTC", quote_asset="USDT", base_amount="0.001", quote_amount="60",
                event_time=ts(now)))
            await producer.send_and_wait(trades, fill.SerializeToString(), key=who.encode())
        await producer.send_and_wait(trades, b"\xff not an exchange event", key=b"x")

        # HODLer Airdrop: GT held from now, an airdrop over the second hour, paid at start + 2 h.
        hodler = hodler_pb2_grpc.HodlerServiceStub(channels["hodler"])
        airdrop = unique("obs-hd")
        await hodler.CreateAirdrop(hd.CreateAirdropRequest(
            idempotency_key=unique(), airdrop_id=airdrop, hold_asset="GT", reward_asset="USDT", total="10",
            start_hour=int(start.timestamp()) // 3600 + 1, end_hour=int(start.timestamp()) // 3600 + 2,
        ), metadata=OPERATOR)
        await w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="GT", amount="5"), metadata=OPERATOR)
        await hodler.GetEstimate(hd.GetEstimateRequest(airdrop_id=airdrop), metadata=GATEWAY)
        await hodler.ListAirdrops(hd.ListAirdropsRequest(), metadata=GATEWAY)
        with pytest.raises(grpc.aio.AioRpcError):  # refused: counted per code
            await hodler.GetAirdrop(hd.GetAirdropRequest(airdrop_id="no-such-airdrop"), metadata=GATEWAY)

        # Dual Investment: sell high at a strike under the index (converted), settled at start + 2 h.
        dual = dual_pb2_grpc.DualServiceStub(channels["dual"])
        await w.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=wallet_pb2.TransferSpec(
            asset="USDT", source=wallet_pb2.AccountRef(owner="dual", kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
            destination=wallet_pb2.AccountRef(owner="dual", kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount="100000",
        )), metadata=OPERATOR)
        plan = unique("obs-dual")
        await dual.CreateDualPlan(du.CreateDualPlanRequest(
            idempotency_key=unique(), plan_id=plan, base_asset="BTC", quote_asset="USDT", direction=du.DUAL_DIRECTION_SELL_HIGH,
            strike="50000", apr="0.1", settlement_time=ts(start + timedelta(hours=2)), min_amount="0.001", max_per_user="1", quota="10",
        ), metadata=OPERATOR)
        await dual.SubscribeDual(du.SubscribeDualRequest(client_order_id=unique("order"), user_id=user, plan_id=plan, amount="0.01"), metadata=GATEWAY)

        # Smart Leverage: one position redeemed early, one maturing at start + 2 h.
        lev = leverage_pb2_grpc.LeverageServiceStub(channels["leverage"])
        product = unique("obs-lev")
        owner = (await lev.CreateLeverageProduct(lv.CreateLeverageProductRequest(
            idempotency_key=unique(), product_id=product, pair="BTC/USDT", max_leverage="10", fee_rate="0.004", min_principal="10",
            max_principal="100000",
        ), metadata=OPERATOR)).product.treasury_owner
        await w.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=wallet_pb2.TransferSpec(
            asset="USDT", source=wallet_pb2.AccountRef(owner=owner, kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
            destination=wallet_pb2.AccountRef(owner=owner, kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount="100000",
        )), metadata=OPERATOR)
        positions = []
        for _ in range(2):
            quote = (await lev.RequestLeverageQuote(lv.RequestLeverageQuoteRequest(
                idempotency_key=unique(), user_id=user, product_id=product, direction=lv.LEVERAGE_DIRECTION_LONG, leverage="5",
                principal="100", maturity=ts(start + timedelta(hours=2)),
            ), metadata=GATEWAY)).quote
            reply = await lev.SubscribeLeverage(lv.SubscribeLeverageRequest(user_id=user, quote_id=quote.quote_id), metadata=GATEWAY)
            positions.append(reply.position.position_id)
        await lev.RedeemLeverageEarly(lv.RedeemLeverageEarlyRequest(idempotency_key=unique(), user_id=user, position_id=positions[0]), metadata=GATEWAY)

        # Unreadable records: the launchpool engine skips one, Launchpool parks one.
        await producer.send_and_wait(topic_name(stack.settings, "launchpool.accrual"), b"\xff not an envelope", key=b"x", partition=0)
        await producer.send_and_wait(topic_name(stack.settings, "launchpool.payouts"), b"\xff not a batch", key=b"x", partition=0)
    finally:
        await producer.stop()
        for channel in channels.values():
            await channel.close()


async def loan_workload(p: dict[str, ManagedProcess], stack: Env, now: datetime) -> None:
    """Crypto Loan at `now`: USDT lent against ETH (counted 90%) at 70%, partly repaid, then
    an ETH tick that takes it to 85.3% (margin call, band near_liquidation): the engine
    judges it and the loan service records the call."""
    async with grpcclient.channel(p["wallet"].address or "") as wch, grpcclient.channel(p["loan"].address or "") as lch:
        w = wallet_pb2_grpc.WalletServiceStub(wch)
        loans = loan_pb2_grpc.LoanServiceStub(lch)
        market = market_pb2_grpc.MarketServiceStub(mch := grpcclient.channel(p["market"].address or ""))
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            user = unique("obs-loan")
            await loans.SetLoanAsset(ln.SetLoanAssetRequest(idempotency_key=unique(), asset=ln.LoanAsset(
                asset="USDT", hourly_rate="0.000005", min_borrow="10", max_borrow="1000000")), metadata=OPERATOR)
            await loans.SetLoanCollateralAsset(ln.SetLoanCollateralAssetRequest(idempotency_key=unique(), collateral=ln.LoanCollateralAsset(
                asset="ETH", discount="0.9")), metadata=OPERATOR)
            await w.Transfer(wallet_pb2.TransferRequest(idempotency_key=unique(), transfer=wallet_pb2.TransferSpec(
                asset="USDT", source=wallet_pb2.AccountRef(owner="loan", kind=wallet_pb2.ACCOUNT_KIND_EXTERNAL),
                destination=wallet_pb2.AccountRef(owner="loan", kind=wallet_pb2.ACCOUNT_KIND_TREASURY), amount="100000",
            )), metadata=OPERATOR)
            await w.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="ETH", amount="10"), metadata=OPERATOR)
            prices = topic_name(stack.settings, "market.prices")
            eth = market_domain.parse_pair("ETH/USDT")

            async def tick(price: str, moment: datetime) -> None:
                await producer.send_and_wait(prices, tick_envelope(eth, Decimal(price), moment, "exchange", uuid.uuid4()), key=eth.name.encode())

                async def arrived() -> None:
                    try:
                        reply = await market.GetIndex(mk.GetIndexRequest(pair="ETH/USDT"), metadata=SERVICE)
                    except grpc.aio.AioRpcError as err:
                        raise AssertionError(err.details()) from None
                    assert reply.event_time.ToDatetime(tzinfo=UTC) >= moment

                await eventually(arrived, timeout=30)

            await tick("3000", now - timedelta(seconds=10))
            # 10 ETH x 3,000 x 0.9 = 27,000 counted; 70% = 18,900
            loan = (await loans.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id=user, loan_asset="USDT", amount="18900",
                                                        collateral=[ln.LoanCollateralAmount(asset="ETH", amount="10")],
                                                        term=ln.LOAN_TERM_FLEXIBLE), metadata=GATEWAY)).loan
            await loans.RepayLoan(ln.RepayLoanRequest(idempotency_key=unique(), user_id=user, loan_id=loan.loan_id, amount="100"), metadata=GATEWAY)
            await tick("2450", now - timedelta(seconds=5))  # 18,800 / 22,050 = 85.3%

            async def called() -> None:
                reply = await loans.ListLoanEvents(ln.ListLoanEventsRequest(user_id=user, loan_id=loan.loan_id), metadata=GATEWAY)
                assert [e.kind for e in reply.events] == [ln.LOAN_EVENT_KIND_MARGIN_CALL]

            await eventually(called, timeout=60)
        finally:
            await producer.stop()
            await mch.close()


@pytest.fixture(scope="module")
async def prometheus(stack: Env, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Prometheus]:
    directory = tmp_path_factory.mktemp("observability")
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = day - timedelta(hours=3)  # the scheduler's jobs begin three hours before a day ends
    clock = directory / "now"
    set_time(clock, start + timedelta(minutes=20))
    processes: dict[str, ManagedProcess] = {}

    def spawn(name: str, cwd: Path | None = None, **env: str) -> ManagedProcess:
        spec = next(s for s in PROCESSES if s.name == name)
        proc = ManagedProcess(
            spec, {**stack.env, "EARN_CLOCK_FILE": str(clock), **env}, log_dir=stack.settings.data_dir / "test-logs",
            port=free_port() if spec.port_env else None, metrics_port=free_port(), echo=False, cwd=cwd,
        )
        proc.start()
        processes[name] = proc
        return proc

    prom: Prometheus | None = None
    try:
        wallet = spawn("wallet")
        await asyncio.to_thread(wallet.wait_ready, 60)
        earn = spawn("simple_earn", EARN_WALLET_ADDRESS=wallet.address or "", EARN_POSITIONS_GAUGE_SECONDS="1")
        await asyncio.to_thread(earn.wait_ready, 60)
        launchpool = spawn("launchpool", EARN_WALLET_ADDRESS=wallet.address or "")
        candydrop = spawn("candydrop", EARN_WALLET_ADDRESS=wallet.address or "")
        hodler = spawn("hodler", EARN_WALLET_ADDRESS=wallet.address or "", EARN_GAUGE_SECONDS="1")
        market = spawn("market")
        for proc in (launchpool, candydrop, hodler, market):
            await asyncio.to_thread(proc.wait_ready, 60)
        dual = spawn("dual", EARN_WALLET_ADDRESS=wallet.address or "", EARN_MARKET_ADDRESS=market.address or "")
        leverage = spawn("leverage", EARN_WALLET_ADDRESS=wallet.address or "", EARN_MARKET_ADDRESS=market.address or "")
        loan = spawn("loan", EARN_WALLET_ADDRESS=wallet.address or "", EARN_MARKET_ADDRESS=market.address or "")
        for proc in (dual, leverage, loan):
            await asyncio.to_thread(proc.wait_ready, 60)
        spawn("accrual", cwd=directory)  # faust's data folder goes there, not into the work tree
        scheduler = spawn(
            "scheduler", EARN_SIMPLE_EARN_ADDRESS=earn.address or "", EARN_SCHEDULER_START=start.isoformat(),
            EARN_LAUNCHPOOL_ADDRESS=launchpool.address or "", EARN_CANDYDROP_ADDRESS=candydrop.address or "",
            EARN_DUAL_ADDRESS=dual.address or "", EARN_LEVERAGE_ADDRESS=leverage.address or "",
            EARN_LOAN_ADDRESS=loan.address or "", EARN_HODLER_ADDRESS=hodler.address or "",
            EARN_RETRY_SECONDS="0.5", EARN_MAX_SLEEP_SECONDS="0.5", EARN_PAYOUT_POLL_SECONDS="0.1",
            EARN_RPC_TIMEOUT_SECONDS="10", EARN_PAYOUT_TIMEOUT_SECONDS="60",
        )
        def answers(proc: ManagedProcess) -> bool:
            assert proc.running(), f"{proc.name} exited ({proc.returncode}); see {proc.logfile}"
            try:
                return bool(scraped(proc))
            except OSError:
                return False

        for proc in processes.values():
            await eventually(lambda p=proc: answers(p), timeout=60)
        prom = start_prometheus(directory, {name: f"127.0.0.1:{p.metrics_port}" for name, p in processes.items()})
        await workload(wallet, earn, stack)
        await products_workload(processes, stack, start, start + timedelta(minutes=20))
        await loan_workload(processes, stack, start + timedelta(minutes=20))

        # The day ends: three hours closed and paid hourly, the day's payout, maturities.
        set_time(clock, day + timedelta(minutes=20))  # hodler.distribution runs a period 15 minutes after its end

        def jobs_done() -> None:
            for name, proc in processes.items():
                assert proc.running(), f"{name} exited ({proc.returncode}); see {proc.logfile}"
            samples = scraped(scheduler)
            runs = {job: samples.get(("earn_job_runs_total", (("job", job), ("status", "succeeded"))), 0) for job in (*HOURLY_JOBS, "simple_earn.interest.daily")}
            assert runs == {**dict.fromkeys(HOURLY_JOBS, 3.0), "simple_earn.interest.daily": 1.0}, (
                f"succeeded runs so far: {runs}; a payout that never completes is stuck in the engine or in Simple Earn's"
                f" payout consumer: see {processes['accrual'].logfile} and {earn.logfile}"
            )
            paid = scraped(earn)
            assert any(name == "earn_simple_earn_interest_paid_total" and value > 0 for (name, _), value in paid.items()), "no interest paid yet"
            for proc, metric in ((launchpool, "earn_launchpool_rewards_paid_total"), (candydrop, "earn_candydrop_prizes_paid_total"),
                                 (dual, "earn_dual_paid_total"), (leverage, "earn_leverage_positions_settled_total"),
                                 (loan, "earn_loan_actions_total"), (hodler, "earn_hodler_rewards_paid_total")):
                samples = scraped(proc)
                assert sum(v for (name, _), v in samples.items() if name == metric) > 0, f"{proc.name}: no {metric} yet; see {proc.logfile}"

        await eventually(jobs_done, timeout=150)
        yield prom
    finally:
        if prom is not None:
            stop(prom.process)
        for proc in reversed(processes.values()):
            proc.stop()


def wait_for(check: Any, prometheus: Prometheus, timeout: float = 30) -> None:
    """Prometheus needs a few scrapes and rule evaluations after the workload."""
    deadline = time.monotonic() + timeout
    while True:
        failures = check()
        if not failures:
            return
        if time.monotonic() > deadline:
            pytest.fail("\n".join(failures) + f"\n(Prometheus log: {prometheus.log})")
        time.sleep(1)


# ---- the checks ---------------------------------------------------------------------------


def test_every_process_is_scraped_and_every_rule_evaluates(prometheus: Prometheus) -> None:
    def check() -> list[str]:
        targets = prometheus.api("targets")["activeTargets"]
        failures = [f"target {t['labels']['job']} is {t['health']}: {t['lastError']}" for t in targets if t["health"] != "up"]
        if {t["labels"]["job"] for t in targets} != scraped_jobs() | {"prometheus"}:
            failures.append(f"targets: {sorted(t['labels']['job'] for t in targets)}")
        loaded = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        expected = {r.get("alert") or r["record"] for r in rules()}
        if set(loaded) != expected:
            failures.append(f"rules loaded {sorted(loaded)}, files have {sorted(expected)}")
        failures += [f"rule {n}: {r['health']} {r.get('lastError', '')}" for n, r in loaded.items() if r["health"] != "ok"]
        return failures

    wait_for(check, prometheus)


def _returns_series(prometheus: Prometheus, items: list[tuple[str, str]]) -> list[str]:
    declared = prometheus.declared()
    failures = []
    for where, expr in items:
        if prometheus.query(expr):
            continue
        names = metric_names(expr)
        if names and names <= set(EVENT_ONLY) and names <= declared:
            continue  # a failure counter that no failure has created yet
        failures.append(f"{where}: no series for {expr}")
    return failures


def test_every_dashboard_query_returns_series(prometheus: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) > 40
    wait_for(lambda: _returns_series(prometheus, queries), prometheus)


def test_every_alert_and_recording_rule_returns_series(prometheus: Prometheus) -> None:
    items = [(f"alert {r['alert']}", signal_of(r["expr"])) for r in rules() if "alert" in r]
    items += [(f"recording rule {r['record']}", r["expr"]) for r in rules() if "record" in r]
    items += [(f"recorded series {r['record']}", r["record"]) for r in rules() if "record" in r]
    wait_for(lambda: _returns_series(prometheus, items), prometheus)


def test_every_metric_named_exists(prometheus: Prometheus) -> None:
    """Each name in a dashboard or a rule is a series Prometheus has, a series a rule
    records, or (EVENT_ONLY) a metric a process declares."""
    exprs = [expr for _, expr in dashboard_queries()] + [r["expr"] for r in rules()]
    named = set().union(*(metric_names(e) for e in exprs))
    recorded = {r["record"] for r in rules() if "record" in r}

    def check() -> list[str]:
        have = set(prometheus.api("label/__name__/values")) | recorded
        declared = prometheus.declared()
        missing = named - have - (set(EVENT_ONLY) & declared)
        return [f"no such metric: {name}" for name in sorted(missing)]

    wait_for(check, prometheus)


def test_no_label_names_a_user_or_a_position(prometheus: Prometheus) -> None:
    labels = set(prometheus.api("labels", **{"match[]": '{__name__=~"earn_.+|grpc_.+"}'}))
    assert "job_name" in labels  # the scheduler's job label, renamed at scrape time
    assert not labels & FORBIDDEN_LABELS, labels & FORBIDDEN_LABELS
    products = prometheus.query("count(count by (product) (earn_simple_earn_positions_open))")
    assert products and float(products[0]["value"][1]) >= 1

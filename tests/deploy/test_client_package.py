"""The Python client package for internal consumers (protos/python, `make client`) and
the README's grpcurl examples.

- The wheel is built the way `make client` builds it (protos/python/build_client.py, into
  a temporary folder) and holds exactly the package: earn_client, and for every .proto
  the generated *_pb2.py, its *_pb2.pyi, *_pb2_grpc.py and its *_pb2_grpc.pyi, py.typed markers, dependency
  ranges that admit the platform's pinned grpcio and protobuf.
- It installs offline (`pip install --no-index`) into a fresh virtual environment. Its
  dependencies are the suite's own installed grpcio and protobuf, reached through a .pth
  file: nothing is downloaded, and nothing else of this repository is importable there
  (no build/gen, no services): whatever `earn` the examples import is the wheel's.
- Each example runs in that environment against a live process of its service (the
  wallet, Simple Earn, Launchpool, CandyDrop, HODLer, the market, Dual Investment, Smart
  Leverage, Crypto Loan) started on free ports, and its output is checked.
- Every RPC of every service is typed (request and response messages) in the generated
  *_pb2_grpc.pyi of build/gen and of the wheel.
- Every RPC of WalletService, SimpleEarnService, LaunchpoolService, MarketService and DualService has a
  grpcurl example in README.md
  whose request JSON parses into the request message, sent to the service's default port
  with a token whose role may call the method.
"""

from __future__ import annotations

import ast
import os
import time
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
import uuid
import zipfile
from decimal import Decimal
from email.parser import Parser
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.timestamp_pb2 import Timestamp
from packaging.requirements import Requirement

from earn.v1 import candydrop_pb2 as cd, candydrop_pb2_grpc, dual_pb2 as du, dual_pb2_grpc, hodler_pb2 as hd, hodler_pb2_grpc
from earn.v1 import launchpool_pb2 as lp, launchpool_pb2_grpc, leverage_pb2 as lv, leverage_pb2_grpc, loan_pb2 as ln, loan_pb2_grpc
from earn.v1 import market_pb2 as mk, market_pb2_grpc, simple_earn_pb2, wallet_pb2  # noqa: F401  (their services in the default pool)
from earn.v1 import wallet_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel import grpcclient
from services.kernel.config import REPO_ROOT
from tests.conftest import GATEWAY, OPERATOR, Env

PACKAGE = REPO_ROOT / "protos" / "python"
EXAMPLES = PACKAGE / "examples"
PROTO_MODULES = sorted(p.stem for p in (REPO_ROOT / "protos" / "earn" / "v1").glob("*.proto"))


def run(*args: str | Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH, no EARN_* tokens: the examples' defaults, the wheel's modules.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **{k: os.environ[k] for k in ("HOME", "TMPDIR") if k in os.environ}}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("client-build")
    done = run(sys.executable, PACKAGE / "build_client.py", "--stage", work / "stage", "--dist", work / "dist", cwd=REPO_ROOT)
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.parent == work / "dist" and path.name.startswith("earn_client-0.1.0-py3-none-any"), path
    return path


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (offline); its interpreter."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv).stdout.strip())
    # The dependencies: the suite's installed grpcio, protobuf (and typing-extensions).
    # A path line in a .pth adds that folder only: the .pth files in it (build/gen, the
    # editable install of services) are not processed.
    (site / "suite-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--quiet", "--disable-pip-version-check",
        wheel, cwd=venv)
    return python


def test_wheel_holds_the_stubs_their_types_and_the_helper(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    modules = {n for n in names if ".dist-info/" not in n}
    expected = {"earn_client/__init__.py", "earn_client/py.typed", "earn/v1/py.typed"}
    for stem in PROTO_MODULES:
        expected |= {f"earn/v1/{stem}_pb2{suffix}" for suffix in (".py", ".pyi", "_grpc.py", "_grpc.pyi")}
    assert modules == expected  # nothing else: no earn/__init__.py (a namespace, as in build/gen), no services

    assert metadata["Name"] == "earn-client" and metadata["Version"] == "0.1.0"
    requires = {Requirement(r).name: Requirement(r) for r in metadata.get_all("Requires-Dist")}
    assert set(requires) == {"grpcio", "protobuf"}
    pins = {Requirement(d).name: Requirement(d) for d in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, requirement in requires.items():
        (pinned,) = [spec.version for spec in pins[name].specifier]
        assert requirement.specifier.contains(pinned), f"{requirement} does not admit the platform's pin {name}=={pinned}"
        assert next(s for s in requirement.specifier if s.operator == ">=").version == pinned, requirement


def typed_rpcs(stub_pyi: str) -> dict[str, dict[str, str]]:
    """Per class of a *_pb2_grpc.pyi: its annotated attributes (name -> annotation source)."""
    tree = ast.parse(stub_pyi)
    return {
        node.name: {
            item.target.id: ast.unparse(item.annotation)
            for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
        }
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }


@pytest.mark.parametrize("where", ["build/gen", "wheel"])
def test_every_rpc_is_typed_in_the_grpc_stubs(where: str, wheel: Path) -> None:
    """The *_pb2_grpc.pyi (mypy-protobuf) types every method of every service's sync and
    async stub with its request and response messages, in build/gen (`make proto`) and in
    the wheel."""
    import importlib

    checked = 0
    for stem in PROTO_MODULES:
        module = importlib.import_module(f"earn.v1.{stem}_pb2")
        if where == "wheel":
            with zipfile.ZipFile(wheel) as archive:
                text = archive.read(f"earn/v1/{stem}_pb2_grpc.pyi").decode()
        else:
            text = (REPO_ROOT / "build" / "gen" / "earn" / "v1" / f"{stem}_pb2_grpc.pyi").read_text()
        classes = typed_rpcs(text)
        for service in module.DESCRIPTOR.services_by_name.values():
            for kind, callable_ in ((f"{service.name}Stub", "_grpc.UnaryUnaryMultiCallable"),
                                    (f"{service.name}AsyncStub", "_aio.UnaryUnaryMultiCallable")):
                assert kind in classes, f"{stem}_pb2_grpc.pyi has no {kind}"
                for method in service.methods:
                    expected = f"{callable_}[_{stem}_pb2.{method.input_type.name}, _{stem}_pb2.{method.output_type.name}]"
                    assert classes[kind].get(method.name) == expected, (kind, method.name, classes[kind].get(method.name))
                    checked += 1
    assert checked


def test_no_generated_code_is_committed() -> None:
    tracked = subprocess.run(["git", "ls-files", "protos"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not [p for p in tracked if re.search(r"_pb2(_grpc)?\.pyi?$", p)]


CHECK_IMPORTS = """
import sys, sysconfig
from pathlib import Path
import grpc
import earn, earn_client
from earn.v1 import accrual_pb2, events_pb2, simple_earn_pb2, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc
site = Path(sysconfig.get_paths()["purelib"])
for module in (earn_client, accrual_pb2, events_pb2, simple_earn_pb2, wallet_pb2, wallet_pb2_grpc):
    path = Path(module.__file__)
    assert path.is_relative_to(site), path
    assert module is earn_client or path.with_suffix(".pyi").is_file(), path
assert [Path(p) for p in earn.__path__] == [site / "earn"], earn.__path__
assert (site / "earn_client" / "py.typed").is_file() and (site / "earn" / "v1" / "py.typed").is_file()
try:
    import services
except ImportError:
    pass
else:
    raise AssertionError("the repository's services are importable: " + str(services.__path__))
with earn_client.connect("127.0.0.1:1", "t") as channel:
    assert isinstance(earn_client.wallet(channel), wallet_pb2_grpc.WalletServiceStub)
    assert isinstance(earn_client.simple_earn(channel), simple_earn_pb2_grpc.SimpleEarnServiceStub)
    import importlib
    for name, service in (("launchpool", "Launchpool"), ("candydrop", "CandyDrop"), ("hodler", "Hodler"), ("market", "Market"),
                          ("dual", "Dual"), ("leverage", "Leverage"), ("loan", "Loan")):
        stub = getattr(importlib.import_module(f"earn.v1.{name}_pb2_grpc"), f"{service}ServiceStub")
        assert isinstance(getattr(earn_client, name)(channel), stub), name
        assert name in earn_client.__all__, name
    try:
        earn_client.wallet(channel).GetBalances(wallet_pb2.GetBalancesRequest(owner="a"), timeout=2)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    else:
        raise AssertionError("a call to a closed port succeeded")
for bad in ("", " t", "t\\n"):
    try:
        earn_client.connect("127.0.0.1:1", bad)
    except ValueError:
        pass
    else:
        raise AssertionError(repr(bad))
print("ok", wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name)
"""


def test_installed_wheel_exposes_stubs_types_and_helper(client_python: Path, tmp_path: Path) -> None:
    done = run(client_python, "-c", CHECK_IMPORTS, cwd=tmp_path)
    assert done.stdout.split() == ["ok", "earn.v1.WalletService"]


def lines(output: str, prefix: str) -> list[list[str]]:
    return [line.split()[1:] for line in output.splitlines() if line.startswith(prefix + ":")]


@pytest.mark.integration
def test_examples_run_against_live_services(
    client_python: Path, wallet_process: ManagedProcess, earn_process: ManagedProcess, tmp_path: Path
) -> None:
    user, product = f"client-{uuid.uuid4().hex[:8]}", f"client-flex-{uuid.uuid4().hex[:8]}"
    tls = ["--tls-dir", wallet_process.env.get("EARN_TLS_DIR", "")]  # mTLS when the suite runs with it
    wallet = [client_python, EXAMPLES / "wallet_example.py", "--address", wallet_process.address or "", *tls]
    earn = [client_python, EXAMPLES / "simple_earn_example.py", "--address", earn_process.address or "", "--user", user,
            "--product", product, *tls]

    out = run(*wallet, "--owner", user, "--amount", "1.5", cwd=tmp_path).stdout
    (deposit,) = lines(out, "deposit")
    assert deposit[2:] == ["1.5", "BTC", "exchange/ACCOUNT_KIND_EXTERNAL", "->", f"{user}/ACCOUNT_KIND_FUNDING"], out
    assert lines(out, "balance") == [[user, "BTC", "ACCOUNT_KIND_FUNDING", "1.5"]], out

    out = run(*earn, "--amount", "0.1", cwd=tmp_path).stdout
    assert lines(out, "created") == [[product]], out
    (mine,) = [p for p in lines(out, "product") if p[0] == product]
    assert mine[:4] == [product, "BTC", "PRODUCT_KIND_FLEXIBLE", "PRODUCT_STATUS_ACTIVE"], out
    (subscribed,) = lines(out, "subscribed")
    assert subscribed[:4] == ["0.1", "BTC", "to", f"{product}:"], out
    (position,) = lines(out, "position")
    assert position[1:5] == [product, "0.1", "BTC", "POSITION_STATUS_ACTIVE"], out

    # Again: the product exists (not created twice); the flexible position grows.
    out = run(*earn, "--amount", "0.25", cwd=tmp_path).stdout
    assert not lines(out, "created"), out
    assert [p[:3] for p in lines(out, "position")] == [[position[0], product, "0.35"]], out

    out = run(*wallet, "--owner", user, "--amount", "0.5", cwd=tmp_path).stdout
    balances = {b[2]: Decimal(b[3]) for b in lines(out, "balance")}
    assert balances == {"ACCOUNT_KIND_FUNDING": Decimal("1.65"), "ACCOUNT_KIND_HOLD": Decimal("0.35")}, out



PRODUCT_SERVICES = ("market", "launchpool", "candydrop", "hodler", "dual", "leverage", "loan")


@pytest.fixture(scope="module")
def product_processes(stack: Env, wallet_process: ManagedProcess) -> Iterator[dict[str, ManagedProcess]]:
    """The other services, started together (their ports are known before they listen)."""
    wallet = wallet_process.address or ""
    market = stack.process("market")
    upstream = {"EARN_WALLET_ADDRESS": wallet, "EARN_MARKET_ADDRESS": market.address or ""}
    procs = {"market": market, **{name: stack.process(name, **upstream) for name in PRODUCT_SERVICES[1:]}}
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready(timeout=120)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def seed(procs: dict[str, ManagedProcess], wallet_address: str, user: str, tag: str, hour: int) -> None:
    """What the examples read: a price, one of each product (operator), a deposit, a Dual
    subscription and a CandyDrop registration of ``user`` (gateway); ``hour``: the unix hour now."""

    def stub(name: str, make: type) -> object:
        return make(channels.setdefault(name, grpcclient.sync_channel(procs[name].address or "")))

    channels: dict[str, object] = {}
    try:
        key = iter(f"client-example-{tag}-{i}" for i in range(100))
        stub("market", market_pb2_grpc.MarketServiceStub).BackfillPrices(mk.BackfillPricesRequest(
            idempotency_key=next(key), pair="BTC/USDT", ticks=[mk.BackfillTick(price="61234.5", event_time=ts((hour - 1) * 3600))],
        ), metadata=OPERATOR, timeout=10)
        stub("launchpool", launchpool_pb2_grpc.LaunchpoolServiceStub).CreateProject(lp.CreateProjectRequest(
            idempotency_key=next(key), project_id=f"prj-{tag}", reward_asset="BTC", start_time=ts((hour + 2) * 3600),
            end_time=ts((hour + 6) * 3600),
            pools=[lp.RewardPoolSpec(pool_id=f"pool-{tag}", stake_asset="USDT", total_reward="1", min_stake="1", max_stake="10")],
        ), metadata=OPERATOR, timeout=10)
        candydrop = stub("candydrop", candydrop_pb2_grpc.CandyDropServiceStub)
        live = int(time.time()) // 3600  # active now; read right before the call, as the service rejects a start before its current hour
        candydrop.CreateCampaign(cd.CreateCampaignRequest(
            idempotency_key=next(key), campaign_id=f"cmp-{tag}", prize_asset="USDT", prize_pool="1000", pool_kind=cd.PRIZE_POOL_KIND_PRO_RATA,
            start_time=ts(live * 3600), end_time=ts((live + 24) * 3600),
            tasks=[cd.CandyTask(task_id="spot", kind=cd.CANDY_TASK_KIND_SPOT_VOLUME, asset="USDT", threshold="100", candies=1,
                                max_completions=5)],
        ), metadata=OPERATOR, timeout=10)
        candydrop.Register(cd.RegisterRequest(idempotency_key=next(key), user_id=user, campaign_id=f"cmp-{tag}"), metadata=GATEWAY, timeout=10)
        stub("hodler", hodler_pb2_grpc.HodlerServiceStub).CreateAirdrop(hd.CreateAirdropRequest(
            idempotency_key=next(key), airdrop_id=f"air-{tag}", hold_asset="GT", reward_asset="USDT", total="1000", start_hour=hour + 2,
            end_hour=hour + 26, per_user_cap="500",
        ), metadata=OPERATOR, timeout=10)
        with grpcclient.sync_channel(wallet_address) as wallet_channel:
            wallet_pb2_grpc.WalletServiceStub(wallet_channel).Deposit(wallet_pb2.DepositRequest(
                idempotency_key=next(key), owner=user, asset="BTC", amount="1"), metadata=OPERATOR, timeout=10)
        dual = stub("dual", dual_pb2_grpc.DualServiceStub)
        dual.CreateDualPlan(du.CreateDualPlanRequest(
            idempotency_key=next(key), plan_id=f"dual-{tag}", base_asset="BTC", quote_asset="USDT", direction=du.DUAL_DIRECTION_SELL_HIGH,
            strike="60000", apr="0.1", settlement_time=ts((hour + 48) * 3600), min_amount="0.01", max_per_user="1", quota="1.2",
        ), metadata=OPERATOR, timeout=10)
        dual.SubscribeDual(du.SubscribeDualRequest(client_order_id=next(key), user_id=user, plan_id=f"dual-{tag}", amount="0.5"),
                           metadata=GATEWAY, timeout=10)
        stub("leverage", leverage_pb2_grpc.LeverageServiceStub).CreateLeverageProduct(lv.CreateLeverageProductRequest(
            idempotency_key=next(key), product_id=f"lev-{tag}", pair="BTC/USDT", max_leverage="20", fee_rate="0.005", min_principal="10",
            max_principal="50",
        ), metadata=OPERATOR, timeout=10)
        loan = stub("loan", loan_pb2_grpc.LoanServiceStub)
        loan.SetLoanAsset(ln.SetLoanAssetRequest(idempotency_key=next(key), asset=ln.LoanAsset(
            asset="USDT", hourly_rate="0.000005", min_borrow="10", max_borrow="100000")), metadata=OPERATOR, timeout=10)
        loan.SetLoanCollateralAsset(ln.SetLoanCollateralAssetRequest(idempotency_key=next(key), collateral=ln.LoanCollateralAsset(
            asset="BTC", discount="0.95")), metadata=OPERATOR, timeout=10)
    finally:
        for channel in channels.values():
            channel.close()  # type: ignore[attr-defined]


@pytest.mark.integration
def test_every_other_example_runs_against_its_live_service(
    client_python: Path, wallet_process: ManagedProcess, product_processes: dict[str, ManagedProcess], tmp_path: Path
) -> None:
    tag, hour = uuid.uuid4().hex[:8], int(time.time()) // 3600
    user, other = f"client-{tag}", f"client-other-{tag}"
    seed(product_processes, wallet_process.address or "", user, tag, hour)
    tls = ["--tls-dir", wallet_process.env.get("EARN_TLS_DIR", "")]  # mTLS when the suite runs with it

    def example(name: str, *args: str) -> str:
        address = product_processes[name].address or ""
        return run(client_python, EXAMPLES / f"{name}_example.py", "--address", address, *tls, *args, cwd=tmp_path).stdout

    out = example("market", "--pair", "BTC/USDT", "--pair", "ETH/USDT")
    assert lines(out, "index") == [["BTC/USDT", "61234.5", ts((hour - 1) * 3600).ToJsonString(), "backfill"],
                                   ["ETH/USDT", "none"]], out

    out = example("launchpool", "--user", user, "--price", "BTC=60000", "--price", "USDT=1")
    (project,) = [p for p in lines(out, "project") if p[0] == f"prj-{tag}"]
    assert project[1:3] == ["BTC", "PROJECT_STATUS_UPCOMING"], out
    (pool,) = [p for p in lines(out, "pool") if p[0] == f"pool-{tag}"]
    assert pool[1:] == [f"prj-{tag}", "stake", "USDT", "reward", "1", "staked", "0", "stakers", "0", "APR", "-"], out
    assert not lines(out, "stake"), out

    out = example("candydrop", "--user", user)
    (campaign,) = [c for c in lines(out, "campaign") if c[0] == f"cmp-{tag}"]
    assert campaign[1:5] == ["1000", "USDT", "PRIZE_POOL_KIND_PRO_RATA", "CAMPAIGN_STATUS_ACTIVE"], out
    assert [t for t in lines(out, "task") if t[0] == f"cmp-{tag}"] == [
        [f"cmp-{tag}", "spot", "CANDY_TASK_KIND_SPOT_VOLUME", "100", "USDT", "candies", "1", "up", "to", "5", "times"]], out
    (progress,) = [p for p in lines(out, "progress") if p[0] == f"cmp-{tag}"]
    assert progress == [f"cmp-{tag}", user, "registered", "candies", "0", "estimated", "prize", "0"], out

    out = example("hodler", "--user", other)
    (airdrop,) = [a for a in lines(out, "airdrop") if a[0] == f"air-{tag}"]
    assert airdrop[1:6] == ["hold", "GT", "reward", "1000", "USDT"] and airdrop[-3:-1] == ["AIRDROP_STATUS_UPCOMING", "holders"], out
    (holding,) = [h for h in lines(out, "holding") if h[0] == f"air-{tag}"]
    assert holding == [f"air-{tag}", other, "balance", "0", "average", "0", "estimated", "reward", "0"], out

    out = example("dual", "--user", user, "--base", "BTC", "--quote", "USDT")
    (plan,) = [p for p in lines(out, "plan") if p[0] == f"dual-{tag}"]
    assert plan[1:7] == ["BTC/USDT", "DUAL_DIRECTION_SELL_HIGH", "strike", "60000", "APR", "0.1"], out
    (subscription,) = lines(out, "subscription")
    assert subscription[1:4] == [f"dual-{tag}", "0.5", "BTC"], out

    out = example("leverage", "--user", user, "--pair", "BTC/USDT")
    (product,) = [p for p in lines(out, "product") if p[0] == f"lev-{tag}"]
    assert product[1:9] == ["BTC/USDT", "max", "leverage", "20", "fee", "0.005", "principal", "10-50"], out
    assert not lines(out, "position"), out

    out = example("loan", "--user", user)
    assert ["USDT", "hourly", "rate", "0.000005", "borrow", "10-100000"] in lines(out, "asset"), out
    assert ["BTC", "discount", "0.95"] in lines(out, "collateral"), out
    assert not lines(out, "loan"), out


# ---- README: grpcurl examples for every RPC ----

DEV_TOKENS = {"dev-gateway": "gateway", "dev-operator": "operator", "dev-service": "service"}
DEFAULT_PORTS = {"earn.v1.WalletService": 50051, "earn.v1.SimpleEarnService": 50052, "earn.v1.LaunchpoolService": 50053,
                 "earn.v1.MarketService": 50055, "earn.v1.DualService": 50056, "earn.v1.CandyDropService": 50054,
                 "earn.v1.LeverageService": 50057, "earn.v1.LoanService": 50058, "earn.v1.HodlerService": 50059}


README_TLS = {"-cacert": ".data/tls/ca.pem", "-cert": ".data/tls/tool.pem", "-key": ".data/tls/tool.key"}


def readme_grpcurl_calls() -> list[dict[str, object]]:
    """Every `grpcurl ... <address> <service>/<method>` in README.md's sh blocks."""
    calls = []
    for block in re.findall(r"```sh\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S):
        if "grpcurl" not in block:
            continue
        tokens = shlex.split(block.replace("\\\n", " "), comments=True)
        starts = [i for i, t in enumerate(tokens) if t == "grpcurl"] + [len(tokens)]
        for start, end in zip(starts, starts[1:]):
            args, call, positional = iter(tokens[start + 1:end]), {"headers": [], "data": None}, []
            for arg in args:
                if arg == "-H":
                    call["headers"].append(next(args))
                elif arg == "-d":
                    call["data"] = next(args)
                elif arg in README_TLS:
                    call[arg] = next(args)
                elif arg.startswith("-"):
                    pytest.fail(f"unexpected grpcurl flag {arg} in {tokens[start:end]}")
                else:
                    positional.append(arg)
            # mTLS: every call presents the tool certificate (its role named by the token)
            assert {flag: call.get(flag) for flag in README_TLS} == README_TLS, tokens[start:end]
            assert positional and re.fullmatch(r"127\.0\.0\.1:\d+", positional[0]), tokens[start:end]
            assert len(positional) <= 3, f"not one grpcurl command: {tokens[start:end]}"
            call["address"], call["target"] = positional[0], positional[1:]
            calls.append(call)
    return calls


def test_readme_has_a_correct_grpcurl_example_for_every_rpc() -> None:
    from services.candydrop.api import ROLES as CANDYDROP_ROLES
    from services.dual.api import ROLES as DUAL_ROLES
    from services.hodler.api import ROLES as HODLER_ROLES
    from services.launchpool.api import ROLES as LAUNCHPOOL_ROLES
    from services.leverage.api import ROLES as LEVERAGE_ROLES
    from services.loan.api import ROLES as LOAN_ROLES
    from services.market.api import ROLES as MARKET_ROLES
    from services.simple_earn.api import ROLES as SIMPLE_EARN_ROLES
    from services.wallet.api import ROLES as WALLET_ROLES

    roles = {**WALLET_ROLES, **SIMPLE_EARN_ROLES, **LAUNCHPOOL_ROLES, **MARKET_ROLES, **DUAL_ROLES, **CANDYDROP_ROLES, **LEVERAGE_ROLES, **LOAN_ROLES, **HODLER_ROLES}
    pool = descriptor_pool.Default()
    shown: set[str] = set()
    for call in readme_grpcurl_calls():
        target = call["target"]
        if len(target) != 1 or not str(target[0]).startswith("earn.v1."):
            continue  # list, describe, health
        service_name, _, method_name = str(target[0]).partition("/")
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        assert method is not None, target
        where = f"README: grpcurl {service_name}/{method_name}"
        assert call["address"] == f"127.0.0.1:{DEFAULT_PORTS[service_name]}", where
        request = message_factory.GetMessageClass(method.input_type)()
        try:
            json_format.Parse(call["data"] or "{}", request)
        except json_format.ParseError as err:
            pytest.fail(f"{where}: the request JSON is not a {method.input_type.full_name}: {err}")
        (header,) = call["headers"]
        token = re.fullmatch(r"authorization: Bearer (\S+)", header)
        assert token and token.group(1) in DEV_TOKENS, f"{where}: {header!r}"
        assert DEV_TOKENS[token.group(1)] in roles[f"{service_name}/{method_name}"], f"{where}: role {DEV_TOKENS[token.group(1)]} may not call it"
        shown.add(f"{service_name}/{method_name}")
    every = {f"{name}/{m.name}" for name in DEFAULT_PORTS for m in pool.FindServiceByName(name).methods}
    assert not every - shown, f"README has no grpcurl example for {sorted(every - shown)}"

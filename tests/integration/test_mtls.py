"""Issue 8, Security: mTLS between all processes, the caller's role from its certificate.

Every gRPC service runs here as a real process with EARN_TLS_DIR set (certificates issued
by services.kernel.tls into a scratch directory). The tests check that the transport
refuses plaintext, clients without a certificate and certificates of another CA; that for
EVERY method of EVERY service (from the generated descriptors) each identity the method's
role table does not allow gets PERMISSION_DENIED and each allowed identity gets past
authorization (an empty request then fails validation, or succeeds: anything but
PERMISSION_DENIED/UNAUTHENTICATED); that the `tool` identity names its role by token and
no other identity can; and two static checks: no SQL built by string formatting in
services/, no secrets in logs.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from earn.v1 import (
    accrual_pb2, candydrop_pb2, dual_pb2, launchpool_pb2, leverage_pb2, loan_pb2, market_pb2, simple_earn_pb2, wallet_pb2,
)
from services.candydrop.api import ROLES as CANDYDROP_ROLES
from services.devstack.processes import ManagedProcess
from services.dual.api import ROLES as DUAL_ROLES
from services.kernel import grpcclient, tls
from services.kernel.config import REPO_ROOT
from services.kernel.grpcserver import GATEWAY, IDENTITY_ROLES, OPERATOR, SERVICE, SERVICE_IDENTITIES, TOOL
from services.launchpool.api import ROLES as LAUNCHPOOL_ROLES
from services.leverage.api import ROLES as LEVERAGE_ROLES
from services.loan.api import ROLES as LOAN_ROLES
from services.market.api import ROLES as MARKET_ROLES
from services.simple_earn.api import ROLES as EARN_ROLES
from services.wallet.api import ROLES as WALLET_ROLES
from tests.conftest import Env

# process name -> (the service's descriptor, its role table)
SERVICES = {
    "wallet": (wallet_pb2.DESCRIPTOR.services_by_name["WalletService"], WALLET_ROLES),
    "simple_earn": (simple_earn_pb2.DESCRIPTOR.services_by_name["SimpleEarnService"], EARN_ROLES),
    "launchpool": (launchpool_pb2.DESCRIPTOR.services_by_name["LaunchpoolService"], LAUNCHPOOL_ROLES),
    "candydrop": (candydrop_pb2.DESCRIPTOR.services_by_name["CandyDropService"], CANDYDROP_ROLES),
    "market": (market_pb2.DESCRIPTOR.services_by_name["MarketService"], MARKET_ROLES),
    "dual": (dual_pb2.DESCRIPTOR.services_by_name["DualService"], DUAL_ROLES),
    "leverage": (leverage_pb2.DESCRIPTOR.services_by_name["LeverageService"], LEVERAGE_ROLES),
    "loan": (loan_pb2.DESCRIPTOR.services_by_name["LoanService"], LOAN_ROLES),
}
# A certificate per role (the service role through one of the platform's processes).
ROLE_IDENTITIES = {GATEWAY: "gateway", OPERATOR: "operator", SERVICE: "scheduler"}
TOKENS = {GATEWAY: "dev-gateway", OPERATOR: "dev-operator", SERVICE: "dev-service"}
REFUSED_BY_AUTH = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    tls.ensure(directory)
    tls.ensure(directory, ["mallory"])  # signed by our CA, but not in the identity table
    return directory


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-ca")
    tls.ensure(directory, ["tool", "operator"])
    return directory


@pytest.fixture(scope="module")
def processes(stack: Env, tls_dir: Path) -> Iterator[dict[str, ManagedProcess]]:
    """Every gRPC service, mTLS on, each presenting its own identity."""
    mtls = Env(stack.settings, {**stack.env, "EARN_TLS_DIR": str(tls_dir)})
    started: dict[str, ManagedProcess] = {}

    def start(name: str, **env: str) -> ManagedProcess:
        proc = mtls.process(name, **env)
        proc.start()
        started[name] = proc
        proc.wait_ready(timeout=60)
        return proc

    try:
        wallet = start("wallet")
        market = start("market")
        peers = {"EARN_WALLET_ADDRESS": wallet.address or "", "EARN_MARKET_ADDRESS": market.address or ""}
        # Simple Earn's wallet token is wrong on purpose: over mTLS its certificate, not the
        # token, makes it a service (test_services_call_each_other_by_certificate).
        start("simple_earn", **peers, EARN_WALLET_TOKEN="not-a-token")
        for name in ("launchpool", "candydrop", "dual", "leverage", "loan"):
            start(name, **peers, EARN_MAX_INDEX_AGE_SECONDS="86400")
        yield started
    finally:
        for proc in reversed(started.values()):
            proc.stop()


def _empty_call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    """A call of ``method`` with an empty request (all fields default), answer as bytes."""
    return channel.unary_unary(f"/{method}", request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)


async def _code(channel: grpc.aio.Channel, method: str, metadata: tuple = ()) -> grpc.StatusCode:
    try:
        await _empty_call(channel, method)(None, metadata=metadata, timeout=20)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _methods(name: str) -> list[str]:
    descriptor, _ = SERVICES[name]
    return [f"{descriptor.full_name}/{method.name}" for method in descriptor.methods]


def test_identity_table_covers_every_process_that_calls_another() -> None:
    from services.devstack.processes import PROCESSES

    for spec in PROCESSES:
        identity = spec.tls_identity or spec.name
        assert identity in IDENTITY_ROLES, f"{spec.name} presents {identity!r}, which has no role"
    assert {IDENTITY_ROLES[name] for name in SERVICE_IDENTITIES} == {SERVICE}
    assert IDENTITY_ROLES[GATEWAY] == GATEWAY and IDENTITY_ROLES[OPERATOR] == OPERATOR and IDENTITY_ROLES[TOOL] is None


def test_role_tables_name_exactly_the_described_methods() -> None:
    for name, (_, roles) in SERVICES.items():
        assert set(roles) == set(_methods(name)), f"{name}: role table and proto differ"


def test_certificates_are_reused_and_reissued_when_invalid(tmp_path: Path) -> None:
    assert tls.ensure(tmp_path, ["tool"]) == ["ca", "tool"]
    assert tls.ensure(tmp_path, ["tool"]) == []
    tls.cert_path(tmp_path, "tool").write_text("garbage")
    assert tls.ensure(tmp_path, ["tool"]) == ["tool"]
    creds = tls.load(tmp_path, "tool")
    assert b"PRIVATE KEY" in creds.key and b"CERTIFICATE" in creds.cert and b"CERTIFICATE" in creds.ca
    with pytest.raises(FileNotFoundError, match="nobody.pem"):
        tls.load(tmp_path, "nobody")


async def test_plaintext_client_is_refused(processes: dict[str, ManagedProcess]) -> None:
    for name in SERVICES:
        async with grpcclient.channel(processes[name].address or "", tls_dir="") as channel:
            code = await _code(channel, _methods(name)[0], (("authorization", "Bearer dev-operator"),))
        assert code == grpc.StatusCode.UNAVAILABLE, name


async def test_client_without_certificate_is_refused(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    ca = tls.cert_path(tls_dir, "ca").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)  # trusts the server, presents nothing
    for name in SERVICES:
        async with grpc.aio.secure_channel(processes[name].address or "", creds) as channel:
            code = await _code(channel, _methods(name)[0], (("authorization", "Bearer dev-operator"),))
        assert code == grpc.StatusCode.UNAVAILABLE, name


async def test_certificate_of_another_ca_is_refused(processes: dict[str, ManagedProcess], tls_dir: Path, other_ca: Path) -> None:
    ours = tls.cert_path(tls_dir, "ca").read_bytes()
    for identity in ("tool", "operator"):
        theirs = tls.load(other_ca, identity)
        creds = grpc.ssl_channel_credentials(root_certificates=ours, private_key=theirs.key, certificate_chain=theirs.cert)
        for name in SERVICES:
            async with grpc.aio.secure_channel(processes[name].address or "", creds) as channel:
                code = await _code(channel, _methods(name)[0], (("authorization", "Bearer dev-operator"),))
            assert code == grpc.StatusCode.UNAVAILABLE, (identity, name)


async def test_server_of_another_ca_is_not_trusted(processes: dict[str, ManagedProcess], other_ca: Path) -> None:
    """The client side checks too: a channel trusting another CA does not talk to ours."""
    async with grpcclient.channel(processes["wallet"].address or "", tls_dir=str(other_ca), identity="operator") as channel:
        assert await _code(channel, _methods("wallet")[0]) == grpc.StatusCode.UNAVAILABLE


async def test_unknown_identity_of_our_ca_is_unauthenticated(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    for name in SERVICES:
        async with grpcclient.channel(processes[name].address or "", tls_dir=str(tls_dir), identity="mallory") as channel:
            for method in _methods(name):
                code = await _code(channel, method, (("authorization", "Bearer dev-operator"),))
                assert code == grpc.StatusCode.UNAUTHENTICATED, method


async def test_every_method_every_role_by_certificate(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    """Each identity gets exactly what the method's role table gives its role. The bearer
    token of another role is sent along and must not matter: only `tool` may use one."""
    checked = 0
    for name, (_, roles) in SERVICES.items():
        for role, identity in ROLE_IDENTITIES.items():
            other_token = TOKENS[OPERATOR if role != OPERATOR else GATEWAY]
            async with grpcclient.channel(processes[name].address or "", tls_dir=str(tls_dir), identity=identity) as channel:
                for method in _methods(name):
                    code = await _code(channel, method, (("authorization", f"Bearer {other_token}"),))
                    if role in roles[method]:
                        assert code not in REFUSED_BY_AUTH, f"{identity} refused {method}: {code}"
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, f"{identity} got {code} from {method}"
                    checked += 1
    assert checked == 3 * sum(len(_methods(name)) for name in SERVICES)


async def test_every_method_every_role_by_tool_token(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    """The `tool` certificate (grpcurl, tests, load drivers) acts in the role its token names,
    and without a valid token is UNAUTHENTICATED."""
    for name, (_, roles) in SERVICES.items():
        async with grpcclient.channel(processes[name].address or "", tls_dir=str(tls_dir), identity=TOOL) as channel:
            for method in _methods(name):
                for role, token in TOKENS.items():
                    code = await _code(channel, method, (("authorization", f"Bearer {token}"),))
                    if role in roles[method]:
                        assert code not in REFUSED_BY_AUTH, f"tool as {role} refused {method}: {code}"
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, f"tool as {role} got {code} from {method}"
                for metadata in ((), (("authorization", "Bearer not-a-token"),)):
                    assert await _code(channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, method


async def test_services_call_each_other_by_certificate(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    """A real service-to-service call over mTLS: Simple Earn places a wallet hold when a user
    subscribes, presenting its certificate (its bearer token is invalid); the product and
    the deposit come from the operator's certificate."""
    from decimal import Decimal

    from earn.v1 import simple_earn_pb2_grpc, wallet_pb2_grpc
    from tests.conftest import unique

    address = {name: processes[name].address or "" for name in ("wallet", "simple_earn")}
    async with (
        grpcclient.channel(address["wallet"], tls_dir=str(tls_dir), identity="operator") as wch,
        grpcclient.channel(address["simple_earn"], tls_dir=str(tls_dir), identity="operator") as op,
        grpcclient.channel(address["simple_earn"], tls_dir=str(tls_dir), identity="gateway") as gw,
    ):
        wallet, earn_op, earn_gw = wallet_pb2_grpc.WalletServiceStub(wch), simple_earn_pb2_grpc.SimpleEarnServiceStub(op), simple_earn_pb2_grpc.SimpleEarnServiceStub(gw)
        user = unique("u")
        await wallet.Deposit(wallet_pb2.DepositRequest(idempotency_key=unique(), owner=user, asset="USDT", amount="100"))
        product = (await earn_op.CreateProduct(simple_earn_pb2.CreateProductRequest(
            idempotency_key=unique(), product_id=unique("p"), asset="USDT", kind=simple_earn_pb2.PRODUCT_KIND_FLEXIBLE,
            tiers=[accrual_pb2.RateTier(up_to="", apr="0.05")], min_subscription="1",
        ))).product
        await earn_gw.Subscribe(simple_earn_pb2.SubscribeRequest(
            idempotency_key=unique(), user_id=user, product_id=product.product_id, amount="40",
        ))
        balances = await wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner=user, asset="USDT"))
        funding = {b.kind: Decimal(b.balance) for b in balances.balances}
        assert funding[wallet_pb2.ACCOUNT_KIND_FUNDING] == Decimal("60")


# ---------------------------------------------------------------- static checks

SQL_CALLS = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_records_to_table", "cursor", "prepare"})
# Reviewed uses of a formatted SQL string: (path, enclosing function) -> why it is safe.
# Values always travel as $n parameters; what is formatted in is SQL text chosen by code.
SQL_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("services/candydrop/store.py", "list_campaigns"): "WHERE clause picked from the constant _STATUS_SQL by an enum",
    ("services/candydrop/store.py", "list_prizes"): "fixed clauses joined with AND; only $n placeholder numbers are formatted",
    ("services/hodler/store.py", "list_airdrops"): "WHERE clause picked from the constant _STATUS_SQL by an enum",
    ("services/hodler/store.py", "count_by_status"): "WHERE clauses of the constant _STATUS_SQL",
    ("services/hodler/store.py", "list_rewards"): "fixed clauses joined with AND; only $n placeholder numbers are formatted",
    ("services/kernel/distribution.py", "parent_row"): "table and key column names of the caller's constant Ledger (checked identifiers); values are $n parameters; FOR UPDATE or nothing",
    ("services/kernel/distribution.py", "unpaid_chunks"): "table and key column names of the caller's constant Ledger (checked identifiers); values are $n parameters",
    ("services/kernel/distribution.py", "chunk_paid"): "table and key column names of the caller's constant Ledger (checked identifiers); values are $n parameters",
    ("services/kernel/distribution.py", "mark_distributed"): "table and key column names of the caller's constant Ledger (checked identifiers); values are $n parameters",
    ("services/kernel/distribution.py", "distributed_by"): "table and key column names of the caller's constant Ledger (checked identifiers); values are $n parameters",
    ("services/devstack/infra.py", "ensure_database"): "CREATE DATABASE needs an identifier (no parameters in DDL): _quote_ident",
    ("services/devstack/infra.py", "ensure"): "the nested coroutine of ensure_database (same statement)",
    ("services/devstack/infra.py", "drop_database"): "DROP DATABASE needs an identifier: _quote_ident",
    ("services/devstack/infra.py", "drop"): "the nested coroutine of drop_database (same statement)",
    ("services/kernel/db.py", "migrate"): "schema name from code, checked by _checked (identifier grammar) and quoted",
    ("services/simple_earn/store.py", "list_interest"): "fixed fragments and $n placeholder numbers; values are parameters",
    ("services/simple_earn/store.py", "list_records"): "table asserted to be subscriptions or redemptions; _time_clause emits fixed text",
}


def _constant(node: ast.expr) -> bool:
    """A piece of SQL text fixed in the code: a literal, a module constant (UPPER_CASE name),
    a choice between such pieces, or an f-string / concatenation of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, int))
    if isinstance(node, ast.Name):
        return node.id.lstrip("_").isupper()
    if isinstance(node, ast.IfExp):
        return _constant(node.body) and _constant(node.orelse)
    if isinstance(node, ast.JoinedStr):
        return all(_constant(v.value) if isinstance(v, ast.FormattedValue) else True for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _constant(node.left) and _constant(node.right)
    return False


def _formatted_sql() -> list[tuple[str, str, int]]:
    """(path, function, line) of every SQL call in services/ whose query is an f-string or
    built with % / + / .format from anything but constants of the code."""
    found = []
    for path in sorted((REPO_ROOT / "services").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS and node.args):
                    continue
                query = node.args[0]
                formatted = (
                    isinstance(query, ast.JoinedStr)
                    or (isinstance(query, ast.BinOp) and isinstance(query.op, (ast.Mod, ast.Add)))
                    or (isinstance(query, ast.Call) and isinstance(query.func, ast.Attribute) and query.func.attr == "format")
                )
                if formatted and not _constant(query):
                    found.append((str(path.relative_to(REPO_ROOT)), func.name, node.lineno))
    return sorted(set(found))


def test_no_sql_is_built_by_string_formatting() -> None:
    found = _formatted_sql()
    unreviewed = [f"{path}:{line} in {func}" for path, func, line in found if (path, func) not in SQL_EXCEPTIONS]
    assert not unreviewed, "SQL built by string formatting (use $n parameters, or review and list it):\n" + "\n".join(unreviewed)
    stale = set(SQL_EXCEPTIONS) - {(path, func) for path, func, _ in found}
    assert not stale, f"reviewed exceptions that no longer exist: {stale}"


def test_log_lines_never_carry_secrets(tls_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.kernel import logs

    key = tls.load(tls_dir, "tool").key.decode()
    logs.configure("INFO")
    log = logging.getLogger("test_mtls")
    try:
        log.info("calling with Bearer dev-operator")
        log.info("metadata %s", {"authorization": "Bearer dev-service"})
        log.info("loaded", extra={"token": "dev-gateway", "private_key": key, "method": "m"})
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    out = capsys.readouterr().err
    assert out.count("[redacted]") >= 5
    for secret in ("dev-operator", "dev-service", "dev-gateway", "PRIVATE KEY", key.splitlines()[1]):
        assert secret not in out


def test_process_logs_carry_no_secrets(processes: dict[str, ManagedProcess], tls_dir: Path) -> None:
    """What the real processes of this module wrote: no token, no private key."""
    keys = [tls.load(tls_dir, identity).key.decode().splitlines()[1] for identity in IDENTITY_ROLES]
    for proc in processes.values():
        text = proc.logfile.read_text(errors="replace")
        assert '"mtls": true' in text, f"{proc.name} did not serve mTLS"
        for secret in ("Bearer dev-", "PRIVATE KEY", *keys):
            assert secret not in text, f"{proc.name}'s log holds a secret"

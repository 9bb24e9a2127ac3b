"""Shared fixtures: the real PostgreSQL and Kafka started by `make test`, a fresh test
database and topic prefix per run, and service processes the tests can stop and kill.

Integration tests never skip: a missing server fails the run with what to do.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import grpc
from services.kernel import grpcclient
import hypothesis
import pytest
from kafka.admin import KafkaAdminClient

from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec
from services.kernel.config import Settings


# Property tests: the suite (`make test`, CI) runs a fixed set of examples per test, so a
# run's result does not depend on the draw; `HYPOTHESIS_PROFILE=explore make test` draws
# new examples (ten times as many) to look for counterexamples, which hypothesis then
# keeps in .hypothesis/ and replays first. No deadline: the machines are shared, and a
# per-example time limit is a timing assertion.
hypothesis.settings.register_profile("suite", derandomize=True, deadline=None, print_blob=True)
hypothesis.settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True, max_examples=1000)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

OPERATOR = (("authorization", "Bearer dev-operator"),)
GATEWAY = (("authorization", "Bearer dev-gateway"),)
SERVICE = (("authorization", "Bearer dev-service"),)


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out below the kernel's ephemeral range: a port the kernel assigns itself
# (bind to 0) can be taken by any outgoing connection of another process before the
# server binds it, as happened to the market's port once in CI ("Address already in
# use"); these are never given to outgoing connections.
_PORTS = range(20000, min(32768, _ephemeral_low()))
_given: set[int] = set()
_pick = random.SystemRandom()


def free_port() -> int:
    """A loopback port nothing listens on, never the same twice in one test run."""
    for _ in range(1000):
        port = _pick.choice(_PORTS)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS}")


@dataclass
class Env:
    settings: Settings
    env: dict[str, str]

    def process(self, name: str, **extra_env: str) -> ManagedProcess:
        spec = next(s for s in PROCESSES if s.name == name)
        return self.spawn(spec, **extra_env)

    def spawn(self, spec: ProcessSpec, **extra_env: str) -> ManagedProcess:
        env = {**self.env, **extra_env}
        return ManagedProcess(
            spec,
            env,
            log_dir=self.settings.data_dir / "test-logs",
            port=free_port() if spec.port_env else None,
            metrics_port=free_port() if spec.metrics_port_env else None,
            echo=False,
        )


def _servers_answer(settings: Settings) -> None:
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
        admin.close()
    except Exception as err:
        pytest.fail(f"Kafka does not answer at {settings.kafka_bootstrap} ({err}); run the suite with `make test`")


def delete_topics_and_groups(settings: Settings, prefix: str) -> None:
    """Remove the topics and consumer groups of one run (its own prefix). Without it the
    shared broker collects every run's partitions until it runs out of file descriptors
    (three open files per partition: about 20,000 partitions after a few hundred runs)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="test-cleanup")
    try:
        mine = [t for t in admin.list_topics() if t.startswith(prefix)]
        if mine:
            admin.delete_topics(mine)
        try:
            listed = admin.list_groups()
            names = [g.get("group_id") if isinstance(g, dict) else g[0] for g in listed]
            groups = [g for g in names if g and g.startswith(prefix)]
            if groups:
                admin.delete_groups(groups)
        except Exception:  # noqa: BLE001 - a group left behind expires by itself
            pass
    finally:
        admin.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Env]:
    base = Settings()
    _servers_answer(base)
    run_id = uuid.uuid4().hex[:8]
    # Each test module has its own database, topics and service processes, so neither
    # runs nor modules see each other's data (a watermark, a product, a payout).
    database, prefix = f"earn_test_{run_id}", f"t{run_id}."

    async def admin(sql: str) -> None:
        try:
            conn = await asyncpg.connect(base.database_url.rsplit("/", 1)[0] + "/postgres", timeout=5)
        except Exception as err:
            pytest.fail(f"PostgreSQL does not answer at {base.pg_host}:{base.pg_port} ({err}); run the suite with `make test`")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    env = {**os.environ, "EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_LOG_LEVEL": "INFO"}
    settings = Settings(pg_database=database, topic_prefix=prefix)
    yield Env(settings, env)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    delete_topics_and_groups(base, prefix)


RELAY = ProcessSpec("relay-wallet", "services.kernel.outbox", None, None, None, None)


@pytest.fixture(scope="module")
def wallet_relay(stack: Env) -> Iterator[ManagedProcess]:
    """The wallet's outbox relay, as its own process so tests can kill it."""
    proc = stack.spawn(RELAY, EARN_RELAY_SCHEMA="wallet")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def wallet_process(stack: Env, wallet_relay: ManagedProcess) -> Iterator[ManagedProcess]:
    proc = stack.process("wallet", EARN_RELAY_ENABLED="false")
    proc.start()
    proc.wait_ready(timeout=60)
    wallet_relay.start()  # after the wallet migrated its schema
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def earn_process(stack: Env, wallet_process: ManagedProcess) -> Iterator[ManagedProcess]:
    proc = stack.process("simple_earn", EARN_WALLET_ADDRESS=wallet_process.address or "", EARN_RELEASE_SWEEP_SECONDS="1")
    proc.start()
    proc.wait_ready(timeout=60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def wallet_channel(wallet_process: ManagedProcess) -> AsyncIterator[grpc.aio.Channel]:
    assert wallet_process.address
    async with grpcclient.channel(wallet_process.address) as channel:
        yield channel


@pytest.fixture(scope="module")
async def wallet_db(stack: Env, wallet_process: ManagedProcess) -> AsyncIterator[asyncpg.Pool]:
    """Direct access to the wallet's tables, for checking invariants only."""
    pool = await asyncpg.create_pool(stack.settings.database_url, server_settings={"search_path": "wallet"}, min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def eventually(check: Callable[[], object], timeout: float = 20) -> None:
    """Poll ``check`` (sync or async) until it neither fails an assertion nor returns
    False; fail with its last assertion after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result is not False:
                return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)

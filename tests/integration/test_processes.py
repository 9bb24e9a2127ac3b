"""Process behaviour: `make run`'s launcher, graceful SIGTERM, /metrics."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request

import grpc
from services.kernel import grpcclient
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from earn.v1 import wallet_pb2, wallet_pb2_grpc
from services.devstack.processes import PROCESSES
from services.kernel.config import REPO_ROOT
from tests.conftest import GATEWAY, free_port


def _health(address: str, tls_dir: str | None = None) -> int:
    with grpcclient.sync_channel(address, tls_dir=tls_dir) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def test_run_starts_every_process_and_ctrl_c_leaves_nothing_behind(stack) -> None:
    env = dict(stack.env)
    for spec in PROCESSES:  # every process on free ports: nothing clashes with a running stack
        name = spec.name.upper()
        env[f"EARN_{name}_METRICS_PORT"] = str(free_port())
        if spec.port_env:
            env[f"EARN_{name}_GRPC_PORT"] = str(free_port())
    port = int(env["EARN_WALLET_GRPC_PORT"])
    # As `make run`: the launcher issues (or reuses) the certificates in .data/tls itself
    # and runs every process with mTLS.
    env.pop("EARN_TLS_DIR", None)
    env.pop("EARN_TLS_IDENTITY", None)
    tls_dir = str(stack.settings.data_dir / "tls")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "services.devstack", "run"], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        lines = []
        assert launcher.stdout is not None
        for line in launcher.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        output = "".join(lines)
        assert f"127.0.0.1:{port}" in output, output
        assert "reusing" in output  # the suite's servers are reused, and left running
        assert _health(f"127.0.0.1:{port}", tls_dir) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):  # plaintext is refused
            _health(f"127.0.0.1:{port}", "")
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert children
        launcher.send_signal(signal.SIGINT)
        launcher.wait(60)
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


async def test_sigterm_drains_and_exits_cleanly(stack) -> None:
    proc = stack.process("wallet")
    proc.start()
    try:
        await asyncio.to_thread(proc.wait_ready, 60)
        async with grpcclient.channel(proc.address) as channel:
            wallet = wallet_pb2_grpc.WalletServiceStub(channel)
            await wallet.GetBalances(wallet_pb2.GetBalancesRequest(owner="nobody"), metadata=GATEWAY)
            body = urllib.request.urlopen(proc.metrics_url, timeout=5).read().decode()
            assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="GetBalances",grpc_service="earn.v1.WalletService",grpc_type="unary"}' in body
            assert "grpc_server_handling_seconds_bucket" in body
            assert "earn_outbox_backlog" in body
        # stop() sends SIGTERM and waits up to 30 s before it kills; 0 means it drained and exited itself
        assert await asyncio.to_thread(proc.stop, 30) == 0
    finally:
        proc.kill()

"""The platform's long-running processes and a small supervisor for one of them.

``PROCESSES`` is the registry that ``python -m services.devstack run`` starts; tests use
``ManagedProcess`` directly to start, stop and kill services, so nothing here knows about the CLI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from services.kernel import grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.devstack.infra import POLL_SECONDS, port_in_use, tail


@dataclass(frozen=True)
class ProcessSpec:
    """How to launch one process: `python -m <module>`, with its ports passed in env vars."""

    name: str
    module: str
    port_env: str | None  # gRPC port variable; None: not a gRPC server
    default_port: int | None
    metrics_port_env: str | None  # Prometheus /metrics port variable; None: no metrics listener
    default_metrics_port: int | None
    # The certificate it presents with mTLS (EARN_TLS_IDENTITY); None: its name.
    tls_identity: str | None = None


PROCESSES: list[ProcessSpec] = [
    ProcessSpec(
        name="wallet",
        module="services.wallet.main",
        port_env="EARN_GRPC_PORT",
        default_port=50051,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9101,
    ),
    ProcessSpec(
        name="simple_earn",
        module="services.simple_earn.main",
        port_env="EARN_GRPC_PORT",
        default_port=50052,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9102,
    ),
    ProcessSpec(
        name="launchpool",
        module="services.launchpool.main",
        port_env="EARN_GRPC_PORT",
        default_port=50053,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9103,
    ),
    ProcessSpec(
        name="candydrop",
        module="services.candydrop.main",
        port_env="EARN_GRPC_PORT",
        default_port=50054,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9104,
    ),
    ProcessSpec(
        name="hodler",
        module="services.hodler.main",
        port_env="EARN_GRPC_PORT",
        default_port=50059,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9112,
    ),
    # The demo's exchange: seeded trades and deposits for a live CandyDrop campaign.
    ProcessSpec(
        name="candydrop_generator",
        module="services.candydrop.generator",
        port_env=None,
        default_port=None,
        metrics_port_env=None,
        default_metrics_port=None,
        tls_identity="tool",  # the exchange's stand-in: acts as gateway and operator by token
    ),
    ProcessSpec(
        name="market",
        module="services.market.main",
        port_env="EARN_GRPC_PORT",
        default_port=50055,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9105,
    ),
    ProcessSpec(
        name="dual",
        module="services.dual.main",
        port_env="EARN_GRPC_PORT",
        default_port=50056,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9106,
    ),
    ProcessSpec(
        name="leverage",
        module="services.leverage.main",
        port_env="EARN_GRPC_PORT",
        default_port=50057,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9108,
    ),
    ProcessSpec(
        name="loan",
        module="services.loan.main",
        port_env="EARN_GRPC_PORT",
        default_port=50058,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9109,
    ),
    ProcessSpec(
        name="market_simulator",
        module="services.market.simulator",
        port_env=None,
        default_port=None,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9107,
    ),
    ProcessSpec(
        name="scheduler",
        module="services.scheduler.main",
        port_env=None,
        default_port=None,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9111,
    ),
    ProcessSpec(
        name="accrual",
        module="services.accrual.main",
        port_env=None,
        default_port=None,
        metrics_port_env="EARN_METRICS_PORT",
        default_metrics_port=9110,
    ),
]


class ProcessStartError(RuntimeError):
    """A process could not be started or did not become ready; the message says why."""


class ManagedProcess:
    """One `python -m <module>` child in its own process group.

    Output (stdout and stderr) is appended to ``<log_dir>/<name>.log``; with ``echo=True`` every
    line is also printed to our stdout prefixed with ``[<name>]``, which is what `run` shows in
    the terminal. The child gets its own process group so that Ctrl-C in a terminal reaches only
    the launcher, which then stops children in order, and so that stop() and kill() also reach
    anything the child spawned.

    Ports default to the spec's defaults; tests pass free ports explicitly.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        env: Mapping[str, str] | None = None,
        *,
        log_dir: Path,
        port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        echo: bool = True,
        python: str = sys.executable,
        cwd: Path | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.host = host
        self.port = port if port is not None else spec.default_port
        self.metrics_port = metrics_port if metrics_port is not None else spec.default_metrics_port
        self.logfile = log_dir / f"{spec.name}.log"
        self.echo = echo
        self.python = python
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are written
        if spec.port_env and self.port is not None:
            self.env[spec.port_env] = str(self.port)
        if spec.metrics_port_env and self.metrics_port is not None:
            self.env[spec.metrics_port_env] = str(self.metrics_port)
        if self.env.get("EARN_TLS_DIR"):
            self.env["EARN_TLS_IDENTITY"] = spec.tls_identity or spec.name
        self.popen: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def address(self) -> str | None:
        """host:port of the gRPC server, None for a process without one."""
        return f"{self.host}:{self.port}" if self.spec.port_env and self.port else None

    @property
    def metrics_url(self) -> str | None:
        if self.spec.metrics_port_env and self.metrics_port:
            return f"http://{self.host}:{self.metrics_port}/metrics"
        return None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Launch the process; fails at once, clearly, if its module or a port is missing."""
        if self.running():
            raise ProcessStartError(f"{self.name} is already running (pid {self.pid})")
        try:
            found = importlib.util.find_spec(self.spec.module) is not None
        except ImportError:
            found = False
        if not found:
            raise ProcessStartError(
                f"cannot start {self.name}: module {self.spec.module} does not exist"
            )
        for port, variable in ((self.port, self.spec.port_env),
                               (self.metrics_port, self.spec.metrics_port_env)):
            if variable and port and port_in_use(self.host, port):
                raise ProcessStartError(
                    f"cannot start {self.name}: port {port} ({variable}) is in use by another process"
                )
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        log = self.logfile.open("ab")
        try:
            self.popen = subprocess.Popen(
                [self.python, "-m", self.spec.module],
                env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.echo else log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        if self.echo:
            assert self.popen.stdout is not None
            self._pump = threading.Thread(
                target=self._copy_output, args=(self.popen.stdout, log),
                name=f"output-{self.name}", daemon=True,
            )
            self._pump.start()
        else:
            log.close()  # the child holds its own copy of the descriptor

    def _copy_output(self, source: IO[bytes], log: IO[bytes]) -> None:
        """Copy the child's output line by line to the log file and, prefixed, to our stdout."""
        prefix = f"[{self.name}] "
        with source, log:
            for line in iter(source.readline, b""):
                log.write(line)
                log.flush()
                sys.stdout.write(prefix + line.decode(errors="replace"))
                sys.stdout.flush()

    def wait_ready(self, timeout: float = 30, cancel: threading.Event | None = None) -> None:
        """Wait until the process reports SERVING on the standard gRPC health service (overall
        service ""). Fails early if the process exits, showing the end of its log; returns
        early, without error, once `cancel` is set (a launcher that was asked to stop). A
        process without a gRPC port is ready once started."""
        if self.popen is None:
            raise ProcessStartError(f"{self.name} was not started")
        if self.address is None:
            return
        deadline = time.monotonic() + timeout
        tls_dir = self.env.get("EARN_TLS_DIR", "")
        with grpcclient.sync_channel(self.address, tls_dir=tls_dir, identity="tool") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.popen.poll()
                if code is not None:
                    self._join_output()
                    raise ProcessStartError(
                        f"{self.name} exited with code {code} during start-up; "
                        f"{self.logfile}:\n{tail(self.logfile)}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet, or not serving yet
                if time.monotonic() > deadline:
                    raise ProcessStartError(
                        f"{self.name} is not SERVING on {self.address} after {timeout:.0f} s; "
                        f"{self.logfile}:\n{tail(self.logfile)}"
                    )
                if cancel is None:
                    time.sleep(POLL_SECONDS)
                elif cancel.wait(POLL_SECONDS):
                    return

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM the process group (the service drains), SIGKILL it after grace seconds.
        Returns the exit code; None if it was never started."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        code = self.popen.wait()
        self._join_output()
        return code

    def kill(self) -> int | None:
        """SIGKILL the process group at once (crash tests). Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGKILL)
        code = self.popen.wait()
        self._join_output()
        return code

    def _signal(self, signum: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def _join_output(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=5)
            self._pump = None

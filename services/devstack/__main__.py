"""CLI of the local stack: `python -m services.devstack infra-up|infra-down|run|test|bench|load|certs`.

`run`, `test` and `load` issue the local CA and the certificates into ``<data dir>/tls``
(kept when still valid) and run everything with mTLS (EARN_TLS_DIR); the test and load
drivers present the ``tool`` certificate and name their role with bearer tokens. Set
EARN_TLS_DIR= (empty) to run in plaintext instead.

Every command that starts a server stops it again on exit, unless the server was already
running (then it is reused and left alone) or the command is `infra-up`, whose purpose is to
leave the servers running for later commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from services.devstack.infra import (
    InfraError,
    Stack,
    deferred_signals,
    exit_on_signals,
    say,
    stop_signal,
)
from services.devstack.processes import PROCESSES, ManagedProcess, ProcessSpec, ProcessStartError
from services.kernel import tls
from services.kernel.config import REPO_ROOT

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Local Kafka, PostgreSQL and platform processes for development and tests.",
)


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"devstack: error: {error}", err=True)
    return typer.Exit(1)


def _print_addresses(stack: Stack, processes: Sequence[ManagedProcess] = ()) -> None:
    rows = [(name, address) for name, address in stack.addresses().items()]
    for process in processes:
        rows.append((process.name, f"grpc {process.address or '-'}   metrics {process.metrics_url or '-'}"))
    width = max(len(name) for name, _ in rows)
    for name, address in rows:
        print(f"  {name:<{width}}  {address}", flush=True)


def _tls_env(stack: Stack) -> dict[str, str]:
    """EARN_TLS_DIR (certificates issued or reused in <data dir>/tls) and the driver's
    identity, `tool`; nothing when EARN_TLS_DIR is set (an empty value means plaintext)."""
    if "EARN_TLS_DIR" in os.environ:
        return {}
    directory = stack.settings.data_dir / "tls"
    issued = tls.ensure(directory)
    if issued:
        say(f"certificates issued in {directory}: {', '.join(issued)}")
    return {"EARN_TLS_DIR": str(directory), "EARN_TLS_IDENTITY": "tool"}


def _run_child(command: list[str], stack: Stack, grace: float = 30, extra_env: dict[str, str] | None = None) -> int:
    """Run a command with the stack's environment and return its exit code.

    When we are asked to stop, the child gets the chance to end by itself if it was Ctrl-C
    (the terminal sent it SIGINT too), then SIGTERM, then SIGKILL after grace seconds.
    """
    with deferred_signals() as stop:
        child = subprocess.Popen(command, env={**stack.env(), **(extra_env or {})}, cwd=REPO_ROOT)
        try:
            while child.poll() is None and not stop.wait(0.2):
                pass
        finally:
            if child.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(5 if stop_signal() == signal.SIGINT else 0)
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(grace)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    return child.returncode


@app.command("infra-up")
def infra_up() -> None:
    """Start Kafka and PostgreSQL in the background and leave them running."""
    stack = Stack()
    try:
        with exit_on_signals():
            try:
                stack.start_infra()
            except BaseException:
                stack.stop_started()  # a half-started stack is of no use: leave nothing behind
                raise
    except InfraError as error:
        raise _fail(error)
    _print_addresses(stack)
    say("stop them with `python -m services.devstack infra-down` (or `make infra-down`)")


@app.command("infra-down")
def infra_down() -> None:
    """Stop Kafka and PostgreSQL (quiet when they are not running)."""
    try:
        Stack().stop_infra()
    except InfraError as error:
        raise _fail(error)


def _ports(spec: ProcessSpec, env: dict[str, str]) -> dict[str, int]:
    """Per-process port overrides: EARN_<NAME>_GRPC_PORT and EARN_<NAME>_METRICS_PORT."""
    name = spec.name.upper().replace("-", "_")
    ports = {}
    for key, variable in (("port", f"EARN_{name}_GRPC_PORT"), ("metrics_port", f"EARN_{name}_METRICS_PORT")):
        if env.get(variable):
            ports[key] = int(env[variable])
    return ports


@app.command()
def run() -> None:
    """Start the infra and every platform process; Ctrl-C stops all.

    Running servers are reused and left running; what this command starts, it stops.
    """
    stack = Stack()
    processes: list[ManagedProcess] = []
    log_dir = stack.settings.data_dir / "logs"
    try:
        with stack.owned(), deferred_signals() as stop:
            try:
                env = {**stack.env(), **_tls_env(stack)}
                planned = [ManagedProcess(spec, env, log_dir=log_dir, cwd=REPO_ROOT, **_ports(spec, env)) for spec in PROCESSES]
                # Each process finds the others where this launch put them: EARN_<NAME>_ADDRESS.
                addresses = {f"EARN_{p.name.upper()}_ADDRESS": p.address for p in planned if p.address}
                for process in planned:
                    process.env.update(addresses)
                    process.start()
                    processes.append(process)
                for process in processes:
                    process.wait_ready(cancel=stop)
                if not stop.is_set():
                    say("ready:")
                    _print_addresses(stack, processes)
                    say(f"logs in {log_dir}; Ctrl-C stops everything")
                while not stop.wait(0.5):
                    dead = [f"{p.name} (exit code {p.returncode})" for p in processes if not p.running()]
                    if dead:
                        raise ProcessStartError(f"exited unexpectedly: {', '.join(dead)}")
            finally:
                for process in reversed(processes):
                    process.stop()
    except (InfraError, ProcessStartError) as error:
        raise _fail(error)
    except KeyboardInterrupt:
        say("stopped")


@app.command()
def test(
    pytest_args: list[str] = typer.Argument(None, help="passed to pytest (after `--`)"),
) -> None:
    """Run pytest against the local infra; exits with pytest's code.

    Running servers are reused; what this command starts, it stops. The servers' addresses
    reach pytest as EARN_* variables. Exit code 5 (nothing collected) counts as a failure.
    """
    stack = Stack()
    code = 1
    try:
        with stack.owned():
            code = _run_child(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *(pytest_args or [])],
                stack,
                extra_env=_tls_env(stack),
            )
    except InfraError as error:
        raise _fail(error)
    except KeyboardInterrupt:
        code = 130
    if code == 5:
        say("pytest collected no tests: that is a failure")
    raise typer.Exit(code)


@app.command()
def bench() -> None:
    """Run every tests/bench/bench_*.py in order with this Python, against the local infra."""
    scripts = sorted((REPO_ROOT / "tests" / "bench").glob("bench_*.py"))
    if not scripts:
        say("no benchmarks yet")
        return
    stack = Stack()
    failed: list[Path] = []
    try:
        with stack.owned():
            for script in scripts:
                module = ".".join(script.relative_to(REPO_ROOT).with_suffix("").parts)
                say(f"running python -m {module}")
                if _run_child([sys.executable, "-m", module], stack) != 0:
                    failed.append(script)
    except InfraError as error:
        raise _fail(error)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if failed:
        say(f"failed: {', '.join(script.name for script in failed)}")
        raise typer.Exit(1)


@app.command()
def load(
    load_args: list[str] = typer.Argument(None, help="passed to tests/load/run_load.py (after `--`), e.g. --duration 60"),
) -> None:
    """Run the ghz load test and mixed soak (tests/load/run_load.py) against the local infra.

    It starts its own wallet and simple_earn processes on free ports, in a scratch database
    and topic prefix; running servers are reused; what this command starts, it stops."""
    stack = Stack()
    code = 1
    try:
        with stack.owned():
            code = _run_child([sys.executable, "-m", "tests.load.run_load", *(load_args or [])], stack, extra_env=_tls_env(stack))
    except InfraError as error:
        raise _fail(error)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


@app.command()
def certs() -> None:
    """Issue (or keep, when still valid) the local CA and every identity's certificate in
    <data dir>/tls, for running processes with EARN_TLS_DIR by hand."""
    stack = Stack()
    directory = stack.settings.data_dir / "tls"
    issued = tls.ensure(directory)
    say(f"{directory}: {'issued ' + ', '.join(issued) if issued else 'all certificates valid'}")


if __name__ == "__main__":
    app()

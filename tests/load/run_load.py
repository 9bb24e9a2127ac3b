"""Load test of Simple Earn's Subscribe and Redeem with ghz, then a mixed soak.

`make load` runs it (through `python -m services.devstack load`, which reuses or starts
Kafka and PostgreSQL): a scratch database and topic prefix of its own, a wallet and a
simple_earn process on free ports (each with its outbox relay publishing to Kafka, as in
production), N users funded through the wallet's gRPC API with one position each in a
flexible product, then ghz (pinned in the Makefile, `make tools` puts it in build/tools):

1. Subscribe offered at the target rate (`--target-rps`, default 2,000/s) for
   `--phase-seconds`, then Redeem the same way. Before them the standard health check
   (`grpc.health.v1.Health/Check`, no database, no wallet) the same way: the ceiling of
   this gRPC server on this machine for any call. Each call has its own idempotency key
   ({{.UUID}}), and consecutive calls go to different users (ghz takes element
   RequestNumber mod N of the data array), so per-user locks are not what is measured.
2. A mixed soak at a steady rate for `--duration` seconds (Subscribe, Redeem and
   ListPositions, each its own ghz process), in windows of `--window` seconds, with the
   resident memory of the service processes sampled every `--sample-every` seconds.

Prints throughput, p50/p99 latency (every call, OK or not, from ghz's per-call details),
errors by status, the CPU seconds per component (service processes, their PostgreSQL
backends, Kafka, ghz) and RSS over time; `--report` also writes all of it as JSON. Exits 1
if any call failed. Sends traffic only to 127.0.0.1, bounded by the durations given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from services.kernel import grpcclient

from earn.v1 import accrual_pb2, simple_earn_pb2 as se, simple_earn_pb2_grpc, wallet_pb2, wallet_pb2_grpc
from services.devstack.processes import ManagedProcess
from services.kernel.config import REPO_ROOT, Settings
from tests.bench._common import CLK_TCK, CpuMeter, drop_database, recreate_database, scrape, spawn, ticks
from tests.conftest import delete_topics_and_groups

GHZ = REPO_ROOT / "build" / "tools" / "ghz"
SERVICE = "earn.v1.SimpleEarnService"
OPERATOR = (("authorization", "Bearer dev-operator"),)
GATEWAY_TOKEN = "Bearer dev-gateway"
PRODUCT = "load-btc-flex-{}"  # one or more products (--products), users spread over them
DEPOSIT, FIRST_SUBSCRIPTION, STEP = "1000", "10", "0.01"


# ------------------------------------------------------------------ results


@dataclass
class Calls:
    """Calls of one method over one or more ghz runs."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # wall time the runs took, summed

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "OK")

    def add(self, other: Calls) -> None:
        self.latencies_ms += other.latencies_ms
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.seconds += other.seconds

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def pct(q: float) -> float:  # nearest rank
            return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))] if ordered else 0.0

        return {
            "calls": self.count,
            "per_second": self.count / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": ordered[-1] if ordered else 0.0,
            "failed": self.failed,
            "statuses": dict(self.statuses),
            "errors": dict(self.errors.most_common(5)),
        }


def line(name: str, s: dict[str, Any]) -> str:
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(s["statuses"].items()))
    return (f"{name:>13}: {s['calls']:>9,} calls {s['per_second']:>8,.0f}/s  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms"
            f"  max {s['max_ms']:8.2f} ms  errors {s['failed']:,} ({statuses or 'none'})")


def parse_ghz(path: Path) -> Calls:
    """ghz's JSON report: per-call details (latency in ns, status, error) and the run's total."""
    report = json.loads(path.read_text())
    calls = Calls(seconds=report["total"] / 1e9)
    for d in report.get("details") or ():
        calls.latencies_ms.append(d["latency"] / 1e6)
        calls.statuses[d["status"] or "OK"] += 1
        if d.get("error"):
            calls.errors[d["error"]] += 1
    if report["count"] != calls.count:  # ghz keeps at most 1,000,000 details per run
        raise RuntimeError(f"{path}: {report['count']} calls but {calls.count} details")
    return calls


# ------------------------------------------------------------------ ghz


def ghz_transport() -> list[str]:
    """ghz's transport flags: the CA and this driver's certificate when the stack runs mTLS
    (EARN_TLS_DIR, identity EARN_TLS_IDENTITY or `tool`), plaintext otherwise."""
    settings = Settings()
    if not settings.tls_dir:
        return ["--insecure"]
    directory, identity = Path(settings.tls_dir), settings.tls_identity or "tool"
    return ["--cacert", str(directory / "ca.pem"), "--cert", str(directory / f"{identity}.pem"),
            "--key", str(directory / f"{identity}.key")]


@dataclass
class Target:
    method: str
    data: Path | None  # a JSON array, one element per user, templated by ghz per call; None: {}
    service: str = SERVICE
    protoset: Path | None = None  # None: the platform's (simple_earn.proto)


class Ghz:
    def __init__(self, address: str, protoset: Path, workdir: Path) -> None:
        self.address = address
        self.protoset = protoset
        self.workdir = workdir
        self.runs = 0
        self.running: set[asyncio.subprocess.Process] = set()

    def command(self, target: Target, rps: int, concurrency: int, seconds: float, out: Path) -> list[str]:
        schema = ["--protoset", str(target.protoset or self.protoset)]
        data = ["--data-file", str(target.data)] if target.data else ["--data", "{}"]
        cmd = [
            str(GHZ), *ghz_transport(), *schema, "--call", f"{target.service}.{target.method}",
            *data, "--metadata", json.dumps({"authorization": GATEWAY_TOKEN}),
            "--concurrency", str(concurrency), "--duration", f"{seconds:.3f}s", "--duration-stop", "wait",
            "--timeout", "10s", "--cpus", "1", "--format", "json", "--output", str(out),
        ]
        if rps:
            cmd += ["--rps", str(rps)]
        return [*cmd, self.address]

    async def run(self, target: Target, rps: int, concurrency: int, seconds: float) -> Calls:
        self.runs += 1
        out = self.workdir / f"{self.runs:04d}-{target.method}.json"
        proc = await asyncio.create_subprocess_exec(
            *self.command(target, rps, concurrency, seconds, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.running.add(proc)
        try:
            output, _ = await proc.communicate()
        finally:
            self.running.discard(proc)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"ghz {target.method} exited {proc.returncode}: {output.decode(errors='replace')[-2000:]}")
        calls = parse_ghz(out)
        out.unlink()
        return calls

    def stop(self) -> None:
        for proc in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


# ------------------------------------------------------------------ memory


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for row in f:
                if row.startswith("VmRSS:"):
                    return int(row.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    def __init__(self, processes: dict[str, ManagedProcess], every: float) -> None:
        self.processes = processes
        self.every = every
        self.samples: list[dict[str, float]] = []  # {"t": seconds since start, name: MiB, ...}
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        row = {"t": round(time.monotonic() - self.started, 1)}
        for name, proc in self.processes.items():
            value = rss_mib(proc.pid)
            if value is not None:
                row[name] = round(value, 1)
        self.samples.append(row)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def begin(self) -> None:
        self.started = time.monotonic()
        self.task = asyncio.create_task(self._loop())

    async def end(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sample()

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name in self.processes:
            values = [(r["t"], r[name]) for r in self.samples if name in r]
            if not values:
                continue
            mib = [v for _, v in values]
            half = [v for t, v in values if t >= values[-1][0] / 2]
            out[name] = {"start": mib[0], "min": min(mib), "max": max(mib), "end": mib[-1],
                         "second_half_change": half[-1] - half[0] if half else 0.0}
        return out


# ------------------------------------------------------------------ set-up


async def bounded(n: int, in_flight: int, make) -> list[Any]:
    """Run make(i) for i in range(n), at most in_flight at once, results in order."""
    results: list[Any] = [None] * n
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            results[i] = await make(i)

    await asyncio.gather(*(worker() for _ in range(min(in_flight, n))))
    return results


async def seed(wallet: ManagedProcess, earn: ManagedProcess, users: list[str], products: int) -> tuple[list[str], float, float]:
    """Fund every user, create the products, open one position each (user i in product
    i mod products); returns the position ids (in the order of users) and the seconds the
    deposits and subscriptions took."""
    async with grpcclient.channel(wallet.address) as wch, grpcclient.channel(earn.address) as ech:
        w = wallet_pb2_grpc.WalletServiceStub(wch)
        e = simple_earn_pb2_grpc.SimpleEarnServiceStub(ech)
        started = time.monotonic()
        await bounded(len(users), 32, lambda i: w.Deposit(
            wallet_pb2.DepositRequest(idempotency_key=f"seed-dep-{users[i]}", owner=users[i], asset="BTC", amount=DEPOSIT),
            metadata=OPERATOR))
        deposits = time.monotonic() - started
        for k in range(products):
            await e.CreateProduct(se.CreateProductRequest(
                idempotency_key=f"seed-product-{k}", product_id=PRODUCT.format(k), asset="BTC", kind=se.PRODUCT_KIND_FLEXIBLE,
                tiers=[accrual_pb2.RateTier(up_to="5", apr="0.08"), accrual_pb2.RateTier(up_to="", apr="0.03")],
                min_subscription="0.001", payout_cadence=se.PAYOUT_CADENCE_DAILY), metadata=OPERATOR)
        started = time.monotonic()
        gateway = (("authorization", GATEWAY_TOKEN),)
        replies = await bounded(len(users), 32, lambda i: e.Subscribe(se.SubscribeRequest(
            idempotency_key=f"seed-sub-{users[i]}", user_id=users[i], product_id=PRODUCT.format(i % products),
            amount=FIRST_SUBSCRIPTION), metadata=gateway))
        subscriptions = time.monotonic() - started
    return [r.position.position_id for r in replies], deposits, subscriptions


def write_data(workdir: Path, users: list[str], positions: list[str], products: int) -> dict[str, Target]:
    """One JSON array per method, an element per user; Redeem and ListPositions visit the
    users in other orders than Subscribe, so that in the soak no two methods hit one user
    at the same moment (the index is the request number modulo the number of users)."""
    rng = random.Random(8)
    rows = [(u, p, PRODUCT.format(i % products)) for i, (u, p) in enumerate(zip(users, positions))]
    redeem, reads = rows[:], rows[:]
    rng.shuffle(redeem)
    rng.shuffle(reads)
    arrays = {
        "Subscribe": [{"idempotency_key": "load-s-{{.UUID}}", "user_id": u, "product_id": k, "amount": STEP} for u, _, k in rows],
        "Redeem": [{"idempotency_key": "load-r-{{.UUID}}", "user_id": u, "position_id": p, "amount": STEP} for u, p, _ in redeem],
        "ListPositions": [{"user_id": u, "product_id": k, "page_size": 10} for u, _, k in reads],
    }
    targets = {}
    for method, array in arrays.items():
        path = workdir / f"{method}.json"
        path.write_text(json.dumps(array))
        targets[method] = Target(method, path)
    return targets


def protoset(workdir: Path) -> Path:
    out = workdir / "earn.protoset"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO_ROOT / "protos"), "--include_imports",
         f"--descriptor_set_out={out}", "earn/v1/simple_earn.proto"],
        check=True, cwd=REPO_ROOT,
    )
    return out


def health_protoset(workdir: Path) -> Path:
    """The standard health service's schema, from the descriptor grpcio-health-checking ships."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    out = workdir / "health.protoset"
    out.write_bytes(files.SerializeToString())
    return out


# ------------------------------------------------------------------ phases


def ghz_version() -> str:
    """The module version the binary was built from (ghz's own --version says "dev")."""
    info = subprocess.run(["go", "version", "-m", str(GHZ)], capture_output=True, text=True).stdout.split()
    return next((f"github.com/bojand/ghz {info[i + 2]}" for i, w in enumerate(info[:-2]) if w == "mod"), str(GHZ))


def machine_busy_ticks() -> int:
    """Clock ticks all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # ghz runs that ended
    return usage.ru_utime + usage.ru_stime


def handled(metrics_url: str | None) -> Counter[str]:
    """RPCs a service has completed so far, per method (its grpc_server_handled_total)."""
    out: Counter[str] = Counter()
    if not metrics_url:
        return out
    for key, value in scrape(metrics_url).items():
        if key.startswith("grpc_server_handled_total{"):
            method = key.split('grpc_method="', 1)[1].split('"', 1)[0]
            out[method] += int(value)
    return out


class WaitSampler:
    """What the PostgreSQL backends of the load's database are doing, sampled: running
    (CPU or I/O), waiting for a lock (which), or idle in a transaction (waiting for the
    service to send the next statement)."""

    def __init__(self, pool: asyncpg.Pool, database: str, every: float = 0.1) -> None:
        self.pool, self.database, self.every = pool, database, every
        self.tally: Counter[str] = Counter()
        self.samples = 0
        self.task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            rows = await self.pool.fetch(
                "SELECT application_name, state, wait_event_type, wait_event FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> ''", self.database)
            self.samples += 1
            for r in rows:
                if r["state"] == "idle":
                    continue
                if r["state"] == "active":
                    what = "running" if r["wait_event_type"] is None else f"waiting {r['wait_event_type']}:{r['wait_event']}"
                else:
                    what = r["state"]  # idle in transaction: the service has the next statement
                self.tally[f"{r['application_name']} {what}"] += 1
            await asyncio.sleep(self.every)

    def begin(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def end(self) -> dict[str, float]:
        """Average number of backends in each state over the samples."""
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        return {k: v / max(1, self.samples) for k, v in self.tally.most_common()}


@dataclass
class Usage:
    cpu: dict[str, float]
    waits: dict[str, float]
    wallet_calls: dict[str, int]


async def measured(cpu: CpuMeter, waits: WaitSampler, wallet: ManagedProcess, work) -> tuple[Any, Usage]:
    before, calls = children_cpu(), handled(wallet.metrics_url)
    await cpu.begin()
    waits.begin()
    try:
        result = await work
    except BaseException:  # cancelled (Ctrl-C) or failed: stop the samplers before the pool closes
        for task in (cpu.task, waits.task):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (cpu.task, waits.task) if t is not None), return_exceptions=True)
        raise
    usage = await cpu.end()
    usage["ghz (load generator)"] = children_cpu() - before
    usage["load driver (samplers)"] = usage.pop("benchmark process (producers, pollers)", 0.0)
    return result, Usage(usage, await waits.end(), dict(handled(wallet.metrics_url) - calls))


def usage_lines(u: Usage, seconds: float, calls: dict[str, int]) -> list[str]:
    waits = ", ".join(f"{k} {v:.1f}" for k, v in list(u.waits.items())[:6] if v >= 0.05)
    per = ", ".join(
        f"{m} {n:,} ({n / sum(calls.values()):.1f} per call)" for m, n in sorted(u.wallet_calls.items(), key=lambda kv: -kv[1])
    ) if calls and sum(calls.values()) else ""
    return [
        cpu_line(u.cpu, seconds),
        f"PostgreSQL backends of the load's database, average number by state: {waits or 'none busy'}",
        f"wallet RPCs meanwhile: {per or 'none'}",
    ]


def cpu_line(usage: dict[str, float], seconds: float) -> str:
    parts = [f"{k} {v:.1f} s" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]) if v >= 0.05]
    total = sum(usage.values())
    return f"CPU over {seconds:.0f} s wall ({2 * seconds:.0f} CPU-s on 2 cores, {total:.1f} used): " + ", ".join(parts)


async def main(args: argparse.Namespace) -> int:
    if not GHZ.is_file():
        print(f"{GHZ.relative_to(REPO_ROOT)} is missing: `make tools` installs it", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print("load: Simple Earn Subscribe and Redeem through ghz, then a mixed soak")
    print(f"command: {shlex.join([Path(sys.executable).name, '-m', 'tests.load.run_load', *sys.argv[1:]])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()};"
          f" load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"ghz: {ghz_version()}")
    settings = Settings()
    database, prefix = f"earn_load_{os.getpid()}", f"load{os.getpid()}."
    env = {**os.environ, "EARN_PG_DATABASE": database, "EARN_TOPIC_PREFIX": prefix, "EARN_LOG_LEVEL": "WARNING"}
    log_dir = settings.data_dir / "load-logs"
    await recreate_database(settings, database)
    wallet = spawn("wallet", env, log_dir)
    earn = spawn("simple_earn", env, log_dir)
    ghz: Ghz | None = None
    pool = None
    workdir: Path | None = None
    report: dict[str, Any] = {"command": shlex.join(sys.argv), "options": vars(args)}
    failed = 0
    try:
        wallet.start()
        wallet.wait_ready(60)
        earn.env["EARN_WALLET_ADDRESS"] = wallet.address or ""
        earn.start()
        earn.wait_ready(60)
        print(f"services: wallet pid {wallet.pid} at {wallet.address}, simple_earn pid {earn.pid} at {earn.address};"
              f" database {database}, topic prefix {prefix}; logs in {log_dir}")
        users = [f"load-u{i:06d}" for i in range(args.users)]
        positions, dep_s, sub_s = await seed(wallet, earn, users, args.products)
        print(f"seed: {args.users:,} users in {args.products} flexible product(s), deposits {dep_s:.1f} s ({args.users / dep_s:,.0f}/s, 32 in flight),"
              f" first subscriptions {sub_s:.1f} s ({args.users / sub_s:,.0f}/s, 32 in flight)")
        report["seed"] = {"users": args.users, "deposit_seconds": dep_s, "subscribe_seconds": sub_s}
        workdir = Path(tempfile.mkdtemp(prefix="earn-load-"))
        targets = write_data(workdir, users, positions, args.products)
        ghz = Ghz(earn.address or "", protoset(workdir), workdir)
        print("ghz:", shlex.join(ghz.command(targets["Subscribe"], args.target_rps, args.concurrency, args.phase_seconds, Path("OUT.json"))))
        pool = await asyncpg.create_pool(
            settings.database_url.rsplit("/", 1)[0] + f"/{database}", min_size=1, max_size=2
        )
        processes = {"wallet process": wallet.pid or -1, "simple_earn process": earn.pid or -1}

        # 1. each method alone, offered at the target rate; first the health check, the
        # ceiling of this server and machine for any call (no database, no wallet)
        report["phases"] = {}
        targets["Check"] = Target("Check", None, service="grpc.health.v1.Health", protoset=health_protoset(workdir))
        for method in ("Check", "Subscribe", "Redeem") if args.phase_seconds > 0 else ():
            calls, usage = await measured(
                CpuMeter(processes, pool, database), WaitSampler(pool, database), wallet,
                ghz.run(targets[method], args.target_rps, args.concurrency, args.phase_seconds),
            )
            s = calls.summary()
            failed += s["failed"]
            report["phases"][method] = {**s, "cpu_seconds": usage.cpu, "pg_backends": usage.waits, "wallet_calls": usage.wallet_calls}
            print(f"\n{method} alone, offered {args.target_rps:,}/s with {args.concurrency} workers for {args.phase_seconds:g} s:")
            print(line(method, s))
            for error, n in s["errors"].items():
                print(f"{'':>15}{n:,} x {error}")
            for text in usage_lines(usage, calls.seconds, {method: calls.count}):
                print(f"{'':>15}{text}")

        # 2. the mixed soak
        rates = {"Subscribe": args.soak_subscribe_rps, "Redeem": args.soak_redeem_rps, "ListPositions": args.soak_read_rps}
        print(f"\nsoak: {', '.join(f'{m} {r:,}/s' for m, r in rates.items())} offered, {args.duration:g} s in windows of {args.window:g} s;"
              f" RSS sampled every {args.sample_every:g} s")
        rss = RssSampler({"wallet": wallet, "simple_earn": earn}, args.sample_every)
        totals = {m: Calls() for m in rates}
        windows = []
        rss.begin()

        services = [pid for pid in (wallet.pid, earn.pid) if pid]

        async def soak() -> None:
            started = time.monotonic()
            while (left := args.duration - (time.monotonic() - started)) > 0.5:
                seconds = min(args.window, left)
                busy_before, mine_before, t0 = machine_busy_ticks(), sum(ticks(pid) or 0 for pid in services), time.monotonic()
                results = await asyncio.gather(*(
                    ghz.run(targets[m], r, args.concurrency, seconds) for m, r in rates.items() if r
                ))
                wall = (time.monotonic() - t0) * CLK_TCK
                row: dict[str, Any] = {"t": round(time.monotonic() - started, 1)}
                # Cores busy on the whole machine (other users' work included) and in the two services.
                row["cores_busy"] = round((machine_busy_ticks() - busy_before) / wall, 2)
                row["cores_services"] = round((sum(ticks(pid) or 0 for pid in services) - mine_before) / wall, 2)
                text = []
                for m, calls in zip([m for m, r in rates.items() if r], results):
                    totals[m].add(calls)
                    s = calls.summary()
                    row[m] = {k: s[k] for k in ("calls", "per_second", "p50_ms", "p99_ms", "failed")}
                    text.append(f"{m} {s['per_second']:,.0f}/s p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} err {s['failed']}")
                last = rss.samples[-1] if rss.samples else {}
                row["rss_mib"] = {k: v for k, v in last.items() if k != "t"}
                windows.append(row)
                mem = " ".join(f"{k} {v:.0f}" for k, v in row["rss_mib"].items())
                print(f"  t={row['t']:>6.0f} s  " + " | ".join(text) + f" | RSS MiB {mem}"
                      f" | cores busy {row['cores_busy']:.2f} (services {row['cores_services']:.2f})", flush=True)

        try:
            _, usage = await measured(CpuMeter(processes, pool, database, every=2.0), WaitSampler(pool, database, every=0.5), wallet, soak())
        finally:
            await rss.end()
        soak_seconds = max((c.seconds for c in totals.values()), default=0.0)
        print("soak totals:")
        summaries = {}
        for m, calls in totals.items():
            if calls.count:
                s = summaries[m] = calls.summary()
                p99s = sorted(w[m]["p99_ms"] for w in windows if m in w)
                s["window_p99_ms"] = {"min": p99s[0], "median": p99s[len(p99s) // 2], "max": p99s[-1]}
                failed += s["failed"]
                print(line(m, s) + f"  (p99 per window: min {p99s[0]:.1f}, median {p99s[len(p99s) // 2]:.1f}, max {p99s[-1]:.1f} ms)")
                for error, n in s["errors"].items():
                    print(f"{'':>15}{n:,} x {error}")
        memory = rss.summary()
        for name, m in memory.items():
            print(f"{'RSS ' + name:>24}: start {m['start']:.1f} MiB, min {m['min']:.1f}, max {m['max']:.1f}, end {m['end']:.1f};"
                  f" change over the second half {m['second_half_change']:+.1f} MiB")
        for text in usage_lines(usage, soak_seconds, {m: c.count for m, c in totals.items() if m != "ListPositions"}):
            print(f"{'':>15}{text}")
        report["soak"] = {"rates": rates, "totals": summaries, "windows": windows, "rss_mib": memory, "rss_samples": rss.samples,
                          "cpu_seconds": usage.cpu, "pg_backends": usage.waits, "wallet_calls": usage.wallet_calls}

        sub = report["phases"].get("Subscribe") or Calls().summary()
        met = sub["per_second"] >= args.target_rps * 0.99 and sub["p99_ms"] < args.target_p99_ms and sub["failed"] == 0
        report["target"] = {"subscribe_per_second": args.target_rps, "p99_ms": args.target_p99_ms, "met": met}
        print(f"\ntarget per instance: >= {args.target_rps:,} Subscribe/s with p99 < {args.target_p99_ms:g} ms, no errors: " + (
            f"{'met' if met else 'MISSED'} ({sub['per_second']:,.0f}/s, p99 {sub['p99_ms']:.1f} ms, {sub['failed']} errors)"
            if sub["calls"] else "not measured (--phase-seconds 0)"))
        print(f"errors in all: {failed:,}")
        report["failed"] = failed
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=1, default=str))
            print(f"report: {args.report}")
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if ghz is not None:
            ghz.stop()
        if pool is not None:
            await pool.close()
        earn.stop()
        wallet.stop()
        await drop_database(settings, database)
        await asyncio.to_thread(delete_topics_and_groups, settings, prefix)
    return 1 if failed else 0


async def _cancellable(args: argparse.Namespace) -> int:
    """SIGTERM (what `devstack` sends on Ctrl-C) and SIGINT cancel the run, so that the
    finally blocks stop the services and ghz and drop the scratch database."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await main(args)
    except asyncio.CancelledError:
        print("load: stopped", file=sys.stderr)
        return 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000, help="users, each funded with one position (default 10,000)")
    p.add_argument("--target-rps", type=int, default=2_000, help="rate offered to Subscribe, then Redeem, alone (default 2,000/s)")
    p.add_argument("--target-p99-ms", type=float, default=25.0, help="the p99 the target asks for (default 25 ms)")
    p.add_argument("--products", type=int, default=1, help="flexible products the users are spread over (default 1)")
    p.add_argument("--concurrency", type=int, default=64, help="ghz workers per run (default 64)")
    p.add_argument("--phase-seconds", type=float, default=30.0, help="length of each single-method run (default 30 s)")
    p.add_argument("--duration", type=float, default=600.0, help="length of the mixed soak (default 600 s)")
    p.add_argument("--window", type=float, default=30.0, help="the soak reports (and restarts ghz) every so many seconds")
    p.add_argument("--soak-subscribe-rps", type=int, default=50, help="Subscribe per second in the soak (default 50)")
    p.add_argument("--soak-redeem-rps", type=int, default=10, help="Redeem per second in the soak (default 10)")
    p.add_argument("--soak-read-rps", type=int, default=50, help="ListPositions per second in the soak (default 50)")
    p.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period in seconds (default 5)")
    p.add_argument("--report", type=Path, help="also write the whole report as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(_cancellable(parse_args())))

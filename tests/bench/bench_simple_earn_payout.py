"""Simple Earn's payout consumer without the wallet: the database time per PayoutBatch.

    .venv/bin/python -m tests.bench.bench_simple_earn_payout                   # 1,000,000 positions
    .venv/bin/python -m tests.bench.bench_simple_earn_payout --positions 200000 --batches 40

A scratch database (``earn_bench_se_payout``, dropped at the end unless ``--keep``) with
Simple Earn's schema and N flexible positions of one USDT product (one in 1,000 with
auto-subscribe), loaded by COPY. The engine's batches are rebuilt as it emits them: per
input partition (crc32 of the position id mod 6), positions in id order (as numbers), the
engine's BATCH_SIZE (10,000) per batch, one amount per position. For each batch, timed on
its own:

- check: the columns checked in Python (``domain.check_payout_columns``);
- record: the two statements that check the items against ``positions`` (before the
  payout's lock) and record the interest records (payout_items: arrays, 200 items per
  row), what was left out, the reinvestment decision, the inbox row and the batch row
  (under it) (``store.record_payout_batch``, its transaction and the payout's lock
  included): the DB time per batch the consumer spends before calling the wallet;
- post: marking the batch posted after the wallet (``store.post_payout_batch``);
- apply: the whole ``SimpleEarnApi.apply_payout`` (parse, check, record, post, and the
  reinvestment of the few auto-subscribe positions of each batch) with a wallet that
  answers at once.

The first payout period goes through check/record/post, the second through apply; then
one full batch is explained (EXPLAIN ANALYZE, rolled back) for where the statements' time
goes. Each step is reported twice: wall clock seen by the client (encoding, the round
trip and the server's work) and the CPU time of the pool's one PostgreSQL backend (from
/proc/<pid>/schedstat), which other work on a shared machine does not inflate as much.
Positions are settled after loading (``_common.settle``: the visibility map set, as
autovacuum leaves a table loaded long before a payout), so the item checks are
index-only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid
import zlib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from earn.v1 import accrual_pb2, wallet_pb2
from services.accrual import domain as accrual_domain
from services.kernel import db, events
from services.kernel.config import Settings
from services.simple_earn import domain, store
from services.simple_earn.api import SimpleEarnApi
from services.simple_earn.main import MIGRATIONS, SCHEMA
from tests.bench._common import drop_database, header, recreate_database, settle

DATABASE = "earn_bench_se_payout"
PARTITIONS = 6
BATCH = accrual_domain.BATCH_SIZE
PRODUCT = "bench-usdt"
ASSET = "USDT"
JOB = "simple_earn.interest.daily"
H0 = 500_000


def say(text: str = "") -> None:
    print(text, flush=True)


class NullWallet:
    """Answers every call at once: the consumer's own time, without the wallet's."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, method: str, request: Any) -> Any:
        self.calls += 1
        if method == "BulkCredit":
            return wallet_pb2.BulkCreditResponse(posting_id=str(self.calls), credit_count=len(request.owners))
        if method == "PlaceHold":
            return wallet_pb2.PlaceHoldResponse(hold=wallet_pb2.Hold(hold_id=str(10**9 + self.calls), amount=request.amount))
        raise AssertionError(f"unexpected wallet call {method}")


async def load(pool: asyncpg.Pool, n: int) -> str:
    at = datetime.now(UTC)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO products (product_id, asset, kind, status, tiers, min_subscription, payout_cadence, created_at, updated_at)"
            " VALUES ($1, $2, 'flexible', 'active', '[]', 1, 'daily', $3, $3)",
            PRODUCT, ASSET, at,
        )
        await conn.copy_records_to_table(
            "positions",
            columns=["id", "user_id", "product_id", "asset", "kind", "principal", "status", "auto_subscribe", "accrues_from_hour", "opened_at", "updated_at"],
            records=((i, f"u{i}", PRODUCT, ASSET, "flexible", Decimal(1000), "active", i % 1000 == 0, H0, at, at) for i in range(1, n + 1)),
        )
        await conn.execute("SELECT setval('positions_id_seq', $1)", n)
        # A table of positions that mostly sit still between payouts: settled (the
        # visibility map set, as autovacuum leaves it), so checks can be index-only.
        return await settle(conn, ["positions"])


def engine_batches(n: int, period: str, seed: int) -> list[accrual_pb2.PayoutBatch]:
    """The engine's batches of one payout: per partition, positions in id order (as numbers)."""
    rnd = random.Random(seed)
    per_partition: list[list[str]] = [[] for _ in range(PARTITIONS)]
    for i in range(1, n + 1):
        pid = str(i)
        per_partition[zlib.crc32(pid.encode()) % PARTITIONS].append(pid)
    out = []
    for partition, ids in enumerate(per_partition):
        ids.sort(key=int)  # the engine's payout order: numeric ids ascend as numbers
        count = (len(ids) + BATCH - 1) // BATCH
        for seq in range(count):
            chunk = ids[seq * BATCH:(seq + 1) * BATCH]
            batch = accrual_pb2.PayoutBatch(
                job=JOB, period=period, boundary_hour=H0 + 24, partition=partition, sequence=seq, last=seq == count - 1,
                product_id=PRODUCT, asset=ASSET,
            )
            batch.position_ids.extend(chunk)
            batch.user_ids.extend(f"u{p}" for p in chunk)
            batch.amounts.extend(str(Decimal(rnd.randint(1, 10**8)).scaleb(-6)) for _ in chunk)
            batch.from_hours.extend([H0] * len(chunk))
            out.append(batch)
    return out


def envelope(batch: accrual_pb2.PayoutBatch) -> bytes:
    return events.wrap(batch, key=f"{batch.job}:{batch.period}:{batch.partition}", producer="bench", occurred_at=datetime.now(UTC)).SerializeToString()


class Backend:
    """CPU time of the pool's one PostgreSQL backend (from /proc/<pid>/schedstat, in ns):
    the database's own work, whatever else the shared machine runs meanwhile."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/schedstat")

    def ns(self) -> int:
        return int(self.path.read_text().split()[0])


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"median {statistics.median(ordered) * 1000:6.2f} ms, mean {statistics.fmean(ordered) * 1000:6.2f} ms,"
            f" p90 {ordered[int(len(ordered) * 0.9)] * 1000:6.2f} ms, min {ordered[0] * 1000:6.2f} ms")


async def direct(pool: asyncpg.Pool, settings: Settings, backend: Backend, batches: list[accrual_pb2.PayoutBatch]) -> dict[str, list[float]]:
    """check / record / post of each batch, timed apart; the backend's CPU per batch."""
    times: dict[str, list[float]] = {"check": [], "record": [], "post": [], "record cpu": [], "post cpu": []}
    payout = await store.payout_id(pool, batches[0].job, batches[0].period)
    for batch in batches:
        raw = envelope(batch)
        env = events.parse(raw)
        t = time.perf_counter()
        columns = domain.check_payout_columns(list(batch.position_ids), list(batch.user_ids), list(batch.amounts), batch.asset)
        times["check"].append(time.perf_counter() - t)
        assert not columns.problems
        cpu, t = backend.ns(), time.perf_counter()
        recorded = await store.record_payout_batch(
            pool, job=batch.job, period=batch.period, payout=payout, partition=batch.partition, sequence=batch.sequence, last=batch.last,
            product_id=batch.product_id, asset=batch.asset, boundary_hour=batch.boundary_hour, digest=b"bench", at=settings.clock.now(),
            consumer=domain.PAYOUT_CONSUMER, event_id=env.event_id, position_ids=columns.position_ids, user_ids=columns.user_ids,
            amounts=columns.amounts, from_hours=list(batch.from_hours), sent=None, excluded=[], problems=None,
        )
        times["record"].append(time.perf_counter() - t)
        times["record cpu"].append((backend.ns() - cpu) / 1e9)
        assert recorded is not None and recorded.items == len(batch.position_ids), recorded
        cpu, t = backend.ns(), time.perf_counter()
        assert await store.post_payout_batch(pool, batch.job, batch.period, batch.partition, batch.sequence, "1", settings.clock.now())
        times["post"].append(time.perf_counter() - t)
        times["post cpu"].append((backend.ns() - cpu) / 1e9)
    return times


async def through_api(api: SimpleEarnApi, backend: Backend, batches: list[accrual_pb2.PayoutBatch]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"apply": [], "apply, backend cpu": [], "apply, this process cpu": []}
    for batch in batches:
        raw = envelope(batch)
        cpu, own, t = backend.ns(), time.process_time(), time.perf_counter()
        outcome = await api.apply_payout(raw)
        times["apply"].append(time.perf_counter() - t)
        times["apply, backend cpu"].append((backend.ns() - cpu) / 1e9)
        times["apply, this process cpu"].append(time.process_time() - own)
        assert outcome == "paid", outcome
    return times


async def explain(pool: asyncpg.Pool, batch: accrual_pb2.PayoutBatch) -> None:
    """EXPLAIN ANALYZE of the two record statements for one batch, rolled back."""
    columns = domain.check_payout_columns(list(batch.position_ids), list(batch.user_ids), list(batch.amounts), batch.asset)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            check = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + store.CHECK_ITEMS, columns.position_ids, columns.user_ids, batch.product_id, batch.asset
            )
            checked = await conn.fetchrow(store.CHECK_ITEMS, columns.position_ids, columns.user_ids, batch.product_id, batch.asset)
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + store.RECORD_BATCH,
                batch.job, "explain", batch.partition, batch.sequence, batch.last, batch.product_id, batch.asset, batch.boundary_hour,
                b"x", datetime.now(UTC), domain.PAYOUT_CONSUMER, str(uuid.uuid4()), columns.position_ids, columns.amounts,
                list(batch.from_hours), checked["unknown"], checked["why"], checked["reinvest"], None, [], None,
                await store.payout_id(conn, batch.job, "explain"), *store.claim_columns(columns.position_ids, checked["unknown"]),
            )
        finally:
            await tx.rollback()
    for title, text in (("the items' check (before the payout's lock)", check), ("the record (under the lock)", plan)):
        show_plan(title, text)


def show_plan(title: str, plan: str) -> None:
    top = json.loads(plan)[0]
    say(f"   EXPLAIN ANALYZE of {title} for one batch (rolled back): execution {top['Execution Time']:.2f} ms,"
        f" planning {top['Planning Time']:.2f} ms; its parts:")

    def walk(node: dict[str, Any], depth: int) -> None:
        label = node["Node Type"] + (f" ({node['Relation Name']})" if "Relation Name" in node else "") + (
            f" [{node['CTE Name']}]" if "CTE Name" in node else "") + (f" {node['Subplan Name']}" if "Subplan Name" in node else "")
        if node.get("Actual Total Time", 0) >= 0.3 or depth <= 1:
            say(f"     {'  ' * depth}{label}: {node.get('Actual Total Time', 0):.2f} ms, rows {node.get('Actual Rows', 0):,.0f}")
        for child in node.get("Plans", []):
            walk(child, depth + 1)

    walk(top["Plan"], 0)


async def main(args: argparse.Namespace) -> None:
    header(f"Simple Earn payout consumer: database time per {BATCH:,}-item PayoutBatch (no wallet)")
    base = Settings()
    settings = Settings(pg_database=DATABASE)
    await recreate_database(base, DATABASE)
    try:
        await db.migrate(settings, SCHEMA, MIGRATIONS)
        # One connection, so one backend whose CPU time is the database's work.
        pool = await db.create_pool(settings, SCHEMA, min_size=1, max_size=1)
        try:
            backend = Backend(await pool.fetchval("SELECT pg_backend_pid()"))
            t = time.perf_counter()
            settled = await load(pool, args.positions)
            say(f"positions: {args.positions:,} (one product, {ASSET}; one in 1,000 with auto-subscribe), loaded in {time.perf_counter() - t:.1f} s;"
                f" {settled}")
            first = engine_batches(args.positions, "2026-11-25", 1)
            second = engine_batches(args.positions, "2026-11-26", 2)
            if args.batches:
                first, second = first[:args.batches], second[:args.batches]
            say(f"\n1. period 2026-11-25, {len(first)} batches: check, record and post timed apart (interest table empty at the start)")
            times = await direct(pool, settings, backend, first)
            for name in ("check", "record", "record cpu", "post", "post cpu"):
                say(f"   {name:<11} {ms(times[name])}")
            db_wall = [r + p for r, p in zip(times["record"], times["post"], strict=True)]
            db_cpu = [r + p for r, p in zip(times["record cpu"], times["post cpu"], strict=True)]
            say(f"   DB time per batch, record + post: wall {ms(db_wall)}")
            say(f"                                     backend CPU {ms(db_cpu)}")
            items = sum(len(b.position_ids) for b in first)
            say(f"   per item: {sum(db_wall) / items * 1e6:.2f} µs wall, {sum(db_cpu) / items * 1e6:.2f} µs backend CPU")
            load_now = os.getloadavg()
            say(f"   load average now {load_now[0]:.2f} {load_now[1]:.2f} {load_now[2]:.2f}")

            api = SimpleEarnApi(pool, settings, NullWallet())  # type: ignore[arg-type]
            say(f"\n2. period 2026-11-26, {len(second)} batches through SimpleEarnApi.apply_payout (parse, check, record, null wallet, post, reinvest ~5 positions)")
            applied = await through_api(api, backend, second)
            for name, values in applied.items():
                say(f"   {name:<24} {ms(values)}")
            rows = await pool.fetchval("SELECT count(*) FROM interest")
            say(f"   interest records now: {rows:,}")
            say("\n3. reads after the two payouts, 500 random positions: interest_paid (as GetPosition reads it) and the records (ListInterest by position)")
            rnd = random.Random(3)
            reads: dict[str, list[float]] = {"interest_paid": [], "records": []}
            found = 0
            for position_id in (rnd.randint(1, args.positions) for _ in range(500)):
                t = time.perf_counter()
                await store.get_position(pool, position_id, None)
                reads["interest_paid"].append(time.perf_counter() - t)
                t = time.perf_counter()
                records, _ = await store.list_interest(pool, "", position_id, None, None, 0, 100)
                reads["records"].append(time.perf_counter() - t)
                found += len(records)
            for name, values in reads.items():
                say(f"   {name:<14} {ms(values)}")
            say(f"   records found: {found:,} (2 per position paid by both payouts)")
            await explain(pool, max(second, key=lambda b: len(b.position_ids)))
            load_now = os.getloadavg()
            say("\nRESULT")
            say(f"   DB time per {BATCH:,}-item batch (record + post, median): {statistics.median(db_wall) * 1000:.2f} ms wall,"
                f" {statistics.median(db_cpu) * 1000:.2f} ms of backend CPU")
            say(f"   the whole consumer without the wallet (median): {statistics.median(applied['apply']) * 1000:.2f} ms wall,"
                f" of which backend CPU {statistics.median(applied['apply, backend cpu']) * 1000:.2f} ms"
                f" and this process's CPU {statistics.median(applied['apply, this process cpu']) * 1000:.2f} ms")
            per_million = 1_000_000 // BATCH
            say(f"   -> 1,000,000 positions = {per_million} batches: {statistics.median(db_cpu) * per_million:.2f} s of database CPU,"
                f" {statistics.median(applied['apply']) * per_million:.2f} s of consumer wall time without the wallet, one batch after another")
            say(f"   load average at the end {load_now[0]:.2f} {load_now[1]:.2f} {load_now[2]:.2f} (2 cores, shared)")
        finally:
            await pool.close()
    finally:
        if not args.keep:
            await drop_database(base, DATABASE)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=1_000_000, help="positions (default 1,000,000)")
    parser.add_argument("--batches", type=int, default=0, help="batches per payout to time (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    asyncio.run(main(parser.parse_args()))

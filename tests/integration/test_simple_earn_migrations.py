"""Simple Earn's migration 0005 (a payout batch's items as arrays in payout_items) over
interest records written before it: they stay readable where they were (interest_records),
new records get larger ids, and a batch of a payout recorded before the migration still
leaves out the positions that payout paid; and migration 0006 (payout_claims): a payout
created before it still finds the positions it paid among its chunks."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from services.kernel import db
from services.simple_earn import domain, store
from services.simple_earn.main import MIGRATIONS, SCHEMA


async def test_records_from_before_payout_items_stay_readable_and_are_not_paid_again(stack, tmp_path: Path) -> None:
    before = tmp_path / "simple_earn" / "migrations"  # same folder name: same recorded versions
    before.mkdir(parents=True)
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < "0005":
            shutil.copy(path, before / path.name)
    await db.migrate(stack.settings, SCHEMA, before)
    pool = await db.create_pool(stack.settings, SCHEMA, min_size=1, max_size=2)
    try:
        at = datetime.now(UTC)
        await pool.execute(
            "INSERT INTO products (product_id, asset, kind, status, tiers, min_subscription, payout_cadence, created_at, updated_at)"
            " VALUES ('mig', 'BTC', 'flexible', 'active', '[]', 1, 'daily', $1, $1)", at,
        )
        ids = []
        for user in ("u1", "u2"):
            ids.append(await pool.fetchval(
                "INSERT INTO positions (user_id, product_id, asset, kind, principal, status, accrues_from_hour, opened_at, updated_at)"
                " VALUES ($1, 'mig', 'BTC', 'flexible', 1, 'active', 10, $2, $2) RETURNING id", user, at,
            ))
        one, two = ids
        job, period = "simple_earn.interest.daily", "2026-01-01"
        payout = await store.payout_id(pool, job, period)
        maturity = await pool.fetchval("SELECT id FROM payouts WHERE job = $1 AND period = ''", store.MATURITY_JOB)
        await pool.execute(
            "INSERT INTO interest (payout_id, position_id, amount, from_hour, to_hour, reinvested, created_at)"
            " VALUES ($1, $3, 0.5, 10, 34, true, $5), ($2, $4, 0.25, 10, 58, false, $5)",
            payout, maturity, one, two, at,
        )
        legacy_max = await pool.fetchval("SELECT max(id) FROM interest")

        assert await db.migrate(stack.settings, SCHEMA, MIGRATIONS) == ["simple_earn/0005_payout_items.sql", "simple_earn/0006_payout_claims.sql"]
        assert (await store.get_position(pool, one, None))["interest_paid"] == Decimal("0.5")
        assert (await store.get_position(pool, two, None))["interest_paid"] == Decimal("0.25")
        rows, _ = await store.list_interest(pool, "u1", None, None, None, 0, 10)
        assert [(r["position_id"], r["amount"], r["period"], r["reinvested"]) for r in rows] == [(one, Decimal("0.5"), period, True)]

        # The payout recorded position one before the migration: a batch of it now pays two only.
        recorded = await store.record_payout_batch(
            pool, job=job, period=period, payout=payout, partition=2, sequence=0, last=True, product_id="mig", asset="BTC",
            boundary_hour=34, digest=b"d", at=at, consumer=domain.PAYOUT_CONSUMER, event_id=str(uuid.uuid4()),
            position_ids=f"{one}\n{two}", user_ids="u1\nu2", amounts="0.5\n0.7", from_hours=[10, 10], sent=None, excluded=[], problems=None,
        )
        assert recorded is not None
        assert (recorded.items, recorded.paid, recorded.excluded) == (1, Decimal("0.7"), frozenset({0}))
        assert recorded.problems == f"position {one}: paid before by another batch of {job} {period}"
        assert (await store.get_position(pool, two, None))["interest_paid"] == Decimal("0.95")
        # A payout created before migration 0006 has no bitmaps of the positions it paid
        # (payout_claims): its batches find them among its chunks, as before.
        assert not await pool.fetchval("SELECT claims FROM payouts WHERE id = $1", payout)
        assert not await pool.fetchval("SELECT count(*) FROM payout_claims")
        again = await store.record_payout_batch(
            pool, job=job, period=period, payout=payout, partition=4, sequence=0, last=True, product_id="mig", asset="BTC",
            boundary_hour=34, digest=b"e", at=at, consumer=domain.PAYOUT_CONSUMER, event_id=str(uuid.uuid4()),
            position_ids=f"{two}", user_ids="u2", amounts="0.7", from_hours=[10], sent=None, excluded=[], problems=None,
        )
        assert again is not None and (again.items, again.excluded) == (0, frozenset({0}))
        assert again.problems == f"position {two}: paid before by another batch of {job} {period}"
        assert (await store.get_position(pool, two, None))["interest_paid"] == Decimal("0.95")
        everything, _ = await store.list_interest(pool, "", None, None, None, 0, 10)
        assert [(r["position_id"], r["amount"]) for r in everything] == [(one, Decimal("0.5")), (two, Decimal("0.25")), (two, Decimal("0.7"))]
        assert everything[-1]["id"] > legacy_max
        assert await pool.fetchval("SELECT count(*) FROM interest") == 3
        # A fixed-term record written now also takes an id after every earlier one.
        assert await store.insert_maturity_interest(pool, position_id=one, amount=Decimal("0.1"), from_hour=10, to_hour=58, reinvested=False, at=at)  # type: ignore[arg-type]
        assert await pool.fetchval("SELECT max(id) FROM interest_records") > everything[-1]["id"]
    finally:
        await pool.close()

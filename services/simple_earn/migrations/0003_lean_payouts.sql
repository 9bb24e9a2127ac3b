-- Payouts in columns (a PayoutBatch is one product's columns; the wallet pays it with one
-- BulkCredit): interest rows become lean and a batch keeps its own totals.
--
-- * interest: one row per (job, period, position), nothing else per item. The user,
--   product and asset are the position's (they never change: read through positions);
--   the carried remainder is the engine's and is no longer on the wire; one index,
--   (position_id, job, period), is both the per-payout uniqueness and every per-position
--   read (history, previews, the interest paid), covering amount and to_hour. No foreign
--   key: the statement that records a batch joins positions itself (and positions are
--   never deleted).
-- * positions.interest_paid: derived on read (the sum of the position's interest rows)
--   instead of an UPDATE of every paid position per payout.
-- * payout_batches: what a batch paid (items, total per asset), what it left out and
--   why, its reinvestment decision (taken before any wallet call; replaces
--   payout_intents), a digest of its columns, and posted_at: NULL while the wallet
--   has not confirmed the credits recorded in the same transaction.

-- GetPayoutStatus sums batch totals from now on; the batches recorded before this
-- migration kept none, so their totals are kept here, per asset.
CREATE TABLE payout_legacy_totals (
    job     text           NOT NULL,
    period  text           NOT NULL,
    asset   text           NOT NULL,
    items   bigint         NOT NULL,
    paid    numeric(38,18) NOT NULL,
    PRIMARY KEY (job, period, asset)
);
INSERT INTO payout_legacy_totals (job, period, asset, items, paid)
    SELECT job, period, asset, count(*), sum(amount) FROM interest WHERE job <> 'simple_earn.maturity' GROUP BY job, period, asset;

ALTER TABLE interest DROP CONSTRAINT interest_position_id_fkey;
ALTER TABLE interest DROP CONSTRAINT interest_job_period_position_id_key;
DROP INDEX interest_user;
DROP INDEX interest_position;
ALTER TABLE interest DROP COLUMN user_id, DROP COLUMN product_id, DROP COLUMN asset, DROP COLUMN carry;
CREATE UNIQUE INDEX interest_position_payout ON interest (position_id, job, period) INCLUDE (amount, to_hour);

ALTER TABLE positions DROP COLUMN interest_paid;

ALTER TABLE payout_batches
    ADD COLUMN product_id     text,
    ADD COLUMN asset          text,
    ADD COLUMN boundary_hour  bigint,
    -- items: the items recorded and paid; skipped: those left out (see problems).
    ADD COLUMN paid           numeric(38,18) NOT NULL DEFAULT 0,
    ADD COLUMN skipped        integer        NOT NULL DEFAULT 0,
    -- Indexes (0-based, into the batch's columns) of the items left out.
    ADD COLUMN excluded       integer[]      NOT NULL DEFAULT '{}',
    ADD COLUMN problems       text,
    -- Positions whose interest is reinvested (wallet holds keyed by job, period, position).
    ADD COLUMN reinvest       bigint[]       NOT NULL DEFAULT '{}',
    ADD COLUMN digest         bytea,
    ADD COLUMN posted_at      timestamptz;
UPDATE payout_batches SET posted_at = created_at;

DROP TABLE payout_intents;

-- Checking a batch's items against positions: an index-only scan of the identity of a
-- position (it never changes) and of what decides a reinvestment, instead of a heap
-- fetch per item.
CREATE UNIQUE INDEX positions_identity ON positions (id) INCLUDE (user_id, product_id, asset, kind, status, auto_subscribe);

-- A payout batch's interest records are stored as arrays, a few rows per batch, instead of
-- one row per item: measured on a 5,000-item batch (backend CPU), the heap row, the unique
-- index entry and the BRIN entry of each item cost about two thirds of recording it.
--
-- * payout_items: the items a batch recorded, in chunks of at most 200 consecutive items
--   (position ids ascending within a partition, as the engine sends them), each chunk
--   with the range [lo, hi] of its position ids. A chunk stays inline (under
--   toast_tuple_target, uncompressed), so reading one costs one heap tuple.
--   - No uniqueness per item: a batch is recorded once (its payout_batches row, in the
--     same transaction), and a position is recorded at most once per payout because the
--     statement that records a batch first takes a lock per (payout, product) and leaves
--     out every item whose position a chunk of that payout already holds (found through
--     payout_items_payout: the chunks whose range overlaps the batch's).
--   - A position's records (its history, its interest paid, previews) are the chunks whose
--     range contains it (payout_items_ranges, GiST): per payout at most one chunk per
--     engine partition, each searched for the position.
--   - A record's id is block * 16384 + its index in the chunk; blocks come from the
--     sequence interest_blocks, shared with interest_records, so ids grow with time as
--     before and pages of ListInterest keep their order.
-- * payout_reinvestments: the (payout, position) pairs of payout_items whose interest went
--   back into the position (a few per batch), instead of a flag per record.
-- * interest_records (the former table interest): fixed-term interest at maturity and the
--   payouts recorded before this migration, one row each, as before.
-- * interest: a view of every record, one row per item (both tables), for reading by hand
--   and in tests; the service reads through position_interest and its own queries.

ALTER TABLE interest RENAME TO interest_records;
ALTER INDEX interest_position_payout RENAME TO interest_records_position_payout;
-- Written only at maturity from now on: a plain btree on id serves listings in id order.
DROP INDEX interest_id_ranges;
CREATE UNIQUE INDEX interest_records_id ON interest_records (id);

CREATE SEQUENCE interest_blocks;
SELECT setval('interest_blocks', (SELECT coalesce(max(id), 0) FROM interest_records) / 16384 + 1, false);
ALTER TABLE interest_records ALTER COLUMN id SET DEFAULT nextval('interest_blocks') * 16384;

CREATE TABLE payout_items (
    block         bigint         PRIMARY KEY,
    payout_id     integer        NOT NULL,
    "partition"   integer        NOT NULL,
    sequence      integer        NOT NULL,
    product_id    text           NOT NULL,
    lo            bigint         NOT NULL,
    hi            bigint         NOT NULL,
    to_hour       bigint         NOT NULL,
    created_at    timestamptz    NOT NULL,
    position_ids  bigint[]       NOT NULL,
    amounts       numeric[]      NOT NULL,
    from_hours    bigint[]       NOT NULL,
    CHECK (lo <= hi),
    CHECK (cardinality(position_ids) BETWEEN 1 AND 16384),
    CHECK (cardinality(amounts) = cardinality(position_ids) AND cardinality(from_hours) = cardinality(position_ids))
) WITH (toast_tuple_target = 8160);
ALTER TABLE payout_items
    ALTER COLUMN position_ids SET STORAGE MAIN,
    ALTER COLUMN amounts SET STORAGE MAIN,
    ALTER COLUMN from_hours SET STORAGE MAIN;
CREATE INDEX payout_items_payout ON payout_items (payout_id, hi) INCLUDE (lo);
CREATE INDEX payout_items_ranges ON payout_items USING gist (int8range(lo, hi, '[]'));

CREATE TABLE payout_reinvestments (
    position_id  bigint   NOT NULL,
    payout_id    integer  NOT NULL,
    PRIMARY KEY (position_id, payout_id)
);

-- Payouts with rows in interest_records (recorded before this migration, and the
-- maturity): a batch of such a payout recorded from now on also leaves out the positions
-- those rows hold.
ALTER TABLE payouts ADD COLUMN in_records boolean NOT NULL DEFAULT false;
UPDATE payouts SET in_records = true WHERE id IN (SELECT DISTINCT payout_id FROM interest_records) OR (job = 'simple_earn.maturity' AND period = '');

-- Every interest record of one position: its rows in interest_records, and its item in
-- each chunk whose range holds it.
CREATE FUNCTION position_interest(pos bigint)
RETURNS TABLE (id bigint, payout_id integer, amount numeric, from_hour bigint, to_hour bigint, reinvested boolean, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.id, r.payout_id, r.amount, r.from_hour, r.to_hour, r.reinvested, r.created_at FROM interest_records r WHERE r.position_id = pos
    UNION ALL
    SELECT b.block * 16384 + k - 1, b.payout_id, b.amounts[k], b.from_hours[k], b.to_hour,
           EXISTS (SELECT 1 FROM payout_reinvestments x WHERE x.position_id = pos AND x.payout_id = b.payout_id), b.created_at
    FROM payout_items b CROSS JOIN LATERAL array_position(b.position_ids, pos) AS k
    WHERE int8range(b.lo, b.hi, '[]') @> pos AND k IS NOT NULL
$$;

CREATE VIEW interest AS
    SELECT r.id, r.payout_id, r.position_id, r.amount, r.from_hour, r.to_hour, r.reinvested, r.created_at FROM interest_records r
    UNION ALL
    SELECT b.block * 16384 + u.k - 1, b.payout_id, u.position_id, u.amount, u.from_hour, b.to_hour,
           EXISTS (SELECT 1 FROM payout_reinvestments x WHERE x.position_id = u.position_id AND x.payout_id = b.payout_id), b.created_at
    FROM payout_items b CROSS JOIN LATERAL unnest(b.position_ids, b.amounts, b.from_hours) WITH ORDINALITY AS u(position_id, amount, from_hour, k);

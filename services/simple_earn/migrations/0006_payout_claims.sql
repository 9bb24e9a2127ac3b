-- Which positions a payout has recorded, as bitmaps: one row per (payout, product, block of
-- 8,192 position ids), bit k (from the left) of block b set once position b * 8192 + k is
-- recorded by a batch of the payout.
--
-- The statement that records a batch leaves out every position another batch of its
-- payout recorded. It found them by reading the items of each chunk (payout_items) of the
-- payout whose id range overlaps the batch's. But the engine spreads positions over its
-- partitions by a hash of their id, so every other partition's chunks overlap: with six
-- partitions a batch read up to five times its own number of items, and the more
-- partitions, the more. Now it reads the bitmaps of its few blocks, and looks at its items
-- one by one only in a block whose bitmap meets its own (never, when the engine behaves).
--
-- Per product: a position is recorded only in batches of its own product (the check
-- against positions), and batches of one (payout, product) record one at a time (its
-- lock), so two never update one row at once.
CREATE TABLE payout_claims (
    payout_id   integer     NOT NULL,
    product_id  text        NOT NULL,
    block       bigint      NOT NULL,
    bits        bit(8192)   NOT NULL,
    PRIMARY KEY (payout_id, product_id, block)
);

-- Payouts created before this migration may have items without bitmaps: their batches
-- keep the check by chunk ranges. Every payout created from now on has bitmaps.
ALTER TABLE payouts ADD COLUMN claims boolean NOT NULL DEFAULT false;
ALTER TABLE payouts ALTER COLUMN claims SET DEFAULT true;

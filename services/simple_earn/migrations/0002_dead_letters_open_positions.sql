-- Payout records that could not be parsed or applied: parked here, never skipped
-- silently. One row per Kafka record (a redelivery parks nothing twice). `raw` is the
-- record's value exactly as consumed, so it can be inspected and replayed.
CREATE TABLE dead_letters (
    id           bigserial   PRIMARY KEY,
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic, "partition", "offset")
);

-- Open (active) positions per product, kept in the transactions that open and close
-- positions (they lock the product row already), so the earn_simple_earn_positions_open
-- gauge is one read of the products table.
ALTER TABLE products ADD COLUMN open_positions bigint NOT NULL DEFAULT 0 CHECK (open_positions >= 0);
UPDATE products p SET open_positions = (SELECT count(*) FROM positions WHERE product_id = p.product_id AND status = 'active');

-- Bulk credits (payouts) in columns, replacing the pending transfers of 0001.
--
-- A bulk credit commits as one header row and its credits split by owner into
-- owner_bucket() buckets (about 20 credits per bucket for 5,000): no account is resolved,
-- locked or rewritten and no row is written per credit. A user's balance is the
-- account's balance plus the user's credits still in bulk_credit_parts, which a lookup
-- finds through the (bucket) index reading only the small rows of one bucket. The folder
-- (store.fold_bulk_credit) moves a bulk credit's parts into per-user transfers and
-- balances in one transaction and deletes them; a posting that locks a user's funding
-- account first folds that user's credits alone (store.lock_accounts), taking them out
-- of their parts. So bulk_credit_parts holds exactly the credits not yet applied.

-- Fold the pending credits of 0001 into balances; their transfers rows stay the history.
UPDATE accounts a SET balance = a.balance + p.amount
FROM (SELECT destination_id, sum(amount) AS amount FROM transfers WHERE pending GROUP BY destination_id) p
WHERE a.id = p.destination_id;
ALTER TABLE transfers DROP COLUMN pending;  -- drops transfers_pending too

-- The bucket of an owner's credits. crc32c is documented and gives the same value on every
-- machine and PostgreSQL version (18+). Changing the bucket count needs every bulk credit
-- folded first (or its parts rewritten).
CREATE FUNCTION owner_bucket(owner text) RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (crc32c(convert_to(owner, 'UTF8')) & 255)::integer;

-- One row per bulk credit (posting): kept after folding as its record.
CREATE TABLE bulk_credits (
    posting_id    bigint         PRIMARY KEY,
    asset         text           NOT NULL,
    source_id     bigint         NOT NULL,
    credit_count  integer        NOT NULL CHECK (credit_count > 0),
    total         numeric(38,18) NOT NULL CHECK (total > 0),
    -- Every credit's reference when its part has no refs column.
    reference     text           NOT NULL DEFAULT '',
    created_at    timestamptz    NOT NULL,
    folded_at     timestamptz
);
CREATE INDEX bulk_credits_unfolded ON bulk_credits (posting_id) WHERE folded_at IS NULL;

-- The credits not yet applied, by bucket of their owner: parallel arrays (owners distinct
-- within a bulk credit). refs is NULL when the credits share bulk_credits.reference.
CREATE TABLE bulk_credit_parts (
    posting_id  bigint         NOT NULL,
    bucket      integer        NOT NULL,
    asset       text           NOT NULL,
    owners      text[]         NOT NULL,
    amounts     numeric[]      NOT NULL,
    refs        text[],
    -- The sum of amounts, so that ledger totals need not open the arrays.
    total       numeric(38,18) NOT NULL,
    PRIMARY KEY (posting_id, bucket)
);
CREATE INDEX bulk_credit_parts_bucket ON bulk_credit_parts (bucket);

-- A bulk credit's event carries its columns (100 KB and more for 5,000 credits) and
-- leaves the outbox within seconds: compressing it costs more than it saves.
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;

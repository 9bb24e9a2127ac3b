-- The funding ledger: accounts, postings (one per idempotent request), transfers, holds.

CREATE TABLE accounts (
    id              bigserial PRIMARY KEY,
    owner           text           NOT NULL,
    asset           text           NOT NULL,
    kind            text           NOT NULL,
    balance         numeric(38,18) NOT NULL DEFAULT 0,
    may_go_negative boolean        NOT NULL,
    created_at      timestamptz    NOT NULL DEFAULT now(),
    UNIQUE (owner, asset, kind),
    -- The domain refuses overdrafts with a precise message; this is the last line.
    CONSTRAINT no_overdraft CHECK (may_go_negative OR balance >= 0)
) WITH (fillfactor = 70);  -- room for HOT updates: a balance change rewrites no index

CREATE TABLE postings (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL,
    created_at  timestamptz NOT NULL
);

-- No foreign keys: rows are inserted only by store.post, in the transaction that creates
-- their posting and resolves (and locks) their accounts; accounts are never deleted. A
-- foreign key check per row would double the cost of a 10,000-transfer payout batch.
CREATE TABLE transfers (
    id              bigserial      PRIMARY KEY,
    posting_id      bigint         NOT NULL,
    asset           text           NOT NULL,
    source_id       bigint         NOT NULL,
    destination_id  bigint         NOT NULL,
    amount          numeric(38,18) NOT NULL CHECK (amount > 0),
    reference       text           NOT NULL DEFAULT '',
    created_at      timestamptz    NOT NULL,
    -- A bulk credit not yet added to its destination's balance (see store.post_credits):
    -- the destination's balance is accounts.balance plus its pending credits.
    pending         boolean        NOT NULL DEFAULT false,
    CHECK (source_id <> destination_id)
);
CREATE INDEX transfers_source ON transfers (source_id, id);
CREATE INDEX transfers_destination ON transfers (destination_id, id);
CREATE INDEX transfers_posting ON transfers (posting_id);
CREATE INDEX transfers_pending ON transfers (destination_id) WHERE pending;

CREATE TABLE holds (
    id          bigserial      PRIMARY KEY,
    owner       text           NOT NULL,
    asset       text           NOT NULL,
    holder      text           NOT NULL,
    amount      numeric(38,18) NOT NULL CHECK (amount > 0),
    remaining   numeric(38,18) NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    reference   text           NOT NULL DEFAULT '',
    created_at  timestamptz    NOT NULL,
    updated_at  timestamptz    NOT NULL
);
CREATE INDEX holds_owner ON holds (owner, id);

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
);

CREATE TABLE postings (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE transfers (
    id              bigserial      PRIMARY KEY,
    posting_id      bigint         NOT NULL REFERENCES postings (id),
    asset           text           NOT NULL,
    source_id       bigint         NOT NULL REFERENCES accounts (id),
    destination_id  bigint         NOT NULL REFERENCES accounts (id),
    amount          numeric(38,18) NOT NULL CHECK (amount > 0),
    reference       text           NOT NULL DEFAULT '',
    created_at      timestamptz    NOT NULL,
    CHECK (source_id <> destination_id)
);
CREATE INDEX transfers_source ON transfers (source_id, id);
CREATE INDEX transfers_destination ON transfers (destination_id, id);
CREATE INDEX transfers_posting ON transfers (posting_id);

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

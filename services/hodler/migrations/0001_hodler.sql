-- HODLer Airdrop: airdrops, the read model of counted holdings (funding + Simple Earn
-- holds) from the wallet's transfer events, each airdrop's three sums per user
-- (PRE, D1, M1: see services/hodler/domain.py) and in total, rewards. Events are applied
-- exactly once: the kernel's inbox in the same transaction.

CREATE TABLE airdrops (
    seq             bigserial      UNIQUE,
    airdrop_id      text           PRIMARY KEY,
    hold_asset      text           NOT NULL,
    reward_asset    text           NOT NULL,
    total           numeric(38,18) NOT NULL CHECK (total > 0),
    start_hour      bigint         NOT NULL,
    end_hour        bigint         NOT NULL CHECK (end_hour > start_hour),
    -- The window in microseconds since the epoch: [start_us, end_us).
    start_us        bigint         NOT NULL,
    end_us          bigint         NOT NULL,
    min_average     numeric(38,18) NOT NULL CHECK (min_average >= 0),
    per_user_cap    numeric(38,18) CHECK (per_user_cap > 0),
    created_at      timestamptz    NOT NULL,
    -- NULL while open; 'distributing' once the rewards are recorded (the sums are
    -- frozen); 'distributed' once the wallet paid them all.
    distribution    text           CHECK (distribution IN ('distributing', 'distributed')),
    job             text,
    period          text,
    winners         integer,
    paid            numeric(38,18),
    distributed_at  timestamptz
);
CREATE INDEX airdrops_open ON airdrops (hold_asset, end_us) WHERE distribution IS NULL;
CREATE INDEX airdrops_due ON airdrops (end_hour) WHERE distribution IS DISTINCT FROM 'distributed';

-- Counted holdings of every user in every asset, as applied from wallet.transfers.
CREATE TABLE balances (
    user_id  text    NOT NULL,
    asset    text    NOT NULL,
    amount   numeric NOT NULL,
    PRIMARY KEY (user_id, asset)
);

-- Per (airdrop, user): PRE = the deltas before the start (the balance at the start,
-- seeded from balances at creation), D1 = the deltas in the window, M1 = the sum of
-- delta x t (microseconds) in the window.
CREATE TABLE holdings (
    airdrop_id  text    NOT NULL REFERENCES airdrops (airdrop_id),
    user_id     text    NOT NULL,
    pre         numeric NOT NULL DEFAULT 0,
    d1          numeric NOT NULL DEFAULT 0,
    m1          numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (airdrop_id, user_id)
);

-- The same three sums over every user of the airdrop: the estimate's denominator.
CREATE TABLE airdrop_sums (
    airdrop_id  text    PRIMARY KEY REFERENCES airdrops (airdrop_id),
    pre         numeric NOT NULL DEFAULT 0,
    d1          numeric NOT NULL DEFAULT 0,
    m1          numeric NOT NULL DEFAULT 0
);

-- One reward per (airdrop, user), recorded with the split, paid by chunk.
CREATE TABLE rewards (
    id               bigserial      PRIMARY KEY,
    airdrop_id       text           NOT NULL REFERENCES airdrops (airdrop_id),
    user_id          text           NOT NULL,
    counted_average  numeric        NOT NULL CHECK (counted_average >= 0),  -- 18 fraction digits, rounded down
    amount           numeric(38,18) NOT NULL CHECK (amount >= 0),
    chunk            integer        NOT NULL,
    posting_id       text,
    paid_at          timestamptz,
    UNIQUE (airdrop_id, user_id)
);
CREATE INDEX rewards_user ON rewards (user_id, id);
CREATE INDEX rewards_chunk ON rewards (airdrop_id, chunk);

-- The next offset to apply per partition of wallet.transfers: the distribution waits
-- until these reach the topic's end offsets.
CREATE TABLE consumed (
    topic        text    NOT NULL,
    "partition"  integer NOT NULL,
    next_offset  bigint  NOT NULL,
    PRIMARY KEY (topic, "partition")
);

-- Event records that could not be read, parked for a look.
CREATE TABLE dead_letters (
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);

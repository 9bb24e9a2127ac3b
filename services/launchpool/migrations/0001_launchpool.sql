-- Launchpool: projects and pools, trading volumes, stakes and their wallet holds, stake
-- changes, the hour watermark, payouts and the rewards paid.

CREATE TABLE projects (
    project_id    text        PRIMARY KEY,
    reward_asset  text        NOT NULL,
    start_hour    bigint      NOT NULL,
    end_hour      bigint      NOT NULL CHECK (end_hour > start_hour),
    payout_mode   text        NOT NULL CHECK (payout_mode IN ('hourly', 'at_end')),
    created_at    timestamptz NOT NULL
);

CREATE TABLE pools (
    pool_id        text           PRIMARY KEY,
    project_id     text           NOT NULL REFERENCES projects (project_id),
    position       integer        NOT NULL,
    stake_asset    text           NOT NULL,
    total_reward   numeric(38,18) NOT NULL CHECK (total_reward > 0),
    min_stake      numeric(38,18) NOT NULL CHECK (min_stake > 0),
    max_stake      numeric(38,18) NOT NULL,
    pool_cap       numeric(38,18),
    newcomer_only  boolean        NOT NULL,
    cap_tiers      jsonb          NOT NULL,
    -- Kept by the stake writes (under the pool's row lock).
    staked         numeric(38,18) NOT NULL DEFAULT 0 CHECK (staked >= 0),
    stakers        integer        NOT NULL DEFAULT 0 CHECK (stakers >= 0),
    UNIQUE (project_id, stake_asset)
);
CREATE INDEX pools_project ON pools (project_id, position);

-- Recent trading volume per user (USDT), fed by the exchange core.
CREATE TABLE volumes (
    user_id     text           PRIMARY KEY,
    volume      numeric(38,18) NOT NULL CHECK (volume >= 0),
    updated_at  timestamptz    NOT NULL
);

-- One stake per (user, pool).
CREATE TABLE stakes (
    id          bigserial      PRIMARY KEY,
    user_id     text           NOT NULL,
    pool_id     text           NOT NULL REFERENCES pools (pool_id),
    amount      numeric(38,18) NOT NULL CHECK (amount >= 0),
    created_at  timestamptz    NOT NULL,
    updated_at  timestamptz    NOT NULL,
    UNIQUE (user_id, pool_id)
);
CREATE INDEX stakes_user ON stakes (user_id, id);

-- Every stake change, effective at its own time (microseconds since the epoch).
CREATE TABLE stake_changes (
    id          bigserial      PRIMARY KEY,
    stake_id    bigint         NOT NULL REFERENCES stakes (id),
    delta       numeric(38,18) NOT NULL CHECK (delta <> 0),
    at_micros   bigint         NOT NULL,
    created_at  timestamptz    NOT NULL
);
CREATE INDEX stake_changes_stake ON stake_changes (stake_id, id);

-- The wallet holds that carry a stake. A hold id is claimed here once (used) or in
-- abandoned_holds (placed for a request that then failed, released), never both.
CREATE TABLE stake_holds (
    hold_id     bigint         PRIMARY KEY,
    stake_id    bigint         NOT NULL REFERENCES stakes (id),
    amount      numeric(38,18) NOT NULL CHECK (amount > 0),
    remaining   numeric(38,18) NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    created_at  timestamptz    NOT NULL
);
CREATE INDEX stake_holds_stake ON stake_holds (stake_id, hold_id);

CREATE TABLE abandoned_holds (
    hold_id  bigint PRIMARY KEY,
    reason   text   NOT NULL
);

-- Wallet releases decided by a committed transaction (unstake, abandoned holds); run
-- after the commit and, after a crash, by the sweeper. Keys are the wallet's.
CREATE TABLE wallet_releases (
    id          bigserial      PRIMARY KEY,
    key         text           NOT NULL UNIQUE,
    hold_id     bigint         NOT NULL,
    amount      numeric(38,18) NOT NULL CHECK (amount > 0),
    reason      text           NOT NULL,
    done        boolean        NOT NULL DEFAULT false,
    created_at  timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX wallet_releases_pending ON wallet_releases (id) WHERE NOT done;

-- The last hour boundary published to the engine (one row).
CREATE TABLE watermark (
    id          integer     PRIMARY KEY CHECK (id = 1),
    hour        bigint      NOT NULL,
    closed_at   timestamptz NOT NULL
);

-- Payout requests, by their natural key.
CREATE TABLE payouts (
    id             bigserial   PRIMARY KEY,
    job            text        NOT NULL,
    period         text        NOT NULL,
    boundary_hour  bigint      NOT NULL,
    pool_ids       text[]      NOT NULL,
    requested_at   timestamptz NOT NULL,
    UNIQUE (job, period)
);

-- The engine's batches as applied: recorded, then posted once the wallet paid them.
CREATE TABLE payout_batches (
    id             bigserial      PRIMARY KEY,
    payout_id      bigint         NOT NULL REFERENCES payouts (id),
    "partition"    integer        NOT NULL,
    sequence       integer        NOT NULL,
    last           boolean        NOT NULL,
    pool_id        text,
    asset          text,
    digest         bytea          NOT NULL,
    items          integer        NOT NULL,
    total          numeric(38,18) NOT NULL,
    posting_id     text,
    posted_at      timestamptz,
    UNIQUE (payout_id, "partition", sequence)
);

-- A reward paid to a stake by a payout: at most one per (stake, payout).
CREATE TABLE rewards (
    id          bigserial      PRIMARY KEY,
    stake_id    bigint         NOT NULL REFERENCES stakes (id),
    payout_id   bigint         NOT NULL REFERENCES payouts (id),
    batch_id    bigint         NOT NULL REFERENCES payout_batches (id),
    amount      numeric(38,18) NOT NULL CHECK (amount > 0),
    from_hour   bigint         NOT NULL,
    to_hour     bigint         NOT NULL,
    created_at  timestamptz    NOT NULL,
    UNIQUE (stake_id, payout_id)
);
CREATE INDEX rewards_batch ON rewards (batch_id, id);

-- Payout records that could not be applied, parked for a look.
CREATE TABLE dead_letters (
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);

-- Simple Earn: products, rate history, positions and their wallet holds, records,
-- the accrual watermark and payout bookkeeping.

CREATE TABLE products (
    product_id            text           PRIMARY KEY,
    asset                 text           NOT NULL,
    kind                  text           NOT NULL CHECK (kind IN ('flexible', 'fixed')),
    status                text           NOT NULL CHECK (status IN ('active', 'paused')),
    tiers                 jsonb          NOT NULL,
    min_subscription      numeric(38,18) NOT NULL CHECK (min_subscription > 0),
    max_per_user          numeric(38,18),
    quota                 numeric(38,18),
    -- Principal of the product's open positions.
    subscribed            numeric(38,18) NOT NULL DEFAULT 0 CHECK (subscribed >= 0),
    term_days             integer        NOT NULL DEFAULT 0,
    early_redeem_allowed  boolean        NOT NULL DEFAULT false,
    payout_cadence        text           NOT NULL CHECK (payout_cadence IN ('daily', 'hourly')),
    created_at            timestamptz    NOT NULL,
    updated_at            timestamptz    NOT NULL
);

-- Every rate change of a flexible product (the first one at creation).
CREATE TABLE rate_history (
    id              bigserial   PRIMARY KEY,
    product_id      text        NOT NULL REFERENCES products (product_id),
    effective_hour  bigint      NOT NULL,
    tiers           jsonb       NOT NULL,
    changed_at      timestamptz NOT NULL
);
CREATE INDEX rate_history_product ON rate_history (product_id, id);

CREATE TABLE positions (
    id                 bigserial      PRIMARY KEY,
    user_id            text           NOT NULL,
    product_id         text           NOT NULL REFERENCES products (product_id),
    asset              text           NOT NULL,
    kind               text           NOT NULL,
    principal          numeric(38,18) NOT NULL CHECK (principal >= 0),
    status             text           NOT NULL CHECK (status IN ('active', 'matured', 'redeemed')),
    auto_subscribe     boolean        NOT NULL DEFAULT false,
    auto_renew         boolean        NOT NULL DEFAULT false,
    -- Fixed-term: the tiers locked in, accrual start and maturity (unix hours).
    fixed_tiers        jsonb,
    accrues_from_hour  bigint         NOT NULL,
    matures_hour       bigint,
    closed_from_hour   bigint,
    interest_paid      numeric(38,18) NOT NULL DEFAULT 0,
    renewed_from       bigint REFERENCES positions (id),
    opened_at          timestamptz    NOT NULL,
    updated_at         timestamptz    NOT NULL
);
-- One open flexible position per (user, product).
CREATE UNIQUE INDEX positions_one_flexible ON positions (user_id, product_id) WHERE kind = 'flexible' AND status = 'active';
CREATE INDEX positions_user ON positions (user_id, id);
CREATE INDEX positions_due ON positions (matures_hour) WHERE kind = 'fixed' AND status = 'active';

-- The accruing principal's history: (effective_hour, delta). The sum of all deltas is
-- the principal; the sum of deltas effective at or before an hour accrues in it.
CREATE TABLE principal_changes (
    id              bigserial      PRIMARY KEY,
    position_id     bigint         NOT NULL REFERENCES positions (id),
    effective_hour  bigint         NOT NULL,
    delta           numeric(38,18) NOT NULL CHECK (delta <> 0),
    created_at      timestamptz    NOT NULL
);
CREATE INDEX principal_changes_position ON principal_changes (position_id, id);

-- The wallet holds that carry a position's principal. A wallet hold id is claimed
-- here once ('used'); a hold placed for a request that then failed is claimed
-- 'abandoned' before it is released, so it can never be both.
CREATE TABLE position_holds (
    hold_id      bigint         PRIMARY KEY,
    position_id  bigint         NOT NULL REFERENCES positions (id),
    amount       numeric(38,18) NOT NULL CHECK (amount > 0),
    remaining    numeric(38,18) NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    created_at   timestamptz    NOT NULL
);
CREATE INDEX position_holds_position ON position_holds (position_id, hold_id);

CREATE TABLE abandoned_holds (
    hold_id     bigint      PRIMARY KEY,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id           bigserial      PRIMARY KEY,
    position_id  bigint         NOT NULL REFERENCES positions (id),
    user_id      text           NOT NULL,
    product_id   text           NOT NULL,
    amount       numeric(38,18) NOT NULL CHECK (amount > 0),
    source       text           NOT NULL CHECK (source IN ('user', 'auto_subscribe', 'auto_renew')),
    hold_id      bigint         NOT NULL,
    created_at   timestamptz    NOT NULL
);
CREATE INDEX subscriptions_user ON subscriptions (user_id, id);

CREATE TABLE redemptions (
    id                  bigserial      PRIMARY KEY,
    position_id         bigint         NOT NULL REFERENCES positions (id),
    user_id             text           NOT NULL,
    product_id          text           NOT NULL,
    amount              numeric(38,18) NOT NULL CHECK (amount > 0),
    source              text           NOT NULL CHECK (source IN ('user', 'maturity')),
    interest_forfeited  boolean        NOT NULL DEFAULT false,
    created_at          timestamptz    NOT NULL
);
CREATE INDEX redemptions_user ON redemptions (user_id, id);

-- Wallet releases decided in a committed transaction and executed after it (a
-- redemption's principal, a hold that lost its position). Keys are deterministic, so
-- executing a row twice moves nothing twice; rows stay until the wallet confirmed.
CREATE TABLE wallet_releases (
    id          bigserial      PRIMARY KEY,
    key         text           NOT NULL UNIQUE,
    hold_id     bigint         NOT NULL,
    amount      numeric(38,18) NOT NULL CHECK (amount > 0),
    reason      text           NOT NULL,
    created_at  timestamptz    NOT NULL DEFAULT now(),
    done_at     timestamptz
);
CREATE INDEX wallet_releases_pending ON wallet_releases (id) WHERE done_at IS NULL;

-- The accrual watermark: HourClosed(last_hour) is the last tick published.
CREATE TABLE closed_hours (
    id         integer     PRIMARY KEY CHECK (id = 1),
    last_hour  bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE payout_requests (
    job            text        NOT NULL,
    period         text        NOT NULL,
    boundary_hour  bigint      NOT NULL,
    cadence        text        NOT NULL,
    product_ids    text[]      NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (job, period)
);

CREATE TABLE payout_batches (
    job          text        NOT NULL,
    period       text        NOT NULL,
    partition    integer     NOT NULL,
    sequence     integer     NOT NULL,
    last         boolean     NOT NULL,
    items        integer     NOT NULL,
    posting_id   text,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (job, period, partition, sequence)
);

CREATE TABLE payout_partitions (
    job        text        NOT NULL,
    period     text        NOT NULL,
    partition  integer     NOT NULL,
    done_at    timestamptz NOT NULL,
    PRIMARY KEY (job, period, partition)
);

-- Interest paid: payouts of flexible positions and fixed-term interest at maturity.
CREATE TABLE interest (
    id           bigserial      PRIMARY KEY,
    job          text           NOT NULL,
    period       text           NOT NULL,
    position_id  bigint         NOT NULL REFERENCES positions (id),
    user_id      text           NOT NULL,
    product_id   text           NOT NULL,
    asset        text           NOT NULL,
    amount       numeric(38,18) NOT NULL CHECK (amount >= 0),
    carry        numeric(38,18) NOT NULL DEFAULT 0,
    from_hour    bigint         NOT NULL,
    to_hour      bigint         NOT NULL,
    reinvested   boolean        NOT NULL DEFAULT false,
    created_at   timestamptz    NOT NULL,
    UNIQUE (job, period, position_id)
);
CREATE INDEX interest_user ON interest (user_id, id);
CREATE INDEX interest_position ON interest (position_id, id);

-- The reinvestment decision of a payout batch, written before any wallet call, so a
-- redelivery after a crash places exactly the same holds (never orphans one).
CREATE TABLE payout_intents (
    job        text     NOT NULL,
    period     text     NOT NULL,
    partition  integer  NOT NULL,
    sequence   integer  NOT NULL,
    reinvest   bigint[] NOT NULL,
    PRIMARY KEY (job, period, partition, sequence)
);

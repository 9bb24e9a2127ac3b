-- Dual Investment: plans, subscriptions (with their wallet hold and, from settling on,
-- their settlement record), holds abandoned by subscriptions that failed after the hold.

CREATE TABLE plans (
    plan_id           text           PRIMARY KEY,
    base_asset        text           NOT NULL,
    quote_asset       text           NOT NULL,
    direction         text           NOT NULL CHECK (direction IN ('sell_high', 'buy_low')),
    strike            numeric(38,18) NOT NULL CHECK (strike > 0),
    apr               numeric(38,18) NOT NULL CHECK (apr >= 0),
    settle_us         bigint         NOT NULL,
    window_seconds    integer        NOT NULL CHECK (window_seconds > 0),
    min_amount        numeric(38,18) NOT NULL CHECK (min_amount > 0),
    max_per_user      numeric(38,18) NOT NULL,
    quota             numeric(38,18) NOT NULL,
    -- Kept by subscriptions, under the plan's row lock.
    subscribed        numeric(38,18) NOT NULL DEFAULT 0 CHECK (subscribed >= 0 AND subscribed <= quota),
    status            text           NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settling', 'settled', 'failed')),
    settlement_price  numeric(38,18),
    twap_ticks        integer,
    failure_reason    text,
    attempts          integer        NOT NULL DEFAULT 0,
    settled_at        timestamptz,
    created_at        timestamptz    NOT NULL
);
CREATE INDEX plans_due ON plans (settle_us) WHERE status <> 'settled';

CREATE TABLE subscriptions (
    id               bigserial      PRIMARY KEY,
    plan_id          text           NOT NULL REFERENCES plans (plan_id),
    user_id          text           NOT NULL,
    client_order_id  text           NOT NULL,
    amount           numeric(38,18) NOT NULL CHECK (amount > 0),
    subscribed_us    bigint         NOT NULL,
    hold_id          bigint         NOT NULL UNIQUE,
    status           text           NOT NULL DEFAULT 'subscribed'
                                    CHECK (status IN ('subscribed', 'settling', 'settled', 'failed')),
    failure_reason   text,
    -- The settlement record, fixed when the plan's price is (status settling).
    settlement_price numeric(38,18),
    converted        boolean,
    payout_asset     text,
    payout_amount    numeric(38,18) CHECK (payout_amount >= 0),
    settled_at       timestamptz,
    UNIQUE (user_id, client_order_id)
);
CREATE INDEX subscriptions_plan ON subscriptions (plan_id, id);
CREATE INDEX subscriptions_user ON subscriptions (user_id, id);

-- A hold placed for a subscription that then failed a precondition: released, never used.
CREATE TABLE abandoned_holds (
    hold_id   bigint  PRIMARY KEY,
    amount    numeric(38,18) NOT NULL,
    reason    text    NOT NULL,
    released  boolean NOT NULL DEFAULT false
);

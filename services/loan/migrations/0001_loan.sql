-- Crypto Loan: configuration (loanable and collateral assets), loans with their money
-- state, collateral holds, the history of every change (principal, debt, LTV), the
-- engine's margin calls and liquidations, and the write log that makes wallet calls
-- recoverable (an operation is recorded before its wallet calls, applied after them).

CREATE TABLE loan_assets (
    asset                     text           PRIMARY KEY,
    hourly_rate               numeric(38,18) NOT NULL CHECK (hourly_rate >= 0),
    fixed_7_days_hourly_rate  numeric(38,18),
    fixed_30_days_hourly_rate numeric(38,18),
    min_borrow                numeric(38,18) NOT NULL CHECK (min_borrow > 0),
    max_borrow                numeric(38,18) NOT NULL,
    updated_at                timestamptz    NOT NULL
);

CREATE TABLE collateral_assets (
    asset      text           PRIMARY KEY,
    discount   numeric(38,18) NOT NULL CHECK (discount > 0 AND discount <= 1),
    updated_at timestamptz    NOT NULL
);

CREATE TABLE loans (
    loan_id          text           PRIMARY KEY,
    user_id          text           NOT NULL,
    loan_asset       text           NOT NULL,
    term             text           NOT NULL CHECK (term IN ('flexible', 'fixed_7_days', 'fixed_30_days')),
    hourly_rate      numeric(38,18) NOT NULL,
    -- money state in units of the loan asset
    principal_units  numeric(40,0)  NOT NULL CHECK (principal_units >= 0),
    interest_units   numeric(40,0)  NOT NULL CHECK (interest_units >= 0),
    carry_e10        bigint         NOT NULL DEFAULT 0,
    start_hour       bigint         NOT NULL,
    charged_through  bigint         NOT NULL,
    initial_ltv      numeric(38,18) NOT NULL,
    margin_call_ltv  numeric(38,18) NOT NULL,
    liquidation_ltv  numeric(38,18) NOT NULL,
    liquidation_fee  numeric(38,18) NOT NULL,
    rearm_band       numeric(38,18) NOT NULL,
    status           text           NOT NULL CHECK (status IN ('open', 'repaid', 'liquidated')),
    version          bigint         NOT NULL,
    borrowed_us      bigint         NOT NULL,
    due_us           bigint,
    closed_us        bigint
);
CREATE INDEX loans_user ON loans (user_id, loan_id);

-- Collateral per (loan, asset): the amount pledged and its discount (fixed at pledging).
CREATE TABLE loan_collateral (
    loan_id      text           NOT NULL REFERENCES loans (loan_id),
    position     integer        NOT NULL,
    asset        text           NOT NULL,
    amount_units numeric(40,0)  NOT NULL CHECK (amount_units >= 0),
    discount     numeric(38,18) NOT NULL,
    PRIMARY KEY (loan_id, asset)
);

-- The wallet holds behind the collateral (one per pledge), with what is left in each.
CREATE TABLE loan_holds (
    loan_id   text          NOT NULL REFERENCES loans (loan_id),
    asset     text          NOT NULL,
    hold_id   bigint        PRIMARY KEY,
    remaining numeric(40,0) NOT NULL CHECK (remaining >= 0)
);
CREATE INDEX loan_holds_loan ON loan_holds (loan_id, asset, hold_id);

-- Every change: the principal after it (the interest records are derived from these),
-- the debt and the LTV at the prices used.
CREATE TABLE loan_history (
    loan_id         text          NOT NULL REFERENCES loans (loan_id),
    version         bigint        NOT NULL,
    at_us           bigint        NOT NULL,
    cause           text          NOT NULL,
    principal_units numeric(40,0) NOT NULL,
    interest_units  numeric(40,0) NOT NULL,
    ltv             numeric(38,18),
    PRIMARY KEY (loan_id, version)
);

-- Margin calls, re-arms and liquidations, one per engine action (natural key: the loan,
-- the kind, the version judged and the crossing's sequence; a liquidation once per loan).
CREATE TABLE loan_events (
    id          bigserial      PRIMARY KEY,
    loan_id     text           NOT NULL REFERENCES loans (loan_id),
    kind        text           NOT NULL CHECK (kind IN ('margin_call', 'rearmed', 'liquidation')),
    version     bigint         NOT NULL,
    seq         bigint         NOT NULL DEFAULT 0,
    ltv         numeric(38,18) NOT NULL,
    at_us       bigint         NOT NULL,
    price_us    bigint,
    detail      jsonb,
    UNIQUE (loan_id, kind, version, seq)
);
CREATE UNIQUE INDEX loan_events_one_liquidation ON loan_events (loan_id) WHERE kind = 'liquidation';

-- A write whose wallet calls are in flight: recorded first, applied after the calls.
CREATE TABLE loan_ops (
    op_key     text        PRIMARY KEY,
    loan_id    text        NOT NULL,
    kind       text        NOT NULL,
    plan       jsonb       NOT NULL,
    status     text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    reason     text,
    created_us bigint      NOT NULL
);
CREATE INDEX loan_ops_pending ON loan_ops (created_us) WHERE status = 'pending';

-- Hours whose start was published to the engine (StartLoanHour is idempotent by hour).
CREATE TABLE loan_hours (
    hour       bigint      PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now()
);

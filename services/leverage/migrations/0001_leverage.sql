-- Smart Leverage: products, quotes (with their expiry), positions (with their wallet hold
-- and, from settling on, their settlement record).

CREATE TABLE products (
    product_id      text           PRIMARY KEY,
    base_asset      text           NOT NULL,
    quote_asset     text           NOT NULL,
    max_leverage    numeric(38,18) NOT NULL CHECK (max_leverage >= 1),
    fee_rate        numeric(38,18) NOT NULL CHECK (fee_rate >= 0),
    min_principal   numeric(38,18) NOT NULL CHECK (min_principal > 0),
    max_principal   numeric(38,18) NOT NULL,
    max_term_hours  integer        NOT NULL CHECK (max_term_hours > 0),
    window_seconds  integer        NOT NULL CHECK (window_seconds > 0),
    created_at      timestamptz    NOT NULL
);

CREATE TABLE quotes (
    quote_id         text           PRIMARY KEY,
    user_id          text           NOT NULL,
    product_id       text           NOT NULL REFERENCES products (product_id),
    direction        text           NOT NULL CHECK (direction IN ('long', 'short')),
    leverage         numeric(38,18) NOT NULL CHECK (leverage >= 1),
    principal        numeric(38,18) NOT NULL CHECK (principal > 0),
    maturity_us      bigint         NOT NULL,
    index_price      numeric(38,18) NOT NULL CHECK (index_price > 0),
    index_us         bigint         NOT NULL,
    entry_price      numeric(38,18) NOT NULL CHECK (entry_price > 0),
    breakeven_price  numeric(38,18) NOT NULL CHECK (breakeven_price > 0),
    quoted_us        bigint         NOT NULL,
    expires_us       bigint         NOT NULL,
    -- The wallet hold placed by a subscription; a hold of a quote that expired without a
    -- position is abandoned (no subscription can use it from then on), then released.
    hold_id          bigint,
    hold_state       text           NOT NULL DEFAULT 'none' CHECK (hold_state IN ('none', 'held', 'abandoned', 'released'))
);
CREATE INDEX quotes_held ON quotes (expires_us) WHERE hold_state IN ('held', 'abandoned');

CREATE TABLE positions (
    id               bigserial      PRIMARY KEY,
    quote_id         text           NOT NULL UNIQUE REFERENCES quotes (quote_id),
    user_id          text           NOT NULL,
    product_id       text           NOT NULL REFERENCES products (product_id),
    base_asset       text           NOT NULL,
    quote_asset      text           NOT NULL,
    direction        text           NOT NULL CHECK (direction IN ('long', 'short')),
    leverage         numeric(38,18) NOT NULL,
    principal        numeric(38,18) NOT NULL CHECK (principal > 0),
    entry_price      numeric(38,18) NOT NULL,
    breakeven_price  numeric(38,18) NOT NULL,
    maturity_us      bigint         NOT NULL,
    window_seconds   integer        NOT NULL,
    opened_us        bigint         NOT NULL,
    hold_id          bigint         NOT NULL UNIQUE,
    status           text           NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settling', 'settled', 'failed')),
    failure_reason   text,
    -- The settlement record: price and payoff fixed first (status settling), the payout
    -- (the payoff capped by the treasury) fixed right before the wallet transfer.
    close_kind       text           CHECK (close_kind IN ('maturity', 'early')),
    settlement_price numeric(38,18),
    twap_ticks       integer,
    payoff           numeric(38,18) CHECK (payoff >= 0),
    payout           numeric(38,18) CHECK (payout >= 0),
    settled_at       timestamptz
);
CREATE INDEX positions_due ON positions (maturity_us) WHERE status <> 'settled';
CREATE INDEX positions_user ON positions (user_id, id);

-- Market: index price ticks per pair, stored once under their natural key (pair, event
-- time in microseconds); the first tick stored for a key is kept. event_id is the
-- envelope's (NULL for operator backfills); the consumer's inbox holds the ids applied.

CREATE TABLE ticks (
    pair         text           NOT NULL,
    at_us        bigint         NOT NULL,
    price        numeric(38,18) NOT NULL CHECK (price > 0),
    source       text           NOT NULL,
    event_id     uuid,
    received_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (pair, at_us)
);

-- Records of market.prices that could not be applied (unreadable, bad pair or price).
CREATE TABLE dead_letters (
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);

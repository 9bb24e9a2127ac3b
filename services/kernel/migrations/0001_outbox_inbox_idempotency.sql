-- Kernel tables, created in every service schema.

-- Transactional outbox: written in the same transaction as the state change it
-- announces; the relay publishes rows in id order and deletes them once Kafka acked.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    uuid        NOT NULL UNIQUE,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    envelope    bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Wakes the relay right after a commit; the relay also polls, so a lost
-- notification only delays, never loses, an event.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: the event ids a consumer has applied, written in the same transaction as
-- the effect, so a redelivered event changes nothing.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Client idempotency keys of write RPCs: the request's fingerprint and the first
-- response. Written in the same transaction as the effect.
CREATE TABLE idempotency_keys (
    key          text        PRIMARY KEY,
    method       text        NOT NULL,
    request_hash bytea       NOT NULL,
    response     bytea,
    created_at   timestamptz NOT NULL DEFAULT now()
);

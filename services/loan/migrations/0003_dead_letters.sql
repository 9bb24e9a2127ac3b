-- Records of loan.actions that could not be read (not an envelope, not a LoanActions or
-- LoanLtvAction, an unknown kind, an LTV or price that is not a number), parked for a look
-- instead of skipped: one row per Kafka record (a redelivery parks nothing twice), `raw`
-- exactly as consumed. The same table as the other services' (services/kernel/deadletters.py).
CREATE TABLE dead_letters (
    topic        text        NOT NULL,
    "partition"  integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    error        text        NOT NULL,
    raw          bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);

-- Every change of counted holdings inside an airdrop's window, per (airdrop, user): the
-- per-hour averages are derived from it and PRE on query (ListHourlyAverages). Written
-- with the sums, in the same statement and transaction (so exactly once, like them).
CREATE TABLE window_changes (
    airdrop_id  text    NOT NULL REFERENCES airdrops (airdrop_id),
    user_id     text    NOT NULL,
    t_us        bigint  NOT NULL,
    delta       numeric NOT NULL
);
CREATE INDEX window_changes_by_user ON window_changes (airdrop_id, user_id, t_us);

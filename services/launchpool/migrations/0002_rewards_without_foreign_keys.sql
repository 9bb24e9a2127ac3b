-- A payout batch records up to 5,000 rewards in one statement; three foreign-key checks
-- per row (stake, payout, batch) cost more than the insert itself. The consumer checks
-- every item against stakes in the same call and writes the payout and batch rows in the
-- same transaction, so the keys add no safety there.
ALTER TABLE rewards DROP CONSTRAINT rewards_stake_id_fkey;
ALTER TABLE rewards DROP CONSTRAINT rewards_payout_id_fkey;
ALTER TABLE rewards DROP CONSTRAINT rewards_batch_id_fkey;

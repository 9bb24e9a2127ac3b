-- Fixed-term loans at their due time: a loan not repaid by then is settled from its
-- collateral at the index without a fee (status 'matured', one 'maturity' event with
-- the sales, at most one per loan).
ALTER TABLE loans DROP CONSTRAINT loans_status_check;
ALTER TABLE loans ADD CONSTRAINT loans_status_check CHECK (status IN ('open', 'repaid', 'liquidated', 'matured'));
ALTER TABLE loan_events DROP CONSTRAINT loan_events_kind_check;
ALTER TABLE loan_events ADD CONSTRAINT loan_events_kind_check CHECK (kind IN ('margin_call', 'rearmed', 'liquidation', 'maturity'));
CREATE UNIQUE INDEX loan_events_one_maturity ON loan_events (loan_id) WHERE kind = 'maturity';
CREATE INDEX loans_open_due ON loans (due_us) WHERE status = 'open' AND due_us IS NOT NULL;

-- A user's unfolded credits are looked up by bucket: (bucket, posting_id) becomes the
-- primary key. With (posting_id, bucket) first, PostgreSQL 18 preferred skipping through
-- that key over the (bucket) index once statistics existed, reading every row's entry:
-- 1 ms per lookup instead of 0.35 ms with 200 unfolded bulk credits. The folder finds a
-- bulk credit's rows by posting_id.
ALTER TABLE bulk_credit_parts DROP CONSTRAINT bulk_credit_parts_pkey;
DROP INDEX bulk_credit_parts_bucket;
ALTER TABLE bulk_credit_parts ADD PRIMARY KEY (bucket, posting_id);
CREATE INDEX bulk_credit_parts_posting ON bulk_credit_parts (posting_id);

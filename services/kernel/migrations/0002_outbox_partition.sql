-- An event may name its partition (facts broadcast to every partition of a topic).
ALTER TABLE outbox ADD COLUMN partition integer;

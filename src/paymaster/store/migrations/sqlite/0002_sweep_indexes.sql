-- The sweeper forgets spent token ids and idempotency records past their time by range;
-- without these indexes every sweep scans both tables, which grow with every call.
CREATE INDEX IF NOT EXISTS spent_jti_exp ON spent_jti (exp);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);

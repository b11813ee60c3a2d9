-- Paymaster schema v1 (PostgreSQL). Mirrors migrations/sqlite/0001_init.sql: same tables, same
-- column names, times as TEXT (RFC 3339 UTC with microseconds, so they compare as strings), so the
-- portable SQL of store/ops.py runs unchanged. Amounts are BIGINT nano-units (1e-9 of the unit).
-- Differences, all for running several replicas at once (see docs/postgres.md):
--   * events are keyed by (chain, seq): every writer of every replica appends to a chain of its
--     own, sealed by its own signed head row in audit_heads;
--   * volume-tier counters are sharded (tier_counter_shards) and summed by the tier_counters view;
--   * "window" is a reserved word here: the store quotes it when it runs the portable SQL.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE agents (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  public_key TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'revoked')),
  parent TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  policy_version BIGINT NOT NULL DEFAULT 0,
  state_version BIGINT NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL
);

CREATE TABLE principals (
  name TEXT PRIMARY KEY,
  parent TEXT,
  policy_version BIGINT NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL
);

-- Every version of every policy stays readable; owner is an agent id or a principal name.
CREATE TABLE policies (
  owner TEXT NOT NULL,
  version BIGINT NOT NULL,
  policy TEXT NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (owner, version)
);

-- One row per budget window instance: wallet (period total), cap window, or task.
CREATE TABLE budgets (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('wallet', 'cap', 'task')),
  owner TEXT NOT NULL,
  scope TEXT NOT NULL,
  period TEXT NOT NULL,
  "window" TEXT NOT NULL,
  tz TEXT,
  mode TEXT NOT NULL DEFAULT 'enforce',
  currency TEXT NOT NULL,
  limit_n BIGINT NOT NULL,
  spent_n BIGINT NOT NULL DEFAULT 0,
  reserved_n BIGINT NOT NULL DEFAULT 0,
  window_start TEXT,
  window_end TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX budgets_owner ON budgets (owner, period, "window");

CREATE TABLE tasks (
  id TEXT PRIMARY KEY,
  parent_task TEXT,
  agents TEXT NOT NULL,
  created_by TEXT NOT NULL,
  created_at TEXT NOT NULL
);

CREATE TABLE reservations (
  id TEXT PRIMARY KEY,
  agent_id TEXT,
  principal TEXT NOT NULL,
  connector TEXT NOT NULL,
  category TEXT,
  status TEXT NOT NULL CHECK (status IN ('held', 'committed', 'released', 'expired')),
  decision TEXT NOT NULL,
  currency TEXT NOT NULL,
  amount_n BIGINT NOT NULL,
  charged_n BIGINT,
  estimated INTEGER NOT NULL DEFAULT 0,
  overrun INTEGER NOT NULL DEFAULT 0,
  request_sent INTEGER NOT NULL DEFAULT 0,
  budgets TEXT NOT NULL,
  session TEXT,
  task TEXT,
  input_hash TEXT,
  tier_key TEXT,
  quantity TEXT,
  unit TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  settled_at TEXT,
  ledger_entry_id TEXT
);
CREATE INDEX reservations_held ON reservations (status, expires_at);

CREATE TABLE ledger (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
  time TEXT NOT NULL,
  agent_id TEXT,
  principal TEXT NOT NULL,
  connector TEXT NOT NULL,
  category TEXT,
  input_hash TEXT,
  quantity TEXT,
  unit TEXT,
  unit_cost TEXT,
  total_n BIGINT NOT NULL,
  currency TEXT NOT NULL,
  reservation_id TEXT,
  refund_of TEXT,
  refunded_n BIGINT NOT NULL DEFAULT 0,
  task TEXT,
  session TEXT,
  budgets TEXT NOT NULL,
  estimated INTEGER NOT NULL DEFAULT 0,
  overrun INTEGER NOT NULL DEFAULT 0,
  reason TEXT
);
CREATE INDEX ledger_time ON ledger (time);
CREATE INDEX ledger_agent ON ledger (agent_id, time);

-- Idempotency records: the first answer to (scope, key), denials included.
CREATE TABLE idempotency (
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  body_hash TEXT NOT NULL,
  status INTEGER NOT NULL,
  response TEXT NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);

-- The replay cache of spend-token ids, shared by every worker and replica.
CREATE TABLE spent_jti (jti TEXT PRIMARY KEY, exp BIGINT NOT NULL);
CREATE INDEX spent_jti_exp ON spent_jti (exp);

-- Threshold crossings, once per threshold per budget window.
CREATE TABLE thresholds_crossed (
  budget_id TEXT NOT NULL,
  threshold TEXT NOT NULL,
  crossed_at TEXT NOT NULL,
  PRIMARY KEY (budget_id, threshold)
);

-- Volume-tier counters: calls per connector per period window, across all agents. Every call to
-- a tiered connector counts, so one row per window would be a lock every replica queues on: each
-- writer counts on a shard of its own and readers see the sum through the view.
CREATE TABLE tier_counter_shards (
  tier_key TEXT NOT NULL,
  shard INTEGER NOT NULL,
  calls BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (tier_key, shard)
);
CREATE VIEW tier_counters AS
  SELECT tier_key, CAST(SUM(calls) AS BIGINT) AS calls FROM tier_counter_shards GROUP BY tier_key;

CREATE TABLE api_keys (
  key_hash TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('admin', 'service')),
  principal TEXT,
  created_at TEXT NOT NULL
);

-- The audit chains and their signed heads: one chain per writer (per replica process and
-- writer thread), each sealed by its own head row, signed in the same transaction as its events.
-- pos (a sequence: no lock held to commit) orders events of equal time in the merged view in the
-- order they were written, so an operation's events follow those of the operations before it.
CREATE TABLE events (
  chain TEXT NOT NULL,
  seq BIGINT NOT NULL,
  pos BIGINT GENERATED ALWAYS AS IDENTITY,
  id TEXT NOT NULL UNIQUE,
  type TEXT NOT NULL,
  time TEXT NOT NULL,
  subject TEXT NOT NULL,
  hash TEXT NOT NULL,
  event TEXT NOT NULL,
  PRIMARY KEY (chain, seq)
);
CREATE INDEX events_time ON events (time, pos);
CREATE TABLE audit_heads (
  chain TEXT PRIMARY KEY,
  seq BIGINT NOT NULL,
  hash TEXT NOT NULL,
  sig TEXT NOT NULL
);

-- Webhook deliveries, retried with backoff, surviving restarts.
CREATE TABLE outbox (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  event_id TEXT NOT NULL,
  body TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at TEXT NOT NULL,
  delivered_at TEXT,
  last_error TEXT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;

-- Loop guard: recent calls by (agent, fingerprint).
CREATE TABLE loop_calls (fingerprint TEXT NOT NULL, at TEXT NOT NULL);
CREATE INDEX loop_calls_fp ON loop_calls (fingerprint, at);

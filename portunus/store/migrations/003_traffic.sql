-- 003_traffic: monthly traffic quotas per (user, client), the counters that make accounting
-- exactly-once, and the 1-minute / 1-hour traffic history (SPEC §4.4).
-- Times here are unix seconds (INTEGER): the API speaks unix seconds for anchors, periods and history,
-- and range scans over samples are integer comparisons.

CREATE TABLE traffic_quotas (
    user_id            TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    client_id          TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    monthly_bytes      INTEGER NOT NULL CHECK (monthly_bytes >= 0),
    billing_anchor     INTEGER NOT NULL CHECK (billing_anchor >= 0),   -- immutable after creation
    period_started_at  INTEGER NOT NULL,
    period_ends_at     INTEGER NOT NULL CHECK (period_ends_at > period_started_at),
    period_bytes_used  INTEGER NOT NULL DEFAULT 0 CHECK (period_bytes_used >= 0),
    exhausted_at       INTEGER,                    -- NULL: forwarding; set once per exhaustion
    last_report_at     INTEGER,                    -- the last stats report that covered the pair
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    PRIMARY KEY (user_id, client_id)
);
CREATE INDEX traffic_quotas_by_client ON traffic_quotas (client_id);
-- the period tick: quotas whose period has ended
CREATE INDEX traffic_quotas_by_period_end ON traffic_quotas (period_ends_at);

-- the last cumulative byte counters seen per (client, rule), written in the same transaction as the
-- usage and samples they produced: a server restart between two reports neither loses nor repeats a
-- delta. No foreign keys: a removed rule's last report may still arrive.
CREATE TABLE traffic_counters (
    client_id TEXT NOT NULL,
    rule_id   TEXT NOT NULL,
    bytes_in  INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    seen_at   INTEGER NOT NULL,
    PRIMARY KEY (client_id, rule_id)
) WITHOUT ROWID;

-- history: one row per (user, client, bucket start) with traffic; idle buckets have no row.
-- user_id '' is a rule without an owner (a store that never had a superadmin). No foreign keys:
-- history outlives removed users and clients until retention drops it (1m: 7 days, 1h: 90 days).
CREATE TABLE traffic_samples_1m (
    user_id   TEXT NOT NULL,
    client_id TEXT NOT NULL,
    ts        INTEGER NOT NULL CHECK (ts % 60 = 0),
    bytes_in  INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    PRIMARY KEY (user_id, client_id, ts)
) WITHOUT ROWID;
CREATE INDEX traffic_samples_1m_by_ts ON traffic_samples_1m (ts);
CREATE INDEX traffic_samples_1m_by_client ON traffic_samples_1m (client_id, ts);

CREATE TABLE traffic_samples_1h (
    user_id   TEXT NOT NULL,
    client_id TEXT NOT NULL,
    ts        INTEGER NOT NULL CHECK (ts % 3600 = 0),
    bytes_in  INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    PRIMARY KEY (user_id, client_id, ts)
) WITHOUT ROWID;
CREATE INDEX traffic_samples_1h_by_ts ON traffic_samples_1h (ts);
CREATE INDEX traffic_samples_1h_by_client ON traffic_samples_1h (client_id, ts);

-- at most one row: every hour before rolled_until has its 1h rows; later 1m rows of such an hour
-- (a late report) are added to the 1h row directly
CREATE TABLE traffic_rollup (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_until INTEGER NOT NULL CHECK (rolled_until % 3600 = 0)
);

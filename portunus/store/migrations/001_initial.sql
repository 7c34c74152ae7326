-- 001_initial: clients with their tokens and enrollment codes, rules, operators, settings, audit.
-- Timestamps are RFC3339 UTC text ("2026-11-22T07:00:00Z"); fixed width, so they sort in time order.
-- Secrets (client tokens, enrollment codes, operator tokens) are stored only as sha256 hex.

CREATE TABLE clients (
    client_id         TEXT PRIMARY KEY,          -- ULID
    client_name       TEXT NOT NULL,             -- display label; duplicates allowed
    address           TEXT,
    created_at        TEXT NOT NULL,
    revoked_at        TEXT,
    last_seen_at      TEXT,
    client_version    TEXT,
    capabilities_json TEXT NOT NULL DEFAULT '[]'
);
-- client references resolve by name when they are not an id
CREATE INDEX clients_by_name ON clients (client_name);

CREATE TABLE client_tokens (
    token_hash TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX client_tokens_by_client ON client_tokens (client_id);

CREATE TABLE enrollments (
    code_hash     TEXT PRIMARY KEY,
    client_id     TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    expires_at    TEXT NOT NULL,
    used_at       TEXT,
    superseded_at TEXT,
    endpoint      TEXT                           -- advertised host:port fixed at creation; NULL = legacy
);
CREATE INDEX enrollments_by_client ON enrollments (client_id);

CREATE TABLE rules (
    rule_id         TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES clients (client_id),
    owner           TEXT,                        -- user id; no foreign key: a removed user's rules are
                                                 -- drained after the user row is gone (SPEC §5)
    protocol        TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
    listen_host     TEXT NOT NULL,
    listen_port     INTEGER NOT NULL CHECK (listen_port BETWEEN 1 AND 65535),
    listen_port_end INTEGER NOT NULL CHECK (listen_port_end BETWEEN listen_port AND 65535),
    spec_json       TEXT NOT NULL,               -- Rule.to_dict(); the rule is rebuilt from this
    state           TEXT NOT NULL CHECK (state IN ('pending', 'active', 'failed', 'removing')),
    reason          TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
-- the port conflict check: this client's rules of one protocol starting at or below a port
CREATE INDEX rules_by_client_port ON rules (client_id, protocol, listen_port);
CREATE INDEX rules_by_owner ON rules (owner);

CREATE TABLE rule_targets (
    rule_id        TEXT NOT NULL REFERENCES rules (rule_id) ON DELETE CASCADE,
    idx            INTEGER NOT NULL,             -- position in the rule's targets list
    host           TEXT NOT NULL,
    port           INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    port_end       INTEGER CHECK (port_end IS NULL OR port_end BETWEEN port AND 65535),
    priority       INTEGER NOT NULL,
    proxy_protocol TEXT CHECK (proxy_protocol IS NULL OR proxy_protocol IN ('v1', 'v2')),
    PRIMARY KEY (rule_id, idx)
);
CREATE INDEX rule_targets_by_host ON rule_targets (host);

CREATE TABLE users (
    user_id                  TEXT PRIMARY KEY,
    role                     TEXT NOT NULL CHECK (role IN ('superadmin', 'user')),
    display_name             TEXT NOT NULL,
    disabled                 INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    password_hash            TEXT,               -- Argon2id PHC string; NULL for bearer-only identities
    password_change_required INTEGER NOT NULL DEFAULT 0 CHECK (password_change_required IN (0, 1)),
    created_at               TEXT NOT NULL
);

CREATE TABLE operator_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    name       TEXT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX operator_tokens_by_user ON operator_tokens (user_id);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused after a prune
    timestamp TEXT NOT NULL,
    actor     TEXT,
    method    TEXT NOT NULL,
    path      TEXT NOT NULL,
    outcome   TEXT NOT NULL CHECK (outcome IN ('allow', 'deny')),
    reason    TEXT
);
-- GET /v1/audit?outcome= newest first; audit prune --before and ?since=&until=
CREATE INDEX audit_by_outcome ON audit (outcome, id);
CREATE INDEX audit_by_timestamp ON audit (timestamp);

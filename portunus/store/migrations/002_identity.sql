-- 002_identity: people with passwords, Web sessions, the login throttle, first-run onboarding, grants
-- (SPEC §5). Timestamps stay RFC3339 UTC text; secrets (session tokens, setup tokens) are sha256 hex.
-- The users table (001) already holds password_hash and password_change_required; bearer identities
-- (_superadmin, _legacy) and their operator_tokens are untouched and keep working.

-- one row per live Web session; logout and revocation delete the row, so a reused cookie finds nothing
CREATE TABLE web_sessions (
    session_hash TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,                  -- idle expiry: last_seen_at + 8 h
    expires_at   TEXT NOT NULL                   -- absolute expiry: created_at + 7 days
);
CREATE INDEX web_sessions_by_user ON web_sessions (user_id);
CREATE INDEX web_sessions_by_expiry ON web_sessions (expires_at);

-- failed login / onboarding / password attempts per (action, subject, remote IP); kept in the store so
-- a restart does not lift a lockout. Unknown subjects share the subject '?' (not a valid user id).
CREATE TABLE login_attempts (
    action          TEXT NOT NULL CHECK (action IN ('login', 'onboarding', 'password_change')),
    subject         TEXT NOT NULL,
    remote_ip       TEXT NOT NULL,
    failures        INTEGER NOT NULL CHECK (failures >= 1),
    last_failure_at TEXT NOT NULL,
    locked_until    TEXT,                        -- NULL: not locked
    forget_at       TEXT NOT NULL,               -- past this, the row no longer counts and may be pruned
    PRIMARY KEY (action, subject, remote_ip)
);
CREATE INDEX login_attempts_by_forget ON login_attempts (forget_at);

-- at most one row: the current setup token while no superadmin exists; completed_at closes it for good.
-- serve replaces its own token at every start; a token from `onboarding-token` (cli) lives its 30 minutes
-- across a start, or the offline command could never be used (serve must be stopped to run it)
CREATE TABLE onboarding_setup (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    token_hash   TEXT,                           -- NULL once onboarding completed
    issued_by    TEXT NOT NULL CHECK (issued_by IN ('serve', 'cli')),
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    completed_at TEXT,
    completed_by TEXT                            -- the first superadmin's user id
);

-- what a non-superadmin may push: one client (or all: client_id NULL, shown as "*"), a listen-port
-- range and protocols. A client's grants go with the client; a user's with the user.
CREATE TABLE grants (
    grant_id          TEXT PRIMARY KEY,          -- ULID
    user_id           TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    client_id         TEXT REFERENCES clients (client_id) ON DELETE CASCADE,
    listen_port_start INTEGER NOT NULL CHECK (listen_port_start BETWEEN 1 AND 65535),
    listen_port_end   INTEGER NOT NULL CHECK (listen_port_end BETWEEN listen_port_start AND 65535),
    protocols         TEXT NOT NULL CHECK (protocols IN ('tcp', 'udp', 'tcp,udp')),
    note              TEXT,
    created_at        TEXT NOT NULL
);
CREATE INDEX grants_by_user ON grants (user_id, client_id);
CREATE INDEX grants_by_client ON grants (client_id);

-- owner on rules is a real user id from now on. Rules from before identities existed have none:
-- they belong to the bootstrap superadmin (or the operator_token one, or the oldest superadmin).
-- A store without any superadmin keeps NULL: such a rule is visible to superadmins only.
UPDATE rules SET owner = (
    SELECT user_id FROM users WHERE role = 'superadmin'
    ORDER BY CASE user_id WHEN '_superadmin' THEN 0 WHEN '_legacy' THEN 1 ELSE 2 END, created_at, user_id
    LIMIT 1)
WHERE owner IS NULL OR owner = '';
-- the pushed spec carries the owner too (clients key owner caps and quotas by it): keep both in step
UPDATE rules SET spec_json = json_set(spec_json, '$.owner', owner)
WHERE owner IS NOT NULL AND json_extract(spec_json, '$.owner') IS NOT owner;

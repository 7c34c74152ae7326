-- 004_owner_rate_limits: the owner envelope caps per (client, owner) (SPEC §2.9, §6).
-- rate_limit_json is RateLimit.to_dict() (only the caps that are set; validated before it is written).
-- A client's caps go with the client and a user's with the user; a cap also goes when its owner's
-- last rule on that client goes (the service does that, in the transaction that removes the rule).

CREATE TABLE owner_rate_limits (
    client_id       TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    owner_id        TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    rate_limit_json TEXT NOT NULL CHECK (json_valid(rate_limit_json) AND json_type(rate_limit_json) = 'object'
                                         AND rate_limit_json != '{}'),
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (client_id, owner_id)
);
CREATE INDEX owner_rate_limits_by_owner ON owner_rate_limits (owner_id);

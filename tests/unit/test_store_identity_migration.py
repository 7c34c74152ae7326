"""Migration 002 (identity) upgrades a store made by the previous release in place (SPEC §4.2, §5):
rows survive, bearer identities keep working, rule owners become real user ids."""

from __future__ import annotations

import json
import sqlite3

import pytest

from portunus.model import Rule
from portunus.server.identity import IdentityService
from portunus.store import Store, clients, db, operators
from portunus.store import rules as store_rules
from portunus.store.db import ALLOW_ANY_FS_ENV, load_migrations
from portunus.store.ids import new_ulid

IDENTITY_TABLES = {"web_sessions", "login_attempts", "onboarding_setup", "grants"}
LEGACY_TOKEN = "legacy-operator-token-0123456789abcdefghijkl"


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    return str(tmp_path / "data")


def open_as_release_001(data_dir: str, monkeypatch) -> Store:
    """A store exactly as the release before identities made it: migration 001 only."""
    only_001 = [m for m in load_migrations() if m.version == 1]
    monkeypatch.setattr(db, "load_migrations", lambda: only_001)
    store = Store.open(data_dir)
    monkeypatch.setattr(db, "load_migrations", load_migrations)
    return store


def old_rule(store: Store, client_id: str, port: int, owner) -> str:
    rule = Rule.from_dict({"rule_id": new_ulid(), "listen_port": port, "target": "10.0.0.9:80"})
    return store_rules.insert_rule(store, rule, client_id, owner)["rule_id"]


def tables(store: Store) -> set[str]:
    return {r[0] for r in store.read().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_an_001_store_upgrades_in_place_and_keeps_everything(data_dir, monkeypatch):
    old = open_as_release_001(data_dir, monkeypatch)
    assert old.schema_version() == 1 and not IDENTITY_TABLES & tables(old)
    bearer = operators.bootstrap_superadmin(old, "Ops")
    assert operators.ensure_legacy_operator(old, LEGACY_TOKEN) is False  # _superadmin exists: no _legacy
    cid = clients.create_client(old, "edge-1")["client_id"]
    ownerless = old_rule(old, cid, 8080, None)
    owned = old_rule(old, cid, 8081, "_superadmin")
    with old.write() as conn:
        conn.execute("INSERT INTO audit (timestamp, actor, method, path, outcome, reason) "
                     "VALUES ('2026-01-01T00:00:00Z', '_superadmin', 'GET', '/v1/rules', 'allow', NULL)")
    assert store_rules.get_rule(old, ownerless)["owner"] is None
    old.close()

    with Store.open(data_dir) as new:
        assert new.schema_version() == len(load_migrations()) >= 2
        assert IDENTITY_TABLES <= tables(new)
        assert new.read().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert new.read().execute("PRAGMA foreign_key_check").fetchall() == []
        # the bearer identity still authenticates; nothing else about it changed
        assert operators.authenticate_operator(new, bearer) == {"user_id": "_superadmin", "role": "superadmin",
                                                                "display_name": "Ops"}
        # rules: the ownerless one now belongs to the bootstrap superadmin, in the column and the pushed spec
        assert store_rules.get_rule(new, ownerless)["owner"] == "_superadmin"
        assert store_rules.get_rule(new, owned)["owner"] == "_superadmin"
        replay = {r.rule_id: r for r in store_rules.rules_for_client(new, cid)}
        assert replay[ownerless].owner == "_superadmin" and replay[owned].listen_port == 8081
        assert new.read().execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 1
        # the new tables work on the upgraded store
        ids = IdentityService(new)
        assert ids.bootstrap_required() is False and ids.start_onboarding() is None
        ids.create_user("alice", "Alice", "user", "alice password 0001")
        grant = ids.add_grant("alice", cid, 30000, 30010, ["tcp"])
        assert ids.check_push("alice", "user", cid, "tcp", 30000, 30000)["grant_id"] == grant["grant_id"]
        assert ids.login("alice", "alice password 0001", remote_ip="127.0.0.1").user["user_id"] == "alice"

    with Store.open(data_dir) as again:  # reopening applies nothing twice
        assert again.read().execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(load_migrations())


def test_legacy_operator_token_keeps_working_across_the_upgrade(data_dir, monkeypatch):
    old = open_as_release_001(data_dir, monkeypatch)
    assert operators.ensure_legacy_operator(old, LEGACY_TOKEN) is True
    cid = clients.create_client(old, "edge-1")["client_id"]
    rid = old_rule(old, cid, 9000, None)
    old.close()
    with Store.open(data_dir) as new:
        assert operators.ensure_legacy_operator(new, LEGACY_TOKEN) is True
        assert operators.authenticate_operator(new, LEGACY_TOKEN)["user_id"] == "_legacy"
        assert store_rules.get_rule(new, rid)["owner"] == "_legacy"
        assert operators.has_superadmin(new) is True


def test_a_store_without_any_superadmin_keeps_ownerless_rules_and_opens_onboarding(data_dir, monkeypatch):
    old = open_as_release_001(data_dir, monkeypatch)
    cid = clients.create_client(old, "edge-1")["client_id"]
    rid = old_rule(old, cid, 9000, None)
    old.close()
    with Store.open(data_dir) as new:
        assert store_rules.get_rule(new, rid)["owner"] is None  # visible to superadmins only
        ids = IdentityService(new)
        assert ids.bootstrap_required() and ids.start_onboarding() is not None


def test_a_human_superadmin_is_chosen_when_no_bearer_identity_exists(data_dir, monkeypatch):
    old = open_as_release_001(data_dir, monkeypatch)
    with old.write() as conn:  # a users row written by hand (001 already had the table)
        conn.execute("INSERT INTO users (user_id, role, display_name, created_at) "
                     "VALUES ('root', 'superadmin', 'Root', '2026-01-01T00:00:00Z')")
    cid = clients.create_client(old, "edge-1")["client_id"]
    rid = old_rule(old, cid, 9000, None)
    old.close()
    with Store.open(data_dir) as new:
        assert store_rules.get_rule(new, rid)["owner"] == "root"
        spec = json.loads(new.read().execute("SELECT spec_json FROM rules WHERE rule_id = ?", (rid,)).fetchone()[0])
        assert spec["owner"] == "root"


def test_the_new_tables_refuse_bad_rows(data_dir):
    with Store.open(data_dir) as store:
        with store.write() as conn:
            conn.execute("INSERT INTO users (user_id, role, display_name, created_at) "
                         "VALUES ('alice', 'user', 'Alice', '2026-01-01T00:00:00Z')")
        bad = [
            "INSERT INTO grants VALUES ('g1', 'alice', NULL, 10, 5, 'tcp', NULL, 't')",        # start > end
            "INSERT INTO grants VALUES ('g2', 'alice', NULL, 1, 5, 'icmp', NULL, 't')",        # protocol
            "INSERT INTO grants VALUES ('g3', 'nobody', NULL, 1, 5, 'tcp', NULL, 't')",        # unknown user
            "INSERT INTO grants VALUES ('g4', 'alice', 'NOCLIENT', 1, 5, 'tcp', NULL, 't')",   # unknown client
            "INSERT INTO web_sessions VALUES ('h', 'nobody', 't', 't', 't')",
            "INSERT INTO login_attempts VALUES ('sudo', 's', 'ip', 1, 't', NULL, 't')",
            "INSERT INTO onboarding_setup (id, token_hash, issued_by, created_at, expires_at) "
            "VALUES (2, 'h', 'serve', 't', 't')",
            "INSERT INTO onboarding_setup (id, token_hash, issued_by, created_at, expires_at) "
            "VALUES (1, 'h', 'mail', 't', 't')",
        ]
        for sql in bad:
            with pytest.raises(sqlite3.IntegrityError):
                with store.write() as conn:
                    conn.execute(sql)

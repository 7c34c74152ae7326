"""Owner caps: store/owner_caps.py on a real SQLite file, server/owner_caps.py (validation, errors,
pushes, the last-rule rule, reconnect replay) and migration 004 upgrading a 003 store in place."""

from __future__ import annotations

import calendar
import sqlite3

import pytest

from portunus.control import messages
from portunus.errors import PortunusError
from portunus.server.owner_caps import OwnerCapPush, OwnerCapService
from portunus.store import Store, clients, db
from portunus.store import owner_caps as store_caps
from portunus.store import users as store_users
from portunus.store.db import ALLOW_ANY_FS_ENV, load_migrations

T0 = calendar.timegm((2026, 3, 1, 12, 0, 0))
CAP = {"bandwidth_in_bps": 10_000_000, "concurrent_connections": 100}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    s = Store.open(data_dir)
    yield s
    s.close()


class World:
    """Users alice, bob, carol; clients edge-tokyo and edge-osaka; alice has two rules on tokyo and
    one on osaka, bob one on tokyo, carol none; one rule has no owner."""

    def __init__(self, store: Store):
        self.store, self.pushes = store, []
        for user in ("alice", "bob", "carol"):
            store_users.insert_user(store, user, user.title(), "user", None, "2026-01-01T00:00:00Z")
        self.edge = clients.create_client(store, "edge-tokyo")["client_id"]
        self.other = clients.create_client(store, "edge-osaka")["client_id"]
        self.add_rule("r-alice", "alice", 30001)
        self.add_rule("r-alice2", "alice", 30002)
        self.add_rule("r-bob", "bob", 30003)
        self.add_rule("r-none", None, 30004)
        self.add_rule("r-alice-osaka", "alice", 30001, self.other)
        self.caps = OwnerCapService(store, clock=lambda: T0, publish=self.pushes.append)

    def add_rule(self, rule_id: str, owner, port: int, client_id: str | None = None) -> None:
        with self.store.write() as conn:
            conn.execute("INSERT INTO rules (rule_id, client_id, owner, protocol, listen_host, listen_port, "
                         "listen_port_end, spec_json, state, created_at, updated_at) "
                         "VALUES (?, ?, ?, 'tcp', '0.0.0.0', ?, ?, '{}', 'active', 'x', 'x')",
                         (rule_id, client_id or self.edge, owner, port, port))

    def remove_rule(self, rule_id: str) -> None:
        with self.store.write() as conn:
            conn.execute("DELETE FROM rules WHERE rule_id = ?", (rule_id,))


@pytest.fixture
def w(store):
    return World(store)


def refused(code: str, fn, *args) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args)
    assert ei.value.code == code, ei.value
    assert "Traceback" not in ei.value.message
    return ei.value


# ---------------------------------------------------------------- the service

def test_put_stores_the_caps_and_pushes_set(w):
    view = w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    assert view == {"client_id": w.edge, "owner_id": "alice", "rate_limit": CAP, "updated_at": "2026-03-01T12:00:00Z"}
    assert w.caps.get(w.edge, "alice") == view
    assert w.pushes == [OwnerCapPush(w.edge, "alice", "set", CAP)]
    assert w.pushes[0].message() == {"type": "owner_rate_limit_update", "client_id": w.edge, "owner_id": "alice",
                                     "action": "set", "rate_limit": CAP}
    messages.validate(w.pushes[0].message(), "server")


def test_put_replaces_and_the_owner_list_shows_it(w):
    w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    w.caps.put("edge-tokyo", "alice", {"rate_limit": {"new_connections_per_sec": 5}})
    assert w.caps.get("edge-tokyo", "alice")["rate_limit"] == {"new_connections_per_sec": 5}
    assert w.caps.list_owners("edge-tokyo") == [
        {"owner_id": "alice", "has_rate_limit": True, "rule_count": 2},
        {"owner_id": "bob", "has_rate_limit": False, "rule_count": 1}]
    assert w.caps.list_owners("edge-osaka") == [{"owner_id": "alice", "has_rate_limit": False, "rule_count": 1}]


def test_get_of_an_uncapped_owner_is_null_caps(w):
    assert w.caps.get("edge-tokyo", "bob") == {"client_id": w.edge, "owner_id": "bob", "rate_limit": None,
                                              "updated_at": None}


def test_delete_removes_and_pushes_remove(w):
    w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    last = w.caps.delete("edge-tokyo", "alice")
    assert last["rate_limit"] == CAP
    assert w.caps.get("edge-tokyo", "alice")["rate_limit"] is None
    assert w.pushes[-1] == OwnerCapPush(w.edge, "alice", "remove")
    messages.validate(w.pushes[-1].message(), "server")
    e = refused("not_found", w.caps.delete, "edge-tokyo", "alice")
    assert "alice" in e.message and e.http_status == 404 and e.exit_code == 8


@pytest.mark.parametrize("client,owner", [
    ("edge-nowhere", "alice"),      # unknown client
    ("edge-tokyo", "carol"),        # a user without rules there
    ("edge-tokyo", "mallory"),      # no such user
    ("edge-tokyo", ""),
    ("edge-tokyo", 7),
])
def test_unknown_clients_and_owners_are_not_found_and_change_nothing(w, client, owner):
    e = refused("not_found", w.caps.put, client, owner, {"rate_limit": CAP})
    assert repr(owner) in e.message or str(client) in e.message
    refused("not_found", w.caps.get, client, owner)
    assert w.pushes == [] and store_caps.list_owner_caps(w.store, w.edge) == []


@pytest.mark.parametrize("body,code", [
    ({}, "validation.rate_limit_no_caps_provided"),
    ({"rate_limit": None}, "validation.rate_limit_no_caps_provided"),
    ({"rate_limit": {}}, "validation.rate_limit_no_caps_provided"),
    ({"rate_limit": CAP, "extra": 1}, "validation.unknown_field"),
    ({"rate_limit": {"bandwidth_in": 1}}, "validation.unknown_field"),
    ([], "bad_request"),
])
def test_bad_bodies_are_refused_before_anything_is_written(w, body, code):
    e = refused(code, w.caps.put, "edge-tokyo", "alice", body)
    assert e.exit_code == (3 if code.endswith("no_caps_provided") else 2)
    assert w.pushes == []


@pytest.mark.parametrize("rate_limit", [
    {"bandwidth_in_bps": 0}, {"concurrent_connections": -1}, {"new_connections_per_sec": True},
    {"bandwidth_in_burst": 100}, {"bandwidth_out_bps": 1000, "bandwidth_out_burst": 9},
    {"bandwidth_out_bps": 1000, "bandwidth_out_burst": 60_001}, {"bandwidth_in_bps": "10M"},
])
def test_the_caps_are_validated_by_the_one_model_validator(w, rate_limit):
    with pytest.raises(PortunusError) as ei:
        w.caps.put("edge-tokyo", "alice", {"rate_limit": rate_limit})
    assert ei.value.code.startswith("validation.rate_limit_") and ei.value.http_status == 400
    assert w.pushes == []


def test_a_client_that_declares_no_rate_limit_support_is_refused(w):
    clients.record_connection(w.store, w.edge, "0.10.0", ["udp", "multi_target"])
    e = refused("rate_limit_unsupported_by_client", w.caps.put, w.edge, "alice", {"rate_limit": CAP})
    assert "0.10.0" in e.message and e.exit_code == 3 and e.http_status == 422
    clients.record_connection(w.store, w.edge, "1.8.0", list(messages.CAPABILITIES))
    assert w.caps.put(w.edge, "alice", {"rate_limit": CAP})["rate_limit"] == CAP


def test_a_revoked_client_takes_no_new_caps(w):
    clients.revoke_client(w.store, w.edge)
    refused("conflict.client_revoked", w.caps.put, w.edge, "alice", {"rate_limit": CAP})


def test_the_cap_goes_with_the_owners_last_rule_on_that_client(w):
    w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    w.caps.put("edge-osaka", "alice", {"rate_limit": CAP})
    w.remove_rule("r-alice")
    assert w.caps.rule_removed(w.edge, "alice") is None            # r-alice2 still there
    w.remove_rule("r-alice2")
    assert w.caps.rule_removed(w.edge, "alice") == OwnerCapPush(w.edge, "alice", "remove")
    assert w.pushes[-1] == OwnerCapPush(w.edge, "alice", "remove")
    assert w.caps.list_owners("edge-tokyo") == [{"owner_id": "bob", "has_rate_limit": False, "rule_count": 1}]
    assert w.caps.get("edge-osaka", "alice")["rate_limit"] == CAP  # another client's cap stays
    assert w.caps.rule_removed(w.edge, "alice") is None            # nothing left to remove
    assert w.caps.rule_removed(w.edge, None) is None


def test_a_failing_publish_is_logged_and_the_change_stays(w):
    def broken(push):
        raise RuntimeError("loop closed")
    caps = OwnerCapService(w.store, clock=lambda: T0, publish=broken)
    caps.put("edge-tokyo", "bob", {"rate_limit": CAP})
    assert caps.get("edge-tokyo", "bob")["rate_limit"] == CAP


def test_replay_sets_every_cap_and_clears_every_other_owner(w):
    w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    replay = w.caps.replay_messages(w.edge)
    assert replay == [
        {"type": "owner_rate_limit_update", "client_id": w.edge, "owner_id": "alice", "action": "set",
         "rate_limit": CAP},
        {"type": "owner_rate_limit_update", "client_id": w.edge, "owner_id": "bob", "action": "remove",
         "rate_limit": None}]
    for msg in replay:
        messages.validate(msg, "server")


# ---------------------------------------------------------------- the store and its table

def test_the_draining_rules_of_a_removed_user_take_no_cap(w):
    w.add_rule("r-carol", "carol", 30005)
    store_users.delete_user(w.store, "carol")      # its rules are drained after the user row is gone
    refused("not_found", w.caps.put, "edge-tokyo", "carol", {"rate_limit": CAP})


def test_a_removed_user_or_client_takes_its_caps_along(w):
    w.caps.put("edge-tokyo", "alice", {"rate_limit": CAP})
    w.caps.put("edge-tokyo", "bob", {"rate_limit": CAP})
    w.remove_rule("r-bob")
    store_users.delete_user(w.store, "bob")
    assert [r["owner_id"] for r in store_caps.list_owner_caps(w.store, w.edge)] == ["alice"]
    clients.revoke_client(w.store, w.edge)
    clients.delete_client(w.store, w.edge)
    assert store_caps.list_owner_caps(w.store, w.edge) == []


def test_the_table_keeps_its_invariants_whatever_code_writes_it(w):
    for sql in ("INSERT INTO owner_rate_limits VALUES ('nope', 'alice', '{\"a\": 1}', 'x')",
                f"INSERT INTO owner_rate_limits VALUES ('{w.edge}', 'mallory', '{{\"a\": 1}}', 'x')",
                f"INSERT INTO owner_rate_limits VALUES ('{w.edge}', 'alice', 'not json', 'x')",
                f"INSERT INTO owner_rate_limits VALUES ('{w.edge}', 'alice', '{{}}', 'x')",
                f"INSERT INTO owner_rate_limits VALUES ('{w.edge}', 'alice', '[1]', 'x')"):
        with pytest.raises(sqlite3.IntegrityError):
            with w.store.write() as conn:
                conn.execute(sql)


def test_a_003_store_upgrades_in_place_and_takes_owner_caps(data_dir, monkeypatch):
    before = [m for m in load_migrations() if m.version <= 3]
    monkeypatch.setattr(db, "load_migrations", lambda: before)
    old = Store.open(data_dir)
    world = World(old)  # users, clients and rules written by the release before owner caps
    assert old.schema_version() == 3
    assert "owner_rate_limits" not in {r[0] for r in old.read().execute("SELECT name FROM sqlite_master")}
    old.close()
    monkeypatch.setattr(db, "load_migrations", load_migrations)
    with Store.open(data_dir) as new:
        assert new.schema_version() == max(m.version for m in load_migrations()) >= 4
        caps = OwnerCapService(new, clock=lambda: T0)
        assert caps.list_owners(world.edge)[0] == {"owner_id": "alice", "has_rate_limit": False, "rule_count": 2}
        caps.put(world.edge, "alice", {"rate_limit": CAP})
    with Store.open(data_dir) as again:  # a restart keeps the cap for the reconnect replay
        assert OwnerCapService(again).replay_messages(world.edge)[0]["rate_limit"] == CAP


# ---------------------------------------------------------------- the codes issue 13 names

@pytest.mark.parametrize("rate_limit,code", [
    ({"bandwidth_in_bps": 0}, "validation.rate_limit_cap_zero"),
    ({"concurrent_connections": 0}, "validation.rate_limit_cap_zero"),
    ({"bandwidth_in_burst": 100}, "validation.rate_limit_burst_without_rate"),
    ({"bandwidth_out_bps": 1000, "bandwidth_out_burst": 9}, "validation.rate_limit_burst_range"),
    ({"new_connections_per_sec": 10, "new_connections_burst": 601}, "validation.rate_limit_burst_range"),
    ({"bandwidth_in_bps": None}, "validation.rate_limit_no_caps_provided"),
])
def test_the_validation_codes_of_issue_13(w, rate_limit, code):
    e = refused(code, w.caps.put, "edge-tokyo", "alice", {"rate_limit": rate_limit})
    assert e.http_status == 400 and e.exit_code == (3 if code.endswith("no_caps_provided") else 2)
    assert code.endswith("no_caps_provided") or any(name in e.message for name in rate_limit)

"""Clients, references, tokens and one-time enrollment codes (SPEC §3.2)."""

from __future__ import annotations

import threading

import pytest

from portunus.errors import PortunusError
from portunus.model import Rule
from portunus.store import clients, rules
from portunus.store.ids import is_ulid, new_ulid


def enroll(store, name="edge-1", ttl=600, endpoint="portunus.example:7443"):
    c = clients.create_client(store, name)
    code = clients.create_enrollment(store, c["client_id"], ttl, endpoint)
    return c, code


def expire(store, client_id):
    with store.write() as conn:
        conn.execute("UPDATE enrollments SET expires_at = '2000-01-01T00:00:00Z' WHERE client_id = ?", (client_id,))


def raises(code: str, fn, *args, **kw) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kw)
    assert ei.value.code == code, ei.value
    return ei.value


# ------------------------------------------------------------------ clients

def test_create_get_list(store):
    a = clients.create_client(store, "edge-1", address="10.0.0.5")
    b = clients.create_client(store, "  edge-2  ")
    assert is_ulid(a["client_id"])
    assert a["client_name"] == "edge-1" and a["address"] == "10.0.0.5"
    assert b["client_name"] == "edge-2" and b["address"] is None
    assert a["revoked"] is False and a["revoked_at"] is None
    assert a["capabilities"] == [] and a["client_version"] is None and a["last_seen_at"] is None
    assert a["created_at"].endswith("Z")
    assert clients.get_client(store, a["client_id"]) == a
    assert [c["client_id"] for c in clients.list_clients(store)] == [a["client_id"], b["client_id"]]


def test_get_client_accepts_a_lowercase_id(store):
    a = clients.create_client(store, "edge-1")
    assert clients.get_client(store, a["client_id"].lower())["client_id"] == a["client_id"]


@pytest.mark.parametrize("bad", ["01ARZ3NDEKTSV4RRFFQ69G5FAV", "not-an-id", "", "../etc", None])
def test_unknown_or_malformed_ids_are_not_found(store, bad):
    e = raises("not_found", clients.get_client, store, bad)
    assert e.message == f"client {bad!r} not found"
    assert e.exit_code == 8 and e.http_status == 404


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "x" * 129, None, 5])
def test_client_names_must_be_one_nonempty_line(store, bad):
    e = raises("validation.invalid_client_name", clients.create_client, store, bad)
    assert e.exit_code == 2


def test_rename_keeps_id_and_token(store):
    c, code = enroll(store)
    _, token = clients.redeem_enrollment(store, code)
    renamed = clients.rename_client(store, c["client_id"], "edge-renamed")
    assert renamed["client_id"] == c["client_id"] and renamed["client_name"] == "edge-renamed"
    assert clients.authenticate_client(store, token)["client_name"] == "edge-renamed"


def test_set_address(store):
    c = clients.create_client(store, "edge-1")
    assert clients.set_address(store, c["client_id"], "192.0.2.7")["address"] == "192.0.2.7"
    assert clients.set_address(store, c["client_id"], None)["address"] is None


def test_record_connection(store):
    c = clients.create_client(store, "edge-1")
    after = clients.record_connection(store, c["client_id"], "1.4.0", ["udp", "sni", "udp"])
    assert after["client_version"] == "1.4.0"
    assert after["capabilities"] == ["sni", "udp"]
    assert after["last_seen_at"] is not None


# ------------------------------------------------------------------ references

def test_resolve_by_id_and_by_unique_name(store):
    a = clients.create_client(store, "edge-1")
    clients.create_client(store, "edge-2")
    assert clients.resolve_client_ref(store, a["client_id"])["client_id"] == a["client_id"]
    assert clients.resolve_client_ref(store, "edge-1")["client_id"] == a["client_id"]


def test_ambiguous_name_lists_every_id(store):
    a = clients.create_client(store, "edge")
    b = clients.create_client(store, "edge")
    e = raises("client_ambiguous", clients.resolve_client_ref, store, "edge")
    assert e.fields["ids"] == [a["client_id"], b["client_id"]]
    assert a["client_id"] in e.message and b["client_id"] in e.message
    assert e.exit_code == 9 and e.http_status == 409
    # an id still picks one of them
    assert clients.resolve_client_ref(store, b["client_id"])["client_id"] == b["client_id"]


def test_unknown_reference_is_not_found(store):
    clients.create_client(store, "edge-1")
    e = raises("not_found", clients.resolve_client_ref, store, "edge-9")
    assert "'edge-9'" in e.message
    raises("not_found", clients.resolve_client_ref, store, new_ulid())


def test_a_name_that_looks_like_an_id_resolves_by_name(store):
    lookalike = new_ulid()
    c = clients.create_client(store, lookalike)
    assert clients.resolve_client_ref(store, lookalike)["client_id"] == c["client_id"]


def test_names_match_exactly(store):
    clients.create_client(store, "Edge")
    raises("not_found", clients.resolve_client_ref, store, "edge")


# ------------------------------------------------------------------ enrollment

def test_redeem_returns_the_client_and_a_fresh_token(store):
    c, code = enroll(store)
    client, token = clients.redeem_enrollment(store, code)
    assert client["client_id"] == c["client_id"]
    assert len(token) == 43
    assert clients.authenticate_client(store, token)["client_id"] == c["client_id"]


def test_codes_are_single_use(store):
    c, code = enroll(store)
    clients.redeem_enrollment(store, code)
    e = raises("enrollment_invalid", clients.redeem_enrollment, store, code)
    assert e.fields["reason"] == "used"
    assert "already used" in e.message
    assert code not in e.message
    assert (e.http_status, e.exit_code) == (400, 2)


def test_expired_code_is_refused_and_not_consumed(store):
    c, code = enroll(store)
    expire(store, c["client_id"])
    e = raises("enrollment_invalid", clients.redeem_enrollment, store, code)
    assert e.fields["reason"] == "expired"
    assert "expired at 2000-01-01T00:00:00Z" in e.message
    assert code not in e.message


def test_a_newer_code_supersedes_older_ones(store):
    c, old = enroll(store)
    older = clients.create_enrollment(store, c["client_id"], 600, None)
    newest = clients.create_enrollment(store, c["client_id"], 600, None)
    for stale in (old, older):
        e = raises("enrollment_invalid", clients.redeem_enrollment, store, stale)
        assert e.fields["reason"] == "superseded"
        assert "newer code" in e.message
    clients.redeem_enrollment(store, newest)


def test_a_new_code_does_not_supersede_other_clients_codes(store):
    _, code_a = enroll(store, "a")
    enroll(store, "b")
    clients.redeem_enrollment(store, code_a)


def test_unknown_code(store):
    enroll(store)
    for bogus in ("0" * 20, "", "   ", None, 42):
        e = raises("enrollment_invalid", clients.redeem_enrollment, store, bogus)
        assert e.fields["reason"] == "unknown"


def test_the_four_refusals_read_differently(store):
    c, used = enroll(store, "u")
    clients.redeem_enrollment(store, used)
    c2, stale = enroll(store, "s")
    clients.create_enrollment(store, c2["client_id"], 600, None)
    c3, late = enroll(store, "e")
    expire(store, c3["client_id"])
    seen = {}
    for code in (used, stale, late, "Z" * 20):
        with pytest.raises(PortunusError) as ei:
            clients.redeem_enrollment(store, code)
        assert code not in ei.value.message
        seen[ei.value.fields["reason"]] = ei.value.message
    assert set(seen) == {"used", "superseded", "expired", "unknown"}
    assert len(set(seen.values())) == 4


def test_codes_are_read_with_crockford_leniency(store):
    c, code = enroll(store)
    client, _ = clients.redeem_enrollment(store, f"  {code[:10].lower()}-{code[10:]} ")
    assert client["client_id"] == c["client_id"]


def test_reenrollment_rotates_the_token_and_keeps_id_and_rules(store):
    c, code = enroll(store)
    _, first = clients.redeem_enrollment(store, code)
    rule = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 8080, "target": "10.0.0.1:80"})
    rules.insert_rule(store, rule, c["client_id"], None)
    again = clients.create_enrollment(store, c["client_id"], 600, "portunus.example:7443")
    client, second = clients.redeem_enrollment(store, again)
    assert client["client_id"] == c["client_id"]
    assert second != first
    e = raises("token_revoked", clients.authenticate_client, store, first)
    assert (e.http_status, e.exit_code) == (401, 7)
    assert clients.authenticate_client(store, second)["client_id"] == c["client_id"]
    assert [r.rule_id for r in rules.rules_for_client(store, c["client_id"])] == [rule.rule_id]


def test_peek_checks_without_consuming(store):
    c, code = enroll(store, endpoint="portunus.example:7443")
    seen = clients.peek_enrollment(store, code)
    assert seen["client_id"] == c["client_id"] and seen["endpoint"] == "portunus.example:7443"
    assert seen["client_name"] == "edge-1"
    clients.redeem_enrollment(store, code)
    assert raises("enrollment_invalid", clients.peek_enrollment, store, code).fields["reason"] == "used"


def test_a_legacy_enrollment_has_no_endpoint(store):
    c = clients.create_client(store, "old")
    code = clients.create_enrollment(store, c["client_id"], 600, None)
    assert clients.peek_enrollment(store, code)["endpoint"] is None


@pytest.mark.parametrize("ttl", [0, -1, 86401, True, "600", 1.5])
def test_ttl_bounds(store, ttl):
    c = clients.create_client(store, "edge")
    raises("validation.invalid_ttl", clients.create_enrollment, store, c["client_id"], ttl, None)


def test_ttl_of_a_day_is_allowed(store):
    c = clients.create_client(store, "edge")
    code = clients.create_enrollment(store, c["client_id"], 86400, None)
    assert clients.peek_enrollment(store, code)["expires_at"] > c["created_at"]


def test_enrollment_for_unknown_client_is_not_found(store):
    raises("not_found", clients.create_enrollment, store, new_ulid(), 600, None)


def test_concurrent_redeems_of_one_code_let_exactly_one_win(store):
    _, code = enroll(store)
    results = []
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        try:
            results.append(("ok", clients.redeem_enrollment(store, code)[1]))
        except PortunusError as e:
            results.append((e.code, e.fields.get("reason")))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["enrollment_invalid"] * 5 + ["ok"]
    assert all(r[1] == "used" for r in results if r[0] != "ok")


def test_only_hashes_of_secrets_are_stored(store, tmp_path):
    c, code = enroll(store)
    _, token = clients.redeem_enrollment(store, code)
    pending = clients.create_enrollment(store, c["client_id"], 600, None)
    dump = "\n".join(store.read().iterdump())
    for secret in (code, token, pending):
        assert secret not in dump


# ------------------------------------------------------------------ authentication and revocation

def test_unknown_token_is_unauthenticated(store):
    for bogus in ("x" * 43, "", None):
        e = raises("unauthenticated", clients.authenticate_client, store, bogus)
        assert e.exit_code == 7


def test_revoke_stops_every_token_of_the_client(store):
    c, code = enroll(store)
    _, token = clients.redeem_enrollment(store, code)
    revoked = clients.revoke_client(store, c["client_id"])
    assert revoked["revoked"] is True and revoked["revoked_at"]
    e = raises("token_revoked", clients.authenticate_client, store, token)
    assert e.fields["client_id"] == c["client_id"]
    # idempotent: the first revocation time stays
    assert clients.revoke_client(store, c["client_id"])["revoked_at"] == revoked["revoked_at"]


def test_a_code_from_before_the_revocation_stays_dead(store):
    c, code = enroll(store)
    clients.revoke_client(store, c["client_id"])
    e = raises("enrollment_invalid", clients.redeem_enrollment, store, code)
    assert e.fields["reason"] == "client_revoked"
    assert "reenroll-client" in e.message


def test_reenrolling_a_revoked_client_lifts_the_revocation_and_keeps_its_rules(store):
    c, code = enroll(store)
    _, old_token = clients.redeem_enrollment(store, code)
    r = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 8080, "target": "10.0.0.1:80"})
    rules.insert_rule(store, r, c["client_id"], None)
    clients.revoke_client(store, c["client_id"])
    fresh = clients.create_enrollment(store, c["client_id"], 600, "portunus.example:7443")
    back, new_token = clients.redeem_enrollment(store, fresh)
    assert (back["client_id"], back["revoked"], back["revoked_at"]) == (c["client_id"], False, None)
    assert clients.authenticate_client(store, new_token)["client_id"] == c["client_id"]
    raises("token_revoked", clients.authenticate_client, store, old_token)
    assert [x["rule_id"] for x in rules.list_rules(store, client_id=c["client_id"])] == [r.rule_id]


def test_delete_needs_a_revoked_client(store):
    c = clients.create_client(store, "edge")
    e = raises("conflict.client_not_revoked", clients.delete_client, store, c["client_id"])
    assert (e.http_status, e.exit_code) == (409, 9)
    assert c["client_id"] in e.message
    clients.get_client(store, c["client_id"])


def test_delete_removes_the_client_its_rules_and_its_tokens(store):
    c, code = enroll(store)
    _, token = clients.redeem_enrollment(store, code)
    r = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 8080,
                        "targets": [{"host": "10.0.0.1", "port": 80}, {"host": "10.0.0.2", "port": 80}]})
    rules.insert_rule(store, r, c["client_id"], None)
    other = clients.create_client(store, "keep")
    kept = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 8080, "target": "10.0.0.1:80"})
    rules.insert_rule(store, kept, other["client_id"], None)
    clients.revoke_client(store, c["client_id"])
    assert clients.delete_client(store, c["client_id"]) == [r.rule_id]
    raises("not_found", clients.get_client, store, c["client_id"])
    raises("not_found", rules.get_rule, store, r.rule_id)
    raises("unauthenticated", clients.authenticate_client, store, token)
    conn = store.read()
    for table in ("client_tokens", "enrollments", "rules"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE client_id = ?", (c["client_id"],)).fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM rule_targets WHERE rule_id = ?", (r.rule_id,)).fetchone()[0] == 0
    assert rules.get_rule(store, kept.rule_id)["client_id"] == other["client_id"]

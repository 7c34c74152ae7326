"""Bearer operators (_superadmin, _legacy), settings and the audit trail."""

from __future__ import annotations

import pytest

from portunus.errors import PortunusError
from portunus.store import audit, operators, settings
from portunus.store.ids import new_token


# ------------------------------------------------------------------ bootstrap-superadmin

def test_bootstrap_creates_a_superadmin_bearer_once(store):
    assert operators.has_superadmin(store) is False
    token = operators.bootstrap_superadmin(store, "Ops Team")
    assert len(token) == 43
    assert operators.has_superadmin(store) is True
    assert operators.authenticate_operator(store, token) == {
        "user_id": "_superadmin", "role": "superadmin", "display_name": "Ops Team"}
    with pytest.raises(PortunusError) as ei:
        operators.bootstrap_superadmin(store, "Again")
    assert ei.value.code == "conflict.already_bootstrapped"
    assert (ei.value.http_status, ei.value.exit_code) == (409, 9)
    assert operators.authenticate_operator(store, token)["display_name"] == "Ops Team"


def test_bootstrap_name_is_validated(store):
    with pytest.raises(PortunusError) as ei:
        operators.bootstrap_superadmin(store, "")
    assert ei.value.code == "validation.invalid_display_name"
    assert operators.has_superadmin(store) is False


def test_the_token_is_stored_only_as_a_hash(store):
    token = operators.bootstrap_superadmin(store, "Ops")
    assert token not in "\n".join(store.read().iterdump())


def test_unknown_tokens_and_disabled_users_do_not_authenticate(store):
    token = operators.bootstrap_superadmin(store, "Ops")
    for bogus in (new_token(), "", None, token + "x"):
        assert operators.authenticate_operator(store, bogus) is None
    with store.write() as conn:
        conn.execute("UPDATE users SET disabled = 1 WHERE user_id = '_superadmin'")
    assert operators.authenticate_operator(store, token) is None
    assert operators.has_superadmin(store) is False


# ------------------------------------------------------------------ operator_token (_legacy)

def test_legacy_operator_on_an_empty_store(store):
    token = new_token()
    assert operators.ensure_legacy_operator(store, token) is True
    assert operators.authenticate_operator(store, token) == {
        "user_id": "_legacy", "role": "superadmin", "display_name": operators.LEGACY_DISPLAY_NAME}
    assert operators.has_superadmin(store) is True
    assert operators.ensure_legacy_operator(store, token) is True  # every restart: no change
    assert store.read().execute("SELECT COUNT(*) FROM operator_tokens").fetchone()[0] == 1
    assert token not in "\n".join(store.read().iterdump())


def test_legacy_operator_is_not_created_when_another_superadmin_exists(store):
    operators.bootstrap_superadmin(store, "Ops")
    token = new_token()
    assert operators.ensure_legacy_operator(store, token) is False
    assert operators.authenticate_operator(store, token) is None
    assert store.read().execute("SELECT COUNT(*) FROM users WHERE user_id = '_legacy'").fetchone()[0] == 0


def test_a_changed_operator_token_replaces_the_old_one(store):
    old, new = new_token(), new_token()
    operators.ensure_legacy_operator(store, old)
    operators.bootstrap_superadmin(store, "Ops")  # a later superadmin does not freeze the old secret
    assert operators.ensure_legacy_operator(store, new) is True
    assert operators.authenticate_operator(store, old) is None
    assert operators.authenticate_operator(store, new)["user_id"] == "_legacy"
    # switching back revives the first row rather than duplicating it
    assert operators.ensure_legacy_operator(store, old) is True
    assert operators.authenticate_operator(store, old)["user_id"] == "_legacy"
    assert operators.authenticate_operator(store, new) is None


def test_removing_operator_token_from_the_config_revokes_it(store):
    token = new_token()
    operators.ensure_legacy_operator(store, token)
    assert operators.ensure_legacy_operator(store, None) is False
    assert operators.authenticate_operator(store, token) is None
    assert operators.ensure_legacy_operator(store, None) is False  # nothing to do on an empty store either


def test_operator_token_may_not_reuse_another_identitys_bearer(store):
    token = new_token()
    operators.ensure_legacy_operator(store, new_token())
    with store.write() as conn:
        conn.execute("INSERT INTO users (user_id, role, display_name, created_at) "
                     "VALUES ('alice', 'user', 'Alice', '2026-01-01T00:00:00Z')")
        from portunus.store.ids import hash_token
        conn.execute("INSERT INTO operator_tokens (token_hash, user_id, created_at) VALUES (?, 'alice', 'x')",
                     (hash_token(token),))
    with pytest.raises(PortunusError) as ei:
        operators.ensure_legacy_operator(store, token)
    assert ei.value.code == "config_invalid"
    assert token not in ei.value.message
    assert operators.authenticate_operator(store, token)["user_id"] == "alice"


# ------------------------------------------------------------------ settings

def test_settings_round_trip(store):
    assert settings.get_setting(store, "advertised_endpoint") is None
    assert settings.get_setting(store, "advertised_endpoint", "fallback") == "fallback"
    settings.set_setting(store, "advertised_endpoint", "a.example:7443")
    settings.set_setting(store, "advertised_endpoint", "b.example:7443")
    assert settings.get_setting(store, "advertised_endpoint") == "b.example:7443"
    assert settings.delete_setting(store, "advertised_endpoint") is True
    assert settings.delete_setting(store, "advertised_endpoint") is False
    assert settings.get_setting(store, "advertised_endpoint") is None


def test_settings_take_strings(store):
    with pytest.raises(TypeError):
        settings.set_setting(store, "k", 5)


# ------------------------------------------------------------------ audit

def test_audit_newest_first_with_outcome_filter_and_limit(store):
    ids = [audit.append(store, "alice", "GET", f"/v1/rules/{i}", "allow") for i in range(3)]
    ids.append(audit.append(store, None, "POST", "/v1/rules", "deny", "unauthenticated"))
    entries = audit.list_entries(store)
    assert [e["id"] for e in entries] == ids[::-1]
    assert entries[0] == {"id": ids[3], "timestamp": entries[0]["timestamp"], "actor": None, "method": "POST",
                          "path": "/v1/rules", "outcome": "deny", "reason": "unauthenticated"}
    assert entries[0]["timestamp"].endswith("Z")
    assert [e["path"] for e in audit.list_entries(store, limit=2)] == ["/v1/rules", "/v1/rules/2"]
    assert [e["id"] for e in audit.list_entries(store, outcome="deny")] == [ids[3]]
    assert [e["id"] for e in audit.list_entries(store, outcome="allow", limit=1)] == [ids[2]]


def test_audit_refuses_bad_outcomes_and_limits(store):
    with pytest.raises(PortunusError):
        audit.append(store, "a", "GET", "/v1/x", "maybe")
    for bad in (0, -1, True, "5"):
        with pytest.raises(PortunusError) as ei:
            audit.list_entries(store, limit=bad)
        assert ei.value.exit_code == 2
    with pytest.raises(PortunusError):
        audit.list_entries(store, outcome="maybe")


def test_audit_ids_are_not_reused_after_a_prune(store):
    first = audit.append(store, "a", "GET", "/v1/x", "allow")
    with store.write() as conn:
        conn.execute("DELETE FROM audit")
    assert audit.append(store, "a", "GET", "/v1/x", "allow") > first


# ------------------------------------------------------------------ server.access: what the HTTP layer sees

def test_access_authenticates_bearers_as_principals(store):
    from portunus.server.access import OperatorAccess, Principal
    access = OperatorAccess(store)
    assert access.onboarding_required() is True
    token = operators.bootstrap_superadmin(store, "Ops")
    assert access.onboarding_required() is False
    assert access.principal_for_bearer(token) == Principal("_superadmin", "superadmin", "Ops")
    assert access.principal_for_bearer(token).is_superadmin
    assert access.principal_for_bearer(new_token()) is None


def test_access_writes_and_reads_the_audit_trail(store):
    from portunus.server.access import OperatorAccess
    access = OperatorAccess(store)
    assert access.record("_superadmin", "GET", "/v1/clients", "allow", None)
    access.record("anonymous", "GET", "/v1/clients", "deny", "unauthenticated")
    entries = access.audit_entries(limit=10, outcome="deny")
    assert [(e["actor"], e["reason"]) for e in entries] == [("anonymous", "unauthenticated")]
    page = access.audit_page(since="2000-01-01T00:00:00Z", until=None, cursor=None, limit=1, outcome=None)
    assert page["count"] == 1 and page["next_cursor"] is not None


def test_access_counts_audit_rows_it_could_not_write(store):
    from portunus.server.access import OperatorAccess

    class Core:  # what ServerCore offers for it: the counter /metrics renders
        audit_drops = 0

        def count_audit_drop(self) -> None:
            self.audit_drops += 1
    core = Core()
    access = OperatorAccess(store, core)
    with pytest.raises(PortunusError):
        access.record("x", "GET", "/v1/clients", "maybe", None)  # not allow|deny: refused by the store
    assert access.audit_drops == 1 and core.audit_drops == 1


def test_access_resolves_client_references(store):
    from portunus.server.access import OperatorAccess
    from portunus.store import clients
    c = clients.create_client(store, "edge-01")
    access = OperatorAccess(store)
    assert access.client_ref("edge-01")["client_id"] == c["client_id"]
    assert access.client_ref(c["client_id"])["client_name"] == "edge-01"
    with pytest.raises(PortunusError) as ei:
        access.client_ref("nope")
    assert ei.value.code == "not_found"

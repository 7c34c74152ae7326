"""Identity below HTTP (SPEC §5, §6): onboarding, users, the last-superadmin guard, login and Web
sessions (idle/absolute expiry on an injected clock), the throttle (including across a restart),
password change and reset, grants and the push fit check. Secrets never reach a log or a message."""

from __future__ import annotations

import io

import pytest

from portunus.errors import PortunusError
from portunus.log import log
from portunus.model import Rule
from portunus.server import identity as identity_mod
from portunus.server import passwords
from portunus.server.identity import IdentityService, lock_secs, retry_after_header
from portunus.store import Store, clients, operators
from portunus.store import rules as store_rules
from portunus.store.db import ALLOW_ANY_FS_ENV
from portunus.store.ids import new_ulid

T0 = 1_800_000_000
IP = "192.0.2.7"
OTHER_IP = "198.51.100.9"
ADMIN_PW = "admin password 0001"
ALICE_PW = "alice password 0001"


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, secs: float) -> None:
        self.t += secs


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    s = Store.open(data_dir)
    yield s
    s.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def logs(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    return buf


@pytest.fixture
def ids(store, clock):
    return IdentityService(store, clock=clock)


@pytest.fixture
def admin(ids):
    return ids.complete_onboarding(ids.start_onboarding(), "admin", "Admin", ADMIN_PW, remote_ip=IP)


@pytest.fixture
def alice(ids, admin):
    return ids.create_user("alice", "Alice", "user", ALICE_PW)


def refused(code: str, fn, *args, **kwargs) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kwargs)
    assert ei.value.code == code, ei.value
    return ei.value


def dump(store) -> str:
    return "\n".join(store.read().iterdump())


# ------------------------------------------------------------------ onboarding

def test_onboarding_creates_the_first_superadmin_once(ids, store, logs):
    assert ids.bootstrap_required() and ids.onboarding_open()
    token = ids.start_onboarding()
    assert len(token) == 43
    assert token not in dump(store)  # stored only as a hash
    user = ids.complete_onboarding(token, "admin", "Admin", ADMIN_PW, remote_ip=IP)
    assert user == {"user_id": "admin", "display_name": "Admin", "role": "superadmin", "disabled": False,
                    "password_change_required": False, "created_at": "2027-01-15T08:00:00Z"}
    assert not ids.bootstrap_required() and not ids.onboarding_open()
    e = refused("already_bootstrapped", ids.complete_onboarding, token, "admin2", "A2", ADMIN_PW, remote_ip=IP)
    assert (e.http_status, e.exit_code) == (409, 9)
    refused("already_bootstrapped", ids.issue_setup_token)
    assert ids.start_onboarding() is None
    assert token not in logs.getvalue() and ADMIN_PW not in logs.getvalue()


def test_setup_token_missing_wrong_rotated_and_expired(ids, clock):
    first = ids.start_onboarding()
    for missing in (None, "", "   ", 42):
        e = refused("setup_token_required", ids.complete_onboarding, missing, "admin", "A", ADMIN_PW, remote_ip=IP)
        assert e.http_status == 401
    e = refused("setup_token_invalid", ids.complete_onboarding, first + "x", "admin", "A", ADMIN_PW, remote_ip=IP)
    assert first not in e.message
    second = ids.start_onboarding()  # every serve start rotates it
    assert second != first
    refused("setup_token_invalid", ids.complete_onboarding, first, "admin", "A", ADMIN_PW, remote_ip=IP)
    clock.advance(30 * 60)
    e = refused("setup_token_invalid", ids.complete_onboarding, second, "admin", "A", ADMIN_PW, remote_ip=IP)
    assert "expired" in e.message and second not in e.message
    third = ids.issue_setup_token()  # the offline onboarding-token command
    clock.advance(30 * 60 - 1)
    assert ids.complete_onboarding(third, "admin", "A", ADMIN_PW, remote_ip=IP)["role"] == "superadmin"


def test_a_token_from_onboarding_token_survives_a_serve_start_for_its_30_minutes(ids, clock):
    offline = ids.issue_setup_token()
    assert ids.cli_setup_token_expires_at() == "2027-01-15T08:30:00Z"
    assert ids.start_onboarding() is None  # serve keeps it (and says so) instead of printing a new one
    clock.advance(30 * 60)
    assert ids.cli_setup_token_expires_at() is None
    served = ids.start_onboarding()
    assert served is not None and ids.start_onboarding() not in (None, served)  # serve's own rotate
    refused("setup_token_invalid", ids.complete_onboarding, offline, "admin", "A", ADMIN_PW, remote_ip=IP)


def test_onboarding_validates_the_new_user_after_the_token(ids):
    token = ids.start_onboarding()
    refused("validation.invalid_user_id", ids.complete_onboarding, token, "Admin", "A", ADMIN_PW, remote_ip=IP)
    refused("validation.reserved_user_id", ids.complete_onboarding, token, "_root", "A", ADMIN_PW, remote_ip=IP)
    refused("password_too_short", ids.complete_onboarding, token, "admin", "A", "x" * 11, remote_ip=IP)
    refused("password_too_long", ids.complete_onboarding, token, "admin", "A", "x" * 1025, remote_ip=IP)
    assert ids.onboarding_open()  # a refused body does not use the token up
    ids.complete_onboarding(token, "admin", "A", ADMIN_PW, remote_ip=IP)


def test_wrong_setup_tokens_are_throttled(ids, clock):
    token = ids.start_onboarding()
    for _ in range(5):
        refused("setup_token_invalid", ids.complete_onboarding, "guess", "admin", "A", ADMIN_PW, remote_ip=IP)
    e = refused("rate_limited", ids.complete_onboarding, token, "admin", "A", ADMIN_PW, remote_ip=IP)
    assert e.fields["retry_after_secs"] == 60
    assert ids.complete_onboarding(token, "admin", "A", ADMIN_PW, remote_ip=OTHER_IP)["user_id"] == "admin"


def test_bearer_superadmin_closes_onboarding(ids, store):
    operators.bootstrap_superadmin(store, "Ops")
    assert not ids.bootstrap_required()
    assert ids.start_onboarding() is None
    refused("already_bootstrapped", ids.issue_setup_token)


# ------------------------------------------------------------------ users

@pytest.mark.parametrize("bad", ["", "A", "1abc", "-a", "a" * 33, "al ice", "alice!", "ålice", "alice\n", None, 7,
                                 "ALICE"])
def test_user_ids_must_match_the_pattern(ids, admin, bad):
    e = refused("validation.invalid_user_id", ids.create_user, bad, "X", "user", ALICE_PW)
    assert (e.http_status, e.exit_code) == (400, 2)


@pytest.mark.parametrize("reserved", ["_superadmin", "_legacy", "_x"])
def test_leading_underscore_is_reserved(ids, admin, reserved):
    e = refused("validation.reserved_user_id", ids.create_user, reserved, "X", "user", ALICE_PW)
    assert "_superadmin" in e.message


@pytest.mark.parametrize("good", ["a", "a" * 32, "a-b_c9", "z0"])
def test_valid_user_ids(ids, admin, good):
    assert ids.create_user(good, "X", "user", ALICE_PW)["user_id"] == good


def test_users_crud(ids, admin, alice, store):
    assert alice["role"] == "user" and alice["password_change_required"] is False
    assert "password_hash" not in alice
    assert [u["user_id"] for u in ids.list_users()] == ["admin", "alice"]
    assert ids.get_user("alice") == alice
    refused("conflict.user_exists", ids.create_user, "alice", "Again", "user", ALICE_PW)
    refused("validation.invalid_role", ids.create_user, "bob", "Bob", "root", ALICE_PW)
    refused("validation.invalid_display_name", ids.create_user, "bob", "", "user", ALICE_PW)
    e = refused("not_found", ids.get_user, "nobody")
    assert (e.http_status, e.exit_code) == (404, 8)
    assert ids.update_user("alice", display_name="Alice L.")["display_name"] == "Alice L."
    assert ids.remove_user("alice") == []
    refused("not_found", ids.get_user, "alice")
    refused("not_found", ids.remove_user, "alice")
    assert ALICE_PW not in dump(store)


def test_the_last_active_superadmin_cannot_be_removed_demoted_or_disabled(ids, admin, store):
    for fn, kwargs in ((ids.remove_user, {}), (ids.update_user, {"role": "user"}),
                       (ids.update_user, {"disabled": True})):
        e = refused("conflict.last_superadmin", fn, "admin", **kwargs)
        assert (e.http_status, e.exit_code) == (409, 9)
    assert ids.get_user("admin")["role"] == "superadmin"
    # a disabled second superadmin does not count
    ids.create_user("root2", "Root 2", "superadmin", ADMIN_PW)
    ids.update_user("root2", disabled=True)
    refused("conflict.last_superadmin", ids.remove_user, "admin")
    ids.update_user("root2", disabled=False)
    assert ids.update_user("admin", role="user")["role"] == "user"
    refused("conflict.last_superadmin", ids.update_user, "root2", disabled=True)
    assert ids.remove_user("admin") == []
    assert not ids.bootstrap_required()


def test_reserved_bearer_superadmin_counts_and_can_be_reset(ids, store):
    token = operators.bootstrap_superadmin(store, "Ops")
    refused("conflict.last_superadmin", ids.remove_user, "_superadmin")
    out = ids.reset_password("_superadmin")  # seed 004: bootstrap installs recover as _superadmin
    assert out["api_tokens_revoked"] == 1
    assert operators.authenticate_operator(store, token) is None
    login = ids.login("_superadmin", out["temporary_password"], remote_ip=IP)
    assert login.password_change_required is True


# ------------------------------------------------------------------ login and sessions

def test_login_opens_a_session_that_logout_ends(ids, alice, store, logs):
    res = ids.login("alice", ALICE_PW, remote_ip=IP)
    assert res.user["user_id"] == "alice" and res.password_change_required is False
    assert len(res.session_token) == 43
    assert res.session_token not in dump(store)
    s = ids.authenticate_session(res.session_token)
    assert (s.user_id, s.role, s.password_change_required) == ("alice", "user", False)
    assert ids.logout(res.session_token) is True
    assert ids.authenticate_session(res.session_token) is None  # a reused logged-out cookie
    assert ids.logout(res.session_token) is False
    for junk in (None, "", "x" * 300, res.session_token + "x"):
        assert ids.authenticate_session(junk) is None
    assert res.session_token not in logs.getvalue() and ALICE_PW not in logs.getvalue()


def test_bad_credentials_are_one_uniform_error(ids, alice, store):
    ids.update_user("alice", disabled=False)
    ids.create_user("carol", "Carol", "user", ALICE_PW)
    ids.update_user("carol", disabled=True)
    errors = [refused("invalid_login", ids.login, *args, remote_ip=IP)
              for args in (("alice", "wrong password!!"), ("nobody", ALICE_PW), ("carol", ALICE_PW),
                           (None, ALICE_PW), ("alice", None))]
    assert {(e.message, e.http_status, e.exit_code) for e in errors} == {
        ("unknown user or wrong password", 401, 7)}
    for e in errors:
        assert ALICE_PW not in str(e.to_json())


def test_unknown_and_bearer_only_users_pay_the_same_hash(ids, store, admin, monkeypatch):
    operators.bootstrap_superadmin(store, "Ops")  # _superadmin: a user without a password
    calls = []
    real = passwords._derive
    monkeypatch.setattr(passwords, "_derive", lambda *a: calls.append(a[1:4]) or real(*a))
    for user in ("admin", "nobody", "_superadmin"):
        calls.clear()
        refused("invalid_login", ids.login, user, "wrong password!!", remote_ip=IP)
        assert calls == [(passwords.MEMORY_KIB, passwords.ITERATIONS, passwords.LANES)], user


def test_session_idle_expiry_after_8_hours(ids, alice, clock, store):
    token = ids.login("alice", ALICE_PW, remote_ip=IP).session_token
    clock.advance(8 * 3600 - 1)
    assert ids.authenticate_session(token) is not None  # use refreshes the idle timer
    clock.advance(8 * 3600 - 1)
    assert ids.authenticate_session(token) is not None
    clock.advance(8 * 3600)
    assert ids.authenticate_session(token) is None
    assert store.read().execute("SELECT COUNT(*) FROM web_sessions").fetchone()[0] == 0


def test_session_absolute_expiry_after_7_days_even_when_used(ids, alice, clock):
    res = ids.login("alice", ALICE_PW, remote_ip=IP)
    assert res.expires_at == "2027-01-22T08:00:00Z"
    for _ in range(24):  # every 7 hours for 168 hours
        clock.advance(7 * 3600)
        if clock.t - T0 >= 7 * 86400:
            break
        assert ids.authenticate_session(res.session_token) is not None
    assert clock.t - T0 >= 7 * 86400
    assert ids.authenticate_session(res.session_token) is None


def test_disabling_a_user_ends_their_sessions(ids, alice):
    token = ids.login("alice", ALICE_PW, remote_ip=IP).session_token
    ids.update_user("alice", disabled=True)
    assert ids.authenticate_session(token) is None
    refused("invalid_login", ids.login, "alice", ALICE_PW, remote_ip=IP)


def test_old_parameter_hashes_are_upgraded_at_login(ids, alice, store):
    old = passwords.PasswordHash(1024, 1, 1, b"s" * 16, b"")
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    digest = Argon2id(salt=old.salt, length=32, iterations=1, lanes=1, memory_cost=1024).derive(ALICE_PW.encode())
    old_phc = passwords.PasswordHash(1024, 1, 1, old.salt, digest).to_phc()
    with store.write() as conn:
        conn.execute("UPDATE users SET password_hash = ? WHERE user_id = 'alice'", (old_phc,))
    ids.login("alice", ALICE_PW, remote_ip=IP)
    stored = store.read().execute("SELECT password_hash FROM users WHERE user_id = 'alice'").fetchone()[0]
    assert stored != old_phc and passwords.parse_phc(stored).is_current
    ids.login("alice", ALICE_PW, remote_ip=IP)


def test_a_password_from_an_older_policy_still_logs_in_and_is_rehashed(ids, alice, store):
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    short = "old-8chr"
    digest = Argon2id(salt=b"t" * 16, length=32, iterations=1, lanes=1, memory_cost=1024).derive(short.encode())
    with store.write() as conn:
        conn.execute("UPDATE users SET password_hash = ? WHERE user_id = 'alice'",
                     (passwords.PasswordHash(1024, 1, 1, b"t" * 16, digest).to_phc(),))
    assert ids.login("alice", short, remote_ip=IP).user["user_id"] == "alice"
    stored = store.read().execute("SELECT password_hash FROM users WHERE user_id = 'alice'").fetchone()[0]
    assert passwords.parse_phc(stored).is_current and passwords.verify_password(short, stored).ok


def test_a_missing_remote_address_shares_one_key(ids, alice):
    for _ in range(5):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=None)
    refused("rate_limited", ids.login, "alice", ALICE_PW, remote_ip="")


def test_an_unreadable_stored_hash_fails_closed_and_is_logged_without_content(ids, alice, store, logs):
    with store.write() as conn:
        conn.execute("UPDATE users SET password_hash = '$argon2id$garbage-secret' WHERE user_id = 'alice'")
    refused("invalid_login", ids.login, "alice", ALICE_PW, remote_ip=IP)
    assert "identity.password_hash_unreadable" in logs.getvalue()
    assert "garbage-secret" not in logs.getvalue()


# ------------------------------------------------------------------ throttle

def test_lock_schedule():
    assert [lock_secs(n) for n in range(1, 12)] == [0, 0, 0, 0, 60, 120, 240, 480, 900, 900, 900]
    assert lock_secs(10 ** 6) == 900


def test_seven_wrong_passwords_then_the_right_one(ids, alice, clock, logs):
    outcomes = []
    for _ in range(7):
        with pytest.raises(PortunusError) as ei:
            ids.login("alice", "wrong password!!", remote_ip=IP)
        outcomes.append(ei.value.code)
    assert outcomes == ["invalid_login"] * 5 + ["rate_limited"] * 2
    e = refused("rate_limited", ids.login, "alice", ALICE_PW, remote_ip=IP)
    assert (e.http_status, e.fields["retry_after_secs"]) == (429, 60)
    assert retry_after_header(e) == "60"
    assert ALICE_PW not in e.message
    clock.advance(59)
    assert refused("rate_limited", ids.login, "alice", ALICE_PW, remote_ip=IP).fields["retry_after_secs"] == 1
    clock.advance(1)
    assert ids.login("alice", ALICE_PW, remote_ip=IP).user["user_id"] == "alice"
    # success cleared the key: the count starts over
    for _ in range(4):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    assert ids.login("alice", ALICE_PW, remote_ip=IP)
    assert "auth.throttle_locked" in logs.getvalue() and ALICE_PW not in logs.getvalue()


def test_each_further_failure_doubles_the_lock_up_to_15_minutes(ids, alice, clock):
    for _ in range(5):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    seen = []
    for _ in range(6):
        wait = refused("rate_limited", ids.login, "alice", ALICE_PW, remote_ip=IP).fields["retry_after_secs"]
        seen.append(wait)
        clock.advance(wait)
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    assert seen == [60, 120, 240, 480, 900, 900]


def test_failures_count_within_15_minutes_of_the_first(ids, alice, clock):
    for _ in range(4):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    clock.advance(15 * 60)
    refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)  # a new window: 1 failure
    for _ in range(3):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    assert ids.login("alice", ALICE_PW, remote_ip=IP)


def test_keys_are_per_subject_and_address_and_unknown_subjects_share_one(ids, alice, admin):
    for name in ("ghost1", "ghost2", "ghost3", "ghost4", "ghost5"):
        refused("invalid_login", ids.login, name, "wrong password!!", remote_ip=IP)
    refused("rate_limited", ids.login, "ghost6", "wrong password!!", remote_ip=IP)
    refused("invalid_login", ids.login, "ghost6", "wrong password!!", remote_ip=OTHER_IP)
    assert ids.login("alice", ALICE_PW, remote_ip=IP)  # a known subject has its own key
    for _ in range(5):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    refused("rate_limited", ids.login, "alice", ALICE_PW, remote_ip=IP)
    assert ids.login("alice", ALICE_PW, remote_ip=OTHER_IP)
    assert ids.login("admin", ADMIN_PW, remote_ip=IP)


def test_parallel_guesses_cannot_exceed_the_limit(ids, alice):
    """Each attempt is counted before its hash runs, so a burst of guesses gets exactly five checks."""
    import threading
    codes, lock = [], threading.Lock()

    def guess():
        try:
            ids.login("alice", "wrong password!!", remote_ip=IP)
        except PortunusError as exc:
            with lock:
                codes.append(exc.code)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(codes) == ["invalid_login"] * 5 + ["rate_limited"] * 7


def test_a_right_password_on_the_fifth_attempt_still_logs_in(ids, alice):
    for _ in range(4):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    assert ids.login("alice", ALICE_PW, remote_ip=IP)
    refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)  # cleared: 1 failure


def test_a_lockout_survives_a_restart(data_dir, clock):
    with Store.open(data_dir) as s:
        ids = IdentityService(s, clock=clock)
        ids.complete_onboarding(ids.start_onboarding(), "admin", "Admin", ADMIN_PW, remote_ip=IP)
        for _ in range(7):
            with pytest.raises(PortunusError):
                ids.login("admin", "wrong password!!", remote_ip=IP)
    clock.advance(30)
    with Store.open(data_dir) as s:
        e = refused("rate_limited", IdentityService(s, clock=clock).login, "admin", ADMIN_PW, remote_ip=IP)
        assert e.fields["retry_after_secs"] == 30


# ------------------------------------------------------------------ password change and reset

def test_reset_gives_a_temporary_password_that_must_be_changed(ids, alice, store, logs):
    old_session = ids.login("alice", ALICE_PW, remote_ip=IP).session_token
    out = ids.reset_password("alice")
    temp = out["temporary_password"]
    assert out["sessions_revoked"] == 1 and out["user_id"] == "alice"
    assert ids.authenticate_session(old_session) is None
    refused("invalid_login", ids.login, "alice", ALICE_PW, remote_ip=IP)
    res = ids.login("alice", temp, remote_ip=IP)
    assert res.password_change_required is True
    session = ids.authenticate_session(res.session_token)
    assert session.password_change_required is True
    other = ids.login("alice", temp, remote_ip=OTHER_IP).session_token
    ids.change_password("alice", temp, "alice new password 2", remote_ip=IP, keep_session_hash=session.session_hash)
    assert ids.authenticate_session(res.session_token).password_change_required is False
    assert ids.authenticate_session(other) is None  # the other sessions end with the change
    assert ids.get_user("alice")["password_change_required"] is False
    for secret in (temp, ALICE_PW, "alice new password 2", res.session_token):
        assert secret not in logs.getvalue() and secret not in dump(store)


def test_reset_with_a_given_password_and_unknown_users(ids, alice):
    out = ids.reset_password("alice", "set by the admin 1")
    assert "temporary_password" not in out
    assert ids.login("alice", "set by the admin 1", remote_ip=IP).password_change_required is True
    refused("password_too_short", ids.reset_password, "alice", "short")
    e = refused("not_found", ids.reset_password, "nobody")
    assert e.exit_code == 8


def test_reset_lifts_the_users_login_lock(ids, alice):
    for _ in range(5):
        refused("invalid_login", ids.login, "alice", "wrong password!!", remote_ip=IP)
    temp = ids.reset_password("alice")["temporary_password"]
    assert ids.login("alice", temp, remote_ip=IP)


def test_reset_can_keep_api_tokens(ids, store):
    token = operators.bootstrap_superadmin(store, "Ops")
    out = ids.reset_password("_superadmin", revoke_api_tokens=False)
    assert out["api_tokens_revoked"] == 0
    assert operators.authenticate_operator(store, token)["user_id"] == "_superadmin"


def test_password_change_checks_the_current_password_and_policy(ids, alice, clock):
    e = refused("invalid_login", ids.change_password, "alice", "not my password", "alice new password 2",
                remote_ip=IP)
    assert "alice new password 2" not in e.message
    refused("password_too_short", ids.change_password, "alice", ALICE_PW, "short", remote_ip=IP)
    refused("validation.password_unchanged", ids.change_password, "alice", ALICE_PW, ALICE_PW, remote_ip=IP)
    for _ in range(5):  # the right current password above cleared the key: five fresh failures lock it
        refused("invalid_login", ids.change_password, "alice", "not my password", "alice new password 2",
                remote_ip=IP)
    refused("rate_limited", ids.change_password, "alice", ALICE_PW, "alice new password 2", remote_ip=IP)
    clock.advance(60)
    ids.change_password("alice", ALICE_PW, "alice new password 2", remote_ip=IP)
    assert ids.login("alice", "alice new password 2", remote_ip=IP)


# ------------------------------------------------------------------ grants

@pytest.fixture
def edge(store):
    return clients.create_client(store, "edge-1")["client_id"]


@pytest.fixture
def edge2(store):
    return clients.create_client(store, "edge-2")["client_id"]


def push(store, client_id, owner, listen, protocol="tcp") -> str:
    d = {"rule_id": new_ulid(), "protocol": protocol, "target": "10.0.0.9:80"}
    if isinstance(listen, str):
        d["listen"] = listen
        a, b = listen.split("-")
        d["target"] = f"10.0.0.9:{a}-{b}"
    else:
        d["listen_port"] = listen
    return store_rules.insert_rule(store, Rule.from_dict(d), client_id, owner)["rule_id"]


def test_grant_shape_and_validation(ids, alice, edge):
    g = ids.add_grant("alice", edge, 30000, 30010, ["udp", "tcp", "tcp"], note="team A")
    assert set(g) == {"grant_id", "user_id", "client", "listen_port_start", "listen_port_end", "protocols", "note",
                      "created_at"}
    assert (g["client"], g["protocols"], g["note"]) == (edge, ["tcp", "udp"], "team A")
    assert ids.add_grant("alice", "*", 1, 65535, ["udp"])["client"] == "*"
    assert ids.add_grant("alice", edge.lower(), 5, 5, ["tcp"], note="  ")["note"] is None
    e = refused("validation.grant_port_range_invalid", ids.add_grant, "alice", edge, 30010, 30000, ["tcp"])
    assert "30010" in e.message and e.http_status == 400
    e = refused("validation.invalid_protocol", ids.add_grant, "alice", edge, 1, 2, ["tcp", "icmp"])
    assert "icmp" in e.message
    for protos in ([], "tcp", None, [1]):
        with pytest.raises(PortunusError) as ei:
            ids.add_grant("alice", edge, 1, 2, protos)
        assert ei.value.code.startswith("validation.")
    for port in (0, 65536, "80", True, None):
        refused("validation.invalid_port", ids.add_grant, "alice", edge, port, 100, ["tcp"])
    refused("not_found", ids.add_grant, "nobody", edge, 1, 2, ["tcp"])
    refused("not_found", ids.add_grant, "alice", new_ulid(), 1, 2, ["tcp"])
    refused("not_found", ids.add_grant, "alice", "edge-1", 1, 2, ["tcp"])  # names are resolved by the caller
    assert [x["grant_id"] for x in ids.list_grants("alice")][0] == g["grant_id"]
    assert ids.get_grant(g["grant_id"]) == g
    refused("not_found", ids.get_grant, new_ulid())


def test_push_fit_checks_in_order(ids, alice, edge, edge2):
    ids.add_grant("alice", edge, 30000, 30010, ["tcp"])
    e = refused("client_not_granted", ids.check_push, "alice", "user", edge2, "udp", 1, 1)
    assert (e.http_status, e.exit_code) == (403, 6)
    refused("protocol_not_granted", ids.check_push, "alice", "user", edge, "udp", 1, 1)
    e = refused("port_outside_grant", ids.check_push, "alice", "user", edge, "tcp", 30005, 30011)
    assert "30005-30011" in e.message and "30000-30010" in e.message
    assert ids.check_push("alice", "user", edge, "tcp", 30000, 30010)["listen_port_start"] == 30000
    assert ids.check_push("admin", "superadmin", edge2, "udp", 1, 65535) is None


def test_a_push_must_fit_inside_one_grant(ids, alice, edge):
    ids.add_grant("alice", edge, 30000, 30005, ["tcp"])
    ids.add_grant("alice", edge, 30006, 30010, ["tcp", "udp"])
    refused("port_outside_grant", ids.check_push, "alice", "user", edge, "tcp", 30004, 30007)
    assert ids.check_push("alice", "user", edge, "udp", 30006, 30010)
    refused("port_outside_grant", ids.check_push, "alice", "user", edge, "udp", 30005, 30005)


def test_wildcard_grants_cover_every_client(ids, alice, edge, edge2):
    assert ids.granted_client_ids("alice") == set()
    ids.add_grant("alice", edge, 1000, 2000, ["tcp"])
    assert ids.granted_client_ids("alice") == {edge}
    ids.add_grant("alice", "*", 5000, 5000, ["udp"])
    assert ids.granted_client_ids("alice") is None
    assert ids.check_push("alice", "user", edge2, "udp", 5000, 5000)["client"] == "*"
    refused("protocol_not_granted", ids.check_push, "alice", "user", edge2, "tcp", 5000, 5000)


def test_revoking_a_grant_returns_the_rules_no_grant_covers_any_more(ids, alice, edge, edge2, store):
    wide = ids.add_grant("alice", edge, 30000, 30010, ["tcp", "udp"])
    narrow = ids.add_grant("alice", edge, 30000, 30002, ["tcp"])
    other = ids.add_grant("alice", edge2, 40000, 40000, ["tcp"])
    inside_both = push(store, edge, "alice", 30001)
    only_wide = push(store, edge, "alice", "30003-30005")
    udp = push(store, edge, "alice", 30000, "udp")
    on_edge2 = push(store, edge2, "alice", 40000)
    admin_rule = push(store, edge, "admin", 30009)
    assert ids.revoke_grant(wide["grant_id"]) == [only_wide, udp]
    refused("not_found", ids.get_grant, wide["grant_id"])
    # the identity change is committed; the rules are still there until the caller removes them
    assert {r["rule_id"] for r in store_rules.list_rules(store)} == {inside_both, only_wide, udp, on_edge2,
                                                                      admin_rule}
    assert ids.revoke_grant(narrow["grant_id"].lower()) == [inside_both, only_wide, udp]
    refused("not_found", ids.revoke_grant, narrow["grant_id"])
    assert ids.revoke_grant(other["grant_id"]) == [inside_both, only_wide, udp, on_edge2]


def test_removing_a_user_returns_their_rules_and_drops_their_grants(ids, alice, edge, store):
    ids.add_grant("alice", edge, 30000, 30010, ["tcp"])
    r1 = push(store, edge, "alice", 30001)
    r2 = push(store, edge, "alice", 30002)
    push(store, edge, "admin", 30003)
    token = ids.login("alice", ALICE_PW, remote_ip=IP).session_token
    assert ids.remove_user("alice") == [r1, r2]
    assert ids.list_grants() == []
    assert ids.authenticate_session(token) is None
    assert len(store_rules.list_rules(store, owner="alice")) == 2  # the caller removes them next


def test_a_deleted_client_takes_its_grants_along(ids, alice, edge, store):
    ids.add_grant("alice", edge, 1, 2, ["tcp"])
    clients.revoke_client(store, edge)
    clients.delete_client(store, edge)
    assert ids.list_grants() == []


def test_superadmin_grants_orphan_nothing(ids, admin, edge, store):
    g = ids.add_grant("admin", edge, 1, 2, ["tcp"])
    push(store, edge, "admin", 1)
    assert ids.revoke_grant(g["grant_id"]) == []


def test_no_secret_in_any_log_line_of_a_full_flow(ids, store, clock, logs):
    token = ids.start_onboarding()
    ids.complete_onboarding(token, "admin", "Admin", ADMIN_PW, remote_ip=IP)
    ids.create_user("alice", "Alice", "user", ALICE_PW)
    for _ in range(6):
        with pytest.raises(PortunusError):
            ids.login("alice", "wrong password secret", remote_ip=IP)
    clock.advance(3600)
    session = ids.login("alice", ALICE_PW, remote_ip=IP).session_token
    temp = ids.reset_password("alice")["temporary_password"]
    text = logs.getvalue()
    assert "auth.throttle_locked" in text and "identity.password_reset" in text
    assert "audit.redaction_violation" not in text
    for secret in (token, ADMIN_PW, ALICE_PW, "wrong password secret", session, temp):
        assert secret not in text


def test_module_constants_match_the_spec():
    assert (identity_mod.SETUP_TOKEN_TTL_SECS, identity_mod.SESSION_IDLE_SECS,
            identity_mod.SESSION_ABSOLUTE_SECS) == (1800, 8 * 3600, 7 * 86400)
    assert (identity_mod.THROTTLE_MAX_FAILURES, identity_mod.THROTTLE_WINDOW_SECS) == (5, 900)

"""Users, grants and recovery through the real `portunus-server` CLI (SPEC §5, §7.1, §7.2, seed 004):
offline onboarding-token, user-add from stdin, reset-password (--temporary / --password-stdin), the
grant commands with dependent-rule removal, exit codes (8 unknown user, 75 while serve runs), and no
secret anywhere it should not be."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import portunus_cmd
from cp import Server, write_server_toml

BASE_ENV = {"PORTUNUS_ALLOW_ANY_FS": "1"}
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
ALICE_PW = "alice password 0001"
USER_KEYS = {"user_id", "display_name", "role", "disabled", "password_change_required", "created_at"}
GRANT_KEYS = {"grant_id", "user_id", "client", "listen_port_start", "listen_port_end", "protocols", "note",
              "created_at"}


def cli(data_dir: Path, *args, stdin: str | None = None, timeout=60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PORTUNUS_SERVER", "PORTUNUS_OPERATOR_TOKEN")}
    env.update(BASE_ENV)
    return subprocess.run(portunus_cmd("server") + ["--data-dir", str(data_dir), *args], input=stdin or "",
                          capture_output=True, text=True, env=env, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return res


def failed(res: subprocess.CompletedProcess, exit_code: int, code: str) -> subprocess.CompletedProcess:
    assert res.returncode == exit_code, f"exit {res.returncode}, wanted {exit_code}:\n{res.stderr}"
    assert f"error: {code}: " in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    return res


def db_text(data_dir: Path) -> str:
    conn = sqlite3.connect(data_dir / "state.db")
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def login(data_dir: Path, user_id: str, password: str):
    """Log in with the store the CLI wrote (in-process, the server being stopped)."""
    from portunus.server.identity import IdentityService
    from portunus.store import Store
    with Store.open(str(data_dir)) as store:
        return IdentityService(store).login(user_id, password, remote_ip="127.0.0.1")


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PORTUNUS_ALLOW_ANY_FS", "1")
    d = tmp_path / "server"
    d.mkdir()
    return d


def test_onboarding_token_prints_a_fresh_token_stored_only_as_a_hash(data):
    first = ok(cli(data, "onboarding-token"))
    token = first.stdout.strip()
    assert TOKEN_RE.fullmatch(token), first.stdout
    assert "valid until" in first.stderr and token not in first.stderr
    second = ok(cli(data, "onboarding-token")).stdout.strip()
    assert second != token
    text = db_text(data)
    assert token not in text and second not in text


def test_user_add_list_get_remove_offline(data):
    res = ok(cli(data, "user-add", "alice", "--display-name", "Alice", "--password-stdin", "--format", "json",
                 stdin=ALICE_PW + "\n"))
    user = json.loads(res.stdout)
    assert set(user) == USER_KEYS and user["role"] == "user" and user["disabled"] is False
    assert ALICE_PW not in res.stdout + res.stderr
    ok(cli(data, "user-add", "root", "--display-name", "Root", "--role", "superadmin", "--password-stdin",
           stdin="root password 0001"))
    listed = json.loads(ok(cli(data, "user-list", "--format", "json")).stdout)
    assert [u["user_id"] for u in listed] == ["alice", "root"]
    text = ok(cli(data, "user-list")).stdout
    assert text.splitlines()[0].split() == ["USER_ID", "DISPLAY_NAME", "ROLE", "DISABLED", "CHANGE_REQUIRED",
                                            "CREATED_AT"]
    assert "alice" in text and "superadmin" in text
    assert "role: user" in ok(cli(data, "user-get", "alice")).stdout
    assert login(data, "alice", ALICE_PW).user["user_id"] == "alice"
    assert ALICE_PW not in db_text(data)

    failed(cli(data, "user-get", "nobody"), 8, "not_found")
    failed(cli(data, "user-remove", "nobody"), 8, "not_found")
    failed(cli(data, "user-add", "alice", "--display-name", "A", "--password-stdin", stdin=ALICE_PW), 9,
           "conflict.user_exists")
    failed(cli(data, "user-add", "_evil", "--display-name", "E", "--password-stdin", stdin=ALICE_PW), 2,
           "validation.reserved_user_id")
    failed(cli(data, "user-add", "Bob", "--display-name", "B", "--password-stdin", stdin=ALICE_PW), 2,
           "validation.invalid_user_id")
    short = failed(cli(data, "user-add", "bob", "--display-name", "B", "--password-stdin", stdin="elevenchars"),
                   3, "password_too_short")
    assert "elevenchars" not in short.stderr
    failed(cli(data, "user-add", "bob", "--display-name", "B", "--password-stdin", stdin="é" * 513), 3,
           "password_too_long")
    failed(cli(data, "user-add", "bob", "--display-name", "B", "--password-stdin", stdin=""), 2, "usage")
    failed(cli(data, "user-remove", "root"), 9, "conflict.last_superadmin")
    removed = json.loads(ok(cli(data, "user-remove", "alice", "--format", "json")).stdout)
    assert removed == {"removed_rule_ids": []}


def test_reset_password_temporary_then_login_requires_a_change(data):
    ok(cli(data, "user-add", "admin", "--display-name", "Admin", "--role", "superadmin", "--password-stdin",
           stdin="admin password 0001"))
    before = login(data, "admin", "admin password 0001")
    res = ok(cli(data, "reset-password", "admin", "--temporary"))
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("temporary_password=")
    temp = lines[0].split("=", 1)[1]
    assert len(temp) >= 12 and temp not in res.stderr
    assert "revoked 1 Web session(s)" in res.stderr
    assert temp not in db_text(data)
    from portunus.server.identity import IdentityService
    from portunus.store import Store
    with Store.open(str(data)) as store:
        ids = IdentityService(store)
        assert ids.authenticate_session(before.session_token) is None  # sessions revoked
        result = ids.login("admin", temp, remote_ip="127.0.0.1")
        assert result.password_change_required is True
        assert ids.authenticate_session(result.session_token).password_change_required is True

    res = ok(cli(data, "reset-password", "admin", "--password-stdin", stdin="chosen at 3 am!\n"))
    assert "temporary_password" not in res.stdout and "chosen at 3 am!" not in res.stdout + res.stderr
    assert login(data, "admin", "chosen at 3 am!").password_change_required is True


def test_reset_password_revokes_api_tokens_by_default(data):
    token = ok(cli(data, "bootstrap-superadmin", "--name", "Ops")).stdout.strip()
    from portunus.store import Store, operators
    res = json.loads(ok(cli(data, "reset-password", "_superadmin", "--temporary", "--keep-api-tokens",
                            "--format", "json")).stdout)
    assert res["api_tokens_revoked"] == 0 and res["user_id"] == "_superadmin"
    with Store.open(str(data)) as store:
        assert operators.authenticate_operator(store, token) is not None
    res = ok(cli(data, "reset-password", "_superadmin", "--temporary"))
    assert "1 API token(s)" in res.stderr
    with Store.open(str(data)) as store:
        assert operators.authenticate_operator(store, token) is None
    temp = res.stdout.strip().split("=", 1)[1]
    assert login(data, "_superadmin", temp).password_change_required is True


def test_reset_password_of_an_unknown_user_exits_8_and_needs_a_mode(data):
    ok(cli(data, "onboarding-token"))
    failed(cli(data, "reset-password", "ghost", "--temporary"), 8, "not_found")
    res = cli(data, "reset-password", "ghost")
    assert res.returncode == 2 and "--temporary" in res.stderr


def test_grant_commands_and_dependent_rules_offline(data):
    from portunus.model import Rule
    from portunus.store import Store, clients
    from portunus.store import rules as store_rules
    from portunus.store.ids import new_ulid
    ok(cli(data, "user-add", "alice", "--display-name", "Alice", "--password-stdin", stdin=ALICE_PW))
    with Store.open(str(data)) as store:
        edge = clients.create_client(store, "edge-1")["client_id"]

    grant_id = ok(cli(data, "grant-add", "--user-id", "alice", "--client", "edge-1", "--listen-port-start", "30000",
                      "--listen-port-end", "30010", "--protocols", "tcp,udp", "--note", "team A")).stdout.strip()
    star = json.loads(ok(cli(data, "grant-add", "--user-id", "alice", "--client", "*", "--listen-port-start",
                             "40000", "--listen-port-end", "40000", "--protocols", "udp", "--format",
                             "json")).stdout)
    assert set(star) == GRANT_KEYS and star["client"] == "*" and star["protocols"] == ["udp"]
    grants = json.loads(ok(cli(data, "grant-list", "--format", "json")).stdout)
    assert [g["grant_id"] for g in grants] == [grant_id, star["grant_id"]]
    assert grants[0]["client"] == edge and grants[0]["protocols"] == ["tcp", "udp"]
    table = ok(cli(data, "grant-list", "--user-id", "alice")).stdout
    assert "30000-30010" in table and "team A" in table

    failed(cli(data, "grant-add", "--user-id", "alice", "--client", edge, "--listen-port-start", "30010",
               "--listen-port-end", "30000", "--protocols", "tcp"), 2, "validation.grant_port_range_invalid")
    failed(cli(data, "grant-add", "--user-id", "alice", "--client", edge, "--listen-port-start", "1",
               "--listen-port-end", "2", "--protocols", "tcp,sctp"), 2, "validation.invalid_protocol")
    failed(cli(data, "grant-add", "--user-id", "nobody", "--client", edge, "--listen-port-start", "1",
               "--listen-port-end", "2", "--protocols", "tcp"), 8, "not_found")
    failed(cli(data, "grant-add", "--user-id", "alice", "--client", "edge-9", "--listen-port-start", "1",
               "--listen-port-end", "2", "--protocols", "tcp"), 8, "not_found")

    with Store.open(str(data)) as store:
        rule = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 30001, "target": "10.0.0.9:80"})
        inside = store_rules.insert_rule(store, rule, edge, "alice")["rule_id"]
    out = json.loads(ok(cli(data, "grant-revoke", grant_id, "--format", "json")).stdout)
    assert out == {"removed_rule_ids": [inside]}
    with Store.open(str(data)) as store:
        assert store_rules.list_rules(store) == []  # removed after the grant went
    failed(cli(data, "grant-revoke", grant_id), 8, "not_found")
    res = ok(cli(data, "grant-revoke", star["grant_id"]))
    assert "removed rules: none" in res.stdout


def test_offline_identity_commands_refuse_while_serve_runs(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    for args, stdin in ((("reset-password", "_legacy", "--temporary"), None),
                        (("reset-password", "_legacy", "--password-stdin"), "new password 0001"),
                        (("onboarding-token",), None)):
        res = failed(cli(data, *args, stdin=stdin), 75, "store_in_use")
        assert "temporary_password" not in res.stdout
    assert server.proc.p.poll() is None

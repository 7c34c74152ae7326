"""No password, setup token, session token or bearer token reaches a log line, an audit row, a URL, an
error message or the database (SPEC §5, issue 10). One scenario uses every kind of secret the
identity routes handle, right and wrong, then greps everything the processes wrote and the store."""

from __future__ import annotations

import json
import signal
import sqlite3

from cp import Server
from identity_env import ADMIN_PW, fresh_server, offline, onboard, secrets  # noqa: F401 - the fixture
from webapi import Web, bearer, call, setup_token


def _dump(data_dir) -> str:
    conn = sqlite3.connect(data_dir / "state.db", timeout=10)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def test_every_secret_used_stays_out_of_logs_audit_errors_and_the_store(secrets, tmp_path):  # noqa: F811
    server = fresh_server(secrets.track, tmp_path / "server")
    first_token = setup_token(server.proc)
    secrets.add(first_token)
    answers = []

    def seen(ans):
        answers.append(ans)
        return ans
    # wrong and missing setup tokens, a wrong password shape, then the real onboarding
    wrong_token = "wrong-setup-token-0000000000000000000000000"
    secrets.add(wrong_token)
    seen(call(server.api, "POST", "/v1/auth/onboarding", {"setup_token": wrong_token, "user_id": "admin",
                                                          "display_name": "Admin", "password": ADMIN_PW}))
    seen(call(server.api, "POST", "/v1/auth/onboarding", {"setup_token": first_token, "user_id": "admin",
                                                          "display_name": "Admin", "password": "tiny-pw"}))
    admin = onboard(server, secrets)
    # users with passwords, wrong logins, a logout, a reset over the API
    alice_pw, wrong_pw = "alice secret passphrase 1", "definitely-not-her-password"
    secrets.add(alice_pw, wrong_pw)
    seen(admin.request("POST", "/v1/users", {"user_id": "alice", "display_name": "Alice", "role": "user",
                                             "password": alice_pw}))
    seen(admin.request("POST", "/v1/users", {"user_id": "bob", "display_name": "Bob", "role": "user",
                                             "password": "x" * 2000}))
    for _ in range(3):
        seen(Web(server.api).login("alice", wrong_pw))
    seen(Web(server.api).login("nobody", wrong_pw))
    alice = Web(server.api)
    seen(alice.login("alice", alice_pw))
    secrets.add(alice.cookie)
    seen(alice.request("POST", "/v1/users/me/password", {"current_password": wrong_pw,
                                                         "new_password": "alice next passphrase 2"}))
    next_pw = "alice next passphrase 2"
    secrets.add(next_pw)
    seen(alice.request("POST", "/v1/users/me/password", {"current_password": alice_pw, "new_password": next_pw}))
    seen(alice.request("POST", "/v1/auth/logout"))
    seen(Web(server.api, cookie=alice.cookie).get("/v1/users/me"))  # the dead cookie
    reset = seen(admin.request("POST", "/v1/users/alice/password"))
    secrets.add(reset.body["temporary_password"])
    # a bearer from bootstrap-superadmin is not possible beside onboarding; a wrong bearer is
    wrong_bearer = "wrong-bearer-token-000000000000000000000000"
    secrets.add(wrong_bearer)
    seen(bearer(server.api, wrong_bearer, "GET", "/v1/users"))
    # a cookie in a Cookie header and a bearer at once
    seen(call(server.api, "GET", "/v1/users", headers={"Cookie": f"portunus_session={admin.cookie}",
                                                       "Authorization": f"Bearer {wrong_bearer}"}))
    # offline recovery: stop, reset, start again; the temporary password only on stdout
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    res = offline(server.data_dir, "reset-password", "admin", "--temporary")
    assert res.returncode == 0, res.stderr
    temporary = res.stdout.split("temporary_password=", 1)[1].split()[0]
    secrets.add(temporary)
    assert temporary not in res.stderr
    res = offline(server.data_dir, "reset-password", "alice", "--password-stdin", stdin="alice stdin passphrase 3\n")
    assert res.returncode == 0 and "alice stdin passphrase 3" not in res.stdout + res.stderr
    secrets.add("alice stdin passphrase 3")
    again = Server(secrets.track, server.data_dir)
    seen(Web(again.api).login("admin", temporary))

    for ans in answers:
        text = json.dumps(ans.body) + json.dumps({k: v for k, v in ans.headers.items() if k != "set-cookie"})
        for secret in secrets.values - {reset.body["temporary_password"]}:
            assert secret not in text, (ans.status, ans.body)
    store_text = _dump(server.data_dir)
    for secret in secrets.values:
        assert secret not in store_text
    audit = [line for line in store_text.splitlines() if "audit" in line.lower()]
    assert audit, "the scenario wrote audit rows"
    secrets.logs.append(("state.db audit rows", "\n".join(audit)))
    # the teardown of the `secrets` fixture greps every process log for all of the above

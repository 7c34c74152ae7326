"""`portunus-server demo` creates a superadmin for the Web UI (issue 11 "Demo"): the banner's URL, user
and password log in, and the session is a superadmin's; the bearer it prints still works."""

from __future__ import annotations

import re

from conftest import portunus_cmd
from demo_run import run_demo_to_ctrl_c
from webapi import Web, bearer


def test_the_demo_prints_a_web_login_that_works():
    seen = {}

    def check(text):
        found = re.search(r"Web UI\s+(http://127\.0\.0\.1:\d+)/\s+user (\S+), password (\S+)", text)
        assert found, text
        url, user_id, password = found.groups()
        web = Web(url)
        ans = web.login(user_id, password)
        assert ans.status == 200, ans.body
        seen["me"] = web.get("/v1/users/me").body
        seen["rules"] = web.get("/v1/rules").body
        token = re.search(r"bearer token (\S+)", text).group(1)
        seen["bearer"] = bearer(url, token, "GET", "/v1/users").body
    run_demo_to_ctrl_c(portunus_cmd("server") + ["demo"], on_running=check)
    assert seen["me"]["role"] == "superadmin" and seen["me"]["password_change_required"] is False
    assert [r["state"] for r in seen["rules"]["rules"]] == ["active"]
    assert seen["me"]["user_id"] in {u["user_id"] for u in seen["bearer"]["users"]}

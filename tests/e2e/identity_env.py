"""Shared pieces of the identity e2e tests: a server in onboarding, onboarding + admin login, restarts,
offline CLI runs, and the ``secrets`` fixture that checks every process log for the secrets used."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import portunus_cmd
from cp import Server, write_server_toml
from webapi import Secrets, Web, call, setup_token

ADMIN_PW = "admin password 0001"


def fresh_server(procs, data):
    """A server with no operator_token: it starts in onboarding."""
    write_server_toml(data)
    toml = (data / "server.toml").read_text()
    (data / "server.toml").write_text("\n".join(l for l in toml.splitlines() if not l.startswith("operator_token")))
    return Server(procs, data)


def restart(procs, server: Server) -> Server:
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    return Server(procs, server.data_dir)


def onboard(server: Server, secrets: Secrets) -> Web:
    token = setup_token(server.proc)
    secrets.add(token, ADMIN_PW)
    ans = call(server.api, "POST", "/v1/auth/onboarding", {"setup_token": token, "user_id": "admin",
                                                           "display_name": "Admin", "password": ADMIN_PW})
    assert ans.status == 201, ans.body
    web = Web(server.api)
    assert web.login("admin", ADMIN_PW).status == 200
    secrets.add(web.cookie)
    return web


def offline(data, *args, stdin=""):
    env = {k: v for k, v in os.environ.items() if k not in ("PORTUNUS_SERVER", "PORTUNUS_OPERATOR_TOKEN")}
    env["PORTUNUS_ALLOW_ANY_FS"] = "1"
    return subprocess.run(portunus_cmd("server") + ["--data-dir", str(data), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def secrets(procs):
    """Secrets used by the test; at teardown no process log (stderr or stdout) may hold one of them.

    Start processes with ``secrets.track`` (the ``procs`` fixture, recorded). The only line allowed
    to show a setup token is serve's own ``Portunus onboarding setup token: …`` banner.
    """
    found = Secrets()
    started = []

    def track(args, **kw):
        p = procs(args, **kw)
        started.append(p)
        return p
    found.track = track
    yield found
    for i, p in enumerate(started):
        found.logs.append((f"{' '.join(p.args[-2:])} #{i} stderr", "\n".join(p.lines)))
        found.logs.append((f"{' '.join(p.args[-2:])} #{i} stdout", p.stdout or ""))
    leaks = found.leaks()
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks)

"""A real server for the Web UI tests: onboarding through its setup token, a cookie API session, clients.

One server per test module (starting Chromium and a server per test would blow the ~2 minute
budget); every process started here is killed by ``Console.close``.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from conftest import Proc, portunus_cmd, wait_until

SETUP_TOKEN_LINE = re.compile(r"^Portunus onboarding setup token: ([A-Za-z0-9_-]{16,})\s*$")


class ApiSession:
    """The API as the browser uses it: the session cookie, X-Portunus-CSRF and Origin on writes."""

    def __init__(self, base: str):
        self.base = base
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.cookie: str | None = None

    def call(self, method: str, path: str, body=None, *, csrf: bool = True, headers: dict | None = None):
        hdrs = {"Accept": "application/json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if method != "GET" and csrf:
            hdrs.setdefault("X-Portunus-CSRF", "1")
            hdrs.setdefault("Origin", self.base)
        if self.cookie:
            hdrs["Cookie"] = self.cookie
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, "/v1/" + path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            for name, value in resp.getheaders():
                if name.lower() == "set-cookie" and value.startswith("portunus_session="):
                    self.cookie = value.split(";", 1)[0]
            ctype = resp.getheader("Content-Type") or ""
            payload = json.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
            return resp.status, payload
        finally:
            conn.close()

    def ok(self, method: str, path: str, body=None):
        status, payload = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path} -> {status} {payload}"
        return payload

    def login(self, user_id: str, password: str) -> dict:
        return self.ok("POST", "auth/login", {"user_id": user_id, "password": password})


class Console:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.procs: list[Proc] = []
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "server.toml").write_text(
            'control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
            'metrics_listen = "127.0.0.1:0"\nstats_report_interval_secs = 1\n')
        self.env = {"PORTUNUS_ALLOW_ANY_FS": "1"}
        self.server = self._start(portunus_cmd("server") + ["--data-dir", str(data_dir), "serve"], env=self.env)
        ready = self.server.wait_event("server.ready", timeout=30)
        self.base = ready["operator_http_url"]
        self.setup_token: str | None = None
        self.secrets: set[str] = set()  # everything that must never show up in browser storage or a URL

    def _start(self, args, env=None) -> Proc:
        proc = Proc(args, env=env)
        self.procs.append(proc)
        return proc

    def read_setup_token(self, timeout: float = 15.0) -> str:
        def find():
            for line in list(self.server.lines):
                m = SETUP_TOKEN_LINE.search(line)
                if m:
                    return m.group(1)
            return None
        self.setup_token = wait_until(find, timeout=timeout, what="the onboarding setup token on stderr")
        self.secrets.add(self.setup_token)
        return self.setup_token

    def identity_routes_present(self) -> bool:
        status, doc = ApiSession(self.base).call("GET", "openapi.json")
        return status == 200 and "/v1/auth/login" in json.dumps(doc.get("paths", {}))

    def run_client(self, command: str, tmp: Path, name: str) -> Proc:
        """``portunus-client enroll '<uri>'`` as the UI showed it, then the agent; returns the agent."""
        uri = command.split("'")[1]
        self.secrets.add(re.search(r"code=([^&']+)", uri).group(1))
        bundle = tmp / f"{name}.bundle.json"
        out = subprocess.run(portunus_cmd("client") + ["enroll", uri, "--out", str(bundle)], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        agent = self._start(portunus_cmd("client") + ["--bundle", str(bundle), "--reconnect-initial-delay-ms", "100",
                                                      "--reconnect-max-delay-secs", "1",
                                                      "--shutdown-drain-timeout-secs", "1"])
        agent.wait_event("control.connected", timeout=20)
        return agent

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.p.poll() is None:
                proc.signal(signal.SIGKILL)
            proc.kill()

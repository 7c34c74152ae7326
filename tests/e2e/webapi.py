"""An operator API client for identity tests: bearer or cookie, CSRF headers, raw status and headers.

``Web`` plays a browser: it keeps the ``portunus_session`` cookie from login and sends the
CSRF headers (Origin, X-Portunus-CSRF, JSON content type) on writes unless a test leaves
them out. ``Secrets`` collects every password, token and cookie a test used, so a check at
the end can grep the logs for them.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "portunus_session"
SETUP_TOKEN_LINE = re.compile(r"^Portunus onboarding setup token: (\S+)$")


@dataclass
class Answer:
    status: int
    body: object
    headers: dict  # lower-cased names

    @property
    def code(self) -> str | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err.get("code") if isinstance(err, dict) else None


def call(base: str, method: str, path: str, body=None, *, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 30.0) -> Answer:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = dict(headers or {})
        if data is not None and raw is None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read()
        out_headers = {}
        for name, value in resp.getheaders():
            key = name.lower()
            out_headers[key] = value if key not in out_headers else out_headers[key] + "\n" + value
        try:
            decoded = json.loads(text) if text else None
        except ValueError:
            decoded = text.decode(errors="replace")
        return Answer(resp.status, decoded, out_headers)
    finally:
        conn.close()


def bearer(base: str, token: str, method: str, path: str, body=None, **kw) -> Answer:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    return call(base, method, path, body, headers=headers, **kw)


@dataclass
class Web:
    """A browser-like session against one server."""

    base: str
    cookie: str | None = None
    origin: str | None = None

    def __post_init__(self):
        if self.origin is None:
            self.origin = self.base.rstrip("/")

    def request(self, method: str, path: str, body=None, *, csrf: bool = True, origin: str | None = None,
                headers: dict | None = None, raw: bytes | None = None) -> Answer:
        hdrs = {}
        if self.cookie is not None:
            hdrs["Cookie"] = f"{COOKIE}={self.cookie}"
        if csrf and method != "GET":
            hdrs["Origin"] = origin or self.origin
            hdrs["X-Portunus-CSRF"] = "1"
        hdrs.update(headers or {})
        return call(self.base, method, path, body, headers=hdrs, raw=raw)

    def login(self, user_id: str, password: str) -> Answer:
        ans = self.request("POST", "/v1/auth/login", {"user_id": user_id, "password": password})
        if ans.status == 200:
            self.cookie = session_cookie(ans)
        return ans

    def get(self, path: str) -> Answer:
        return self.request("GET", path)


def session_cookie(ans: Answer) -> str | None:
    for line in ans.headers.get("set-cookie", "").split("\n"):
        name, _, rest = line.partition("=")
        if name.strip() == COOKIE:
            value = rest.split(";", 1)[0]
            return value or None
    return None


def setup_token(proc) -> str:
    """The token `serve` printed on stderr (the newest one)."""
    proc.wait_event("server.ready", timeout=30)
    found = [m.group(1) for m in map(SETUP_TOKEN_LINE.match, list(proc.lines)) if m]
    assert found, "serve printed no onboarding setup token:\n" + proc.log_text()
    return found[-1]


@dataclass
class Secrets:
    """Every secret a test used, and the logs to check for them."""

    values: set = field(default_factory=set)
    logs: list = field(default_factory=list)  # (name, text)

    def add(self, *secrets) -> None:
        self.values.update(s for s in secrets if s)

    def leaks(self) -> list[str]:
        found = []
        for name, text in self.logs:
            for line in text.splitlines():
                if SETUP_TOKEN_LINE.match(line):
                    continue  # the one line whose job is to show the setup token
                for secret in self.values:
                    if secret in line:
                        found.append(f"{name}: {line[:300]}")
        return found

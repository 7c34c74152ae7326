"""Shared pieces of the traffic-quota e2e tests: users, grants and bearers on a real server, a raw
control peer that declares ``traffic_quota``, and HTTP calls as a given bearer."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from cp import OPERATOR_TOKEN, Server
from portunus.store.ids import hash_token
from rawpeer import RawPeer, enrolled_token

QUOTA_CAPS = ["udp", "multi_target", "port_range", "traffic_quota"]
VIEW_KEYS = {"user_id", "client_id", "client_name", "monthly_bytes", "billing_anchor", "current_period_started_at",
             "current_period_ends_at", "current_period_bytes_used", "budget_remaining_bytes", "exhausted",
             "exhausted_at", "last_report_at"}


def call(server: Server, method: str, path: str, body=None, token: str = OPERATOR_TOKEN, timeout: float = 15.0):
    """(status, decoded JSON or text) of one API request as ``token``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.api + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


def error_code(answer) -> str | None:
    status, body = answer
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


def add_user(server: Server, user_id: str) -> str:
    """Create a user over the API and give it an API bearer; returns the bearer.

    There is no API to mint a user's bearer (users log in with a password for a Web session),
    so the test writes one operator_tokens row, hashed, as bootstrap-superadmin does.
    """
    status, body = call(server, "POST", "/v1/users", {"user_id": user_id, "display_name": user_id.title(),
                                                      "role": "user", "password": f"{user_id} password 0001"})
    assert status == 201, body
    token = secrets.token_urlsafe(32)
    db = sqlite3.connect(Path(server.data_dir) / "state.db", timeout=10)
    with db:
        db.execute("INSERT INTO operator_tokens (token_hash, user_id, name, created_at) VALUES (?, ?, 'test', ?)",
                   (hash_token(token), user_id, "2026-01-01T00:00:00Z"))
    db.close()
    return token


def add_grant(server: Server, user_id: str, client: str, start: int = 1024, end: int = 65535) -> dict:
    status, body = call(server, "POST", "/v1/grants", {"user_id": user_id, "client": client,
                                                       "listen_port_start": start, "listen_port_end": end,
                                                       "protocols": ["tcp", "udp"]})
    assert status == 201, body
    return body


class QuotaPeer(RawPeer):
    """A raw enrolled client that declares traffic_quota and records every update it is sent."""

    def __init__(self, server: Server, tmp_path, name: str):
        self.client_id, self.token = enrolled_token(server, tmp_path, name)
        self.port = server.control_port
        self.updates: list[dict] = []
        self.replays: list[list[dict]] = []  # per connection: what came between welcome and replay_done

    def connect(self) -> "QuotaPeer":
        RawPeer.__init__(self, self.port)
        self.send({"type": "hello", "token": self.token, "protocol_version": 1, "client_version": "1.4.0-test",
                   "capabilities": QUOTA_CAPS})
        self.wait_for("welcome")
        seen = []
        while True:
            msg = self.next()
            seen.append(msg)
            if msg["type"] == "replay_done":
                break
        self.replays.append(seen)
        return self

    def next(self, timeout: float = 10.0) -> dict:
        msg = self.recv(timeout)
        if msg is None:
            raise AssertionError("the server closed the peer or sent nothing in time")
        if msg.get("type") == "ping":
            self.send({"type": "pong", "nonce": msg["nonce"]})
        if msg.get("type") == "traffic_quota_update":
            self.updates.append(msg)
        return msg

    def wait_update(self, pred=lambda msg: True, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.0, deadline - time.monotonic()))
            if msg.get("type") == "traffic_quota_update" and pred(msg):
                return msg

    def push_owned_rule(self, server: Server, token: str, body: dict) -> dict:
        """POST /v1/rules as ``token`` (the rule's owner) and answer the push as a real agent would."""
        import threading
        result = {}

        def post():
            result["answer"] = call(server, "POST", "/v1/rules", body, token=token)
        t = threading.Thread(target=post, daemon=True)
        t.start()
        while True:
            msg = self.next()
            if msg.get("type") == "rule_update" and msg.get("action") == "push":
                break
        self.send({"type": "rule_status", "rule_id": msg["rule_id"], "state": "active",
                   "request_id": msg.get("request_id")})
        t.join(20)
        assert result["answer"][0] == 201, result
        return result["answer"][1]

    def report(self, rule_id: str, bytes_in: int, bytes_out: int) -> None:
        self.send({"type": "stats_report", "at": time.time(),
                   "rules": [{"rule_id": rule_id, "bytes_in": bytes_in, "bytes_out": bytes_out}]})


def metric(text: str, row: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(row + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def scrape(server: Server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        return resp.read().decode()

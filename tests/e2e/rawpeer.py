"""A hand-driven control-protocol peer: real TLS, a real enrollment, frames written by the test.

Used to play a second (hostile) enrolled client against a real server.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

from conftest import portunus_cmd
from cp import OPERATOR_TOKEN, Server
from portunus.control.frames import encode


def enrolled_token(server: Server, tmp_path, name: str) -> tuple[str, str]:
    """enroll-client NAME + a real `client enroll`: (client_id, token) from the bundle."""
    res = server.cli("enroll-client", name, check=True)
    uri = res.stdout.strip().split("'")[1]
    bundle = tmp_path / f"{name}.raw.bundle.json"
    out = subprocess.run(portunus_cmd("client") + ["enroll", uri, "--out", str(bundle)],
                         capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    b = json.loads(bundle.read_text())
    return b["client_id"], b["token"]


class RawPeer:
    def __init__(self, port: int, timeout: float = 10.0):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw)
        self._buf = b""
        self.closed = False

    def send(self, msg) -> None:
        self.send_raw(encode(msg) if isinstance(msg, dict) else msg)

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            self.closed = True

    def recv(self, timeout: float = 10.0) -> dict | None:
        """The next frame, or None when the server closed (or nothing came in time)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 4:
                n = struct.unpack(">I", self._buf[:4])[0]
                if len(self._buf) >= 4 + n:
                    msg = json.loads(self._buf[4:4 + n])
                    self._buf = self._buf[4 + n:]
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk

    def wait_for(self, mtype: str, timeout: float = 10.0, pred=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(f"no {mtype} before {'close' if self.closed else 'timeout'}")
            if msg.get("type") == "ping":
                self.send({"type": "pong", "nonce": msg["nonce"]})
            if msg.get("type") == mtype and (pred is None or pred(msg)):
                return msg

    def hello(self, token: str) -> dict:
        self.send({"type": "hello", "token": token, "protocol_version": 1, "client_version": "raw-test",
                   "capabilities": ["udp", "multi_target", "port_range"]})
        welcome = self.wait_for("welcome")
        self.wait_for("replay_done")
        return welcome

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def api(server: Server, method: str, path: str, body=None, timeout: float = 15.0) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.api + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {OPERATOR_TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


def metrics(server: Server) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, row_prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(row_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def push_owned_rule(server: Server, peer: RawPeer, client_name: str, body: dict) -> dict:
    """POST /v1/rules to a raw peer's client and answer the push as a real agent would."""
    result: dict = {}

    def post():
        result["status"], result["body"] = api(server, "POST", "/v1/rules", {"client": client_name, **body})
    t = threading.Thread(target=post, daemon=True)
    t.start()
    push = peer.wait_for("rule_update", pred=lambda msg: msg.get("action") == "push")
    peer.send({"type": "rule_status", "rule_id": push["rule_id"], "state": "active",
               "request_id": push.get("request_id")})
    t.join(20)
    assert result.get("status") == 201, result
    return push


def server_pid(server: Server) -> int:
    return server.proc.p.pid


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")

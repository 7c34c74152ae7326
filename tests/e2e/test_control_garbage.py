"""Hostile or broken peers on the control port never take the server down."""

from __future__ import annotations

import json
import socket
import ssl
import struct

import pytest

from cp import Server, write_server_toml
from portunus.control.frames import encode


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def _tls(port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw)


def _closed(s) -> bool:
    """True when the server ends the connection (a TLS alert before the end is fine)."""
    s.settimeout(10)
    try:
        for _ in range(100):
            if not s.recv(65536):
                return True
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True
    return False


def _frames_until_close(s) -> list[dict]:
    """Read whatever frames arrive before the server closes the channel."""
    s.settimeout(10)
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (ConnectionResetError, ssl.SSLError, OSError):
        pass
    out = []
    while len(buf) >= 4:
        n = struct.unpack(">I", buf[:4])[0]
        out.append(json.loads(buf[4:4 + n]))
        buf = buf[4 + n:]
    return out


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",   # plain HTTP on the TLS port
    b"\x16\x03\x01\x00\x05garbage",          # a broken TLS record
    bytes(range(256)) * 8,                   # noise
])
def test_non_tls_garbage_is_dropped(server, payload):
    s = socket.create_connection(("127.0.0.1", server.control_port), timeout=10)
    s.sendall(payload)
    assert _closed(s)
    s.close()
    assert server.cli("list-clients").returncode == 0


def test_oversized_frame_is_refused_from_its_header(server):
    s = _tls(server.control_port)
    s.sendall(struct.pack(">I", 2 << 20))  # declares 2 MiB, sends nothing more
    assert _closed(s)
    s.close()
    assert server.proc.p.poll() is None


@pytest.mark.parametrize("frame", [
    struct.pack(">I", 9) + b"{not json",
    struct.pack(">I", 4) + b"[1,2",
    struct.pack(">I", 2) + b"[]",
    encode({"type": "rule_status", "rule_id": "x", "state": "active"}),  # not a first message
    encode({"type": "hello"}),                                            # missing fields
    encode({"type": "hello", "token": "nope", "protocol_version": 1, "client_version": "x",
            "capabilities": []}),                                          # unknown token
    encode({"type": "hello", "token": "nope", "protocol_version": 99, "client_version": "x",
            "capabilities": []}),                                          # future protocol
    encode({"type": "enroll", "code": "WRONGCODE", "client_version": "x"}),
])
def test_bad_first_frames_close_the_channel_and_leave_the_server_up(server, frame):
    s = _tls(server.control_port)
    s.sendall(frame)
    frames = _frames_until_close(s)
    s.close()
    # at most an error frame, never a welcome
    assert all(f.get("type") == "error" for f in frames), frames
    assert server.cli("list-clients").returncode == 0
    assert not server.proc.events("loop.callback_error")


def test_unknown_token_counts_an_auth_failure_in_metrics(server):
    import urllib.request
    s = _tls(server.control_port)
    s.sendall(encode({"type": "hello", "token": "x" * 43, "protocol_version": 1, "client_version": "t",
                      "capabilities": []}))
    frames = _frames_until_close(s)
    s.close()
    assert frames and frames[0]["type"] == "error" and frames[0]["code"] == "unauthenticated"
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'portunus_auth_failures_total{reason="invalid_token"} 1' in text
    assert "x" * 43 not in "\n".join(server.proc.lines)  # the token never reaches the log

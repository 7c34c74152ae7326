"""Transport limits: whole-request deadlines, the connection cap and who it evicts (issue 8 point 5)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from portunus.errors import PortunusError
from portunus.http import transport
from portunus.http.transport import (EVICT_AFTER_SECS, LIMITS_ENV, APIServer, DeadlineReader,
                                     DeadlineRequestHandler, Limits)


def test_limits_defaults_and_the_test_knob(monkeypatch):
    monkeypatch.delenv(LIMITS_ENV, raising=False)
    assert Limits.from_env() == Limits(10.0, 30.0, 256)
    assert Limits.from_env(max_connections=64).max_connections == 64
    monkeypatch.setenv(LIMITS_ENV, "header_secs=1.5, body_secs=2,max_connections=8")
    assert Limits.from_env(max_connections=64) == Limits(1.5, 2.0, 8)
    for bad in ("header_secs=soon", "max_connections=1.5", "threads=4"):
        monkeypatch.setenv(LIMITS_ENV, bad)
        with pytest.raises(PortunusError) as ei:
            Limits.from_env()
        assert ei.value.code == "config_invalid" and bad in ei.value.message


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_passed_deadline_stops_reading_even_with_data_waiting(pair):
    a, b = pair
    b.sendall(b"GET / HTTP/1.1\r\n")
    reader = DeadlineReader(a)
    reader.deadline = time.monotonic() - 1
    with pytest.raises(TimeoutError):
        reader.readinto(bytearray(64))


def test_before_the_deadline_data_is_read(pair):
    a, b = pair
    b.sendall(b"hello")
    reader = DeadlineReader(a)
    reader.deadline = time.monotonic() + 60
    buf = bytearray(64)
    assert reader.readinto(buf) == 5 and bytes(buf[:5]) == b"hello"


@pytest.fixture
def server():
    srv = APIServer(("127.0.0.1", 0), DeadlineRequestHandler, family=socket.AF_INET,
                    limits=Limits(10.0, 30.0, 2))
    yield srv
    srv.server_close()


def _track(srv, sock, age: float, waiting: bool):
    """Pretend ``sock`` is a connection the server admitted ``age`` seconds ago (no sleeping)."""
    srv._open[sock] = transport._Connection(time.monotonic() - age, waiting)


def test_the_cap_evicts_the_oldest_connection_waiting_for_headers(server, pair):
    old, young = socket.socketpair()
    busy_a, busy_b = socket.socketpair()
    try:
        _track(server, old, EVICT_AFTER_SECS + 5, True)
        _track(server, busy_a, EVICT_AFTER_SECS + 50, False)  # older, but being served: never cut
        _track(server, young, 0.0, True)                       # too young to be a dripper
        with server._conn_lock:
            assert server._evict_one_locked()
        assert old not in server._open and busy_a in server._open and young in server._open
        with server._conn_lock:
            assert not server._evict_one_locked()  # the rest are busy or young
    finally:
        for s in (old, young, busy_a, busy_b):
            s.close()


def test_a_full_listener_answers_503_at_once_without_a_thread(server, pair):
    a, b = pair
    held = [socket.socketpair() for _ in range(2)]
    try:
        for s, _ in held:
            _track(server, s, 100.0, False)
        server.process_request(a, ("127.0.0.1", 1))
        b.settimeout(5)
        reply = b.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert json.loads(body)["error"]["code"] == "server_busy"
        assert server.open_connections == 2
    finally:
        for s, t in held:
            s.close()
            t.close()


def test_each_listener_keeps_its_own_address_family():
    v4 = APIServer(("127.0.0.1", 0), DeadlineRequestHandler, family=socket.AF_INET, limits=Limits())
    try:
        assert v4.address_family == socket.AF_INET and "address_family" in vars(v4)
        assert APIServer.address_family == socket.AF_INET  # the class attribute is never written
    finally:
        v4.server_close()


def test_near_the_fd_limit_the_api_refuses_and_keeps_the_reserve(server, pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(transport, "fd_ceiling", lambda: a.fileno())
    server.process_request(a, ("127.0.0.1", 1))
    b.settimeout(5)
    assert b.recv(65536).startswith(b"HTTP/1.1 503 ")
    assert server.open_connections == 0


def test_the_fd_ceiling_sits_below_the_soft_limit():
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert transport.fd_ceiling() == max(soft - transport.FD_RESERVE, 0)


def test_binding_asks_no_reverse_lookup_of_the_address(monkeypatch):
    """HTTPServer.server_bind would call socket.getfqdn(host): a resolver round trip (its timeout
    on a host with a slow resolver) before serve is ready. The API's listeners never ask."""
    asked = []
    monkeypatch.setattr(socket, "getfqdn", lambda *a: asked.append(a) or "x")
    srv = APIServer(("127.0.0.1", 0), DeadlineRequestHandler, family=socket.AF_INET, limits=Limits())
    try:
        assert asked == []
        assert srv.server_name == "127.0.0.1" and srv.server_port == srv.server_address[1] > 0
    finally:
        srv.server_close()

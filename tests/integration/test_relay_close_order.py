"""How a relayed TCP connection ends, on a real loop with real sockets, splice and userspace.

Both directions can end in either order; the first end is a half-close (shutdown) towards the far
side, and when the second one ends the session closes both sockets, whose close carries the last
FIN. Every peer must see all its bytes, then a clean EOF (never a reset), and the session and its
descriptors must be gone.
"""

from __future__ import annotations

import socket

import pytest

from conftest import free_port, wait_until
from portunus.relay import pump
from test_runtime import LoopThread, tcp_rule

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["splice", "adaptive", "userspace"])
def lt(request, monkeypatch):
    if request.param == "userspace":
        monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", "1")  # read per new connection
    else:
        monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE", raising=False)
    if request.param == "splice":  # splice from the first byte, so these small messages take that path
        monkeypatch.setattr(pump, "SPLICE_AFTER", 0)
    x = LoopThread()
    yield x
    x.close()


def read_to_eof(s: socket.socket) -> bytes:
    s.settimeout(10)
    got = b""
    while True:
        b = s.recv(65536)  # a reset would raise here
        if not b:
            return got
        got += b


def relayed_pair(lt, listen, srv):
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    s, _ = srv.accept()
    return c, s


def live_sessions(lt, rule_id: str) -> int:
    return lt.call(lambda: lt.runtime.rules[rule_id].relay.active)


@pytest.mark.parametrize("first", ["client", "target"])
def test_either_side_may_end_first_and_both_see_every_byte_then_eof(lt, first):
    listen, target = free_port(), free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", target))
    srv.listen()
    try:
        lt.call(lt.runtime.activate, tcp_rule("co", listen, target))
        watched = lt.call(lt.loop.watched_fds)
        c, s = relayed_pair(lt, listen, srv)
        wait_until(lambda: live_sessions(lt, "co") == 1, timeout=5, what="the session")
        c.sendall(b"request " * 1000)
        s.sendall(b"response " * 1000)
        if first == "client":
            c.shutdown(socket.SHUT_WR)
            assert read_to_eof(s) == b"request " * 1000  # the half-close arrived after the bytes
            s.sendall(b"late reply")  # the target still talks after the client's EOF
            s.close()
            assert read_to_eof(c) == b"response " * 1000 + b"late reply"
            c.close()
        else:
            s.shutdown(socket.SHUT_WR)
            assert read_to_eof(c) == b"response " * 1000
            c.sendall(b"late request")
            c.close()
            assert read_to_eof(s) == b"request " * 1000 + b"late request"
            s.close()
        wait_until(lambda: live_sessions(lt, "co") == 0, timeout=5, what="the session to close")
        assert lt.call(lt.loop.watched_fds) == watched  # no interest left behind for the closed fds
    finally:
        srv.close()


def test_many_short_connections_leave_no_session_and_no_watched_fd(lt):
    listen, target = free_port(), free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", target))
    srv.listen(128)
    try:
        lt.call(lt.runtime.activate, tcp_rule("many", listen, target))
        watched = lt.call(lt.loop.watched_fds)
        for i in range(50):
            c, s = relayed_pair(lt, listen, srv)
            c.sendall(b"GET %d\n" % i)
            s.settimeout(10)
            assert s.recv(100) == b"GET %d\n" % i
            s.sendall(b"200 %d\n" % i)
            s.close()  # the target answers and closes, as with Connection: close
            assert read_to_eof(c) == b"200 %d\n" % i
            c.close()
        wait_until(lambda: live_sessions(lt, "many") == 0, timeout=10, what="every session to close")
        assert lt.call(lt.loop.watched_fds) == watched
        snap = lt.call(lt.runtime.snapshot, "many")
        assert snap["connections_total"] == 50 and snap["active_connections"] == 0
    finally:
        srv.close()

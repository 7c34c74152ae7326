"""The new-connection path's lean pieces hold the behaviour of what they replaced.

- ``splice.splice_disabled_by_env`` (asked by ``Enforcer.splice_allowed`` per new connection) reads
  PORTUNUS_DISABLE_SPLICE through os.environ's own store: the same answer as
  ``os.environ.get(...) == "1"`` for every value, set and unset at any time.
- ``Acceptor`` hands over C-level socket objects (``socket.SocketType``) built from the raw fd:
  non-blocking, the listener's family, every method the relay calls working on a real peer.
- ``Connect(..., plain=True)`` dials the same way and hands over the same kind of socket.
- On Linux a wakeup accepts what the listener's accept queue holds (TCP_INFO), never an accept
  that can only fail with EAGAIN; without TCP_INFO it accepts until EAGAIN as before.
- ``Ticket.bandwidth_capped`` follows every hot update of the rule's and the owner's caps.

Real loopback sockets on a real loop.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from portunus.loop import Loop
from portunus.model import Rule
from portunus import netio
from portunus.netio import Acceptor, Connect, _queue_length
from portunus.relay import enforce, splice
from portunus.relay.enforce import Enforcer
from portunus.relay.splice import splice_disabled_by_env

from test_netio import WAIT, listener, loop  # noqa: F401  (the same real-loop and listener fixtures)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("value", [None, "1", "0", "", "true", "1 ", " 1", "11"])
def test_the_cached_splice_switch_answers_as_the_environment_does(value, monkeypatch):
    monkeypatch.setattr(enforce, "_LINUX_SPLICE", True)
    enf = Enforcer(Loop())
    plain = Rule.from_dict({"rule_id": "p", "listen_port": 18000, "target": "127.0.0.1:80"})
    try:
        assert enf.splice_allowed(plain)  # made before the variable changes: nothing is read at start
        if value is None:
            monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE", raising=False)
        else:
            monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", value)
        assert splice_disabled_by_env() is (os.environ.get("PORTUNUS_DISABLE_SPLICE") == "1")
        assert enf.splice_allowed(plain) is (value != "1")
        os.environ.pop("PORTUNUS_DISABLE_SPLICE", None)  # and back, on the same enforcer
        assert enf.splice_allowed(plain)
    finally:
        enf.loop.close()


def test_the_plain_environment_read_is_the_fallback(monkeypatch):
    monkeypatch.setattr(enforce, "_LINUX_SPLICE", True)
    monkeypatch.setattr(splice, "_ENV_STORE", None)  # a Python whose os.environ has no _data
    enf = Enforcer(Loop())
    plain = Rule.from_dict({"rule_id": "p", "listen_port": 18000, "target": "127.0.0.1:80"})
    try:
        monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", "1")
        assert not enf.splice_allowed(plain)
        monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE")
        assert enf.splice_allowed(plain)
    finally:
        enf.loop.close()


def test_accepted_sockets_are_non_blocking_c_sockets_that_carry_bytes_both_ways(loop, listener):
    accepted = []
    acc = Acceptor(loop, listener, lambda s, a: accepted.append((s, a)))
    acc.start()
    peer = socket.create_connection(listener.getsockname(), timeout=2)
    try:
        assert loop.run_until(lambda: accepted, WAIT)
        (s, addr), = accepted
        assert type(s) is socket.SocketType
        assert s.getblocking() is False and s.family == socket.AF_INET and s.type == socket.SOCK_STREAM
        assert addr == peer.getsockname() and s.getpeername() == peer.getsockname()
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        peer.sendall(b"ping")
        assert loop.run_until(lambda: _readable(s), WAIT)
        assert s.recv(16) == b"ping"
        assert s.send(b"pong") == 4
        assert peer.recv(16) == b"pong"
        s.shutdown(socket.SHUT_WR)  # the half-close the pumps use
        assert peer.recv(16) == b""
        peer.sendall(b"after")  # the other direction stays open
        assert loop.run_until(lambda: _readable(s), WAIT)
        assert s.recv(16) == b"after"
        fd = s.fileno()
        s.close()
        assert s.fileno() == -1
        with pytest.raises(OSError):
            os.fstat(fd)  # the descriptor is gone, not leaked
    finally:
        peer.close()
        for s, _ in accepted:
            s.close()


def _readable(s) -> bool:
    try:
        return bool(s.recv(16, socket.MSG_PEEK))  # consumes nothing
    except BlockingIOError:
        return False


def test_a_batch_of_accepts_hands_over_each_connection_once(loop, listener):
    accepted = []
    acc = Acceptor(loop, listener, lambda s, a: accepted.append(s))
    acc.start()
    peers = [socket.create_connection(listener.getsockname(), timeout=2) for _ in range(5)]
    try:
        assert loop.run_until(lambda: len(accepted) == 5, WAIT)
        assert sorted(s.getpeername() for s in accepted) == sorted(p.getsockname() for p in peers)
        assert len({s.fileno() for s in accepted}) == 5
    finally:
        for s in peers + accepted:
            s.close()


@pytest.mark.parametrize("plain", [True, False])
def test_a_plain_dial_connects_like_the_wrapped_one(loop, listener, plain):
    got = []
    Connect(loop, "127.0.0.1", listener.getsockname()[1], 2.0, lambda s, r: got.append((s, r)), plain=plain)
    try:
        assert loop.run_until(lambda: got, WAIT)
        (sock, reason), = got
        assert reason is None
        assert (type(sock) is socket.SocketType) is plain
        assert isinstance(sock, socket.SocketType) and sock.getblocking() is False
        server, _ = listener.accept()
        try:
            assert sock.send(b"x") == 1
            server.settimeout(2)
            assert server.recv(1) == b"x"
        finally:
            server.close()
    finally:
        for s, _ in got:
            if s is not None:
                s.close()


def test_a_plain_dial_to_a_closed_port_reports_the_refusal(loop):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # bound then closed: nothing listens there
    got = []
    Connect(loop, "127.0.0.1", port, 2.0, lambda s, r: got.append((s, r)), plain=True)
    assert loop.run_until(lambda: got, WAIT)
    assert got == [(None, "ECONNREFUSED")]


def test_a_tickets_bandwidth_flag_follows_every_hot_update_of_its_rule_and_owner():
    from portunus.model import RateLimit
    from portunus.relay.limiter_book import LimiterBook
    bw = RateLimit.from_dict({"bandwidth_in_bps": 1000})
    conns = RateLimit.from_dict({"concurrent_connections": 5})
    book = LimiterBook("edge")
    book.set_rule("free", owner=None, cap=None, now=0.0)   # admitted on the uncapped, ownerless fast path
    book.set_rule("owned", owner="alice", cap=None, now=0.0)
    free, owned = book.admit("free", "tcp", 0.0), book.admit("owned", "tcp", 0.0)
    assert not free.bandwidth_capped and not owned.bandwidth_capped
    book.set_rule("free", owner=None, cap=bw, now=1.0)
    assert free.bandwidth_capped
    book.set_rule("free", owner=None, cap=conns, now=2.0)  # a cap without bandwidth: not capped
    assert not free.bandwidth_capped
    book.set_owner_cap("alice", bw, 3.0)                   # an envelope installed after admission
    assert owned.bandwidth_capped and not free.bandwidth_capped
    book.set_owner_cap("alice", conns, 4.0)
    assert not owned.bandwidth_capped
    book.set_owner_cap("alice", bw, 5.0)
    book.remove_owner_cap("alice", 6.0)
    assert not owned.bandwidth_capped
    book.set_rule("owned", owner="alice", cap=bw, now=7.0)
    assert owned.bandwidth_capped
    assert [lim.has_bandwidth_cap for lim in (book.rules["free"], book.rules["owned"])] == [False, True]


class CountingListener(socket.socket):
    """A real listening socket that counts the raw accepts the Acceptor makes."""

    def _accept(self):
        self.accepts = getattr(self, "accepts", 0) + 1
        return super()._accept()


@pytest.fixture
def counting_listener():
    s = CountingListener(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


def queue_filled(lsock, n: int) -> bool:
    return _queue_length(lsock) == n


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="the accept queue length is read on Linux")
@pytest.mark.parametrize("batch, per_wakeup", [(64, [5]), (2, [2, 2, 1])])
def test_a_wakeup_accepts_what_the_queue_holds_without_a_failing_accept(counting_listener, batch, per_wakeup):
    lsock = counting_listener
    accepted = []
    acc = Acceptor(FakeLoop(), lsock, lambda s, a: accepted.append(s), batch=batch)
    acc.start()
    assert acc._queued and _queue_length(lsock) == 0
    peers = [socket.create_connection(lsock.getsockname(), timeout=2) for _ in range(5)]
    try:
        deadline = time.monotonic() + WAIT
        while not queue_filled(lsock, 5) and time.monotonic() < deadline:
            time.sleep(0.01)  # the handshakes complete in the kernel
        assert queue_filled(lsock, 5)
        seen = []
        for _ in per_wakeup:
            before = len(accepted)
            acc._on_readable()  # what the loop calls when the listener is readable
            seen.append(len(accepted) - before)
        assert seen == per_wakeup
        assert lsock.accepts == 5  # never an accept that could only fail with EAGAIN
        assert sorted(s.getpeername() for s in accepted) == sorted(p.getsockname() for p in peers)
        acc._on_readable()  # a wakeup that finds the queue empty: one accept finds out, quietly
        assert lsock.accepts == 6 and len(accepted) == 5
    finally:
        for s in peers + accepted:
            s.close()


def test_without_the_queue_length_a_wakeup_accepts_until_eagain(counting_listener, monkeypatch):
    monkeypatch.setattr(netio, "_TCP_INFO", None)  # as where TCP_INFO is missing
    lsock = counting_listener
    accepted = []
    acc = Acceptor(FakeLoop(), lsock, lambda s, a: accepted.append(s))
    acc.start()
    assert not acc._queued
    peers = [socket.create_connection(lsock.getsockname(), timeout=2) for _ in range(3)]
    try:
        deadline = time.monotonic() + WAIT
        while len(accepted) < 3 and time.monotonic() < deadline:
            acc._on_readable()
            time.sleep(0.01)
        assert len(accepted) == 3
        assert all(type(s) is socket.SocketType and s.getblocking() is False for s in accepted)
    finally:
        for s in peers + accepted:
            s.close()


class FakeLoop:
    """Only what an Acceptor asks of its loop outside a back-off."""

    def add_reader(self, fd, cb):
        pass

    def remove_reader(self, fd):
        pass

"""A splice-allowed connection starts in userspace and moves to splice on its first big read
(relay/pump.py ``SPLICE_AFTER``), on a real loop with real sockets: small messages are copied, bulk
splices from its first big read on, and no byte is lost, reordered or miscounted across the switch."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading

import pytest

from conftest import free_port, wait_until
from portunus.relay import pump
from portunus.relay.splice import splice_available
from test_relay_close_order import live_sessions, read_to_eof, relayed_pair
from test_runtime import LoopThread, tcp_rule

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not splice_available(), reason="splice is Linux only")]


@pytest.fixture
def lt(monkeypatch):
    monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE", raising=False)
    x = LoopThread()
    yield x
    x.close()


def pump_modes(lt, rule_id: str) -> tuple[bool, bool]:
    def read():
        (session,) = lt.runtime.rules[rule_id].relay.sessions
        inbound, outbound = session.pumps
        return inbound.splice, outbound.splice
    return lt.call(read)


@contextlib.contextmanager
def one_session(lt, rule_id: str):
    """A rule to a fresh target, one relayed connection: (client side, target side)."""
    listen, target = free_port(), free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", target))
    srv.listen()
    try:
        lt.call(lt.runtime.activate, tcp_rule(rule_id, listen, target))
        c, s = relayed_pair(lt, listen, srv)
        wait_until(lambda: live_sessions(lt, rule_id) == 1, timeout=5, what="the session")
        yield c, s
    finally:
        srv.close()


def recv_exact(s: socket.socket, n: int) -> bytes:
    s.settimeout(10)
    got = bytearray()
    while len(got) < n:
        b = s.recv(min(1 << 20, n - len(got)))
        assert b, f"EOF after {len(got)} of {n} bytes"
        got += b
    return bytes(got)


def test_small_messages_copy_then_bulk_splices_and_every_byte_arrives_in_order(lt):
    with one_session(lt, "up") as (c, s):
        for i in range(20):  # request/response sized messages: both pumps stay in userspace
            c.sendall(b"GET /%d\r\n" % i)
            assert recv_exact(s, len(b"GET /%d\r\n" % i)) == b"GET /%d\r\n" % i
            s.sendall(b"200 %d\r\n" % i)
            assert recv_exact(c, len(b"200 %d\r\n" % i)) == b"200 %d\r\n" % i
        assert pump_modes(lt, "up") == (False, False)

        up_bulk, down_bulk = os.urandom(4 << 20), os.urandom(3 << 20) + b"tail"
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("down", recv_exact(c, len(down_bulk))))
        t.start()
        sender = threading.Thread(target=s.sendall, args=(down_bulk,))
        sender.start()
        c.sendall(up_bulk)
        got_up = recv_exact(s, len(up_bulk))
        sender.join(10)
        t.join(10)
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up_bulk).digest()
        assert hashlib.sha256(box["down"]).digest() == hashlib.sha256(down_bulk).digest()
        assert pump_modes(lt, "up") == (True, True)  # both directions saw a big read

        c.sendall(b"after")  # the switched pumps still carry small messages and the close
        assert recv_exact(s, 5) == b"after"
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(s) == b""
        s.sendall(b"bye")
        s.close()
        assert read_to_eof(c) == b"bye"
        c.close()
        wait_until(lambda: live_sessions(lt, "up") == 0, timeout=5, what="the session to close")
        snap = lt.call(lt.runtime.snapshot, "up")
        small_in = sum(len(b"GET /%d\r\n" % i) for i in range(20))
        small_out = sum(len(b"200 %d\r\n" % i) for i in range(20))
        assert snap["bytes_in"] == small_in + len(up_bulk) + 5
        assert snap["bytes_out"] == small_out + len(down_bulk) + 3


def test_a_threshold_of_zero_splices_from_the_first_byte(lt, monkeypatch):
    monkeypatch.setattr(pump, "SPLICE_AFTER", 0)
    with one_session(lt, "zero") as (c, s):
        assert pump_modes(lt, "zero") == (True, True)
        c.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
        c.close()
        s.close()


def test_without_splice_a_big_read_stays_in_userspace(lt, monkeypatch):
    monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", "1")
    with one_session(lt, "nosplice") as (c, s):
        blob = os.urandom(1 << 20)
        c.sendall(blob)
        assert hashlib.sha256(recv_exact(s, len(blob))).digest() == hashlib.sha256(blob).digest()
        assert pump_modes(lt, "nosplice") == (False, False)
        c.close()
        s.close()

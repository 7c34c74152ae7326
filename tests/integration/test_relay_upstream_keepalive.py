"""The upstream socket of a relayed TCP connection: TCP_NODELAY at once, keepalive within the deferral.

docs/standalone.md promises TCP keepalive on both sockets of a forwarded connection (first probe
after 300 s idle, every 30 s, 4 probes). The accepted side inherits it from the listener; the
dialed side gets TCP_NODELAY when it connects and keepalive from one sweep per deferral
(``RelayContext.keepalive_later``), so a connection shorter than that never pays four setsockopt
calls. A real loop, real loopback sockets, the deferral shortened so the test does not wait 1 s.
"""

from __future__ import annotations

import socket

import pytest

from conftest import free_port
from portunus.loop import Loop
from portunus.model import Rule
from portunus.relay import context
from portunus.relay.context import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, RelayContext
from portunus.relay.stats import RuleCounters
from portunus.relay.tcp import TcpRuleRelay

pytestmark = pytest.mark.timeout(20)
WAIT = 5.0  # upper bound for run_until: only reached when the behaviour is broken


@pytest.fixture
def relay(monkeypatch):
    monkeypatch.setattr(context, "KEEPALIVE_DEFER", 0.05)
    loop = Loop()
    ctx = RelayContext(loop)
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(16)
    rule = Rule.from_dict({"rule_id": "ka", "listen_port": free_port(), "listen_host": "127.0.0.1",
                           "target": f"127.0.0.1:{target.getsockname()[1]}"})
    r = TcpRuleRelay(ctx, rule, RuleCounters(rule.listen_ports))
    r.bind()
    r.start()
    yield r, target
    r.close_listeners()
    r.abort_sessions()
    target.close()
    ctx.close()
    loop.close()


def keepalive_of(s) -> tuple:
    return (s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


PROMISED = (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)


def peek(s) -> bool:
    try:
        return bool(s.recv(16, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def connected_session(r, loop):
    c = socket.create_connection(("127.0.0.1", r.rule.listen_port), timeout=5)
    assert loop.run_until(lambda: any(s.pumps for s in r.sessions), WAIT)
    (session,) = [s for s in r.sessions if s.pumps]
    return c, session


def test_a_live_upstream_gets_nodelay_at_once_and_the_promised_keepalive_within_the_deferral(relay):
    r, target = relay
    loop = r.ctx.loop
    c, session = connected_session(r, loop)
    srv, _ = target.accept()
    try:
        up = session.up
        assert up.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert up in r.ctx.keepalive_pending
        assert loop.run_until(lambda: up not in r.ctx.keepalive_pending, WAIT)
        assert keepalive_of(up) == PROMISED
        assert keepalive_of(session.csock) == PROMISED  # inherited from the listener
        c.sendall(b"ping")  # and the connection still relays (the loop runs in this thread)
        srv.setblocking(False)
        assert loop.run_until(lambda: peek(srv), WAIT)
        assert srv.recv(16) == b"ping"
    finally:
        c.close()
        srv.close()


def test_a_connection_that_ends_before_the_sweep_leaves_nothing_behind(relay):
    r, target = relay
    loop = r.ctx.loop
    c, session = connected_session(r, loop)
    srv, _ = target.accept()
    up = session.up
    assert up in r.ctx.keepalive_pending
    c.close()
    srv.close()
    assert loop.run_until(lambda: not r.sessions, WAIT)
    assert up.fileno() == -1 and up not in r.ctx.keepalive_pending
    # the sweep still runs (other connections may be due) and finds nothing of this one
    c2, session2 = connected_session(r, loop)
    srv2, _ = target.accept()
    try:
        assert r.ctx.keepalive_pending == {session2.up}
        assert loop.run_until(lambda: not r.ctx.keepalive_pending, WAIT)
        assert keepalive_of(session2.up) == PROMISED
    finally:
        c2.close()
        srv2.close()


def test_many_connections_dialed_in_one_deferral_are_swept_together(relay):
    r, target = relay
    loop = r.ctx.loop
    clients = [socket.create_connection(("127.0.0.1", r.rule.listen_port), timeout=5) for _ in range(5)]
    servers = []
    try:
        assert loop.run_until(lambda: sum(1 for s in r.sessions if s.pumps) == 5, WAIT)
        servers = [target.accept()[0] for _ in range(5)]
        ups = [s.up for s in r.sessions]
        assert loop.run_until(lambda: not r.ctx.keepalive_pending, WAIT)
        assert [keepalive_of(u) for u in ups] == [PROMISED] * 5
    finally:
        for s in clients + servers:
            s.close()

"""The relay session dials the upstream itself (``netio.Dialer``) and owns its whole lifecycle.

- ``Dialer``: ``dialed`` once per dial, from the loop; a redial from inside ``dialed`` works;
  ``cancel_dial`` before any dial or after the hand-over is a no-op, in flight it closes the
  socket and ``dialed`` never runs.
- ``TcpSession`` (through a real ``TcpRuleRelay``): a refused address fails over to the next
  target; no socket for the upstream (EMFILE) ends the client's connection and gives back the
  session, its count and its admission; the last session of a draining relay calls ``on_idle``
  once; one target's order is handed out as is and never changed by the sessions using it.
- ``Ticket.bandwidth_capped`` of a fixed chain (owner envelope, rule) follows the envelope.

Real loopback sockets on a real loop.
"""

from __future__ import annotations

import socket

import pytest

from conftest import free_port
from portunus.loop import Loop
from portunus.model import Rule
from portunus.netio import Dialer
from portunus.relay.context import RelayContext
from portunus.relay.limits import Limiter, Ticket
from portunus.relay.stats import RuleCounters
from portunus.relay.tcp import TcpRuleRelay, TcpSession

from test_netio import WAIT, listener, loop  # noqa: F401  (the same real-loop and listener fixtures)
from epoll_record import CountingEpoll

pytestmark = pytest.mark.timeout(15)


class Redialer(Dialer):
    """Dials each address in turn until one connects (what a session does across targets)."""

    __slots__ = ("lp", "addrs", "outcomes")

    def __init__(self, loop, addrs):
        self.lp = loop
        self.addrs = list(addrs)
        self.outcomes = []
        self.dial_done = True  # nothing in flight yet
        self.next()

    def next(self):
        ip, port = self.addrs.pop(0)
        self.dial(self.lp, ip, port, 2.0, None, True)

    def dialed(self, sock, reason):
        self.outcomes.append((sock, reason))
        if sock is None and self.addrs:
            self.next()  # from inside dialed: the next dial starts at once


def test_a_dialer_reports_each_dial_once_and_may_redial_from_inside_dialed(loop, listener):
    d = Redialer(loop, [("127.0.0.1", free_port()), ("127.0.0.1", listener.getsockname()[1])])
    assert d.outcomes == []  # never from inside dial
    assert loop.run_until(lambda: len(d.outcomes) == 2, WAIT)
    (none, refused), (sock, ok) = d.outcomes
    try:
        assert none is None and refused == "ECONNREFUSED"
        assert ok is None and sock.getpeername() == listener.getsockname()
        assert isinstance(sock, socket.SocketType) and sock.getblocking() is False
        assert loop.watched_fds() == 1  # handed over: only the loop's own wake-up pipe
        d.cancel_dial()  # after the hand-over: nothing to cancel, the socket stays the owner's
        assert sock.fileno() >= 0
    finally:
        sock.close()
    loop.run_until(lambda: False, 0.1)
    assert len(d.outcomes) == 2  # and nothing more arrives


def test_cancel_dial_before_any_dial_is_harmless_and_in_flight_closes_without_a_report(loop, listener):
    class Idle(Dialer):
        __slots__ = ("got",)

        def dialed(self, sock, reason):
            self.got.append((sock, reason))

    d = Idle()
    d.got = []
    d.dial_done = True
    d.cancel_dial()  # no dial yet
    d.dial(loop, "127.0.0.1", listener.getsockname()[1], 2.0)
    sock = d.dial_sock
    d.cancel_dial()
    assert sock.fileno() == -1 and loop.watched_fds() == 1
    assert loop.run_until(lambda: d.got, 0.2) is False
    d.cancel_dial()  # twice: still nothing


# ---------------------------------------------------------------- sessions on a real relay

@pytest.fixture
def upstream():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s
    s.close()


def make_relay(loop, targets, **ctx_options):
    ctx = RelayContext(loop, **ctx_options)
    rule = Rule.from_dict({"rule_id": "s", "listen_port": free_port(), "listen_host": "127.0.0.1",
                           "targets": targets})
    relay = TcpRuleRelay(ctx, rule, RuleCounters(rule.listen_ports))
    relay.bind()
    relay.start()
    return relay


def stop(relay):
    relay.close_listeners()
    relay.abort_sessions()
    relay.ctx.close()


def recv_all(sock) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_refused_first_target_fails_over_to_the_next_and_the_bytes_flow(loop, upstream):
    dead = free_port()
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": dead, "priority": 1},
                              {"host": "127.0.0.1", "port": upstream.getsockname()[1], "priority": 2}])
    try:
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: any(s.pumps for s in relay.sessions), WAIT)
        srv, _ = upstream.accept()
        c.sendall(b"ping")
        srv.settimeout(5)
        assert loop.run_until(lambda: relay.counters.total("bytes_in") == 4, WAIT)
        assert srv.recv(16) == b"ping"
        assert relay.counters.connect_failures == 1
        c.close()
        srv.close()
        assert loop.run_until(lambda: not relay.sessions, WAIT)
        assert relay.counters.total("active_connections") == 0
        assert relay.ctx.enforcer.limits.rules["s"].concurrent == 0
    finally:
        stop(relay)


def test_no_socket_for_the_upstream_ends_the_client_and_gives_everything_back(loop, upstream, monkeypatch):
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": upstream.getsockname()[1]}])

    def no_fds(self, *args):
        raise OSError(24, "Too many open files")  # EMFILE, from creating the upstream socket
    try:
        monkeypatch.setattr(TcpSession, "dial", no_fds)
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: relay.counters.total("connections_total") == 1 and not relay.sessions, WAIT)
        assert recv_all(c) == b""  # closed, nothing relayed
        c.close()
        assert relay.counters.total("active_connections") == 0
        assert relay.ctx.enforcer.limits.rules["s"].concurrent == 0
        monkeypatch.undo()
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: any(s.pumps for s in relay.sessions), WAIT)  # and the next one dials
        c.close()
    finally:
        stop(relay)


def test_the_last_session_of_a_draining_relay_calls_on_idle_once(loop, upstream):
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": upstream.getsockname()[1]}])
    idle = []
    try:
        clients = [socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5) for _ in range(3)]
        assert loop.run_until(lambda: len([s for s in relay.sessions if s.pumps]) == 3, WAIT)
        servers = [upstream.accept()[0] for _ in range(3)]
        relay.close_listeners()
        relay.on_idle = lambda: idle.append(len(relay.sessions))
        for c, s in zip(clients, servers):
            c.close()
            s.close()
        assert loop.run_until(lambda: idle, WAIT)
        loop.run_until(lambda: False, 0.1)
        assert idle == [0] and relay.on_idle is None
    finally:
        stop(relay)


def test_one_targets_order_is_handed_out_as_is_and_no_session_changes_it(loop, upstream):
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": upstream.getsockname()[1]}])
    order = relay.targets.candidates()
    before = list(order)
    try:
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
            assert loop.run_until(lambda: any(s.pumps for s in relay.sessions), WAIT)
            srv, _ = upstream.accept()
            c.close()
            srv.close()
            assert loop.run_until(lambda: not relay.sessions, WAIT)
        assert relay.targets.candidates() is order and order == before
        assert order[0].connections == 3
    finally:
        stop(relay)


def test_a_fixed_chain_ticket_follows_its_owner_envelope():
    from portunus.model import RateLimit
    bw = RateLimit.from_dict({"bandwidth_out_bps": 1000})
    owner = Limiter("c", None, "alice", None, 0.0)
    rule = Limiter("c", "r", "alice", None, 0.0)
    live = {"alice": 1}
    ticket = Ticket((owner, rule), rule, live)
    assert not ticket.bandwidth_capped
    owner.update(bw, 1.0)
    assert ticket.bandwidth_capped
    owner.update(None, 2.0)
    rule.update(bw, 2.0)
    assert ticket.bandwidth_capped
    rule.update(None, 3.0)
    assert not ticket.bandwidth_capped
    ticket.release(3.0)
    assert live == {} and rule.concurrent == -1  # the count the book would have raised at admit


def test_a_dialer_that_hands_over_its_writer_leaves_the_interest_to_dialed(loop, listener):
    """``hands_over_writer``: ``dialed`` gets the socket still watched for writing and replaces
    that interest itself (``set_reader``); the dialer's callback is never run again."""
    class Handing(Dialer):
        __slots__ = ("got", "reads", "wakes")
        hands_over_writer = True

        def _dial_writable(self):
            self.wakes += 1
            super()._dial_writable()

        def dialed(self, sock, reason):
            self.got.append((sock, reason))
            if sock is not None:
                loop.set_reader(sock, lambda: self.reads.append(sock.recv(16)))

    d = Handing()
    d.got, d.reads, d.wakes = [], [], 0
    d.dial(loop, "127.0.0.1", listener.getsockname()[1], 2.0, None, True)
    assert loop.run_until(lambda: d.got, WAIT)
    (sock, reason), = d.got
    srv = None
    try:
        assert reason is None and loop.watched_fds() == 2  # the wake-up pipe and this socket
        srv, _ = listener.accept()
        srv.sendall(b"hello")
        assert loop.run_until(lambda: d.reads, WAIT)
        loop.run_until(lambda: False, 0.1)
        assert d.reads == [b"hello"] and len(d.got) == 1
        assert d.wakes == 1  # the writable socket no longer wakes the dialer
    finally:
        loop.forget(sock, True)
        sock.close()
        if srv is not None:
            srv.close()


# ---------------------------------------------------------------- DialDeadlines

class Clock:
    """A loop's time and call_later, moved by hand."""

    def __init__(self):
        self.now = 100.0
        self.timers = []

    def time(self):
        return self.now

    def call_later(self, delay, cb, *args):
        t = [self.now + delay, cb, args, False]
        self.timers.append(t)

        class Handle:
            def cancel(_self):
                t[3] = True
        return Handle()

    def advance(self, dt):
        """Move time and run what falls due (timers armed meanwhile run when they fall due too)."""
        end = self.now + dt
        while True:
            due = sorted((t for t in self.timers if not t[3] and t[0] <= end), key=lambda t: t[0])
            if not due:
                break
            t = due[0]
            self.timers.remove(t)
            self.now = max(self.now, t[0])
            t[1](*t[2])
        self.now = end

    def armed(self):
        return [t for t in self.timers if not t[3]]


class Stub:
    """What DialDeadlines reads of a dialer; ``_dial_finish`` records and may dial again."""

    def __init__(self, book, clock, timeout, redial=0):
        self.book, self.clock, self.timeout, self.redial = book, clock, timeout, redial
        self.finished = []
        self.start()

    def start(self):
        self.dial_done = False
        self.dial_deadline = self.clock.now + self.timeout
        self.book.add(self)

    def _dial_finish(self, reason):
        assert not self.dial_done
        self.dial_done = True
        self.finished.append((self.clock.now, reason))
        if self.redial:
            self.redial -= 1
            self.start()


def test_a_deadline_fires_at_the_first_scan_at_or_after_it_never_before():
    from portunus.netio import TIMEOUT, DialDeadlines
    clock = Clock()
    book = DialDeadlines(clock, tick=0.1)
    a = Stub(book, clock, 0.25)
    clock.advance(0.2)
    assert a.finished == []  # scans at +0.1 and +0.2: not yet due
    clock.advance(0.05)
    assert a.finished == []  # due at +0.25, but the next scan is at +0.3
    clock.advance(0.05)
    (at, reason), = a.finished
    assert reason == TIMEOUT and 0.25 <= at - 100.0 <= 0.25 + 0.1 + 1e-9
    assert clock.armed() == [] and book.pending == []  # nothing pending: no timer


def test_finished_dials_are_dropped_at_the_next_scan_and_never_time_out():
    from portunus.netio import DialDeadlines
    clock = Clock()
    book = DialDeadlines(clock, tick=0.1)
    done = [Stub(book, clock, 3.0) for _ in range(5)]
    slow = Stub(book, clock, 3.0)
    for d in done:
        d.dial_done = True  # connected (or cancelled)
    clock.advance(0.1)
    assert book.pending == [slow]  # the finished ones are no longer referenced
    clock.advance(3.0)
    assert [d.finished for d in done] == [[]] * 5
    assert len(slow.finished) == 1 and book.pending == [] and clock.armed() == []


def test_a_dialer_that_dials_again_gets_its_own_new_deadline():
    from portunus.netio import TIMEOUT, DialDeadlines
    clock = Clock()
    book = DialDeadlines(clock, tick=0.1)
    d = Stub(book, clock, 0.5, redial=1)  # times out, dials the next address from inside
    clock.advance(0.65)  # due at +0.5: fired by the scan at +0.5 or +0.6
    assert [r for _, r in d.finished] == [TIMEOUT] and not d.dial_done
    clock.advance(0.3)
    assert len(d.finished) == 1  # the new dial's deadline is 0.5 s after it started, not the old one
    clock.advance(0.3)
    assert len(d.finished) == 2 and d.finished[1][0] - d.finished[0][0] >= 0.5


def test_an_entry_left_by_an_earlier_dial_reads_the_current_deadline():
    from portunus.netio import DialDeadlines
    clock = Clock()
    book = DialDeadlines(clock, tick=0.1)
    d = Stub(book, clock, 0.15)
    d.dial_done = True      # the first dial failed fast (refused) ...
    d.start()               # ... and the next address is dialed before any scan: two entries
    d.dial_deadline = clock.now + 1.0
    clock.advance(0.5)
    assert d.finished == []  # neither entry fires early
    clock.advance(0.6)
    assert len(d.finished) == 1 and book.pending == []  # fired once, both entries gone


def test_closing_the_book_cancels_its_timer_and_forgets_the_dialers():
    from portunus.netio import DialDeadlines
    clock = Clock()
    book = DialDeadlines(clock, tick=0.1)
    d = Stub(book, clock, 0.2)
    book.close()
    clock.advance(1.0)
    assert d.finished == [] and book.pending == [] and clock.armed() == []


def test_a_relay_session_dial_keeps_its_deadline_in_the_contexts_book(loop, listener):
    """The relay's dials use the context's DialDeadlines (no timer per dial) and still connect."""
    target = listener.getsockname()[1]
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": target}])
    try:
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: relay.sessions, WAIT)
        (session,) = relay.sessions
        assert session.dial_timer is None and session in relay.ctx.dial_deadlines.pending
        assert loop.run_until(lambda: session.pumps, WAIT)
        assert loop.run_until(lambda: not relay.ctx.dial_deadlines.pending, WAIT)  # dropped by the next scan
        c.close()
    finally:
        stop(relay)


def test_a_dial_that_never_completes_times_out_and_fails_over_to_the_next_target(loop, upstream):
    """A real hanging connect (a listener whose accept queue is full drops the SYN), on the
    context's deadline book: the first target times out, the second one carries the bytes."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=5)  # the one queue slot
    relay = make_relay(loop, [{"host": "127.0.0.1", "port": full.getsockname()[1], "priority": 1},
                              {"host": "127.0.0.1", "port": upstream.getsockname()[1], "priority": 2}],
                       connect_timeout=0.3)
    try:
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: any(s.pumps for s in relay.sessions), WAIT)
        assert relay.counters.connect_failures == 1  # the timeout, counted as a failed connect
        srv, _ = upstream.accept()
        c.sendall(b"late")
        srv.settimeout(5)
        assert loop.run_until(lambda: relay.counters.total("bytes_in") == 4, WAIT)
        assert srv.recv(16) == b"late"
        c.close()
        srv.close()
        assert loop.run_until(lambda: not relay.sessions and not relay.ctx.dial_deadlines.pending, WAIT)
    finally:
        stop(relay)
        filler.close()
        full.close()


@pytest.mark.parametrize("proxy_protocol", [None, "v1"])
def test_the_upstream_goes_from_the_dialers_writer_to_the_pumps_reader_in_one_modify(loop, upstream,
                                                                                       proxy_protocol):
    """The session hands the dialed upstream over with its writer still set and the outbound pump
    takes it in one EPOLL_CTL_MOD to EPOLLIN; nothing asks for EPOLLOUT on it again while the
    bytes flow (no writable spin), with or without pending bytes (a PROXY header) on the
    inbound pump."""
    import select
    target = {"host": "127.0.0.1", "port": upstream.getsockname()[1]}
    if proxy_protocol:
        target["proxy_protocol"] = proxy_protocol
    relay = make_relay(loop, [target])
    ep = loop._epoll = CountingEpoll(loop._epoll)
    try:
        c = socket.create_connection(("127.0.0.1", relay.rule.listen_port), timeout=5)
        assert loop.run_until(lambda: any(s.pumps for s in relay.sessions), WAIT)
        (session,) = relay.sessions
        up = session.up.fileno()
        srv, _ = upstream.accept()
        srv.settimeout(5)
        c.sendall(b"ping")
        want = 4 + (len(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") if proxy_protocol else 0)
        got = b""
        while not got.endswith(b"ping"):
            assert loop.run_until(lambda: session.counters.bytes_in >= 4, WAIT)
            got += srv.recv(256)
        assert len(got) >= want
        srv.sendall(b"pong")
        c.settimeout(5)
        assert loop.run_until(lambda: session.counters.bytes_out == 4, WAIT)
        assert c.recv(16) == b"pong"
        loop.run_until(lambda: False, 0.05)
        up_ops = [op for op in ep.ops if op[1] == up]
        assert up_ops == [("add", up, select.EPOLLOUT), ("mod", up, select.EPOLLIN)]
        c.close()
        srv.close()
        assert loop.run_until(lambda: not relay.sessions, WAIT)
    finally:
        loop._epoll = ep.real
        stop(relay)

"""Shared socket plumbing: connect with a deadline, the accept loop and its back-off, helpers.

Real loopback sockets on a real loop where the kernel decides the outcome; a
recording fake loop where the test has to decide when time passes.
"""

from __future__ import annotations

import errno
import select
import socket

import pytest

from conftest import free_port
from portunus.loop import Loop
from portunus.netio import ACCEPT_BACKOFF, TIMEOUT, Acceptor, Connect, errno_name, family_of

pytestmark = pytest.mark.timeout(10)
WAIT = 2.0  # upper bound for run_until: only reached when the behaviour is broken


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


class FakeTimer:
    def __init__(self, delay, callback, args):
        self.delay, self.callback, self.args = delay, callback, args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def fire(self):
        assert not self.cancelled
        self.callback(*self.args)


class FakeLoop:
    """Records interest and timers; nothing runs until the test says so."""

    def __init__(self):
        self.readers, self.writers, self.timers, self.soon = {}, {}, [], []
        self.write_events = select.EPOLLOUT  # what the real loop sets before a writer runs

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        return self.readers.pop(fd, None) is not None

    def add_writer(self, fd, cb):
        self.writers[fd] = cb

    def remove_writer(self, fd):
        return self.writers.pop(fd, None) is not None

    def forget(self, fd, closing=False):
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)

    def call_later(self, delay, cb, *args):
        t = FakeTimer(delay, cb, args)
        self.timers.append(t)
        return t

    call_coarse = call_later  # the connect deadline: a coarse timer on the real loop

    def call_soon(self, cb, *args):
        self.soon.append((cb, args))

    def live_timers(self):
        return [t for t in self.timers if not t.cancelled]


# ---------------------------------------------------------------- helpers

def test_errno_name_names_numbers_and_errors():
    assert errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"
    assert errno_name(OSError(errno.EMFILE, "Too many open files")) == "EMFILE"
    assert errno_name(99999) == "99999"
    assert errno_name(OSError("no errno here")) == "no errno here"


def test_family_of_literals():
    assert family_of("127.0.0.1") == socket.AF_INET
    assert family_of("::1") == socket.AF_INET6
    assert family_of("2001:db8::5") == socket.AF_INET6


# ---------------------------------------------------------------- Connect

def test_connect_hands_over_a_connected_non_blocking_socket(loop, listener):
    got = []
    Connect(loop, "127.0.0.1", listener.getsockname()[1], 5.0, lambda s, r: got.append((s, r)))
    assert got == []  # never from inside the constructor
    assert loop.run_until(lambda: got, WAIT)
    (sock, reason), = got
    try:
        assert reason is None
        assert sock.getpeername() == listener.getsockname()
        assert sock.getblocking() is False
        assert loop.watched_fds() == 1  # only the loop's own wake-up pipe: the socket is the caller's now
    finally:
        sock.close()


def test_connect_refused_reports_the_errno_name(loop):
    got = []
    Connect(loop, "127.0.0.1", free_port(), 5.0, lambda s, r: got.append((s, r)))
    assert got == []
    assert loop.run_until(lambda: got, WAIT)
    assert got == [(None, "ECONNREFUSED")]
    assert loop.watched_fds() == 1


def test_connect_timeout_closes_the_socket_and_says_timeout(listener):
    fake = FakeLoop()
    got = []
    c = Connect(fake, "127.0.0.1", listener.getsockname()[1], 3.0, lambda s, r: got.append((s, r)))
    (timer,) = fake.timers
    assert timer.delay == 3.0
    assert c.dial_sock.fileno() in fake.writers
    timer.fire()
    assert got == [(None, TIMEOUT)]
    assert c.dial_sock.fileno() == -1  # closed
    assert fake.writers == {}


def test_connect_success_cancels_its_deadline(listener):
    fake = FakeLoop()
    got = []
    c = Connect(fake, "127.0.0.1", listener.getsockname()[1], 3.0, lambda s, r: got.append((s, r)))
    on_writable = fake.writers[c.dial_sock.fileno()]
    on_writable()  # loopback: the handshake is done by now
    (sock, reason), = got
    try:
        assert reason is None
        assert fake.live_timers() == []  # the deadline can no longer report a second outcome
        assert fake.writers == {}
    finally:
        sock.close()


def test_a_plain_epollout_hands_over_without_reading_so_error(listener):
    fake = FakeLoop()
    got = []
    c = Connect(fake, "127.0.0.1", listener.getsockname()[1], 3.0, lambda s, r: got.append((s, r)))
    calls = []

    class Spy:
        """The dialed socket, with getsockopt recorded (SO_ERROR must not be asked)."""
        def __init__(self, sock):
            self._s = sock

        def getsockopt(self, *a):
            calls.append(a)
            return self._s.getsockopt(*a)

        def __getattr__(self, name):
            return getattr(self._s, name)
    real = c.dial_sock
    c.dial_sock = Spy(real)
    fake.writers[real.fileno()]()
    (sock, reason), = got
    try:
        assert reason is None and calls == []
    finally:
        real.close()


def test_cancelled_connect_never_calls_back_and_frees_its_socket(loop, listener):
    got = []
    c = Connect(loop, "127.0.0.1", listener.getsockname()[1], 5.0, lambda s, r: got.append((s, r)))
    c.cancel()
    assert c.dial_sock.fileno() == -1
    assert loop.run_until(lambda: got, 0.2) is False
    assert loop.watched_fds() == 1
    c.cancel()  # a second cancel is harmless


# ---------------------------------------------------------------- Acceptor

def test_acceptor_hands_over_every_pending_connection_non_blocking(loop, listener):
    accepted = []
    acc = Acceptor(loop, listener, lambda s, a: accepted.append(s))
    acc.start()
    clients = [socket.create_connection(listener.getsockname(), timeout=2) for _ in range(3)]
    try:
        assert loop.run_until(lambda: len(accepted) == 3, WAIT)
        assert all(s.getblocking() is False for s in accepted)
    finally:
        for s in clients + accepted:
            s.close()


def test_stopped_acceptor_takes_no_more_connections(loop, listener):
    accepted = []
    acc = Acceptor(loop, listener, lambda s, a: accepted.append(s))
    acc.start()
    acc.stop()
    c = socket.create_connection(listener.getsockname(), timeout=2)
    try:
        assert loop.run_until(lambda: accepted, 0.2) is False
    finally:
        c.close()


class ScriptedListener:
    """A listening socket whose accept() results the test scripts."""

    def __init__(self, *results):
        self.results = list(results)

    def fileno(self):
        return 42

    def accept(self):
        r = self.results.pop(0) if self.results else BlockingIOError()
        if isinstance(r, BaseException):
            raise r
        return r, ("127.0.0.1", 5555)


class Accepted:
    def __init__(self):
        self.blocking = True

    def setblocking(self, flag):
        self.blocking = flag


def test_fd_exhaustion_pauses_the_listener_for_the_backoff_then_resumes():
    fake = FakeLoop()
    errors, accepted = [], []
    lsock = ScriptedListener(OSError(errno.EMFILE, "Too many open files"), Accepted())
    acc = Acceptor(fake, lsock, lambda s, a: accepted.append(s), lambda e, b: errors.append((e.errno, b)))
    acc.start()
    fake.readers[42]()
    assert errors == [(errno.EMFILE, ACCEPT_BACKOFF)]
    assert 42 not in fake.readers  # a level-triggered listener would wake the loop again at once
    (timer,) = fake.live_timers()
    assert timer.delay == ACCEPT_BACKOFF
    timer.fire()
    fake.readers[42]()
    assert len(accepted) == 1 and accepted[0].blocking is False


@pytest.mark.parametrize("err", [errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_every_kind_of_descriptor_or_memory_exhaustion_backs_off(err):
    fake = FakeLoop()
    errors = []
    acc = Acceptor(fake, ScriptedListener(OSError(err, "x")), lambda s, a: None, lambda e, b: errors.append(b))
    acc.start()
    fake.readers[42]()
    assert errors == [ACCEPT_BACKOFF]
    assert 42 not in fake.readers


def test_stop_during_backoff_keeps_the_listener_unwatched():
    fake = FakeLoop()
    acc = Acceptor(fake, ScriptedListener(OSError(errno.EMFILE, "x")), lambda s, a: None)
    acc.start()
    fake.readers[42]()
    acc.stop()
    assert fake.live_timers() == []
    assert 42 not in fake.readers


def test_transient_accept_errors_skip_to_the_next_connection():
    fake = FakeLoop()
    errors, accepted = [], []
    lsock = ScriptedListener(OSError(errno.ECONNABORTED, "x"), OSError(errno.EPROTO, "x"), Accepted())
    acc = Acceptor(fake, lsock, lambda s, a: accepted.append(s), lambda e, b: errors.append(e))
    acc.start()
    fake.readers[42]()
    assert len(accepted) == 1
    assert errors == []


def test_other_accept_errors_are_reported_without_backoff():
    fake = FakeLoop()
    errors = []
    acc = Acceptor(fake, ScriptedListener(OSError(errno.EINVAL, "x")), lambda s, a: None,
                   lambda e, b: errors.append((e.errno, b)))
    acc.start()
    fake.readers[42]()
    assert errors == [(errno.EINVAL, None)]
    assert 42 in fake.readers
    assert fake.live_timers() == []


def test_one_wakeup_accepts_at_most_a_batch():
    fake = FakeLoop()
    accepted = []
    acc = Acceptor(fake, ScriptedListener(*[Accepted() for _ in range(10)]), lambda s, a: accepted.append(s),
                   batch=4)
    acc.start()
    fake.readers[42]()
    assert len(accepted) == 4


def test_a_callback_that_stops_the_acceptor_ends_the_batch():
    fake = FakeLoop()
    accepted = []
    acc = None

    def on_accept(s, a):
        accepted.append(s)
        acc.stop()
    acc = Acceptor(fake, ScriptedListener(Accepted(), Accepted()), on_accept)
    acc.start()
    fake.readers[42]()
    assert len(accepted) == 1

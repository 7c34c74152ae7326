"""Socket plumbing the data plane and the control channel share, on the loop.

Below ``relay/`` and ``control/``: imports only the standard library (and at
most ``portunus.errors``/``portunus.log``). Everything here runs on the loop thread and never blocks.

- ``Dialer`` / ``Connect``: one non-blocking TCP connect with a deadline (a base class / its
  callback form); ``DialDeadlines``: the deadlines of many dialers without a timer each.
- ``Acceptor``: the accept loop of one listening socket, with back-off when the
  process runs out of file descriptors.
- ``family_of``, ``errno_name``: the address-family and errno-naming helpers.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from typing import Callable

# running out of these leaves the connection in the backlog: the listener stays readable
FD_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# the peer went away between SYN and accept(), or a firewall hook refused it: try the next one
TRANSIENT_ACCEPT = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR)
ACCEPT_BATCH = 64
ACCEPT_BACKOFF = 0.1
TIMEOUT = "timeout"  # the reason ``Connect`` reports when the deadline passes
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_SET_NONBLOCK = _STREAM_NONBLOCK == socket.SOCK_STREAM  # no SOCK_NONBLOCK here: a second call
_PLAIN = socket.SocketType
_DIALING = (0, errno.EINPROGRESS)  # connect_ex results of a dial under way (or done at once)
_CONNECT_TROUBLE = select.EPOLLERR | select.EPOLLHUP  # beside EPOLLOUT: the connect failed (or died)
# Linux: getsockopt(TCP_INFO) on a listener reports its accept queue length in tcpi_unacked (what
# ``ss`` shows as Recv-Q), a u32 at offset 24 of struct tcp_info; 28 bytes are enough.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if hasattr(socket, "IPPROTO_TCP") else None
_TCP_INFO_LEN, _QUEUED_AT, _TCP_LISTEN = 28, 24, 10
_IPPROTO_TCP = getattr(socket, "IPPROTO_TCP", 6)
_U32 = struct.Struct("=I").unpack_from


def family_of(host: str) -> int:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise (names are resolved before this)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def errno_name(err: int | OSError | None) -> str:
    """``ECONNREFUSED`` for 111 or an OSError carrying it; the number (or message) when unnamed."""
    if isinstance(err, OSError):
        if err.errno is None:
            return str(err)
        err = err.errno
    return errno.errorcode.get(err, str(err))


class Dialer:
    """One non-blocking TCP connect to ``(ip, port)`` with a deadline, as a base class.

    ``dial(loop, ip, port, timeout, family, plain, deadlines)`` starts it; the subclass's
    ``dialed(sock, reason)`` ends it: ``dialed(sock, None)`` hands over the connected
    non-blocking socket (no longer watched by the loop, unless ``hands_over_writer``),
    ``dialed(None, reason)`` reports an
    errno name or ``TIMEOUT``, the socket already closed. ``dialed`` runs exactly once per dial,
    always from the loop (never from inside ``dial``), and never after ``cancel_dial()``; the
    next dial may start from inside it. Creating the socket can raise ``OSError`` (e.g.
    EMFILE): the caller decides what running out of descriptors means. ``dial_done`` is true
    while no dial is in flight (a subclass sets it before its first dial if it may cancel first).

    ``Connect`` is the callback form. The relay's ``TcpSession`` is a ``Dialer`` itself, so a
    new connection builds no dialer object and no bound callback of its own, while the dialing
    logic stays here.

    The deadline is armed for every connection and almost never reached, so it is coarse (up to
    0.1 s late, never early): a ``Loop.call_coarse`` timer of its own, or, with ``deadlines``, an
    entry in a ``DialDeadlines`` book shared by many dialers (no object per dial: the relay's).

    ``plain=True`` hands over a ``socket.SocketType`` (see ``Acceptor``) rather than a
    ``socket.socket``: what the relay's upstream sockets are. The control channel keeps the
    full wrapper (it goes on to ``ssl``).
    """

    __slots__ = ("loop", "dial_sock", "dial_timer", "dial_done", "dial_deadline")

    # True in a subclass: a connected socket is handed to ``dialed`` still watched for writing by
    # the dialer's callback, and ``dialed`` must replace that interest before it returns (e.g.
    # ``loop.set_reader``: one EPOLL_CTL_MOD where remove_writer + add_reader drop and re-add).
    # Left there, a level-triggered writable socket would wake the loop on every turn.
    hands_over_writer = False

    def dialed(self, sock: socket.socket | None, reason: str | None) -> None:
        raise NotImplementedError

    def dial(self, loop, ip: str, port: int, timeout: float, family: int | None = None,
             plain: bool = False, deadlines: "DialDeadlines | None" = None) -> None:
        """Start a dial; with ``deadlines`` its deadline is kept there (no timer object per dial)
        rather than in a coarse timer of its own."""
        sock = (_PLAIN if plain else socket.socket)(family or family_of(ip), _STREAM_NONBLOCK)  # one syscall
        if _SET_NONBLOCK:
            sock.setblocking(False)
        self.loop = loop
        self.dial_sock = sock
        self.dial_done = False
        rc = sock.connect_ex((ip, port))
        if rc in _DIALING:
            if deadlines is None:
                self.dial_timer = loop.call_coarse(timeout, self._dial_finish, TIMEOUT)
            else:  # deadlines.add(self), inline: once per dial
                self.dial_timer = None
                self.dial_deadline = loop.time() + timeout
                deadlines.pending.append(self)
                if deadlines.timer is None:
                    deadlines.arm()
            loop.add_writer(sock.fileno(), self._dial_writable)
        else:
            self.dial_timer = None
            loop.call_soon(self._dial_finish, errno_name(rc))

    def _dial_writable(self) -> None:
        sock = self.dial_sock
        # A failed connect wakes with EPOLLERR/EPOLLHUP beside EPOLLOUT; a plain EPOLLOUT is an
        # established connection, so SO_ERROR is read only when the kernel flagged a problem.
        trouble = self.loop.write_events & _CONNECT_TROUBLE
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if trouble else 0
        if err or self.dial_done:
            self._dial_finish(None if err == 0 else errno_name(err))
            return
        # connected (the common case, once per connection): _dial_finish + _dial_release inline;
        # a cancelled timer stays referenced until the next dial (nothing reads it once done)
        self.dial_done = True
        timer = self.dial_timer
        if timer is not None:
            timer.cancel()
        if not self.hands_over_writer:
            self.loop.remove_writer(sock.fileno())  # handed over: see _dial_release
        self.dialed(sock, None)

    def _dial_finish(self, reason: str | None) -> None:
        if self.dial_done:
            return
        sock = self._dial_release(closing=reason is not None)
        if reason is not None:
            sock.close()
            sock = None
        self.dialed(sock, reason)

    def _dial_release(self, closing: bool) -> socket.socket:
        self.dial_done = True
        if self.dial_timer is not None:
            self.dial_timer.cancel()
            self.dial_timer = None
        sock = self.dial_sock
        if closing:
            self.loop.forget(sock.fileno(), closing=True)
        else:
            # handed over: the loop drops the interest lazily, so the new owner's first
            # add_reader costs one EPOLL_CTL_MOD rather than a DEL and an ADD
            self.loop.remove_writer(sock.fileno())
        return sock

    def cancel_dial(self) -> None:
        """Abandon the dial in flight (if any) and close its socket; ``dialed`` is not called."""
        if not self.dial_done:
            self._dial_release(closing=True).close()


class DialDeadlines:
    """The connect deadlines of many dialers on one loop with no object per dial (``Dialer.dial``
    with ``deadlines``): a dialer appends itself and keeps its deadline; while any is pending, one
    timer per ``tick`` scans them and times out each whose current dial is past its deadline
    (``TIMEOUT``, up to a tick late, never early). A finished dialer is dropped by the next scan,
    so a dialer stays referenced here at most one tick after its dial ended; one dialing again
    gets its new deadline (an entry left from its earlier dial reads the current one)."""

    __slots__ = ("loop", "tick", "pending", "timer")

    def __init__(self, loop, tick: float = 0.1):
        self.loop = loop
        self.tick = tick
        self.pending: list[Dialer] = []
        self.timer = None

    def add(self, dialer: Dialer) -> None:
        """Watch ``dialer``'s deadline (``dial_deadline``; ``Dialer.dial`` does this inline)."""
        self.pending.append(dialer)
        if self.timer is None:
            self.arm()

    def arm(self) -> None:
        self.timer = self.loop.call_later(self.tick, self._scan)

    def _scan(self) -> None:
        self.timer = None
        now = self.loop.time()
        scanned, self.pending = self.pending, []
        keep = self.pending.append
        for d in scanned:
            if d.dial_done:
                continue
            if now >= d.dial_deadline:
                d._dial_finish(TIMEOUT)  # may dial again: that appends it anew
            else:
                keep(d)
        if self.pending and self.timer is None:
            self.arm()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = []


class Connect(Dialer):
    """One non-blocking TCP connect to ``(ip, port)`` with a deadline (see ``Dialer``), reported
    to ``on_done(sock, reason)``: exactly once, always from the loop (never from inside the
    constructor), never after ``cancel()``."""

    __slots__ = ("on_done",)

    def __init__(self, loop, ip: str, port: int, timeout: float,
                 on_done: Callable[[socket.socket | None, str | None], None], *, family: int | None = None,
                 plain: bool = False):
        self.on_done = on_done
        self.dial(loop, ip, port, timeout, family, plain)

    def dialed(self, sock: socket.socket | None, reason: str | None) -> None:
        self.on_done(sock, reason)

    def cancel(self) -> None:
        """Abandon the attempt and close its socket; ``on_done`` is not called."""
        self.cancel_dial()


class Acceptor:
    """The accept loop of one listening socket.

    Each wakeup accepts up to ``batch`` connections and hands each to
    ``on_accept(sock, addr)`` as a non-blocking socket. Transient errors (the
    peer already gone) skip to the next connection. When descriptors run out,
    the pending connection stays in the backlog and would wake the loop again at
    once, so the acceptor stops watching the listener for ``backoff`` seconds;
    ``on_error(exc, backoff)`` reports it (``backoff`` is None for any other
    error, after which the acceptor waits for the next wakeup).

    From a real listening socket, ``sock`` is a ``socket.SocketType``: the C socket object
    ``socket.socket`` derives from, with every method the relay uses (recv_into, send, shutdown,
    setsockopt, getpeername, close …) but without the Python-level ``__init__`` and
    ``close``/``_real_close`` layers, ~3 400 instructions cheaper per connection; what it lacks
    is ``makefile``/``dup``/``with`` and enum-valued ``family``/``type``. It is built from the
    raw ``_accept()`` fd with the listener's family/type/proto read once here (CPython's socket
    constructor still calls ``getsockname`` on a given fd to validate it; ``accept4`` with
    ``SOCK_NONBLOCK`` through ctypes would save the ``ioctl`` of ``setblocking`` but costs more
    user time in the ctypes call than the syscall it saves).

    On Linux a wakeup first reads the listener's accept queue length (``TCP_INFO``) and accepts
    that many (at most ``batch``) instead of accepting until EAGAIN: the same number of syscalls,
    but no ``BlockingIOError`` raised and caught per wakeup (~7 000 instructions, against ~3 100
    for the getsockopt). What arrives meanwhile wakes the level-triggered listener again.
    """

    __slots__ = ("loop", "lsock", "fd", "on_accept", "on_error", "batch", "backoff", "running", "_resume",
                 "_raw", "_kind", "_queued")

    def __init__(self, loop, lsock: socket.socket, on_accept: Callable[[socket.socket, object], None],
                 on_error: Callable[[OSError, float | None], None] | None = None, *,
                 batch: int = ACCEPT_BATCH, backoff: float = ACCEPT_BACKOFF):
        self.loop = loop
        self.lsock = lsock
        self.fd = lsock.fileno()
        self.on_accept = on_accept
        self.on_error = on_error
        self.batch = batch
        self.backoff = backoff
        self.running = False
        self._resume = None
        # a real socket: accept the raw fd, skipping socket.accept's wrapper and enum round trips
        self._raw = getattr(lsock, "_accept", None)
        self._kind = (int(lsock.family), int(lsock.type), lsock.proto) if self._raw is not None else None
        self._queued = self._raw is not None and _queue_length(lsock) is not None

    def start(self) -> None:
        self.running = True
        self.loop.add_reader(self.fd, self._on_readable)

    def stop(self) -> None:
        """Stop accepting (the caller closes the socket)."""
        self.running = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.loop.remove_reader(self.fd)

    def _on_readable(self) -> None:
        raw, on_accept = self._raw, self.on_accept
        batch = self.batch
        if raw is None:
            accept = self.lsock.accept  # a scripted stand-in (tests): what it returns is the socket
        else:
            make = _PLAIN
            family, kind, proto = self._kind
            if self._queued:
                try:
                    queued = _U32(self.lsock.getsockopt(_IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN), _QUEUED_AT)[0]
                except OSError:
                    queued = batch
                if queued < batch:
                    batch = queued or 1  # 0: a race with the wakeup; one accept finds out (EAGAIN)
        for _ in range(batch):
            try:
                if raw is not None:
                    fd, addr = raw()
                    sock = make(family, kind, proto, fd)
                else:
                    sock, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in TRANSIENT_ACCEPT:
                    continue
                if exc.errno in FD_EXHAUSTION:
                    self._back_off()
                    self._report(exc, self.backoff)
                else:
                    self._report(exc, None)
                return
            sock.setblocking(False)
            on_accept(sock, addr)
            if not self.running:
                return  # the callback closed the listener

    def _report(self, exc: OSError, backoff: float | None) -> None:
        if self.on_error is not None:
            self.on_error(exc, backoff)

    def _back_off(self) -> None:
        self.loop.remove_reader(self.fd)
        self._resume = self.loop.call_later(self.backoff, self._on_backoff_over)

    def _on_backoff_over(self) -> None:
        self._resume = None
        if self.running:
            self.loop.add_reader(self.fd, self._on_readable)


def _queue_length(lsock) -> int | None:
    """The accept queue length of a listening TCP socket (Linux TCP_INFO), None where unknown."""
    if _TCP_INFO is None:
        return None
    try:
        info = lsock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, TypeError, ValueError):
        return None
    if len(info) < _TCP_INFO_LEN or info[0] != _TCP_LISTEN:
        return None
    return _U32(info, _QUEUED_AT)[0]

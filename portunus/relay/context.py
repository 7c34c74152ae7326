"""What every relay on one loop shares: the loop, the resolver, splice pipes, buffers."""

from __future__ import annotations

import errno
import socket

from ..netio import DialDeadlines, family_of
from .enforce import Enforcer
from .resolver import Resolver
from .splice import PipePool

COPY_CHUNK = 256 * 1024
UDP_MAX_DATAGRAM = 65536
CONNECT_TIMEOUT = 3.0
# Relay warnings a peer, a resolver or the kernel can repeat per connection or datagram go
# through log.limited: the first at once, then one line per key (rule, rule+port, rule+host)
# per this many seconds, carrying suppressed=<count>.
REPEAT_LOG_EVERY = 60.0


class BindError(Exception):
    """A listen socket could not be bound; ``reason`` is the rule's failure reason."""

    def __init__(self, port: int, err: OSError):
        self.port = port
        self.errno = err.errno
        if err.errno == errno.EADDRINUSE:
            self.code = "port_in_use"
            self.reason = f"port_in_use (port {port} already bound)"
        elif err.errno == errno.EACCES:
            self.code = "permission_denied"
            self.reason = f"permission_denied (port {port} needs CAP_NET_BIND_SERVICE)"
        elif err.errno == errno.EADDRNOTAVAIL:
            self.code = "address_unavailable"
            self.reason = f"address_unavailable (listen address for port {port} is not on this host)"
        elif err.errno in (errno.EMFILE, errno.ENFILE):
            self.code = "too_many_open_files"
            self.reason = f"too_many_open_files (binding port {port}; raise LimitNOFILE)"
        else:
            self.code = "bind_failed"
            self.reason = f"bind_failed (port {port}: {err.strerror or err})"
        super().__init__(self.reason)


class RelayContext:
    def __init__(self, loop, resolver: Resolver | None = None, *, connect_timeout: float = CONNECT_TIMEOUT):
        self.loop = loop
        self.resolver = resolver or Resolver(loop)
        self.pipes = PipePool()
        self.connect_timeout = connect_timeout
        self.dial_deadlines = DialDeadlines(loop)  # the upstream dials' deadlines: no timer per dial
        self.copy_view = memoryview(bytearray(COPY_CHUNK))
        self.udp_view = memoryview(bytearray(UDP_MAX_DATAGRAM))
        self.splice_selected_rules: set[str] = set()
        self.enforcer = Enforcer(loop)  # rate limits and quotas of every rule on this loop
        # (listen host, port) -> the SniListener its SNI rules and fallback share (relay/sni_listener.py)
        self.shared_listeners: dict[tuple[str, int], object] = {}
        # relay/mmsg.batch_for: False until the first UDP rule asks, then its Batch or None (per datagram)
        self.udp_batch = False
        # upstream sockets whose keepalive is still to be switched on (keepalive_later)
        self.keepalive_pending: set = set()
        self._keepalive_timer = None

    def keepalive_later(self, sock: socket.socket) -> None:
        """Switch TCP keepalive on for ``sock`` (a dialed upstream) within ``KEEPALIVE_DEFER`` s,
        in one sweep for every connection dialed meanwhile; the owner discards it from
        ``keepalive_pending`` when it closes first. Keepalive only ever acts after 300 s idle, so a
        connection shorter than the deferral never needed it: a short connection saves the four
        setsockopt calls, a long one gets the same probes a second late at most.

        While ``keepalive_pending`` is not empty its sweep is armed (only this method fills an
        empty set, and the sweep empties it as it fires), so a caller that finds it non-empty may
        just add to it."""
        self.keepalive_pending.add(sock)
        if self._keepalive_timer is None:
            self._keepalive_timer = self.loop.call_later(KEEPALIVE_DEFER, self._keepalive_sweep)

    def _keepalive_sweep(self) -> None:
        self._keepalive_timer = None
        pending, self.keepalive_pending = self.keepalive_pending, set()
        for sock in pending:
            if sock.fileno() >= 0:
                set_keepalive(sock)

    def close(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        self.keepalive_pending = set()
        self.dial_deadlines.close()
        for listener in list(self.shared_listeners.values()):
            listener.close()
        self.pipes.close()
        self.resolver.close()


KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 300, 30, 4
KEEPALIVE_DEFER = 1.0  # an upstream's keepalive is on within this long of its connect (keepalive_later)


def tune_stream_socket(sock: socket.socket) -> None:
    """No Nagle delay on forwarded bytes; keepalive finds peers that vanished (~7 min)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        return
    set_keepalive(sock)


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive: the first probe after 300 s idle, then every 30 s, 4 probes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):
        pass


def bind_socket(kind: int, host: str, port: int) -> socket.socket:
    """Create, bind (and for TCP listen on) one non-blocking socket; raise BindError."""
    fam = family_of(host)
    sock = socket.socket(fam, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # TIME_WAIT leftovers of a dead process must not cause a spurious port_in_use;
            # two live listeners still conflict on Linux with SO_REUSEADDR.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            tune_stream_socket(sock)  # accepted sockets inherit these on Linux: set once here
            sock.listen(1024)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        sock.close()
        raise BindError(port, exc) from None

"""The shared listener of an SNI port (SPEC §2.8): one socket, many rules, routed by ClientHello.

Several TCP rules share one ``(listen host, port)``: each SNI rule holds a
pattern, at most one plain rule is the fallback. ``SniListener`` owns the socket,
reads each new connection's ClientHello (``HelloRead``), routes it with the
``SniRouter`` and hands the connection, with the bytes read so far, to the chosen
rule's relay (``TcpRuleRelay.adopt``), whose session replays them to the
upstream before anything else and then forwards the rest untouched (splice
fast path included). Never decrypts.

Why read-and-replay rather than MSG_PEEK: a peeked socket stays readable, so a
level-triggered loop would spin on a client that sends half a hello. Reading
consumes what arrived, so a client that sends one byte per second costs one
wakeup per byte; the replay forwards exactly the bytes the client sent.

Rules attach and detach their routes; the socket is bound when the first route
attaches and closed when the last one goes, so siblings never see a rebind.
With no SNI route left the fallback keeps the port as a plain rule: connections
go straight to it, nothing is read first.
"""

from __future__ import annotations

import socket
import struct

from ..log import log
from ..netio import Acceptor, errno_name
from . import sni
from .context import REPEAT_LOG_EVERY, BindError, RelayContext, bind_socket
from .sni_router import NONE, SniRouter

HELLO_TIMEOUT = 3.0
MAX_HELLO_BYTES = sni.MAX_CLIENT_HELLO  # 64 KiB cumulative
MAX_READS_IN_FLIGHT = 1024  # per listener; the excess is reset at accept (slowloris guard)
PEEK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)  # seconds
_LINGER_RST = struct.pack("ii", 1, 0)
PLAIN, SNI = "plain", "sni"  # the listener's mode: plain while only the fallback is left


class RouteTaken(BindError):
    """The rule's pattern (or the fallback slot) of a shared port is held by another rule."""

    def __init__(self, port: int, pattern: str | None, holder_id: str):
        self.port = port
        self.errno = None
        self.code = "port_in_use"
        what = f"SNI pattern {pattern!r}" if pattern else "the fallback of this SNI port"
        self.reason = f"port_in_use (port {port}: {what} is held by rule {holder_id})"
        Exception.__init__(self, self.reason)


class PeekHistogram:
    """How long ClientHello reads took, in Prometheus histogram shape (cumulative buckets)."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * len(PEEK_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.count += 1
        for i, le in enumerate(PEEK_BUCKETS):
            if seconds <= le:
                self.counts[i] += 1
                return

    def to_dict(self) -> dict:
        running, cumulative = 0, []
        for le, n in zip(PEEK_BUCKETS, self.counts):
            running += n
            cumulative.append([le, running])
        return {"buckets": cumulative, "sum": round(self.total, 6), "count": self.count}


class ListenerCounters:
    __slots__ = ("misses", "parse_failures", "hello_timeouts", "reads_reset", "peek_duration")

    def __init__(self) -> None:
        self.misses = 0           # no SNI or no matching pattern, and no fallback: closed
        self.parse_failures = 0   # not TLS, malformed or over 64 KiB: closed
        self.hello_timeouts = 0   # no complete ClientHello within 3 s: closed
        self.reads_reset = 0      # over the in-flight limit: reset at accept
        self.peek_duration = PeekHistogram()


class HelloRead:
    """One accepted connection whose ClientHello is still arriving."""

    __slots__ = ("listener", "sock", "addr", "fd", "buf", "started", "timer")

    def __init__(self, listener: "SniListener", sock: socket.socket, addr):
        self.listener = listener
        self.sock, self.addr, self.fd = sock, addr, sock.fileno()
        self.buf = bytearray()
        loop = listener.ctx.loop
        self.started = loop.time()
        self.timer = loop.call_later(HELLO_TIMEOUT, self._on_timeout)
        loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        view = self.listener.ctx.copy_view[:MAX_HELLO_BYTES - len(self.buf)]
        if not view:  # the parser never asks for more than the cap; this guards the recv size
            self.listener.hello_read(self, sni.SniResult(sni.TOO_LARGE))
            return
        try:
            n = self.sock.recv_into(view)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:  # the client left (or reset) before its hello was complete
            self.close()
            return
        self.buf += view[:n]
        result = sni.parse_client_hello(self.buf)
        if result.status != sni.NEED_MORE:
            self.listener.hello_read(self, result)

    def _on_timeout(self) -> None:
        self.timer = None
        self.listener.hello_timed_out(self)

    def elapsed(self) -> float:
        return self.listener.ctx.loop.time() - self.started

    def release(self) -> tuple[socket.socket, bytes]:
        """Stop watching; the socket and the bytes read go to whoever takes the connection."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.ctx.loop.forget(self.fd)
        self.listener.reads.discard(self)
        return self.sock, bytes(self.buf)

    def close(self) -> None:
        sock, _ = self.release()
        sock.close()


class SniListener:
    """The socket of one ``(listen host, port)`` shared by the SNI rules and the fallback on it."""

    def __init__(self, ctx: RelayContext, host: str, port: int):
        self.ctx = ctx
        self.host, self.port = host, port
        self.sock = bind_socket(socket.SOCK_STREAM, host, port)  # raises BindError
        self.router: SniRouter = SniRouter()
        self.reads: set[HelloRead] = set()
        self.counters = ListenerCounters()
        self.acceptor = Acceptor(ctx.loop, self.sock, self._on_accept, self._on_accept_error)
        self.acceptor.start()

    @property
    def mode(self) -> str:
        return SNI if self.router.sni_routes else PLAIN

    # ---- routes -------------------------------------------------------------
    def attach(self, relay) -> None:
        """Route ``relay.rule.sni_pattern`` (None: the fallback) to ``relay``; RouteTaken if held."""
        pattern = relay.rule.sni_pattern
        if not self.router.add(pattern, relay):
            raise RouteTaken(self.port, pattern, self.router.holder(pattern).rule.rule_id)

    def detach(self, relay) -> None:
        """Drop ``relay``'s route. With no SNI route left, reads in flight go to the fallback (or close)."""
        self.router.remove(relay.rule.sni_pattern, relay)
        if not self.router:
            self.close()
        elif self.mode == PLAIN:
            for read in list(self.reads):
                sock, data = read.release()
                self.router.fallback.adopt(sock, read.addr, self.port, data, None)

    def close(self) -> None:
        self.ctx.shared_listeners.pop((self.host, self.port), None)
        self.acceptor.stop()
        for read in list(self.reads):
            read.close()
        self.ctx.loop.forget(self.sock.fileno())
        self.sock.close()

    # ---- connections --------------------------------------------------------
    def _on_accept(self, csock: socket.socket, caddr) -> None:
        if self.mode == PLAIN:
            self.router.fallback.adopt(csock, caddr, self.port, b"", None)
            return
        if len(self.reads) >= MAX_READS_IN_FLIGHT:
            self.counters.reads_reset += 1
            log.limited("warn", "tls.client_hello_reads_full", key=self._key, every=REPEAT_LOG_EVERY,
                        port=self.port, limit=MAX_READS_IN_FLIGHT, action="reset")
            try:
                csock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            csock.close()
            return
        self.reads.add(HelloRead(self, csock, caddr))

    def _on_accept_error(self, exc: OSError, backoff: float | None) -> None:
        extra = {} if backoff is None else {"backoff_ms": int(backoff * 1000)}
        log.limited("warn", "proxy.accept_error", key=self._key, every=REPEAT_LOG_EVERY, port=self.port,
                    errno_name=errno_name(exc), **extra)

    @property
    def _key(self) -> str:
        return f"{self.host}:{self.port}"

    def hello_read(self, read: HelloRead, result: sni.SniResult) -> None:
        self.counters.peek_duration.observe(read.elapsed())
        if result.status not in (sni.OK, sni.NO_SNI):
            self.counters.parse_failures += 1
            log.limited("warn", "tls.parse_failed", key=self._key, every=REPEAT_LOG_EVERY, port=self.port,
                        reason=result.status, bytes=len(read.buf), action="closed")
            read.close()
            return
        relay, result_kind = self.router.route(result.server_name)
        if result.status == sni.NO_SNI:
            log.limited("info", "tls.no_sni", key=self._key, every=REPEAT_LOG_EVERY, port=self.port,
                        action="closed" if relay is None else "fallback")
        elif result_kind in ("fallback", NONE):
            log.limited("info", "tls.sni_no_match", key=self._key, every=REPEAT_LOG_EVERY, port=self.port,
                        server_name=result.server_name, action="closed" if relay is None else "fallback")
        if relay is None:
            self.counters.misses += 1
            read.close()
            return
        log.debug("tls.sni_routed", port=self.port, server_name=result.server_name, rule=relay.rule.rule_id,
                  result=result_kind)
        sock, data = read.release()
        relay.adopt(sock, read.addr, self.port, data, result_kind)

    def hello_timed_out(self, read: HelloRead) -> None:
        self.counters.hello_timeouts += 1
        self.counters.peek_duration.observe(read.elapsed())
        log.limited("warn", "tls.client_hello_timeout", key=self._key, every=REPEAT_LOG_EVERY, port=self.port,
                    timeout_secs=HELLO_TIMEOUT, bytes=len(read.buf), action="closed")
        read.close()

    # ---- observation --------------------------------------------------------
    def snapshot(self) -> dict:
        c = self.counters
        return {"listen_host": self.host, "listen_port": self.port, "mode": self.mode,
                "routes_active": self.router.sni_routes, "fallback": self.router.fallback is not None,
                "hellos_in_flight": len(self.reads), "misses": c.misses, "parse_failures": c.parse_failures,
                "hello_timeouts": c.hello_timeouts, "reads_reset": c.reads_reset,
                "peek_duration_seconds": c.peek_duration.to_dict()}


def attach_shared(ctx: RelayContext, relay) -> SniListener | None:
    """Attach an SNI rule, or a plain rule onto an existing SNI port, to its shared listener.

    None for a rule that listens on its own (a plain rule with no SNI listener on
    its port, any range or UDP rule). Raises BindError / RouteTaken.
    """
    rule = relay.rule
    if rule.protocol != "tcp" or rule.is_range:
        return None
    key = (rule.listen_host, rule.listen_port)
    listener = ctx.shared_listeners.get(key)
    if listener is None:
        if rule.sni_pattern is None:
            return None
        listener = ctx.shared_listeners[key] = SniListener(ctx, *key)
    listener.attach(relay)
    return listener

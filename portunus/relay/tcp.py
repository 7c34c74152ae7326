"""TCP forwarding: listeners, per-connection sessions, splice and userspace pumps.

A ``TcpRuleRelay`` owns the listeners of one rule (one per listen port) and the
sessions they accept; on an SNI port (``relay/sni_listener.py``) it holds a route
of the shared listener instead, which hands it connections with the ClientHello
bytes already read (``adopt``), replayed to the upstream first. A connection is admitted at accept by the
enforcer (quota, owner envelope, rule caps; a refusal is accept-then-RST with ``SO_LINGER 0``).
A ``TcpSession`` dials the target (non-blocking, 3 s timeout, walking down targets and
addresses) and then runs two ``Pump``s (``relay/pump.py``), one per direction, on the splice
fast path when ``limits.splice_allowed`` says so for this new connection, else in userspace.
"""

from __future__ import annotations

import socket
import struct
from functools import partial

from ..log import log
from ..model import Rule
from ..netio import Acceptor, Dialer, errno_name
from .context import REPEAT_LOG_EVERY, BindError, RelayContext, bind_socket
from .enforce import QUOTA_REFUSED
from . import proxy_protocol
from .rule_relay import RuntimeSettings
from .sni_listener import SniListener, attach_shared
from .pump import Pump
from .targets import TargetSet
from .stats import RuleCounters

PROXY_HEADER_TIMEOUT = 3.0
IPPROTO_TCP, TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
_LINGER_RST = struct.pack("ii", 1, 0)


def reset_and_close(sock: socket.socket) -> None:
    """Close with RST (``SO_LINGER 0``): the peer sees a refusal at once, nothing lingers here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class TcpSession(Dialer):
    """One accepted connection and its upstream.

    Built by the relay once the connection is admitted, and that is all the relay does: the
    constructor joins the owner's quota members and the relay's live sessions, counts the
    connection and starts dialing (one call per connection, not three). ``candidates`` is an
    iterator over the target set's order (a list the set replaces, never mutates). It dials the
    upstream itself (``netio.Dialer``: no connect object per connection); ``dialed`` is where
    the dial ends."""

    hands_over_writer = True  # netio.Dialer: the outbound pump's set_reader replaces the dialer's writer

    __slots__ = ("relay", "ctx", "csock", "listen_port", "counters", "up", "candidates",
                 "addrs", "target_port", "pumps", "closed", "target_state", "header_left",
                 "header_timer", "replay", "ticket", "quota")

    def __init__(self, relay: "TcpRuleRelay", csock: socket.socket, listen_port: int, replay: bytes = b"",
                 ticket=None, quota=None):
        self.relay = relay
        ctx = self.ctx = relay.ctx
        self.csock = csock
        self.listen_port = listen_port
        counters = self.counters = relay.counters.ports[listen_port]
        self.up: socket.socket | None = None
        self.dial_done = True  # no dial in flight (netio.Dialer)
        self.header_timer = None
        self.header_left = 0
        self.pumps: tuple = ()
        self.closed = False
        self.target_state = None
        self.replay = replay  # bytes the SNI listener read from the client: the upstream gets them first
        self.ticket = ticket  # limits.Ticket of the admission (None: not admitted through the enforcer)
        self.quota = quota    # the owner's quota.QuotaHandle (None: no owner)
        if quota is not None:
            ctx.enforcer.join(quota, self)  # before anything can close it (close leaves)
        relay.sessions.add(self)
        counters.active_connections += 1
        counters.connections_total += 1
        self.candidates = iter(relay.targets.candidates())
        self._next_target()

    # ---- dialing ----------------------------------------------------------
    def _next_target(self) -> None:
        if self.closed:
            return
        state = next(self.candidates, None)
        if state is None:
            self.close()
            return
        self.target_state = state
        target = state.target
        relay = self.relay
        rule = relay.rule
        self.target_port = target.port + (self.listen_port - rule.listen_port)
        literal = state.literal
        if literal is not None:  # an IP literal: its one address, no resolver round, no closure
            self.addrs = ()
            fam, ip = literal[0]
            ctx = self.ctx
            try:  # self._dial(fam, ip), inline: once per connection
                self.dial(ctx.loop, ip, self.target_port, ctx.connect_timeout, fam, True, ctx.dial_deadlines)
            except OSError as exc:
                self._no_socket(exc)
            return
        self.ctx.resolver.resolve(target.host, rule.prefer_ipv6,
                                  lambda addrs, err: self._on_resolved(state, addrs, err))

    def _on_resolved(self, state, addrs, err) -> None:
        if self.closed:
            return
        if err is not None:
            self.relay.counters.dns_failures += 1
            rule_id = self.relay.rule.rule_id
            log.limited("warn", "rule.dns_failed", key=f"{rule_id}:{state.target.host}", every=REPEAT_LOG_EVERY,
                        rule=rule_id, host=state.target.host, reason=err)
            self._next_target()
            return
        self.addrs = list(addrs)
        self._dial_next_addr()

    def _dial_next_addr(self) -> None:
        addrs = self.addrs
        if addrs:
            self._dial(*addrs.pop(0))
            return
        # every address of this target failed: that is one failed connect for its health
        self.relay.targets.record_failure(self.target_state)
        self._next_target()

    def _dial(self, fam: int, ip: str) -> None:
        ctx = self.ctx
        try:
            self.dial(ctx.loop, ip, self.target_port, ctx.connect_timeout, fam, True, ctx.dial_deadlines)
        except OSError as exc:
            self._no_socket(exc)

    def _no_socket(self, exc: OSError) -> None:
        """No socket for the upstream (e.g. EMFILE): the client's connection ends."""
        log.limited("warn", "proxy.upstream_socket_failed", key=self.relay.rule.rule_id,
                    every=REPEAT_LOG_EVERY, rule=self.relay.rule.rule_id, errno_name=errno_name(exc))
        self.close()

    def dialed(self, up: socket.socket | None, reason: str | None) -> None:
        """The dial ended (``netio.Dialer``): fail over to the next address / target, or relay."""
        if up is None:
            self.relay.counters.connect_failures += 1
            self._dial_next_addr()
            return
        self.up = up
        cs, ctx, relay = self.csock, self.ctx, self.relay
        # the accepted side inherited the listener's options; the upstream gets TCP_NODELAY now and
        # its keepalive within a second (a short connection never pays for it: ctx.keepalive_later)
        try:
            up.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        except OSError:
            pass
        pending = ctx.keepalive_pending
        if pending:
            pending.add(up)  # not empty: its sweep is armed (RelayContext.keepalive_later)
        else:
            ctx.keepalive_later(up)
        state = self.target_state
        relay.targets.record_success(state)
        state.connections += 1
        rule = relay.rule
        splice = ctx.enforcer.splice_allowed(rule)  # per new connection: hot updates count
        if splice and rule.rule_id not in ctx.splice_selected_rules:
            ctx.splice_selected_rules.add(rule.rule_id)
            log.info("proxy.splice_selected", rule=rule.rule_id)
        counters = self.counters
        inbound = Pump(self, cs, up, counters, True, splice)
        outbound = Pump(self, up, cs, counters, False, splice)
        self.pumps = (inbound, outbound)
        replay = self.replay
        version = state.target.proxy_protocol
        if version:
            header = self._proxy_header(version)
            if header is None:
                return
            inbound.pending = header + replay
            self.header_left = len(header)
            self.header_timer = ctx.loop.call_later(PROXY_HEADER_TIMEOUT, self._header_timeout)
        elif replay:
            inbound.pending = replay
        if replay:  # the ClientHello an SNI listener read: end-user bytes like any other
            if self.ticket is not None and self.ticket.bandwidth_capped:
                self.ticket.spend("in", len(replay), ctx.loop.time())
            if self.quota is not None:
                self.quota.debit(len(replay))
            self.replay = b""
        # the upstream is still watched for writing by the dialer (hands_over_writer): the outbound
        # pump's start (Loop.set_reader) takes it over in one update, so it goes first; an inbound
        # pump with pending bytes (SNI replay, PROXY header) may then park on the upstream's writer
        outbound.start()
        inbound.start()

    def _proxy_header(self, version: str) -> bytes | None:
        try:
            src = self.csock.getpeername()[:2]
            dst = self.csock.getsockname()[:2]
        except OSError:
            self.abort("client gone before the PROXY header")
            return None
        return proxy_protocol.encode(version, src, dst)

    def header_written(self, n: int) -> None:
        self.header_left -= n
        if self.header_left <= 0 and self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        log.limited("warn", "proxy.proxy_header_timeout", key=self.relay.rule.rule_id, every=REPEAT_LOG_EVERY,
                    rule=self.relay.rule.rule_id)
        self.abort("PROXY header not written within 3 s")

    # ---- ending -----------------------------------------------------------
    def cut(self, why: str) -> None:
        """The owner's traffic quota ran dry: RST to the end user; the upstream gets a plain close,
        so what was already written to it (and debited) still arrives — the cut lands within the
        chunk in flight, not a socket buffer earlier."""
        if self.closed:
            return
        try:
            self.csock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        self.close(clean=False)

    def abort(self, why: str = "") -> None:
        """Tear down both sides with RST so a reset on one side reaches the other."""
        if self.closed:
            return
        for s in (self.csock, self.up):
            if s is not None:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
        self.close(clean=False)

    def close(self, clean: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.dial_done:
            self.cancel_dial()
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        for p in self.pumps:
            if p.pipe is not None:  # Pump.release only gives back a held pipe: no call without one
                p.release(clean)
        self.pumps = ()  # the pumps point back here: without the cycle, refcounting frees both
        ctx = self.ctx
        loop = ctx.loop
        cs, up = self.csock, self.up
        forget = loop.forget
        forget(cs.fileno(), True)  # closing: closed at once, never dup'd, so no epoll_ctl
        cs.close()
        if up is not None:
            ctx.keepalive_pending.discard(up)
            forget(up.fileno(), True)
            up.close()
        self.counters.active_connections -= 1
        ticket = self.ticket
        if ticket is not None:
            ticket.release(loop.time())
        if self.quota is not None:
            ctx.enforcer.leave(self.quota, self)
        # the relay's side of a session's end: it leaves the live set; a draining relay may go idle
        relay = self.relay
        sessions = relay.sessions
        sessions.discard(self)
        if not sessions and not relay.accepting and relay.on_idle is not None:
            relay.went_idle()


class TcpRuleRelay:
    """The listeners and live sessions of one TCP rule (a ``RuleRelay``)."""

    def __init__(self, ctx: RelayContext, rule: Rule, counters: RuleCounters,
                 settings: RuntimeSettings | None = None):
        self.ctx = ctx
        self.rule = rule
        self.counters = counters
        self.listeners: dict[int, socket.socket] = {}
        self.acceptors: list[Acceptor] = []
        self.shared: SniListener | None = None  # the SNI port's listener this rule routes from
        self.sessions: set[TcpSession] = set()
        self.accepting = False
        self.on_idle = None  # called when draining and the last session ends
        self.targets = TargetSet(rule, counters, ctx.loop, ctx.resolver)

    def bind(self) -> None:
        """Bind every port or none (BindError names the first port that failed).

        An SNI rule, or a plain rule onto an SNI port (its fallback), takes a route of
        the port's shared listener instead.
        """
        self.shared = attach_shared(self.ctx, self)
        if self.shared is not None:
            return
        bound: dict[int, socket.socket] = {}
        try:
            for port in self.rule.listen_ports:
                bound[port] = bind_socket(socket.SOCK_STREAM, self.rule.listen_host, port)
        except BindError:
            for s in bound.values():
                s.close()
            raise
        self.listeners = bound

    def start(self) -> None:
        self.targets.start_probes()
        self.accepting = True
        for port, sock in self.listeners.items():
            acceptor = Acceptor(self.ctx.loop, sock, self._on_accept_for(port), self._on_accept_error_for(port))
            self.acceptors.append(acceptor)
            acceptor.start()

    def update(self, rule: Rule, settings: RuntimeSettings | None = None) -> None:
        """New targets/options for new connections; listeners and live sessions stay."""
        self.rule = rule
        self.targets.update(rule)

    def _on_accept_for(self, port: int):
        return partial(self._admit, port)  # positional: no keyword dict per call

    def adopt(self, csock: socket.socket, caddr, port: int, replay: bytes, sni_result: str | None) -> None:
        """A connection the shared SNI listener routed here (``sni_result`` None: the port is plain now)."""
        if sni_result is not None:
            self.counters.sni_routes[sni_result] += 1
        self._admit(port, csock, caddr, replay)

    def _admit(self, port: int, csock: socket.socket, caddr, replay: bytes = b"") -> None:
        """Quota, owner envelope, then the rule's caps; a refusal is accept-then-RST."""
        verdict = self.ctx.enforcer.admit(self.rule, "tcp")
        if isinstance(verdict, str):
            if verdict == QUOTA_REFUSED:
                self.counters.quota_refused += 1
            reset_and_close(csock)
            return
        TcpSession(self, csock, port, replay, *verdict)  # (ticket, quota); it joins, registers and dials

    def _on_accept_error_for(self, port: int):
        def on_error(exc: OSError, backoff: float | None) -> None:
            # while descriptors are exhausted this repeats every back-off: one line, then a count
            extra = {} if backoff is None else {"backoff_ms": int(backoff * 1000)}
            log.limited("warn", "proxy.accept_error", key=f"{self.rule.rule_id}:{port}",
                        every=REPEAT_LOG_EVERY, rule=self.rule.rule_id, port=port,
                        errno_name=errno_name(exc), **extra)
        return on_error

    def went_idle(self) -> None:
        """Draining and the last session ended: tell the runtime once."""
        cb, self.on_idle = self.on_idle, None
        if cb is not None:
            cb()

    def close_listeners(self) -> None:
        self.targets.stop_probes()
        self.accepting = False
        if self.shared is not None:
            self.shared.detach(self)
            self.shared = None
        for acceptor in self.acceptors:
            acceptor.stop()
        self.acceptors = []
        for sock in self.listeners.values():
            self.ctx.loop.forget(sock.fileno())
            sock.close()
        self.listeners = {}

    def abort_sessions(self) -> None:
        for s in list(self.sessions):
            s.abort("drain timeout")

    @property
    def active(self) -> int:
        return len(self.sessions)

    def snapshot(self) -> list[dict]:
        return self.targets.snapshot()

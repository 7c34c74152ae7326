"""UDP forwarding: one socket per listen port, one connected upstream socket per flow.

A flow is keyed ``(listen_port, source address)``. Its upstream socket is
``connect()``-ed to the target chosen when the flow is created, so replies come
back on it and ICMP errors surface on it (and evict the flow). Sends never
block: a datagram that cannot be sent now is dropped and counted. All receives
go through the loop's one shared buffer, so memory does not grow with flows.

Caps and quotas (``relay/enforce.py``): a new flow is admitted like a TCP connection (a refusal
drops the datagram that would have created it); a bandwidth cap passes or drops each datagram
whole (``bandwidth_dropped_in/out``); the owner's quota is debited per datagram, all or nothing.
"""

from __future__ import annotations

import errno
import socket

from ..log import log
from ..model import Rule
from ..netio import errno_name
from .context import REPEAT_LOG_EVERY, BindError, RelayContext, bind_socket
from .enforce import QUOTA_REFUSED
from .rule_relay import RuntimeSettings
from .stats import RuleCounters
from .targets import TargetSet

RECV_BATCH = 64
PENDING_MAX = 8  # datagrams held while a new flow's target name resolves
_ICMP_ERRNOS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Flow:
    __slots__ = ("relay", "listen_port", "src", "lsock", "up", "last_seen", "pending", "closed", "target_state",
                 "answered", "ticket", "quota")

    def __init__(self, relay: "UdpRuleRelay", listen_port: int, src, lsock: socket.socket, ticket=None, quota=None):
        self.relay = relay
        self.listen_port = listen_port
        self.src = src
        self.lsock = lsock
        self.up: socket.socket | None = None
        self.last_seen = relay.ctx.loop.time()
        self.pending: list[bytes] | None = []  # None once connected
        self.closed = False
        self.target_state = None
        self.answered = False
        self.ticket = ticket  # limits.Ticket of the flow's admission
        self.quota = quota    # the owner's quota.QuotaHandle (None: no owner)

    def passes(self, direction: str, size: int) -> bool:
        """Whether one datagram may go: the bandwidth cap, then the quota (each all or nothing)."""
        ticket, quota = self.ticket, self.quota
        if quota is not None and quota.exhausted:
            self.relay.counters.quota_dropped += 1
            return False
        if ticket is not None and ticket.bandwidth_capped \
                and not ticket.datagram(direction, size, self.relay.ctx.loop.time()):
            return False
        if quota is not None and not quota.admit_datagram(size):
            self.relay.counters.quota_dropped += 1
            return False
        return True

    def cut(self, why: str) -> None:
        """The owner's traffic quota ran dry: the flow ends (its next datagram is refused at admission)."""
        self.relay.remove_flow(self)

    def connect(self, fam: int, ip: str, port: int) -> None:
        up = socket.socket(fam, socket.SOCK_DGRAM)
        up.setblocking(False)
        up.connect((ip, port))
        self.up = up
        self.relay.ctx.loop.add_reader(up.fileno(), self.on_upstream_readable)
        pending, self.pending = self.pending, None
        for data in pending or ():
            self.send_upstream(data)

    def send_upstream(self, data) -> None:
        """Forward one end-user datagram; never blocks."""
        if self.pending is not None:
            if len(self.pending) < PENDING_MAX:
                self.pending.append(bytes(data))
            else:
                self.relay.counters.send_dropped += 1
            return
        counters = self.relay.counters
        try:
            self.up.send(data)
        except BlockingIOError:
            counters.send_dropped += 1
            return
        except OSError as exc:
            if exc.errno in _ICMP_ERRNOS:
                self.relay.evict_icmp(self, exc)
            else:
                counters.send_dropped += 1
            return
        pc = counters.ports[self.listen_port]
        pc.datagrams_in += 1
        pc.bytes_in += len(data)
        self.target_state.bytes_in += len(data)

    def on_upstream_readable(self) -> None:
        relay = self.relay
        view = relay.ctx.udp_view
        pc = relay.counters.ports[self.listen_port]
        for _ in range(RECV_BATCH):
            try:
                n = self.up.recv_into(view)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:
                    relay.evict_icmp(self, exc)
                return
            self.last_seen = relay.ctx.loop.time()
            if not self.passes("out", n):
                continue
            try:
                self.lsock.sendto(view[:n], self.src)
            except OSError:
                relay.counters.send_dropped += 1
                continue
            pc.datagrams_out += 1
            pc.bytes_out += n
            self.target_state.bytes_out += n
            if not self.answered:
                self.answered = True
                relay.targets.record_success(self.target_state)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ticket is not None:
            self.ticket.release(self.relay.ctx.loop.time())
            self.relay.ctx.enforcer.leave(self.quota, self)
        if self.up is not None:
            self.relay.ctx.loop.forget(self.up.fileno())
            self.up.close()
            self.up = None


class UdpRuleRelay:
    """The listen sockets, flow table and reaper of one UDP rule (a ``RuleRelay``)."""

    def __init__(self, ctx: RelayContext, rule: Rule, counters: RuleCounters,
                 settings: RuntimeSettings | None = None):
        settings = settings or RuntimeSettings()
        self.ctx = ctx
        self.rule = rule
        self.counters = counters
        self.max_flows = rule.udp_max_flows or settings.udp_max_flows
        self.idle_secs = rule.udp_flow_idle_secs or settings.udp_flow_idle_secs
        self.sockets: dict[int, socket.socket] = {}
        self.flows: dict[tuple, Flow] = {}
        self._reaper = None
        self.on_idle = None
        self.targets = TargetSet(rule, counters, ctx.loop, ctx.resolver)

    def bind(self) -> None:
        bound: dict[int, socket.socket] = {}
        try:
            for port in self.rule.listen_ports:
                bound[port] = bind_socket(socket.SOCK_DGRAM, self.rule.listen_host, port)
        except BindError:
            for s in bound.values():
                s.close()
            raise
        self.sockets = bound

    def start(self) -> None:
        for port, sock in self.sockets.items():
            self.ctx.loop.add_reader(sock.fileno(), self._receiver(sock, port))
        self._schedule_reaper()
        self.targets.start_probes()

    def update(self, rule: Rule, settings: RuntimeSettings | None = None) -> None:
        settings = settings or RuntimeSettings()
        self.rule = rule
        self.targets.update(rule)
        self.max_flows = rule.udp_max_flows or settings.udp_max_flows
        self.idle_secs = rule.udp_flow_idle_secs or settings.udp_flow_idle_secs

    def _receiver(self, lsock: socket.socket, port: int):
        view = self.ctx.udp_view
        flows = self.flows

        def on_datagram() -> None:
            now = self.ctx.loop.time()
            for _ in range(RECV_BATCH):
                try:
                    n, src = lsock.recvfrom_into(view)
                except BlockingIOError:
                    return
                except OSError:
                    return
                flow = flows.get((port, src))
                if flow is None:
                    flow = self._new_flow(port, src, lsock)
                    if flow is None:
                        continue
                flow.last_seen = now
                if flow.passes("in", n):
                    flow.send_upstream(view[:n])
        return on_datagram

    def _new_flow(self, port: int, src, lsock) -> Flow | None:
        if len(self.flows) >= self.max_flows:
            self.counters.flows_dropped_overflow += 1  # live flows are never evicted for room
            return None
        verdict = self.ctx.enforcer.admit(self.rule, "udp")
        if isinstance(verdict, str):
            if verdict == QUOTA_REFUSED:
                self.counters.quota_refused += 1
            return None  # the datagram that would have created the flow is dropped
        ticket, quota = verdict
        flow = Flow(self, port, src, lsock, ticket, quota)
        self.ctx.enforcer.join(quota, flow)
        self.flows[(port, src)] = flow
        self.counters.ports[port].active_flows += 1
        offset = port - self.rule.listen_port
        state = self.targets.candidates()[0]  # UDP picks a target once per flow
        state.connections += 1
        flow.target_state = state
        target = state.target
        tport = target.port + offset

        def on_resolved(addrs, err) -> None:
            if flow.closed:
                return
            if err is not None or not addrs:
                self.counters.dns_failures += 1
                log.limited("warn", "rule.udp_dns_failed", key=f"{self.rule.rule_id}:{target.host}",
                            every=REPEAT_LOG_EVERY, rule=self.rule.rule_id, host=target.host, reason=err)
                self.remove_flow(flow)
                return
            fam, ip = addrs[0]
            try:
                flow.connect(fam, ip, tport)
            except OSError as exc:
                log.limited("warn", "rule.udp_flow_connect_failed", key=self.rule.rule_id,
                            every=REPEAT_LOG_EVERY, rule=self.rule.rule_id, errno_name=errno_name(exc))
                self.remove_flow(flow)
        self.ctx.resolver.resolve(target.host, self.rule.prefer_ipv6, on_resolved)
        return flow

    def remove_flow(self, flow: Flow) -> None:
        if self.flows.get((flow.listen_port, flow.src)) is flow:
            del self.flows[(flow.listen_port, flow.src)]
            self.counters.ports[flow.listen_port].active_flows -= 1
        flow.close()
        if not self.flows and not self.sockets and self.on_idle is not None:
            cb, self.on_idle = self.on_idle, None
            cb()

    def evict_icmp(self, flow: Flow, exc: OSError) -> None:
        self.counters.flows_evicted_icmp += 1
        self.targets.record_failure(flow.target_state, "ICMP error")
        log.limited("info", "rule.udp_flow_evicted_icmp", key=self.rule.rule_id, every=REPEAT_LOG_EVERY,
                    rule=self.rule.rule_id, source=f"{flow.src[0]}:{flow.src[1]}", errno_name=errno_name(exc))
        self.remove_flow(flow)

    def _schedule_reaper(self) -> None:
        interval = max(1.0, min(5.0, self.idle_secs / 4))
        self._reaper = self.ctx.loop.call_later(interval, self._reap)

    def _reap(self) -> None:
        cutoff = self.ctx.loop.time() - self.idle_secs
        for flow in [f for f in self.flows.values() if f.last_seen < cutoff]:
            self.remove_flow(flow)
        self._schedule_reaper()

    def close_listeners(self) -> None:
        """Close the listen sockets and with them every flow: replies go out through them."""
        self.targets.stop_probes()
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for sock in self.sockets.values():
            self.ctx.loop.forget(sock.fileno())
            sock.close()
        self.sockets = {}
        self.abort_sessions()

    def abort_sessions(self) -> None:
        for flow in list(self.flows.values()):
            self.remove_flow(flow)

    @property
    def active(self) -> int:
        return len(self.flows)

    def snapshot(self) -> list[dict]:
        return self.targets.snapshot()

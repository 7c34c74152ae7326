"""UDP forwarding: one socket per listen port, one connected upstream socket per flow.

A flow is keyed ``(listen_port, source address)``. Its upstream socket is
``connect()``-ed to the target chosen when the flow is created, so replies come
back on it and ICMP errors surface on it (and evict the flow). Sends never
block: a datagram that cannot be sent now is dropped and counted. All receives
go through the loop's one shared buffer, so memory does not grow with flows.

Batching (``relay/mmsg.py``): where ``recvmmsg``/``sendmmsg`` are available, a listen socket is
read up to ``mmsg.SLOTS`` datagrams per syscall; each run of consecutive datagrams from one source
goes to its flow's upstream socket in one ``sendmmsg`` (a GSO message per run of equal sizes), a
lone datagram in one ``write`` (the datagrams never leave the receive slots). Replies are read
into the reply slots (one ``recv_into`` for a flow that had one waiting last time and was not read
in the previous turn that had replies, else one ``recvmmsg``), queued, and sent back through the listen
socket with one ``sendmmsg`` per loop turn for every flow read in that turn, each message with its
flow's address. A bandwidth cap is asked per datagram (skipped while ``maybe_capped`` says no cap
can bind the rule); every datagram is counted (per recvmmsg round, or per turn for replies, for
the port counters) and dropped alone, and a flow whose upstream is full or refused, or a full
listen socket, never holds anything up. Where the calls are missing or refused the per-datagram
path below (``recvfrom_into``/``send``/``sendto``) is used instead.

Caps and quotas (``relay/enforce.py``): a new flow is admitted like a TCP connection (a refusal
drops the datagram that would have created it); a bandwidth cap passes or drops each datagram
whole (``bandwidth_dropped_in/out``); the owner's quota admits each datagram whole or not at all,
in order. The batched path debits it in one step where that gives the same answer: once per
recvmmsg round when the round's bytes are less than the budget left (no datagram of it can be
refused), per read of replies with ``QuotaHandle.admit_datagrams``; a round that could end the
budget goes datagram by datagram.
"""

from __future__ import annotations

import errno
import os
import socket

from ..log import log
from ..model import Rule
from ..netio import errno_name
from .context import REPEAT_LOG_EVERY, BindError, RelayContext, bind_socket
from .enforce import QUOTA_REFUSED
from .limiter_book import CAP_EPOCH
from .rule_relay import RuntimeSettings
from .stats import RuleCounters
from .targets import TargetSet

RECV_BATCH = 64
BATCH_ROUNDS = 2  # recvmmsg calls per readiness event (2 x mmsg.SLOTS = RECV_BATCH datagrams)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
# relay/mmsg.py (and ctypes, ~2 ms) is imported with the first UDP rule, not at startup; these
# word indexes of its arrays (ABI constants, not state) are bound then by _load_mmsg()
mmsg = None
_HDR_U32 = _LEN_WORD = _IOV_WORD = _IOVLEN_WORD = _CTRLLEN_WORD = 0
_get_errno = None


def _load_mmsg():
    global mmsg, _HDR_U32, _LEN_WORD, _IOV_WORD, _IOVLEN_WORD, _CTRLLEN_WORD, _get_errno
    if mmsg is None:
        import ctypes

        from . import mmsg as m
        _HDR_U32 = m.HDR_SIZE // 4
        _LEN_WORD, _IOV_WORD, _IOVLEN_WORD, _CTRLLEN_WORD = m._LEN_WORD, m._IOV_WORD, m._IOVLEN_WORD, m._CTRLLEN_WORD
        _get_errno = ctypes.get_errno
        mmsg = m
    return mmsg


_NO_QUOTA = object()  # the round's quota handle when it may run dry: no flow's, so all are gated


def _oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))
PENDING_MAX = 8  # datagrams held while a new flow's target name resolves
# The kernel queue of a listen socket (one per port, whatever the flows): the default (~208 KiB,
# ~250 small datagrams, 5 ms at 50 k/s) overflows whenever the reactor is off the CPU for a few
# ms on a busy host. Asked for, not forced: the kernel caps it at net.core.rmem_max.
LISTEN_RCVBUF = 2 * 1024 * 1024


def _grow_rcvbuf(sock: socket.socket) -> None:
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 2 * LISTEN_RCVBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
    except OSError:
        pass
_ICMP_ERRNOS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Flow:
    __slots__ = ("relay", "listen_port", "src", "lsock", "up", "last_seen", "pending", "closed", "target_state",
                 "answered", "ticket", "quota", "fd", "key", "name_buf", "name_addr", "name_len", "gso_max", "pc",
                 "direct", "burst", "rturn")

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
        self.fd = -1          # the upstream socket's fd once connected
        self.key = None       # the batched path's key of ``src`` (mmsg.Batch.name_key)
        self.name_buf = None  # the batched path: src as a sockaddr, msg_name of its replies
        self.name_addr = 0
        self.name_len = 0
        self.gso_max = 0  # the batched path: segment sizes that may go as one GSO send (mmsg.GSO_OFF)
        self.pc = relay.counters.ports[listen_port]  # this port's counters (the relay keeps them)
        self.direct = False  # connected and no quota: the batched path's lone datagrams skip the gates
        self.burst = True    # the batched path: replies drain with recvmmsg (else: one recv_into)
        self.rturn = -2      # the batched path: Batch.turn when its replies were last read

    def passes(self, direction: str, size: int) -> bool:
        """Whether one datagram may go: the bandwidth cap, then the quota (each all or nothing).
        The batched path asks it only where there is a cap or a quota, once per datagram, so a
        batch is trimmed to the allowance exactly."""
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
        try:
            up.setblocking(False)
            up.connect((ip, port))
        except OSError:
            up.close()
            raise
        self.up = up
        self.fd = up.fileno()
        self.direct = self.quota is None
        reader = self.on_upstream_batch if self.relay.batch is not None else self.on_upstream_readable
        self.relay.ctx.loop.add_reader(self.fd, reader)
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
        if self.closed:  # an event of this turn after the flow went (its fd may be reused already)
            return
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

    # ---- the batched path (relay.batch is an mmsg.Batch) ---------------------------------
    def forward_batch(self, b: mmsg.Batch, lens: list, k: int, j: int, rq=None) -> int:
        """Send inbound slots ``k..j-1`` (all from this flow's source; ``lens``: the round's
        datagram lengths) upstream in one sendmmsg.
        Returns the slot to go on from: ``j``, or after an ICMP eviction the slot after the one
        that met it (the rest of the run then makes a new flow, as datagram by datagram).

        ``rq``: the quota handle this recvmmsg round knows cannot run dry in it (the round's
        bytes are less than its budget); when it is this flow's and no cap binds, the run is
        not gated and what it took is added to ``relay.round_debt``, debited once per round."""
        ticket = self.ticket
        capped = ticket is not None and self.relay.maybe_capped() and ticket.bandwidth_capped
        quota = self.quota
        if quota is None or capped or quota is not rq:
            return self._forward_run(b, lens, k, j, capped or quota is not None)
        end = self._forward_run(b, lens, k, j, False)
        self.relay.round_debt += sum(lens[k:end])
        return end

    def _forward_run(self, b: mmsg.Batch, lens: list, k: int, j: int, gate: bool) -> int:
        if self.pending is not None:  # the target name is still resolving: copies are held
            data = b.inbound.data
            for i in range(k, j):
                n = lens[i]
                if not gate or self.passes("in", n):
                    self.send_upstream(data(i, n))
            return j
        tx = b.up_tx
        if not gate:
            # the run as it lies: iovec x carries receive slot x (k..j-1); bases and lengths are
            # written in one C call each, and pack_messages lays a run of equal sizes out whole
            run = lens[k:j]
            iov = tx.iov
            iov[2 * k:2 * j:2] = b.inbound.addr_words[k:j]
            iov[2 * k + 1:2 * j:2] = mmsg.words(run)
            firsts, counts = mmsg.pack_messages(tx, k, j, self.gso_max)
            nm = len(firsts)
            r = b.sendmmsg(self.fd, tx.ptr, nm, 0)
            if r == nm:  # the common case: all of them went
                total = sum(run)
                pc = self.pc
                pc.datagrams_in += j - k
                pc.bytes_in += total
                self.target_state.bytes_in += total
                return j
            return self._send_rest(b, j, firsts, counts, r, j, None)
        iov, addrs, origin = tx.iov, b.inbound.addrs, b.origin
        c = total = 0
        for i in range(k, j):
            n = lens[i]
            if not self.passes("in", n):
                continue
            iov[2 * c] = addrs[i]
            iov[2 * c + 1] = n
            origin[c] = i
            c += 1
            total += n
        if not c:
            return j
        if c == 1:  # one datagram: header 0 as a plain message
            words = tx.words
            words[_IOV_WORD] = tx.iov_addr
            words[_IOVLEN_WORD] = 1
            words[_CTRLLEN_WORD] = 0
            firsts = counts = None
            nm = 1
        else:
            firsts, counts = mmsg.pack_messages(tx, 0, c, self.gso_max)
            nm = len(firsts)
        r = b.sendmmsg(self.fd, tx.ptr, nm, 0)
        if r == nm:  # the common case: all of them went
            pc = self.pc
            pc.datagrams_in += c
            pc.bytes_in += total
            self.target_state.bytes_in += total
            return j
        if firsts is None:
            firsts, counts = [0], [1]
        return self._send_rest(b, c, firsts, counts, r, j, origin)

    def capped(self) -> bool:
        """Whether a bandwidth cap binds this flow now (its ticket's chain)."""
        ticket = self.ticket
        return ticket is not None and ticket.bandwidth_capped

    def send_one_failed(self, exc: OSError) -> None:
        """The write of a run of one (``_batch_receiver``) failed: an ICMP error evicts the flow,
        anything else (EAGAIN: the socket is full; EPERM from a filter...) drops and counts the
        datagram."""
        if exc.errno in _ICMP_ERRNOS:
            self.relay.evict_icmp(self, exc)
        else:
            self.relay.counters.send_dropped += 1

    def _send_rest(self, b: mmsg.Batch, c: int, firsts: list, counts: list, r: int, j: int, origin) -> int:
        """After a partial or failed sendmmsg: go on message by message (forward_batch). The
        datagrams are iovecs ``firsts[0]..c-1`` of ``b.up_tx``; ``origin[x]`` is the receive slot
        of iovec x (None: slot x itself)."""
        relay = self.relay
        counters = relay.counters
        tx = b.up_tx
        iov = tx.iov
        sent = sent_bytes = 0
        s = 0
        nm = len(firsts)
        while s < nm:
            if r > 0:
                d0, d1 = firsts[s], firsts[s + r - 1] + counts[s + r - 1]
                for x in range(d0, d1):
                    sent_bytes += iov[2 * x + 1]
                sent += d1 - d0
                s += r
            else:
                err = _get_errno() if r < 0 else errno.EAGAIN
                d0, cnt = firsts[s], counts[s]
                if err in _AGAIN:
                    counters.send_dropped += c - d0
                    break
                if err in _ICMP_ERRNOS:
                    self._count_in(sent, sent_bytes)
                    relay.evict_icmp(self, _oserror(err))
                    return (d0 if origin is None else origin[d0]) + 1
                if cnt > 1 and err in mmsg.GSO_REFUSED_ERRNOS:
                    # this path takes no GSO (of this size): the rest again, one message each
                    size = iov[2 * d0 + 1]
                    self.gso_max = min(self.gso_max, size - 1) if err == errno.EINVAL else mmsg.GSO_OFF
                    firsts, counts = mmsg.pack_messages(tx, d0, c, self.gso_max)
                    nm, s = len(firsts), 0
                    r = b.sendmmsg(self.fd, tx.ptr, nm, 0)
                    continue
                counters.send_dropped += cnt  # that datagram (EPERM from a filter, EMSGSIZE...)
                s += 1
            if s < nm:
                r = b.sendmmsg(self.fd, tx.at(s), nm - s, 0)
        self._count_in(sent, sent_bytes)
        return j

    def _count_in(self, datagrams: int, size: int) -> None:
        if datagrams:
            pc = self.pc
            pc.datagrams_in += datagrams
            pc.bytes_in += size
            self.target_state.bytes_in += size

    def on_upstream_batch(self) -> None:
        """Replies: read into the free reply slots, queued for the turn's one sendmmsg
        (``flush_replies``, with the replies of every other flow of this listen socket).

        A flow that had one reply waiting when it was last read (request/response traffic, many
        flows with one in flight each) reads the next with one ``recv_into`` (a C call, ~0.8 us
        less than recvmmsg through ctypes) and leaves a second one to the next turn (the socket is
        level-triggered). A flow that had more than one waiting (``burst``), or that was read in
        the previous turn that had replies (``Batch.turn``: what recv_into left behind wakes it
        again on the very next poll, however long the turns take), drains with recvmmsg until a
        read finds one alone."""
        if self.closed:  # an event of this turn after the flow went (its fd may be reused already)
            return
        relay = self.relay
        b = relay.batch
        if b is None or not b.enabled:
            relay.fall_back()
            if not self.closed and self.up is not None:
                self.on_upstream_readable()
            return
        if b.q_sock is not self.lsock and b.q_sock is not None:
            send_queued(b)  # the queue is per listen socket
        if not b.flush_scheduled:  # the turn's first reply: its clock, and the flush after its events
            b.flush_scheduled = True
            b.turn_now = b.now()
            relay.ctx.loop.call_soon(flush_replies, b)
        now = b.turn_now
        turn = b.turn
        if self.burst or self.rturn == turn - 1:
            self.rturn = turn
            self._drain_replies(relay, b, now)
            return
        self.rturn = turn
        cur = b.rx_cursor
        if cur >= b.n:
            send_queued(b)
            cur = 0
        try:
            n = self.up.recv_into(b.reply_views[cur])
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _ICMP_ERRNOS:
                relay.evict_icmp(self, exc)
            return
        self.last_seen = now
        # the quota, and the cap (maybe_capped's answer read inline while CAP_EPOCH stands)
        if (self.quota is not None or ((relay._may_cap or relay._cap_epoch != CAP_EPOCH[0])
                                       and relay.maybe_capped() and self.capped())) \
                and not self.passes("out", n):
            return
        q = b.q_n
        iov = b.reply_tx.iov
        iov[2 * q] = b.replies.addrs[cur]
        iov[2 * q + 1] = n
        b.q_flows[q] = self
        b.q_lens[q] = n
        b.q_n = q + 1
        b.rx_cursor = cur + 1
        b.q_sock = self.lsock

    def _drain_replies(self, relay: "UdpRuleRelay", b: mmsg.Batch, now: float) -> None:
        """``on_upstream_batch`` with recvmmsg: up to BATCH_ROUNDS reads of every free reply slot."""
        rx, tx = b.up_rx, b.reply_tx
        u32, iov = rx.u32, tx.iov
        addrs = b.replies.addrs
        q_flows, q_lens = b.q_flows, b.q_lens
        got = 0  # read by this event: one alone means the next read is a recv_into
        for _ in range(BATCH_ROUNDS):
            cur = b.rx_cursor
            if cur >= b.n:
                send_queued(b)
                cur = 0
            room = b.n - cur
            r = b.recvmmsg(self.fd, rx.ptrs[cur], room, mmsg.MSG_DONTWAIT, None)
            if r <= 0:
                if r < 0:
                    err = _get_errno()
                    if err in _ICMP_ERRNOS:
                        relay.evict_icmp(self, _oserror(err))
                    elif err in mmsg.UNSUPPORTED_ERRNOS:
                        relay.fall_back(err)
                    elif got == 1:
                        self.burst = False
                return
            got += r
            self.last_seen = now
            ticket = self.ticket
            capped = ticket is not None and relay.maybe_capped() and ticket.bandwidth_capped
            q = b.q_n
            if capped:  # the cap (then the quota) per datagram: a reply the cap refuses is not debited
                for i in range(cur, cur + r):
                    n = u32[i * _HDR_U32 + _LEN_WORD]
                    if not self.passes("out", n):
                        continue
                    iov[2 * q] = addrs[i]
                    iov[2 * q + 1] = n
                    q_flows[q] = self
                    q_lens[q] = n
                    q += 1
            else:
                lens = u32[cur * _HDR_U32 + _LEN_WORD:(cur + r) * _HDR_U32:_HDR_U32].tolist()
                ok = r
                quota = self.quota
                if quota is not None:  # one debit for the read; what does not fit is a prefix's rest
                    ok = quota.admit_datagrams(lens)
                    if ok < r:
                        relay.counters.quota_dropped += r - ok
                if ok:
                    iov[2 * q:2 * (q + ok):2] = b.replies.addr_words[cur:cur + ok]
                    iov[2 * q + 1:2 * (q + ok):2] = mmsg.words(lens[:ok])
                    q_flows[q:q + ok] = [self] * ok
                    q_lens[q:q + ok] = lens[:ok]
                    q += ok
            if q - b.q_n > 1:
                b.q_runs = True
            b.q_n = q
            b.rx_cursor = cur + r
            b.q_sock = self.lsock
            if r < room:
                self.burst = got > 1
                return  # drained
        self.burst = True

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
        self.fd = -1
        self.direct = False


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
        self.batch = _load_mmsg().batch_for(ctx)  # None: the per-datagram path
        self._by_key: dict[int, dict] = {}  # the batched path: port -> {source key: flow}
        self.round_quota = None  # the quota handle of the flows admitted last (None: no owner)
        self._cap_epoch = -1     # maybe_capped's answer as of CAP_EPOCH _cap_epoch
        self._may_cap = True
        self.round_debt = 0      # bytes of runs taken against it in this recvmmsg round

    def bind(self) -> None:
        bound: dict[int, socket.socket] = {}
        try:
            for port in self.rule.listen_ports:
                bound[port] = sock = bind_socket(socket.SOCK_DGRAM, self.rule.listen_host, port)
                _grow_rcvbuf(sock)
        except BindError:
            for s in bound.values():
                s.close()
            raise
        self.sockets = bound

    def start(self) -> None:
        for port, sock in self.sockets.items():
            reader = self._batch_receiver(sock, port) if self.batch is not None else self._receiver(sock, port)
            self.ctx.loop.add_reader(sock.fileno(), reader)
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

    def _batch_receiver(self, lsock: socket.socket, port: int):
        b = self.batch
        fam = lsock.family
        rx = b.rx(fam)
        rx_addr, u32 = rx.ptr, rx.u32
        recvmmsg, slots, fd = b.recvmmsg, b.n, lsock.fileno()
        v6 = fam == socket.AF_INET6
        names_q, qstep = b.names_q, mmsg.NAME_STRIDE // 8
        by_key = self._by_key.setdefault(port, {})
        get = by_key.get
        loop = self.ctx.loop
        dontwait = mmsg.MSG_DONTWAIT
        views = b.inbound.views
        cuts, cut_len = b.inbound.cuts, b.inbound.cut_len
        pc = self.counters.ports[port]  # every flow of this port counts here (Flow.pc)
        hu, lw = _HDR_U32, _LEN_WORD

        def on_datagrams() -> None:
            send_one = b.send_one  # looked up per event: tests wrap it
            if not b.enabled:
                self.fall_back()
                self._receiver(lsock, port)()
                return
            for _ in range(BATCH_ROUNDS):
                r = recvmmsg(fd, rx_addr, slots, dontwait, None)
                if r <= 0:
                    if r < 0:
                        err = _get_errno()
                        if err in mmsg.UNSUPPORTED_ERRNOS:
                            self.fall_back(err)
                    return
                now = loop.time()
                # the round's lengths and source keys, each read off the arrays in one C call
                lens = u32[lw:lw + r * hu:hu].tolist()
                keys = b.keys(fam, r) if v6 else names_q[0:r * qstep:qstep].tolist()
                keys.append(None)  # the sentinel after the last: keys[k + 1] always exists
                uncapped = not self.maybe_capped()  # then no flow of this rule has a bandwidth cap
                # the owner's quota (flows of an owned rule: passes() per datagram, unless) ...
                rq = self.round_quota
                if rq is not None and rq.remaining is not None \
                        and (rq.exhausted or rq.remaining <= sum(lens)):
                    rq = _NO_QUOTA  # ... this round could end the budget: datagram by datagram
                din = bin_ = qb = 0  # runs of one: this port's counters, added once per round
                k = 0
                try:
                    while k < r:
                        key = keys[k]
                        flow = get(key)
                        if flow is None:
                            flow = self._new_batch_flow(port, lsock, fam, k, key)
                            if flow is None or flow.closed:
                                k += 1
                                continue
                        flow.last_seen = now
                        k1 = k + 1
                        if keys[k1] != key and (flow.direct or (flow.quota is rq and flow.fd >= 0)) \
                                and (uncapped or not flow.capped()):
                            # one datagram of one flow (many flows, one in flight each): a write(2)
                            # on its connected socket straight from the receive slot
                            n = lens[k]
                            if not flow.direct:
                                qb += n  # the owner's quota, debited once at the end of the round
                            if cut_len[k] != n:  # the slot cut to this length (kept: sizes repeat)
                                cuts[k] = views[k][:n]
                                cut_len[k] = n
                            try:
                                send_one(flow.fd, cuts[k])
                            except OSError as exc:
                                flow.send_one_failed(exc)
                                k = k1
                                continue
                            din += 1
                            bin_ += n
                            flow.target_state.bytes_in += n
                            k = k1
                            continue
                        j = k1
                        while keys[j] == key:  # the sentinel ends the run at r
                            j += 1
                        k = flow.forward_batch(b, lens, k, j, rq)
                finally:
                    if din:
                        pc.datagrams_in += din
                        pc.bytes_in += bin_
                    qb += self.round_debt
                    if qb:  # less than the budget (rq's test above): never ends it
                        self.round_debt = 0
                        rq.debit(qb)
                if r < slots:
                    return  # drained
        return on_datagrams

    def maybe_capped(self) -> bool:
        """Whether a bandwidth cap may bind a flow of this rule now; when not, the batched path
        skips ``Ticket.bandwidth_capped`` (~0.15 us) per datagram. Asked once per recvmmsg round
        and per reply read; the answer is kept until ``CAP_EPOCH`` moves (a cap changed)."""
        if self._cap_epoch == CAP_EPOCH[0]:
            return self._may_cap
        self._cap_epoch = CAP_EPOCH[0]
        self._may_cap = may = self._maybe_capped()
        return may

    def _maybe_capped(self) -> bool:
        """``maybe_capped`` as the book says now.

        Every ticket of this rule holds the rule's limiter (the book's current one, or one retired
        with the rule, whose buckets are gone: it caps nothing) and, when that limiter has an owner,
        that owner's current envelope (``Ticket.chain``). So when neither the current limiter nor
        its owner's envelope has a bandwidth cap, no flow here is capped. An unknown limiter
        (the rule is leaving the book) answers True: each flow is asked."""
        book = self.ctx.enforcer.limits
        lim = book.rules.get(self.rule.rule_id)
        if lim is None or lim.has_bandwidth_cap:
            return True
        if not lim.owner:
            return False
        env = book.owner_limiter(lim.owner)
        return env is not None and env.has_bandwidth_cap

    def _new_batch_flow(self, port: int, lsock, fam: int, k: int, key) -> Flow | None:
        raw = self.batch.raw_name(fam, k)
        try:
            src = mmsg.decode_sockaddr(raw)
        except ValueError:
            return None
        flow = self.flows.get((port, src))
        if flow is None:
            flow = self._new_flow(port, src, lsock)
            if flow is None:
                return None
        flow.key = key
        flow.name_buf, flow.name_addr, flow.name_len = mmsg.name_buffer(raw)
        flow.gso_max = self.batch.gso_max
        self._by_key.setdefault(port, {})[key] = flow
        return flow

    def fall_back(self, err: int = 0) -> None:
        """recvmmsg/sendmmsg were refused (ENOSYS/EPERM): this context goes per datagram."""
        b = self.batch
        if b is None:
            return
        if b.enabled:
            b.disable()
            log.warn("proxy.udp_batch_unsupported_fallback", rule=self.rule.rule_id,
                     errno_name=errno.errorcode.get(err, str(err)))
            flush_replies(b)
        self.batch = None
        self._by_key = {}
        loop = self.ctx.loop
        for port, sock in self.sockets.items():
            loop.add_reader(sock.fileno(), self._receiver(sock, port))
        for flow in self.flows.values():
            if flow.up is not None:
                loop.add_reader(flow.fd, flow.on_upstream_readable)

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
        self.round_quota = quota  # the rule's owner's (the batched path's one debit per round)
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
        if flow.key is not None:
            by_key = self._by_key.get(flow.listen_port)
            if by_key is not None and by_key.get(flow.key) is flow:
                del by_key[flow.key]
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


def flush_replies(b: mmsg.Batch) -> None:
    """Send the queued replies now: the end of the loop turn (``call_soon``-ed by the turn's
    first reply), a fallback, a test. Ends a turn that had replies (``Batch.turn``)."""
    b.flush_scheduled = False
    b.turn += 1
    send_queued(b)


def send_queued(b: mmsg.Batch) -> None:
    """Send the queued replies through their listen socket: one sendmmsg (more only after a
    partial send), a GSO message per run of one flow's equal-sized replies. A reply that cannot
    go now is dropped and counted on its rule."""
    q = b.q_n
    sock = b.q_sock
    runs = b.q_runs
    b.q_n = 0
    b.rx_cursor = 0
    b.q_sock = None
    b.q_runs = False
    if not q:
        return
    flows = b.q_flows
    fd = sock.fileno()
    if fd < 0:  # the rule's listeners closed meanwhile
        for i in range(q):
            flows[i].relay.counters.send_dropped += 1
        return
    tx = b.reply_tx
    if runs:
        firsts, counts = mmsg.pack_messages(tx, 0, q, 0, flows)
        count_out = _count_out
    else:  # one reply per flow (or no GSO to try): a message each, laid out in a few C calls
        firsts, counts = mmsg.pack_named_singles(tx, q, [f.name_addr for f in flows[:q]], flows[0].name_len)
        count_out = _count_out_singles
    nm = len(firsts)
    s = 0
    r = b.sendmmsg(fd, tx.ptr, nm, 0)
    if r == nm:
        count_out(b, 0, q)
        return
    while s < nm:
        if r > 0:
            count_out(b, firsts[s], firsts[s + r - 1] + counts[s + r - 1])
            s += r
        else:
            err = _get_errno() if r < 0 else errno.EAGAIN
            d0, cnt = firsts[s], counts[s]
            if err in _AGAIN:
                for i in range(d0, q):
                    flows[i].relay.counters.send_dropped += 1
                return
            if cnt > 1 and err in mmsg.GSO_REFUSED_ERRNOS:
                f = flows[d0]
                size = tx.iov[2 * d0 + 1]
                f.gso_max = min(f.gso_max, size - 1) if err == errno.EINVAL else mmsg.GSO_OFF
                firsts, counts = mmsg.pack_messages(tx, d0, q, 0, flows)
                nm, s = len(firsts), 0
                r = b.sendmmsg(fd, tx.ptr, nm, 0)
                continue
            flows[d0].relay.counters.send_dropped += cnt  # that one (EPERM from a filter...)
            s += 1
        if s < nm:
            r = b.sendmmsg(fd, tx.at(s), nm - s, 0)


def _count_out_singles(b: mmsg.Batch, start: int, end: int) -> None:
    """``_count_out`` of replies that went one message each: the port's counters (one listen
    socket: one port of one rule) added once."""
    flows, lens = b.q_flows, b.q_lens
    pc = flows[start].pc
    dgrams, tot = end - start, sum(lens[start:end])
    for i in range(start, end):
        f = flows[i]
        f.target_state.bytes_out += lens[i]
        if not f.answered:
            f.answered = True
            f.relay.targets.record_success(f.target_state)
        if f.pc is not pc:  # never, while a queue is one listen socket's: counted exactly anyway
            f.pc.datagrams_out += 1
            f.pc.bytes_out += lens[i]
            dgrams -= 1
            tot -= lens[i]
    pc.datagrams_out += dgrams
    pc.bytes_out += tot


def _count_out(b: mmsg.Batch, start: int, end: int) -> None:
    flows, lens = b.q_flows, b.q_lens
    i = start
    while i < end:
        f = flows[i]
        cnt = tot = 0
        while i < end and flows[i] is f:
            tot += lens[i]
            cnt += 1
            i += 1
        pc = f.pc
        pc.datagrams_out += cnt
        pc.bytes_out += tot
        f.target_state.bytes_out += tot
        if not f.answered:
            f.answered = True
            f.relay.targets.record_success(f.target_state)

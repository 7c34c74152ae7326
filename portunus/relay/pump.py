"""One direction of a TCP session: splice or userspace copy, back-pressure, rate caps, quota.

A pump moves bytes src -> dst with ``os.splice`` through a pooled pipe (the Linux fast path) or
with ``recv_into``/``send`` through the loop's shared buffer. A pump that may splice starts in
userspace anyway and moves to splice on its first read of ``SPLICE_AFTER`` bytes or more: for small
messages (requests, responses, handshakes) a copy costs less than two splices through a pipe, and
a connection that never carries bulk never touches a pipe; bulk moves to the fast path on its first
big read and stays there. It parks its read half while the far
side cannot take more (back-pressure, ``_park``) or while its rate-limit bucket is empty
(``_throttle``: the enforcer's one timer per bucket resumes it), and half-closes the far side on EOF.

Quota: every read asks ``quota.allow`` first and debits what left the source socket, on both
paths; a splice moves at most the remaining budget, so a quota-bound rule keeps the fast path and
the cut lands within the chunk in flight. A bandwidth cap is only ever seen on the userspace path
(the splice predicate keeps capped rules off splice), where each read moves at most the allowance.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from ..log import log
from ..netio import errno_name
from .context import REPEAT_LOG_EVERY
from .limiter_book import CAP_EPOCH
from .splice import SPLICE_FLAGS, UNSUPPORTED_ERRNOS

if TYPE_CHECKING:
    from .stats import PortCounters
    from .tcp import TcpSession

SPLICE_CHUNK = 1 << 20
SPLICE_ROUNDS = 8
SHORT_READ = 64 * 1024  # a read shorter than this usually emptied the socket
# A read of at least this many bytes moves a splice-allowed pump from userspace to splice (0: splice
# from the first byte). Below it a copy through the shared buffer is cheaper than splice in + out.
SPLICE_AFTER = 16 * 1024
_ROUNDS = range(SPLICE_ROUNDS)
write = os.write


class Pump:
    """One direction of a session: src -> dst."""

    __slots__ = ("session", "src", "dst", "sfd", "dfd", "counters", "tcounters", "inbound", "splice",
                 "pipe", "in_pipe", "pending", "eof", "done", "loop", "direction", "ticket", "quota", "throttled",
                 "pool", "upgrade", "view", "capped", "cap_epoch")

    def __init__(self, session: "TcpSession", src: socket.socket, dst: socket.socket,
                 counters: PortCounters, inbound: bool, splice: bool):
        self.session = session
        self.loop = session.ctx.loop
        self.pool = session.ctx.pipes
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.counters = counters
        self.tcounters = session.target_state  # per-target bytes (SPEC §2.6)
        self.inbound = inbound
        # splice allowed: start in userspace until a read of `upgrade` bytes (see SPLICE_AFTER)
        after = SPLICE_AFTER
        self.splice = splice and after <= 0
        self.upgrade = after if splice and after > 0 else 0
        self.view = session.ctx.copy_view
        self.pipe = None
        self.in_pipe = 0
        self.pending = b""
        self.eof = False
        self.done = False
        self.direction = "in" if inbound else "out"
        self.ticket = session.ticket  # rate-limit scopes (None: unlimited, e.g. in unit tests)
        # the ticket's bandwidth_capped as of CAP_EPOCH cap_epoch (-1: not asked yet): asked again
        # only after a cap changed somewhere, not on every read
        self.capped = False
        self.cap_epoch = -1
        self.quota = session.quota    # the owner's traffic quota handle (None: no owner)
        self.throttled = False

    def start(self) -> None:
        if self.pending:
            self.on_writable()
        else:
            # reading becomes the fd's only interest: a dialer that handed the upstream over with
            # its writer still set (netio.Dialer.hands_over_writer) loses it in the same epoll_ctl
            self.loop.set_reader(self.sfd, self._splice_read if self.splice else self._copy_read)

    def _count(self, n: int) -> None:
        if self.inbound:
            self.counters.bytes_in += n
            self.tcounters.bytes_in += n
        else:
            self.counters.bytes_out += n
            self.tcounters.bytes_out += n

    # ---- reading ----------------------------------------------------------
    def on_readable(self) -> None:
        if self.splice:
            self._splice_read()
        else:
            self._copy_read()

    def _splice_read(self) -> None:
        if not self.splice:  # fell back to userspace since this reader was registered
            self._copy_read()
            return
        pool = self.pool
        pipe = self.pipe
        if pipe is None:
            try:
                free = pool.free
                pipe = self.pipe = free.pop() if free else pool.acquire()
            except OSError:
                self._copy_read()  # out of fds for a pipe: move this chunk in userspace
                return
        sfd, dfd, w, r = self.sfd, self.dfd, pipe.w, pipe.r
        splice = os.splice
        # Several read/write rounds per wakeup save epoll round trips on bulk flows.
        quota = self.quota
        for _ in _ROUNDS:
            want = SPLICE_CHUNK if quota is None else quota.allow(SPLICE_CHUNK)
            if want == 0:
                self._quota_dry()
                break
            try:
                n = splice(sfd, w, want, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in UNSUPPORTED_ERRNOS and self.in_pipe == 0:
                    self._fallback(exc)
                    return
                self.session.abort(f"read: {exc.strerror}")
                return
            if n == 0:
                self._on_eof()
                return
            if quota is not None:
                quota.debit(n)
            got = n
            in_pipe = self.in_pipe = self.in_pipe + n
            while in_pipe:
                try:
                    n = splice(r, dfd, in_pipe, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    self._park()
                    return
                except OSError as exc:
                    self.session.abort(f"write: {exc.strerror}")
                    return
                in_pipe = self.in_pipe = in_pipe - n
                if self.inbound:
                    self.counters.bytes_in += n
                    self.tcounters.bytes_in += n
                else:
                    self.counters.bytes_out += n
                    self.tcounters.bytes_out += n
            if got < SHORT_READ:
                break  # the socket is most likely drained: skip the splice that would fail with EAGAIN
        if self.in_pipe == 0:
            free = pool.free
            if len(free) < pool.max_pooled:  # pool.release(pipe, clean=True), inline: once per wakeup
                free.append(pipe)
            else:
                pipe.close()
            self.pipe = None

    def _splice_flush(self) -> bool:
        """Move what sits in the pipe to dst. True when the pipe is empty again."""
        pipe = self.pipe
        while self.in_pipe:
            try:
                n = os.splice(pipe.r, self.dfd, self.in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self._park()
                return False
            except OSError as exc:
                self.session.abort(f"write: {exc.strerror}")
                return False
            self.in_pipe -= n
            self._count(n)
        self.session.ctx.pipes.release(pipe, clean=True)
        self.pipe = None
        return True

    def _fallback(self, exc: OSError) -> None:
        rule_id = self.session.relay.rule.rule_id
        log.limited("warn", "proxy.splice_unsupported_fallback", key=rule_id, every=REPEAT_LOG_EVERY,
                    rule=rule_id, errno_name=errno_name(exc))
        if self.pipe is not None:
            self.session.ctx.pipes.release(self.pipe, clean=False)
            self.pipe = None
        self.splice = False
        self._copy_read()

    def _copy_read(self) -> None:
        view = self.view
        want = 0  # recv_into's "the whole buffer"
        quota, ticket = self.quota, self.ticket
        if quota is not None:
            want = quota.allow(len(view))
            if want == 0:
                self._quota_dry()
                return
        if ticket is None:
            capped = False
        elif self.cap_epoch == CAP_EPOCH[0]:
            capped = self.capped
        else:
            self.cap_epoch = CAP_EPOCH[0]
            capped = self.capped = ticket.bandwidth_capped
        if capped:
            want = ticket.allowance(self.direction, want or len(view), self.loop.time())
            if want == 0:
                self._throttle()
                return
        try:
            n = self.src.recv_into(view, want)
        except BlockingIOError:
            return
        except OSError as exc:
            self.session.abort(f"read: {exc.strerror}")
            return
        if n == 0:
            self._on_eof()
            return
        if capped:
            ticket.spend(self.direction, n, self.loop.time())
        if quota is not None:
            quota.debit(n)  # may exhaust: the enforcer cuts the pair's connections from the loop
        try:
            sent = write(self.dfd, view[:n])  # os.write: no argument-tuple parsing, unlike socket.send
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.session.abort(f"write: {exc.strerror}")
            return
        if sent:
            if self.inbound:
                self.counters.bytes_in += sent
                self.tcounters.bytes_in += sent
            else:
                self.counters.bytes_out += sent
                self.tcounters.bytes_out += sent
        upgrade = self.upgrade
        if upgrade and n >= upgrade:  # bulk: the next reads splice (a parked pump resumes via on_readable)
            self.upgrade = 0
            self.splice = True
            if sent == n:
                self.loop.add_reader(self.sfd, self._splice_read)
        if sent < n:
            self.pending = bytes(view[sent:n])
            self._park()

    # ---- rate caps and quota -----------------------------------------------
    def _throttle(self) -> None:
        """The bucket is empty: stop reading until the enforcer's refill timer resumes us."""
        self.loop.remove_reader(self.sfd)
        self.throttled = True
        self.session.ctx.enforcer.park(self.ticket, self.direction, self)

    def resume(self) -> None:
        """Woken by the refill timer (or a hot update that lifted the cap)."""
        if not self.throttled:
            return
        self.throttled = False
        if self.session.closed or self.eof or self.done or self.pending or self.in_pipe:
            return
        self.loop.add_reader(self.sfd, self.on_readable)

    def _quota_dry(self) -> None:
        """Nothing left to move for this pair: the enforcer cuts the session (scheduled by the
        exhaustion); stop reading so the loop does not spin on a readable socket meanwhile."""
        self.loop.remove_reader(self.sfd)
        self.loop.call_soon(self._quota_recheck)

    def _quota_recheck(self) -> None:
        if self.session.closed:
            return
        if self.quota is not None and self.quota.exhausted:
            self.session.cut("traffic quota exhausted")
        elif not (self.eof or self.done or self.pending or self.in_pipe or self.throttled):
            self.loop.add_reader(self.sfd, self.on_readable)  # a fresh state came first

    # ---- back-pressure ----------------------------------------------------
    def _park(self) -> None:
        """dst is full: stop reading src until dst drains."""
        self.loop.remove_reader(self.sfd)
        self.loop.add_writer(self.dfd, self.on_writable)

    def on_writable(self) -> None:
        if self.pending:
            try:
                sent = self.dst.send(self.pending)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.session.abort(f"write: {exc.strerror}")
                return
            if sent:
                self.pending = self.pending[sent:]
                header = self.session.header_left
                if header:  # PROXY protocol bytes are not payload: not counted
                    h = min(sent, header)
                    self.session.header_written(h)
                    sent -= h
                if sent:
                    self._count(sent)
            if self.pending:
                self.loop.add_writer(self.dfd, self.on_writable)
                return
        elif self.in_pipe:
            if not self._splice_flush():
                return
        if self.session.closed:
            return
        self.loop.remove_writer(self.dfd)
        if self.eof:
            self._finish()
        elif not self.throttled:
            self.loop.add_reader(self.sfd, self.on_readable)

    # ---- end of stream ----------------------------------------------------
    def _on_eof(self) -> None:
        self.eof = True
        self.loop.remove_reader(self.sfd)
        if self.pipe is not None and self.in_pipe == 0:
            self.session.ctx.pipes.release(self.pipe, clean=True)
            self.pipe = None
        if not self.pending and not self.in_pipe:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        session = self.session
        pumps = session.pumps
        if len(pumps) == 2 and pumps[0].done and pumps[1].done:
            session.close()  # both directions ended: the close sends the FIN
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)  # preserve the half-close; the other direction goes on
        except OSError:
            pass

    def release(self, clean: bool) -> None:
        if self.pipe is not None:
            self.session.ctx.pipes.release(self.pipe, clean=clean and self.in_pipe == 0)
            self.pipe = None

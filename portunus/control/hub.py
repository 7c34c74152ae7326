"""Server side of the control channel: client sessions on the loop.

The loop thread owns the control listener and every session. Store writes go to
a worker pool (``Offload``) and come back with ``call_soon_threadsafe``; HTTP
threads reach the hub only through ``Hub.call``, which posts to the loop and
returns a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import concurrent.futures
import errno
import itertools
import socket
import threading
import time
from typing import Callable

from .. import __version__
from ..errors import PortunusError
from ..log import log
from . import messages as m
from . import stats_report
from .channel import Channel
from .offload import Offload
from .registry import ClientRegistry
from .session import REQUEST_ID_UNKNOWN, RULE_NOT_OWNED, ClientSession

FIRST_MESSAGE_TIMEOUT = 10.0
PING_INTERVAL = 15.0
DEAD_AFTER = 45.0
# the ping round is spread over the interval: every PING_INTERVAL / HEARTBEAT_SLICES seconds the sessions of
# one slice (serial % HEARTBEAT_SLICES) are pinged, so 1 000 clients cost 67 pings a second, not a 1 000-ping
# burst (and its 1 000 pongs) that holds the loop for tens of ms every 15 s in front of pushes and acks
HEARTBEAT_SLICES = 15
PERSIST_CHECK_DELAY = 1.0  # an acked push's state is checked (and stored if its waiter gave up) this much later
# After a burst of TLS handshakes (a reconnect storm) glibc keeps most of the memory they used as free heap:
# ~45 KB a connection. Once TRIM_AFTER_CHURN channels were admitted or closed, the next heartbeat tick (at most every
# TRIM_EVERY s) hands it back with malloc_trim(0) on an Offload thread (glibc only; elsewhere a no-op).
TRIM_AFTER_CHURN = 64
TRIM_EVERY = 10.0
REJECT_LOG_EVERY = 60.0  # seconds between control.rejected / control.message_rejected lines per key
MAX_REMOVING = 4096  # removals a session remembers so their late "removed" status is still accepted

# why a message about a rule was dropped (label of portunus_control_rejected_messages_total)
QUOTA_NOT_OWNED = "quota_not_owned"  # a traffic_quota_exhausted about another client
REJECT_REASONS = (RULE_NOT_OWNED, REQUEST_ID_UNKNOWN, QUOTA_NOT_OWNED) + stats_report.REASONS
# closes before authentication that are not the server rejecting a peer
_QUIET_CLOSES = ("peer closed", "read failed", "server shutting down", "enrolled")


class Hub:
    """Accepts client channels, authenticates them, replays rules, routes pushes and acks."""

    def __init__(self, loop, ssl_ctx, registry: ClientRegistry, cfg, *, stats_sink: Callable | None = None):
        self.loop = loop
        self.ssl_ctx = ssl_ctx
        self.registry = registry  # clients and their rules; blocking, so always through self.offload
        self.cfg = cfg
        self.offload = Offload(loop)
        self.sessions: dict[str, ClientSession] = {}
        self.listener: socket.socket | None = None
        self.bound_port: int | None = None  # the port listen() took (control_listen port 0 picks one)
        self.stats_sink = stats_sink  # called on the loop with (client_id, report)
        # optional services, set by serve: replayed before the rules (caps, then quotas), fed by reports
        self.owner_caps = None      # server.owner_caps.OwnerCapService
        self.quotas = None          # server.quotas.QuotaService
        self.report_writer = None   # server.traffic.ReportWriter
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()  # guards the read-only views HTTP threads take
        self.auth_failures: dict[str, int] = {}
        self.rejected_messages: dict[str, int] = {}
        self.owner_stats: dict[str, list[dict]] = {}  # client id -> owner envelope rows of its last report
        self._limited_flushed_at = loop.time()
        self._heartbeat_tick = 0
        self._churn = 0                 # sessions admitted or closed since the last heap trim
        self._trimmed_at = loop.time()
        self.pending_channels: set[Channel] = set()

    # ---- listening --------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            s.close()
            raise PortunusError("startup.listen_failed",
                                f"cannot listen on control_listen {host}:{port}: {exc.strerror}") from None
        s.listen(512)
        s.setblocking(False)
        self.listener = s
        self.loop.add_reader(s.fileno(), self._on_accept)
        self.loop.call_later(PING_INTERVAL / HEARTBEAT_SLICES, self._heartbeat)
        host, self.bound_port = s.getsockname()[:2]
        return host, self.bound_port

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    name = errno.errorcode.get(exc.errno)
                    log.limited("warn", "control.accept_error", key=name, errno_name=name)
                    self.loop.remove_reader(self.listener.fileno())
                    self.loop.call_later(0.2, self.loop.add_reader, self.listener.fileno(), self._on_accept)
                return
            ch = Channel(self.loop, sock, self.ssl_ctx, server_side=True, peer_role="client",
                         on_open=self._on_open, on_message=self._on_message, on_close=self._on_close)
            if not ch.closed:
                self.pending_channels.add(ch)
                ch.context["first_timer"] = self.loop.call_later(FIRST_MESSAGE_TIMEOUT, self._hello_timeout, ch)

    def _on_open(self, ch: Channel) -> None:
        pass  # the client speaks first

    def _hello_timeout(self, ch: Channel) -> None:
        ch.close_code = "hello_timeout"
        ch.close(f"no hello within {FIRST_MESSAGE_TIMEOUT:g} s")

    # ---- messages ---------------------------------------------------------
    def _on_message(self, ch: Channel, msg: dict) -> None:
        session: ClientSession | None = ch.context.get("session")
        mtype = msg["type"]
        if session is None:
            if ch.context.get("authenticating"):
                ch.close_code = "message_before_auth"
                ch.close("message before authentication finished")
                return
            timer = ch.context.pop("first_timer", None)
            if timer is not None:
                timer.cancel()
            if mtype == "hello":
                self._on_hello(ch, msg)
            elif mtype == "enroll":
                self._on_enroll(ch, msg)
            else:
                self._refuse(ch, "protocol_error", f"first message must be hello or enroll, got {mtype!r}")
            return
        if mtype == "rule_status":
            self._on_rule_status(session, msg)
        elif mtype == "stats_report":
            self._on_stats_report(session, msg)
        elif mtype == "traffic_quota_exhausted":
            self._on_quota_exhausted(session, msg)
        elif mtype == "pong":
            pass
        else:
            self._refuse(ch, "protocol_error", f"unexpected message {mtype!r}")

    def _refuse(self, ch: Channel, code: str, message: str) -> None:
        ch.context["close_logged"] = True
        session: ClientSession | None = ch.context.get("session")
        if session is None:
            self._log_rejected(ch, code, message)
        else:  # closes the session: at most one line per connection
            log.warn("control.refused", client_id=session.client_id, peer=ch.peer, code=code, reason=message)
        ch.send(m.error(code, message))
        ch.close(f"{code}: {message}")

    def _count_auth_failure(self, reason: str) -> None:
        with self._lock:
            self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def _on_enroll(self, ch: Channel, msg: dict) -> None:
        ch.context["authenticating"] = True

        def done(fut) -> None:
            ch.context["authenticating"] = False
            if ch.closed:
                return
            try:
                client, token = fut.result()
            except PortunusError as exc:
                self._count_auth_failure("enrollment_invalid")
                ch.context["close_logged"] = True
                log.limited("warn", "enrollment.refused", key=_source(ch.peer), every=REJECT_LOG_EVERY,
                            peer=ch.peer, reason=exc.message)
                ch.send(m.error(exc.code, exc.message))
                ch.close(exc.code)
                return
            log.info("enrollment.redeemed", client_id=client["client_id"], client_name=client["client_name"],
                     peer=ch.peer)
            ch.send(m.enrolled(client["client_id"], client["client_name"], token,
                               client.get("server_endpoint") or ""))
            ch.close("enrolled")
        self.offload.run(self.registry.redeem_enrollment, msg["code"], then=done)

    def _on_hello(self, ch: Channel, msg: dict) -> None:
        if msg["protocol_version"] != m.PROTOCOL_VERSION:
            self._refuse(ch, "protocol_version_unsupported",
                         f"protocol version {msg['protocol_version']} is not supported (server speaks "
                         f"{m.PROTOCOL_VERSION})")
            return
        ch.context["authenticating"] = True

        def done(fut) -> None:
            ch.context["authenticating"] = False
            if ch.closed:
                return
            try:
                client = fut.result()
            except PortunusError as exc:
                reason = "token_revoked" if exc.code == "token_revoked" else "invalid_token"
                self._count_auth_failure(reason)
                ch.context["close_logged"] = True
                log.limited("warn", "auth.failure", key=f"{_source(ch.peer)}:{reason}", every=REJECT_LOG_EVERY,
                            peer=ch.peer, reason=reason)
                ch.send(m.error(exc.code, exc.message))
                ch.close(reason)
                return
            self._admit(ch, client, msg)
        self.offload.run(self.registry.authenticate_client, msg["token"], then=done)

    def _admit(self, ch: Channel, client: dict, hello: dict) -> None:
        old = self.sessions.get(client["client_id"])
        if old is not None:
            old.channel.send(m.error("session_replaced", "a newer connection of this client took over"))
            old.channel.close("replaced by a newer connection")
        session = ClientSession(client, ch, hello)
        self._churn += 1
        ch.context["session"] = session
        self.pending_channels.discard(ch)
        with self._lock:
            self.sessions[session.client_id] = session
        log.info("client.connected", client_id=session.client_id, client_name=session.client_name,
                 remote_addr=session.remote_addr, client_version=session.client_version,
                 capabilities=session.capabilities)
        self.offload.run(self.registry.record_connection, session.client_id,
                         session.client_version, session.capabilities)
        ch.send(m.welcome(
            client_id=session.client_id, client_name=session.client_name, server_version=__version__,
            server_time=time.time(), stats_interval_secs=self.cfg.stats_report_interval_secs,
            udp_max_flows_per_rule=self.cfg.udp_max_flows_per_rule,
            udp_flow_idle_secs=self.cfg.udp_flow_idle_secs))

        def replay(fut) -> None:
            if ch.closed:
                return
            updates, owned, rules = fut.result()
            # pushes sent while the replay loaded are already in session.rules; removals are not in owned
            owned = {rule_id: shape for rule_id, shape in owned.items() if rule_id not in session.removing}
            session.rules = {**owned, **(session.rules or {})}
            # owner caps and quotas before the rules: the envelope and the budget are in place when a
            # rule binds (seed 004); updates published meanwhile are newer than what was read
            for update in updates + session.held_updates:
                ch.send(update)
            session.replayed, session.held_updates = True, []
            for rule in rules:
                session.sent_requests[rule.rule_id] = None
                ch.send(m.rule_push(rule.to_dict(), None))
            ch.send(m.replay_done([r.rule_id for r in rules]))
            log.info("client.replayed", client_id=session.client_id, rules=len(rules), updates=len(updates))

        def replayable() -> tuple[list, dict, list]:
            # a failed rule stays failed until removed: replaying it would be an automatic retry
            every, failed = self.registry.replay_rules(session.client_id)
            owned = {r.rule_id: stats_report.RuleShape.of(r) for r in every}
            return self._replay_updates(session), owned, [r for r in every if r.rule_id not in failed]
        self.offload.run(replayable, then=replay)

    def _replay_updates(self, session: ClientSession) -> list[dict]:
        """Owner caps, then quotas, for a (re)connecting client (off the loop: reads the store)."""
        updates, unsent = [], set()
        for service in (self.owner_caps, self.quotas):
            for update in service.replay_messages(session.client_id) if service is not None else ():
                if session.may_receive(update):
                    updates.append(update)
                else:
                    unsent.add(update["type"])
        if unsent:  # stored state this client cannot enforce (an older client binary)
            log.warn("control.updates_not_supported", client_id=session.client_id, types=sorted(unsent),
                     client_version=session.client_version)
        return updates

    # ---- messages about rules: only the sender's own rules count -----------
    def _reject(self, session: ClientSession, reason: str, detail: str, count: int = 1) -> None:
        with self._lock:
            self.rejected_messages[reason] = self.rejected_messages.get(reason, 0) + count
        log.limited("warn", "control.message_rejected", key=f"{session.serial}:{reason}", every=REJECT_LOG_EVERY,
                    client_id=session.client_id, client_name=session.client_name, peer=session.remote_addr,
                    reason=reason, detail=detail)

    def _on_rule_status(self, session: ClientSession, msg: dict) -> None:
        rule_id, state = msg["rule_id"], msg["state"]
        problem = session.rule_status_problem(msg)
        if problem is not None:
            self._reject(session, problem, f"rule_status {state!r} for rule {rule_id[:64]!r} "
                                           f"(request_id {str(msg.get('request_id'))[:64]!r})")
            return
        waiters = session.waiters.pop(rule_id, [])
        if not waiters and session.last_status.get(rule_id) == (state, msg.get("reason")):
            return  # a repeat nobody waits for: nothing to log, store or resolve
        session.last_status[rule_id] = (state, msg.get("reason"))
        log.info("rule.status", client_id=session.client_id, rule=rule_id, state=state,
                 reason=msg.get("reason"), request_id=msg.get("request_id"))
        if state == "removed":
            session.removing.pop(rule_id, None)
            session.last_status.pop(rule_id, None)
        elif state in ("active", "failed"):
            if waiters:
                # the HTTP push waiting on this ack stores the state itself the moment it wakes; a second
                # write now would contend for SQLite's write lock with it (and the loser sleeps in the busy
                # handler: a push's tail latency). Check a moment later and write only if the waiter gave
                # up before the ack (its 202 left the rule pending).
                def persist_unless_stored() -> None:
                    try:
                        self.registry.set_rule_state_unless_stored(rule_id, state, msg.get("reason"))
                    except PortunusError:
                        pass  # removed meanwhile
                self.loop.call_later(PERSIST_CHECK_DELAY, self.offload.run, persist_unless_stored)
            else:
                def persist() -> None:
                    try:
                        self.registry.set_rule_state(rule_id, state, msg.get("reason"))
                    except PortunusError:
                        pass  # removed meanwhile
                self.offload.run(persist)
        for fut in waiters:
            if not fut.done():
                fut.set_result(msg)

    def _on_stats_report(self, session: ClientSession, msg: dict) -> None:
        if session.rules is None:
            return  # sent before the replay loaded this client's rules: the next report counts
        clean, rejected = [], {}
        for snap in msg["rules"]:
            try:
                clean.append(stats_report.clean_snapshot(snap, session.rules))
            except stats_report.StatsRejected as exc:
                if exc.reason == stats_report.UNKNOWN_RULE and snap.get("rule_id") in session.removing:
                    continue  # counters of a rule removed a moment ago: late, not hostile
                count, _ = rejected.get(exc.reason, (0, exc.detail))
                rejected[exc.reason] = (count + 1, exc.detail)
        try:
            owners = stats_report.clean_owner_rows(msg.get("owners"), session.rules)
        except stats_report.StatsRejected as exc:
            owners = []  # rows the server cannot trust are not shown, and stale ones must not linger
            count, _ = rejected.get(exc.reason, (0, exc.detail))
            rejected[exc.reason] = (count + 1, exc.detail)
        with self._lock:
            self.owner_stats[session.client_id] = owners
        for reason, (count, detail) in rejected.items():
            self._reject(session, reason, detail, count)
        if clean and self.stats_sink is not None:
            at = stats_report.report_time(msg["at"], time.time())
            self.stats_sink(session.client_id, {"rules": clean, "at": at})
        if clean and self.report_writer is not None:
            # accounting: the server's clock buckets the bytes; owners are read on the writer thread
            self.report_writer.enqueue_stats(session.client_id, time.time(), clean)

    def _on_quota_exhausted(self, session: ClientSession, msg: dict) -> None:
        """The client's handle for (user, this client) ran dry: mark it now, off the loop."""
        if msg["client_id"] != session.client_id:
            self._reject(session, QUOTA_NOT_OWNED, f"traffic_quota_exhausted for client {msg['client_id'][:64]!r}")
            return
        if self.quotas is None:
            return
        log.info("traffic_quota.client_exhausted", client_id=session.client_id, user_id=msg["user_id"][:64])
        self.offload.run(self.quotas.client_exhausted, msg["user_id"], session.client_id)

    def _on_close(self, ch: Channel, reason: str) -> None:
        self._churn += 1  # a closed channel's TLS state is freed (heap to hand back), authenticated or not
        self.pending_channels.discard(ch)
        timer = ch.context.pop("first_timer", None)
        if timer is not None:
            timer.cancel()
        session: ClientSession | None = ch.context.get("session")
        if session is None:
            self._log_unauthenticated_close(ch, reason)
            return
        with self._lock:
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
        for futs in session.waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(PortunusError("client_not_connected",
                                                    f"client {session.client_name!r} disconnected"))
        session.waiters.clear()
        log.info("client.disconnected", client_id=session.client_id, client_name=session.client_name,
                 reason=reason)

    def _log_unauthenticated_close(self, ch: Channel, reason: str) -> None:
        """SPEC §3.1: a channel the server closes before authentication gets a logged reason."""
        if ch.context.get("close_logged") or reason.startswith(_QUIET_CLOSES):
            log.debug("control.closed_unauthenticated", peer=ch.peer, reason=reason)
            return
        self._log_rejected(ch, ch.close_code or "closed", reason)

    @staticmethod
    def _log_rejected(ch: Channel, code: str, detail: str) -> None:
        # rate-limited per source and reason: a flood of bad connections cannot fill the disk
        log.limited("warn", "control.rejected", key=f"{_source(ch.peer)}:{code}", every=REJECT_LOG_EVERY,
                    peer=ch.peer, reason=code, detail=detail)

    # ---- liveness ---------------------------------------------------------
    def _heartbeat(self) -> None:
        """One slice of the ping round: each session is pinged (or, silent too long, closed) once per
        PING_INTERVAL, on the tick of its slice."""
        now = self.loop.time()
        if now - self._limited_flushed_at >= REJECT_LOG_EVERY:
            self._limited_flushed_at = now
            log.flush_limited()  # a flood that stopped still gets its suppressed=N summary line
        if self._churn >= TRIM_AFTER_CHURN and now - self._trimmed_at >= TRIM_EVERY:
            self._churn, self._trimmed_at = 0, now
            self.offload.run(release_free_heap)
        slot = self._heartbeat_tick % HEARTBEAT_SLICES
        self._heartbeat_tick += 1
        for session in [s for s in self.sessions.values() if s.serial % HEARTBEAT_SLICES == slot]:
            ch = session.channel
            if now - ch.last_rx > DEAD_AFTER:
                ch.close("peer silent for 45 s")
            else:
                ch.send(m.ping(next(self._nonce)))
        self.loop.call_later(PING_INTERVAL / HEARTBEAT_SLICES, self._heartbeat)

    # ---- calls from other threads -----------------------------------------
    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the loop; the future resolves with its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return fut

    def session_info(self, client_id: str) -> dict | None:
        with self._lock:
            s = self.sessions.get(client_id)
            if s is None:
                return None
            return {"client_id": s.client_id, "capabilities": list(s.capabilities),
                    "client_version": s.client_version, "remote_addr": s.remote_addr,
                    "connected_at": s.connected_at}

    def auth_failure_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.auth_failures)

    def rejected_message_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.rejected_messages)

    def owner_stat_rows(self) -> dict[str, list[dict]]:
        """The owner envelope rows of each client's last report (``portunus_rate_limit_*{rule=""}``)."""
        with self._lock:
            return {client_id: list(rows) for client_id, rows in self.owner_stats.items()}

    def connected_count(self) -> int:
        with self._lock:
            return len(self.sessions)

    def connected_ids(self) -> set[str]:
        with self._lock:
            return set(self.sessions)

    def post_update(self, client_id: str, update: dict) -> None:
        """From any thread: send an owner-cap or quota update to the client if it is connected.
        An offline client gets nothing now; its reconnect replay reads the stored state."""
        self.loop.call_soon_threadsafe(self._send_update, client_id, update)

    def _send_update(self, client_id: str, update: dict) -> None:
        session = self.sessions.get(client_id)
        if session is None or not session.may_receive(update):
            return
        if not session.replayed:
            session.held_updates.append(update)
            return
        session.channel.send(update)

    # the following run on the loop (via call)
    def push_rule(self, client_id: str, rule_dict: dict, request_id: str | None) -> concurrent.futures.Future:
        """Send a rule; the returned future resolves with the client's rule_status."""
        ack: concurrent.futures.Future = concurrent.futures.Future()
        session = self.sessions.get(client_id)
        if session is None or not session.channel.send(m.rule_push(rule_dict, request_id)):
            ack.set_exception(PortunusError("client_not_connected", f"client {client_id} is not connected"))
            return ack
        rule_id = rule_dict["rule_id"]
        if session.rules is None:
            session.rules = {}  # the replay is still loading; it merges what it finds
        session.rules[rule_id] = stats_report.RuleShape.of(rule_dict)
        session.removing.pop(rule_id, None)
        session.sent_requests[rule_id] = request_id
        session.waiters.setdefault(rule_id, []).append(ack)
        return ack

    def remove_rule(self, client_id: str, rule_id: str, request_id: str | None) -> bool:
        session = self.sessions.get(client_id)
        if session is None:
            return False
        if session.rules is not None:
            session.rules.pop(rule_id, None)
        session.sent_requests.pop(rule_id, None)
        session.last_status.pop(rule_id, None)
        session.removing[rule_id] = request_id
        while len(session.removing) > MAX_REMOVING:
            session.removing.pop(next(iter(session.removing)))
        return session.channel.send(m.rule_remove(rule_id, request_id))

    def disconnect(self, client_id: str, code: str, message: str) -> bool:
        session = self.sessions.get(client_id)
        if session is None:
            return False
        session.channel.send(m.error(code, message))
        session.channel.close(code)
        return True

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.channel.close("server shutting down")
        for ch in list(self.pending_channels):
            ch.close("server shutting down")
        if self.listener is not None:
            self.loop.forget(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.offload.close()
        log.flush_limited()


_malloc_trim = None


def release_free_heap() -> bool:
    """Return the C heap's free memory to the kernel (glibc ``malloc_trim(0)``); False where there is none."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


def _source(peer: str) -> str:
    """The source address of a "host:port" peer: the key of per-source rate limits."""
    return peer.rsplit(":", 1)[0] if ":" in peer else peer

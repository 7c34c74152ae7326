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
from .channel import Channel

FIRST_MESSAGE_TIMEOUT = 10.0
PING_INTERVAL = 15.0
DEAD_AFTER = 45.0


class Offload:
    """Run blocking work (sqlite writes) off the loop; deliver the result back on it."""

    def __init__(self, loop, workers: int = 2):
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="portunus-store")

    def run(self, fn: Callable, *args, then: Callable | None = None) -> None:
        fut = self.pool.submit(fn, *args)

        def done(f: concurrent.futures.Future) -> None:
            if then is None:
                exc = f.exception()
                if exc is not None:
                    log.error("store.write_failed", error=f"{type(exc).__name__}: {exc}")
                return
            self.loop.call_soon_threadsafe(then, f)
        fut.add_done_callback(done)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ClientSession:
    __slots__ = ("client_id", "client_name", "channel", "capabilities", "client_version", "connected_at",
                 "remote_addr", "waiters", "stats", "stats_at")

    def __init__(self, client: dict, channel: Channel, hello: dict):
        self.client_id = client["client_id"]
        self.client_name = client["client_name"]
        self.channel = channel
        self.capabilities = list(hello.get("capabilities", []))
        self.client_version = hello.get("client_version")
        self.connected_at = time.time()
        self.remote_addr = channel.peer
        self.waiters: dict[str, list[concurrent.futures.Future]] = {}


class Hub:
    """Accepts client channels, authenticates them, replays rules, routes pushes and acks."""

    def __init__(self, loop, ssl_ctx, store, cfg, *, stats_sink: Callable | None = None):
        self.loop = loop
        self.ssl_ctx = ssl_ctx
        self.store = store
        self.cfg = cfg
        self.offload = Offload(loop)
        self.sessions: dict[str, ClientSession] = {}
        self.listener: socket.socket | None = None
        self.stats_sink = stats_sink  # called on the loop with (client_id, report)
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()  # guards the read-only views HTTP threads take
        self.auth_failures: dict[str, int] = {}
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
        self.loop.call_later(PING_INTERVAL, self._heartbeat)
        return s.getsockname()[:2]

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warn("control.accept_error", errno_name=errno.errorcode.get(exc.errno))
                    self.loop.remove_reader(self.listener.fileno())
                    self.loop.call_later(0.2, self.loop.add_reader, self.listener.fileno(), self._on_accept)
                return
            ch = Channel(self.loop, sock, self.ssl_ctx, server_side=True, peer_role="client",
                         on_open=self._on_open, on_message=self._on_message, on_close=self._on_close)
            if not ch.closed:
                self.pending_channels.add(ch)
                ch.context["first_timer"] = self.loop.call_later(
                    FIRST_MESSAGE_TIMEOUT, lambda c=ch: c.close("no hello within 10 s"))

    def _on_open(self, ch: Channel) -> None:
        pass  # the client speaks first

    # ---- messages ---------------------------------------------------------
    def _on_message(self, ch: Channel, msg: dict) -> None:
        session: ClientSession | None = ch.context.get("session")
        mtype = msg["type"]
        if session is None:
            if ch.context.get("authenticating"):
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
            if self.stats_sink is not None:
                self.stats_sink(session.client_id, msg)
        elif mtype == "pong":
            pass
        else:
            self._refuse(ch, "protocol_error", f"unexpected message {mtype!r}")

    def _refuse(self, ch: Channel, code: str, message: str) -> None:
        log.warn("control.refused", peer=ch.peer, code=code, reason=message)
        ch.send(m.error(code, message))
        ch.close(f"{code}: {message}")

    def _count_auth_failure(self, reason: str) -> None:
        with self._lock:
            self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def _on_enroll(self, ch: Channel, msg: dict) -> None:
        from ..store import clients as store_clients
        ch.context["authenticating"] = True

        def done(fut) -> None:
            ch.context["authenticating"] = False
            if ch.closed:
                return
            try:
                client, token = fut.result()
            except PortunusError as exc:
                self._count_auth_failure("enrollment_invalid")
                log.warn("enrollment.refused", peer=ch.peer, reason=exc.message)
                ch.send(m.error(exc.code, exc.message))
                ch.close(exc.code)
                return
            log.info("enrollment.redeemed", client_id=client["client_id"], client_name=client["client_name"],
                     peer=ch.peer)
            ch.send(m.enrolled(client["client_id"], client["client_name"], token,
                               client.get("server_endpoint") or ""))
            ch.close("enrolled")
        self.offload.run(store_clients.redeem_enrollment, self.store, msg["code"], then=done)

    def _on_hello(self, ch: Channel, msg: dict) -> None:
        from ..store import clients as store_clients
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
                log.warn("auth.failure", peer=ch.peer, reason=reason)
                ch.send(m.error(exc.code, exc.message))
                ch.close(reason)
                return
            self._admit(ch, client, msg)
        self.offload.run(store_clients.authenticate_client, self.store, msg["token"], then=done)

    def _admit(self, ch: Channel, client: dict, hello: dict) -> None:
        from ..store import clients as store_clients
        from ..store import rules as store_rules
        old = self.sessions.get(client["client_id"])
        if old is not None:
            old.channel.send(m.error("session_replaced", "a newer connection of this client took over"))
            old.channel.close("replaced by a newer connection")
        session = ClientSession(client, ch, hello)
        ch.context["session"] = session
        self.pending_channels.discard(ch)
        with self._lock:
            self.sessions[session.client_id] = session
        log.info("client.connected", client_id=session.client_id, client_name=session.client_name,
                 remote_addr=session.remote_addr, client_version=session.client_version,
                 capabilities=session.capabilities)
        self.offload.run(store_clients.record_connection, self.store, session.client_id,
                         session.client_version, session.capabilities)
        ch.send(m.welcome(
            client_id=session.client_id, client_name=session.client_name, server_version=__version__,
            server_time=time.time(), stats_interval_secs=self.cfg.stats_report_interval_secs,
            udp_max_flows_per_rule=self.cfg.udp_max_flows_per_rule,
            udp_flow_idle_secs=self.cfg.udp_flow_idle_secs))

        def replay(fut) -> None:
            if ch.closed:
                return
            rules = fut.result()
            for rule in rules:
                ch.send(m.rule_push(rule.to_dict(), None))
            ch.send(m.replay_done([r.rule_id for r in rules]))
            log.info("client.replayed", client_id=session.client_id, rules=len(rules))
        def replayable() -> list:
            # a failed rule stays failed until removed: replaying it would be an automatic retry
            failed = {r["rule_id"] for r in store_rules.list_rules(self.store, client_id=session.client_id)
                      if r["state"] == "failed"}
            return [r for r in store_rules.rules_for_client(self.store, session.client_id)
                    if r.rule_id not in failed]
        self.offload.run(replayable, then=replay)

    def _on_rule_status(self, session: ClientSession, msg: dict) -> None:
        from ..store import rules as store_rules
        rule_id, state = msg["rule_id"], msg["state"]
        log.info("rule.status", client_id=session.client_id, rule=rule_id, state=state,
                 reason=msg.get("reason"), request_id=msg.get("request_id"))
        if state in ("active", "failed"):
            def persist() -> None:
                try:
                    store_rules.set_rule_state(self.store, rule_id, state, msg.get("reason"))
                except PortunusError:
                    pass  # removed meanwhile
            self.offload.run(persist)
        for fut in session.waiters.pop(rule_id, []):
            if not fut.done():
                fut.set_result(msg)

    def _on_close(self, ch: Channel, reason: str) -> None:
        self.pending_channels.discard(ch)
        timer = ch.context.pop("first_timer", None)
        if timer is not None:
            timer.cancel()
        session: ClientSession | None = ch.context.get("session")
        if session is None:
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

    # ---- liveness ---------------------------------------------------------
    def _heartbeat(self) -> None:
        now = self.loop.time()
        for session in list(self.sessions.values()):
            ch = session.channel
            if now - ch.last_rx > DEAD_AFTER:
                ch.close("peer silent for 45 s")
            else:
                ch.send(m.ping(next(self._nonce)))
        self.loop.call_later(PING_INTERVAL, self._heartbeat)

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

    def connected_count(self) -> int:
        with self._lock:
            return len(self.sessions)

    # the following run on the loop (via call)
    def push_rule(self, client_id: str, rule_dict: dict, request_id: str | None) -> concurrent.futures.Future:
        """Send a rule; the returned future resolves with the client's rule_status."""
        ack: concurrent.futures.Future = concurrent.futures.Future()
        session = self.sessions.get(client_id)
        if session is None or not session.channel.send(m.rule_push(rule_dict, request_id)):
            ack.set_exception(PortunusError("client_not_connected", f"client {client_id} is not connected"))
            return ack
        session.waiters.setdefault(rule_dict["rule_id"], []).append(ack)
        return ack

    def remove_rule(self, client_id: str, rule_id: str, request_id: str | None) -> bool:
        session = self.sessions.get(client_id)
        if session is None:
            return False
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

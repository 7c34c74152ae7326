"""Client side of the control channel: connect, pin, hello, run pushed rules, report.

Everything runs on the client's one loop, beside the data plane it drives through
``RuleRuntime``.
"""

from __future__ import annotations

import random
import socket
import time

from .. import __version__
from ..errors import PortunusError
from ..log import log
from ..model import RateLimit, Rule
from ..netio import TIMEOUT, Connect, errno_name
from ..relay.quota import QuotaHandle, QuotaStateError
from ..relay.runtime import RuleRuntime
from . import messages as m
from .channel import Channel
from .enrollment import split_endpoint
from .redeem import enroll  # noqa: F401 -- re-exported: enrolling itself lives in redeem (no relay import)
from .tls import client_context, fingerprint_der, pins_match

CONNECT_TIMEOUT = 10.0
DEAD_AFTER = 45.0
# What this build can actually run; the rest is refused by the server's capability gate.
SUPPORTED_CAPABILITIES = list(m.CAPABILITIES)

STATS_FRAME_BUDGET = 256 * 1024  # estimated JSON bytes per stats_report frame (cap is 1 MiB)
PER_PORT_LIMIT = 900 * 1024      # ~5 600 ports: wider ranges report totals only
EXIT_PIN_MISMATCH = 1
EXIT_AUTH_FAILURE = 1


def stats_reports(snapshots: list[dict], now: float, owners: list[dict] | None = None) -> list[dict]:
    """``stats_report`` messages for ``snapshots``, split so no frame nears the 1 MiB cap.

    A range too wide for one frame reports its totals without per-port rows. The owner envelope
    rows (``owners``, one per capped owner: a few hundred bytes each) ride on the first frame.
    """
    reports, batch, size = [], [], 0
    for snap in snapshots:
        cost = 200 + 160 * len(snap.get("per_port", ())) + 300 * len(snap.get("per_target", ()))
        if cost > PER_PORT_LIMIT:
            snap = {k: v for k, v in snap.items() if k != "per_port"}
            cost = 200 + 300 * len(snap.get("per_target", ()))
        if batch and size + cost > STATS_FRAME_BUDGET:
            reports.append(m.stats_report(batch, now))
            batch, size = [], 0
        batch.append(snap)
        size += cost
    if batch or owners:
        reports.append(m.stats_report(batch, now))
    if owners and reports:
        reports[0] = m.stats_report(reports[0]["rules"], now, owners)
    return reports


class Agent:
    """The client's end of the control channel; ``loop`` and ``runtime`` are the client's own."""

    def __init__(self, loop, bundle: dict, runtime: RuleRuntime, *, reconnect_initial: float = 0.5,
                 reconnect_max: float = 30.0, stats_interval: float = 5.0, capabilities: list[str] | None = None):
        self.loop = loop
        self.bundle = bundle
        self.runtime = runtime
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.stats_interval = stats_interval
        self.capabilities = list(SUPPORTED_CAPABILITIES if capabilities is None else capabilities)
        self.host, self.port = split_endpoint(bundle["server_endpoint"], lambda what: PortunusError(
            "bundle_invalid", f"server_endpoint in the bundle is not host:port: {what}"))
        self.ssl_ctx = client_context()
        self.channel: Channel | None = None
        self.attempt = 0
        self.exit_code: int | None = None
        self.stopping = False
        self._stats_timer = None
        self._watchdog = None
        self._reconnect_timer = None
        self.connected = False
        self.client_id = bundle.get("client_id", "")
        self.enforcer = runtime.ctx.enforcer
        self.enforcer.set_client_id(self.client_id)
        self.enforcer.exhaustion_hooks.append(self._quota_exhausted)
        self._exhaustion_unsent: set[str] = set()  # users whose exhaustion happened while offline
        # rules pushed on this connection before its replay_done: the replay's list was read from the
        # store before they were stored, so it does not name them, and they must not be removed for that
        self._pushed_before_replay: set[str] | None = None

    # ---- connecting -------------------------------------------------------
    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self.stopping:
            return
        log.info("control.connecting", server=f"{self.host}:{self.port}", attempt=self.attempt + 1)
        self.runtime.ctx.resolver.resolve(self.host, False, self._on_resolved)

    def _on_resolved(self, addrs, err) -> None:
        if self.stopping:
            return
        if err is not None or not addrs:
            self._failed(f"cannot resolve {self.host}: {err}")
            return
        fam, ip = addrs[0]
        try:
            Connect(self.loop, ip, self.port, CONNECT_TIMEOUT, self._on_tcp, family=fam)
        except OSError as exc:  # no descriptor for the socket: try again later
            self._failed(f"socket: {errno_name(exc)}")

    def _on_tcp(self, sock: socket.socket | None, err: str | None) -> None:
        if self.stopping:
            if sock is not None:
                sock.close()
            return
        if sock is None:
            self._failed("connect timeout" if err == TIMEOUT else (err or "connect failed"))
            return
        self.channel = Channel(self.loop, sock, self.ssl_ctx, server_side=False, peer_role="server",
                               on_open=self._on_open, on_message=self._on_message, on_close=self._on_close)

    def _failed(self, reason: str) -> None:
        log.warn("control.connect_failed", server=f"{self.host}:{self.port}", reason=reason)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self.stopping or self.exit_code is not None:
            return
        # full jitter: uniform(0, min(cap, initial * 2^attempt))
        ceiling = min(self.reconnect_max, self.reconnect_initial * (2 ** min(self.attempt, 30)))
        delay = random.uniform(0, ceiling)
        self.attempt += 1
        self._reconnect_timer = self.loop.call_later(delay, self._connect)

    # ---- channel events ---------------------------------------------------
    def _on_open(self, ch: Channel) -> None:
        der = ch.peer_cert_der()
        expected = self.bundle["server_cert_sha256"]
        if der is None or not pins_match(expected, der):
            got = fingerprint_der(der) if der else None
            log.error("control.tls_pinned_mismatch", expected=expected, got=got)
            self.exit_code = EXIT_PIN_MISMATCH
            ch.close("pinned certificate mismatch", flush=False)
            self.loop.stop()
            return
        # only now, with the server proven, does the secret leave this host
        ch.send(m.hello(self.bundle["token"], __version__, self.capabilities))

    def _on_message(self, ch: Channel, msg: dict) -> None:
        t = msg["type"]
        if t == "welcome":
            self.connected = True
            self.attempt = 0
            self._pushed_before_replay = set()
            self.stats_interval = float(msg.get("stats_interval_secs") or self.stats_interval)
            settings = self.runtime.settings
            settings.udp_max_flows = int(msg.get("udp_max_flows_per_rule") or settings.udp_max_flows)
            settings.udp_flow_idle_secs = float(msg.get("udp_flow_idle_secs") or settings.udp_flow_idle_secs)
            log.info("control.connected", server=f"{self.host}:{self.port}", client_id=msg["client_id"],
                     server_version=msg["server_version"])
            self._arm_watchdog()
            self._schedule_stats()
            for user_id in sorted(self._exhaustion_unsent):
                self._quota_exhausted(self.enforcer.quotas.handle(user_id))
        elif t == "rule_update":
            self._on_rule_update(ch, msg)
        elif t == "replay_done":
            # the replay names the stored rules; a push that overtook it (stored after the replay read the
            # store, sent while it loaded) is the server's too: removing it would drop an acked rule
            keep = set(msg["rule_ids"]) | (self._pushed_before_replay or set())
            self._pushed_before_replay = None
            for rule_id in [rid for rid in self.runtime.rules if rid not in keep]:
                self.runtime.remove(rule_id)
        elif t == "ping":
            ch.send(m.pong(msg["nonce"]))
        elif t == "error":
            self._on_error(ch, msg)
        elif t == "owner_rate_limit_update":
            self._on_owner_cap(msg)
        elif t == "traffic_quota_update":
            self._on_quota(msg)
        else:
            log.warn("control.unexpected_message", type=t)

    def _on_rule_update(self, ch: Channel, msg: dict) -> None:
        request_id = msg.get("request_id")
        rule_id = msg["rule_id"]
        if self._pushed_before_replay is not None:
            if msg["action"] == "remove":
                self._pushed_before_replay.discard(rule_id)
            else:
                self._pushed_before_replay.add(rule_id)
        if msg["action"] == "remove":
            log.info("rule.received", rule=rule_id, action="remove", request_id=request_id)
            self.runtime.remove(rule_id)
            ch.send(m.rule_status(rule_id, "removed", request_id=request_id))
            return
        log.info("rule.received", rule=rule_id, action="push", request_id=request_id)
        try:
            rule = Rule.from_dict(msg["rule"], max_range_ports=65535)
        except PortunusError as exc:
            log.warn("rule.failed", rule=rule_id, reason=exc.message, request_id=request_id)
            ch.send(m.rule_status(rule_id, "failed", reason=f"{exc.code}: {exc.message}", code=exc.code,
                                  request_id=request_id))
            return
        status = self.runtime.activate(rule, request_id)
        ch.send(m.rule_status(rule_id, status.state if status.state in ("active", "failed") else "failed",
                              reason=status.reason, code=status.code, port=status.port, request_id=request_id))

    def _on_owner_cap(self, msg: dict) -> None:
        """Replayed before the rules on reconnect, so no rule runs a moment outside its envelope."""
        owner = msg["owner_id"]
        if msg["action"] == "remove":
            self.runtime.set_owner_cap(owner, None)
            log.info("owner_rate_limit.applied", owner=owner, action="remove")
            return
        try:
            cap = RateLimit.from_dict(msg["rate_limit"])
        except PortunusError as exc:
            log.warn("owner_rate_limit.invalid", owner=owner, code=exc.code, reason=exc.message)
            return
        self.runtime.set_owner_cap(owner, cap)
        log.info("owner_rate_limit.applied", owner=owner, action="set", rate_limit=cap.to_dict())

    def _on_quota(self, msg: dict) -> None:
        """Install or remove a (user, client) budget; a fresh state resumes an exhausted pair."""
        user = msg["user_id"]
        self.enforcer.quota_for_user(user)  # watched: its exhaustion cuts and is reported
        try:
            handle = self.enforcer.quotas.apply_update(msg)
        except QuotaStateError as exc:
            log.warn("traffic_quota.invalid_state", user=user, reason=str(exc))
            return
        if msg["action"] == "remove":
            log.info("traffic_quota.applied_remove", user=user)
            return
        if not handle.exhausted:
            self._exhaustion_unsent.discard(user)
        log.info("traffic_quota.applied_set", user=user, monthly_bytes=handle.state.monthly_bytes,
                 budget_remaining_bytes=handle.remaining, exhausted=handle.exhausted)

    def _quota_exhausted(self, handle: QuotaHandle) -> None:
        """Tell the server at once, so it marks ``exhausted_at`` without waiting for a report."""
        ch = self.channel
        if not handle.exhausted:
            self._exhaustion_unsent.discard(handle.user_id)
            return
        if ch is None or not self.connected:
            self._exhaustion_unsent.add(handle.user_id)
            return
        self._exhaustion_unsent.discard(handle.user_id)
        # the counters first, then the trip: the server queues the report before it marks the pair
        # exhausted, so its usage holds every debited byte by the time anyone can clear or raise it
        # (and the fresh state is not installed minus bytes the server has not heard of)
        self._report(ch)
        log.info("traffic_quota.exhausted_reported", user=handle.user_id)
        ch.send(m.traffic_quota_exhausted(handle.user_id, self.client_id, time.time()))

    def _on_error(self, ch: Channel, msg: dict) -> None:
        code = msg["code"]
        if code in ("token_revoked", "unauthenticated", "invalid_token"):
            log.error("auth.failure", reason=code, message=msg["message"])
            self.exit_code = EXIT_AUTH_FAILURE
            ch.close(code)
            self.loop.stop()
            return
        log.warn("control.server_error", code=code, message=msg["message"])

    def _on_close(self, ch: Channel, reason: str) -> None:
        if ch is not self.channel:
            return
        self.channel = None
        was = self.connected
        self.connected = False
        for t in (self._stats_timer, self._watchdog):
            if t is not None:
                t.cancel()
        self._stats_timer = self._watchdog = None
        if self.exit_code is not None or self.stopping:
            return
        if was:
            log.warn("control.disconnected", reason=reason)
        else:
            log.warn("control.connect_failed", server=f"{self.host}:{self.port}", reason=reason)
        self._schedule_reconnect()

    # ---- periodic work ----------------------------------------------------
    def _arm_watchdog(self) -> None:
        def check() -> None:
            ch = self.channel
            if ch is None:
                return
            if self.loop.time() - ch.last_rx > DEAD_AFTER:
                ch.close("server silent for 45 s")
                return
            self._watchdog = self.loop.call_later(5.0, check)
        self._watchdog = self.loop.call_later(5.0, check)

    def _schedule_stats(self) -> None:
        self._stats_timer = self.loop.call_later(self.stats_interval, self._send_stats)

    def _send_stats(self) -> None:
        ch = self.channel
        if ch is None or not self.connected:
            return
        self._report(ch)
        self._schedule_stats()

    def send_stats_now(self) -> None:
        if self.channel is not None and self.connected:
            self._report(self.channel)

    def _report(self, ch: Channel) -> None:
        """Send the counters, split over several frames so wide ranges never hit the frame cap."""
        owners_here = {live.rule.owner for live in getattr(self.runtime, "rules", {}).values()}
        owners = [row for row in self.enforcer.owner_snapshots() if row["owner"] in owners_here]
        for msg in stats_reports(self.runtime.snapshots(per_port=True, per_target=True), time.time(), owners):
            ch.send(msg)
        self.enforcer.quotas.mark_reported()  # the server's next budget includes what was debited so far

    # ---- stopping ---------------------------------------------------------
    def stop(self) -> None:
        self.stopping = True
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        if self.channel is not None:
            self.channel.close("client shutting down")

"""The rule runtime: activate, replace and remove rules atomically on one loop.

This is the seam the client agent and the standalone mode both call. Every
method runs on the loop thread. A rule is ``active`` once every one of its ports
is bound, or ``failed(<reason>)`` with nothing bound; ``removing`` while its
connections drain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..log import log
from ..model import RateLimit, Rule, same_listeners
from .context import BindError, RelayContext
from .rule_relay import RuleRelay, RuntimeSettings
from .stats import RuleCounters
from .tcp import TcpRuleRelay
from .udp import UdpRuleRelay

__all__ = ["RELAYS", "LiveRule", "RuleRuntime", "RuleStatus", "RuntimeSettings"]

RELAYS: dict[str, type] = {"tcp": TcpRuleRelay, "udp": UdpRuleRelay}  # protocol -> RuleRelay


@dataclass(frozen=True)
class RuleStatus:
    rule_id: str
    state: str            # pending | active | failed | removing
    reason: str | None = None
    code: str | None = None
    port: int | None = None

    def to_dict(self) -> dict:
        d = {"rule_id": self.rule_id, "state": self.state, "reason": self.reason}
        if self.code:
            d["code"] = self.code
        if self.port is not None:
            d["port"] = self.port
        return d


class LiveRule:
    __slots__ = ("rule", "counters", "relay", "status")

    def __init__(self, rule: Rule):
        self.rule = rule
        self.counters = RuleCounters(rule.listen_ports)
        self.relay: RuleRelay | None = None  # None until bound (and for a failed rule)
        self.status = RuleStatus(rule.rule_id, "pending")


class RuleRuntime:
    def __init__(self, loop, settings: RuntimeSettings | None = None, ctx: RelayContext | None = None,
                 on_status: Callable[[RuleStatus], None] | None = None):
        self.loop = loop
        self.settings = settings or RuntimeSettings()
        self.ctx = ctx or RelayContext(loop)
        self.on_status = on_status
        self.rules: dict[str, LiveRule] = {}
        self.draining: set[LiveRule] = set()

    # ---- activation -------------------------------------------------------
    def activate(self, rule: Rule, request_id: str | None = None) -> RuleStatus:
        """Add or replace one rule. An unchanged active rule keeps its listeners and connections."""
        rid = {"request_id": request_id} if request_id else {}
        live = self.rules.get(rule.rule_id)
        if live is not None and live.status.state == "active":
            if live.rule == rule:
                log.debug("rule.unchanged", rule=rule.rule_id, **rid)
                return live.status
            # a new SNI pattern is a new route on the shared listener: re-attach (the listener stays).
            # A cap change is a hot update: the limiter keeps its buckets, the splice decision is
            # taken again for each new connection (limits.splice_allowed).
            if same_listeners(live.rule, rule) and live.rule.sni_pattern == rule.sni_pattern:
                live.rule = rule
                self.ctx.enforcer.set_rule(rule)
                live.relay.update(rule, self.settings)
                log.info("rule.updated", rule=rule.rule_id, **rid)
                return live.status
        if live is not None:
            self.remove(rule.rule_id, release_limits=False)  # replaced: its limiter carries over

        self.ctx.enforcer.set_rule(rule)
        live = LiveRule(rule)
        relay: RuleRelay = RELAYS[rule.protocol](self.ctx, rule, live.counters, self.settings)
        self.rules[rule.rule_id] = live
        try:
            relay.bind()
        except BindError as exc:
            live.status = RuleStatus(rule.rule_id, "failed", exc.reason, exc.code, exc.port)
            log.warn("rule.failed", rule=rule.rule_id, reason=exc.reason, port=exc.port, **rid)
            self._emit(live.status)
            return live.status
        live.relay = relay
        relay.start()
        live.status = RuleStatus(rule.rule_id, "active")
        log.info("rule.activated", rule=rule.rule_id, protocol=rule.protocol, listen=rule.listen_label,
                 ports=rule.port_count, targets=[t.label() for t in rule.targets], **rid)
        self._emit(live.status)
        return live.status

    def apply(self, rules: list[Rule]) -> dict[str, RuleStatus]:
        """Make the running set equal ``rules``: drop the missing, keep the unchanged, add the new."""
        wanted = {r.rule_id for r in rules}
        for rule_id in [rid for rid in self.rules if rid not in wanted]:
            self.remove(rule_id)
        return {r.rule_id: self.activate(r) for r in rules}

    # ---- removal ----------------------------------------------------------
    def remove(self, rule_id: str, on_drained: Callable[[], None] | None = None, *,
               release_limits: bool = True) -> bool:
        """Close the rule's listeners now; let its connections drain up to the drain timeout.

        UDP flows end with their listen sockets, so a UDP rule is removed at once. The rule's
        limiter is released (and its owner's envelope with the owner's last rule here) unless the
        rule is being replaced.
        """
        live = self.rules.pop(rule_id, None)
        if live is None:
            return False
        if release_limits:
            self.ctx.enforcer.remove_rule(rule_id)
        relay = live.relay
        live.status = RuleStatus(rule_id, "removing")
        if relay is None:  # a failed rule: nothing bound
            self._finish_removal(live, on_drained)
            return True
        relay.close_listeners()
        if relay.active == 0:
            self._finish_removal(live, on_drained)
            return True
        self.draining.add(live)
        timer = self.loop.call_later(self.settings.drain_timeout, relay.abort_sessions)

        def drained() -> None:
            timer.cancel()
            self.draining.discard(live)
            self._finish_removal(live, on_drained)
        relay.on_idle = drained
        log.info("rule.draining", rule=rule_id, connections=relay.active,
                 drain_timeout_secs=self.settings.drain_timeout)
        return True

    def _finish_removal(self, live: LiveRule, on_drained) -> None:
        log.info("rule.removed", rule=live.rule.rule_id)
        self._emit(RuleStatus(live.rule.rule_id, "removed"))
        if on_drained is not None:
            on_drained()

    def shutdown(self, on_done: Callable[[], None], drain_timeout: float | None = None) -> None:
        """Stop accepting everywhere, drain, then call ``on_done`` (once)."""
        if drain_timeout is not None:
            self.settings.drain_timeout = drain_timeout
        ids = list(self.rules)
        remaining = {"n": len(ids) + 1}

        def one_done() -> None:
            remaining["n"] -= 1
            if remaining["n"] == 0:
                log.flush_limited()  # the counts of rate-limited warnings, before the process goes
                on_done()
        for rule_id in ids:
            self.remove(rule_id, one_done)
        one_done()

    def abort_all(self) -> None:
        for live in list(self.draining):
            live.relay.abort_sessions()

    # ---- owner caps (owner_rate_limit_update) ----------------------------------
    def set_owner_cap(self, owner: str, cap: RateLimit | None) -> None:
        """Install, hot-update (buckets kept) or (``cap`` None) remove an owner's envelope."""
        if cap is None:
            self.ctx.enforcer.remove_owner_cap(owner)
        else:
            self.ctx.enforcer.set_owner_cap(owner, cap)

    # ---- observation ------------------------------------------------------
    def status(self, rule_id: str) -> RuleStatus | None:
        live = self.rules.get(rule_id)
        return live.status if live else None

    def statuses(self) -> list[RuleStatus]:
        return [live.status for live in self.rules.values()]

    def snapshot(self, rule_id: str, per_port: bool = False, per_target: bool = False) -> dict | None:
        live = self.rules.get(rule_id)
        if live is None:
            return None
        snap = {"rule_id": rule_id, "protocol": live.rule.protocol, "state": live.status.state,
                "reason": live.status.reason}
        snap.update(live.counters.snapshot(per_port=per_port))
        limits = self.ctx.enforcer.rule_snapshot(rule_id)
        if limits is not None:
            snap["rate_limit"] = limits  # the limiter counters (control/stats_report.RATE_LIMIT_KEY)
        shared = getattr(live.relay, "shared", None)
        if live.rule.sni_pattern is not None or shared is not None:
            # routes by result per rule; the listener's own counters ride along on each rule of the port
            snap["sni_pattern"] = live.rule.sni_pattern
            snap["sni_routes"] = dict(live.counters.sni_routes)
            if shared is not None:
                snap["sni_listener"] = shared.snapshot()
        if per_target:
            snap["per_target"] = live.relay.snapshot() if live.relay is not None else []
        return snap

    def snapshots(self, per_port: bool = False, per_target: bool = False) -> list[dict]:
        return [self.snapshot(rid, per_port, per_target) for rid in self.rules]

    def _emit(self, status: RuleStatus) -> None:
        if self.on_status is not None:
            self.on_status(status)

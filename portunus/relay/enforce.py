"""The loop side of rate limits and traffic quotas: what the relays call (SPEC §2.9, §2.10).

``relay/limits.py``, ``limiter_book.py`` and ``quota.py`` are sans-IO; this module gives them the loop: one
refill timer per bucket (armed when the first reader parks on it, re-armed from ``due``), the
resumes a hot update hands back, the splice decision per new connection, admission at accept /
flow creation, and the cut of a (user, client) pair's connections when its quota runs dry.

    verdict = ctx.enforcer.admit(rule, "tcp")
    if isinstance(verdict, str): RST (TCP) / drop (UDP)     # one of limits.REJECT_REASONS or QUOTA_REFUSED
    ticket, quota = verdict                                 # quota None: the rule has no owner
    ctx.enforcer.join(quota, session)                       # cut at exhaustion: session.cut(why)
    ctx.enforcer.park(ticket, "in", pump)                   # allowance 0: pump.resume() later
    ctx.enforcer.leave(quota, session); ticket.release(now) # closed

One ``Enforcer`` per ``RelayContext`` (one per client or standalone process).
"""

from __future__ import annotations

from typing import Callable

from ..log import log
from ..model import RateLimit, Rule
from .limiter_book import LimiterBook
from .limits import Ticket, TokenBucket, splice_allowed
from .quota import QuotaBook, QuotaHandle
from .splice import splice_available, splice_disabled_by_env

_LINUX_SPLICE = splice_available()  # the platform does not change while the process runs
QUOTA_REFUSED = "quota_exhausted"  # not a rate-limit reason: counted as the rule's quota_refused


class Enforcer:
    def __init__(self, loop, client_id: str = ""):
        self.loop = loop
        self.limits = LimiterBook(client_id)
        self.quotas = QuotaBook()
        self.exhaustion_hooks: list[Callable[[QuotaHandle], None]] = []  # the agent's report
        self._members: dict[str, set] = {}     # quota user -> live sessions / flows (have .cut(why))
        self._watched: set[str] = set()

    def set_client_id(self, client_id: str) -> None:
        """Before any owner cap is installed (owner envelopes are keyed by (client, owner))."""
        self.limits.client_id = client_id

    # ---- rules and owner caps ------------------------------------------------
    def set_rule(self, rule: Rule) -> None:
        """A rule added or hot-updated: its limiter keeps bucket state across cap changes."""
        self._resume(self.limits.set_rule(rule.rule_id, owner=rule.owner, cap=rule.rate_limit,
                                          now=self.loop.time()))

    def remove_rule(self, rule_id: str) -> None:
        self._resume(self.limits.remove_rule(rule_id, self.loop.time()))

    def set_owner_cap(self, owner: str, cap: RateLimit) -> None:
        self._resume(self.limits.set_owner_cap(owner, cap, self.loop.time()))

    def remove_owner_cap(self, owner: str) -> None:
        self._resume(self.limits.remove_owner_cap(owner, self.loop.time()))

    def splice_allowed(self, rule: Rule) -> bool:
        """Decided per new connection, so a hot update (a cap, the owner's cap, the environment
        variable) reaches the next connection."""
        if not _LINUX_SPLICE:
            return False
        owner_cap = self.limits.owner_cap(rule.owner) if rule.owner else None
        return splice_allowed(rule, owner_cap, linux=True, disabled=splice_disabled_by_env())

    # ---- admission -----------------------------------------------------------
    def quota(self, rule: Rule) -> QuotaHandle | None:
        """The handle of the rule's owner on this client (None: no owner, never metered)."""
        return self.quota_for_user(rule.owner) if rule.owner else None

    def quota_for_user(self, user_id: str) -> QuotaHandle:
        handle = self.quotas.handle(user_id)
        if user_id not in self._watched:
            self._watched.add(user_id)
            handle.add_listener(self._on_exhausted)
        return handle

    def admit(self, rule: Rule, protocol: str) -> tuple[Ticket, QuotaHandle | None] | str:
        """At accept / flow creation: the quota first (an exhausted pair refuses everything), then
        the owner envelope and the rule's caps. Returns (ticket, quota) or the refusal reason."""
        owner = rule.owner
        if owner:
            quota = self.quota_for_user(owner)
            if quota.exhausted:
                return QUOTA_REFUSED
        else:
            quota = None
        limits, rule_id = self.limits, rule.rule_id
        if rule_id not in limits.rules:
            self.set_rule(rule)
        verdict = limits.admit(rule_id, protocol, self.loop.time())
        if verdict.__class__ is str:  # a reject reason (a Ticket otherwise)
            log.limited("info", "rate_limit.rejected", key=f"{rule_id}:{verdict}", every=60.0,
                        rule=rule_id, reason=verdict)
            return verdict
        return verdict, quota

    def join(self, quota: QuotaHandle | None, member) -> None:
        if quota is not None:
            self._members.setdefault(quota.user_id, set()).add(member)

    def leave(self, quota: QuotaHandle | None, member) -> None:
        if quota is not None:
            members = self._members.get(quota.user_id)
            if members is not None:
                members.discard(member)

    # ---- bandwidth: parking and the one refill timer per bucket ---------------
    def park(self, ticket: Ticket, direction: str, waiter) -> None:
        """``waiter`` (with ``resume()``) was allowed nothing: park it until its bucket refills."""
        bucket, arm_at = ticket.park(direction, waiter, self.loop.time())
        if bucket is None:
            self.loop.call_soon(waiter.resume)  # the cap went away meanwhile
        elif arm_at is not None:
            self._arm(bucket, arm_at)

    def _arm(self, bucket: TokenBucket, at: float) -> None:
        self.loop.call_at(at, self._refill_due, bucket, at)

    def _refill_due(self, bucket: TokenBucket, armed_for: float) -> None:
        woken, rearm = bucket.due(self.loop.time(), armed_for=armed_for)
        if rearm is not None:
            self._arm(bucket, rearm)
        for waiter in woken:
            waiter.resume()

    def _resume(self, woken: list) -> None:
        for waiter in woken:
            self.loop.call_soon(waiter.resume)

    # ---- quota exhaustion ----------------------------------------------------
    def _on_exhausted(self, handle: QuotaHandle) -> None:
        # runs inside a pump's debit: cut from the loop, not from under the pump
        self.loop.call_soon(self._cut, handle)
        for hook in self.exhaustion_hooks:
            self.loop.call_soon(hook, handle)

    def _cut(self, handle: QuotaHandle) -> None:
        if not handle.exhausted:
            return  # a fresh state arrived first
        members = list(self._members.get(handle.user_id, ()))
        log.info("traffic_quota.cut", user=handle.user_id, connections=len(members))
        for member in members:
            member.cut("traffic quota exhausted")

    # ---- observation ---------------------------------------------------------
    def rule_snapshot(self, rule_id: str) -> dict | None:
        """The rate-limit counters of one rule for its stats snapshot (docs/rate-limits.md)."""
        lim = self.limits.rules.get(rule_id)
        if lim is None:
            return None
        now = self.loop.time()
        return {"rejects": dict(lim.counters.rejects),
                "throttle_seconds": {d: round(lim.throttle_seconds(d, now), 3) for d in ("in", "out")},
                "throttling": [d for d, b in lim.bandwidth.items() if b is not None and b.waiters],
                "active": lim.concurrent,
                "bandwidth_dropped_in": lim.counters.bandwidth_dropped_in,
                "bandwidth_dropped_out": lim.counters.bandwidth_dropped_out}

    def owner_snapshots(self) -> list[dict]:
        """One row per owner envelope with a cap: its live connections and throttle seconds."""
        if not self.limits.owners:
            return []
        now = self.loop.time()
        return [{"owner": lim.owner, "active": self.limits.owner_active(lim.owner),
                 "throttle_seconds": {d: round(lim.throttle_seconds(d, now), 3) for d in ("in", "out")},
                 "bandwidth_dropped_in": lim.counters.bandwidth_dropped_in,
                 "bandwidth_dropped_out": lim.counters.bandwidth_dropped_out}
                for lim in self.limits.owners.values()]

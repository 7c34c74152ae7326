"""The registry of one client's limiters (SPEC §2.9): a ``Limiter`` per live rule and per owner
envelope with a cap, admission through both, and the rate-limit metric families.

Sans-IO like ``relay.limits`` (whose docstring shows the whole flow): every method takes ``now``.
"""

from __future__ import annotations

from ..model import RateLimit, Rule
from .limits import DIRECTIONS, Limiter, Ticket, splice_allowed

# Bumped by every book whenever a cap may have changed (a rule's or an owner envelope's caps set,
# updated or removed, or the client id the envelopes are keyed by): a reader that caches an answer
# of ``Ticket.bandwidth_capped`` (the TCP pump, asked per read) asks again when this moved. One
# counter per process: a change in one book makes the others' readers ask once more, nothing else.
CAP_EPOCH = [0]


class LimiterBook:
    """Every limiter of one client (or one standalone process): a Limiter per live rule and per
    owner envelope with a cap. Rules come and go with the runtime; owner caps with
    ``owner_rate_limit_update``; an owner cap goes when its owner's last rule here goes."""

    def __init__(self, client_id: str = ""):
        self._client_id = client_id
        self.rules: dict[str, Limiter] = {}
        self.owners: dict[tuple[str, str], Limiter] = {}
        self._owner_live: dict[str, int] = {}   # owner -> live connections over all its rules here

    @property
    def client_id(self) -> str:
        return self._client_id

    @client_id.setter
    def client_id(self, value: str) -> None:
        self._client_id = value  # the owner envelopes' keys follow it
        CAP_EPOCH[0] += 1

    def _owner_key(self, owner: str | None) -> tuple[str, str] | None:
        return (self._client_id, owner) if owner else None

    def owner_limiter(self, owner: str | None) -> Limiter | None:
        key = self._owner_key(owner)
        return self.owners.get(key) if key else None

    def owner_cap(self, owner: str | None) -> RateLimit | None:
        lim = self.owner_limiter(owner)
        return lim.cap if lim else None

    def set_rule(self, rule_id: str, *, owner: str | None, cap: RateLimit | None, now: float) -> list:
        """Add a rule's limiter or hot-update its caps (bucket state kept). Returns waiters to resume."""
        CAP_EPOCH[0] += 1
        lim = self.rules.get(rule_id)
        if lim is None:
            self.rules[rule_id] = Limiter(self._client_id, rule_id, owner, cap, now)
            return []
        return lim.update(cap, now)

    def remove_rule(self, rule_id: str, now: float) -> list:
        """Release a removed rule's limiter, and its owner's cap when that was the owner's last rule."""
        CAP_EPOCH[0] += 1
        lim = self.rules.pop(rule_id, None)
        if lim is None:
            return []
        woken = lim.retire(now)
        if lim.owner and not any(r.owner == lim.owner for r in self.rules.values()):
            woken += self.remove_owner_cap(lim.owner, now)
        return woken

    def set_owner_cap(self, owner: str, cap: RateLimit, now: float) -> list:
        """Install or hot-update the owner envelope (the live connection count of the owner's rules
        carries over, so a lowered concurrency cap refuses new connections and closes none)."""
        CAP_EPOCH[0] += 1
        key = self._owner_key(owner)
        lim = self.owners.get(key)
        if lim is None:
            self.owners[key] = Limiter(self._client_id, None, owner, cap, now)
            return []
        return lim.update(cap, now)

    def remove_owner_cap(self, owner: str, now: float) -> list:
        CAP_EPOCH[0] += 1
        lim = self.owners.pop(self._owner_key(owner), None)
        return lim.retire(now) if lim else []

    def admit(self, rule_id: str, protocol: str, now: float) -> Ticket | str:
        """Admission at accept / flow creation: the owner envelope binds before the rule cap. Nothing
        is consumed unless every scope admits. Returns a Ticket or the reject reason (counted on the
        rule's limiter, which the connection was for)."""
        rule = self.rules[rule_id]
        if rule.cap is None and not rule.owner:
            # nothing can refuse (no cap, no owner envelope): count the connection, nothing else
            rule.concurrent += 1
            return Ticket((rule,), rule, self._owner_live)
        owner = self.owner_limiter(rule.owner)
        chain = (owner, rule) if owner is not None else (rule,)
        for lim in chain:
            live = self.owner_active(rule.owner) if lim.is_owner_envelope else rule.concurrent
            reason = lim.refusal(protocol, live, now)
            if reason is not None:
                rule.counters.rejects[reason] += 1
                return reason
        for lim in chain:
            lim.admit(now)
        rule.concurrent += 1
        if rule.owner:
            self._owner_live[rule.owner] = self._owner_live.get(rule.owner, 0) + 1
        return Ticket(chain, rule, self._owner_live, self)  # the book: the owner's envelope now

    def owner_active(self, owner: str | None) -> int:
        """Live connections and flows over all of ``owner``'s rules here (``…_active_connections``,
        ``rule=""``)."""
        return self._owner_live.get(owner, 0) if owner else 0

    def splice_allowed(self, rule: Rule, *, linux: bool, disabled: bool) -> bool:
        """The splice decision for a new connection of ``rule`` with its owner's current cap."""
        return splice_allowed(rule, self.owner_cap(rule.owner), linux=linux, disabled=disabled)

    def metric_samples(self, now: float) -> dict[str, list[tuple[dict, float]]]:
        """SPEC §8.1 rate-limit families as name -> [(labels, value)]. Rejects are per rule (with
        the reason, ``owner_*`` included); throttle seconds per scope and direction; active
        connections per rule and, for owners with a cap, one aggregate row with ``rule=""``."""
        rejects, throttle, active = [], [], []
        for lim in self.rules.values():
            rejects += [({**lim.labels(), "reason": r}, n) for r, n in lim.counters.rejects.items() if n]
            active.append((lim.labels(), lim.concurrent))
        for lim in [*self.rules.values(), *self.owners.values()]:
            throttle += [({**lim.labels(), "direction": d}, lim.throttle_seconds(d, now))
                         for d in DIRECTIONS if lim.bandwidth[d] is not None or lim.throttle_seconds(d, now)]
        active += [(lim.labels(), self.owner_active(lim.owner)) for lim in self.owners.values()]
        return {"portunus_rate_limit_reject_total": rejects,
                "portunus_rate_limit_throttle_seconds_total": throttle,
                "portunus_rate_limit_active_connections": active}

"""Targets of one rule with their health: ordering, passive checks, active probes.

Passive health (SPEC §2.6): 3 consecutive connect failures within 30 s mark a
target failed; 2 consecutive successes mark it healthy again. A failed target
gets a trial connection at most every 10 s so it can recover even without
active probes. Connections go to the best healthy target and walk down the
list; when every target is failed, the best one is still tried first.
Health is per client process and ephemeral.

The state machine reads time only through the clock it is given (the loop's
by default), so it is tested with a fake one.
"""

from __future__ import annotations

import time
from typing import Callable

from ..log import log
from ..model import Rule, Target, is_ip_literal
from ..netio import Connect, family_of

FAIL_AFTER = 3
FAIL_WINDOW = 30.0
RECOVER_AFTER = 2
TRIAL_INTERVAL = 10.0
PROBE_TIMEOUT = 3.0


class TargetState:
    """Health and counters of one target."""

    __slots__ = ("index", "target", "healthy", "consecutive_failures", "consecutive_successes",
                 "failure_times", "last_failure_at", "last_success_at", "last_trial", "bytes_in", "bytes_out",
                 "connections", "literal")

    def __init__(self, index: int, target: Target):
        self.index = index
        self.target = target  # update() only ever swaps in a target with the same host and port
        # an IP literal needs no resolver round: its one address, decided once per target
        self.literal = ((family_of(target.host), target.host),) if is_ip_literal(target.host) else None
        self.healthy = True
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.failure_times: list[float] = []
        self.last_failure_at: float | None = None
        self.last_success_at: float | None = None
        self.last_trial = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections = 0

    def to_dict(self) -> dict:
        t = self.target
        return {
            "index": self.index, "host": t.host, "port": t.port, "priority": t.priority,
            "proxy_protocol": t.proxy_protocol,
            "health": "healthy" if self.healthy else "failed",
            "consecutive_failures": self.consecutive_failures,
            "last_failure_at": self.last_failure_at, "last_success_at": self.last_success_at,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "connections": self.connections,
        }


class TargetSet:
    """The targets of one rule: the order to try them, passive health, active probes.

    ``clock`` (monotonic seconds) drives the health windows and trials; it
    defaults to the loop's. ``wall_clock`` only stamps ``last_failure_at`` and
    ``last_success_at`` for reports.
    """

    def __init__(self, rule: Rule, counters, loop=None, resolver=None, *,
                 clock: Callable[[], float] | None = None, wall_clock: Callable[[], float] = time.time):
        self.rule = rule
        self.counters = counters
        self.loop = loop
        self.resolver = resolver
        self.clock = clock or (loop.time if loop is not None else time.monotonic)
        self.wall_clock = wall_clock
        self.states = [TargetState(i, t) for i, t in enumerate(rule.targets)]
        self._order = [self.states[i] for i, _ in rule.ordered_targets()]
        self.multi = len(self.states) > 1  # kept with states (read per new connection)
        self._probe_timer = None
        self._probing = False

    def update(self, rule: Rule) -> None:
        """Keep health of targets that stayed the same (same host, port, priority index)."""
        old = {(s.target.host, s.target.port): s for s in self.states}
        self.rule = rule
        states = []
        for i, t in enumerate(rule.targets):
            s = old.get((t.host, t.port))
            if s is None:
                s = TargetState(i, t)
            else:
                s.index, s.target = i, t
            states.append(s)
        self.states = states
        self._order = [self.states[i] for i, _ in rule.ordered_targets()]
        self.multi = len(states) > 1
        if self._probe_timer is not None:
            self.stop_probes()
            self.start_probes()

    def candidates(self) -> list[TargetState]:
        """Targets in the order to try: healthy by priority, then failed by priority.

        A failed target due for a trial is tried in its priority place, so a
        recovered primary wins traffic back without active probes. Once a trial
        has succeeded the target stays in its priority place until it either
        fails again or reaches the 2 successes that make it healthy, so passive
        recovery takes one trial interval, not two.

        The caller only reads the list: with one target it is the set's own order (``update``
        replaces that list, never changes it), not a copy per connection.
        """
        if not self.multi:
            return self._order
        now = self.clock()
        first, failed = [], []
        for s in self._order:
            if s.healthy:
                first.append(s)
            elif s.consecutive_successes > 0 or now - s.last_trial >= TRIAL_INTERVAL:
                s.last_trial = now  # a trial connection, in its priority place
                first.append(s)
            else:
                failed.append(s)
        return first + failed

    # ---- passive health ----------------------------------------------------
    def record_failure(self, s: TargetState, why: str = "connect failed") -> None:
        now = self.clock()
        s.consecutive_failures += 1
        s.consecutive_successes = 0
        s.last_failure_at = self.wall_clock()
        s.failure_times.append(now)
        del s.failure_times[:-FAIL_AFTER]
        if (s.healthy and s.consecutive_failures >= FAIL_AFTER
                and now - s.failure_times[0] <= FAIL_WINDOW):
            s.healthy = False
            s.last_trial = now
            if self.multi:
                self.counters.target_failovers_total += 1
            log.warn("rule.target_failed", rule=self.rule.rule_id, target=s.target.label(), index=s.index,
                     reason=why)

    def record_success(self, s: TargetState) -> None:
        s.consecutive_failures = 0
        s.consecutive_successes += 1
        s.last_success_at = self.wall_clock()
        if s.failure_times:
            s.failure_times.clear()
        if not s.healthy and s.consecutive_successes >= RECOVER_AFTER:
            s.healthy = True
            if self.multi:
                self.counters.target_failovers_total += 1
            log.info("rule.target_healthy", rule=self.rule.rule_id, target=s.target.label(), index=s.index)

    def snapshot(self) -> list[dict]:
        return [s.to_dict() for s in self.states]

    # ---- active probes ---------------------------------------------------------
    def start_probes(self) -> None:
        interval = self.rule.health_check_interval_secs
        if not interval or self.loop is None or self._probe_timer is not None:
            return
        self._probe_timer = self.loop.call_later(interval, self._probe_round)

    def stop_probes(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None

    def _probe_round(self) -> None:
        interval = self.rule.health_check_interval_secs
        self._probe_timer = self.loop.call_later(interval, self._probe_round)
        for s in self.states:
            self._probe(s, min(PROBE_TIMEOUT, float(interval)))

    def _probe(self, s: TargetState, timeout: float) -> None:
        """A TCP connect to the target, entirely on the loop; never blocks dispatch."""
        t = s.target

        def on_connected(sock, reason) -> None:
            if sock is None:
                self.record_failure(s, f"probe: {reason}")
                return
            sock.close()
            self.record_success(s)

        def on_addrs(addrs, err) -> None:
            if self._probe_timer is None:
                return
            if err is not None or not addrs:
                self.record_failure(s, f"probe: {err}")
                return
            fam, ip = addrs[0]
            try:
                Connect(self.loop, ip, t.port, timeout, on_connected, family=fam)
            except OSError:
                return  # out of descriptors: that says nothing about the target
        if self.resolver is None:
            on_addrs([(family_of(t.host), t.host)], None)
        else:
            self.resolver.resolve(t.host, self.rule.prefer_ipv6, on_addrs)
